"""The metric layout: buckets leave as row groups by size, by budget and at the end, in order."""

from __future__ import annotations

import pyarrow as pa
import pytest

from fgm_consolidator.clustering import FirstRows, MetricSorter, metric_runs, without_rows


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


def sorter(recorder: Recorder, row_group_bytes: int, buffer_bytes: int) -> MetricSorter:
    return MetricSorter(recorder, row_group_bytes=row_group_bytes, buffer_bytes=buffer_bytes)


def test_rows_wait_until_the_buffer_is_full_then_leave_one_group_per_metric() -> None:
    recorder = Recorder()
    first, second = batch(["b", "a", "b"]), batch(["a", "c"], start=3)
    into = sorter(recorder, row_group_bytes=10**9, buffer_bytes=first.nbytes + second.nbytes)
    into.add(first)
    assert recorder.groups == []
    into.add(second)
    assert recorder.groups == [[("a", 1), ("a", 3)], [("b", 0), ("b", 2)], [("c", 4)]]


def test_each_buffer_leaves_on_its_own_so_a_metric_spans_groups_in_order() -> None:
    recorder = Recorder()
    first = batch(["b", "a", "b"])
    into = sorter(recorder, row_group_bytes=10**9, buffer_bytes=first.nbytes)
    into.add(first)
    into.add(batch(["a", "b"], start=3))
    assert recorder.groups == [[("a", 1)], [("b", 0), ("b", 2)]]
    into.flush()
    assert recorder.groups[2:] == [[("a", 3)], [("b", 4)]]
    into.flush()  # nothing left: nothing written
    assert len(recorder.groups) == 4


def test_a_metric_larger_than_a_row_group_is_cut_into_equal_groups() -> None:
    recorder = Recorder()
    rows = batch(["a"] * 10 + ["b"])
    into = sorter(recorder, row_group_bytes=rows.nbytes // 3, buffer_bytes=10**9)
    into.add(rows)
    into.flush()
    sizes = [len(group) for group in recorder.groups if group[0][0] == "a"]
    assert len(sizes) >= 3 and sum(sizes) == 10
    assert len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]  # only the last is shorter
    assert [seq for group in recorder.groups for _, seq in group] == list(range(11))


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


def test_metric_runs_cover_a_sorted_column_exactly() -> None:
    names = pa.chunked_array([["a", "a"], ["b"], ["b", "c"]])
    assert metric_runs(names) == [(0, 2), (2, 2), (4, 1)]
