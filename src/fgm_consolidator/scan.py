"""Look at one partition folder and say which files could be merged now.

Only names that parse as the monitor's or ours count. A file is eligible when it is older than
`min_age` by mtime and its footer reads; a file that fails to read is reported once per version
(size, mtime and ctime) and then skipped, so it never blocks its partition (invariant 4).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from . import durable, footers
from .durable import FileIdentity
from .errors import SchemaConflictError, SourceReadError
from .journal import SourceRecord, UnreadableRecord
from .layout import MONITOR_ROTATION_S, DataFileName, companion_name, parse_data_file
from .logs import log_event
from .reading import UNREADABLE
from .schemas import check_mergeable, fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFile:
    """A readable data file with what its footer says, ready to be planned."""

    file: DataFileName
    identity: FileIdentity
    rows: int
    schema: pa.Schema
    companion: FileIdentity | None
    ctime_ns: int  # as scanned: the version to record if a merge finds the file unreadable
    digest: str  # its footer's (`footers.footer_digest`), for the lineage of its output
    # An output of ours: its lineage as read with that footer (`footers.Footer`), whose
    # sources and ancestors become the ancestors of the output that merges it
    packed_lineage: bytes | None = None

    @property
    def name(self) -> str:
        return self.file.name

    def record(self) -> SourceRecord:
        return SourceRecord(
            self.name, self.identity, self.rows, fingerprint(self.schema), self.companion
        )


@dataclass(frozen=True)
class UnreadableFile:
    name: str
    identity: FileIdentity
    reason: str
    ctime_ns: int


@dataclass(frozen=True)
class PartitionScan:
    partition: str
    folder: Path
    eligible: tuple[SourceFile, ...]
    unreadable: tuple[UnreadableFile, ...]
    young: int
    names: frozenset[str]
    held: frozenset[str] = frozenset()  # data files here held out of merges (`plan_one`)


def read_footer(path: Path) -> footers.Footer:
    """Identity, row count, Arrow schema and digest, taken from one open file so they agree."""
    try:
        footer = footers.read(path)
    except UNREADABLE as exc:
        raise SourceReadError(f"unreadable parquet footer: {exc}", path) from exc
    if footer.int96:
        # pyarrow reads INT96 as nanoseconds whatever the stored Arrow schema says, and wraps
        # an instant outside 1677-2262 without a word: 2500-01-01 was merged as 1915-06-14.
        raise SchemaConflictError(
            f"column {footer.int96[0]} is stored as INT96, a legacy timestamp pyarrow cannot"
            " read exactly (the monitor writes INT64)"
        )
    if footer.retyped:
        raise SchemaConflictError(
            f"column {footer.retyped[0]}: merged, it would change type for readers that take"
            " types from the stored Arrow schema"
        )
    return footer


def is_recorded_version(record: UnreadableRecord, st: os.stat_result) -> bool:
    """True while the file `st` describes is the version `record` found unreadable.

    A version is size, mtime and ctime. `chmod` and `chown` change only the ctime, and they are
    how a person fixes a file that was unreadable for its mode: without the ctime such a file
    stayed out of every merge once fixed. A record from before ctime was kept (journal schema
    2) holds while the file's ctime is no later than the record's first_seen: nothing about
    the file changed since it was found unreadable, so it needs no second look (nor a second
    report); a file changed since gets one, and is recorded with its ctime if still unreadable.
    """
    if (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
        return False
    if record.ctime_ns is not None:
        return st.st_ctime_ns == record.ctime_ns
    if not record.first_seen:
        return False
    return st.st_ctime_ns <= datetime.fromisoformat(record.first_seen).timestamp() * 1e9


def still_on_disk(data_dir: Path, record: UnreadableRecord) -> bool:
    """The journal remembers every unreadable version of a file: is this one still there? A
    file gone, or another version of it, is not; one we cannot look at (a folder we may not
    search) counts as there, so that nothing is reported fixed or forgotten on a guess."""
    try:
        st = os.lstat(data_dir / record.partition / record.name)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return is_recorded_version(record, st)


def _companion_held(companion: Path, known: dict[str, list[UnreadableRecord]]) -> bool:
    """True while a file's companion is the version a merge found unreadable: the file waits
    for its companion to change or go, as a file found unreadable itself waits for itself."""
    records = known.get(companion.name, ())
    if not records:
        return False
    try:
        st = os.lstat(companion)
    except FileNotFoundError:
        return False
    return any(is_recorded_version(record, st) for record in records)


# An mtime more than a rotation ahead of the clock is a clock that moved (stepped back by NTP,
# an RTC off at boot), not a write: a file being written takes the clock's time at every write.
AHEAD_SLACK_S = MONITOR_ROTATION_S
_ahead: dict[Path, tuple[FileIdentity, float]] = {}  # version, and when first seen (monotonic)
_AHEAD_LIMIT = 65_536


def _age(path: Path, st: os.stat_result, now: float) -> float:
    """How long the file has stayed as it is. By its mtime; but an mtime ahead of the clock
    would keep it young until the clock caught up (a day of files a year ahead merged
    nothing, and `status` called it healthy), so such a file counts from when this process
    first saw this version of it, less a rotation: the writer's clock may be the one that is
    ahead, and a file is written for a rotation at most, so one unchanged that long is done
    (even at `--min-age 0`). A `run --once` or `status` process sees it for the first time,
    so for them it stays young: the service ages it."""
    age = now - st.st_mtime_ns / 1e9
    if age >= -AHEAD_SLACK_S:
        return age
    version = FileIdentity.of(st)
    seen = _ahead.get(path)
    if seen is None or seen[0] != version:
        if len(_ahead) >= _AHEAD_LIMIT:
            _ahead.clear()
        seen = _ahead[path] = (version, time.monotonic())
        # info: the service handles it, and `status`, which sees every such file anew at each
        # probe, must not print a line for each
        log_event(log, "mtime-ahead", logging.INFO, path=path, ahead_s=round(-age, 1))
    return time.monotonic() - seen[1] - MONITOR_ROTATION_S


def scan_partition(
    data_dir: Path,
    partition: str,
    *,
    min_age_s: float,
    now: float,
    known_unreadable: Collection[UnreadableRecord],
    held: Collection[str],
) -> PartitionScan:
    """`known_unreadable`: the journal's records of this partition's unreadable files."""
    folder = data_dir / partition
    known: dict[str, list[UnreadableRecord]] = {}
    for record in known_unreadable:
        known.setdefault(record.name, []).append(record)
    names = frozenset(entry.name for entry in os.scandir(folder))
    eligible: list[SourceFile] = []
    unreadable: list[UnreadableFile] = []
    young = 0
    for name in sorted(names):
        parsed = parse_data_file(name)
        if parsed is None or name in held:
            continue
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # deleted between listing and now
        if _age(path, st, now) < min_age_s:
            young += 1
            continue
        if any(is_recorded_version(record, st) for record in known.get(name, ())):
            continue
        if _companion_held(folder / companion_name(name), known):
            continue
        on_disk = FileIdentity.of(st)
        try:
            not_regular = durable.not_regular_reason(st.st_mode)
            if not_regular is not None:
                raise SourceReadError(f"{not_regular}; left alone", path)
            footer = read_footer(path)
            check_mergeable(footer.schema)
        except SchemaConflictError as exc:
            reason = f"cannot be merged: {exc.reason}"
            unreadable.append(UnreadableFile(name, on_disk, reason, st.st_ctime_ns))
            continue
        except SourceReadError as exc:
            unreadable.append(UnreadableFile(name, on_disk, exc.reason, st.st_ctime_ns))
            continue
        companion = durable.optional_identity(folder / companion_name(name))
        eligible.append(
            SourceFile(
                parsed,
                footer.identity,
                footer.rows,
                footer.schema,
                companion,
                st.st_ctime_ns,
                footer.digest,
                footer.packed_lineage if parsed.kind == "consolidated" else None,
            )
        )
    eligible.sort(key=lambda s: s.file)
    held_here = frozenset(name for name in names & set(held) if parse_data_file(name))
    return PartitionScan(
        partition, folder, tuple(eligible), tuple(unreadable), young, names, held_here
    )
