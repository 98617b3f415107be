"""Read a parquet file's rows in batches, one row group at a time.

pyarrow cannot hand back a batch of a nested column with dictionary-encoded children (the map
era's `labels`) that spans two row groups: each row group has its own dictionaries, and it
fails with "Nested data conversions not implemented for chunked array outputs". Our own
outputs hold a row group per metric, and the monitor cuts one at about a million rows, so
every reader of rows goes through here, where no batch crosses a row group.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# What opening or reading a parquet file raises when the file is at fault, not the program:
# the system's errors, pyarrow's, and UnicodeDecodeError for a name in the footer that is not
# UTF-8 (one flipped byte in a column's name), which pyarrow raises as it opens the file.
UNREADABLE = (OSError, pa.ArrowException, UnicodeDecodeError)

DEFAULT_BATCH_ROWS = 65_536  # pyarrow's own default
# Rows a batch may hold are fewer where rows are wide: 8,192 rows of 4 KB labels were 32 MB.
BATCH_BYTES = 1024 * 1024


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
