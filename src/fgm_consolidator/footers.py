"""Parquet footers, read once per version of a file.

A sidecar looks at the same outputs on every pass (to plan, and for their lineage); a day that
is over holds only outputs, and months of them stay on disk. Remembering each footer by the
file's identity (inode, size, mtime) makes a pass cost a `stat` per file it has seen before,
so its work follows the new files, not the history. A file rewritten in place gets a new
identity and is read again.

Bounded, and never thrashed: an entry no pass has looked at since the one before (a file
merged away, a folder removed) is forgotten when the next pass starts (`next_pass`), and a
full memory takes no new entry. It once dropped its oldest entry for each new one, and a pass
walks the files in the same order every time: past its capacity, each pass forgot exactly
the footers the next needed first and read every footer again (4,500 files: 4.4 s a pass
instead of 0.5). Now the files beyond it are read each pass, and only those. A lineage is
kept compressed, a tenth of its size (2.3 KB for 40 sources), so 8,192 entries of hourly
outputs take about 6 MB; an output of a day-long window (`--max-span 86400`), merged again
as the day fills, lists a thousand ancestors in about 16 KB.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from . import durable
from .durable import FileIdentity
from .schemas import ARROW_SCHEMA, LINEAGE_KEY, METRIC_NAME

CAPACITY = 8192  # about a month of hourly outputs for ten identifiers
# Enough to tell apart the files one name stood for; nobody forges them for us.
DIGEST_BYTES = 8


@dataclass(frozen=True)
class Footer:
    identity: FileIdentity
    rows: int
    schema: pa.Schema  # without our lineage, and one object for every file that shares it
    packed_lineage: bytes | None  # the lineage of an output of ours, compressed
    digest: str  # of the file's size and footer bytes: which file a name stood for
    int96: tuple[str, ...] = ()  # columns stored as legacy INT96 timestamps
    retyped: tuple[str, ...] = ()  # columns pyarrow reads as another type than the file stores
    plain_text: frozenset[str] = frozenset()  # text columns stored mostly plain (`_mostly_plain`)

    @property
    def lineage(self) -> bytes | None:
        """The raw lineage of an output of ours."""
        return unpack(self.packed_lineage)


def unpack(packed_lineage: bytes | None) -> bytes | None:
    """A lineage as `read` keeps it (compressed: a busy window's runs to kilobytes) made raw."""
    return None if packed_lineage is None else zlib.decompress(packed_lineage)


_seen: dict[Path, tuple[int, Footer]] = {}  # path -> (the pass that last looked, its footer)
_pass = 0
_schemas: dict[bytes, pa.Schema] = {}


def _shared(schema: pa.Schema) -> pa.Schema:
    """Files of one era and label set share one schema object, so remembering thousands of
    footers costs little more than remembering their names."""
    if len(_schemas) > CAPACITY:
        _schemas.clear()
    # Schema equality ignores field metadata, so files of one partition were handed another
    # partition's field metadata, and their output wrote it: the serialized schema holds all.
    key = schema.serialize().to_pybytes()
    return _schemas.setdefault(key, schema)


def next_pass() -> None:
    """Forget what no pass has looked at since the one before (see the module's docstring)."""
    global _pass
    for path in [path for path, (looked, _footer) in _seen.items() if looked < _pass]:
        del _seen[path]
    _pass += 1


def footer_digest(handle: BinaryIO, size: int) -> str:
    """Tells two files under one name apart, and a copy of a file from another: the footer
    holds every column chunk's offsets and statistics. Read after pyarrow has checked it."""
    raw = _raw_footer(handle, size)
    if raw is None:  # it did a moment ago: the file changed since
        raise pa.ArrowInvalid(f"the footer of a {size}-byte file no longer reads")
    return _digest_of(size, raw)


def _digest_of(size: int, raw: bytes) -> str:
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=DIGEST_BYTES)
    digest.update(raw)
    return digest.hexdigest()


def _raw_footer(handle: BinaryIO, size: int) -> bytes | None:
    """The footer's bytes (Thrift, between the data and its length), or None where the file
    of `size` bytes does not end as a parquet file does."""
    if size < 12:  # "PAR1", a footer length and "PAR1"
        return None
    handle.seek(-8, os.SEEK_END)
    tail = handle.read(8)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or not 0 < length <= size - 12:
        return None
    handle.seek(-(8 + length), os.SEEK_END)
    raw = handle.read(length)
    return raw if len(raw) == length else None


