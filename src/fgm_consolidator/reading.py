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

DEFAULT_BATCH_ROWS = 65_536  # pyarrow's own default


def batches(
    parquet: pq.ParquetFile, batch_size: int = DEFAULT_BATCH_ROWS, *, use_threads: bool = True
) -> Iterator[pa.RecordBatch]:
    """Every row of `parquet`, in file order."""
    for row_group in range(parquet.num_row_groups):
        yield from parquet.iter_batches(
            batch_size=batch_size, row_groups=[row_group], use_threads=use_threads
        )
