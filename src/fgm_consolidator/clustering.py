"""Lay an output out by metric, so a reader looking for one metric skips the others' row groups.

The viewer prunes row groups by `metric_name` min/max statistics. A plain merge keeps the
monitor's mixed row groups, whose statistics span every metric, so nothing is pruned and every
byte is decoded again. Here rows are routed into one bucket per metric as they stream past and
each bucket leaves as its own row group: when it reaches `row_group_bytes`, when all buckets
together pass `buffer_bytes` (the largest leaves first), and at the end in metric order. Memory
is bounded by the buffer, never by the size of the output.

Row group 0 is different: it holds the first row of every metric, because the viewer builds its
metric list from the first row group of the newest file, and that file may be ours. Taking the
*first* row of each metric keeps time order within every metric and container: the head row
precedes the rest of its metric in the file, and buckets keep arrival order (the sort that
splits a batch is stable, and sources arrive in time order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

METRIC = "metric_name"

# Where the first row of a metric lies: (index of the source, row number within it).
Position = tuple[int, int]


class FirstRows:
    """Where each metric first appears, learned from the `metric_name` column alone."""

    def __init__(self) -> None:
        self.positions: dict[str, Position] = {}

    def observe(self, source_index: int, offset: int, names: pa.Array) -> None:
        """`names` are the metric names of rows `offset`... of source `source_index`, in order."""
        for name in pc.unique(names).to_pylist():
            if name not in self.positions:
                self.positions[name] = (source_index, offset + pc.index(names, name).as_py())

    def rows_of(self, source_index: int) -> list[int]:
        return sorted(row for index, row in self.positions.values() if index == source_index)


def without_rows(batch: pa.RecordBatch, offset: int, rows: list[int]) -> list[pa.RecordBatch]:
    """`batch` (whose first row is row `offset` of its source) minus the given source rows."""
    pieces: list[pa.RecordBatch] = []
    start = 0
    for row in sorted(r - offset for r in rows if offset <= r < offset + batch.num_rows):
        pieces.append(batch.slice(start, row - start))
        start = row + 1
    pieces.append(batch.slice(start))
    return [piece for piece in pieces if piece.num_rows]


def split_by_metric(batch: pa.RecordBatch) -> list[tuple[str, pa.RecordBatch]]:
    """One copy of `batch` per metric, each in arrival order (the sort is stable)."""
    names = batch.column(METRIC)
    order = pc.sort_indices(names)
    runs = pc.run_end_encode(names.take(order))
    pieces: list[tuple[str, pa.RecordBatch]] = []
    start = 0
    for name, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        pieces.append((name, batch.take(order.slice(start, end - start))))
        start = end
    return pieces


@dataclass
class _Bucket:
    batches: list[pa.RecordBatch] = field(default_factory=list)
    nbytes: int = 0


class MetricBuckets:
    """Rows waiting for their metric's row group, within a fixed memory budget."""

    def __init__(
        self,
        schema: pa.Schema,
        write_row_group: Callable[[pa.Table], None],
        *,
        row_group_bytes: int,
        buffer_bytes: int,
    ) -> None:
        self._schema = schema
        self._write = write_row_group
        self._row_group_bytes = row_group_bytes
        self._buffer_bytes = buffer_bytes
        self._buckets: dict[str, _Bucket] = {}
        self._buffered = 0

    def add(self, batch: pa.RecordBatch) -> None:
        for name, piece in split_by_metric(batch):
            bucket = self._buckets.setdefault(name, _Bucket())
            bucket.batches.append(piece)
            bucket.nbytes += piece.nbytes
            self._buffered += piece.nbytes
            if bucket.nbytes >= self._row_group_bytes:
                self._flush(name)
        while self._buffered > self._buffer_bytes:
            self._flush(max(self._buckets, key=lambda n: self._buckets[n].nbytes))

    def finish(self) -> None:
        for name in sorted(self._buckets):
            self._flush(name)

    def _flush(self, name: str) -> None:
        bucket = self._buckets.pop(name)
        self._buffered -= bucket.nbytes
        self._write(pa.Table.from_batches(bucket.batches, schema=self._schema))
