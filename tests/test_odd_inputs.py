"""Inputs the other files do not cover, each found to break a promise once.

Each test checks the rows of the partition after, every column, against those before: with the
oracle (`oracle.expected_rows`, `check`), or, where the oracle cannot hold a value (a time past
year 9999, text that is not UTF-8), column by column as stored; and what is left on disk
against what the policy says should be there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import consolidated_name, data_files, small_spec, tmp_files
from oracle import OracleReport, check, check_rows, expected_rows, read_live, recover_in_process

from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import Settings, StopFlag, run_service
from fgm_consolidator.simulate import PodSpec, generate
from fgm_consolidator.states import MergeState

MAP_POD = "dt=2025-12-30/identifier=pod-m"


def run_once(data_dir: Path, **policy: Any) -> int:
    settings = Settings(
        data_dir,
        default_journal_path(data_dir),
        Policy(min_age_s=0, min_files=2, **policy),
    )
    return run_service(settings, StopFlag(grace_s=0), once=True)


def unreadable_names(data_dir: Path) -> list[str]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return [record.name for record in journal.unreadable()]
    finally:
        journal.close()


def sources_back_and_journal_lost(data_dir: Path, kept: Path, folder: Path) -> None:
    """The state a kill between an output's rename and its first delete leaves, with the
    journal lost: the sources kept in `kept` back in `folder`."""
    for path in kept.iterdir():
        shutil.copy2(path, folder / path.name)
    for path in default_journal_path(data_dir).parent.glob("journal.db*"):
        path.unlink()


def map_era(data_dir: Path, rotations: int) -> None:
    generate(data_dir, small_spec((PodSpec("pod-m", era="map"),), rotations=rotations))


# -- map-era files of many row groups ------------------------------------------------------------


def test_map_era_outputs_are_merged_again_with_their_neighbours(data_dir: Path) -> None:
    """Our own map-era outputs hold many row groups (one per metric), each with its own
    dictionaries for the map's keys and values. pyarrow cannot return a batch of a nested
    dictionary column that spans two row groups, so reading them in batches across row groups
    failed: the consolidator reported its own outputs unreadable, and a map-era day never
    converged to one file per window."""
    map_era(data_dir, rotations=24)  # 08:00:00 .. 08:34:30
    expected = expected_rows(data_dir)
    assert run_once(data_dir, max_span_s=900) == 0
    quarters = [consolidated_name(0, 9), consolidated_name(10, 19), consolidated_name(20, 23)]
    assert [p.name for p in data_files(data_dir)] == quarters
    assert all(pq.ParquetFile(p).num_row_groups > 1 for p in data_files(data_dir))

    assert run_once(data_dir, max_span_s=3600) == 0
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 23)]
    assert unreadable_names(data_dir) == []
    assert check(data_dir, expected).violations == []


def test_what_reads_a_map_era_output_and_what_cannot(data_dir: Path) -> None:
    """The README's list (Output layout): pyarrow reads a map-era file of several row groups
    a row group at a time, and not across them. Should pyarrow lift the limit, this fails
    and the README changes."""
    map_era(data_dir, rotations=3)
    expected = expected_rows(data_dir)
    assert run_once(data_dir) == 0
    [output] = data_files(data_dir)
    parquet = pq.ParquetFile(output)
    assert parquet.num_row_groups > 1
    rows = pq.read_table(output).num_rows
    groups = [parquet.read_row_group(i).num_rows for i in range(parquet.num_row_groups)]
    batches = [
        batch.num_rows
        for i in range(parquet.num_row_groups)
        for batch in parquet.iter_batches(row_groups=[i])
    ]
    assert rows == sum(groups) == sum(batches) == sum(expected.values())
    with pytest.raises(pa.ArrowNotImplementedError, match="Nested data conversions"):
        parquet.read()


def test_a_map_era_file_of_many_row_groups_is_merged(data_dir: Path) -> None:
    """The monitor cuts a row group at about 1M rows, so a busy map-era file can hold several:
    such a file was reported unreadable and never merged."""
    map_era(data_dir, rotations=3)
    folder = data_dir / MAP_POD
    big = sorted(folder.glob("metrics-*.parquet"))[1]
    stat = big.stat()
    table = pq.read_table(big)
    pq.write_table(table, big, row_group_size=table.num_rows // 4, compression="zstd")
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert pq.ParquetFile(big).num_row_groups > 1
    expected = expected_rows(data_dir)

    assert run_once(data_dir) == 0
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 2)]
    assert unreadable_names(data_dir) == []
    assert check(data_dir, expected).violations == []


def test_lineage_recovery_proves_a_map_era_output(data_dir: Path, tmp_path: Path) -> None:
    """With the journal lost after a merge published its output but before it deleted the
    sources, recovery proves from the output's lineage and rows that the sources are held, and
    removes them. The proof read the output in batches across row groups, so a map-era output
    never read back and every one of its sources stayed: each row in the partition twice."""
    map_era(data_dir, rotations=4)
    expected = expected_rows(data_dir)
    folder = data_dir / MAP_POD
    kept = tmp_path / "sources"
    shutil.copytree(folder, kept)
    assert run_once(data_dir) == 0
    output = folder / consolidated_name(0, 3)
    assert [p.name for p in data_files(data_dir)] == [output.name]
    sources_back_and_journal_lost(data_dir, kept, folder)

    recover_in_process(data_dir)
    assert [p.name for p in data_files(data_dir)] == [output.name]
    assert tmp_files(data_dir) == []
    # The new journal adopted the output before removing its sources, so a finished merge
    # accounts for it again, and the removal is in its history.
    assert check(data_dir, expected, idempotence=False).violations == []
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        [adopted] = journal.history()
    finally:
        journal.close()
    assert (adopted.adopted, adopted.output) == (True, output.name)
    assert [(t.state, t.actor) for t in adopted.transitions] == [
        (MergeState.RENAMED, "recovery"),
        (MergeState.SOURCES_DELETED, "recovery"),
    ]
    assert [s.name for s in adopted.sources] == sorted(p.name for p in kept.glob("*.parquet"))


def store_text_delta_encoded(path: Path) -> None:
    """Rewrite `path` with every text column stored DELTA_BYTE_ARRAY, as the monitor's writer
    (arrow-rs, PARQUET_2_0) stores text past a full dictionary page; mtime kept."""
    stat = path.stat()
    table = pq.read_table(path)
    schema = pq.read_metadata(path).schema
    columns = [schema.column(i) for i in range(len(schema))]
    text = [
        c.path for c in columns if c.physical_type == "BYTE_ARRAY" and c.path != "value_histogram"
    ]
    tops = {name.split(".")[0] for name in text}
    plain = [name for name in table.schema.names if name not in tops]
    encoding = dict.fromkeys(text, "DELTA_BYTE_ARRAY")
    pq.write_table(table, path, compression="zstd", use_dictionary=plain, column_encoding=encoding)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("era", ["flat", "map"])
def test_text_stored_delta_encoded_is_merged_and_proven(
    data_dir: Path, tmp_path: Path, era: str
) -> None:
    """pyarrow cannot decode DELTA_BYTE_ARRAY pages into a dictionary, and text was read
    dictionary-encoded: such a source was reported unreadable and never merged, and it kept
    its neighbours apart. Read plain and encoded by us, it is merged; and a lineage proof
    reads it too."""
    pod = "pod-a" if era == "flat" else "pod-m"
    generate(data_dir, small_spec((PodSpec(pod, era=era),), rotations=3))
    folder = data_dir / f"dt=2025-12-30/identifier={pod}"
    expected = expected_rows(data_dir)  # before: pyarrow reads no map-era file so stored
    for path in folder.glob("metrics-*.parquet"):
        store_text_delta_encoded(path)
    kept = tmp_path / "sources"
    shutil.copytree(folder, kept)

    assert run_once(data_dir) == 0
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 2)]
    assert unreadable_names(data_dir) == []
    assert check(data_dir, expected).violations == []

    sources_back_and_journal_lost(data_dir, kept, folder)
    recover_in_process(data_dir)
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 2)]
    assert check(data_dir, expected, idempotence=False).violations == []


def test_map_era_outputs_merged_again_keep_every_value_and_type(data_dir: Path) -> None:
    """The second generation of a map-era output has the first's exact schema and rows."""
    map_era(data_dir, rotations=12)
    schema = pq.read_schema(next(iter(sorted((data_dir / MAP_POD).glob("*.parquet")))))
    expected = expected_rows(data_dir)
    assert run_once(data_dir, max_span_s=600) == 0
    assert run_once(data_dir, max_span_s=3600) == 0
    (final,) = data_files(data_dir)
    assert pq.read_schema(final).remove_metadata().equals(schema.remove_metadata())
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        states = [record.state for record in journal.history()]
    finally:
        journal.close()
    assert set(states) == {MergeState.SOURCES_DELETED}
    assert check(data_dir, expected).violations == []
    assert pa.types.is_map(pq.read_schema(final).field("labels").type)


