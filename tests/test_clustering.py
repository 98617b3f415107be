"""The metric layout: buckets leave as row groups by size, by budget and at the end, in order."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from fgm_consolidator import clustering, durable
from fgm_consolidator.clustering import FirstRows, MetricSorter, metric_keys, without_rows


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


@pytest.mark.parametrize("buffer_bytes", [10**9, 1], ids=["in memory", "parked"])
def test_small_metrics_share_row_groups_and_a_large_one_keeps_its_own(
    tmp_path: Path, buffer_bytes: int
) -> None:
    """Small metrics (a, b, d, e) gather until a row group holds the share; the large one (c)
    never shares, so a reader of c decodes none of the others, nor they c."""
    recorder = Recorder()
    share = batch(["x"] * 3).nbytes  # three rows' worth
    into = MetricSorter(
        recorder,
        row_group_bytes=10**9,
        buffer_bytes=buffer_bytes,
        spill_folder=tmp_path,
        shared_row_group_bytes=share,
    )
    names = ["a", "b", "c", "c", "c", "c", "c", "d", "e"]
    for seq, name in enumerate(names):
        into.add(batch([name], start=seq))
    into.finish()
    assert [[name for name, _ in group] for group in recorder.groups] == [
        ["a", "b"],  # below the share: one more small metric could still join
        ["c", "c", "c", "c", "c"],
        ["d", "e"],
    ]


def test_many_small_batches_are_combined_and_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held batches are combined once there are MAX_BATCHES of them (each costs memory of its
    own): the rows come out as if they had been held apart."""
    monkeypatch.setattr(clustering, "MAX_BATCHES", 4)
    recorder = Recorder()
    into = sorter(recorder, tmp_path, row_group_bytes=10**9, buffer_bytes=10**9)
    names = ["b", "a", "c", "a", "b", "a", "c", "b", "a", "c", "a"]
    for seq, name in enumerate(names):
        into.add(batch([name], start=seq))
    into.finish()
    assert recorder.groups == [
        [(name, seq) for seq, name in enumerate(names) if name == metric] for metric in "abc"
    ]


def test_a_failure_while_writing_closes_the_spill(tmp_path: Path) -> None:
    def failing(_table: pa.Table) -> None:
        raise OSError(28, "No space left on device")

    into = MetricSorter(failing, row_group_bytes=10**9, buffer_bytes=1, spill_folder=tmp_path)
    opened = spill_files_opened(tmp_path)
    into.add(batch(["a", "b"]))
    assert opened() == 1
    with pytest.raises(OSError):
        into.finish()
    assert opened() == 0


def test_a_full_disk_while_parking_raises_and_the_spill_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(_self: object, _data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.Sink, "write", full)
    into = sorter(Recorder(), tmp_path, row_group_bytes=10**9, buffer_bytes=1)
    opened = spill_files_opened(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        into.add(batch(["a", "b"]))
    assert opened() == 1
    into.close()
    assert opened() == 0


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], [0, 1, 2, 3, 4]),
        ([0], [1, 2, 3, 4]),
        ([2, 4], [0, 1, 3]),
        ([1, 2], [0, 3, 4]),
        ([0, 1, 2, 3, 4], []),
    ],
)
def test_without_rows_drops_exactly_the_given_rows(rows: list[int], expected: list[int]) -> None:
    pieces = without_rows(batch(["m"] * 5), rows)
    assert [seq for piece in pieces for seq in piece.column("seq").to_pylist()] == expected
    assert all(piece.num_rows for piece in pieces)


def test_first_rows_takes_each_metric_where_it_first_appears() -> None:
    first = FirstRows()
    kept = [
        *first.take_from(batch(["b", "a", "b"])),
        *first.take_from(batch(["a", "c"], start=3)),
        *first.take_from(batch(["d", "a", "c"], start=5)),
    ]
    assert [seq for piece in kept for seq in piece.column("seq").to_pylist()] == [2, 3, 6, 7]
    head = first.table(batch([]).schema)
    assert head.column("metric_name").to_pylist() == ["a", "b", "c", "d"]
    assert head.column("seq").to_pylist() == [1, 0, 4, 5]


def test_first_rows_of_dictionary_encoded_names_come_out_with_one_dictionary() -> None:
    def encoded(metrics: list[str], start: int) -> pa.RecordBatch:
        plain = batch(metrics, start)
        return pa.record_batch(
            [plain.column(0).dictionary_encode(), plain.column(1)], names=plain.schema.names
        )

    first = FirstRows()
    first.take_from(encoded(["b", "a"], 0))
    first.take_from(encoded(["c", "b"], 2))
    head = first.table(encoded([], 0).schema)
    assert head.column("metric_name").num_chunks == 1
    assert head.column("metric_name").to_pylist() == ["a", "b", "c"]
    assert head.column("seq").to_pylist() == [1, 0, 2]


