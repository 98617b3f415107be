"""Parquet footers, read once per version of a file.

A sidecar looks at the same outputs on every pass (to plan, and for their lineage); a day that
is over holds only outputs, and months of them stay on disk. Remembering each footer by the
file's identity (inode, size, mtime) makes a pass cost a `stat` per file it has seen before,
so its work follows the new files, not the history. A file rewritten in place gets a new
identity and is read again. Bounded: the oldest entries are forgotten first.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import durable
from .durable import FileIdentity
from .schemas import LINEAGE_KEY

CAPACITY = 4096  # about a month of hourly outputs for five identifiers


@dataclass(frozen=True)
class Footer:
    identity: FileIdentity
    rows: int
    schema: pa.Schema  # without our lineage, and one object for every file that shares it
    lineage: bytes | None  # the raw lineage of an output of ours
    int96: tuple[str, ...] = ()  # columns stored as legacy INT96 timestamps


_seen: OrderedDict[Path, Footer] = OrderedDict()
_schemas: dict[tuple[pa.Schema, tuple[tuple[bytes, bytes], ...]], pa.Schema] = {}


def _shared(schema: pa.Schema) -> pa.Schema:
    """Files of one era and label set share one schema object, so remembering thousands of
    footers costs little more than remembering their names."""
    if len(_schemas) > CAPACITY:
        _schemas.clear()
    # Schema equality ignores key-value metadata; the key does not.
    key = (schema, tuple(sorted((schema.metadata or {}).items())))
    return _schemas.setdefault(key, schema)


def read(path: Path) -> Footer:
    """The footer of `path`; raises OSError or pyarrow's error when it does not read."""
    st = os.lstat(path)
    known = _seen.get(path)
    if known is not None and known.identity == FileIdentity.of(st):
        _seen.move_to_end(path)
        return known
    with durable.open_regular(path) as handle:  # identity and footer from one open file
        st = os.fstat(handle.fileno())
        metadata = pq.ParquetFile(handle).metadata
        schema = metadata.schema.to_arrow_schema()
        columns = (metadata.schema.column(i) for i in range(len(metadata.schema)))
        int96 = tuple(column.path for column in columns if column.physical_type == "INT96")
        kept = {k: v for k, v in (schema.metadata or {}).items() if k != LINEAGE_KEY}
        footer = Footer(
            FileIdentity.of(st),
            metadata.num_rows,
            _shared(schema.with_metadata(kept)),
            (metadata.metadata or {}).get(LINEAGE_KEY),
            int96,
        )
    _seen[path] = footer
    _seen.move_to_end(path)
    while len(_seen) > CAPACITY:
        _seen.popitem(last=False)
    return footer
