"""Retention: finished history older than the retention goes, the audit trail of anything
unfinished, flagged or still failing stays, the file shrinks, and `history` still works.

Times are set through the journal's clock (`journal.utc_now`), the one every recorded time
comes from.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import JournalClock as Clock
from conftest import install_journal_clock, run_cli

from fgm_consolidator import retention
from fgm_consolidator.durable import FileIdentity
from fgm_consolidator.journal import Journal, PassResult, SourceRecord
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.simulate import PodSpec, SimulationSummary
from fgm_consolidator.states import MergeState as S

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=45)
RECENT = NOW - timedelta(days=2)
PART = "dt=2026-01-15/identifier=pod-a"
OTHER = "dt=2026-01-15/identifier=pod-b"
FINISHED = [S.PLANNED, S.WRITING, S.WRITTEN, S.RENAMED, S.SOURCES_DELETED]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return install_journal_clock(monkeypatch, OLD)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal.open(tmp_path / "journal.db")
    yield opened
    opened.close()


def source(name: str) -> SourceRecord:
    return SourceRecord(name, FileIdentity(1, 100, 5), 10, "fp", None)


def add_merge(
    journal: Journal,
    clock: Clock,
    at: datetime,
    steps: list[S],
    sources: tuple[str, ...] = ("metrics-a.parquet", "metrics-b.parquet"),
    partition: str = PART,
) -> int:
    """A merge walked through `steps` (after planned), every transition at `at`."""
    clock.at = at
    merge_id = journal.record_planned(
        partition=partition, output=f"out-{at:%j%H%M%S}-{len(steps)}", era="flat",
        policy={}, sources=[source(n) for n in sources], has_companion=False,
    )  # fmt: skip
    for step in steps[1:]:
        if step is S.WRITTEN:
            journal.record_written(merge_id, rows=20, size=1, checksum="c")
        else:
            journal.transition(merge_id, step, actor="merge", error="why")
    return merge_id


def ids(journal: Journal) -> list[int]:
    return sorted(r.id for r in journal.history())


def rows_of(journal: Journal, table: str, merge_ids: list[int]) -> int:
    marks = ",".join("?" * len(merge_ids))
    column = "id" if table == "merges" else "merge_id"
    sql = f"SELECT count(*) FROM {table} WHERE {column} IN ({marks})"
    return int(journal.db.execute(sql, merge_ids).fetchone()[0])


def test_only_finished_history_older_than_the_retention_goes(
    journal: Journal, clock: Clock
) -> None:
    old_done = add_merge(journal, clock, OLD, FINISHED, ("m1", "m2"))
    # rolled back, and later merged for good: the failure is history
    old_retried = add_merge(journal, clock, OLD, [S.PLANNED, S.ROLLED_BACK], ("m3", "m4"))
    add_merge(journal, clock, OLD + timedelta(hours=1), FINISHED, ("m3", "m4"))
    retry_id = old_retried + 1
    # rolled back, one source never merged since: still the latest word on "m6"
    old_open_failure = add_merge(journal, clock, OLD, [S.PLANNED, S.ROLLED_BACK], ("m5", "m6"))
    add_merge(journal, clock, OLD + timedelta(hours=1), FINISHED, ("m5", "m7"))
    # the same source name in another partition does not count as a retry
    other_failure = add_merge(
        journal, clock, OLD, [S.PLANNED, S.ROLLED_BACK], ("m8",), partition=OTHER
    )
    add_merge(journal, clock, OLD + timedelta(hours=1), FINISHED, ("m8", "m9"))
    old_unfinished = add_merge(journal, clock, OLD, [S.PLANNED, S.WRITING], ("x1", "x2"))
    old_flagged = add_merge(
        journal, clock, OLD, [S.PLANNED, S.WRITING, S.WRITTEN, S.NEEDS_ATTENTION], ("y1", "y2")
    )
    old_resolved = add_merge(
        journal, clock, OLD,
        [S.PLANNED, S.WRITING, S.WRITTEN, S.NEEDS_ATTENTION, S.RENAMED, S.SOURCES_DELETED],
        ("z1", "z2"),
    )  # fmt: skip
    # planned long ago but finished recently: its age is its last transition's
    late = add_merge(journal, clock, OLD, [S.PLANNED, S.WRITING], ("w1", "w2"))
    clock.at = RECENT
    journal.record_written(late, rows=20, size=1, checksum="c")
    journal.transition(late, S.RENAMED, actor="recovery")
    journal.transition(late, S.SOURCES_DELETED, actor="recovery")
    recent_done = add_merge(journal, clock, RECENT, FINISHED, ("r1", "r2"))
    before = ids(journal)

    counts = journal.prune(cutoff=(NOW - timedelta(days=30)).isoformat(), at=NOW.isoformat())

    gone = [old_done, old_retried, retry_id, old_open_failure + 1, other_failure + 1]
    assert counts.merges == len(gone)
    assert ids(journal) == sorted(set(before) - set(gone))
    kept = {old_open_failure, other_failure, old_unfinished, old_flagged, old_resolved, late}
    assert kept | {recent_done} == set(ids(journal))
    for table in ("merges", "sources", "transitions"):
        assert rows_of(journal, table, gone) == 0, table
    # what stays is whole: every source and transition of it
    flagged = journal.merge(old_flagged)
    assert [t.state for t in flagged.transitions][-1] is S.NEEDS_ATTENTION
    assert [s.name for s in flagged.sources] == ["y1", "y2"]
    assert [r.id for r in journal.unfinished()] == [old_unfinished, old_flagged]


def test_the_newest_merge_stays_so_ids_are_never_reused(journal: Journal, clock: Clock) -> None:
    first = add_merge(journal, clock, OLD, FINISHED, ("a1", "a2"))
    newest = add_merge(journal, clock, OLD, FINISHED, ("b1", "b2"))
    assert journal.prune(cutoff=NOW.isoformat(), at=NOW.isoformat()).merges == 1
    assert ids(journal) == [newest]
    assert add_merge(journal, clock, NOW, FINISHED, ("c1", "c2")) == newest + 1 > first


def test_old_pass_records_go_except_the_newest_and_the_newest_success(
    journal: Journal, clock: Clock
) -> None:
    results = [PassResult.OK, PassResult.OK, PassResult.FAILED, PassResult.FAILED]
    for offset, result in enumerate(results, start=1):
        clock.at = OLD + timedelta(minutes=offset)
        assert journal.begin_pass({}) == offset
        journal.end_pass(offset, result)
    counts = journal.prune(cutoff=(NOW - timedelta(days=30)).isoformat(), at=NOW.isoformat())
    assert counts.passes == 2  # 1 (ok, not the newest ok) and 3; 4 is the newest
    left = [r[0] for r in journal.db.execute("SELECT id FROM passes ORDER BY id")]
    assert left == [2, 4]
    clock.at = RECENT
    running = journal.begin_pass({})
    assert journal.prune(cutoff=NOW.isoformat(), at=NOW.isoformat()).passes == 1  # 4
    left = [r[0] for r in journal.db.execute("SELECT id FROM passes ORDER BY id")]
    assert left == [2, running]  # a running pass is never pruned, nor the newest success
    success = journal.last_successful_pass()
    assert success is not None and success.id == 2


def test_a_prune_runs_at_most_once_a_day(journal: Journal, clock: Clock) -> None:
    add_merge(journal, clock, OLD, FINISHED, ("a1", "a2"))
    add_merge(journal, clock, OLD, FINISHED, ("b1", "b2"))
    tmp = journal.path.parent
    first = retention.prune_if_due(journal, 30, now=NOW, data_dir=tmp)
    assert first is not None and first.merges == 1
    add_merge(journal, clock, OLD, FINISHED, ("c1", "c2"))  # now prunable: b is not the newest
    assert retention.prune_if_due(journal, 30, now=NOW + timedelta(hours=23), data_dir=tmp) is None
    later = retention.prune_if_due(journal, 30, now=NOW + timedelta(hours=24), data_dir=tmp)
    assert later is not None and later.merges == 1
    recorded = journal.db.execute("SELECT at, merges FROM prunes ORDER BY id").fetchall()
    assert [m for _, m in recorded] == [1, 1]


def _bulk_finished_merges(path: Path, count: int, at: datetime) -> None:
    """`count` finished merges of 24 sources, in one transaction (as the bench does)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    stamp = at.isoformat(timespec="milliseconds")
    for merge_id in range(1, count + 1):
        conn.execute(
            "INSERT INTO merges VALUES (?, ?, ?, 'flat', '{}', 1, 1, 0, 1, 1, 'c', NULL)",
            (merge_id, PART, f"consolidated-{merge_id:08d}.parquet"),
        )
        conn.executemany(
            "INSERT INTO sources VALUES (?, ?, ?, 1, 2, 3, 4, 'fp', NULL, NULL, NULL)",
            [(merge_id, p, f"metrics-{merge_id:08d}-{p:02d}.parquet") for p in range(24)],
        )
        conn.executemany(
            "INSERT INTO transitions (merge_id, state, at, actor) VALUES (?, ?, ?, 'merge')",
            [(merge_id, str(state), stamp) for state in FINISHED],
        )
    conn.execute("COMMIT")
    conn.close()


