import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import data_files

from fgm_consolidator import footers, writer
from fgm_consolidator.clustering import MetricSorter
from fgm_consolidator.durable import identity
from fgm_consolidator.errors import (
    MergeAborted,
    OutputCheckError,
    SourceChangedError,
    SourceReadError,
)
from fgm_consolidator.schemas import unify
from fgm_consolidator.simulate import PodSpec
from fgm_consolidator.writer import WriteOptions, WriteSource, write_merged


@pytest.fixture(params=["flat", "map"])
def sources(request, data_dir: Path, populate) -> list[Path]:  # type: ignore[no-untyped-def]
    """Both eras: the map era's labels are nested dictionaries, which the spill must carry."""
    populate(PodSpec("pod-a", era=request.param), rotations=6)
    return data_files(data_dir)


def write(paths: list[Path], target: Path, **kwargs) -> object:  # type: ignore[no-untyped-def]
    schema = unify([pq.read_schema(p) for p in paths])
    inputs = [WriteSource(p, identity(p), pq.read_metadata(p).num_rows) for p in paths]
    options = kwargs.pop("options", WriteOptions())
    return write_merged(inputs, target, schema, options, metadata={b"k": b"v"}, **kwargs)


def rows_by_metric(rows: list[dict[str, object]]) -> dict[object, list[object]]:
    grouped: dict[object, list[object]] = {}
    for row in rows:
        container = row.get("l_container_id", dict(row.get("labels") or []).get("container_id"))
        grouped.setdefault(row["metric_name"], []).append((row["time"], container))
    return grouped


def metric_ranges(target: Path) -> list[tuple[str, str]]:
    metadata = pq.read_metadata(target)
    column = pq.read_schema(target).get_field_index("metric_name")
    return [
        (metadata.row_group(i).column(column).statistics.min,
         metadata.row_group(i).column(column).statistics.max)
        for i in range(metadata.num_row_groups)
    ]  # fmt: skip


@pytest.mark.parametrize("buffer", ["in-memory", "parked-on-disk"])
def test_output_holds_every_row_each_metric_in_source_order(
    sources: list[Path], tmp_path: Path, buffer: str
) -> None:
    target = tmp_path / "out.parquet.tmp"
    tiny = WriteOptions(row_group_bytes=1, buffer_row_groups=1)  # every batch parked, then merged
    result = write(sources, target, options=tiny if buffer == "parked-on-disk" else WriteOptions())
    expected = pa.concat_tables(
        [pq.read_table(p) for p in sources], promote_options="default"
    ).to_pylist()
    got = pq.read_table(target).to_pylist()
    assert len(got) == result.rows == len(expected)
    assert rows_by_metric(got) == rows_by_metric(expected)
    assert result.checksum == hashlib.sha256(target.read_bytes()).hexdigest()
    assert result.size == target.stat().st_size


def test_row_group_0_names_every_metric_and_the_others_hold_one_each(
    sources: list[Path], tmp_path: Path
) -> None:
    target = tmp_path / "out.parquet.tmp"
    result = write(sources, target, options=WriteOptions(share_below=0))
    metrics = sorted({r["metric_name"] for p in sources for r in pq.read_table(p).to_pylist()})
    head = pq.ParquetFile(target).read_row_group(0).column("metric_name").to_pylist()
    assert head == metrics  # one row each, in metric order
    ranges = metric_ranges(target)
    assert ranges[0] == (metrics[0], metrics[-1])
    assert [low for low, high in ranges[1:] if low == high] == metrics  # all fit: one group each
    assert result.row_groups == len(ranges) == 1 + len(metrics)


def test_small_metrics_share_row_groups_whole_and_in_order(
    sources: list[Path], tmp_path: Path
) -> None:
    """Each metric of these sources is far below the default share (250 KB): an output of
    thousands of such metrics had a row group, and a footer entry held until close, for each."""
    target = tmp_path / "out.parquet.tmp"
    write(sources, target)
    metrics = sorted({r["metric_name"] for p in sources for r in pq.read_table(p).to_pylist()})
    ranges = metric_ranges(target)[1:]
    assert len(ranges) < len(metrics)
    assert all(high < low for (_, high), (low, _) in itertools.pairwise(ranges))
    assert (ranges[0][0], ranges[-1][1]) == (metrics[0], metrics[-1])  # disjoint: each whole
    assert rows_by_metric(pq.read_table(target).to_pylist()) == rows_by_metric(
        [r for p in sources for r in pq.read_table(p).to_pylist()]
    )


