"""The write-ahead journal: one SQLite database, one transaction per change, history append-only.

WAL with `synchronous=FULL`, so a commit is on disk before the file-system step it announces.
The schema lives in the repository's `journal/migrations/` and ships inside the package; this
module applies the numbered files the database has not seen yet.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from . import crashpoints, durable
from .durable import FileIdentity
from .errors import ConsolidatorError, JournalError
from .states import ADOPTED_START, TERMINAL, MergeState, check_transition

REPAIR_HINT = (
    "stop the consolidator, move the journal aside (keep it for a post-mortem) and run "
    "`fgm-consolidator recover`; data files are never deleted without proof"
)


SQLITE_MAX_INT = 2**63 - 1
MERGE_ACTOR = "merge"  # who plans, writes and ends a merge in the normal course
# Who rolls back a merge that a stop (SIGTERM past the grace period) cut short: no failure of
# the merge, so three deploys in a row are not "its last 3 merges failed" (`failures`).
STOP_ACTOR = "stop"
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_BUSY_HINT = (
    "another process kept it locked past the 5 s we wait (a consolidator given the same"
    " --journal, a sqlite3 shell, a backup): find it and try again"
)
_FULL_HINT = "its volume is full: free some space and try again"
_IO_HINT = "the volume may be full or failing: check it (df, dmesg) and try again"
_UNCHANGED = "nothing was changed"
# A failure after the open: the steps already taken stay taken, each one journaled or provable
# from the disk, and the next run goes on from there.
_RESUMES = "what was done stays done, and the next run goes on from there"


def explained(exc: sqlite3.DatabaseError, path: Path, *, opening: bool) -> JournalError:
    """SQLite's messages name no file and give no advice. What to do depends on why: moving
    aside a journal that is only locked, or that sits on a full volume, would throw away a
    sound audit trail and force a lineage recovery."""
    code = _primary_code(exc)
    changed = _UNCHANGED if opening else _RESUMES
    refused = _refused_access(path) if code == sqlite3.SQLITE_CANTOPEN else None
    if refused is not None:
        hint = f"{refused}: let the consolidator's user read and write it; {changed}"
    elif code in _BUSY_CODES:
        hint = f"{_BUSY_HINT}; {changed}"
    elif code == sqlite3.SQLITE_FULL:
        hint = f"{_FULL_HINT}; {changed}"
    elif code == sqlite3.SQLITE_IOERR:
        hint = f"{_IO_HINT}; {changed}; if the volume is fine and this persists, {REPAIR_HINT}"
    else:
        hint = REPAIR_HINT
    what = "cannot open journal" if opening else "journal failed"
    return JournalError(f"{what} ({exc}); {hint}", path)


def _primary_code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code (SQLITE_BUSY, say) without its extended bits."""
    return int(getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def _refused_access(path: Path) -> str | None:
    """The system's reason when the journal or its `-wal` or `-shm` file cannot be opened at
    all (its mode, its owner), which SQLite reports only as "unable to open database file",
    the words of a broken journal. A side file is named: moving a sound journal aside for it
    would throw the audit trail away and fix nothing."""
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            os.close(os.open(candidate, os.O_RDONLY))
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                reason = exc.strerror or str(exc)
                return reason if candidate == path else f"{candidate}: {reason}"
    return None


@contextmanager
def errors_explained(path: Path) -> Iterator[None]:
    """Around a command's use of an open journal: its SQLite errors come out as a JournalError
    naming the journal and what to do, where they gave a traceback. Only outermost: inside a
    pass, a journal error must stay what it is, to end the pass (see `service`)."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise explained(exc, path, opening=False) from exc


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _migrations() -> list[tuple[int, str]]:
    """Numbered SQL files shipped as package data, in order."""
    folder = resources.files(__package__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


# Bound parameters per query: SQLite's limit is 999 in older builds.
_NAMES_PER_QUERY = 500


@dataclass(frozen=True)
class SourceRecord:
    """A source as journaled: enough to find it, prove it unchanged, and account for its rows."""

    name: str
    identity: FileIdentity
    rows: int
    schema_fingerprint: str
    companion: FileIdentity | None


@dataclass(frozen=True)
class Deletion:
    """A source a finished merge deleted: its size, mtime and rows, and the output that took
    them."""

    merge_id: int
    name: str
    size: int
    mtime_ns: int
    rows: int
    output: str
    output_bytes: int | None


@dataclass(frozen=True)
class Transition:
    state: MergeState
    at: str
    actor: str
    error: str | None


@dataclass(frozen=True)
class MergeRecord:
    id: int
    partition: str
    output: str
    era: str
    policy: dict[str, Any]
    rows_in: int
    bytes_in: int
    has_companion: bool
    output_rows: int | None
    output_bytes: int | None
    output_checksum: str | None
    sources: tuple[SourceRecord, ...]
    transitions: tuple[Transition, ...]
    companion_checksum: str | None = None  # None: no companion, or from before migration 6

    @property
    def state(self) -> MergeState:
        return self.transitions[-1].state

    @property
    def last_action_state(self) -> MergeState:
        """The latest state that describes the disk (needs-attention only flags it)."""
        for step in reversed(self.transitions):
            if step.state is not MergeState.NEEDS_ATTENTION:
                return step.state
        raise JournalError(f"merge {self.id} has no state")

    @property
    def error(self) -> str | None:
        return self.transitions[-1].error

    @property
    def adopted(self) -> bool:
        """Recorded by recovery from an output's lineage (`Journal.record_adopted`), not
        planned here: the output may hold rows of files this journal never knew."""
        return self.transitions[0].state is ADOPTED_START


class PassResult(StrEnum):
    """How a consolidation pass ended. Frozen once released: journal rows store these strings."""

    # Every partition was worked (a rolled-back merge is retried by the next pass).
    OK = "ok"
    # A partition could not be worked, or the pass stopped on an error.
    FAILED = "failed"
    # A signal cut the pass short.
    STOPPED = "stopped"
    # The process died during the pass; set by the next pass to start.
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class PassRecord:
    id: int
    started: str
    ended: str | None
    result: PassResult | None  # None while the pass runs (or until the next one starts)
    merges_finished: int
    merges_failed: int
    partition_errors: int
    unreadable: int
    error: str | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class Deaths:
    """Work that died with its process, in a row: a partition's latest merges (rolled back by
    recovery from `planned` or `writing`, counted from the newest merge back to the first that
    did not), or the attempts at a start-up step (`attempts`, never ended)."""

    count: int
    last_at: str | None  # when the latest of them was rolled back, or began


@dataclass(frozen=True)
class Failures:
    """A partition's latest merges that failed in a row: rolled back by the merge itself on an
    error, counted from the newest merge back to the first that did not."""

    count: int
    last_error: str | None


# The last few merges of a partition, newest first: each one's latest state, who set it,
# when and with what error, and the state before it. Bounded, so the cost does not grow with
# the history.
_LATEST_ENDINGS = """
SELECT last.state, last.actor, last.at, last.error,
  (SELECT p.state FROM transitions p WHERE p.merge_id = m.id AND p.id < last.id
   ORDER BY p.id DESC LIMIT 1)
