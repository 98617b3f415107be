"""Copy the rows of many parquet sources into one new file, one bounded buffer at a time.

The writer knows nothing of the journal or of final names: it creates the file it is given
exclusively, streams every source batch by batch (never a whole file) into row groups laid out
by metric (see `clustering`), syncs, and proves the result by reading its footer back. Each
source is read once. Whatever reading a source throws becomes a SourceReadError naming that
source, so the caller can tell a bad input from a bad disk.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import crashpoints, durable, label_sets, reading
from .clustering import FirstRows, MetricSorter
from .durable import FileIdentity
from .errors import (
    MergeAborted,
    OutputCheckError,
    SchemaConflictError,
    SourceReadError,
)
from .reading import UNREADABLE
from .schemas import ARROW_SCHEMA, METRIC_NAME, conform, holds_dictionary, is_text_or_bytes

# Rows decoded from a source at a time. A busy node's file is one row group of ~200k rows:
# 64k-row batches put 150 MB at peak on 40 such files, 16k-row batches 120 MB (+10% CPU).
# 8k-row batches took another 4 MiB off a partition of the map era (99 -> 95 MiB; each batch
# also carries its dictionaries, so the buffer fills with fewer rows) for about 5% more CPU.
READ_BATCH_ROWS = 8_192
OUTPUT_BUFFER = 256 * 1024
CONTAINER_ID = "l_container_id"
STEADY_COLUMNS = ("time", "fetch_index")


@dataclass(frozen=True)
class WriteSource:
    path: Path
    identity: FileIdentity
    rows: int


@dataclass(frozen=True)
class WriteOptions:
    compression_level: int = 3
    row_group_bytes: int = 4_000_000
    # Rows wait in memory up to this many row groups' worth before they are sorted and parked
    # on disk; the layout does not depend on it, only memory and the number of parked runs
    # (one: 112-125 MB peak on a day; two: 124-139 MB, for 10-20% less CPU).
    buffer_row_groups: int = 1
    share_below: int | None = None  # see `shared_row_group_bytes`; 0: every metric alone

    @property
    def buffer_bytes(self) -> int:
        return self.buffer_row_groups * self.row_group_bytes

    @property
    def shared_row_group_bytes(self) -> int:
        """Metrics smaller than this share row groups (see `MetricSorter`): by default a
        sixteenth of a row group, 250 KB, so that the monitor's metrics (about 1.5 MB each in
        an hour's output of a quiet node) keep row groups of their own."""
        return self.row_group_bytes // 16 if self.share_below is None else self.share_below


@dataclass(frozen=True)
class WriteResult:
    rows: int
    size: int
    checksum: str
    row_groups: int
    identity: FileIdentity  # of the file written, whatever its name points at by now


def _open_source(source: WriteSource, as_dictionary: Collection[str] = ()) -> pq.ParquetFile:
    """Open a source and prove it is the very file that was planned."""
    return reading.open_file(source.path, as_dictionary, planned=source.identity)[0]


def buffer_schema(schema: pa.Schema) -> pa.Schema:
    """How rows wait in memory: text columns dictionary-encoded, as they are on disk, which
    makes a buffer hold about five times the rows and sorting it move indices, not strings.
    They are written as they are (parquet has no dictionary type, only the encoding; the
    statistics of a dictionary column cover the values its rows use, so a row group of one
    metric still says so) and the output's stored Arrow schema is `schema`, so readers see the
    sources' plain strings."""
    fields = [
        field.with_type(pa.dictionary(pa.int32(), pa.utf8())) if field.type == pa.utf8() else field
        for field in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)


def _source_batches(
    source: WriteSource,
    read: Callable[[pq.ParquetFile], Iterator[pa.RecordBatch]],
    as_dictionary: Collection[str] = (),
) -> Iterator[pa.RecordBatch]:
    """Batches `read` takes from one source; any failure names the source. Only reading is
    guarded: what the caller does with a batch (writing, say) raises as itself."""
    try:
        parquet = _open_source(source, as_dictionary)
    except UNREADABLE as exc:
        raise SourceReadError(f"cannot open: {exc}", source.path) from exc
    with parquet:
        rows = 0
        try:
            for batch in read(parquet):
                rows += batch.num_rows
                yield batch
        except SchemaConflictError as exc:
            raise SourceReadError(exc.reason, source.path) from exc
        except UNREADABLE as exc:
            raise SourceReadError(f"read failed after {rows} rows: {exc}", source.path) from exc


