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
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from . import durable, label_sets
from .label_sets import LabelSets
from .schemas import METRIC_NAME, holds_dictionary

T = TypeVar("T")


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
# Rows sorted by metric, and each metric in them with its rows, in order.
Group = tuple[pa.RecordBatch, list[tuple[str, int]]]

# Metrics smaller than this are parked together with their neighbours, in batches of about
# this size; a larger one is a batch of its own.
GROUP_BYTES = 64 * 1024
# Small metrics fill shared row groups of at least a fraction this of all of them together:
# the parquet writer holds every row group's metadata until the file closes, about 28 KB
# each, and 5,000 metrics in an output of 40 sources made 2,500 row groups (70 MB).
MAX_SHARED = 256


@dataclass
class _Part:
    """One parked buffer, and how far it has been read back.

    Only its batches are counted here, by the metrics they start and end with: what a batch
    holds is read from the batch itself when it is loaded. Bookkeeping per metric per part
    took 40 MB for 5,000 metrics in 193 parts.
    """

    row_bytes: float  # a row's size as written, as its buffer counted it
    apart: bool  # each batch is an IPC stream of its own, with its own dictionaries
    # Where each of its IPC streams begins in the spill, and where the last ends.
    bounds: array[int] = field(default_factory=lambda: array("q"))
    starts: array[int] = field(default_factory=lambda: array("q"))  # each batch's first metric
    ends: array[int] = field(default_factory=lambda: array("q"))  # and its last
    loaded: int = 0  # batches loaded so far
    reader: pa.ipc.RecordBatchStreamReader | None = None  # open while its stream has batches
    batch: pa.RecordBatch | None = None  # the loaded batch, while some of it is still to read
    runs: list[tuple[str, int, int]] = field(default_factory=list)  # its metrics still to read

    def read_through(self) -> bool:
        return self.batch is None and self.loaded == len(self.starts)


