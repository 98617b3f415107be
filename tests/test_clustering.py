"""The metric layout: buckets leave as row groups by size, by budget and at the end, in order."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from fgm_consolidator.clustering import FirstRows, MetricSorter, without_rows
from fgm_consolidator.errors import SourceChangedError


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


def sorter(
    recorder: Recorder, folder: Path, row_group_bytes: int, buffer_bytes: int
) -> MetricSorter:
    return MetricSorter(
        recorder,
        metrics=["c", "b", "a"],
        row_group_bytes=row_group_bytes,
        buffer_bytes=buffer_bytes,
        spill_folder=folder,
    )


def test_rows_that_fit_the_buffer_leave_at_the_end_one_group_per_metric(tmp_path: Path) -> None:
    recorder = Recorder()
    into = sorter(recorder, tmp_path, row_group_bytes=10**9, buffer_bytes=10**9)
    into.add(batch(["b", "a", "b"]))
    into.add(batch(["a", "c"], start=3))
    assert recorder.groups == []
    into.finish()
    assert recorder.groups == [[("a", 1), ("a", 3)], [("b", 0), ("b", 2)], [("c", 4)]]


def test_runs_parked_on_disk_come_back_one_group_per_metric_in_order(tmp_path: Path) -> None:
    """Every batch fills the buffer, so each is sorted and parked: the output is the same."""
    recorder = Recorder()
    opened = spill_files_opened(tmp_path)
    into = sorter(recorder, tmp_path, row_group_bytes=10**9, buffer_bytes=1)
    into.add(batch(["b", "a", "b"]))
    into.add(batch(["a", "c"], start=3))
    into.add(batch(["c", "b", "a"], start=5))
    assert recorder.groups == [] and opened() == 1
    into.finish()
    assert recorder.groups == [
        [("a", 1), ("a", 3), ("a", 7)],
        [("b", 0), ("b", 2), ("b", 6)],
        [("c", 4), ("c", 5)],
    ]
    assert list(tmp_path.iterdir()) == []  # the spill has no name, and it is closed


def spill_files_opened(folder: Path) -> Callable[[], int]:
    """How many files the process holds open in `folder` (the spill is anonymous)."""
    fd_dir = Path("/proc/self/fd")

    def count() -> int:
        return sum(1 for fd in fd_dir.iterdir() if _points_into(fd, folder))

    return count


def _points_into(fd: Path, folder: Path) -> bool:
    try:
        return os.readlink(fd).startswith(str(folder))
    except OSError:
        return False


def test_a_metric_larger_than_a_row_group_is_cut_in_order(tmp_path: Path) -> None:
    recorder = Recorder()
    into = sorter(recorder, tmp_path, row_group_bytes=batch(["a"] * 4).nbytes, buffer_bytes=1)
    for start in range(0, 12, 3):
        into.add(batch(["a", "a", "b"], start=start))
    into.finish()
    a_groups = [group for group in recorder.groups if group[0][0] == "a"]
    assert len(a_groups) > 1
    assert [seq for group in a_groups for _, seq in group] == [0, 1, 3, 4, 6, 7, 9, 10]
    assert all(len({name for name, _ in group}) == 1 for group in recorder.groups)


def test_a_failure_while_writing_closes_the_spill(tmp_path: Path) -> None:
    def failing(_table: pa.Table) -> None:
        raise OSError(28, "No space left on device")

    into = MetricSorter(
        failing, metrics=["a", "b"], row_group_bytes=10**9, buffer_bytes=1, spill_folder=tmp_path
    )
    opened = spill_files_opened(tmp_path)
    into.add(batch(["a", "b"]))
    assert opened() == 1
    with pytest.raises(OSError):
        into.finish()
    assert opened() == 0


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


@pytest.mark.parametrize("buffer_bytes", [1, 10**9])
def test_a_metric_the_first_read_did_not_see_is_refused(tmp_path: Path, buffer_bytes: int) -> None:
    """The sort key is a row's place among the metrics seen first; a newcomer means a source
    changed between the two reads, and no row may be dropped or misplaced for it."""
    recorder = Recorder()
    into = sorter(recorder, tmp_path, row_group_bytes=10**9, buffer_bytes=buffer_bytes)
    with pytest.raises(SourceChangedError, match="'z'"):
        into.add(batch(["a", "z"]))
        into.finish()
    into.close()
    assert recorder.groups == []