def test_metric_keys_order_rows_by_name_whatever_the_dictionary_order() -> None:
    names = pa.DictionaryArray.from_arrays(
        pa.array([0, 2, 1, 0, 2], pa.int32()), pa.array(["m", "b", "z"])
    )
    keys, metrics = metric_keys(names)
    assert metrics == ["b", "m", "z"]
    assert [metrics[key] for key in keys.to_pylist()] == ["m", "z", "b", "m", "z"]


SPILL_DICTIONARIES = {
    "shared": (10**9, 10**9),
    "cut per batch": (0, 10**9),
    "a stream per batch": (0, 0),
}


@pytest.mark.parametrize("dictionaries", SPILL_DICTIONARIES)
def test_small_metrics_parked_together_come_back_by_metric_in_arrival_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dictionaries: str
) -> None:
    """Each buffer parks its small metrics in one batch; a shared row group takes one piece of
    several metrics from each buffer and must still hold each metric whole, in the order its
    rows came, whatever way the buffers' dictionaries were parked."""
    compact_above, apart_above = SPILL_DICTIONARIES[dictionaries]
    monkeypatch.setattr(clustering, "COMPACT_ABOVE", compact_above)
    monkeypatch.setattr(clustering, "APART_ABOVE", apart_above)
    recorder = Recorder()
    into = MetricSorter(
        recorder,
        row_group_bytes=10**9,
        buffer_bytes=batch(["x"] * 6).nbytes,  # two batches a buffer
        spill_folder=tmp_path,
        shared_row_group_bytes=10**8,
    )
    names = ["b", "a", "c", "a", "c", "b", "c", "a", "b", "d", "a", "c"]
    for start in range(0, len(names), 3):
        into.add(batch(names[start : start + 3], start=start))
    into.finish()
    assert recorder.groups == [
        [(name, seq) for name in "abcd" for seq, named in enumerate(names) if named == name]
    ]


def test_small_metrics_fill_fewer_row_groups_when_they_are_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parquet writer holds each row group's metadata until the file closes: shared row
    groups grow to a MAX_SHARED-th of all small metrics together, never past a row group."""
    recorder = Recorder()
    names = [f"m{index:02d}" for index in range(12)]
    row = batch(names[:1]).nbytes

    def sort(max_shared: int) -> list[list[str]]:
        monkeypatch.setattr(clustering, "MAX_SHARED", max_shared)
        recorder.groups.clear()
        into = MetricSorter(
            recorder,
            row_group_bytes=8 * row,
            buffer_bytes=1,
            spill_folder=tmp_path,
            shared_row_group_bytes=2 * row,
        )
        for seq, name in enumerate(names):
            into.add(batch([name], start=seq))
        into.finish()
        return [[name for name, _ in group] for group in recorder.groups]

    assert sort(max_shared=10**6) == [names[index : index + 2] for index in range(0, 12, 2)]
    assert sort(max_shared=2) == [names[:6], names[6:]]
    assert sort(max_shared=1) == [names[:8], names[8:]]  # a row group at most


def test_a_spill_not_read_to_the_end_is_a_defect_not_a_short_output(tmp_path: Path) -> None:
    spill = clustering.Spill(tmp_path)
    try:
        rows = batch(["a", "b"])
        spill.park(rows.schema, [(rows, [("a", 1), ("b", 1)])], 8.0, cut=False, apart=False)
        assert [name for name, _size in spill.metrics()] == ["a", "b"]
        assert [piece.num_rows for piece, _size in spill.rows(["a"])] == [1]
        with pytest.raises(RuntimeError, match="not read back to the end"):
            spill.check_read_through()
    finally:
        spill.close()


TEXT = pa.dictionary(pa.int32(), pa.utf8())
LABELS = pa.map_(pa.field("key", TEXT, nullable=False), pa.field("value", TEXT))


def map_batch(tag: str, rows: int) -> pa.RecordBatch:
    keys = pa.array(["pod", "request"] * rows).dictionary_encode()
    values = pa.array([f"{tag}-{i}" for i in range(2 * rows)]).dictionary_encode()
    offsets = pa.array(range(0, 2 * rows + 1, 2), pa.int32())
    labels = pa.MapArray.from_arrays(offsets, keys, values, type=LABELS)
    return pa.record_batch([labels], ["labels"])


def test_a_row_group_of_maps_leaves_the_batches_it_was_cut_from_as_they_were() -> None:
    """pyarrow unifies the dictionaries inside a map in place, in the arrays it is given,
    which every slice of a batch shares: each next slice of a parked batch carried the
    dictionaries of every row group before it (an output 6 times its sources)."""
    parked, other = map_batch("parked", 10), map_batch("other", 10)
    expected = parked.column("labels").to_pylist()
    for first in range(0, 10, 2):
        table = clustering._one_dictionary([other, parked.slice(first, 2)])
        assert table.column("labels").to_pylist() == [
            *other.column("labels").to_pylist(),
            *expected[first : first + 2],
        ]
    for kept in (parked, other):
        assert len(kept.slice(0, 1).column("labels").items.dictionary) == 20
    assert parked.column("labels").to_pylist() == expected
