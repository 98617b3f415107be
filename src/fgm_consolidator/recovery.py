"""Bring every merge the journal left unfinished to a terminal state, or flag it for a person.

Recovery decides from what is really on disk, because the disk can be one step ahead of the
journal: an output in place with the recorded checksum means the rename happened, whatever the
journal's last word. It rolls forward only from a verified output, rolls back only while every
source is intact, and otherwise touches nothing and says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import crashpoints, durable
from .errors import NameTakenError
from .journal import Journal, MergeRecord
from .layout import companion_name, is_our_tmp, iter_partitions, tmp_name
from .logs import log_event
from .merge import finish, roll_back
from .states import MergeState

ACTOR = "recovery"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryAction:
    merge_id: int
    partition: str
    output: str
    found: MergeState
    result: MergeState
    action: str  # "resumed", "rolled back", "needs a person"
    reason: str


@dataclass
class RecoveryReport:
    actions: list[RecoveryAction] = field(default_factory=list)
    swept: list[Path] = field(default_factory=list)

    @property
    def needs_person(self) -> list[RecoveryAction]:
        return [a for a in self.actions if a.result is MergeState.NEEDS_ATTENTION]


def checksum(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def _broken_sources(folder: Path, record: MergeRecord) -> list[str]:
    """Names of sources that are missing or changed; empty when rolling back loses nothing."""
    broken = []
    for source in record.sources:
        try:
            if durable.identity(folder / source.name) != source.identity:
                broken.append(f"{source.name} (changed)")
        except FileNotFoundError:
            broken.append(f"{source.name} (missing)")
    return broken


def _action(record: MergeRecord, result: MergeState, action: str, reason: str) -> RecoveryAction:
    return RecoveryAction(
        record.id, record.partition, record.output, record.state, result, action, reason
    )


def resolve(journal: Journal, data_dir: Path, record: MergeRecord) -> RecoveryAction:
    folder = data_dir / record.partition
    state = record.last_action_state
    if state in (MergeState.PLANNED, MergeState.WRITING):
        reason = f"interrupted while {state}; sources intact, temp files removed"
        roll_back(journal, folder, record.id, record.output, error=reason, actor=ACTOR)
        return _action(record, MergeState.ROLLED_BACK, "rolled back", reason)

    final = folder / record.output
    output_ok = checksum(final) == record.output_checksum
    tmp_ok = checksum(folder / tmp_name(record.output)) == record.output_checksum
    if output_ok or (state is MergeState.WRITTEN and tmp_ok and not final.exists()):
        try:
            result, error = finish(journal, folder, record, actor=ACTOR)
        except NameTakenError as exc:  # the companion's name is taken by a foreign file
            return _needs_person(journal, record, str(exc))
        if error is None:
            return _action(record, result, "resumed", f"output verified, finished from {state}")
        action = "rolled back" if result is MergeState.ROLLED_BACK else "needs a person"
        return _action(record, result, action, error)
    broken = _broken_sources(folder, record)
    if not broken and (state is MergeState.WRITTEN or not final.exists()):
        reason = f"interrupted at {state}; output not verifiable, sources intact"
        roll_back(journal, folder, record.id, record.output, error=reason, actor=ACTOR)
        return _action(record, MergeState.ROLLED_BACK, "rolled back", reason)
    what = "corrupt (checksum differs)" if final.exists() else "missing"
    listed = ", ".join(broken) or "none"
    reason = f"output {record.output} is {what}; sources not intact: {listed}"
    return _needs_person(journal, record, reason)


def _needs_person(journal: Journal, record: MergeRecord, reason: str) -> RecoveryAction:
    """Flag once; a merge already flagged is re-checked every pass without new history rows."""
    if record.state is not MergeState.NEEDS_ATTENTION:
        journal.transition(record.id, MergeState.NEEDS_ATTENTION, actor=ACTOR, error=reason)
    return _action(record, MergeState.NEEDS_ATTENTION, "needs a person", reason)


def sweep_orphans(data_dir: Path, keep: set[tuple[str, str]]) -> list[Path]:
    """Remove temp files of ours that no unfinished merge accounts for (e.g. journal lost).

    A folder we cannot read or clean is logged and skipped: it must not stop start-up.
    """
    removed = []
    for partition in iter_partitions(data_dir):
        folder = data_dir / partition
        try:
            mine = [
                folder / entry.name
                for entry in os.scandir(folder)
                if is_our_tmp(entry.name) and (partition, entry.name) not in keep
            ]
            for path in mine:
                if durable.remove(path):
                    removed.append(path)
            if mine:
                durable.fsync_dir(folder)
                crashpoints.reach("recovery:swept")
        except OSError as exc:
            log_event(log, "sweep-failed", logging.ERROR, partition=partition, error=exc)
    return removed


def recover(journal: Journal, data_dir: Path, *, sweep: bool = True) -> RecoveryReport:
    report = RecoveryReport()
    for record in journal.unfinished():
        action = resolve(journal, data_dir, record)
        report.actions.append(action)
        crashpoints.reach(f"recovery:{action.action.replace(' ', '-')}")
    if sweep:
        keep = {
            (record.partition, tmp_name(name))
            for record in journal.unfinished()
            for name in (record.output, companion_name(record.output))
        }
        report.swept = sweep_orphans(data_dir, keep)
    return report
