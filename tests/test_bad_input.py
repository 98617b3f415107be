"""Bad files never cost a row and never stall their partition (invariant 4).

A file the consolidator cannot read completely stays byte-identical where it was, is reported
once (journal `unreadable` table, a `file-unreadable` log event, `history`), and the good files
around it are consolidated on this pass and on every later one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import (
    complaints,
    consolidated_name,
    data_files,
    metrics_name,
    old_journal,
    rows_duckdb,
    rows_pyarrow,
    run_as,
    run_cli,
    small_spec,
    tmp_files,
)

from fgm_consolidator import companions, merge, scan, service
from fgm_consolidator.cli import main
from fgm_consolidator.journal import Journal, UnreadableRecord
from fgm_consolidator.layout import MONITOR_ROTATION_S, default_journal_path
from fgm_consolidator.logs import FIELDS
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import PassReport, Settings, StopFlag, consolidation_pass
from fgm_consolidator.simulate import PodSpec, generate
from fgm_consolidator.states import MergeState

POD = "pod-a"
KEY = f"dt=2025-12-30/identifier={POD}"
LINEAGE = b"fgm_consolidator.lineage"

Event = tuple[str, dict[str, Any]]


def companion(path: Path) -> Path:
    return path.with_suffix(".containers")


@dataclass
class Node:
    """A data directory fed from a staging area, as a monitor would add files over time."""

    data_dir: Path
    staging: Path

    @property
    def folder(self) -> Path:
        return self.data_dir / KEY

    def staged(self, rotation: int) -> Path:
        return self.staging / KEY / metrics_name(rotation)

    def arrive(self, rotations: range) -> None:
        """Move files (and companions) in by rename: bytes and mtimes are the monitor's."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for rotation in rotations:
            source = self.staged(rotation)
            source.rename(self.folder / source.name)
            companion(source).rename(companion(self.folder / source.name))

    def path(self, rotation: int) -> Path:
        return self.folder / metrics_name(rotation)


@pytest.fixture
def node(data_dir: Path, tmp_path: Path) -> Node:
    staging = tmp_path / "staging"
    staging.mkdir()
    generate(staging, small_spec((PodSpec(POD),), rotations=30))  # 08:00:00 .. 08:43:30
    return Node(data_dir, staging)


@pytest.fixture
def events() -> Iterator[list[Event]]:
    """Every log event of the package, with its fields; independent of how logging is set up."""
    captured: list[Event] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append((record.getMessage(), dict(getattr(record, FIELDS, {}))))

    logger = logging.getLogger("fgm_consolidator")
    handler, level = Catch(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield captured
    logger.removeHandler(handler)
    logger.setLevel(level)


def named(events: list[Event], event: str) -> list[dict[str, Any]]:
    return [fields for name, fields in events if name == event]


def one_pass(data_dir: Path, **policy: Any) -> PassReport:
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_age_s=0, **policy))
    journal = Journal.open(settings.journal_path)
    try:
        return consolidation_pass(journal, settings, StopFlag(20))
    finally:
        journal.close()


def unreadable_records(data_dir: Path) -> list[tuple[str, str, int, int]]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return [(u.partition, u.name, u.size, u.mtime_ns) for u in journal.unreadable()]
    finally:
        journal.close()