# -- values Python cannot hold ---------------------------------------------------------------


def far_future_row(path: Path) -> None:
    """One row of `path` stamped 2**62 ms after the epoch (year ~146 million): a valid Arrow
    and parquet timestamp that no Python datetime can hold."""
    stat = path.stat()
    table = pq.read_table(path)
    times = table.column("time").cast(pa.int64()).to_pylist()
    times[0] = 2**62
    index = table.schema.get_field_index("time")
    table = table.set_column(index, table.field(index), pa.array(times, pa.timestamp("ms")))
    pq.write_table(table, path, compression="zstd")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_lineage_recovery_proves_rows_whose_time_python_cannot_hold(
    data_dir: Path, tmp_path: Path
) -> None:
    """The proof turned every value into a Python object, and a timestamp past year 9999
    raised OverflowError out of start-up recovery: `run` and `recover` died with a traceback
    on every start, for every partition, and the sources stayed beside their output."""
    generate(data_dir, small_spec(rotations=3))
    folder = data_dir / "dt=2025-12-30/identifier=pod-a"
    sources = sorted(folder.glob("metrics-*.parquet"))
    far_future_row(sources[1])
    before = {path.name: pq.read_table(path) for path in sources}
    kept = tmp_path / "sources"
    shutil.copytree(folder, kept)
    assert run_once(data_dir) == 0
    output = folder / consolidated_name(0, 2)
    assert [p.name for p in data_files(data_dir)] == [output.name]
    sources_back_and_journal_lost(data_dir, kept, folder)

    recover_in_process(data_dir)
    assert [p.name for p in data_files(data_dir)] == [output.name]
    after = rows_with_raw_time(pq.read_table(output))
    assert after == sum((rows_with_raw_time(t) for t in before.values()), Counter())
    assert str(2**62) in {dict(row)["time"] for row in after}


