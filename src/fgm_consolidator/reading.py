"""Read a parquet file's rows in batches, one row group at a time, in bounded memory.

Every reader of rows opens files here: the merge its sources, recovery's proof an output and
the files beside it. A proof reads as many rows as the merge that wrote the output, inside the
same memory, so it must read them the same way.

pyarrow cannot hand back a batch of a nested column with dictionary-encoded children (the map
era's `labels`) that spans two row groups: each row group has its own dictionaries, and it
fails with "Nested data conversions not implemented for chunked array outputs". Our own
outputs hold a row group per metric, and the monitor cuts one at about a million rows, so
every reader of rows goes through here, where no batch crosses a row group.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import durable, footers
from .durable import FileIdentity
from .errors import SourceChangedError
from .schemas import holds_dictionary

# What opening or reading a parquet file raises when the file is at fault, not the program:
# the system's errors, pyarrow's, and UnicodeDecodeError for a name in the footer that is not
# UTF-8 (one flipped byte in a column's name), which pyarrow raises as it opens the file.
UNREADABLE = (OSError, pa.ArrowException, UnicodeDecodeError)

DEFAULT_BATCH_ROWS = 65_536  # pyarrow's own default
# Rows a batch may hold are fewer where rows are wide: 8,192 rows of 4 KB labels were 32 MB.
BATCH_BYTES = 1024 * 1024
# Files are read through a stream of this size, page by page, not a row group's column chunks
# fetched whole first (pyarrow's `pre_buffer`): a chunk of long values that do not compress,
# 118 MB in a 200,000-row source, was held whole while its pages were decoded (228 -> 104 MiB
# reading such a source).
READ_BUFFER_BYTES = 1024 * 1024


def open_file(
    path: Path, as_dictionary: Collection[str] = (), *, planned: FileIdentity | None = None
) -> tuple[pq.ParquetFile, footers.Footer]:
    """`path` opened for its rows, and its footer; the columns named in `as_dictionary` are
    read dictionary-encoded, whatever the file says, and text stored mostly plain is read
    plain (`read_plain`). SourceChangedError when the file is not the one `planned`, or
    changed while it was opened."""
    handle = durable.open_regular(path)  # owned by the returned ParquetFile
    try:
        now = FileIdentity.of(os.fstat(handle.fileno()))
        if planned is not None and now != planned:
            raise SourceChangedError(f"changed since it was planned ({planned} -> {now})", path)
        # The column names, from the footer cache (a `stat` for a file planned this pass):
        # opening each file a second time to learn them cost a tenth of a merge's CPU.
        footer = footers.read(path)
        if footer.identity != now:
            raise SourceChangedError(
                f"changed while it was opened ({now} -> {footer.identity})", path
            )
        wanted = [
            name
            for name in footer.schema.names
            if name in as_dictionary and name not in footer.plain_text
        ]
        parquet = pq.ParquetFile(
            handle,
            metadata=read_plain(handle, footer),
            read_dictionary=wanted or None,
            pre_buffer=False,
            buffer_size=READ_BUFFER_BYTES,
        )
    except BaseException:
        handle.close()
        raise
    return parquet, footer


def batches(
    parquet: pq.ParquetFile, batch_size: int = DEFAULT_BATCH_ROWS, *, use_threads: bool = True
) -> Iterator[pa.RecordBatch]:
    """Every row of `parquet`, in file order, in batches of at most `batch_size` rows and,
    by the row group's size as stored uncompressed, about `BATCH_BYTES`."""
    metadata = parquet.metadata
    for row_group in range(parquet.num_row_groups):
        stored = metadata.row_group(row_group)
        rows = batch_size
        if stored.total_byte_size > BATCH_BYTES:
            rows = min(rows, max(1, BATCH_BYTES * stored.num_rows // stored.total_byte_size))
        yield from parquet.iter_batches(
            batch_size=rows, row_groups=[row_group], use_threads=use_threads
        )


def read_plain(handle: BinaryIO, footer: footers.Footer) -> pq.FileMetaData | None:
    """The footer of the open file `handle`, saying plain text where text stored mostly plain
    (`Footer.plain_text`) has a dictionary type in the stored Arrow schema; None where none
    has, or where the footer cannot be rewritten so (pyarrow then reads the file as it says).

    `read_dictionary` asks pyarrow for dictionaries but cannot ask it for plain text: it
    takes a dictionary type from the stored schema whatever we ask. Read so, a map value
    distinct in every row came in each batch with the dictionary of its whole row group:
    13,334 rows of a 1 KB label, 13.7 MB per batch of 950 rows, carried through the sort (a
    merge of 40,000 such rows took 654-889 MiB). Read plain, each batch is encoded by
    `encoded_as`, with the values its rows use."""
    if not footer.plain_text:
        return None
    # A map's leaves are `<column>.<entries>.<key or item>`; writers name the entries apart.
    nested = {tuple(path.split(".")) for path in footer.plain_text if path.count(".") == 2}

    def plain(field: pa.Field) -> pa.Field:
        kind = field.type
        if pa.types.is_map(kind):
            leaves = {leaf for column, _entries, leaf in nested if column == field.name}
            key, item = kind.key_field.name in leaves, kind.item_field.name in leaves
            return field.with_type(_read_plain(kind, key, item))
        return _plain_field(field, field.name in footer.plain_text)

    def read_as_stored(field: pa.Field) -> bool:
        # A type pyarrow reads as another (`Footer.retyped`: a dictionary of large_string comes
        # back as one of string) is left as it is: read plain, it would be neither.
        index = footer.schema.get_field_index(field.name)
        return index >= 0 and bool(footer.schema.field(index).type == field.type)

    def plain_text(stored: pa.Schema) -> pa.Schema:
        fields = [plain(field) if read_as_stored(field) else field for field in stored]
        return pa.schema(fields, metadata=stored.metadata)

    return footers.with_stored_schema(handle, plain_text)


def _read_plain(kind: pa.MapType, key: bool, item: bool) -> pa.DataType:
    """The map type `kind` with its key and/or item read as plain text."""
    fields = _plain_field(kind.key_field, key), _plain_field(kind.item_field, item)
    return pa.map_(*fields, kind.keys_sorted)


def _plain_field(field: pa.Field, wanted: bool) -> pa.Field:
    """`field` as plain text where it is dictionary-encoded text and that is `wanted`."""
    if wanted and pa.types.is_dictionary(field.type):
        return field.with_type(field.type.value_type)
    return field


def dictionary_types(target: pa.Schema) -> dict[str, pa.DataType]:
    """The columns of `target` that hold dictionaries, for `encoded_as`."""
    return {field.name: field.type for field in target if holds_dictionary(field.type)}


def encoded_as(batch: pa.RecordBatch, encoded: dict[str, pa.DataType]) -> pa.RecordBatch:
    """`batch` with the text columns read plain (`Footer.plain_text`) dictionary-encoded as
    `encoded` has them (`dictionary_types` of the merge's buffer, or of the file's own schema
    for a proof that compares types): one dictionary per batch, as large as the batch at
    most."""
    plain = {
        i: encoded[field.name]
        for i, field in enumerate(batch.schema)
        if field.name in encoded and field.type in _plain_types(encoded[field.name])
    }
    if not plain:  # the usual batch: every text column was read dictionary-encoded
        return batch
    columns = [
        _encoded_column(column, plain[i]) if i in plain else column
        for i, column in enumerate(batch.columns)
    ]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _encoded_column(column: pa.Array, kind: pa.DataType) -> pa.Array:
    if pa.types.is_map(kind):
        return column.cast(kind)  # each dictionary of the batch's own values
    return pc.dictionary_encode(column).cast(kind)


@functools.lru_cache(maxsize=64)
def _plain_types(kind: pa.DataType) -> list[pa.DataType]:
    """The types a column of `kind` is read as where its text is read plain (`read_plain`)."""
    if pa.types.is_dictionary(kind):
        return [kind.value_type]
    if pa.types.is_map(kind):
        shapes = [_read_plain(kind, True, False), _read_plain(kind, False, True)]
        return [t for t in [*shapes, _read_plain(kind, True, True)] if t != kind]
    return []