def history_lines(data_dir: Path, kind: str) -> list[str]:
    result = CliRunner().invoke(main, ["history", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if line.startswith(f"kind={kind} ")]


def rows_of(paths: list[Path]) -> Counter[tuple[Any, ...]]:
    """Rows of exactly these (readable) files, independent of which `l_*` columns hold them."""
    rows: Counter[tuple[Any, ...]] = Counter()
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            rows[tuple(sorted((k, v) for k, v in row.items() if v is not None))] += 1
    return rows


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def lineage_names(path: Path) -> list[str]:
    metadata = pq.ParquetFile(path).metadata.metadata or {}
    return [s["name"] for s in json.loads(metadata[LINEAGE])["sources"]]


def consolidated_only_besides(data_dir: Path, *kept: Path) -> list[Path]:
    """The outputs, after checking every other data file has been consolidated."""
    files = data_files(data_dir)
    assert sorted(p for p in files if p.name.startswith("metrics-")) == sorted(kept)
    outputs = [p for p in files if p.name.startswith("consolidated-")]
    for output in outputs:
        assert not {p.name for p in kept} & set(lineage_names(output))
    assert tmp_files(data_dir) == []
    return outputs


def keep_mtime(path: Path, write: Callable[[Path], None]) -> None:
    st = path.stat()
    write(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def not_parquet(path: Path) -> None:
    path.write_bytes(b"run_id,time,metric_name\nthis is a CSV export, not parquet\n")


def a_column_name_not_utf8(path: Path) -> None:
    """One byte of a column's name in the footer made 0xFF: pyarrow raises UnicodeDecodeError,
    no error of its own, as it opens the file. That escaped as an unexpected error that named
    no file and failed the whole partition at every pass."""
    data = bytearray(path.read_bytes())
    footer_at = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[data.index(b"fetch_index", footer_at)] = 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": truncate_half,
    "zero-byte": zero_bytes,
    "not-parquet": not_parquet,
    "name-not-utf8": a_column_name_not_utf8,
}


@pytest.mark.parametrize(
    ("kind", "bad"),
    [("truncated", 0), ("zero-byte", 10), ("not-parquet", 20), ("name-not-utf8", 5)],
    ids=["truncated-first", "zero-byte-middle", "not-parquet-last", "name-not-utf8"],
)
def test_one_unreadable_file_among_twenty_good_ones(
    node: Node, events: list[Event], kind: str, bad: int
) -> None:
    node.arrive(range(21))
    path = node.path(bad)
    keep_mtime(path, CORRUPTIONS[kind])
    bad_print, bad_companion = fingerprint(path), fingerprint(companion(path))
    good = [node.path(i) for i in range(21) if i != bad]
    expected = rows_of(good)

    report = one_pass(node.data_dir)

    assert [(key, u.name) for key, u in report.unreadable] == [(KEY, path.name)]
    assert report.failed == [] and len(report.merges) >= 1
    assert fingerprint(path) == bad_print
    assert fingerprint(companion(path)) == bad_companion
    outputs = consolidated_only_besides(node.data_dir, path)
    assert rows_of(outputs) == expected
    st = path.stat()
    assert unreadable_records(node.data_dir) == [(KEY, path.name, st.st_size, st.st_mtime_ns)]
    reported = named(events, "file-unreadable")
    assert [(e["partition"], e["file"]) for e in reported] == [(KEY, path.name)]

    # Later passes: not reported again, and new files still get consolidated.
    events.clear()
    expected += rows_of([node.staged(i) for i in range(21, 25)])
    node.arrive(range(21, 25))
    report = one_pass(node.data_dir)

    assert report.unreadable == [] and report.failed == [] and len(report.merges) >= 1
    assert named(events, "file-unreadable") == []
    assert fingerprint(path) == bad_print
    outputs = consolidated_only_besides(node.data_dir, path)
    assert rows_of(outputs) == expected
    assert len(unreadable_records(node.data_dir)) == 1
    [line] = history_lines(node.data_dir, "unreadable")
    assert f'partition="{KEY}" file={path.name} size={st.st_size} ' in line


def test_the_cli_reports_an_unreadable_file_once_and_moves_on(node: Node) -> None:
    node.arrive(range(12))
    path = node.path(5)
    keep_mtime(path, truncate_half)
    bad_print = fingerprint(path)
    expected = rows_of([node.path(i) for i in range(12) if i != 5])
    run = ("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")

    first = run_cli(*run)

    assert first.returncode == 0, first.stderr
    [line] = [x for x in first.stderr.splitlines() if "event=file-unreadable" in x]
    assert "level=warning" in line and f"file={path.name}" in line
    assert f'partition="{KEY}"' in line
    assert fingerprint(path) == bad_print
    assert rows_of(consolidated_only_besides(node.data_dir, path)) == expected

    expected += rows_of([node.staged(i) for i in range(12, 20)])
    node.arrive(range(12, 20))
    second = run_cli(*run)

    assert second.returncode == 0, second.stderr
    assert "file-unreadable" not in second.stderr
    assert complaints(second.stderr) == []
    assert second.stderr.count("event=merge-finished") >= 1
    assert fingerprint(path) == bad_print
    assert rows_of(consolidated_only_besides(node.data_dir, path)) == expected
    history = run_cli("history", "--data-dir", str(node.data_dir))
    assert history.returncode == 0, history.stderr
    unreadable = [x for x in history.stdout.splitlines() if x.startswith("kind=unreadable ")]
    assert len(unreadable) == 1 and f"file={path.name}" in unreadable[0]


def test_names_shaped_like_the_monitors_but_with_no_real_date_are_left_alone(
    node: Node,
) -> None:
    """A file `metrics-<month 13>.parquet`, or a folder `dt=<month 13>`, once stopped every
    pass with a traceback. They are not names the monitor writes: untouched, like any other."""
    node.arrive(range(12))
    expected = rows_of([node.path(i) for i in range(12)])
    odd_file = node.folder / "metrics-20251399T080000Z.parquet"
    shutil.copy2(node.path(0), odd_file)
    odd_folder = node.data_dir / "dt=2025-13-45" / "identifier=pod"
    odd_folder.mkdir(parents=True)
    odd_in_folder = odd_folder / node.path(1).name
    shutil.copy2(node.path(1), odd_in_folder)
    prints = {path: fingerprint(path) for path in (odd_file, odd_in_folder)}

    result = run_cli("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "level=error" not in result.stderr
    assert result.stderr.count("event=merge-finished") >= 1
    assert {path: fingerprint(path) for path in prints} == prints
    # not data files to anything of ours, so the good ones are all consolidated around them
    assert rows_of(consolidated_only_besides(node.data_dir)) == expected
    history = run_cli(
        "history", "--data-dir", str(node.data_dir), "--partition", "dt=2025-13-45/identifier=pod"
    )
    assert history.returncode == 2
    assert "with a real date" in history.stderr


def test_files_not_ours_anywhere_in_the_data_directory_are_never_touched(node: Node) -> None:
    """FORMATS: `session.json` and `index.json` are the monitor's; the viewer reads every
    `.parquet` name it cannot parse; the monitor writes `<name>.containers.tmp` before its
    rename. Cleanup deletes only names it parses as its own (STYLE 2): a run and a recover
    leave every such file byte- and mtime-identical, and merge the monitor's files around them."""
    node.arrive(range(12))
    expected = rows_of([node.path(i) for i in range(12)])
    day = node.data_dir / KEY.split("/")[0]
    foreign = {
        node.data_dir / "session.json": b'{"run_id": "x"}',
        node.data_dir / "index.json": b"{}",
        day / "notes.txt": b"not a partition",
        node.folder / "README": b"a person's note",
        node.folder / (metrics_name(3) + ".bak"): node.path(3).read_bytes(),
        node.folder / "custom-export.parquet": node.path(4).read_bytes(),
        node.folder / "consolidated-20251230T080000Z.parquet": node.path(5).read_bytes(),
        node.folder / (companion(node.path(11)).name + ".tmp"): b"half a companion",
        node.folder / "consolidated-20251230T080000Z-20251230T0900Z.parquet.tmp": b"not ours",
        # a trailing newline: `$` matched before it, and such copies were merged and deleted
        node.folder / (metrics_name(6) + "\n"): node.path(6).read_bytes(),
        node.folder / "consolidated-20251230T080000Z-20251230T090000Z.parquet.tmp\n": b"x",
    }
    for path, data in foreign.items():
        path.write_bytes(data)
    prints = {path: fingerprint(path) for path in foreign}

    for command in ("run", "recover"):
        args = [command, "--data-dir", str(node.data_dir)]
        result = run_cli(*args, *(("--once", "--min-age", "0") if command == "run" else ()))
        assert result.returncode == 0, result.stderr
        assert {path: fingerprint(path) for path in prints} == prints
    outputs = [p for p in data_files(node.data_dir) if p.name.startswith("consolidated-")]
    assert outputs and not any(p.name.startswith("metrics-") for p in data_files(node.data_dir))
    assert rows_of(outputs) == expected


def test_a_file_with_a_future_mtime_is_left_alone_until_its_time_comes(
    node: Node, events: list[Event]
) -> None:
    """A monitor clock ahead of ours: the file may still be written, so it waits, untouched."""
    node.arrive(range(21))
    path = node.path(10)
    original = path.stat()
    tomorrow = time.time() + 86_400
    os.utime(path, (tomorrow, tomorrow))
    future_print = fingerprint(path)
    expected = rows_of([node.path(i) for i in range(21)])

    report = one_pass(node.data_dir)

    assert report.failed == [] and report.unreadable == [] and len(report.merges) >= 1
    assert fingerprint(path) == future_print
    assert companion(path).exists()
    outputs = consolidated_only_besides(node.data_dir, path)
    assert rows_of([*outputs, path]) == expected
    assert unreadable_records(node.data_dir) == []
    assert named(events, "file-unreadable") == []

    # Our clock catches up: the file joins its window, and the closed day converges to one file.
    os.utime(path, ns=(original.st_atime_ns, original.st_mtime_ns))
    report = one_pass(node.data_dir)

    assert report.failed == [] and report.skipped == []
    assert data_files(node.data_dir) == [node.folder / consolidated_name(0, 20)]
    assert rows_of(data_files(node.data_dir)) == expected
    assert named(events, "merge-skipped") == []


def test_a_file_with_a_future_mtime_left_unchanged_for_a_rotation_is_merged(
    node: Node, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our clock stepped back, and stays back: the file is done, for the service has seen it
    unchanged for longer than a monitor writes one. It used to wait for the clock to catch up
    (a year, for an RTC a year off at boot), a barrier in its window all along."""
    monotonic = [1000.0]
    monkeypatch.setattr(scan.time, "monotonic", lambda: monotonic[0])
    monkeypatch.setattr(scan, "_ahead", {})
    node.arrive(range(21))
    path = node.path(10)
    tomorrow = time.time() + 86_400
    os.utime(path, (tomorrow, tomorrow))
    expected = rows_of([node.path(i) for i in range(21)])

    one_pass(node.data_dir)
    assert path.exists()  # first seen: it may still be written
    assert len(named(events, "mtime-ahead")) == 1
    monotonic[0] += MONITOR_ROTATION_S + 1  # a rotation later, as it was
    one_pass(node.data_dir)

    assert data_files(node.data_dir) == [node.folder / consolidated_name(0, 20)]
    assert rows_of(data_files(node.data_dir)) == expected
    assert len(named(events, "mtime-ahead")) == 1  # once per version


def test_a_file_that_appears_during_a_pass_is_neither_deleted_nor_lost(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.arrive(range(20))
    newcomer = node.path(20)
    staged_print = fingerprint(node.staged(20)), fingerprint(companion(node.staged(20)))
    expected = rows_of([node.path(i) for i in range(20)] + [node.staged(20)])
    real = merge.write_merged
    calls: list[str] = []

    def write_merged(*args: Any, **kwargs: Any) -> Any:
        """The monitor rotates while the merge is being written (after the scan)."""
        if not calls:
            node.arrive(range(20, 21))
        calls.append(str(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "write_merged", write_merged)
    report = one_pass(node.data_dir)

    assert len(calls) == 1 and report.failed == []
    assert [m.output for m in report.merges] == [consolidated_name(0, 19)]
    assert (fingerprint(newcomer), fingerprint(companion(newcomer))) == staged_print
    outputs = consolidated_only_besides(node.data_dir, newcomer)
    assert rows_of([*outputs, newcomer]) == expected

    monkeypatch.setattr(merge, "write_merged", real)
    report = one_pass(node.data_dir)

    assert report.failed == []
    assert data_files(node.data_dir) == [node.folder / consolidated_name(0, 20)]
    assert rows_of(data_files(node.data_dir)) == expected
    assert sorted(os.listdir(node.folder)) == sorted(
        [consolidated_name(0, 20), companion(Path(consolidated_name(0, 20))).name]
    )


def zero_column_chunk(path: Path, column: str) -> None:
    """Overwrite one column chunk's pages with zeros; the footer still reads."""
    group = pq.read_metadata(path).row_group(0)
    [chunk] = [
        group.column(i)
        for i in range(group.num_columns)
        if group.column(i).path_in_schema == column
    ]
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
    path.write_bytes(bytes(data))


def test_corrupt_pages_behind_a_good_footer_roll_the_merge_back(
    node: Node, events: list[Event]
) -> None:
    node.arrive(range(24))  # quarter-hour windows: 0..9, 10..19, 20..23
    path = node.path(12)
    keep_mtime(path, lambda p: zero_column_chunk(p, "metric_name"))
    assert pq.read_metadata(path).num_rows == 90  # the footer reads: the scan finds it eligible
    with pytest.raises(OSError):
        pq.read_table(path)
    window = [node.path(i) for i in range(10, 20)]
    prints = {p.name: (fingerprint(p), fingerprint(companion(p))) for p in window}
    expected = rows_of([node.path(i) for i in range(24) if i != 12])

    report = one_pass(node.data_dir, max_span_s=900)

    states = {m.output: m.state for m in report.merges}
    assert states == {
        consolidated_name(0, 9): MergeState.SOURCES_DELETED,
        consolidated_name(10, 19): MergeState.ROLLED_BACK,
        consolidated_name(20, 23): MergeState.SOURCES_DELETED,
    }
    [failed] = report.failed
    assert failed.error is not None and path.name in failed.error
    # counted with the scan's unreadable files: the pass's summary said unreadable=0
    assert [(key, bad.name) for key, bad in report.unreadable] == [(KEY, path.name)]
    assert {p.name: (fingerprint(p), fingerprint(companion(p))) for p in window} == prints
    assert not (node.folder / consolidated_name(10, 19)).exists()
    assert not companion(node.folder / consolidated_name(10, 19)).exists()
    assert tmp_files(node.data_dir) == []
    st = path.stat()
    assert unreadable_records(node.data_dir) == [(KEY, path.name, st.st_size, st.st_mtime_ns)]
    assert [(e["partition"], e["file"]) for e in named(events, "file-unreadable")] == [
        (KEY, path.name)
    ]
    assert [e["output"] for e in named(events, "merge-failed")] == [consolidated_name(10, 19)]

    # The next pass consolidates the window without it, and says nothing new about it.
    events.clear()
    report = one_pass(node.data_dir, max_span_s=900)

    assert report.failed == [] and report.unreadable == [] and len(report.merges) >= 1
    assert named(events, "file-unreadable") == []
    outputs = consolidated_only_besides(node.data_dir, path)
    assert rows_of(outputs) == expected
    assert fingerprint(path) == prints[path.name][0]
    assert fingerprint(companion(path)) == prints[path.name][1]
    assert len(unreadable_records(node.data_dir)) == 1
    [line] = history_lines(node.data_dir, "unreadable")
    assert f"file={path.name}" in line

    # A third pass over the closed day has nothing left to do.
    report = one_pass(node.data_dir, max_span_s=900)
    assert report.merges == [] and report.skipped == []


def test_a_file_unreadable_for_its_mode_is_merged_once_chmod_fixes_it(
    node: Node, unprivileged: list[str]
) -> None:
    """The journal knew an unreadable file by its size and mtime, which `chmod` leaves alone:
    a file once unreadable for its mode was left out of every merge after it was fixed."""
    node.arrive(range(12))
    expected = rows_of([node.path(i) for i in range(12)])
    locked = node.path(5)
    once = ("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")
    locked.chmod(0)
    try:
        first = run_as(unprivileged, *once)
    finally:
        locked.chmod(0o644)

    assert first.returncode == 0, first.stderr
    [line] = [x for x in first.stderr.splitlines() if "event=file-unreadable" in x]
    assert locked.name in line and "Permission denied" in line
    st = locked.stat()
    assert unreadable_records(node.data_dir) == [(KEY, locked.name, st.st_size, st.st_mtime_ns)]
    assert consolidated_only_besides(node.data_dir, locked)  # the others did not wait for it

    second = run_as(unprivileged, *once)

    assert second.returncode == 0, second.stderr
    assert "file-unreadable" not in second.stderr
    assert rows_of(consolidated_only_besides(node.data_dir)) == expected
    [kept] = history_lines(node.data_dir, "unreadable")  # the record of what happened stays
    assert f"file={locked.name}" in kept


def test_rows_from_before_ctime_was_kept_hold_until_their_file_changes(
    node: Node, events: list[Event]
) -> None:
    """A journal from before migration 3 has no ctime in its unreadable rows. Such a row holds
    while its file's ctime is no later than when it was first seen: a broken file nobody
    touched is neither read nor reported again; one chmod-ed since is looked at again."""
    node.arrive(range(12))
    broken, fixed = node.path(3), node.path(8)
    keep_mtime(broken, zero_bytes)
    fixed.chmod(0o640)  # what a person did after the old release found it unreadable
    expected = rows_of([node.path(i) for i in range(12) if i != 3])
    old_journal(default_journal_path(node.data_dir), 2)

    def legacy_row(path: Path, first_seen_after_ctime_s: float) -> tuple[object, ...]:
        st = path.stat()
        seen = datetime.fromtimestamp(st.st_ctime_ns / 1e9 + first_seen_after_ctime_s, UTC)
        iso = seen.isoformat(timespec="milliseconds")
        return (KEY, path.name, st.st_size, st.st_mtime_ns, "Permission denied", iso)

    with sqlite3.connect(default_journal_path(node.data_dir)) as conn:
        conn.executemany(
            "INSERT INTO unreadable (partition, name, size, mtime_ns, reason, first_seen)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [legacy_row(broken, 1.0), legacy_row(fixed, -3600.0)],
        )
    conn.close()

    report = one_pass(node.data_dir)  # migrates the journal, then works as usual

    assert report.unreadable == [] and named(events, "file-unreadable") == []
    assert rows_of(consolidated_only_besides(node.data_dir, broken)) == expected
    assert {name for _, name, _, _ in unreadable_records(node.data_dir)} == {
        broken.name,
        fixed.name,
    }


def int_pod_names(path: Path) -> None:
    """What a monitor bug could write: `l_pod_name` as Int64 instead of Utf8."""
    table = pq.read_table(path)
    index = table.schema.get_field_index("l_pod_name")
    numbers = pa.array([1000 + i for i in range(table.num_rows)], pa.int64())
    table = table.set_column(index, pa.field("l_pod_name", pa.int64()), numbers)
    pq.write_table(table, path, compression="zstd")


def test_a_label_type_conflict_keeps_files_in_separate_outputs(node: Node) -> None:
    node.arrive(range(8))
    for rotation in (3, 4):
        keep_mtime(node.path(rotation), int_pod_names)
    expected = rows_pyarrow(node.data_dir)
    assert rows_duckdb(node.data_dir) == expected

    report = one_pass(node.data_dir)

    assert report.failed == [] and report.unreadable == []
    groups = {consolidated_name(0, 2): 0, consolidated_name(3, 4): 3, consolidated_name(5, 7): 5}
    assert sorted(m.output for m in report.merges) == sorted(groups)
    assert [p.name for p in data_files(node.data_dir)] == sorted(groups)
    for name, first in groups.items():
        output = node.folder / name
        pod_name = pq.read_schema(output).field("l_pod_name")
        assert pod_name.type == (pa.int64() if first == 3 else pa.utf8())
        assert pod_name.nullable
        last = {0: 2, 3: 4, 5: 7}[first]
        assert lineage_names(output) == [metrics_name(i) for i in range(first, last + 1)]
    assert rows_pyarrow(node.data_dir) == expected
    assert rows_duckdb(node.data_dir) == expected
    assert unreadable_records(node.data_dir) == []

    # They stay apart: a later pass neither merges them nor fails on them.
    report = one_pass(node.data_dir)
    assert report.merges == [] and report.skipped == []
    assert [p.name for p in data_files(node.data_dir)] == sorted(groups)


def test_a_file_kept_apart_by_its_schema_is_named_once_and_listed_by_a_dry_run(
    node: Node, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One file whose label column changed type among files that agree: it can join neither
    neighbour, so it is never merged and its window keeps two outputs beside it. Nothing said
    why: no log line, no dry-run line, `status` healthy. Found by a bad-input review
    (helper-44)."""
    monkeypatch.setattr(service, "_told_apart", set())  # as a service starts
    node.arrive(range(8))
    keep_mtime(node.path(3), int_pod_names)
    odd = metrics_name(3)

    for _ in range(2):  # the service names it once, not at every pass
        report = one_pass(node.data_dir)
        assert report.failed == []
    assert [p.name for p in data_files(node.data_dir)] == sorted(
        [consolidated_name(0, 2), odd, consolidated_name(4, 7)]
    )
    [told] = named(events, "file-kept-apart")
    assert (told["partition"], told["file"]) == (KEY, odd)
    assert told["reason"].startswith("its schema keeps it from the files beside it: label column")

    proc = run_cli("run", "--dry-run", "--data-dir", str(node.data_dir), "--min-age", "0")
    assert proc.returncode == 0, proc.stderr
    assert f'kind=apart partition="{KEY}" file={odd} reason=' in proc.stdout, proc.stdout


def aged(path: Path) -> Path:
    """An mtime (of the name itself) well past --min-age, as the monitor's old files have."""
    os.utime(path, ns=(0, int((time.time() - 86_400) * 1e9)), follow_symlinks=False)
    return path


def name_identity(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_ino, st.st_mode, st.st_mtime_ns


def test_links_fifos_and_folders_named_like_data_files_are_left_alone(
    node: Node, tmp_path: Path
) -> None:
    """Only regular files are data files. A FIFO once hung every pass in `open` (SIGTERM could
    not stop it); a link was merged and then only the link deleted, so its rows existed twice;
    a link loop failed the whole partition on every pass."""
    node.arrive(range(12))
    expected = rows_of([node.path(i) for i in range(12)])
    outside = tmp_path / "outside" / metrics_name(20)
    outside.parent.mkdir()
    shutil.copy2(node.staged(20), outside)
    folder = node.folder
    odd = [
        folder / metrics_name(12),  # a FIFO
        folder / metrics_name(13),  # a link to a good file outside the data directory
        folder / metrics_name(14),  # a link to a sibling
        folder / metrics_name(15),  # a link to itself
        folder / metrics_name(16),  # a folder
        folder / consolidated_name(17, 18),  # a FIFO where an output of ours could be
        folder / (consolidated_name(19, 20) + ".tmp"),  # a FIFO named like our temp file
    ]
    os.mkfifo(odd[0])
    odd[1].symlink_to(outside)
    odd[2].symlink_to(node.path(0).name)
    odd[3].symlink_to(odd[3].name)
    odd[4].mkdir()
    os.mkfifo(odd[5])
    os.mkfifo(odd[6])
    before = {path: name_identity(aged(path)) for path in odd}
    outside_print = fingerprint(outside)

    result = run_cli("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")
    status = run_cli("status", "--data-dir", str(node.data_dir), timeout=60)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "partition-failed" not in result.stderr
    assert {path: name_identity(path) for path in odd} == before
    assert fingerprint(outside) == outside_print
    reported = [line for line in result.stderr.splitlines() if "not a regular file" in line]
    assert len(reported) >= 5, result.stderr  # four links and the FIFO, each once
    outputs = [p for p in data_files(node.data_dir) if p.name.startswith("consolidated-")]
    merged = [p for p in outputs if p.is_file() and not p.is_symlink()]
    assert rows_of(merged) == expected  # every row once: no link was merged
    assert status.returncode in (0, 3), status.stderr  # it answered, and did not hang


def tree_prints(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): fingerprint(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_symlinked_partition_folders_are_not_followed(node: Node, tmp_path: Path) -> None:
    """A `dt=` or `identifier=` folder that is a symbolic link was walked like any other, so
    files outside --data-dir were merged, and deleted from there."""
    node.arrive(range(12))
    expected = rows_of([node.path(i) for i in range(12)])
    outside = tmp_path / "outside"
    for folder, rotations in (("pod", range(12, 24)), ("day/identifier=pod-y", range(24, 30))):
        (outside / folder).mkdir(parents=True)
        for rotation in rotations:
            for path in (node.staged(rotation), companion(node.staged(rotation))):
                shutil.copy2(path, outside / folder / path.name)
    links = [
        node.data_dir / "dt=2025-12-30" / "identifier=linked",
        node.data_dir / "dt=2025-12-31",
    ]
    links[0].symlink_to(outside / "pod", target_is_directory=True)
    links[1].symlink_to(outside / "day", target_is_directory=True)
    before = tree_prints(outside)

    result = run_cli("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")

    assert result.returncode == 0, result.stderr
    assert tree_prints(outside) == before
    skipped = [x for x in result.stderr.splitlines() if "event=partition-skipped" in x]
    assert len(skipped) == 2, result.stderr  # once each per pass (not again by recovery)
    for link, line in zip(links, sorted(skipped), strict=True):
        assert f'path="{link}"' in line and "symbolic link" in line, line
    assert rows_of(consolidated_only_besides(node.data_dir)) == expected
    data = ["--data-dir", str(node.data_dir)]
    status = run_cli("status", *data, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr  # left alone is not unhealthy
    listed = sorted(x for x in status.stdout.splitlines() if x.startswith("kind=skipped"))
    assert len(listed) == 2, status.stdout  # an operator sees why those pods are not merged
    for link, line in zip(links, listed, strict=True):
        assert f'path="{link}"' in line and "symbolic link" in line, line
    for command in (["recover", *data], ["history", *data]):
        proc = run_cli(*command, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "linked" not in proc.stdout and "2025-12-31" not in proc.stdout, proc.stdout
    assert tree_prints(outside) == before


def test_files_without_a_metric_name_to_sort_by_are_left_alone(node: Node) -> None:
    """Two neighbouring sources without `metric_name`, or with nulls in it, once stopped every
    pass with a traceback from inside the sort, and the service with it."""
    node.arrive(range(12))
    expected = rows_of([node.path(i) for i in (0, 1, 2, 3, 4, 5, 10, 11)])
    for rotation in (6, 7):
        keep_mtime(
            node.path(rotation), lambda p: pq.write_table(pq.read_table(p).drop(["metric_name"]), p)
        )
    for rotation in (8, 9):

        def null_first(path: Path) -> None:
            table = pq.read_table(path)
            names = table.column("metric_name").to_pylist()
            field = table.schema.field("metric_name").with_nullable(True)
            column = pa.array([None, *names[1:]], pa.utf8())
            index = table.schema.get_field_index("metric_name")
            pq.write_table(table.set_column(index, field, column), path)

        keep_mtime(node.path(rotation), null_first)
    odd = [node.path(i) for i in (6, 7, 8, 9)]
    prints = {path: fingerprint(path) for path in odd}

    first = run_cli("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")
    second = run_cli("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")

    for result in (first, second):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    assert first.stderr.count("cannot be merged: no metric_name column") == 2
    assert "rows without a metric_name" in first.stderr + second.stderr
    assert {path: fingerprint(path) for path in odd} == prints
    assert rows_of(consolidated_only_besides(node.data_dir, *odd)) == expected


def test_a_partition_folder_whose_name_is_not_utf8_is_left_alone(node: Node) -> None:
    """Its name could not go into the journal: it once stopped the pass, and the partitions
    after it were never consolidated."""
    node.arrive(range(12))
    expected = rows_of([node.path(i) for i in range(12)])
    odd = os.fsencode(node.data_dir / "dt=2025-12-30") + b"/identifier=bad\xffname"
    os.makedirs(odd)
    shutil.copy2(node.path(0), os.path.join(odd, os.fsencode(node.path(0).name)))

    result = run_cli("run", "--once", "--data-dir", str(node.data_dir), "--min-age", "0")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert rows_of(consolidated_only_besides(node.data_dir)) == expected
    assert os.path.exists(os.path.join(odd, os.fsencode(node.path(0).name)))


@pytest.mark.parametrize("fix", ["replaced", "deleted"])
def test_a_file_held_out_for_its_companion_comes_back_once_the_companion_changes(
    node: Node, events: list[Event], fix: str
) -> None:
    """A corrupt companion was recorded as its parquet file's fault, under the parquet file's
    version: replacing or deleting the companion (the fix) changes nothing about the parquet
    file, so it stayed out of every merge forever, reported with a reason naming no companion."""
    node.arrive(range(24))  # quarter-hour windows: 0..9, 10..19, 20..23
    path = node.path(12)
    good_companion = companion(path).read_bytes()
    companion(path).write_bytes(b"\x02" + bytes(3))  # torn: a power cut after the rename
    expected = rows_of([node.path(i) for i in range(24)])

    first = one_pass(node.data_dir, max_span_s=900)
    second = one_pass(node.data_dir, max_span_s=900)

    assert [e["file"] for e in named(events, "file-unreadable")] == [companion(path).name]
    [record] = _records(node.data_dir)
    assert record.name == companion(path).name and record.reason.startswith("truncated at byte")
    assert len(first.failed) == 1 and second.failed == []  # held out, not retried every pass
    assert path.exists() and not node.path(11).exists()

    if fix == "replaced":
        companion(path).write_bytes(good_companion)
    else:
        companion(path).unlink()
    report = one_pass(node.data_dir, max_span_s=900)

    assert report.failed == [] and report.merges
    assert rows_of(consolidated_only_besides(node.data_dir)) == expected


def _records(data_dir: Path) -> list[UnreadableRecord]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return journal.unreadable()
    finally:
        journal.close()


@pytest.mark.parametrize("change", ["arrives", "replaced"])
def test_a_companion_that_changes_while_its_file_is_merged_is_neither_orphaned_nor_dropped(
    node: Node, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The monitor writes a file's companion after the file (and rewrites it by rename). One
    that arrived or was replaced after planning was left out of the output's companion, and
    left behind for good beside no parquet file, its containers gone from the viewer's list."""
    node.arrive(range(12))
    late = companion(node.path(11))
    content = late.read_bytes()
    if change == "arrives":
        late.unlink()
    real_write = merge.write_merged

    def monitor_writes_companion(*args: Any, **kwargs: Any) -> Any:
        fresh = late.with_name(late.name + ".tmp")
        fresh.write_bytes(content)
        fresh.rename(late)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(merge, "write_merged", monitor_writes_companion)
    first = one_pass(node.data_dir)
    monkeypatch.setattr(merge, "write_merged", real_write)
    second = one_pass(node.data_dir)

    assert [m.state for m in first.merges] == [MergeState.ROLLED_BACK]
    assert first.merges[0].error is not None and late.name in first.merges[0].error
    assert [m.state for m in second.merges] == [MergeState.SOURCES_DELETED]
    [output] = consolidated_only_besides(node.data_dir)
    assert sorted(p.name for p in node.folder.iterdir()) == [companion(output).name, output.name]
    theirs = {c.container_id for c in companions.decode(content).containers}
    ours = {c.container_id for c in companions.read_companion(companion(output)).containers}
    assert theirs <= ours