def rows_with_raw_time(table: pa.Table) -> Counter[tuple[Any, ...]]:
    """Every row, every column but labels it lacks (null in a wider output), the time as its
    integer (the oracle's rows are Python objects)."""
    table = table.set_column(
        table.schema.get_field_index("time"), "time", table.column("time").cast(pa.int64())
    )
    return Counter(
        tuple(sorted((k, repr(v)) for k, v in row.items() if v is not None or k[:2] != "l_"))
        for row in table.to_pylist()
    )


# -- text that is not UTF-8 ------------------------------------------------------------------


def not_utf8(values: list[bytes]) -> pa.Array:
    """A utf8 array holding bytes that are not UTF-8, as a torn or foreign writer leaves them
    (pyarrow checks nothing when it reads a parquet page)."""
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.utf8(), len(raw), raw.buffers())


@pytest.mark.parametrize("column", ["l_container_name", "metric_name", "run_id"])
def test_a_file_whose_text_is_not_utf8_is_reported_and_blocks_nothing(
    data_dir: Path, column: str
) -> None:
    """The merge decodes metric names and label sets to Python strings, and a byte that is not
    UTF-8 raised UnicodeDecodeError there, which no check took for a bad source: every merge
    of the partition rolled back as an unexpected failure, the file was never reported, and
    its neighbours were never merged."""
    generate(data_dir, small_spec(rotations=4))
    folder = data_dir / "dt=2025-12-30/identifier=pod-a"
    bad = sorted(folder.glob("metrics-*.parquet"))[-1]
    stat = bad.stat()
    table = pq.read_table(bad)
    index = table.schema.get_field_index(column)
    values = [v.encode() for v in table.column(column).to_pylist()]
    values[1] = b"\xff\xfe" + values[1]
    table = table.set_column(index, table.field(index), not_utf8(values))
    pq.write_table(table, bad, compression="zstd")
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    bad_bytes = bad.read_bytes()
    good = [path for path in sorted(folder.glob("metrics-*.parquet")) if path != bad]
    expected = sum((rows_with_raw_time(pq.read_table(path)) for path in good), Counter())

    run_once(data_dir)  # the merge that meets the file reports it
    assert unreadable_names(data_dir) == [bad.name]
    assert run_once(data_dir) == 0  # the next one goes without it
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 2), bad.name]
    assert rows_with_raw_time(pq.read_table(folder / consolidated_name(0, 2))) == expected
    assert bad.read_bytes() == bad_bytes
    assert tmp_files(data_dir) == []


# -- a lineage that is not ours ----------------------------------------------------------------


