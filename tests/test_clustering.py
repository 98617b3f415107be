"""The metric layout: buckets leave as row groups by size, by budget and at the end, in order."""

from __future__ import annotations

import pyarrow as pa
import pytest

from fgm_consolidator.clustering import FirstRows, MetricBuckets, split_by_metric, without_rows


def batch(metrics: list[str], start: int = 0) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array(metrics, pa.utf8()), pa.array(range(start, start + len(metrics)), pa.int64())],
        names=["metric_name", "seq"],
    )


class Recorder:
    def __init__(self) -> None:
        self.groups: list[list[tuple[str, int]]] = []

    def __call__(self, table: pa.Table) -> None:
        names = table.column("metric_name").to_pylist()
        self.groups.append(list(zip(names, table.column("seq").to_pylist(), strict=True)))


def buckets(recorder: Recorder, row_group_bytes: int, buffer_bytes: int) -> MetricBuckets:
    schema = batch([]).schema
    return MetricBuckets(
        schema, recorder, row_group_bytes=row_group_bytes, buffer_bytes=buffer_bytes
    )


def test_split_keeps_arrival_order_within_each_metric() -> None:
    pieces = split_by_metric(batch(["b", "a", "b", "c", "a", "b"]))
    assert [(name, piece.column("seq").to_pylist()) for name, piece in pieces] == [
        ("a", [1, 4]),
        ("b", [0, 2, 5]),
        ("c", [3]),
    ]


def test_buckets_leave_in_metric_order_at_the_end_one_group_each() -> None:
    recorder = Recorder()
    into = buckets(recorder, row_group_bytes=10**9, buffer_bytes=10**9)
    into.add(batch(["b", "a", "b"]))
    into.add(batch(["a", "c"], start=3))
    assert recorder.groups == []
    into.finish()
    assert recorder.groups == [[("a", 1), ("a", 3)], [("b", 0), ("b", 2)], [("c", 4)]]


def test_a_full_bucket_leaves_as_soon_as_it_reaches_a_row_group() -> None:
    recorder = Recorder()
    first, second = batch(["a", "b", "a"]), batch(["a", "b"], start=3)
    sizes = [dict((name, p.nbytes) for name, p in split_by_metric(b)) for b in (first, second)]
    # Just above what `a` holds after the first batch and what `b` holds after both.
    threshold = max(sizes[0]["a"], sizes[0]["b"] + sizes[1]["b"]) + 1
    assert sizes[0]["a"] + sizes[1]["a"] >= threshold
    into = buckets(recorder, row_group_bytes=threshold, buffer_bytes=10**9)
    into.add(first)
    assert recorder.groups == []
    into.add(second)
    assert recorder.groups == [[("a", 0), ("a", 2), ("a", 3)]]
    into.finish()
    assert recorder.groups[1:] == [[("b", 1), ("b", 4)]]


def test_over_the_buffer_budget_the_largest_bucket_leaves_first() -> None:
    recorder = Recorder()
    first = batch(["a", "b", "b", "c"])
    budget = sum(piece.nbytes for _, piece in split_by_metric(first))
    into = buckets(recorder, row_group_bytes=10**9, buffer_bytes=budget)
    into.add(first)
    assert recorder.groups == []
    into.add(batch(["b"], start=4))
    assert recorder.groups == [[("b", 1), ("b", 2), ("b", 4)]]
    into.finish()
    assert recorder.groups[1:] == [[("a", 0)], [("c", 3)]]


@pytest.mark.parametrize(
    ("offset", "rows", "expected"),
    [
        (0, [], [0, 1, 2, 3, 4]),
        (0, [0], [1, 2, 3, 4]),
        (0, [2, 4], [0, 1, 3]),
        (10, [12, 3, 99], [10, 11, 13, 14]),  # rows outside the batch are not its business
        (0, [0, 1, 2, 3, 4], []),
    ],
)
def test_without_rows_drops_exactly_the_given_source_rows(
    offset: int, rows: list[int], expected: list[int]
) -> None:
    pieces = without_rows(batch(["m"] * 5, start=offset), offset, rows)
    assert [seq for piece in pieces for seq in piece.column("seq").to_pylist()] == expected
    assert all(piece.num_rows for piece in pieces)


def test_first_rows_finds_each_metric_where_it_first_appears() -> None:
    first = FirstRows()
    first.observe(0, 0, pa.array(["b", "a", "b"]))
    first.observe(0, 3, pa.array(["a", "c"]))
    first.observe(1, 0, pa.array(["d", "a", "c"]))
    assert first.positions == {"b": (0, 0), "a": (0, 1), "c": (0, 4), "d": (1, 0)}
    assert first.rows_of(0) == [0, 1, 4]
    assert first.rows_of(1) == [0]
    assert first.rows_of(2) == []