class Spill:
    """Sorted runs parked on disk until every row of the output has been seen.

    An anonymous file (O_TMPFILE where the system has it) in the output's folder: it has no
    name, so a crash cannot leave it behind, and it sits on the volume whose space the output
    needs anyway. Each parked buffer (a *part*) is LZ4-compressed Arrow IPC of its rows
    sorted by metric: a metric of at least `GROUP_BYTES` is a batch alone, so reading it back
    decodes none of the others, and smaller ones share batches of about that size. Reading
    back goes a few metrics at a time through every part at once (a k-way merge), each part
    read front to back once, and holds at most one batch per part.

    A part is one IPC stream whose batches share their buffer's dictionaries, unless those
    are long (a metric or label with thousands of values): then each batch goes with the
    values its rows use, which a stream may change between batches (193 parts holding 5,000
    metric names each took 28 MB), and where they are large (`APART_ABOVE`), in a stream of
    its own. One stream per run cost a schema and every dictionary per run: with 50 metrics
    that tripled the CPU of a merge. One batch per run cost a batch's bookkeeping per run:
    5,000 metrics of 400 rows in ten sources spilled 217 MB for 9.5 MB of sources, and took
    55 s and 155 MiB.
    """

    OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4", use_threads=False)
    READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)
    # Parked buffers go to the file through this much memory, not whole: a whole one (about
    # a fifth of the buffer, compressed) was held twice while its memory stream grew.
    WRITE_BUFFER = 256 * 1024

    def __init__(self, folder: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed by close()
        self._parts: list[_Part] = []
        self._size = 0
        self._numbers: dict[str, int] = {}  # each metric's number in `_Part.starts`
        self._names: list[str] = []  # and the metric of each number
        self._sizes: list[int] = []  # each metric's parked size as written, by number

    def park(
        self,
        schema: pa.Schema,
        groups: Iterable[Group],
        row_bytes: float,
        *,
        cut: bool,
        apart: bool,
    ) -> None:
        """One buffer's rows, of `schema`, sorted by metric, each row `row_bytes` as written.
        With `cut`, each batch is parked with the dictionary values its rows use, and with
        `apart`, in a stream of its own."""
        part = _Part(row_bytes, apart=apart)
        appender = durable.Sink(self._file)  # counts what this part adds
        sink = pa.BufferedOutputStream(pa.PythonFile(appender, mode="w"), self.WRITE_BUFFER)
        part.bounds.append(self._size)
        writer = None
        try:
            for batch, metrics in groups:
                if writer is None:
                    writer = pa.ipc.new_stream(sink, schema, options=self.OPTIONS)
                rows = batch.num_rows
                writer.write_batch(
                    _compacted_batch(batch, min(rows, COMPACT_ABOVE)) if cut else batch
                )
                if apart:
                    writer.close()
                    writer = None
                    part.bounds.append(self._size + sink.tell())
                self._count(part, metrics)
            if writer is not None:
                writer.close()
                part.bounds.append(self._size + sink.tell())
        except BaseException:
            with contextlib.suppress(Exception):  # the error that matters is already raised
                sink.close()
            raise
        sink.close()  # writes what is buffered; a full disk raises here
        self._parts.append(part)
        self._size += appender.size

    def _count(self, part: _Part, metrics: list[tuple[str, int]]) -> None:
        """Note a part's batch by the metrics it starts and ends with, and add them up."""
        for name, rows in metrics:
            number = self._numbers.setdefault(name, len(self._numbers))
            if number == len(self._sizes):
                self._sizes.append(0)
                self._names.append(name)
            self._sizes[number] += round(rows * part.row_bytes)
        part.starts.append(self._numbers[metrics[0][0]])
        part.ends.append(self._numbers[metrics[-1][0]])

    def metrics(self) -> Iterator[tuple[str, int]]:
        """Each metric parked, in order, with its size as written. Ordered as each buffer
        ordered its metrics (`metric_keys`), so every part is read through once, front to
        back."""
        self._file.flush()
        names = pa.array(list(self._numbers), pa.utf8())
        for name in names.take(pc.sort_indices(names)).to_pylist():
            yield name, self._sizes[self._numbers[name]]

    def small_bytes(self, below: int) -> int:
        """The size of the metrics smaller than `below`, all together."""
        return sum(size for size in self._sizes if size < below)

    def rows(self, names: list[str]) -> Iterator[tuple[pa.RecordBatch, int]]:
        """The rows of the next metrics in order (`metrics`), part after part in the order
        they were parked; each piece holds one part's rows of them, sorted by metric, and
        comes with its size."""
        wanted, numbers = set(names), {self._numbers[name] for name in names}
        for part in self._parts:  # a part holds the metrics together, in their turn
            while (piece := self._next_rows(part, wanted, numbers)) is not None:
                yield piece

    def check_read_through(self) -> None:
        unread = sum(not part.read_through() for part in self._parts)
        if unread:  # a defect of ours; the output would lack rows, so it must not be kept
            raise RuntimeError(f"{unread} parked buffers were not read back to the end")

    def _next_rows(
        self, part: _Part, names: set[str], numbers: set[int]
    ) -> tuple[pa.RecordBatch, int] | None:
        """The part's rows of `names` that come next in its current batch, with their size;
        None once it has none left there, nor in its next batch."""
        batch = part.batch
        if batch is None:
            if part.loaded == len(part.starts) or part.starts[part.loaded] not in numbers:
                return None
            batch = self._load_next(part)
        runs = part.runs
        count = 0
        while count < len(runs) and runs[count][0] in names:
            count += 1
        if count == 0:
            return None
        first, rows = runs[0][1], sum(run_rows for _name, _first, run_rows in runs[:count])
        del runs[:count]
        if not runs:
            part.batch = None
        return batch.slice(first, rows), round(rows * part.row_bytes)

    def _load_next(self, part: _Part) -> pa.RecordBatch:
        """The part's next batch, held with the metrics in it. A stream is closed after its
        last batch: a reader holds the dictionaries it read last."""
        if part.reader is None:
            stream = part.loaded if part.apart else 0
            start, end = part.bounds[stream], part.bounds[stream + 1]
            source = pa.PythonFile(_Window(self._file.fileno(), start, end - start), mode="r")
            part.reader = pa.ipc.open_stream(source, options=self.READ_OPTIONS)
        part.batch = batch = part.reader.read_next_batch()
        first, last = part.starts[part.loaded], part.ends[part.loaded]
        if first == last:  # one metric, as most batches are
            part.runs = [(self._names[first], 0, batch.num_rows)]
        else:
            part.runs = _metric_runs(batch)
        part.loaded += 1
        if part.apart or part.loaded == len(part.starts):
            part.reader = None
        return batch

    def close(self) -> None:
        for part in self._parts:
            part.reader, part.batch = None, None
        self._file.close()


def _dictionary_bytes(batch: pa.RecordBatch) -> int:
    return sum(held.dictionary.nbytes for column in batch.columns for held in _dictionaries(column))


def _dictionaries(column: pa.Array) -> list[pa.DictionaryArray]:
    """The dictionary arrays `column` is or holds: itself, or a map's key and item (the map
    era's labels), whole, whatever slice of them `column` is."""
    if pa.types.is_dictionary(column.type):
        return [column]
    if pa.types.is_map(column.type):
        children = (column.keys, column.items)
        return [child for child in children if pa.types.is_dictionary(child.type)]
    return []


def _metric_runs(batch: pa.RecordBatch) -> list[tuple[str, int, int]]:
    """Each metric of rows sorted by metric, with its first row and its rows."""
    codes = _encoded(batch.column(METRIC_NAME))
    indices = codes.indices
    changed = pc.not_equal(indices.slice(1), indices.slice(0, len(indices) - 1))
    starts = [0, *pc.add(pc.indices_nonzero(changed), 1).to_pylist()]
    names = codes.dictionary.take(indices.take(pa.array(starts, pa.int64()))).to_pylist()
    runs: list[tuple[str, int, int]] = []
    for name, start, end in zip(names, starts, [*starts[1:], len(indices)], strict=True):
        if runs and runs[-1][0] == name:  # a dictionary listing a value twice
            runs[-1] = (name, runs[-1][1], end - runs[-1][1])
        else:
            runs.append((name, start, end - start))
    return runs


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


class SortedRows(Protocol):
    """Rows sorted by metric, given back a few metrics at a time (`Spill`, `_SortedInMemory`)."""

    def metrics(self) -> Iterator[tuple[str, int]]: ...

    def rows(self, names: list[str]) -> Iterator[tuple[pa.RecordBatch, int]]: ...

    def check_read_through(self) -> None: ...


class _SortedInMemory:
    """The runs of a buffer sorted in memory, given back as `Spill` gives parked ones.
    Runs are taken from the sort as their metrics are asked about, and held until read."""

    def __init__(self, runs: Iterator[Run]) -> None:
        self._runs = runs
        self._held: deque[Run] = deque()

    def metrics(self) -> Iterator[tuple[str, int]]:
        for run in self._runs:
            self._held.append(run)
            yield run[0], run[2]

    def rows(self, names: list[str]) -> Iterator[tuple[pa.RecordBatch, int]]:
        for name in names:
            held_name, run, size = self._held.popleft()
            if held_name != name:  # a defect of ours
                raise RuntimeError(f"rows of {held_name!r} came when {name!r} was asked for")
            yield run, size

    def check_read_through(self) -> None:
        if self._held:
            raise RuntimeError(f"{len(self._held)} sorted runs were not written")


def _by_metric(table: pa.Table) -> pa.Table:
    """A row group's rows sorted by metric, each metric's rows in the order they came (pieces
    of several parked buffers each hold several metrics), in one chunk: the parquet writer's
    cost per chunk made a row group of 390 pieces take six times as long to write."""
    keys, _metrics = metric_keys(table.column(METRIC_NAME).combine_chunks())
    return table.take(pc.sort_indices(keys))


# Batches held in the buffer before they are combined into one; a source gives a few.
MAX_BATCHES = 256


class MetricSorter:
    """Rows leave sorted by metric, one row group per metric (more for a metric larger than
    `row_group_bytes`), whatever the size of the output; metrics smaller than
    `shared_row_group_bytes` share row groups with their neighbours.

    Rows wait in arrival order until `buffer_bytes` of them have come, then are sorted (one
    stable sort by an integer key, copied out a few metrics at a time) and, when the output is
    larger than one buffer, parked on disk (`Spill`). At the end every parked buffer is read
    back at once, a few metrics at a time, and each metric's rows are written out together:
    an external sort, so memory is bounded by the buffer and one parked batch per buffer,
    while a metric still gets few, large row groups. Nothing is
    written before `finish`, so a caller can put a row group of its own first. Given `labels`,
    each sorted buffer travels with its text folded into one number per row (`label_sets`),
    unfolded as its row groups leave.

    Sharing bounds the row groups of an output by its size, not by its number of metrics: the
    parquet writer keeps every row group's metadata until the file is closed (12-23 KB each
    with statistics, page index and bloom filter), and an output of 3,000 small metrics took
    184 MiB and twelve times the CPU, its footer alone 26 MB for 20,000. A shared row group
    holds whole small metrics only, sorted, so statistics still prune it for any other
    metric, and a reader of one of them decodes at most about twice `shared_row_group_bytes`,
    or a `MAX_SHARED`th of all small metrics together where that is more (thousands of
    metrics in a large output).
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
            in_memory = _SortedInMemory(self._runs(buffer) if buffer is not None else iter(()))
            self._write_metrics(in_memory, self._shared_bytes)
            return
        try:
            self._park_buffer()
            spill = self._spill
            fill = max(self._shared_bytes, spill.small_bytes(self._shared_bytes) // MAX_SHARED)
            self._write_metrics(spill, min(fill, self._row_group_bytes))
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
        row_bytes = self._written_size(buffer) / buffer.num_rows
        groups = self._sorted_batches(buffer, row_bytes)
        apart = _dictionary_bytes(buffer) > APART_ABOVE
        cut = apart or _dictionaries_longer(buffer, COMPACT_ABOVE)
        self._spill.park(buffer.schema, groups, row_bytes, cut=cut, apart=apart)

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
        for run, ((name, rows),) in self._sorted_batches(buffer, row_bytes, at_least=0):
            yield name, run, round(rows * row_bytes)

    def _sorted_batches(
        self, buffer: pa.RecordBatch, row_bytes: float, at_least: int = GROUP_BYTES
    ) -> Iterator[Group]:
        """The buffer's rows sorted by metric, in batches of whole metrics as `Spill` parks
        them: a metric of `at_least` bytes or more alone, smaller ones with their neighbours
        (each alone when it is 0)."""
        for ordered, metrics in self._sorted(buffer):
            start = 0
            for group in _gathered(metrics, lambda metric: metric[1] * row_bytes, at_least):
                rows = sum(count for _name, count in group)
                yield ordered.slice(start, rows), group
                start += rows

    def _sorted(self, buffer: pa.RecordBatch) -> Iterator[Group]:
        """The buffer's rows sorted by metric, a few metrics at a time, about a quarter of the
        buffer per `take`: one `take` per metric cost five times the CPU of one for the whole
        buffer, which in turn held a second copy of the buffer while it was parked."""
        keys, metrics = metric_keys(buffer.column(METRIC_NAME))
        order = pc.sort_indices(keys)  # stable: rows of a metric keep their arrival order
        offset = 0
        for group in _gathered(_counts(keys), lambda run: run[1], max(1, buffer.num_rows // 4)):
            rows = sum(count for _key, count in group)
            # The permutation is the sort's own, so no index needs checking (17 columns each
            # checked every index: 1% of a merge).
            ordered = pc.take(buffer, order.slice(offset, rows), boundscheck=False)
            yield ordered, [(metrics[key], count) for key, count in group]
            offset += rows

    def _write_metrics(self, rows: SortedRows, fill: int) -> None:
        """Every metric's rows, in order, as row groups of about `row_group_bytes` at most.
        A small metric shares a row group with its neighbours until it holds `fill`."""
        for names, shared in self._row_groups(rows.metrics(), fill):
            pieces = rows.rows(names)
            if shared:
                group = [self._as_written(piece) for piece, _size in pieces]
                self._write_table(_by_metric(_one_dictionary(group)))
            else:
                self._write_large(pieces)
        rows.check_read_through()

    def _row_groups(
        self, metrics: Iterable[tuple[str, int]], fill: int
    ) -> Iterator[tuple[list[str], bool]]:
        """The metrics of each row group, and whether they are small ones sharing it. A
        metric starts a row group of its own unless it is small and fits in the open one."""
        group: list[str] = []
        size = 0
        for name, metric_size in metrics:
            if metric_size >= self._shared_bytes:
                if group:
                    yield group, True
                    group, size = [], 0
                yield [name], False
                continue
            if group and size + metric_size > self._row_group_bytes:
                yield group, True
                group, size = [], 0
            group.append(name)
            size += metric_size
            if size >= fill:
                yield group, True
                group, size = [], 0
        if group:
            yield group, True

    def _write_large(self, pieces: Iterable[tuple[pa.RecordBatch, int]]) -> None:
        """One metric's rows, cut into row groups of `row_group_bytes` at most."""
        pending: list[pa.RecordBatch] = []
        size = 0
        for piece, piece_size in pieces:
            batch = self._as_written(piece)
            if pending and size + piece_size > self._row_group_bytes:
                self._write_table(_one_dictionary(pending))
                pending, size = [], 0
            pending.append(batch)
            size += piece_size
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
    if pa.types.is_map(column.type):
        entries = _map_entries(column)
        if any(_dictionary_longer(child, len(child)) for child in entries):
            return 4 * (len(column) + 1) + sum(_rows_bytes(child) for child in entries)
    if not pa.types.is_dictionary(column.type):
        return int(column.nbytes)
    dictionary = column.dictionary
    if len(dictionary) > len(column):
        dictionary = dictionary.take(pc.unique(column.indices).drop_null())
    return int(column.indices.nbytes + dictionary.nbytes)


# A row group's dictionary longer than this is cut down to the values its rows use.
COMPACT_ABOVE = 1024
# A buffer whose dictionaries hold more than this parks each batch in an IPC stream of its own
# (`Spill.park`): a stream's reader holds the dictionaries it read last, and 150 parts of
# 1 KB labels, each holding one batch's, took 39 MiB more.
APART_ABOVE = 256 * 1024


def _compacted_batch(batch: pa.RecordBatch, longer_than: int) -> pa.RecordBatch:
    if not _dictionaries_longer(batch, longer_than):
        return batch
    table = _compacted(pa.Table.from_batches([batch]), longer_than)
    return table.combine_chunks().to_batches()[0]


def _dictionaries_longer(batch: pa.RecordBatch, longer_than: int) -> bool:
    return any(_dictionary_longer(column, longer_than) for column in batch.columns)


def _dictionary_longer(array: pa.Array, longer_than: int) -> bool:
    return any(len(held.dictionary) > longer_than for held in _dictionaries(array))


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
        if column.num_chunks != 1 or not _dictionary_longer(column.chunk(0), longer_than):
            continue
        chunk = column.chunk(0)
        if pa.types.is_map(chunk.type):
            compact = _compacted_map(chunk, longer_than)
        else:
            compact = _compacted_dictionary(chunk)
        table = table.set_column(position, table.field(position), pa.chunked_array([compact]))
    return table


def _compacted_dictionary(chunk: pa.DictionaryArray) -> pa.DictionaryArray:
    used = pc.unique(chunk.indices).drop_null()
    indices = pc.index_in(chunk.indices, value_set=used).cast(chunk.type.index_type)
    return pa.DictionaryArray.from_arrays(indices, chunk.dictionary.take(used))


def _compacted_map(chunk: pa.MapArray, longer_than: int) -> pa.MapArray:
    """A map (a slice of one, say) whose long key or item dictionary holds only the values
    of its entries: a part's runs share their buffer's, which held every label of it."""
    children = [
        _compacted_dictionary(entries) if _dictionary_longer(entries, longer_than) else entries
        for entries in _map_entries(chunk)
    ]
    mask = chunk.is_null() if chunk.null_count else None
    offsets = pc.subtract(chunk.offsets, chunk.offsets[0])
    return pa.MapArray.from_arrays(offsets, *children, type=chunk.type, mask=mask)


def _map_entries(column: pa.MapArray) -> list[pa.Array]:
    """The keys and items of the entries of `column`: a slice of a map still holds its whole
    children."""
    first, last = column.offsets[0].as_py(), column.offsets[-1].as_py()
    return [child.slice(first, last - first) for child in (column.keys, column.items)]


def _one_dictionary(batches: list[pa.RecordBatch]) -> pa.Table:
    """A row group whose text has one dictionary per column: given several, the parquet
    writer falls back to decoding the text to plain strings, which costs time and memory.

    pyarrow unifies the dictionaries inside a map in place, in the arrays it is given, and
    those are shared by every slice of the batch they were cut from: each next slice of a
    parked batch then carried every dictionary unified before, the values right but their
    dictionary growing by a row group's labels each time (two sources of 400,000 rows of
    long distinct labels: 293 MiB, now 113). So each map is unified in arrays of its own: a
    view of it builds them, without copying a value."""
    types = batches[0].schema.types
    maps = [i for i, kind in enumerate(types) if pa.types.is_map(kind) and holds_dictionary(kind)]
    if maps:
        batches = [_with_own_columns(batch, maps) for batch in batches]
    return pa.Table.from_batches(batches).unify_dictionaries()


def _with_own_columns(batch: pa.RecordBatch, positions: list[int]) -> pa.RecordBatch:
    columns = batch.columns
    for i in positions:
        columns[i] = columns[i].view(columns[i].type)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


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


def _gathered(items: list[T], size: Callable[[T], float], at_least: float) -> Iterator[list[T]]:
    """Consecutive items gathered until a gathering's `size` adds up to at least `at_least`."""
    group: list[T] = []
    total = 0.0
    for item in items:
        group.append(item)
        total += size(item)
        if total >= at_least:
            yield group
            group, total = [], 0
    if group:
        yield group


def _counts(keys: pa.Array) -> list[tuple[int, int]]:
    """(key, rows) of every metric present, in sort order."""
    counts = pc.value_counts(keys)
    present, rows = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    return sorted(zip(present, rows, strict=True))