@pytest.mark.parametrize(
    "lineage",
    [
        b'{"merge_id":1,"rows":1,"sources":[{"name":"metrics-x.parquet","rows":Infinity}]}',
        b"[" * 100_000,  # RecursionError in json.loads, which failed the partition each pass
    ],
    ids=["infinite-rows", "nested-deep"],
)
def test_a_lineage_counting_infinite_rows_is_no_lineage(data_dir: Path, lineage: bytes) -> None:
    """JSON reads `Infinity` as a float, and `int()` of it raised OverflowError, which the
    decoder did not take for a lineage that is not ours: one file named like an output with
    such metadata stopped every start-up recovery and every pass, for the whole directory."""
    generate(data_dir, small_spec(rotations=3))
    folder = data_dir / "dt=2025-12-30/identifier=pod-a"
    foreign = folder / "consolidated-20251230T070000Z-20251230T071000Z.parquet"
    table = pq.read_table(sorted(folder.glob("metrics-*.parquet"))[0])
    pq.write_table(table.replace_schema_metadata({b"fgm_consolidator.lineage": lineage}), foreign)
    os.utime(foreign, (0, 0))
    expected = expected_rows(data_dir)

    assert run_once(data_dir) == 0
    recover_in_process(data_dir)
    assert [p.name for p in data_files(data_dir)] == [foreign.name, consolidated_name(0, 2)]
    assert check_rows_only(data_dir, expected) == []


def check_rows_only(data_dir: Path, expected: Counter[Any]) -> list[str]:
    """The oracle's loss and duplicate conditions, without its journal conditions (a foreign
    consolidated file is, by design, one no finished merge accounts for)."""
    report = OracleReport()
    check_rows(read_live(data_dir, report, set()), expected, report)
    return report.violations


def test_an_output_whose_lineage_lists_itself_is_neither_deleted_nor_its_own_rival(
    data_dir: Path, tmp_path: Path
) -> None:
    """Lineage recovery removes a file that an output provably holds. An output whose lineage
    named the output itself (renamed by hand to a name it lists, say) was proven to hold its
    own rows, and removed: the only copy of them. Merged with its neighbours, it must not be
    taken for a rival holding its own rows either (the merge would be withdrawn every pass),
    nor, with the journal lost, for a second output listing the same file."""
    generate(data_dir, small_spec(rotations=3))
    folder = data_dir / "dt=2025-12-30/identifier=pod-a"
    renamed = folder / "consolidated-20251230T080010Z-20251230T080020Z.parquet"
    table = pq.read_table(sorted(folder.glob("metrics-*.parquet"))[0])
    rows = table.num_rows
    lineage = json.dumps(
        {"merge_id": 1, "rows": rows, "sources": [{"name": renamed.name, "rows": rows}]}
    )
    pq.write_table(
        table.replace_schema_metadata({b"fgm_consolidator.lineage": lineage.encode()}), renamed
    )
    os.utime(renamed, (0, 0))
    expected = expected_rows(data_dir)

    recover_in_process(data_dir)
    assert renamed.exists()
    kept = tmp_path / "sources"
    shutil.copytree(folder, kept)
    assert run_once(data_dir) == 0
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 2)]
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        assert [record.state for record in journal.history()] == [MergeState.SOURCES_DELETED]
    finally:
        journal.close()
    assert check(data_dir, expected).violations == []
    # A kill between the rename and the deletes, the journal lost: the output holds them all.
    sources_back_and_journal_lost(data_dir, kept, folder)
    recover_in_process(data_dir)
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 2)]
    assert check_rows_only(data_dir, expected) == []


@pytest.mark.parametrize(
    ("column", "merged", "present"),
    [("value_float", 0.0, -0.0), ("value_int", 0, 2**61 - 1)],
)
def test_lineage_recovery_keeps_a_file_whose_values_only_hash_like_the_outputs(
    data_dir: Path, tmp_path: Path, column: str, merged: Any, present: Any
) -> None:
    """The proof that an output holds a file's rows compared Python hashes of the rows, and
    Python hashes 0.0 like -0.0 and 0 like 2**61 - 1: a file at a listed name whose value
    differed only so was proven held, and removed, and its value was nowhere any more."""
    generate(data_dir, small_spec(rotations=2))
    folder = data_dir / "dt=2025-12-30/identifier=pod-a"
    source = sorted(folder.glob("metrics-*.parquet"))[0]
    set_first_value(source, column, merged)
    kept = tmp_path / "sources"
    shutil.copytree(folder, kept)
    assert run_once(data_dir) == 0
    output = folder / consolidated_name(0, 1)
    assert [p.name for p in data_files(data_dir)] == [output.name]
    # A lost journal, and at a name the output lists, a file differing in that one value.
    shutil.copy2(kept / source.name, source)
    set_first_value(source, column, present)
    for path in default_journal_path(data_dir).parent.glob("journal.db*"):
        path.unlink()

    recover_in_process(data_dir)
    assert source.exists()
    assert pq.read_table(source).column(column)[0].as_py() == present


def set_first_value(path: Path, column: str, value: Any) -> None:
    stat = path.stat()
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    values = table.column(column).to_pylist()
    values[0] = value
    table = table.set_column(index, table.field(index), pa.array(values, table.field(index).type))
    pq.write_table(table, path, compression="zstd")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
