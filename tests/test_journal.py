import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import old_journal

from fgm_consolidator.durable import FileIdentity
from fgm_consolidator.errors import IllegalTransitionError, JournalError
from fgm_consolidator.journal import Deaths, Journal, SourceRecord, UnreadableRecord
from fgm_consolidator.states import MergeState as S
from fgm_consolidator.states import check_transition

SOURCES = [
    SourceRecord("metrics-20251230T100000Z.parquet", FileIdentity(1, 100, 5), 10, "f1", None),
    SourceRecord(
        "metrics-20251230T100130Z.parquet", FileIdentity(2, 200, 6), 20, "f1", FileIdentity(3, 9, 7)
    ),
]


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    opened = Journal.open(tmp_path / "state" / "journal.db")
    yield opened
    opened.close()


def plan(journal: Journal, partition: str = "dt=2025-12-30/identifier=a", output: str = "o") -> int:
    return journal.record_planned(
        partition=partition, output=output, era="flat", policy={"min_files": 2},
        sources=SOURCES, has_companion=True,
    )  # fmt: skip


def test_opens_in_wal_with_full_sync_and_latest_schema(journal: Journal) -> None:
    assert journal.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert journal.db.execute("PRAGMA user_version").fetchone()[0] == 7
    assert set(journal.db.table_names()) >= {
        "merges", "sources", "transitions", "unreadable", "passes", "prunes", "data_dir",
    }  # fmt: skip


def test_a_merge_walks_the_states_and_keeps_every_transition(journal: Journal) -> None:
    merge_id = plan(journal)
    journal.transition(merge_id, S.WRITING, actor="merge")
    journal.record_written(merge_id, rows=30, size=123, checksum="abc")
    journal.transition(merge_id, S.RENAMED, actor="merge")
    journal.transition(merge_id, S.SOURCES_DELETED, actor="recovery")
    record = journal.merge(merge_id)
    assert [t.state for t in record.transitions] == [
        S.PLANNED, S.WRITING, S.WRITTEN, S.RENAMED, S.SOURCES_DELETED,
    ]  # fmt: skip
    assert record.transitions[-1].actor == "recovery"
    assert (record.rows_in, record.bytes_in, record.output_rows, record.output_checksum) == (
        30, 300, 30, "abc",
    )  # fmt: skip
    assert record.sources == tuple(SOURCES)
    assert journal.unfinished() == []


def test_illegal_transitions_raise_and_change_nothing(journal: Journal) -> None:
    merge_id = plan(journal)
    with pytest.raises(IllegalTransitionError, match="planned to renamed") as refused:
        journal.transition(merge_id, S.RENAMED, actor="merge")
    assert refused.value.path == str(journal.path)  # the record a person must read
    journal.transition(merge_id, S.ROLLED_BACK, actor="merge", error="boom")
    with pytest.raises(IllegalTransitionError, match="rolled-back to writing"):
        journal.transition(merge_id, S.WRITING, actor="merge")
    assert [t.state for t in journal.merge(merge_id).transitions] == [S.PLANNED, S.ROLLED_BACK]


def test_unfinished_and_history_filters(journal: Journal) -> None:
    done = plan(journal, output="a")
    journal.transition(done, S.ROLLED_BACK, actor="merge")
    open_one = plan(journal, partition="dt=2025-12-31/identifier=a", output="b")
    journal.transition(open_one, S.WRITING, actor="merge")
    assert [r.id for r in journal.unfinished()] == [open_one]
    assert [r.id for r in journal.history()] == [open_one, done]
    assert [r.id for r in journal.history(limit=1)] == [open_one]
    assert [r.id for r in journal.history(state=S.ROLLED_BACK)] == [done]
    assert [r.id for r in journal.history(partition="dt=2025-12-31/identifier=a")] == [open_one]
    assert journal.history(since="2999-01-01") == []


def test_held_names_come_from_merges_that_need_a_person(journal: Journal) -> None:
    merge_id = plan(journal, output="consolidated-x.parquet")
    journal.transition(merge_id, S.WRITING, actor="merge")
    journal.record_written(merge_id, rows=30, size=1, checksum="c")
    journal.transition(merge_id, S.NEEDS_ATTENTION, actor="recovery", error="why")
    assert journal.held_names("dt=2025-12-30/identifier=a") == {
        "consolidated-x.parquet",
        *(s.name for s in SOURCES),
    }
    assert journal.held_names("dt=2025-12-31/identifier=a") == set()
    writing = plan(journal, output="consolidated-y.parquet")
    journal.transition(writing, S.WRITING, actor="merge")  # unfinished, but no person's
    journal.transition(merge_id, S.ROLLED_BACK, actor="recovery")  # settled by a person
    assert journal.held_names("dt=2025-12-30/identifier=a") == set()


