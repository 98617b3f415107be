"""Lay an output out by metric, so a reader looking for one metric skips the others' row groups.

The viewer prunes row groups by `metric_name` min/max statistics. A plain merge keeps the
monitor's mixed row groups, whose statistics span every metric, so nothing is pruned and every
byte is decoded again. Here rows are sorted by metric with an external sort (`MetricSorter`):
a bounded buffer, sorted runs parked on disk, then each metric written out whole, so every
row group after the first holds one metric and memory never grows with the output.

Row group 0 is different: it holds the first row of every metric, because the viewer builds its
metric list from the first row group of the newest file, and that file may be ours. Taking the
*first* row of each metric keeps time order within every metric and container: the head row
precedes the rest of its metric in the file, and the sort is stable while sources arrive in
time order.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import durable, label_sets
from .label_sets import LabelSets
from .schemas import METRIC_NAME


class FirstRows:
    """The first row of every metric, taken out of the stream of rows as it passes.

    Rows arrive in source order, so the first row seen of a metric is its earliest. They wait
    here, one per metric, until row group 0 is written: the sorter writes nothing before
    `finish`, so a single read of the sources serves both.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._rows: list[pa.RecordBatch] = []

    def take_from(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """`batch` without the first rows of metrics not seen before, which are kept here."""
        codes = _encoded(batch.column(METRIC_NAME))
        if self._seen.issuperset(codes.dictionary.to_pylist()):
            return [batch]  # the usual case: a source's dictionary names what it holds
        firsts = []
        for code in pc.unique(codes.indices).drop_null().to_pylist():
            name = codes.dictionary[code].as_py()
            if name not in self._seen:
                self._seen.add(name)
                firsts.append(pc.index(codes.indices, pa.scalar(code, codes.indices.type)).as_py())
        if not firsts:
            return [batch]
        firsts.sort()
        self._rows.append(batch.take(pa.array(firsts, pa.int64())))
        return without_rows(batch, firsts)

    def table(self, schema: pa.Schema) -> pa.Table:
        """The rows taken, in metric order, with one dictionary per column (as the parquet
        writer wants them)."""
        head = pa.Table.from_batches(self._rows, schema=schema)
        head = head.unify_dictionaries().combine_chunks()
        if head.num_rows == 0:
            return head
        keys, _metrics = metric_keys(head.column(METRIC_NAME).chunk(0))
        return head.take(pc.sort_indices(keys))


def metric_keys(names: pa.Array) -> tuple[pa.Array, list[str]]:
    """Each row's metric as its place among the metrics `names` holds, sorted, and the metric
    at each place. An integer key sorts six times faster than the names, and the names are
    compared once per dictionary entry, not once per row."""
    codes = _encoded(names)
    metrics = codes.dictionary.take(pc.sort_indices(codes.dictionary)).to_pylist()
    places = pc.subtract(pc.rank(codes.dictionary, tiebreaker="first"), 1)
    return pc.take(places, codes.indices), metrics


def _encoded(names: pa.Array) -> pa.DictionaryArray:
    if pa.types.is_dictionary(names.type):
        return names
    return pc.dictionary_encode(names)


def without_rows(batch: pa.RecordBatch, rows: list[int]) -> list[pa.RecordBatch]:
    """`batch` minus the given rows (sorted), as slices."""
    pieces: list[pa.RecordBatch] = []
    start = 0
    for row in rows:
        pieces.append(batch.slice(start, row - start))
        start = row + 1
    pieces.append(batch.slice(start))
    return [piece for piece in pieces if piece.num_rows]


Run = tuple[str, pa.RecordBatch, int]  # a metric's rows from one buffer, and their size


class Spill:
    """Sorted runs parked on disk until every row of the output has been seen.

    An anonymous file (O_TMPFILE where the system has it) in the output's folder: it has no
    name, so a crash cannot leave it behind, and it sits on the volume whose space the output
    needs anyway. Each parked buffer is one LZ4-compressed Arrow IPC file holding one batch per
    metric (its runs share one set of dictionaries); reading a metric back reads and decodes
    only that metric's batches. One IPC stream per run instead cost a schema and every
    dictionary per run: with 50 metrics that tripled the CPU of a merge.
    """

    OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4", use_threads=False)
    READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)
    # Parked buffers go to the file through this much memory, not whole: a whole one (about
    # a fifth of the buffer, compressed) was held twice while its memory stream grew.
    WRITE_BUFFER = 256 * 1024

    def __init__(self, folder: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed by close()
        self._parts: list[tuple[int, int]] = []  # (offset, length) of each parked buffer
        self._size = 0
        self._readers: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._single: set[int] = set()  # parts of one run each (`park_apart`)
        # metric -> (part, batch, size as written) of each of its runs, in order
        self.runs: dict[str, list[tuple[int, int, int]]] = {}

    def park(self, schema: pa.Schema, runs: Iterable[Run]) -> None:
        """One buffer's runs, of `schema`, sorted by metric and sharing their dictionaries."""
        self._write_part(schema, runs)

    def park_apart(self, schema: pa.Schema, runs: Iterable[Run]) -> None:
        """One buffer's runs, each in a part of its own with its own dictionaries, read once
        and not kept open. For a buffer whose dictionaries are large (a label that differs in
        every row): in a shared part, each run read back held them all, and every part's
        stayed in memory until the output was written."""
        for run in runs:
            self._single.add(self._write_part(schema, [run]))

    def _write_part(self, schema: pa.Schema, runs: Iterable[Run]) -> int:
        part = len(self._parts)
        appender = durable.Sink(self._file)  # counts what this part adds
        sink = pa.BufferedOutputStream(pa.PythonFile(appender, mode="w"), self.WRITE_BUFFER)
        try:
            with pa.ipc.new_file(sink, schema, options=self.OPTIONS) as writer:
                for index, (name, run, size) in enumerate(runs):
                    writer.write_batch(run)
                    self.runs.setdefault(name, []).append((part, index, size))
        except BaseException:
            with contextlib.suppress(Exception):  # the error that matters is already raised
                sink.close()
            raise
        sink.close()  # writes what is buffered; a full disk raises here
        self._parts.append((self._size, appender.size))
        self._size += appender.size
        return part

    def size(self, name: str) -> int:
        """The parked rows of one metric, as written."""
        return sum(size for _part, _index, size in self.runs.get(name, []))

    def read(self, name: str) -> Iterator[tuple[pa.RecordBatch, int]]:
        """The parked rows of one metric, run after run, in the order they were parked, each
        with its size as written."""
        self._file.flush()
        for part, index, size in self.runs.get(name, []):
            reader = self._readers.get(part) or self._open(part)
            if part not in self._single:
                self._readers[part] = reader
            yield reader.get_batch(index), size

    def _open(self, part: int) -> pa.ipc.RecordBatchFileReader:
        offset, length = self._parts[part]
        window = _Window(self._file.fileno(), offset, length)
        return pa.ipc.open_file(pa.PythonFile(window, mode="r"), options=self.READ_OPTIONS)

    def close(self) -> None:
        self._readers.clear()
        self._file.close()


def _dictionary_bytes(batch: pa.RecordBatch) -> int:
    return sum(
        column.dictionary.nbytes for column in batch.columns if pa.types.is_dictionary(column.type)
    )


class _Window(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, read with pread, as a file of its own.

    Not a memory map: the pages of a mapping count in the process's RSS (about 15 MB more at
    peak on a day of 50 metrics), and the spill is read once, in order, anyway.
    """

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._position = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + position)
        return self._position

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._length - self._position)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._offset + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


# Batches held in the buffer before they are combined into one; a source gives a few.
MAX_BATCHES = 256


class MetricSorter:
    """Rows leave sorted by metric, one row group per metric (more for a metric larger than
    `row_group_bytes`), whatever the size of the output; metrics smaller than
    `shared_row_group_bytes` share row groups with their neighbours.

    Rows wait in arrival order until `buffer_bytes` of them have come, then are sorted (one
    stable sort by an integer key, copied out a few metrics at a time) and, when the output is
    larger than one buffer, parked on disk as one run per metric (`Spill`). At the end each
    metric's runs are read back in order and written out together: an external sort, so memory
    is bounded by the buffer while a metric still gets few, large row groups. Nothing is
    written before `finish`, so a caller can put a row group of its own first. Given `labels`,
    each sorted buffer travels with its text folded into one number per row (`label_sets`),
    unfolded as its row groups leave.

    Sharing bounds the row groups of an output by its size, not by its number of metrics: the
    parquet writer keeps every row group's metadata until the file is closed (12-23 KB each
    with statistics, page index and bloom filter), and an output of 3,000 small metrics took
    184 MiB and twelve times the CPU, its footer alone 26 MB for 20,000. A shared row group
    holds whole small metrics only, sorted, so statistics still prune it for any other
    metric, and a reader of one of them decodes at most about twice `shared_row_group_bytes`.
    """

    def __init__(
        self,
        write_row_group: Callable[[pa.Table], None],
        *,
        row_group_bytes: int,
        buffer_bytes: int,
        spill_folder: Path,
        labels: LabelSets | None = None,
        shared_row_group_bytes: int = 0,
    ) -> None:
        self._labels = labels
        # Buffers are folded until the output's label sets are too many (`LabelSets.full`);
        # after that they are parked as they are, and folded runs are unfolded one by one.
        self._folding = labels is not None
        self._write = write_row_group
        self._row_group_bytes = row_group_bytes
        self._shared_bytes = shared_row_group_bytes
        self._buffer_bytes = buffer_bytes
        self._spill_folder = spill_folder
        self._batches: list[pa.RecordBatch] = []
        self._buffered = 0
        self._spill: Spill | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        self._batches.append(batch)
        self._buffered += batch.get_total_buffer_size()
        if self._buffered >= self._buffer_bytes:
            self._park_buffer()
        elif len(self._batches) >= MAX_BATCHES:
            # Each batch held costs about 20 KB besides its rows: 3,000 one-row sources in an
            # output took the peak to 148 MiB while the buffer counted 0.7 MB.
            self._batches = [_one_chunk(self._batches)]

    def finish(self) -> None:
        """Write every row out; the spill, if any, is gone afterwards (even on an error)."""
        if self._spill is None:  # the whole output fitted in the buffer
            buffer = self._take_buffer()
            runs = self._runs(buffer) if buffer is not None else iter(())
            self._write_metrics((size, [(run, size)]) for _name, run, size in runs)
            return
        try:
            self._park_buffer()
            spill = self._spill
            names = sorted(spill.runs)
            self._write_metrics((spill.size(name), spill.read(name)) for name in names)
        finally:
            self.close()

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _park_buffer(self) -> None:
        buffer = self._take_buffer()
        if buffer is None:
            return
        if self._spill is None:
            self._spill = Spill(self._spill_folder)
        runs = self._runs(buffer)
        if _dictionary_bytes(buffer) <= APART_ABOVE:
            self._spill.park(buffer.schema, runs)
        else:
            compact = (
                (name, _compacted_batch(run, run.num_rows), size) for name, run, size in runs
            )
            self._spill.park_apart(buffer.schema, compact)

    def _take_buffer(self) -> pa.RecordBatch | None:
        """The buffer as one batch, folded while the output may fold; None if empty."""
        if not self._batches:
            return None
        buffer = _one_chunk(self._batches)
        self._batches, self._buffered = [], 0
        if buffer.num_rows == 0:
            return None
        if self._folding and self._labels is not None:
            packed = self._labels.pack(buffer)
            if packed is None:  # too many label sets: this buffer and the rest as they are
                self._folding = False
            else:
                buffer = packed
        return buffer

    def _runs(self, buffer: pa.RecordBatch) -> Iterator[Run]:
        """The buffer's rows sorted by metric, as one run per metric, with its size."""
        row_bytes = self._written_size(buffer) / buffer.num_rows
        keys, metrics = metric_keys(buffer.column(METRIC_NAME))
        order = pc.sort_indices(keys)  # stable: rows of a metric keep their arrival order
        # Runs are copied out a few metrics at a time, about a quarter of the buffer per `take`:
        # one `take` per metric cost five times the CPU of one for the whole buffer, which in
        # turn held a second copy of the buffer while it was parked.
        offset = 0
        for group in _groups(_counts(keys), max(1, buffer.num_rows // 4)):
            rows = sum(count for _key, count in group)
            # The permutation is the sort's own, so no index needs checking (17 columns each
            # checked every index: 1% of a merge).
            ordered = pc.take(buffer, order.slice(offset, rows), boundscheck=False)
            start = 0
            for key, count in group:
                yield metrics[key], ordered.slice(start, count), round(count * row_bytes)
                start += count
            offset += rows

    def _write_metrics(
        self, metrics: Iterable[tuple[int, Iterable[tuple[pa.RecordBatch, int]]]]
    ) -> None:
        """Each metric's rows (with their size), in order, as row groups of about
        `row_group_bytes` at most. A metric starts a row group of its own unless it is small
        and fits in the pending one, which holds only small metrics then."""
        pending: list[pa.RecordBatch] = []
        size = 0
        for metric_size, batches in metrics:
            shared = metric_size < self._shared_bytes
            if pending and (not shared or size + metric_size > self._row_group_bytes):
                self._write_table(_one_dictionary(pending))
                pending, size = [], 0
            for run, batch_size in batches:
                batch = self._as_written(run)
                if pending and size + batch_size > self._row_group_bytes:
                    self._write_table(_one_dictionary(pending))
                    pending, size = [], 0
                pending.append(batch)
                size += batch_size
            if pending and (not shared or size >= self._shared_bytes):
                self._write_table(_one_dictionary(pending))
                pending, size = [], 0
        if pending:
            self._write_table(_one_dictionary(pending))

    def _as_written(self, run: pa.RecordBatch) -> pa.RecordBatch:
        """A run as it can share a row group: once folding stopped, runs come both folded
        and not, so each is unfolded on its own, and each large dictionary (a part's, whose
        runs share it) is cut to the run's values before the row group unifies them."""
        if self._folding or self._labels is None:
            return run  # one kind of run; a row group is unfolded whole (`_write_table`)
        if label_sets.is_packed(run.schema):
            run = self._labels.unpack(pa.Table.from_batches([run])).to_batches()[0]
        return _compacted_batch(run, run.num_rows)

    def _written_size(self, batch: pa.RecordBatch) -> int:
        """What a sorted buffer's rows add to the row groups they go to, its runs' share
        counted by their rows (one call per buffer: per run, it was 12% of a merge's CPU).
        With the labels unfolded: a row group of folded rows would hold twice the rows, and
        take twice the memory to write. Of a dictionary, the values the rows use (see
        `_rows_bytes`): counting each run's whole dictionary, 50 KB for each of 3,000 metrics
        of 4 rows once made every metric look large."""
        size = sum(_rows_bytes(column) for column in batch.columns)
        if self._labels is not None and label_sets.is_packed(batch.schema):
            size += self._labels.unfolded_bytes(batch.num_rows)
        return size

    def _write_table(self, table: pa.Table) -> None:
        if self._labels is not None and label_sets.is_packed(table.schema):
            table = self._labels.unpack(table)
        self._write(_compacted(table))


def _rows_bytes(column: pa.Array) -> int:
    """A column's bytes in a row group: of a dictionary, the values its rows use. One longer
    than the column holds others too (pyarrow reads a column chunk's dictionary as it grows,
    so each batch of 4 KB labels carried every value read before it), and only then are the
    used ones found."""
    if not pa.types.is_dictionary(column.type):
        return int(column.nbytes)
    dictionary = column.dictionary
    if len(dictionary) > len(column):
        dictionary = dictionary.take(pc.unique(column.indices).drop_null())
    return int(column.indices.nbytes + dictionary.nbytes)


# A row group's dictionary longer than this is cut down to the values its rows use.
COMPACT_ABOVE = 1024
# A buffer whose dictionaries hold more than this is parked one run a part (`park_apart`).
APART_ABOVE = 256 * 1024


def _compacted_batch(batch: pa.RecordBatch, longer_than: int) -> pa.RecordBatch:
    table = _compacted(pa.Table.from_batches([batch]), longer_than)
    return table.combine_chunks().to_batches()[0]


def _compacted(table: pa.Table, longer_than: int = COMPACT_ABOVE) -> pa.Table:
    """`table` with each dictionary of one chunk longer than `longer_than` holding only the
    values its rows use. The label columns of a folded row group carry the whole output's
    values (`LabelSets.unpack`): with a container id per row, each row group of one metric
    wrote every id of the output again, 20 MB for 20,000 rows. A column of several chunks
    comes from runs that share their buffer's dictionary, or were cut already (`_as_written`),
    and is left as it is: cutting those too took an output of 3,000 metrics from 99 to
    161 MiB. The monitor's dictionaries (metrics, containers) are far shorter, and cost
    nothing here."""
    for position, column in enumerate(table.columns):
        if not pa.types.is_dictionary(column.type) or column.num_chunks != 1:
            continue
        chunk = column.chunk(0)
        if len(chunk.dictionary) <= longer_than:
            continue
        used = pc.unique(chunk.indices).drop_null()
        indices = pc.index_in(chunk.indices, value_set=used).cast(chunk.type.index_type)
        compact = pa.DictionaryArray.from_arrays(indices, chunk.dictionary.take(used))
        table = table.set_column(position, table.field(position), pa.chunked_array([compact]))
    return table


def _one_dictionary(batches: list[pa.RecordBatch]) -> pa.Table:
    """A row group whose text has one dictionary per column: given several, the parquet
    writer falls back to decoding the text to plain strings, which costs time and memory."""
    return pa.Table.from_batches(batches).unify_dictionaries()


def _one_chunk(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """The buffer as one batch with one dictionary per column (nested ones too).

    Built a column at a time, each column's arrival-order chunks released as soon as its
    combined copy exists, so the buffer is never held twice. One dictionary lets `take` move
    indices only (2.5 times faster than unifying every batch's dictionaries again), and every
    run shares the dictionaries it is parked with.
    """
    rest = pa.Table.from_batches(batches)
    batches.clear()
    schema, columns = rest.schema, []
    while rest.num_columns:
        columns.append(rest.select([0]).unify_dictionaries().column(0).combine_chunks())
        rest = rest.remove_column(0)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _groups(runs: list[tuple[int, int]], rows: int) -> Iterator[list[tuple[int, int]]]:
    """Consecutive runs gathered until a group holds at least `rows` rows."""
    group: list[tuple[int, int]] = []
    size = 0
    for run in runs:
        group.append(run)
        size += run[1]
        if size >= rows:
            yield group
            group, size = [], 0
    if group:
        yield group


def _counts(keys: pa.Array) -> list[tuple[int, int]]:
    """(key, rows) of every metric present, in sort order."""
    counts = pc.value_counts(keys)
    present, rows = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    return sorted(zip(present, rows, strict=True))