FROM merges m
JOIN transitions last ON last.id = (SELECT max(t.id) FROM transitions t WHERE t.merge_id = m.id)
WHERE m.partition = ?
ORDER BY m.id DESC LIMIT ?
"""
_DIED_WHILE = (str(MergeState.PLANNED), str(MergeState.WRITING))


@dataclass(frozen=True)
class PruneCounts:
    merges: int
    passes: int
    unreadable: int = 0


# Merges whose history may go: finished before the cutoff and never flagged for a person;
# a rolled-back merge only once every one of its sources went into a later merge (its failure
# is then no longer the latest word on those files). The newest merge always stays, so an id
# is never handed out twice (outputs carry their merge id in their lineage).
_PRUNABLE = """
SELECT m.id FROM merges m
JOIN transitions last ON last.id = (SELECT max(t.id) FROM transitions t WHERE t.merge_id = m.id)
WHERE last.at < :cutoff
  AND m.id < (SELECT max(id) FROM merges)
  AND NOT EXISTS (
    SELECT 1 FROM transitions f WHERE f.merge_id = m.id AND f.state = 'needs-attention')
  AND (
    last.state = 'sources-deleted'
    OR (last.state = 'rolled-back' AND NOT EXISTS (
      SELECT 1 FROM sources s WHERE s.merge_id = m.id AND NOT EXISTS (
        SELECT 1 FROM merges later JOIN sources ls ON ls.merge_id = later.id
        WHERE later.partition = m.partition AND later.id > m.id AND ls.name = s.name))))
"""

# Pass records before the cutoff, except the newest and the newest successful one (`status`).
_PRUNABLE_PASSES = """
DELETE FROM passes WHERE started < :cutoff AND result IS NOT NULL
  AND id <> (SELECT max(id) FROM passes)
  AND id <> coalesce((SELECT max(id) FROM passes WHERE result = 'ok'), -1)