def test_unreadable_files_are_recorded_once_per_version(journal: Journal) -> None:
    part, ident, name = "dt=2025-12-30/identifier=a", FileIdentity(1, 10, 20), "metrics-x.parquet"
    assert journal.record_unreadable(part, name, ident, "bad footer", ctime_ns=30)
    assert not journal.record_unreadable(part, name, ident, "bad footer", ctime_ns=30)
    assert journal.record_unreadable(part, name, FileIdentity(1, 11, 21), "again", ctime_ns=31)
    assert [(u.name, u.size, u.ctime_ns) for u in journal.unreadable(part)] == [
        (name, 11, 31), (name, 10, 30),
    ]  # fmt: skip
    # the same bytes after a chmod that did not help: one row, now describing the new ctime
    assert journal.record_unreadable(part, name, ident, "Permission denied", ctime_ns=40)
    assert not journal.record_unreadable(part, name, ident, "Permission denied", ctime_ns=40)
    assert [(u.size, u.ctime_ns, u.reason) for u in journal.unreadable(part)] == [
        (11, 31, "again"), (10, 40, "Permission denied"),
    ]  # fmt: skip


def test_a_schema_2_journal_migrates_and_keeps_its_unreadable_rows(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    old_journal(path, 2)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO unreadable (partition, name, size, mtime_ns, reason, first_seen)"
            " VALUES ('dt=2025-12-30/identifier=a', 'metrics-x.parquet', 10, 20, 'bad', 't')"
        )
    conn.close()
    legacy = UnreadableRecord(
        "dt=2025-12-30/identifier=a", "metrics-x.parquet", 10, 20, "bad", "t", None
    )
    # read-only (status, history) before `run` migrates it: the row reads, without a ctime
    before = Journal.open(path, read_only=True)
    try:
        assert before.db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert before.unreadable() == [legacy]
    finally:
        before.close()
    after = Journal.open(path)
    try:
        assert after.db.execute("PRAGMA user_version").fetchone()[0] == 7
        assert after.unreadable() == [legacy]
        ident = FileIdentity(1, 10, 20)
        assert after.record_unreadable(legacy.partition, legacy.name, ident, "again", ctime_ns=50)
        [row] = after.unreadable()  # the old row takes the version found now
        assert (row.size, row.ctime_ns, row.reason) == (10, 50, "again")
    finally:
        after.close()


