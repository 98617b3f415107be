"""Lay an output out by metric, so a reader looking for one metric skips the others' row groups.

The viewer prunes row groups by `metric_name` min/max statistics. A plain merge keeps the
monitor's mixed row groups, whose statistics span every metric, so nothing is pruned and every
byte is decoded again. Here rows wait in arrival order until a buffer of `buffer_bytes` is
full, are then sorted by metric (a stable sort) and leave as row groups of one metric each. A
metric spans a few row groups of a large output, one or more per buffer, in time order. Memory
is bounded by the buffer plus one metric's copy, never by the size of the output.

Row group 0 is different: it holds the first row of every metric, because the viewer builds its
metric list from the first row group of the newest file, and that file may be ours. Taking the
*first* row of each metric keeps time order within every metric and container: the head row
precedes the rest of its metric in the file, and the sort is stable while sources arrive in
time order.
"""

from __future__ import annotations

from collections.abc import Callable

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


def metric_runs(names: pa.ChunkedArray) -> list[tuple[int, int]]:
    """(offset, length) of each metric's run in `names`, which is sorted."""
    runs: list[tuple[int, int]] = []
    start = 0
    for end in pc.run_end_encode(names.combine_chunks()).run_ends.to_pylist():
        runs.append((start, end - start))
        start = end
    return runs


class MetricSorter:
    """Buffered rows leave sorted by metric, as row groups of at most about `row_group_bytes`.

    One sort per buffer and one `take` per metric, so only one metric is ever copied at a
    time: splitting every batch per metric as it arrives costs five times the CPU (a `take`
    per metric per batch), and copying the whole buffer sorted doubles the memory."""

    def __init__(
        self,
        write_row_group: Callable[[pa.Table], None],
        *,
        row_group_bytes: int,
        buffer_bytes: int,
    ) -> None:
        self._write = write_row_group
        self._row_group_bytes = row_group_bytes
        self._buffer_bytes = buffer_bytes
        self._batches: list[pa.RecordBatch] = []
        self._buffered = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self._batches.append(batch)
        self._buffered += batch.nbytes
        if self._buffered >= self._buffer_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._batches:
            return
        table = pa.Table.from_batches(self._batches)
        self._batches, self._buffered = [], 0
        order = pc.sort_indices(table.column(METRIC))
        for offset, length in metric_runs(table.column(METRIC).take(order)):
            run = table.take(order.slice(offset, length))
            parts = max(1, -(-run.nbytes // self._row_group_bytes))
            rows = -(-length // parts)
            for start in range(0, length, rows):
                self._write(run.slice(start, rows))
