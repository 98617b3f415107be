"""Copy the rows of many parquet sources into one new file, one bounded buffer at a time.

The writer knows nothing of the journal or of final names: it creates the file it is given
exclusively, streams every source batch by batch (never a whole file), cuts an output row group
each time the buffer reaches `row_group_bytes`, syncs, and proves the result by reading its
footer back. Whatever reading a source throws becomes a SourceReadError naming that source, so
the caller can tell a bad input from a bad disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from . import crashpoints, durable
from .durable import FileIdentity
from .errors import (
    MergeAborted,
    OutputCheckError,
    SchemaConflictError,
    SourceChangedError,
    SourceReadError,
)
from .schemas import conform

READ_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class WriteSource:
    path: Path
    identity: FileIdentity
    rows: int


@dataclass(frozen=True)
class WriteOptions:
    compression_level: int = 3
    row_group_bytes: int = 64_000_000


@dataclass(frozen=True)
class WriteResult:
    rows: int
    size: int
    checksum: str
    row_groups: int


class _HashingSink:
    """The file object pyarrow writes into: hashes and counts every byte on its way to disk."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        durable.write_all(self.handle, view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self.handle.flush()

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True  # the handle is synced and closed by write_merged


def _open_source(source: WriteSource) -> pq.ParquetFile:
    """Open a source and prove it is the very file that was planned."""
    handle = open(source.path, "rb")  # noqa: SIM115 - owned by the returned ParquetFile
    st = os.fstat(handle.fileno())
    now = FileIdentity(st.st_ino, st.st_size, st.st_mtime_ns)
    if now != source.identity:
        handle.close()
        raise SourceChangedError(
            f"changed since it was planned ({source.identity} -> {now})", source.path
        )
    return pq.ParquetFile(handle)


def iter_source(source: WriteSource, target: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Batches of one source laid out as `target`; any read failure names the source."""
    try:
        parquet = _open_source(source)
    except (OSError, pa.ArrowException) as exc:
        raise SourceReadError(f"cannot open: {exc}", source.path) from exc
    with parquet:
        rows = 0
        try:
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
                rows += batch.num_rows
                yield conform(batch, target)
        except SchemaConflictError as exc:
            raise SourceReadError(exc.reason, source.path) from exc
        except (OSError, pa.ArrowException) as exc:
            raise SourceReadError(f"read failed after {rows} rows: {exc}", source.path) from exc
        if rows != source.rows:
            raise SourceReadError(f"footer promised {source.rows} rows, read {rows}", source.path)


def write_merged(
    sources: Sequence[WriteSource],
    target: Path,
    schema: pa.Schema,
    options: WriteOptions,
    *,
    metadata: Mapping[bytes, bytes],
    should_abort: Callable[[], bool] = lambda: False,
) -> WriteResult:
    """Create `target` (must not exist), fill it from `sources` in order, sync it, check it."""
    schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    handle = durable.create_exclusive(target)
    try:
        with handle:
            sink = _HashingSink(handle)
            row_groups = _stream(sources, sink, schema, options, should_abort, target)
            durable.fsync_file(handle)
        expected = sum(s.rows for s in sources)
        _check_output(target, schema, expected, sink.size)
    except BaseException:
        durable.remove(target)
        raise
    return WriteResult(expected, sink.size, sink.digest.hexdigest(), row_groups)


def _stream(
    sources: Sequence[WriteSource],
    sink: _HashingSink,
    schema: pa.Schema,
    options: WriteOptions,
    should_abort: Callable[[], bool],
    target: Path,
) -> int:
    writer = pq.ParquetWriter(
        sink,
        schema,
        version="2.6",
        data_page_version="2.0",
        compression="zstd",
        compression_level=options.compression_level,
        use_dictionary=True,
        write_statistics=True,
        write_page_index=True,
        store_schema=True,
    )
    buffer: list[pa.RecordBatch] = []
    buffered = 0
    row_groups = 0

    def flush() -> None:
        nonlocal buffer, buffered, row_groups
        if not buffer:
            return
        table = pa.Table.from_batches(buffer, schema=schema)
        writer.write_table(table, row_group_size=max(table.num_rows, 1))
        buffer, buffered = [], 0
        row_groups += 1
        crashpoints.reach("writer:row-group")

    try:
        for source in sources:
            for batch in iter_source(source, schema):
                if should_abort():
                    raise MergeAborted("stopped on request while writing", target)
                buffer.append(batch)
                buffered += batch.nbytes
                if buffered >= options.row_group_bytes:
                    flush()
        flush()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        raise
    writer.close()
    return row_groups


def _check_output(path: Path, schema: pa.Schema, rows: int, size: int) -> None:
    """Read the footer back: the file on disk must be what we meant to write."""
    try:
        metadata = pq.read_metadata(path)
        written = metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise OutputCheckError(f"output footer does not read back: {exc}", path) from exc
    if metadata.num_rows != rows:
        raise OutputCheckError(f"output has {metadata.num_rows} rows, expected {rows}", path)
    if not written.equals(schema, check_metadata=False):
        raise OutputCheckError(f"output schema {written} differs from {schema}", path)
    if os.stat(path).st_size != size:
        raise OutputCheckError(f"output is {os.stat(path).st_size} bytes, wrote {size}", path)