def iter_source(source: WriteSource, target: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Every row of one source, in file order, laid out as `target`."""

    encoded = reading.dictionary_types(target)

    def read(parquet: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
        for batch in reading.batches(parquet, READ_BATCH_ROWS, use_threads=False):
            yield _text_checked(conform(reading.encoded_as(batch, encoded), target))

    rows = 0
    flat = [name for name, kind in encoded.items() if pa.types.is_dictionary(kind)]
    for batch in _source_batches(source, read, flat):
        rows += batch.num_rows
        yield batch
    if rows != source.rows:
        raise SourceReadError(f"footer promised {source.rows} rows, read {rows}", source.path)


def _text_checked(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch`, once its dictionary columns are proven whole: the text UTF-8, every index
    inside its dictionary (ArrowInvalid if not).

    pyarrow does not check the text of a parquet page it reads, and the sort turns metric
    names and label sets into Python strings: a byte that is not UTF-8 raised there, long
    after the source was read, as an unexpected error that named no file, so the file was
    never reported and its partition never merged. Nor are the indices checked: a dictionary
    page that lists a value twice (legal parquet, which every reader reads right) is read
    dictionary-encoded with the repeat dropped and the page's indices kept, so the page's
    last value points past the end. In the metric name that failed every merge the same way;
    in a label it carried into the row's label set and merged other values. Here either is
    the source's read error. The dictionaries are a few values per batch; the bounds are
    2.5% of a merge's CPU (0.21 s of a flat partition). A dictionary inside another type (the
    map era's `labels` as a map of dictionaries) is read the same way, and merged other
    values the same way, so such a column is checked whole."""
    for column in batch.columns:
        if holds_dictionary(column.type):
            column.validate(full=True)
    return batch


def write_merged(
    sources: Sequence[WriteSource],
    target: Path,
    schema: pa.Schema,
    options: WriteOptions,
    *,
    metadata: Mapping[bytes, bytes],
    should_abort: Callable[[], bool] = lambda: False,
) -> WriteResult:
    """Create `target` (must not exist), fill it from `sources` in order, sync it, check it.
    `metadata` (our lineage) goes into the footer beside the sources' own."""
    handle = durable.create_exclusive(target)
    try:
        with handle:
            digest = hashlib.sha256()
            sink = durable.Sink(handle, digest)
            row_groups = _stream(sources, sink, schema, metadata, options, should_abort, target)
            durable.fsync_file(handle, target)
            identity = FileIdentity.of(os.fstat(handle.fileno()))
        expected = sum(s.rows for s in sources)
        _check_output(target, schema, expected, sink.size)
    except BaseException:
        durable.remove(target)
        raise
    return WriteResult(expected, sink.size, digest.hexdigest(), row_groups, identity)


def _stream(
    sources: Sequence[WriteSource],
    sink: durable.Sink,
    schema: pa.Schema,
    ours: Mapping[bytes, bytes],
    options: WriteOptions,
    should_abort: Callable[[], bool],
    target: Path,
) -> int:
    buffered = buffer_schema(schema)
    # The parquet writer writes every page header and page on its own: about 2,300 writes,
    # each a Python call and a system call, per output of 40 sources. Gathered here; the
    # writer does not close it, and its last bytes (and any error writing them) come out only
    # when it is closed below.
    stream = pa.BufferedOutputStream(pa.PythonFile(sink, mode="w"), OUTPUT_BUFFER)
    writer = _parquet_writer(stream, buffered, schema, options)
    row_groups = 0

    def write_row_group(table: pa.Table) -> None:
        nonlocal row_groups
        if should_abort():
            raise MergeAborted("stopped on request while writing", target)
        writer.write_table(table, row_group_size=max(table.num_rows, 1))
        row_groups += 1
        crashpoints.reach("writer:row-group")

    try:
        first = FirstRows()
        rows = MetricSorter(
            write_row_group,
            labels=label_sets.for_schema(buffered),
            row_group_bytes=options.row_group_bytes,
            shared_row_group_bytes=options.shared_row_group_bytes,
            buffer_bytes=options.buffer_bytes,
            spill_folder=target.parent,
        )
        try:
            for source in sources:
                for batch in iter_source(source, buffered):
                    if should_abort():
                        raise MergeAborted("stopped on request while writing", target)
                    for piece in first.take_from(batch):
                        rows.add(piece)
            head = first.table(buffered)  # row group 0; the sorter has written nothing yet
            if head.num_rows:
                write_row_group(head)
            rows.finish()
        finally:
            rows.close()
        writer.add_key_value_metadata(
            {**(schema.metadata or {}), **ours, ARROW_SCHEMA: _stored(schema)}
        )
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(Exception):
            stream.close()
        raise
    writer.close()
    stream.close()
    return row_groups


def _parquet_writer(
    stream: pa.NativeFile, buffered: pa.Schema, schema: pa.Schema, options: WriteOptions
) -> pq.ParquetWriter:
    """The output's encoding, one choice per kind of column (each helper below says why).
    Rows arrive as `buffered`; readers see `schema`, stored by `_stream` once every row group
    is written."""
    return pq.ParquetWriter(
        stream,
        buffered.remove_metadata(),
        version="2.6",
        data_page_version="2.0",
        compression="zstd",
        compression_level=options.compression_level,
        use_dictionary=_dictionary_columns(schema),
        column_encoding=_delta_columns(schema) or None,
        write_statistics=_statistics_columns(schema),
        write_page_index=True,
        store_schema=False,  # the stored schema is the output's, added by `_stream`
        bloom_filter_options=_bloom_filters(schema),
    )


def _stored(schema: pa.Schema) -> bytes:
    """The Arrow schema as pyarrow stores it (base64 of its IPC form). Readers take every
    type from it, so text written from dictionary buffers reads back as the plain strings
    the sources had: parquet itself has no dictionary type, only the encoding. pyarrow also
    takes the schema's key-value metadata from it, so the sources' is kept there too."""
    stored = schema if schema.metadata else schema.remove_metadata()  # none, not an empty map
    return base64.b64encode(stored.serialize().to_pybytes())


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Dictionary-encode the text columns (names, kinds, run ids, labels), as the monitor
    does; numbers and sketches are nearly all distinct, so a dictionary only costs time."""
    columns: list[str] = []
    for field in schema:
        if pa.types.is_map(field.type):
            columns += [f"{field.name}.key_value.key", f"{field.name}.key_value.value"]
        elif pa.types.is_string(field.type) or pa.types.is_dictionary(field.type):
            columns.append(field.name)
    return columns


def _delta_columns(schema: pa.Schema) -> dict[str, str]:
    """Delta-encode the columns that grow steadily. Within a row group of one metric, `time`
    and `fetch_index` step by small, near-constant amounts from row to row, so their deltas
    pack into a few bits where plain encoding handed ZSTD 8 bytes a row. Outputs are 7-9%
    smaller at the same CPU, and readers decode them as fast. Values and types are unchanged;
    arrow-rs (the viewer's reader), pyarrow, DuckDB and polars all read the encoding."""
    return {
        field.name: "DELTA_BINARY_PACKED"
        for field in schema
        if field.name in STEADY_COLUMNS
        and (pa.types.is_integer(field.type) or pa.types.is_timestamp(field.type))
    }


def _statistics_columns(schema: pa.Schema) -> list[str]:
    """Min/max statistics where a reader can prune by them: numbers and times, the metric name
    (how the viewer finds a metric's row groups) and the container id. Not on the other text
    (labels, kinds, run ids, sketches): a row group holds one metric of every container, so
    their range spans nearly every value, and computing it cost a fifth of writing a row group.
    """
    return [
        field.name
        for field in schema
        if field.name in (METRIC_NAME, CONTAINER_ID) or not _is_text_or_nested(field.type)
    ]


def _is_text_or_nested(kind: pa.DataType) -> bool:
    return is_text_or_bytes(kind) or pa.types.is_dictionary(kind) or pa.types.is_nested(kind)


def _bloom_filters(schema: pa.Schema) -> dict[str, dict[str, float]] | None:
    """A bloom filter on the container id lets the viewer skip a row group for a container
    that never ran in it. Few distinct ids per row group, so a small filter is exact enough."""
    if CONTAINER_ID not in schema.names:
        return None
    return {CONTAINER_ID: {"ndv": 1024, "fpp": 0.01}}


def _check_output(path: Path, schema: pa.Schema, rows: int, size: int) -> None:
    """Read the footer back: the file on disk must be what we meant to write."""
    try:
        metadata = pq.read_metadata(path)
        written = metadata.schema.to_arrow_schema()
    except UNREADABLE as exc:
        raise OutputCheckError(f"output footer does not read back: {exc}", path) from exc
    if metadata.num_rows != rows:
        raise OutputCheckError(f"output has {metadata.num_rows} rows, expected {rows}", path)
    if not written.equals(schema, check_metadata=False):
        raise OutputCheckError(f"output schema {written} differs from {schema}", path)
    if os.stat(path).st_size != size:
        raise OutputCheckError(f"output is {os.stat(path).st_size} bytes, wrote {size}", path)