def test_a_big_prune_is_compacted_and_the_wal_emptied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.db"
    Journal.open(path).close()
    _bulk_finished_merges(path, 2000, OLD)
    journal = Journal.open(path)
    try:
        journal.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = retention.journal_bytes(path)
        with caplog.at_level(logging.INFO, logger="fgm_consolidator"):
            report = retention.prune(journal, 30, NOW, data_dir=tmp_path)
        assert (report.merges, report.vacuumed, report.bytes_before) == (1999, True, before)
        assert report.bytes_after == retention.journal_bytes(path)
        assert report.bytes_after < before / 5
        assert path.with_name("journal.db-wal").stat().st_size == 0
        assert journal.free_fraction() == 0.0
        assert [r.id for r in journal.history()] == [2000]
        events = [r for r in caplog.records if r.getMessage() == "journal-pruned"]
        assert len(events) == 1
    finally:
        journal.close()


def test_a_small_prune_leaves_the_free_pages_for_reuse(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal.open(path).close()
    _bulk_finished_merges(path, 1000, NOW - timedelta(days=1))
    journal = Journal.open(path)
    try:
        journal.db.execute("UPDATE transitions SET at = ? WHERE merge_id <= 50", [OLD.isoformat()])
        report = retention.prune(journal, 30, NOW, data_dir=tmp_path)
        assert (report.merges, report.vacuumed) == (50, False)
        assert 0 < journal.free_fraction() < retention.VACUUM_ABOVE
        assert len(journal.history()) == 950
    finally:
        journal.close()


def test_the_service_prunes_after_a_pass_and_history_still_works(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    populate(PodSpec("pod-a"), start=datetime(2025, 12, 29, 8, tzinfo=UTC))
    populate(PodSpec("pod-b"), start=datetime(2025, 12, 30, 8, tzinfo=UTC))
    first = run_cli("run", "--data-dir", str(data_dir), "--once", "--log-level", "debug")
    assert first.returncode == 0, first.stderr
    # the first prune of a journal finds nothing old: recorded, logged at debug level only
    assert "level=debug event=journal-pruned" in first.stderr
    path = default_journal_path(data_dir)
    # Both merges finished 40 days ago, and so did the last prune.
    long_ago = (datetime.now(UTC) - timedelta(days=40)).isoformat(timespec="milliseconds")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE transitions SET at = ?", [long_ago])
        conn.execute("UPDATE prunes SET at = ?", [long_ago])
    conn.close()

    second = run_cli("run", "--data-dir", str(data_dir), "--once", "--log-level", "info")
    assert second.returncode == 0, second.stderr
    pruned = [line for line in second.stderr.splitlines() if "event=journal-pruned" in line]
    assert len(pruned) == 1 and " merges=1 " in pruned[0]  # the newest merge stays

    history = run_cli("history", "--data-dir", str(data_dir), "--json")
    assert history.returncode == 0, history.stderr
    rows = [json.loads(line) for line in history.stdout.splitlines()]
    assert [(r["id"], r["partition"], r["state"]) for r in rows] == [
        (2, "dt=2025-12-30/identifier=pod-b", "sources-deleted")
    ]
    # within a day of the last prune, the next pass does not prune again
    third = run_cli("run", "--data-dir", str(data_dir), "--once", "--log-level", "debug")
    assert third.returncode == 0, third.stderr
    assert "event=journal-pruned" not in third.stderr


def test_a_failing_prune_is_logged_and_does_not_stop_the_service(
    journal: Journal, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    add_merge(journal, clock, OLD, FINISHED)
    journal.db.execute("CREATE TRIGGER no_deletes BEFORE DELETE ON prunes BEGIN"
                       " SELECT RAISE(ABORT, 'disk says no'); END")  # fmt: skip
    journal.db.execute(
        "INSERT INTO prunes (at, cutoff, merges, passes) VALUES (?, '', 0, 0)", [OLD.isoformat()]
    )
    with caplog.at_level(logging.ERROR, logger="fgm_consolidator"):
        assert retention.prune_if_due(journal, 30, now=NOW, data_dir=journal.path.parent) is None
    failed = [r for r in caplog.records if r.getMessage() == "prune-failed"]
    assert len(failed) == 1
    assert len(journal.history()) == 1  # rolled back whole


@pytest.mark.parametrize("days", [1e6, 1e300])
def test_a_retention_longer_than_the_calendar_keeps_everything(
    journal: Journal, clock: Clock, days: float
) -> None:
    """`--history-retention-days 1000000` passed the option's range and then crashed the
    service after its first pass (OverflowError: date value out of range)."""
    add_merge(journal, clock, OLD, FINISHED, ("m1", "m2"))
    add_merge(journal, clock, OLD, FINISHED, ("m3", "m4"))
    report = retention.prune(journal, days, NOW, data_dir=journal.path.parent)
    assert (report.merges, report.passes) == (0, 0)
    assert len(journal.history()) == 2


def test_unreadable_records_go_once_their_file_is_gone_and_older_than_the_retention(
    tmp_path: Path, journal: Journal, clock: Clock
) -> None:
    """The table of unreadable files once kept a row for every file it ever listed, long
    after the monitor's retention (or a merge, once readable) had removed the file."""
    data_dir = tmp_path / "data"
    made = [(PART, "kept"), (PART, "deleted"), (PART, "replaced"), (PART, "recent"),
            (OTHER, "in-a-folder-removed")]  # fmt: skip
    for partition, name in made:
        path = data_dir / partition / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not parquet")
        clock.at = RECENT if name == "recent" else OLD
        st = path.stat()
        journal.record_unreadable(
            partition, name, FileIdentity.of(st), "bad", ctime_ns=st.st_ctime_ns
        )
    (data_dir / PART / "deleted").unlink()
    (data_dir / PART / "recent").unlink()
    (data_dir / PART / "replaced").write_bytes(b"other bytes under the same name")
    shutil.rmtree(data_dir / OTHER)

    def names() -> set[str]:
        return {r.name for r in journal.unreadable()}

    report = retention.prune(journal, 30, NOW, data_dir=data_dir)
    # a file still there keeps its row however old; a gone one's row stays for the retention
    assert names() == {"kept", "recent"}
    assert report.unreadable == 3
    (data_dir / PART / "kept").unlink()
    assert retention.prune(journal, 30, NOW + timedelta(days=1), data_dir=data_dir).unreadable == 1
    assert names() == {"recent"}
    later = NOW + timedelta(days=40)  # the recent row is now older than the retention too
    assert retention.prune(journal, 30, later, data_dir=data_dir).unreadable == 1
    assert names() == set()