def digest_now(path: Path) -> str | None:
    """The footer digest of the bytes under `path` now, past the cache (which knows a file by
    its identity, and a new file can take an old one's: inode reused, same size, an mtime
    equal at a coarse clock's granularity). None without a complete footer; an OSError when
    the file does not read, which says nothing of what it holds (EIO, a link, gone since)."""
    with durable.open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        raw = _raw_footer(handle, size)
        return None if raw is None else _digest_of(size, raw)


def digest_matches(path: Path, footer: str | None) -> bool | None:
    """Whether `path` has the footer digest `footer` (an output's lineage records one per
    source); None when that is unknown: none recorded (outputs older than digests), or a
    footer that does not read (EIO), which says nothing of what the file holds."""
    if footer is None:
        return None
    try:
        return digest_now(path) == footer
    except OSError:
        return None


def read(path: Path) -> Footer:
    """The footer of `path`; raises OSError or pyarrow's error when it does not read."""
    st = os.lstat(path)
    entry = _seen.get(path)
    if entry is not None and entry[1].identity == FileIdentity.of(st):
        _seen[path] = (_pass, entry[1])
        return entry[1]
    with durable.open_regular(path) as handle:  # identity and footer from one open file
        st = os.fstat(handle.fileno())
        metadata = pq.ParquetFile(handle).metadata
        schema = metadata.schema.to_arrow_schema()
        columns = (metadata.schema.column(i) for i in range(len(metadata.schema)))
        int96 = tuple(column.path for column in columns if column.physical_type == "INT96")
        kept = {k: v for k, v in (schema.metadata or {}).items() if k != LINEAGE_KEY}
        lineage = (metadata.metadata or {}).get(LINEAGE_KEY)
        stored = stored_schema((metadata.metadata or {}).get(ARROW_SCHEMA))
        footer = Footer(
            FileIdentity.of(st),
            metadata.num_rows,
            _shared(schema.with_metadata(kept)),
            None if lineage is None else zlib.compress(lineage, 1),
            footer_digest(handle, st.st_size),
            int96,
            _retyped(stored, schema),
            _mostly_plain(metadata),
        )
    if entry is not None or len(_seen) < CAPACITY:
        _seen[path] = (_pass, footer)
    return footer


# Stored bytes per value above which a text column is taken for one stored plain: indices of
# a dictionary-encoded column take a byte or two per value, and its dictionary page adds a
# few more over a row group of the monitor's. A column taken for plain when it is not is read
# right all the same, only encoded by us, batch by batch, which costs CPU. At 64, distinct
# labels of 33-64 bytes were read dictionary-encoded: 56-byte ones in three 200,000-row
# sources took 162 MiB (106 MiB at 32).
PLAIN_BYTES_PER_VALUE = 32
# `metric_name` has a line of its own: the monitor stores it plain (FORMATS.md), 20-40 bytes a
# value, and read plain the merge's hot path would encode it batch by batch; past this, long
# distinct names read as a dictionary took 158 MiB (5,000 names of 1 KB).
METRIC_NAME_PLAIN_BYTES_PER_VALUE = 64
# Row groups of fewer values say nothing: a dictionary page alone can pass the line there
# (row group 0 of an output of ours holds one row per metric, with 64-character container
# ids), and their rows are too few to cost memory either way.
PLAIN_MIN_VALUES = 1024
# A chunk's dictionary page stops at about this size in the monitor's writer (arrow-rs), in
# pyarrow's and in parquet-mr's: past it, the rest of the chunk is stored plain. Its indices
# and levels take a few bytes a value at most, so a chunk with a dictionary page that stores
# more than this and `INDEX_BYTES_PER_VALUE` a value holds values stored plain, however short
# the others are. An average per value missed them in a map's leaf: 7 short repeated labels
# and one of 120 bytes distinct in every row stored 24 bytes a value, and two sources of
# 100,000 such rows took 343 MiB to merge.
DICTIONARY_PAGE_BYTES = 1024 * 1024
INDEX_BYTES_PER_VALUE = 4
# Row groups looked at: a monitor's file has one or a few; an output of ours, one per metric,
# is a source only in rare merges, and reading every row group's metadata of each output
# footer read would cost a pass with nothing to do seconds.
PLAIN_ROW_GROUPS = 8


def _mostly_plain(metadata: pq.FileMetaData) -> frozenset[str]:
    """Text columns that the writer stored mostly as plain values in one of the first row
    groups: text that differs in (nearly) every row, once its dictionary page was full. Read
    dictionary-encoded, pyarrow grows one dictionary over the whole row group for them: a
    label of 1 KB distinct in each of 200,000 rows took 700 MiB. Nested leaves are named by
    their path (`labels.key_value.value`): each batch of the map era's labels came with the
    dictionary of the whole row group (see `reading.read_plain`)."""
    found = set()
    for index in range(min(metadata.num_row_groups, PLAIN_ROW_GROUPS)):
        group = metadata.row_group(index)
        for i in range(group.num_columns):
            chunk = group.column(i)
            if _stored_plain(chunk):
                found.add(chunk.path_in_schema)
    return frozenset(found)