def test_reopening_keeps_history_and_does_not_migrate_twice(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    first = Journal.open(path)
    merge_id = plan(first)
    first.close()
    again = Journal.open(path)
    assert again.merge(merge_id).state is S.PLANNED
    again.close()


def test_a_newer_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    Journal.open(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(JournalError, match="newer than this"):
        Journal.open(path)


def _open_descriptors(path: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                found.append(fd.name)
    return found


@pytest.mark.parametrize("read_only", [False, True])
def test_a_refused_journal_is_not_left_open(tmp_path: Path, read_only: bool) -> None:
    """Refused for its version, the journal's connection stayed open: a caller that goes on
    (status, a test, a program) held the file, and its lock, for as long as it ran."""
    path = tmp_path / "j.db"
    Journal.open(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(JournalError, match="newer than this"):
        Journal.open(path, read_only=read_only)
    assert _open_descriptors(path) == []


@pytest.mark.parametrize("damage", ["garbage", "bad-pages", "truncated"])
def test_a_corrupt_journal_is_refused_with_a_repair_hint(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "j.db"
    journal = Journal.open(path)
    for i in range(200):
        plan(journal, output=f"o{i}")
    journal.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal.close()
    good = path.read_bytes()
    assert len(good) > 8192
    damaged = {
        "garbage": b"garbage" * 1000,
        "bad-pages": good[:4096] + b"\xff" * (len(good) - 4096),
        "truncated": good[: len(good) // 2],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(JournalError, match="move the journal aside") as info:
        Journal.open(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("read_only", [True, False])
def test_a_journal_path_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, read_only: bool
) -> None:
    """On a FIFO, SQLite waited in open() for a writer forever: history and status hung."""
    fifo = tmp_path / "journal.db"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.db"
    folder.mkdir()
    for path, kind in ((fifo, "a FIFO"), (folder, "a folder")):
        with pytest.raises(JournalError, match=f"it is {kind}, not a regular file") as caught:
            Journal.open(path, read_only=read_only)
        assert caught.value.path == str(path)


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[Path]:
    """A journal that another process-like connection keeps exclusively locked."""
    path = tmp_path / "j.db"
    Journal.open(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    yield path
    holder.execute("ROLLBACK")
    holder.close()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_locked_journal_is_not_called_corrupt(held_lock: Path, read_only: bool) -> None:
    """`database is locked` came with the corrupt-journal hint: move a sound journal aside."""
    with pytest.raises(JournalError) as caught:
        Journal.open(held_lock, read_only=read_only)
    message = str(caught.value)
    assert message.startswith(f"{held_lock}: cannot open journal (database is locked); ")
    assert "kept it locked" in message
    assert "move the journal aside" not in message


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("version", [0, 3])
def test_another_programs_database_is_not_taken_for_a_journal(
    tmp_path: Path, read_only: bool, version: int
) -> None:
    """`--journal` naming some other SQLite database: `run` added the journal's tables beside
    that program's, and `status` and `history` called it an empty file. Found by a bad-input
    review (helper-44)."""
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE foo (x)")
        conn.execute(f"PRAGMA user_version = {version}")
    with pytest.raises(JournalError, match="not a journal of fgm-consolidator") as caught:
        Journal.open(path, read_only=read_only)
    assert f"schema version {version}, tables: foo" in str(caught.value)
    assert caught.value.path == str(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert (tables, mode) == ([("foo",)], "delete")


def test_reading_an_empty_journal_file_names_it_and_says_why(tmp_path: Path) -> None:
    """`history` died with a `no such table: merges` traceback, `status` with a bare
    `Error: no such table: transitions`."""
    path = tmp_path / "journal.db"
    path.touch()
    with pytest.raises(JournalError, match="the journal holds no tables") as caught:
        Journal.open(path, read_only=True)
    assert caught.value.path == str(path)
    assert path.read_bytes() == b""


# Where each state may be entered from, by the durable sequence (DESIGN.md): a step is only
# journaled after the one before it, `needs-attention` only flags a merge past `written`, and
# a terminal state is never left.
ENTERED_FROM = {
    S.WRITING: {S.PLANNED},
    S.WRITTEN: {S.WRITING},
    S.RENAMED: {S.WRITTEN, S.NEEDS_ATTENTION},
    S.SOURCES_DELETED: {S.RENAMED, S.NEEDS_ATTENTION},
    S.NEEDS_ATTENTION: {S.WRITTEN, S.RENAMED},
    S.ROLLED_BACK: {S.PLANNED, S.WRITING, S.WRITTEN, S.RENAMED, S.NEEDS_ATTENTION},
}
PATH_TO = {  # a legal walk into each state, from `planned`
    S.PLANNED: [],
    S.WRITING: [S.WRITING],
    S.WRITTEN: [S.WRITING, S.WRITTEN],
    S.RENAMED: [S.WRITING, S.WRITTEN, S.RENAMED],
    S.NEEDS_ATTENTION: [S.WRITING, S.WRITTEN, S.NEEDS_ATTENTION],
    S.SOURCES_DELETED: [S.WRITING, S.WRITTEN, S.RENAMED, S.SOURCES_DELETED],
    S.ROLLED_BACK: [S.ROLLED_BACK],
}


@pytest.mark.parametrize("current", list(PATH_TO), ids=str)
def test_no_state_is_entered_but_from_the_step_before_it(journal: Journal, current: S) -> None:
    """Every jump the durable sequence forbids is refused, and leaves the history as it was:
    a journal that took `writing -> renamed`, say, would let recovery finish a merge whose
    output was never verified."""
    merge_id = plan(journal)
    for state in PATH_TO[current]:
        journal.transition(merge_id, state, actor="merge")
    walked = journal.merge(merge_id).transitions
    refused = [target for target in S if current not in ENTERED_FROM.get(target, set())]
    assert refused  # every state forbids something, even `needs-attention`
    for target in refused:
        with pytest.raises(IllegalTransitionError, match=f"from {current} to {target}"):
            journal.transition(merge_id, target, actor="merge")
    assert journal.merge(merge_id).transitions == walked


def test_a_merge_is_only_ever_started_as_planned(journal: Journal) -> None:
    merge_id = plan(journal)
    for state in (s for s in S if s is not S.PLANNED):
        with pytest.raises(IllegalTransitionError, match="must start as planned"):
            journal.transition(merge_id + 1, state, actor="merge")
    assert [r.id for r in journal.history()] == [merge_id]


def test_an_adopted_merge_starts_at_renamed_with_its_output_figures(journal: Journal) -> None:
    """Recovery adopts an output its lineage proves, so the deletes it then makes are
    journaled: the record starts at `renamed` with everything a later recovery checks, and
    from there walks the usual states. Only `record_adopted` may start a merge there."""
    merge_id = journal.record_adopted(
        partition="p", output="o", era="flat", policy={"adopted": {"lineage_merge_id": 9}},
        sources=SOURCES, output_rows=30, output_bytes=123, output_checksum="abc",
        companion_checksum="def", actor="recovery",
    )  # fmt: skip
    journal.transition(merge_id, S.SOURCES_DELETED, actor="recovery")
    record = journal.merge(merge_id)
    assert record.adopted and not journal.merge(plan(journal)).adopted
    assert [(t.state, t.actor) for t in record.transitions] == [
        (S.RENAMED, "recovery"), (S.SOURCES_DELETED, "recovery"),
    ]  # fmt: skip
    assert (record.output_rows, record.output_bytes, record.output_checksum) == (30, 123, "abc")
    assert (record.has_companion, record.companion_checksum) == (True, "def")
    assert list(record.sources) == SOURCES and record.rows_in == sum(s.rows for s in SOURCES)
    with pytest.raises(IllegalTransitionError, match="must start as renamed, not planned"):
        check_transition(merge_id + 9, None, S.PLANNED, adopted=True)


def _ended(journal: Journal, walk: list[tuple[S, str]], partition: str = "p") -> int:
    merge_id = plan(journal, partition=partition)
    for state, actor in walk:
        journal.transition(merge_id, state, actor=actor)
    return merge_id


DIED_WRITING = [(S.WRITING, "merge"), (S.ROLLED_BACK, "recovery")]
DIED_PLANNED = [(S.ROLLED_BACK, "recovery")]


def test_deaths_count_the_latest_merges_recovery_found_dead_while_planned_or_writing(
    journal: Journal,
) -> None:
    assert journal.deaths("p", "recovery").count == 0
    _ended(journal, DIED_WRITING)
    _ended(journal, [(S.WRITING, "merge"), (S.ROLLED_BACK, "merge")])  # failed, process lived
    assert journal.deaths("p", "recovery").count == 0
    _ended(journal, DIED_PLANNED)
    _ended(journal, DIED_WRITING)
    _ended(journal, DIED_WRITING, partition="other")
    deaths = journal.deaths("p", "recovery")
    assert deaths.count == 2
    newest = journal.merge(journal.newest_merge_id() - 1).transitions[-1].at
    assert deaths.last_at == newest
    # Killed after the output was written: the write itself did not kill it.
    _ended(journal, [(S.WRITING, "merge"), (S.WRITTEN, "merge"), (S.ROLLED_BACK, "recovery")])
    assert journal.deaths("p", "recovery").count == 0
    assert journal.deaths("other", "recovery").count == 1
    for _ in range(5):
        _ended(journal, DIED_WRITING)
    assert journal.deaths("p", "recovery", lookback=3).count == 3  # bounded, history aside


def test_an_attempt_begun_and_never_ended_counts_as_a_death_until_one_ends(
    journal: Journal,
) -> None:
    assert journal.attempt_deaths("lineage:p/out").count == 0
    journal.begin_attempt("lineage:p/out")  # the process died in it
    journal.begin_attempt("lineage:p/out")  # and again
    deaths = journal.attempt_deaths("lineage:p/out")
    assert deaths.count == 2 and deaths.last_at is not None
    assert journal.attempt_deaths("lineage:p/other").count == 0
    journal.begin_attempt("lineage:p/out")
    journal.end_attempt("lineage:p/out")  # this one lived to the end, whatever its outcome
    assert journal.attempt_deaths("lineage:p/out").count == 0


def test_a_journal_from_before_attempts_reads_as_none_died(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    old_journal(path, 4)
    old = Journal.open(path, read_only=True)  # `status` does not migrate
    try:
        assert old.attempt_deaths("lineage:p/out") == Deaths(0, None)
    finally:
        old.close()


def test_deletions_are_the_sources_of_finished_merges_only(journal: Journal) -> None:
    """`plan.merged_before` holds a file the journal says a merge deleted: a merge rolled
    back or still under way deleted nothing, and another partition's merges say nothing."""
    partition = "dt=2025-12-30/identifier=a"
    finished, rolled_back, under_way = plan(journal), plan(journal), plan(journal)
    elsewhere = plan(journal, partition="dt=2025-12-30/identifier=b")
    for merge_id in (finished, elsewhere):
        journal.transition(merge_id, S.WRITING, actor="merge")
        journal.record_written(merge_id, rows=30, size=123, checksum="abc")
        journal.transition(merge_id, S.RENAMED, actor="merge")
        journal.transition(merge_id, S.SOURCES_DELETED, actor="merge")
    journal.transition(rolled_back, S.ROLLED_BACK, actor="merge")
    journal.transition(under_way, S.WRITING, actor="merge")
    name = SOURCES[1].name

    [deleted] = journal.deletions(partition, [name, "metrics-20251230T110000Z.parquet"])

    assert (deleted.merge_id, deleted.name, deleted.output, deleted.output_bytes) == (
        finished, name, "o", 123,
    )  # fmt: skip
    assert (deleted.size, deleted.mtime_ns, deleted.rows) == (200, 6, 20)
    assert journal.deletions(partition, [name], after_merge=finished) == []
    assert journal.wrote(finished, partition, "o")
    assert not journal.wrote(finished, "dt=2025-12-30/identifier=b", "o")