def test_a_metric_larger_than_a_row_group_is_split_in_order(
    sources: list[Path], tmp_path: Path
) -> None:
    one_batch = pq.read_table(sources[0]).nbytes
    target = tmp_path / "out.parquet.tmp"
    write(sources, target, options=WriteOptions(row_group_bytes=one_batch // 4))
    ranges = metric_ranges(target)
    assert all(low == high for low, high in ranges[1:])
    assert len(ranges) - 1 > len({low for low, _ in ranges[1:]})  # some metric split
    got = pq.read_table(target).to_pylist()
    for rows in rows_by_metric(got).values():
        times = [time for time, _ in rows]
        assert times == sorted(times)


def test_an_existing_target_is_never_overwritten(sources: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "out.parquet.tmp"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write(sources, target)
    assert target.read_bytes() == b"precious"


def test_a_corrupt_source_is_named_and_the_partial_output_removed(
    sources: list[Path], tmp_path: Path
) -> None:
    victim = sources[3]
    good_footer = pq.read_metadata(victim).num_rows
    data = bytearray(victim.read_bytes())
    data[4:200] = b"\x00" * 196  # break the data pages, keep the footer
    victim.write_bytes(bytes(data))
    assert pq.read_metadata(victim).num_rows == good_footer
    target = tmp_path / "out.parquet.tmp"
    with pytest.raises(SourceReadError) as info:
        write(sources, target)
    assert info.value.path == str(victim)
    assert not target.exists()


def test_a_source_changed_since_planning_stops_the_write(
    sources: list[Path], tmp_path: Path
) -> None:
    schema = unify([pq.read_schema(p) for p in sources])
    planned = [WriteSource(p, identity(p), pq.read_metadata(p).num_rows) for p in sources]
    with open(sources[1], "ab") as handle:
        handle.write(b"x")
    target = tmp_path / "out.parquet.tmp"
    with pytest.raises(SourceChangedError):
        write_merged(planned, target, schema, WriteOptions(), metadata={})
    assert not target.exists()


def test_a_source_swapped_for_a_fifo_since_planning_is_never_waited_on(
    sources: list[Path], tmp_path: Path
) -> None:
    """The writer opens sources as the scan does: regular files only, so a FIFO put where a
    planned source was fails the write at once instead of blocking it in open()."""
    schema = unify([pq.read_schema(p) for p in sources])
    planned = [WriteSource(p, identity(p), pq.read_metadata(p).num_rows) for p in sources]
    sources[1].unlink()
    os.mkfifo(sources[1])
    target = tmp_path / "out.parquet.tmp"
    with pytest.raises(SourceReadError, match="a FIFO, not a regular file") as info:
        write_merged(planned, target, schema, WriteOptions(), metadata={})
    assert info.value.path == str(sources[1])
    assert not target.exists()


def test_an_abort_request_removes_the_partial_output(sources: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "out.parquet.tmp"
    calls = []

    def abort() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(MergeAborted):
        write(sources, target, should_abort=abort)
    assert not target.exists()
    assert len(calls) == 3


def test_a_metric_first_seen_in_a_later_source_is_named_in_row_group_0(
    sources: list[Path], tmp_path: Path
) -> None:
    """The viewer lists metrics from row group 0 of the newest file alone: a metric the first
    sources lack (a collector enabled mid-hour) must be there too, not only in its own group."""
    names = sorted(set(pq.read_table(sources[0]).column("metric_name").to_pylist()))
    late = names[-1]
    for early in sources[:3]:  # the first three sources never saw `late`
        table = pq.read_table(early)
        kept = table.filter(pa.compute.not_equal(table.column("metric_name"), late))
        early.unlink()
        pq.write_table(kept, early)
    target = tmp_path / "out.parquet.tmp"
    write(sources, target)
    head = pq.ParquetFile(target).read_row_group(0).column("metric_name").to_pylist()
    assert head == names
    got = pq.read_table(target).to_pylist()
    first_late = next(r for r in pq.read_table(sources[3]).to_pylist() if r["metric_name"] == late)
    found = got[names.index(late)]
    assert (found["metric_name"], found["time"]) == (late, first_late["time"])  # its earliest


def test_a_source_that_reads_back_fewer_rows_than_its_footer_is_the_one_named(
    sources: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that stops early without an error (pages decoded short) fails that source,
    not the output: named, it is reported unreadable and held out of later merges. Left to the
    output's row check, the failure was our side's, and the partition retried the same merge
    after every backoff, for good."""
    victim = sources[2]
    real = writer._source_batches

    def short(source: WriteSource, *args: Any) -> Iterator[pa.RecordBatch]:
        batches = list(real(source, *args))
        return iter(batches[:-1] if source.path == victim else batches)

    monkeypatch.setattr(writer, "_source_batches", short)
    target = tmp_path / "out.parquet.tmp"
    with pytest.raises(SourceReadError, match="footer promised") as info:
        write(sources, target)
    assert info.value.path == str(victim)
    assert not target.exists()


def lose_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    real_add = MetricSorter.add
    calls = {"n": 0}

    def add(self: MetricSorter, batch: pa.RecordBatch) -> None:
        calls["n"] += 1
        if calls["n"] != 3:
            real_add(self, batch)

    monkeypatch.setattr(MetricSorter, "add", add)


def write_another_type(monkeypatch: pytest.MonkeyPatch) -> None:
    real_writer = pq.ParquetWriter

    def microseconds(*args: Any, **kwargs: Any) -> pq.ParquetWriter:
        return real_writer(*args, coerce_timestamps="us", **kwargs)

    monkeypatch.setattr(pq, "ParquetWriter", microseconds)


def store_another_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """The columns right, but the Arrow schema pyarrow readers take their types from wrong."""
    real_stored = writer._stored

    def as_dictionaries(schema: pa.Schema) -> bytes:
        return real_stored(writer.buffer_schema(schema))

    monkeypatch.setattr(writer, "_stored", as_dictionaries)


@pytest.mark.parametrize(
    ("bug", "found"),
    [
        (lose_a_batch, "rows, expected"),
        (write_another_type, "output schema"),
        (store_another_schema, "output schema"),
    ],
    ids=["a-batch-lost", "a-type-changed", "a-stored-type-changed"],
)
def test_the_output_check_stops_what_a_writer_bug_would_publish(
    sources: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bug: Callable[[pytest.MonkeyPatch], None],
    found: str,
) -> None:
    """The footer read back is the last word before a merge is journaled `written`: rows the
    sort lost, or a column written as another type, must fail the write, not be published."""
    bug(monkeypatch)
    target = tmp_path / "out.parquet.tmp"
    with pytest.raises(OutputCheckError, match=found):
        write(sources, target)
    assert not target.exists()


MAP_TEXT = pa.dictionary(pa.int32(), pa.utf8())
MAP_OF_TEXT = pa.map_(
    pa.field("key", MAP_TEXT, nullable=False), pa.field("value", MAP_TEXT, nullable=False)
)


@pytest.mark.parametrize("buffer", ["in-memory", "parked-on-disk"])
def test_map_labels_read_plain_come_back_as_they_were(tmp_path: Path, buffer: str) -> None:
    """A map value long and distinct in every row is read plain and encoded batch by batch
    (`reading.read_plain`); null maps, empty maps and short labels beside it come back as
    they were, with the map's dictionary types."""
    rows = 3_000
    labels: list[list[tuple[str, str]] | None] = [
        None if i % 7 == 0 else [] if i % 11 == 0 else [("id", f"{i:0200d}"), ("ns", "default")]
        for i in range(rows)
    ]
    paths = []
    for index in range(2):
        path = tmp_path / f"metrics-2025010{index + 1}T000000Z.parquet"
        table = pa.table(
            {
                "metric_name": [f"m{(i + index) % 5}" for i in range(rows)],
                "seq": pa.array(range(index * rows, (index + 1) * rows), pa.int64()),
                "labels": pa.array(labels, MAP_OF_TEXT),
            }
        )
        pq.write_table(table, path)
        paths.append(path)
    assert footers.read(paths[0]).plain_text == {"labels.key_value.value"}
    target = tmp_path / "out.parquet"
    tiny = WriteOptions(row_group_bytes=10_000, buffer_row_groups=1)
    write(paths, target, options=tiny if buffer == "parked-on-disk" else WriteOptions())
    merged = pq.read_table(target)
    assert merged.schema.field("labels").type == MAP_OF_TEXT
    by_seq = {row["seq"]: row["labels"] for row in merged.to_pylist()}
    expected = {row["seq"]: row["labels"] for p in paths for row in pq.read_table(p).to_pylist()}
    assert by_seq == expected


@pytest.mark.parametrize("era", ["flat", "map"])
def test_text_stored_plain_under_a_dictionary_type_comes_in_batches_of_its_own_values(
    tmp_path: Path, era: str
) -> None:
    """The stored Arrow schema says dictionary, the pages hold (nearly) distinct values: read
    as the file says, every batch came with the dictionary of its whole row group (a map's
    labels: 654-889 MiB for 40,000 rows of 1 KB; a flat label: 373 MiB for 160,000 rows of
    512 bytes). Each batch now holds the values its rows use."""
    rows = 4_000
    distinct = [f"{i:0300d}" for i in range(rows)]
    if era == "flat":
        column = pa.array(distinct, MAP_TEXT)
    else:
        column = pa.array([[("id", value)] for value in distinct], MAP_OF_TEXT)
    table = pa.table({"metric_name": ["m"] * rows, "labels": column})
    path = tmp_path / "metrics-20250101T000000Z.parquet"
    pq.write_table(table, path)
    source = WriteSource(path, identity(path), rows)
    batches = list(writer.iter_source(source, table.schema))
    assert len(batches) > 1
    for batch in batches:
        labels = batch.column("labels")
        values = labels if era == "flat" else labels.items
        assert len(values.dictionary) <= batch.num_rows
    decoded = pa.Table.from_batches(batches).column("labels").to_pylist()
    assert decoded == table.column("labels").to_pylist()