# Encodings pyarrow cannot decode into a dictionary ("Not yet implemented: DecodeArrow of
# DictAccumulator"): arrow-rs, the monitor's writer, falls back to DELTA_BYTE_ARRAY for text
# under PARQUET_2_0 once a dictionary page is full, or for a column without a dictionary.
DELTA_TEXT = frozenset({"DELTA_BYTE_ARRAY", "DELTA_LENGTH_BYTE_ARRAY"})


def _stored_plain(chunk: pq.ColumnChunkMetaData) -> bool:
    if chunk.physical_type != "BYTE_ARRAY":
        return False
    if not DELTA_TEXT.isdisjoint(chunk.encodings):
        return True  # read dictionary-encoded, the file would be taken for unreadable
    if chunk.num_values < PLAIN_MIN_VALUES:
        return False
    stored, values = chunk.total_uncompressed_size, chunk.num_values
    if chunk.path_in_schema == METRIC_NAME:
        return bool(stored > METRIC_NAME_PLAIN_BYTES_PER_VALUE * values)
    if (
        chunk.has_dictionary_page
        and stored > DICTIONARY_PAGE_BYTES + INDEX_BYTES_PER_VALUE * values
    ):
        return True  # the dictionary page filled, and the writer stored the rest plain
    return bool(stored > PLAIN_BYTES_PER_VALUE * values)


def stored_schema(raw: bytes | None) -> pa.Schema | None:
    """The Arrow schema a writer stored in the footer, or None without a readable one (pyarrow
    then goes by the parquet types alone)."""
    if raw is None:
        return None
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(raw)))
    except (binascii.Error, ValueError, pa.ArrowException):
        return None


def _retyped(stored: pa.Schema | None, read: pa.Schema) -> tuple[str, ...]:
    """Columns whose stored Arrow type pyarrow does not give back: `date64` comes back as
    `date32`, `timestamp[s]` as `timestamp[ms]`, a dictionary of `large_string` as one of
    `string`. A merge writes what pyarrow read and stores that as the output's type, so
    readers that take types from the stored schema (polars) would see another type than in
    the source. A stored schema that names other columns is one pyarrow ignores too."""
    if stored is None or stored.names != read.names:
        return ()
    return tuple(
        f"{field.name} (stored as {field.type}, read as {read.field(i).type})"
        for i, field in enumerate(stored)
        if field.type != read.field(i).type
    )


def with_stored_schema(
    handle: BinaryIO, change: Callable[[pa.Schema], pa.Schema]
) -> pq.FileMetaData | None:
    """The footer of the open parquet file `handle` with its stored Arrow schema, which
    pyarrow reads a column's Arrow type from, changed by `change`; None where that changes
    nothing or cannot be done (no stored schema, or not where it is looked for).

    Only the schema's bytes are replaced: in Thrift's compact protocol a string is its length
    and its bytes, and nothing around it counts them, so every row group's offsets still
    point into the file as they did. The old schema must occur once, after its length."""
    raw = _raw_footer(handle, os.fstat(handle.fileno()).st_size)
    handle.seek(0)
    if raw is None:
        return None
    old = (_metadata_of(raw).metadata or {}).get(ARROW_SCHEMA)
    stored = stored_schema(old)
    if old is None or stored is None or (changed := change(stored)).equals(stored):
        return None
    new = base64.b64encode(changed.serialize().to_pybytes())
    at = raw.find(old)
    before = _varint(len(old))
    if at < len(before) or raw.count(old) != 1 or raw[at - len(before) : at] != before:
        return None
    raw = raw[: at - len(before)] + _varint(len(new)) + new + raw[at + len(old) :]
    try:
        return _metadata_of(raw)
    except pa.ArrowException:  # the file is read as it says, rather than taken for unreadable
        return None


def _metadata_of(raw: bytes) -> pq.FileMetaData:
    """A footer's bytes parsed, as pyarrow parses a file's."""
    return pq.read_metadata(io.BytesIO(b"PAR1" + raw + len(raw).to_bytes(4, "little") + b"PAR1"))


def _varint(number: int) -> bytes:
    """`number` as Thrift's compact protocol writes a length: 7 bits a byte, low first."""
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)