"""


@dataclass(frozen=True)
class UnreadableRecord:
    partition: str
    name: str
    size: int
    mtime_ns: int
    reason: str
    first_seen: str
    ctime_ns: int | None  # None in rows from before migration 3


DATA_DIR_VERSION = 4  # the migration that added the data_dir table
ATTEMPTS_VERSION = 5  # the migration that added the attempts table
RELEASED_VERSION = 7  # the migration that added the released table


@dataclass(frozen=True)
class DataDirBinding:
    """The data directory a journal belongs to: its id, and the path it was last opened at."""

    id: str
    path: str


JOURNAL_GONE = (
    "the journal was removed or replaced while this service ran; stopping, so that a restart"
    " recovers from what is on disk"
)


class Journal:
    """All reads and writes of the journal database; knows nothing of parquet or of the data
    files (the only files it touches are its own, and the folders that hold them)."""

    def __init__(self, db: Database, path: Path) -> None:
        self.db = db
        self.path = path
        self._opened = durable.named_file(path)  # what `check_in_place` compares the path with

    def check_in_place(self) -> None:
        """JournalError when the path no longer names the file this process writes: removed
        (a person cleaning `.fgm-consolidator/` up) or replaced. SQLite goes on writing into
        the open file unseen, so history, and the proof of every later merge, would be lost
        at the next restart; the service stops instead, saying so."""
        if durable.named_file(self.path) != self._opened:
            raise JournalError(JOURNAL_GONE, self.path)

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> Journal:
        _check_regular(path)
        try:
            if read_only:
                conn = _connect_read_only(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None)
            journal = cls(Database(conn), path)
            try:
                journal._prepare(read_only)
            except BaseException:
                conn.close()  # a refused journal is left by the command, not held open
                raise
        except sqlite3.DatabaseError as exc:
            if not read_only:
                _remove_unused_wal(path)
            raise explained(exc, path, opening=True) from exc
        return journal

    def _prepare(self, read_only: bool) -> None:
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._check_integrity()
        self._check_ours()  # before WAL mode, which is written into the file's header
        if read_only:
            self._check_version()
            self._check_set_up()
            return
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        if self._user_version() == 0:
            self._sync_new_names()
        self._migrate()

    def _sync_new_names(self) -> None:
        """A journal not yet migrated may be brand new, and so may its folder: make both names
        survive a power cut before the first commit relies on them. SQLite syncs its own `-wal`
        name; nobody else syncs the state folder's entry in the data directory. Done until the
        first migration commits, so a kill right after creating the file cannot skip it."""
        durable.fsync_dir(self.path.parent)
        durable.fsync_dir(self.path.parent.parent)

    def close(self) -> None:
        self.db.conn.close()

    @staticmethod
    def now() -> datetime:
        """The clock every recorded time comes from; what is compared with them uses it too."""
        return datetime.fromisoformat(utc_now())

    def _check_integrity(self) -> None:
        result = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise JournalError(f"journal is corrupt ({result}); {REPAIR_HINT}", self.path)

    def _user_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _check_version(self) -> None:
        known = max(number for number, _ in _migrations())
        if self._user_version() > known:
            raise JournalError(
                f"journal schema version {self._user_version()} is newer than this "
                f"fgm-consolidator understands ({known}); upgrade fgm-consolidator",
                self.path,
            )

    def _check_ours(self) -> None:
        """Another program's database given as `--journal`: `run` added its tables beside that
        program's, and `status` called it an empty file. Tables without a journal version, or a
        version without the journal's first table, are not ours (migration 1 creates `merges`
        and sets the version in one transaction)."""
        tables = [
            name
            for (name,) in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        version = self._user_version()
        if (version == 0 and tables) or (version > 0 and "merges" not in tables):
            shown = ", ".join(sorted(tables)[:5]) or "none"
            raise JournalError(
                f"not a journal of fgm-consolidator: another program's database (schema "
                f"version {version}, tables: {shown}); give --journal a path of its own",
                self.path,
            )

    def _check_set_up(self) -> None:
        """A reader of a journal no migration ever ran on (an empty file) met `no such table`
        deep inside `history` and `status`."""
        if self._user_version() == 0:
            raise JournalError(
                "the journal holds no tables: an empty file, or one `run` is just creating;"
                " `run` and `recover` take an empty journal for a lost one and recover from"
                " the outputs' lineage",
                self.path,
            )

    def _migrate(self) -> None:
        self._check_version()
        current = self._user_version()
        for number, sql in _migrations():
            if number <= current:
                continue
            try:
                self.db.conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\n;PRAGMA user_version = {number:d};\nCOMMIT;"
                )
            except sqlite3.Error:
                if self.db.conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            crashpoints.reach("journal:migrated")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One journal change, all or nothing; committed (and synced) when the block ends."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- writes ---------------------------------------------------------------------------

    def record_planned(
        self,
        *,
        partition: str,
        output: str,
        era: str,
        policy: Mapping[str, Any],
        sources: Sequence[SourceRecord],
        has_companion: bool,
    ) -> int:
        with self.transaction():
            merge_id = self._insert_merge(partition, output, era, policy, sources, has_companion)
            self._insert_transition(merge_id, MergeState.PLANNED, MERGE_ACTOR, None)
        crashpoints.reach(f"journal:{MergeState.PLANNED}")
        return merge_id

    def record_adopted(
        self,
        *,
        partition: str,
        output: str,
        era: str,
        policy: Mapping[str, Any],
        sources: Sequence[SourceRecord],
        output_rows: int,
        output_bytes: int,
        output_checksum: str,
        companion_checksum: str | None,
        actor: str,
    ) -> int:
        """An output found without its merge in this journal, proven to hold `sources`: one
        commit records it as `renamed` (durable under its final name, sources still present),
        so their deletion is journaled like any merge's and a crash is finished by recovery."""
        with self.transaction():
            merge_id = self._insert_merge(
                partition, output, era, policy, sources, companion_checksum is not None
            )
            self.db.execute(
                "UPDATE merges SET output_rows = ?, output_bytes = ?, output_checksum = ?,"
                " companion_checksum = ? WHERE id = ?",
                (output_rows, output_bytes, output_checksum, companion_checksum, merge_id),
            )
            self._insert_transition(merge_id, ADOPTED_START, actor, None, adopted=True)
        crashpoints.reach("journal:adopted")
        return merge_id

    def _insert_merge(
        self,
        partition: str,
        output: str,
        era: str,
        policy: Mapping[str, Any],
        sources: Sequence[SourceRecord],
        has_companion: bool,
    ) -> int:
        cursor = self.db.execute(
            "INSERT INTO merges (partition, output, era, policy, rows_in, bytes_in,"
            " has_companion) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                partition,
                output,
                era,
                json.dumps(dict(policy), sort_keys=True),
                sum(s.rows for s in sources),
                sum(s.identity.size for s in sources),
                int(has_companion),
            ),
        )
        merge_id = int(cursor.lastrowid or 0)
        for position, source in enumerate(sources):
            companion = source.companion
            self.db.execute(
                "INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    merge_id,
                    position,
                    source.name,
                    source.identity.inode,
                    source.identity.size,
                    source.identity.mtime_ns,
                    source.rows,
                    source.schema_fingerprint,
                    companion.inode if companion else None,
                    companion.size if companion else None,
                    companion.mtime_ns if companion else None,
                ),
            )
        return merge_id

    def transition(
        self, merge_id: int, state: MergeState, *, actor: str, error: str | None = None
    ) -> None:
        with self.transaction():
            self._insert_transition(merge_id, state, actor, error)
        crashpoints.reach(f"journal:{state}")

    def record_written(
        self,
        merge_id: int,
        *,
        rows: int,
        size: int,
        checksum: str,
        companion_checksum: str | None = None,
    ) -> None:
        """The output's figures (and its companion's checksum) and the `written` state, in one
        commit."""
        with self.transaction():
            self.db.execute(
                "UPDATE merges SET output_rows = ?, output_bytes = ?, output_checksum = ?,"
                " companion_checksum = ? WHERE id = ? AND output_checksum IS NULL",
                (rows, size, checksum, companion_checksum, merge_id),
            )
            self._insert_transition(merge_id, MergeState.WRITTEN, MERGE_ACTOR, None)
        crashpoints.reach(f"journal:{MergeState.WRITTEN}")

    def _insert_transition(
        self,
        merge_id: int,
        state: MergeState,
        actor: str,
        error: str | None,
        *,
        adopted: bool = False,
    ) -> None:
        current = self._current_state(merge_id)
        check_transition(merge_id, current, state, self.path, adopted=adopted)
        self.db.execute(
            "INSERT INTO transitions (merge_id, state, at, actor, error) VALUES (?, ?, ?, ?, ?)",
            (merge_id, str(state), utc_now(), actor, error),
        )

    def record_unreadable(
        self, partition: str, name: str, identity: FileIdentity, reason: str, *, ctime_ns: int
    ) -> bool:
        """Remember a file we could not read; True the first time this version of it is seen.

        A version is size, mtime and ctime. One row per size and mtime (migration 3): a new
        ctime on the same content (a `chmod` that did not help) updates the row's ctime,
        reason and first_seen, so the row always describes what is on disk now.
        """
        with self.transaction():
            cursor = self.db.execute(
                "INSERT INTO unreadable (partition, name, size, mtime_ns, reason, first_seen,"
                " ctime_ns) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (partition, name, size, mtime_ns) DO UPDATE SET"
                " ctime_ns = excluded.ctime_ns, reason = excluded.reason,"
                " first_seen = excluded.first_seen"
                " WHERE unreadable.ctime_ns IS NOT excluded.ctime_ns",
                (partition, name, identity.size, identity.mtime_ns, reason, utc_now(), ctime_ns),
            )
        crashpoints.reach("journal:unreadable")
        return cursor.rowcount == 1

    def begin_pass(self, settings: Mapping[str, Any]) -> int:
        """Record a pass as running; a pass left running by a dead process becomes interrupted."""
        with self.transaction():
            self._interrupt_open_passes()
            cursor = self.db.execute(
                "INSERT INTO passes (started, settings) VALUES (?, ?)",
                (utc_now(), json.dumps(dict(settings), sort_keys=True)),
            )
        return int(cursor.lastrowid or 0)

    def interrupt_dead_passes(self) -> None:
        """Only a holder of the data directory's lock asks (recovery under it): any pass still
        open died with its process. `recover` after a kill -9 left it open, and `status`
        showed it running, healthy, until stale (a review, helper-51). Nothing is written
        when none is open: a journal another process keeps locked is the pass's to report."""
        if self.db.execute("SELECT 1 FROM passes WHERE result IS NULL LIMIT 1").fetchone():
            with self.transaction():
                self._interrupt_open_passes()

    def _interrupt_open_passes(self) -> None:
        self.db.execute(
            "UPDATE passes SET result = ? WHERE result IS NULL", (str(PassResult.INTERRUPTED),)
        )

    def end_pass(
        self,
        pass_id: int,
        result: PassResult,
        *,
        merges_finished: int = 0,
        merges_failed: int = 0,
        partition_errors: int = 0,
        unreadable: int = 0,
        error: str | None = None,
    ) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE passes SET ended = ?, result = ?, merges_finished = ?, merges_failed = ?,"
                " partition_errors = ?, unreadable = ?, error = ? WHERE id = ? AND result IS NULL",
                (
                    utc_now(),
                    str(result),
                    merges_finished,
                    merges_failed,
                    partition_errors,
                    unreadable,
                    error,
                    pass_id,
                ),
            )

    def prune(
        self, *, cutoff: str, at: str, unreadable: Sequence[UnreadableRecord] = ()
    ) -> PruneCounts:
        """Forget finished history older than `cutoff` (ISO 8601, UTC), in one transaction.

        Only what `_PRUNABLE` allows: nothing unfinished, flagged for a person, or the latest
        failure of files still waiting is ever removed. `unreadable`: rows the caller found to
        describe no file on disk any more (the journal does not look at the disk).
        """
        gone = json.dumps([[u.partition, u.name, u.size, u.mtime_ns] for u in unreadable])
        with self.transaction():
            ids = [row[0] for row in self.db.execute(_PRUNABLE, {"cutoff": cutoff})]
            doomed = json.dumps(ids)
            for table, column in (("transitions", "merge_id"), ("sources", "merge_id")):
                self.db.execute(
                    f"DELETE FROM {table} WHERE {column} IN (SELECT value FROM json_each(?))",
                    [doomed],
                )
            self.db.execute(
                "DELETE FROM merges WHERE id IN (SELECT value FROM json_each(?))", [doomed]
            )
            passes = self.db.execute(_PRUNABLE_PASSES, {"cutoff": cutoff}).rowcount
            forgotten = self.db.execute(
                "DELETE FROM unreadable WHERE (partition, name, size, mtime_ns) IN (SELECT"
                " json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
                " json_extract(value, '$[2]'), json_extract(value, '$[3]') FROM json_each(?))",
                [gone],
            ).rowcount
            self.db.execute("DELETE FROM prunes WHERE at < ?", [cutoff])
            self.db.execute("DELETE FROM released WHERE at < ?", [cutoff])
            self.db.execute(
                "INSERT INTO prunes (at, cutoff, merges, passes) VALUES (?, ?, ?, ?)",
                (at, cutoff, len(ids), passes),
            )
        return PruneCounts(len(ids), passes, forgotten)

    def free_fraction(self) -> float:
        """Share of the database's pages that are free (left by deletes, reused by inserts)."""
        pages = int(self.db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        return free / pages if pages else 0.0

    def compact(self, *, vacuum: bool) -> None:
        """Give space back to the file system after a prune.

        VACUUM rewrites the database through the WAL (its scratch copy is kept in memory: a
        container's /tmp may be read-only, and what is left after a prune is small); the
        TRUNCATE checkpoint then copies the WAL home and empties it, since a WAL file never
        shrinks by itself from the size of its largest transaction.
        """
        if vacuum:
            self.db.execute("PRAGMA temp_store = MEMORY")
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA temp_store = DEFAULT")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    # -- reads ----------------------------------------------------------------------------

    def _current_state(self, merge_id: int) -> MergeState | None:
        row = self.db.execute(
            "SELECT state FROM transitions WHERE merge_id = ? ORDER BY id DESC LIMIT 1",
            (merge_id,),
        ).fetchone()
        return None if row is None else MergeState(row[0])

    def merge(self, merge_id: int) -> MergeRecord:
        records = self._merges("m.id = ?", [merge_id], limit=1)
        if not records:
            raise JournalError(f"no merge {merge_id} in the journal", self.path)
        return records[0]

    def wrote(self, merge_id: int, partition: str, output: str) -> bool:
        """Whether merge `merge_id` here is the one that wrote `output` of `partition`: the id
        an output's lineage carries may be another merge's in a journal that is not the one
        that wrote it (lost and begun again, or an older copy restored)."""
        found = self.db.execute(
            "SELECT 1 FROM merges WHERE id = ? AND partition = ? AND output = ?",
            (merge_id, partition, output),
        ).fetchone()
        return found is not None

    def newest_merge_id(self) -> int:
        """0 before the first merge; ids only grow (the newest merge is never pruned)."""
        return int(self.db.execute("SELECT coalesce(max(id), 0) FROM merges").fetchone()[0])

    def merges_after(self, merge_id: int) -> list[MergeRecord]:
        """Merges planned since `newest_merge_id` returned `merge_id`, newest first."""
        return self._merges("m.id > ?", [merge_id])

    def unfinished(self) -> list[MergeRecord]:
        """Merges whose latest state is not terminal, oldest first: recovery's work list."""
        terminal = sorted(str(s) for s in TERMINAL)
        records = self._merges(
            "(SELECT state FROM transitions t WHERE t.merge_id = m.id ORDER BY t.id DESC"
            " LIMIT 1) NOT IN (?, ?)",
            terminal,
        )
        return sorted(records, key=lambda r: r.id)

    def deaths(self, partition: str, recovered_by: str, *, lookback: int = 16) -> Deaths:
        """How many of the partition's latest merges (at most `lookback`) died with their
        process in a row; `recovered_by` is the actor recovery writes."""
        count, last_at = 0, None
        rows = self.db.execute(_LATEST_ENDINGS, (partition, lookback))
        for state, actor, at, _error, before in rows:
            if state != MergeState.ROLLED_BACK or actor != recovered_by:
                break
            if before not in _DIED_WHILE:
                break
            count += 1
            last_at = last_at or str(at)
        return Deaths(count, last_at)

    def failures(self, partition: str, failed_by: str, *, lookback: int = 16) -> Failures:
        """How many of the partition's latest merges (at most `lookback`) were rolled back in a
        row by `failed_by`, the actor a merge writes when it fails, and the latest error. A
        merge a stop cut short says nothing either way, and is passed over."""
        count, last_error = 0, None
        rows = self.db.execute(_LATEST_ENDINGS, (partition, lookback))
        for state, actor, _at, error, _before in rows:
            if state == MergeState.ROLLED_BACK and actor == STOP_ACTOR:
                continue
            if state != MergeState.ROLLED_BACK or actor != failed_by:
                break
            count += 1
            last_error = last_error or error
        return Failures(count, last_error)

    def attempt_deaths(self, subject: str) -> Deaths:
        """How many attempts at `subject` in a row died with their process (begun, never
        ended), and when the latest began."""
        if self._user_version() < ATTEMPTS_VERSION:  # read-only, before `run` migrated it
            return Deaths(0, None)
        row = self.db.execute(
            "SELECT deaths, last_at FROM attempts WHERE subject = ?", (subject,)
        ).fetchone()
        return Deaths(0, None) if row is None else Deaths(int(row[0]), str(row[1]))

    def begin_attempt(self, subject: str) -> None:
        """Committed before the step: if the process dies in it, the row stays and counts."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO attempts (subject, deaths, last_at) VALUES (?, 1, ?) ON CONFLICT"
                " (subject) DO UPDATE SET deaths = deaths + 1, last_at = excluded.last_at",
                (subject, utc_now()),
            )

    def end_attempt(self, subject: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM attempts WHERE subject = ?", (subject,))

    def history(
        self,
        *,
        limit: int | None = None,
        partition: str | None = None,
        state: MergeState | None = None,
        since: str | None = None,
    ) -> list[MergeRecord]:
        """Newest first; `since` compares against the time the merge was planned."""
        return list(self.iter_history(limit=limit, partition=partition, state=state, since=since))

    def iter_history(
        self,
        *,
        limit: int | None = None,
        partition: str | None = None,
        state: MergeState | None = None,
        since: str | None = None,
    ) -> Iterator[MergeRecord]:
        """`history`, one record at a time: each holds every source, so a list of 50,000
        merges took 1.2 GB, and the `history` command was OOM-killed in its container."""
        clauses, params = ["1"], []
        if partition:
            clauses.append("m.partition = ?")
            params.append(partition)
        if state:
            clauses.append(
                "(SELECT state FROM transitions t WHERE t.merge_id = m.id ORDER BY t.id DESC"
                " LIMIT 1) = ?"
            )
            params.append(str(state))
        if since:
            clauses.append(
                "(SELECT at FROM transitions t WHERE t.merge_id = m.id ORDER BY t.id LIMIT 1) >= ?"
            )
            params.append(since)
        return self._iter_merges(" AND ".join(clauses), params, limit=limit)

    def _merges(
        self, where: str, params: Sequence[Any], limit: int | None = None
    ) -> list[MergeRecord]:
        return list(self._iter_merges(where, params, limit))

    def _iter_merges(
        self, where: str, params: Sequence[Any], limit: int | None = None
    ) -> Iterator[MergeRecord]:
        sql = f"SELECT * FROM merges m WHERE {where} ORDER BY m.id DESC"
        if limit is not None:
            sql += f" LIMIT {min(int(limit), SQLITE_MAX_INT)}"  # beyond it: datatype mismatch
        rows = list(self.db.query(sql, list(params)))  # the merge rows alone: small
        return (self._record(row) for row in rows)

    def _record(self, row: dict[str, Any]) -> MergeRecord:
        sources = tuple(
            SourceRecord(
                name=s["name"],
                identity=FileIdentity(s["inode"], s["size"], s["mtime_ns"]),
                rows=s["rows"],
                schema_fingerprint=s["schema_fingerprint"],
                companion=None
                if s["companion_inode"] is None
                else FileIdentity(
                    s["companion_inode"], s["companion_size"], s["companion_mtime_ns"]
                ),
            )
            for s in self.db.query(
                "SELECT * FROM sources WHERE merge_id = ? ORDER BY position", [row["id"]]
            )
        )
        transitions = tuple(
            Transition(MergeState(t["state"]), t["at"], t["actor"], t["error"])
            for t in self.db.query(
                "SELECT state, at, actor, error FROM transitions WHERE merge_id = ? ORDER BY id",
                [row["id"]],
            )
        )
        return MergeRecord(
            id=row["id"],
            partition=row["partition"],
            output=row["output"],
            era=row["era"],
            policy=json.loads(row["policy"]),
            rows_in=row["rows_in"],
            bytes_in=row["bytes_in"],
            has_companion=bool(row["has_companion"]),
            output_rows=row["output_rows"],
            output_bytes=row["output_bytes"],
            output_checksum=row["output_checksum"],
            sources=sources,
            transitions=transitions,
            companion_checksum=row.get("companion_checksum"),  # absent before migration 6
        )

    def unreadable(self, partition: str | None = None) -> list[UnreadableRecord]:
        sql, params = "SELECT * FROM unreadable", []
        if partition:
            sql += " WHERE partition = ?"
            params.append(partition)
        sql += " ORDER BY id DESC"
        return [
            UnreadableRecord(
                r["partition"],
                r["name"],
                r["size"],
                r["mtime_ns"],
                r["reason"],
                r["first_seen"],
                r.get("ctime_ns"),  # absent from a journal opened read-only before migration 3
            )
            for r in self.db.query(sql, params)
        ]

    def held_names(self, partition: str) -> set[str]:
        """Files a person must look at first: every name of a merge that needs attention.
        Asked once per partition per pass, so it reads that partition's merges only."""
        held: set[str] = set()
        waiting = self._merges(
            "m.partition = ? AND (SELECT state FROM transitions t WHERE t.merge_id = m.id"
            " ORDER BY t.id DESC LIMIT 1) = ?",
            [partition, str(MergeState.NEEDS_ATTENTION)],
        )
        for record in waiting:
            held.add(record.output)
            held.update(s.name for s in record.sources)
        return held

    def deletions(
        self, partition: str, names: Collection[str], *, after_merge: int = 0
    ) -> list[Deletion]:
        """The sources named `names` that finished merges of `partition` later than
        `after_merge` deleted, in merge order. Reads that partition's sources only (a day's
        worth), and is asked only of the monitor's files a pass finds eligible; the state of
        a merge is looked up only for those found, not for each of the partition's merges."""
        found: list[Deletion] = []
        ordered = sorted(names)
        for start in range(0, len(ordered), _NAMES_PER_QUERY):
            chunk = ordered[start : start + _NAMES_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            rows = self.db.execute(
                "SELECT m.id, s.name, s.size, s.mtime_ns, s.rows, m.output, m.output_bytes"
                " FROM merges m JOIN sources s ON s.merge_id = m.id"
                f" WHERE m.partition = ? AND m.id > ? AND s.name IN ({marks})",
                [partition, after_merge, *chunk],
            ).fetchall()
            found.extend(Deletion(*row) for row in rows)
        finished = {
            merge_id
            for merge_id in {d.merge_id for d in found}
            if self._current_state(merge_id) is MergeState.SOURCES_DELETED
        }
        found = [d for d in found if d.merge_id in finished]
        return sorted(found, key=lambda d: (d.merge_id, d.name))

    def record_released(self, partition: str, name: str, footer: str, output: str) -> None:
        """Lineage recovery found none of the rows of this version of `name` in `output`,
        which lists the name under another footer: a new file, which later passes may merge."""
        with self.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO released (partition, name, footer, output, at)"
                " VALUES (?, ?, ?, ?, ?)",
                (partition, name, footer, output, utc_now()),
            )

    def released(self, partition: str, name: str, footer: str, output: str) -> bool:
        if self._user_version() < RELEASED_VERSION:  # read-only, before `run` migrated it
            return False
        found = self.db.execute(
            "SELECT 1 FROM released WHERE partition = ? AND name = ? AND footer = ? AND output = ?",
            (partition, name, footer, output),
        ).fetchone()
        return found is not None

    def _has_passes(self) -> bool:
        """A journal opened read-only may predate migration 2 until `run` migrates it."""
        return self._user_version() >= 2

    def _pass(self, where: str, params: Sequence[Any] = ()) -> PassRecord | None:
        if not self._has_passes():
            return None
        rows = list(
            self.db.query(f"SELECT * FROM passes WHERE {where} ORDER BY id DESC LIMIT 1", params)
        )
        if not rows:
            return None
        r = rows[0]
        return PassRecord(
            id=r["id"],
            started=r["started"],
            ended=r["ended"],
            result=None if r["result"] is None else PassResult(r["result"]),
            merges_finished=r["merges_finished"],
            merges_failed=r["merges_failed"],
            partition_errors=r["partition_errors"],
            unreadable=r["unreadable"],
            error=r["error"],
            settings=json.loads(r["settings"]),
        )

    def last_pass(self) -> PassRecord | None:
        return self._pass("1")

    def last_successful_pass(self) -> PassRecord | None:
        return self._pass("result = ?", [str(PassResult.OK)])

    def passes_backed_off(self, since: str | None, *, lookback: int = 8) -> int:
        """How many of the latest ended passes, started at or after `since` (the service's
        start: its backoff lives in memory), failed with an error in a row (at most
        `lookback`). The service waits longer after each such pass (`backoff.wait_after`),
        which `status --liveness` allows for; after a pass that failed on a partition alone
        it waits one interval."""
        if not self._has_passes():
            return 0
        count = 0
        for result, error, started in self.db.execute(
            "SELECT result, error, started FROM passes WHERE ended IS NOT NULL"
            " ORDER BY id DESC LIMIT ?",
            (lookback,),
        ):
            backed_off = result == str(PassResult.FAILED) and error is not None
            if not backed_off or (since is not None and started < since):
                break
            count += 1
        return count

    def last_prune_at(self) -> str | None:
        if not self._has_passes():
            return None
        row = self.db.execute("SELECT max(at) FROM prunes").fetchone()
        return None if row[0] is None else str(row[0])

    def data_dir_binding(self) -> DataDirBinding | None:
        """None for a journal no `run` or `recover` has bound yet (or from before migration 4)."""
        return _binding(self.db.conn)

    def bind_data_dir(self, data_dir_id: str, path: str) -> None:
        """Record the data directory this journal belongs to, or the path it is now at; the id
        of a journal already bound never changes (the caller refuses another one)."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO data_dir (one, id, path) VALUES (1, ?, ?)"
                " ON CONFLICT (one) DO UPDATE SET path = excluded.path WHERE id = excluded.id",
                (data_dir_id, path),
            )

    def latest_transition_at(self) -> str | None:
        """When any merge last changed state: a long pass that is getting somewhere."""
        row = self.db.execute("SELECT at FROM transitions ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """No `-wal` file means no writer has the journal open: `immutable` then reads it without
    creating `-wal`/`-shm` files, so `history` and `run --dry-run` leave the volume exactly as
    they found it."""
    wal = path.with_name(path.name + "-wal")
    flags = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    uri = f"{path.resolve().as_uri()}?{flags}"  # percent-encodes ?, # and %
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def recorded_data_dir(path: Path) -> DataDirBinding | None:
    """The data directory the journal at `path` belongs to, read before any command opens it
    (without the integrity check, which the command's own open makes). None when there is no
    journal, none readable (the command's open says why), or none recorded yet.

    A journal another process keeps locked is the command's error here. Taken for one that
    records no directory, it let the command go on and, once the lock was gone, show another
    data directory's merges (`history`) or call it healthy (`status`); and the command's own
    open waited out the lock a second time, 10 s against the 5 s its message names."""
    try:
        _check_regular(path)
        if not path.is_file():
            return None
        conn = _connect_read_only(path)
    except (ConsolidatorError, OSError, sqlite3.Error):
        return None
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        return _binding(conn)
    except sqlite3.DatabaseError as exc:
        if _primary_code(exc) in _BUSY_CODES:
            raise explained(exc, path, opening=True) from exc
        return None
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _binding(conn: sqlite3.Connection) -> DataDirBinding | None:
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) < DATA_DIR_VERSION:
        return None
    row = conn.execute("SELECT id, path FROM data_dir").fetchone()
    return None if row is None else DataDirBinding(str(row[0]), str(row[1]))


SHM_IN_USE_BYTES = 32 * 1024  # SQLite sizes a -shm to at least this before anyone uses it


def _remove_unused_wal(path: Path) -> None:
    """After an open that failed, remove the `-wal` and `-shm` it created if nobody uses them.

    On a full volume the open creates an empty `-wal` and a `-shm` it cannot size (3 bytes).
    Left there, they failed every read-only open after it, `status --liveness` and `history`
    included, with a disk I/O error until space was freed: a reader must size the `-shm` it
    finds. A `-wal` with a byte in it may hold commits, and a `-shm` of full size may be
    another connection's: those stay."""
    wal, shm = path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")
    try:
        if wal.stat().st_size or shm.stat().st_size >= SHM_IN_USE_BYTES:
            return
        wal.unlink()  # first: a -shm alone is never read
        shm.unlink()
    except OSError:
        return


def _check_regular(path: Path) -> None:
    """A journal path on a FIFO made SQLite wait in open() for a writer forever (history and
    status hung); on a folder or a device it fails with a less telling message."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"cannot open journal ({exc.strerror or exc})", path) from exc
    reason = durable.not_regular_reason(mode)
    if reason is not None:
        raise JournalError(f"cannot open journal: it is {reason}", path)
