"""Bring every merge the journal left unfinished to a terminal state, or flag it for a person.

Recovery decides from what is really on disk, because the disk can be one step ahead of the
journal: an output in place with the recorded checksum means the rename happened, whatever the
journal's last word. It rolls forward only from a verified output, rolls back only while every
source is intact, and otherwise touches nothing and says why.

A stop request (`should_stop`, the service's signal flag) is honoured between merges and
between partitions, never inside one merge's steps: what is left is the next recovery's work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path

from . import companions, crashpoints, durable, footers, lineage
from .backoff import DEFAULT_INTERVAL_S, Hold, hold_for
from .containment import StopCheck
from .durable import FileIdentity
from .errors import CompanionError, NameTakenError, ProofStopped, Unexpected
from .isolation import PartitionFailure, isolated
from .journal import Journal, MergeRecord, SourceRecord
from .layout import (
    COMPANION_SUFFIX,
    PARQUET_SUFFIX,
    TMP_SUFFIX,
    companion_name,
    is_our_tmp,
    iter_partitions,
    linked_folder,
    tmp_name,
)
from .logs import context, log_event
from .merge import finish, named_sources, rivals, roll_back, write_companion_tmp
from .observe import Observer
from .plan import shown_new
from .schemas import era_of
from .schemas import fingerprint as schema_fingerprint
from .states import MergeState

ACTOR = "recovery"


class Step(StrEnum):
    """What recovery did with one unfinished merge: printed by `recover`, logged, and the name
    of the crash point reached after it (spaces as dashes)."""

    RESUMED = "resumed"
    ROLLED_BACK = "rolled back"
    NEEDS_A_PERSON = "needs a person"
    FAILED = "failed"  # the disk refused a step; left as it was for the next recovery

    @property
    def crash_point(self) -> str:
        return "recovery:" + self.value.replace(" ", "-")


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryAction:
    merge_id: int
    partition: str
    output: str
    found: MergeState
    result: MergeState
    action: Step
    reason: str


@dataclass(frozen=True)
class LineageAction:
    """A file an output's lineage says it holds, found beside it without an unfinished merge
    of our journal to explain it (the journal was lost, or another instance was at work)."""

    partition: str
    output: str
    file: str
    removed: bool
    reason: str
    released: bool = False  # shown new: merged like any other file from now on

    @property
    def verb(self) -> str:
        return "removed" if self.removed else "released" if self.released else "kept"


@dataclass
class RecoveryReport:
    actions: list[RecoveryAction] = field(default_factory=list)
    swept: list[Path] = field(default_factory=list)
    published: list[Path] = field(default_factory=list)  # companions of cut publishes
    lineage: list[LineageAction] = field(default_factory=list)
    stopped: bool = False  # a stop request cut it short: the rest is the next recovery's

    @property
    def needs_person(self) -> list[RecoveryAction]:
        return [a for a in self.actions if a.result is MergeState.NEEDS_ATTENTION]

    @property
    def failed(self) -> list[RecoveryAction]:
        """Merges an I/O error left as they were, for the next recovery to try again."""
        return [a for a in self.actions if a.action is Step.FAILED]

    @property
    def uncertain(self) -> list[LineageAction]:
        return [a for a in self.lineage if not (a.removed or a.released)]


class _Heeded:
    """A stop check that remembers whether it ever said stop. Every step that asks stops
    when told to, so that alone says whether the recovery was cut short: a signal that came
    after the last question (`recover` printed `stopped=True` for work all done) is not."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._should_stop = should_stop
        self.said_stop = False

    def __call__(self) -> bool:
        if self._should_stop():
            self.said_stop = True
        return self.said_stop


def checksum(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def hold(journal: Journal, partition: str, interval_s: float) -> Hold | None:
    """The wait of a partition whose latest merges recovery found dead with their process."""
    deaths = journal.deaths(partition, ACTOR)
    return hold_for(deaths.count, deaths.last_at, interval_s)


class ProofGuard:
    """Keeps a lineage proof that kills its process from killing every start after it.

    The proof reads whatever files it finds, and a file can make a reader die (out of memory,
    a crash in a decoder) where no exception can be caught. Then every start dies in the
    same proof, and the sidecar never merges again. So each proof is journaled while it runs
    (`Journal.begin_attempt`); from the second death in a row it is held, like a partition
    whose merges die (`hold_for`: one interval, then doubling), and its files are kept and
    reported meanwhile. One death (a deploy's SIGKILL) costs nothing.
    """

    def __init__(self, journal: Journal, interval_s: float) -> None:
        self._journal = journal
        self._interval_s = interval_s

    def held(self, subject: str) -> Hold | None:
        deaths = self._journal.attempt_deaths(subject)
        held = hold_for(deaths.count, deaths.last_at, self._interval_s)
        return held if held is not None and held.active(Journal.now()) else None

    def run(
        self,
        subject: str,
        names: Collection[str],
        prove: Callable[[], dict[str, str]],
        *,
        journaled: bool = True,
    ) -> dict[str, str]:
        """`prove()`, journaled as an attempt unless `journaled` is false (`status` only
        reads); while `subject` is held, a doubt for each of `names` saying so instead."""
        waiting = self.held(subject)
        if waiting is not None:
            return dict.fromkeys(names, held_reason(waiting))
        if not journaled:
            return prove()
        with self.attempt(subject):
            return prove()

    @contextmanager
    def attempt(self, subject: str) -> Iterator[None]:
        """The block's work, journaled as begun until it ends, however it ends: only a death
        leaves the row."""
        self._journal.begin_attempt(subject)
        crashpoints.reach("recovery:attempt-begun")
        try:
            yield
        finally:
            self._journal.end_attempt(subject)


def proof_subject(partition: str, output: str) -> str:
    return f"lineage:{partition}/{output}"


def held_reason(held: Hold) -> str:
    until = held.until.isoformat(timespec="seconds")
    return (
        f"its proof died with the process {held.deaths} times in a row (out of memory? a crash"
        f" reading a file?); files kept, tried again at a start after {until}"
    )


def _broken_sources(folder: Path, record: MergeRecord) -> list[str]:
    """Names of sources that are missing or changed; empty when rolling back loses nothing.

    A source gone but listed by another live output is not broken: its rows are there (the
    rule `_yield_to` withdraws by). A withdrawal cut between its two unlinks, after which the
    rival's instance deleted that source, was left for a person, its companion beside no
    file and its other sources held for good."""
    broken, missing = [], []
    for source in record.sources:
        now = durable.optional_identity(folder / source.name)
        if now is None:
            missing.append(source.name)
        elif now != source.identity:
            broken.append(f"{source.name} (changed)")
    if missing:
        # Our output is missing or in doubt here: its lineage does not say which files we read.
        ours = named_sources(record)
        listed = lineage.held_elsewhere(ours, rivals(folder, record, ours))
        broken += [f"{name} (missing)" for name in missing if name not in listed]
    return broken


def _action(record: MergeRecord, result: MergeState, action: Step, reason: str) -> RecoveryAction:
    return RecoveryAction(
        record.id, record.partition, record.output, record.state, result, action, reason
    )


def resolve(
    journal: Journal,
    data_dir: Path,
    record: MergeRecord,
    guard: ProofGuard,
    should_stop: StopCheck | None = None,
) -> RecoveryAction:
    link = linked_folder(data_dir, record.partition)
    if link is not None:  # finishing through it would delete files outside --data-dir
        return _needs_person(
            journal, record, f"{link} is a symbolic link now; move the folder back, then recover"
        )
    folder = data_dir / record.partition
    state = record.last_action_state
    if not os.path.lexists(folder):
        # Removed by a person or a job (a pod's folder cleaned up): the output and the sources
        # went with it, so there is nothing left to keep or to finish. `roll_back` names it.
        reason = roll_back(
            journal, folder, record.id, record.output, error=f"interrupted at {state}", actor=ACTOR
        )
        return _action(record, MergeState.ROLLED_BACK, Step.ROLLED_BACK, reason)
    if state in (MergeState.PLANNED, MergeState.WRITING):
        reason = f"interrupted while {state}; sources intact, temp files removed"
        roll_back(journal, folder, record.id, record.output, error=reason, actor=ACTOR)
        return _action(record, MergeState.ROLLED_BACK, Step.ROLLED_BACK, reason)

    final = folder / record.output
    output_ok = checksum(final) == record.output_checksum
    tmp_ok = checksum(folder / tmp_name(record.output)) == record.output_checksum
    companion_doubt = _companion_doubt(folder, record)
    if companion_doubt is None and (
        output_ok or (state is MergeState.WRITTEN and tmp_ok and not final.exists())
    ):
        vouched = final if output_ok else folder / tmp_name(record.output)
        copies, doubt = proven_copies(folder, record, vouched, guard, should_stop)
        if doubt is not None:
            return _needs_person(journal, record, doubt)
        try:
            result, error = finish(journal, folder, record, actor=ACTOR, copies=copies)
        except NameTakenError as exc:  # the companion's name is taken by a foreign file
            return _needs_person(journal, record, str(exc))
        if error is None:
            return _action(record, result, Step.RESUMED, f"output verified, finished from {state}")
        action = Step.ROLLED_BACK if result is MergeState.ROLLED_BACK else Step.NEEDS_A_PERSON
        return _action(record, result, action, error)
    broken = _broken_sources(folder, record)
    if not broken and not output_ok and (state is MergeState.WRITTEN or not final.exists()):
        reason = f"interrupted at {state}; output not verifiable, sources intact"
        if companion_doubt is not None:
            reason = f"interrupted at {state}; {companion_doubt}, sources intact"
        lone = _lone_companion(folder, record)
        if lone is not None:
            durable.remove(lone)  # made durable by the roll back's sync
            reason += f"; its companion {lone.name} removed"
        roll_back(journal, folder, record.id, record.output, error=reason, actor=ACTOR)
        return _action(record, MergeState.ROLLED_BACK, Step.ROLLED_BACK, reason)
    if output_ok:  # then only the companion is in doubt
        reason = f"{companion_doubt}; output {record.output} verified, nothing deleted"
        return _needs_person(journal, record, reason)
    what = "corrupt (checksum differs)" if final.exists() else "missing"
    taken_by = None if final.exists() else _merged_again(journal, folder, record)
    if taken_by is not None:
        what += (
            f", and {taken_by} lists an output of its name and rows: if this journal is older"
            " than the disk (a copy restored), this merge had finished and its rows are there,"
            " and the output restored from a backup would hold them twice"
        )
    listed = ", ".join(broken) or "none"
    reason = f"output {record.output} is {what}; sources not intact: {listed}"
    return _needs_person(journal, record, reason)


def _merged_again(journal: Journal, folder: Path, record: MergeRecord) -> str | None:
    """The output here whose lineage lists `record`'s output, gone, with its rows, written by
    a later merge this journal does not know. A merge takes no file of an unfinished one
    (those are held), so if this journal is an older copy restored, this merge had finished
    and its rows are in that output; a person is told so, since restoring the output from a
    backup, the recipe for a lost one, would then keep its rows twice (an adversarial
    crash-safety review). Only told: a journal lost and begun again numbers its merges from
    1 again, and an output under the same name merged before the clock stepped back looks
    just the same, its rows not this merge's. A merge the journal knows, or an earlier one,
    took such an older output, and is not named."""
    names = lineage.list_names(folder)
    for output, held in lineage.lineages(folder, names, every_ancestor=True).items():
        later = held.merge_id > record.id
        if not later or journal.wrote(held.merge_id, record.partition, output):
            continue
        listed = (*held.sources, *held.ancestors)  # an ancestor: merged again since, in turn
        if any(s.name == record.output and s.rows == record.output_rows for s in listed):
            return output
    return None


# Copies whose rows a proof found to differ, with the identity proven and the reason: the
# merge waits for a person, and each pass checks it again. Proving again while nothing
# changed read the output and the file at every pass, a minute of CPU for a 4 h output. A
# restart proves once more.
_failed_proofs: dict[Path, tuple[FileIdentity, str]] = {}


def copied_sources(
    folder: Path, record: MergeRecord, held: lineage.Lineage
) -> dict[str, FileIdentity]:
    """Sources found under another inode or mtime with the footer digest `held` (the output's
    lineage) records of them: a copy or a `touch`. Each with the identity it has now."""
    digests = held.footers()
    found = {}
    for source in record.sources:
        path = folder / source.name
        now = durable.optional_identity(path)
        if now not in (None, source.identity) and footers.digest_matches(
            path, digests.get(source.name)
        ):
            found[source.name] = now
    return found


def proven_copies(
    folder: Path,
    record: MergeRecord,
    output: Path,
    guard: ProofGuard,
    should_stop: StopCheck | None,
) -> tuple[dict[str, FileIdentity], str | None]:
    """Sources found under another inode or mtime, with the footer digest `output`'s lineage
    records of them, proven to hold only rows of `output` (`lineage.unproven`, the proof
    lineage recovery deletes by): each with the identity it was proven under, for
    `delete_sources`. Else why one is not. A copy of a data directory (`cp -a`, a restored
    backup) gives every file a new inode, and each source taken for a changed one left the
    output's rows twice until a person came. The footer is the cheap gate; the rows are the
    proof, which `guard` holds once it kills the process, and which `should_stop` ends
    (ProofStopped) so that a stop during start-up is not kept waiting."""
    held = lineage.read(output)
    if held is None:
        return {}, None  # the identity's word alone: `delete_sources` stops at a changed one
    found = copied_sources(folder, record, held)
    for name, now in found.items():
        failed = _failed_proofs.get(folder / name)
        if failed is not None and failed[0] == now:
            return {}, failed[1]  # nothing changed since its rows were found to differ
    proved: list[bool] = []

    def prove() -> dict[str, str]:
        proved.append(True)
        paths = [folder / name for name in found]
        return lineage.unproven(output, held, paths, should_stop=should_stop)

    doubts = guard.run(proof_subject(record.partition, record.output), list(found), prove)
    if doubts:
        name, why = min(doubts.items())
        reason = (
            f"{folder / name}: changed after merge {record.id} was planned (its footer as"
            f" merged, its rows not shown to be the output's: {why}); kept, output"
            f" {record.output} may duplicate its rows"
        )
        if proved:  # not a proof held for killing its process: that one is tried again
            _failed_proofs[folder / name] = (found[name], reason)
        return {}, reason
    log_event(log, "sources-proven", merge_id=record.id, files=len(found))
    return found, None


def _lone_companion(folder: Path, record: MergeRecord) -> Path | None:
    """Our published companion, when the output it describes is gone (a withdrawal cut between
    its two unlinks, or a person who removed the output). A roll back leaves no file of ours:
    kept, it lists containers of no file, and its name, taken, stops the same sources from
    ever being merged again. Ours only by the journaled checksum; a merge from before
    migration 6 has none, and its companion stays."""
    if record.companion_checksum is None or (folder / record.output).exists():
        return None
    final = folder / companion_name(record.output)
    return final if checksum(final) == record.companion_checksum else None


def _companion_doubt(folder: Path, record: MergeRecord) -> str | None:
    """Why the output's companion, temp or published, cannot be published as it is; None
    when it is the one written (or the output has none). `written` promises it as it
    promises the output (DESIGN step 3): a torn one published deleted every source's
    companion, and their containers vanished from the viewer. Its checksum is journaled
    with the output's (migration 6); a merge written before that is checked by decoding."""
    if not record.has_companion:
        return None
    name = companion_name(record.output)
    temp, final = folder / tmp_name(name), folder / name
    present = temp if temp.exists() else final
    if not present.exists():
        return f"companion {name} is missing"
    if record.companion_checksum is not None:
        if checksum(present) != record.companion_checksum:
            return f"companion {present.name} is not the one written (checksum differs)"
        return None
    try:
        companions.read_companion(present)
    except CompanionError as exc:
        return f"companion {present.name} does not read: {exc.reason}"
    return None


def _resolve_or_leave(
    journal: Journal,
    data_dir: Path,
    record: MergeRecord,
    guard: ProofGuard,
    should_stop: StopCheck,
) -> RecoveryAction:
    """`resolve`, or the merge left in its state when the disk refuses a step (a source nobody
    may delete, EIO). Each step is safe to redo from the journal's state, as after a kill, so
    the next recovery tries again; meanwhile its sources stay held and the other merges and
    partitions go on. Raised, one such file once stopped start-up and failed every pass.
    An exception no check foresaw is left the same way, naming where it was raised; a journal
    error is not: without the journal, no recovery is safe."""
    try:
        return resolve(journal, data_dir, record, guard, should_stop)
    except (sqlite3.Error, ProofStopped):
        raise
    except OSError as exc:
        reason = f"{exc}; left {record.state}, the next recovery tries again"
        log_event(log, "recovery-failed", logging.ERROR, error=reason)
        return _action(record, record.state, Step.FAILED, reason)
    except Exception as exc:
        unexpected = Unexpected.of(exc)
        reason = f"{unexpected.text}; left {record.state}, the next recovery tries again"
        log_event(log, "recovery-failed", logging.ERROR, error=reason, where=unexpected.where)
        return _action(record, record.state, Step.FAILED, reason)


def _needs_person(journal: Journal, record: MergeRecord, reason: str) -> RecoveryAction:
    """Flag once; a merge already flagged is re-checked every pass without new history rows."""
    if record.state is not MergeState.NEEDS_ATTENTION:
        journal.transition(record.id, MergeState.NEEDS_ATTENTION, actor=ACTOR, error=reason)
    return _action(record, MergeState.NEEDS_ATTENTION, Step.NEEDS_A_PERSON, reason)


@dataclass(frozen=True)
class Swept:
    removed: list[Path]
    published: list[Path]  # companions of a cut publish, given their final names


def sweep_orphans(data_dir: Path, keep: set[tuple[str, str]]) -> Swept:
    """Remove temp files of ours that no unfinished merge accounts for (e.g. journal lost),
    but publish the companion temp of a cut publish (`_cut_publish_companion`).

    A folder we cannot read or clean is logged and skipped: it must not stop start-up.
    """
    removed, published = [], []
    for partition in iter_partitions(data_dir):
        folder = data_dir / partition
        try:
            named = [
                entry
                for entry in os.scandir(folder)
                if is_our_tmp(entry.name) and (partition, entry.name) not in keep
            ]
            mine = []
            for entry in named:
                if entry.is_file(follow_symlinks=False):  # we only ever write plain files
                    mine.append(folder / entry.name)
                    continue
                log_event(
                    log,
                    "sweep-skipped",
                    logging.WARNING,
                    partition=partition,
                    file=entry.name,
                    reason="named like our temp file but not a regular file; left alone",
                )
            for path in mine:
                final = _cut_publish_companion(path)
                if final is not None:
                    durable.rename_no_replace(path, final)
                    published.append(final)
                elif durable.remove(path):
                    removed.append(path)
            if mine:
                durable.fsync_dir(folder)
                crashpoints.reach("recovery:swept")
        except OSError as exc:
            log_event(log, "sweep-failed", logging.ERROR, partition=partition, error=exc)
    return Swept(removed, published)


def _cut_publish_companion(temp: Path) -> Path | None:
    """The final name an orphan companion temp of ours is owed, or None to sweep it.

    `publish` renames the output first, so only a publish cut between its two renames (with
    the journal lost) leaves a published output, without companion, beside its companion's
    temp, which was complete and read back before `written`. Swept, it left the output
    without a companion and the viewer without its sources' containers (their own companions
    then stayed behind, alone). Owed only when it decodes."""
    final = temp.with_name(temp.name.removesuffix(TMP_SUFFIX))
    if final.suffix != COMPANION_SUFFIX or final.exists():
        return None
    if not final.with_suffix(PARQUET_SUFFIX).is_file():
        return None
    try:
        companions.read_companion(temp)
    except CompanionError as exc:
        log_event(log, "orphan-not-published", logging.WARNING, path=temp, reason=exc.reason)
        return None
    return final


def _never() -> bool:
    return False


def recover(
    journal: Journal,
    data_dir: Path,
    *,
    sweep: bool = True,
    observer: Observer | None = None,
    should_stop: Callable[[], bool] = _never,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> RecoveryReport:
    """`sweep` (start-up and the `recover` command, under the lock) also removes orphan temp
    files and settles, from their lineage, outputs whose sources are still present; a proof
    that died with its process twice in a row waits like a failing partition (`interval_s`,
    doubling; `ProofGuard`). Once `should_stop()` is true, the report holds what was done so
    far."""
    observer = observer or Observer()
    report = RecoveryReport()
    heeded = _Heeded(should_stop)
    try:
        _recover(journal, data_dir, report, sweep, observer, heeded, interval_s)
    finally:
        report.stopped = heeded.said_stop
    return report


def _recover(
    journal: Journal,
    data_dir: Path,
    report: RecoveryReport,
    sweep: bool,
    observer: Observer,
    should_stop: Callable[[], bool],
    interval_s: float,
) -> None:
    guard = ProofGuard(journal, interval_s)
    if sweep:  # under the lock: no pass of another process runs
        journal.interrupt_dead_passes()
    unfinished = journal.unfinished()
    observer.recovery_started(len(unfinished))
    for record in unfinished:
        if should_stop():
            return
        with context(merge_id=record.id, partition=record.partition, output=record.output):
            try:
                action = _resolve_or_leave(journal, data_dir, record, guard, should_stop)
            except ProofStopped as exc:  # the merge stays as it was, for the next start
                log_event(log, "recovery-stopped", reason=str(exc))
                return
        report.actions.append(action)
        crashpoints.reach(action.action.crash_point)
        observer.observe_recovery(action)
    if sweep and not should_stop():
        unfinished = journal.unfinished()
        keep = {
            (record.partition, tmp_name(name))
            for record in unfinished
            for name in (record.output, companion_name(record.output))
        }
        swept = sweep_orphans(data_dir, keep)
        report.swept, report.published = swept.removed, swept.published
        busy = {(record.partition, record.output) for record in unfinished}
        report.lineage = recover_from_lineage(journal, data_dir, busy, should_stop, guard)


def recover_from_lineage(
    journal: Journal,
    data_dir: Path,
    busy: set[tuple[str, str]],
    should_stop: Callable[[], bool] = _never,
    guard: ProofGuard | None = None,
) -> list[LineageAction]:
    """Remove the present files that an output provably holds already; report the rest.

    A file goes only when an output's lineage lists it with its row count, the output reads
    back completely, and every row of the file is among the output's (`judge_partition`;
    outputs are laid out by metric, so no offset in them holds a source's rows), and only
    once the journal has adopted the output as a merge holding it (`_adopt`). A file that
    two outputs claim, an output that does not read back, a file that differs: all stay where
    they are, reported, and held out of later merges. Outputs of an unfinished merge of our
    journal (`busy`) are the journal's business.
    """
    actions: list[LineageAction] = []
    for partition in iter_partitions(data_dir):
        if should_stop():
            break
        # A partition that fails is logged and left: nothing is deleted unproven, and the
        # planner holds the files an output claims.
        settled = isolated(
            _settle_partition, data_dir / partition, partition, busy, guard, journal, should_stop
        )
        if isinstance(settled, PartitionFailure) and isinstance(settled.error, ProofStopped):
            log_event(log, "lineage-check-stopped", partition=partition, reason=str(settled.error))
            break
        if isinstance(settled, PartitionFailure):
            log_event(
                log, "lineage-check-failed", logging.ERROR, partition=partition, **settled.fields
            )
        else:
            actions.extend(settled)
    return actions


@dataclass(frozen=True)
class LineageVerdict:
    """One finding of the lineage check, before anything is done about it."""

    output: str
    file: str  # a file the output's lineage lists, or (an overlap) the outputs sharing sources
    doubt: str | None  # why the output is not shown to hold the file's rows; None: proven
    before: durable.FileIdentity | None  # the file's identity from before the proof
    # Set for a file under a name the output lists with another footer: without a doubt, this
    # version of it shares no row with the output, and is new.
    new_footer: str | None = None

    def action(self, partition: str) -> LineageAction:
        """This finding reported as it stands: the file kept."""
        return LineageAction(partition, self.output, self.file, False, self.doubt or "")


def judge_partition(
    folder: Path,
    partition: str,
    names: Collection[str],
    busy: Collection[tuple[str, str]],
    *,
    compare_rows: bool = True,
    guard: ProofGuard | None = None,
    shown_new: lineage.ShownNew = lineage.nothing_shown,
    should_stop: StopCheck | None = None,
) -> list[LineageVerdict]:
    """What each output's lineage says of the files beside it, among `names`; changes nothing.

    A file is proven held (no doubt) only when the output reads back whole, the counts add up
    and every row of the file is among the output's. A file under a listed name but another
    footer is shown new (no doubt, `new_footer`) only when none of its rows is among the
    output's (`lineage.share_rows`). Without `compare_rows` only footers are read, which
    `status` can afford on every call: nothing is proven then, and a file whose counts agree
    gets a doubt saying its rows were not compared. Outputs of an unfinished merge of our
    journal (`busy`) are the journal's business. `shown_new`: what the journal shows new
    (`lineage.PresentFiles`). `should_stop`: asked as rows are read; ProofStopped once it
    says so, and nothing is judged.
    """
    held = lineage.lineages(folder, names)
    files = lineage.PresentFiles(folder, names, held, shown_new)
    shared = lineage.overlaps(held)
    nearest = files.held_nearest()
    verdicts = []
    for output, claim in held.items():
        if (partition, output) in busy:
            continue
        if output in shared:
            others = ", ".join(sorted(shared[output]))
            reason = f"{output} and {others} list the same sources: rows may be there twice"
            verdicts.append(LineageVerdict(output, others, reason, None))
        present = sorted(nearest[output])
        other = files.under_another_footer(output, claim) & nearest[output]
        before = {name: durable.identity(folder / name) for name in present}
        footerless = set()
        for name in other:  # shown new, if at all, as the version whose footer was read
            footer = files.footer(name)
            if footer is None:
                footerless.add(name)
            else:
                before[name] = footer.identity
        doubts: dict[str, str] = {}
        if present and output not in shared:
            held_here = [folder / name for name in present if name not in other]
            new_here = [folder / name for name in present if name in other - footerless]
            prove = partial(
                _prove,
                folder / output,
                claim,
                held_here,
                new_here,
                compare_rows=compare_rows,
                should_stop=should_stop,
            )
            if guard is None:
                doubts = prove()
            else:  # journaled only when rows are read: `status` reads footers, and no journal
                subject = proof_subject(partition, output)
                doubts = guard.run(subject, present, prove, journaled=compare_rows)
        for name in present:
            claimants = sorted(o for o in held if name in nearest[o])
            # Under another footer, the file is new or not to this output alone: a name used
            # three times is listed by two outputs, each with a file of its own.
            several = len(claimants) > 1 and name not in other
            if several or output in shared:
                doubts[name] = (
                    f"listed by several outputs ({', '.join(claimants)}); a person decides"
                )
            if name in footerless:  # never "proven held": its rows were not compared
                doubts[name] = (
                    f"{name} has no complete footer, and {output} lists the name under another:"
                    " a new file still being written, or the merged one damaged?"
                )
            new_footer = files.digest(name) if name in other else None
            doubt = doubts.get(name)
            verdicts.append(LineageVerdict(output, name, doubt, before[name], new_footer))
    return verdicts


def _prove(
    output: Path,
    claim: lineage.Lineage,
    sources: list[Path],
    others: list[Path],
    *,
    compare_rows: bool = True,
    should_stop: StopCheck | None = None,
) -> dict[str, str]:
    """Why each of `sources` is not shown to be held by `output`, and each of `others` (listed
    under another footer) not shown to be new: its doubts, by name."""
    unreadable = lineage.output_reads_back(
        output, claim, decode=compare_rows, should_stop=should_stop
    )
    if unreadable:
        return {source.name: unreadable for source in [*sources, *others]}
    doubts = {}
    if sources:
        doubts = lineage.unproven(
            output, claim, sources, compare_rows=compare_rows, should_stop=should_stop
        )
    if not others:
        return doubts
    if not compare_rows:
        return doubts | {
            f.name: f"{output.name} lists {f.name} under another footer (a new file, or the"
            " merged one changed?); its rows were not compared: the service's next pass, or"
            " `recover`, compares them"
            for f in others
        }
    return doubts | lineage.share_rows(output, others, should_stop)


def _settle_partition(
    folder: Path,
    partition: str,
    busy: set[tuple[str, str]],
    guard: ProofGuard | None,
    journal: Journal,
    should_stop: StopCheck,
) -> list[LineageAction]:
    names = lineage.list_names(folder)
    new = shown_new(journal, partition)
    verdicts = judge_partition(
        folder, partition, names, busy, guard=guard, shown_new=new, should_stop=should_stop
    )
    by_output: dict[str, list[LineageVerdict]] = {}
    for verdict in verdicts:
        by_output.setdefault(verdict.output, []).append(verdict)
    actions: list[LineageAction] = []
    for output in _inner_first(by_output):
        settled = _settle_output(journal, folder, partition, output, by_output[output])
        _log_actions(settled)  # each as done: an error in a later output's leaves them told
        actions.extend(settled)
    return actions


def _inner_first(by_output: Mapping[str, list[LineageVerdict]]) -> list[str]:
    """The outputs in an order that settles each before an output that removes it: a restored
    output gives up the files it holds first. Settled after, it was gone, and its files failed
    the partition's check until the next start. By name, as before, where nothing nests, or
    where lineages list each other (no merge of ours writes that: ranges nest). Only a file
    with an identity from before its proof can be removed; an overlap names outputs instead."""
    left = {
        output: {v.file for v in found if v.before is not None}
        for output, found in by_output.items()
    }
    order: list[str] = []
    while left:
        ready = [o for o, files in left.items() if not files & (left.keys() - {o})]
        for output in sorted(ready or left):
            order.append(output)
            del left[output]
    return order


def _log_actions(actions: list[LineageAction]) -> None:
    for action in actions:
        level = logging.WARNING if action.verb == "kept" else logging.INFO
        log_event(
            log,
            "lineage-recovery",
            level,
            partition=action.partition,
            output=action.output,
            file=action.file,
            action=action.verb,
            reason=action.reason,
        )


# Versions of files a pass compared with an output and did not show new: (partition, output,
# name, footer digest). Compared again by the next start or `recover`, not by every pass,
# which would read the output each time. A few per reused name at most.
_compared_in_passes: set[tuple[str, str, str, str]] = set()


def release_new_files(
    journal: Journal, folder: Path, partition: str, guard: ProofGuard
) -> list[LineageAction]:
    """During a pass, the start-up check's row comparison for files under a name an output
    lists with another footer, and for nothing else (nothing is deleted here): with the
    journal lost, a name reused while the service runs would wait for the next start.

    Each version is compared once per process; one that shares rows, or cannot be compared,
    stays held and is reported once."""
    names = lineage.list_names(folder)
    held = lineage.lineages(folder, names)
    files = lineage.PresentFiles(folder, names, held, shown_new(journal, partition))
    shared = lineage.overlaps(held)
    actions: list[LineageAction] = []
    for output, claim in held.items():
        if output in shared:
            continue
        todo: dict[str, footers.Footer] = {}
        for name in sorted(files.under_another_footer(output, claim)):
            footer = files.footer(name)
            key = (partition, output, name, footer.digest if footer else "")
            if footer is not None and key not in _compared_in_passes:
                todo[name] = footer
        if not todo:
            continue
        others = [folder / name for name in todo]
        prove = partial(_prove, folder / output, claim, [], others)
        doubts = guard.run(proof_subject(partition, output), list(todo), prove)
        for name, footer in todo.items():
            if name not in doubts and durable.optional_identity(folder / name) == footer.identity:
                actions.append(_release(journal, partition, output, name, footer.digest))
            elif name in doubts:
                _compared_in_passes.add((partition, output, name, footer.digest))
                actions.append(LineageAction(partition, output, name, False, doubts[name]))
    _log_actions(actions)
    return actions


def _release(
    journal: Journal, partition: str, output: str, name: str, footer: str
) -> LineageAction:
    journal.record_released(partition, name, footer, output)
    reason = (
        f"{output} lists {name} under another footer and holds none of its rows: a new file"
        " under a used name (the monitor's clock stepped back?), merged like any other"
    )
    return LineageAction(partition, output, name, False, reason, released=True)


def _settle_output(
    journal: Journal,
    folder: Path,
    partition: str,
    output: str,
    verdicts: list[LineageVerdict],
) -> list[LineageAction]:
    """Remove the files `output` is proven to hold, unless they changed since the proof; the
    others are reported as they stand. The removal is a merge of the journal's, adopted at
    `renamed` and finished like any other, so a crash in it is recovery's to finish."""
    actions: list[LineageAction] = []
    proven: list[tuple[str, FileIdentity]] = []  # each file, as it was proven
    for verdict in verdicts:
        if verdict.doubt is not None or verdict.before is None:
            actions.append(verdict.action(partition))
        elif durable.identity(folder / verdict.file) != verdict.before:
            reason = f"{verdict.file} changed while it was compared"
            actions.append(LineageAction(partition, output, verdict.file, False, reason))
        elif verdict.new_footer is not None:
            actions.append(_release(journal, partition, output, verdict.file, verdict.new_footer))
        else:
            proven.append((verdict.file, verdict.before))
    if not proven:
        return actions
    listed = [v.file for v in verdicts if v.before is not None and v.new_footer is None]
    _companion_rebuilt(folder, output, listed)
    covered: list[tuple[str, FileIdentity, FileIdentity | None]] = []
    for name, identity in proven:
        companion, doubt = _companion_covered(folder, output, name)
        if doubt is None:
            covered.append((name, identity, companion))
        else:
            actions.append(LineageAction(partition, output, name, False, doubt))
    if not covered:
        return actions
    digest = _made_durable(folder / output)  # syncs the folder: the companion's name too
    record = _adopt(journal, folder, partition, output, digest, covered)
    _result, error = finish(journal, folder, record, actor=ACTOR)
    for source in record.sources:
        if error is None:
            reason = f"every row is in {output} (lineage and content); adopted as merge {record.id}"
        else:
            reason = f"merge {record.id}: {error}"
        actions.append(LineageAction(partition, output, source.name, error is None, reason))
    return actions


def _adopt(
    journal: Journal,
    folder: Path,
    partition: str,
    output: str,
    digest: str,
    proven: list[tuple[str, FileIdentity, FileIdentity | None]],
) -> MergeRecord:
    """Journal `output` (whose sha256 is `digest`) as a merge of the `proven` files, at
    `renamed`, with what is needed to finish it: their identities from before the proof and
    their companions' (each covered by the output's), the output's checksum and its
    companion's."""
    footer = footers.read(folder / output)
    held = lineage.decode(footer.lineage)
    sources: list[SourceRecord] = []
    for name, identity, companion in proven:
        source_footer = footers.read(folder / name)
        sources.append(
            SourceRecord(
                name,
                identity,
                source_footer.rows,
                schema_fingerprint(source_footer.schema),
                companion,
            )
        )
    merge_id = journal.record_adopted(
        partition=partition,
        output=output,
        era=era_of(footer.schema),
        policy={"adopted": {"lineage_merge_id": held.merge_id if held else None}},
        sources=sources,
        output_rows=footer.rows,
        output_bytes=footer.identity.size,
        output_checksum=digest,
        companion_checksum=checksum(folder / companion_name(output)),
        actor=ACTOR,
    )
    return journal.merge(merge_id)


def _companion_rebuilt(folder: Path, output: str, names: list[str]) -> None:
    """Give an output found without a companion one before the files it holds go: the union
    of the companions of every file its lineage lists that is still here (`names`), proven
    or not, written as a merge writes it, then named without replacing anything.

    Only a publish whose companion temp did not survive leaves an output without companion
    beside sources with companions: cut between its two renames, the temp torn (so the sweep
    removed it) or rolled back by a journal that lost its latest commits. Deleting the files
    then left their companions beside no parquet file, and every container of the window
    gone from the viewer. No file of the output's merge is gone yet (publishing comes before
    any delete), so the union is the one the merge wrote; a file not proven this time is in
    it too, so that it may go once proven. A companion that does not decode is left out, and
    its file stays (`_companion_covered`). A kill before the name is taken leaves a temp the
    next sweep publishes (`_cut_publish_companion`)."""
    final = folder / companion_name(output)
    if final.exists():
        return
    sidecars = []
    for name in names:
        path = folder / companion_name(name)
        try:
            if path.exists():
                sidecars.append(companions.read_companion(path))
        except CompanionError:
            continue
    if write_companion_tmp(folder, output, sidecars) is not None:
        durable.rename_no_replace(folder / tmp_name(final.name), final)
        log_event(log, "companion-rebuilt", logging.WARNING, path=final, sources=len(sidecars))


def _made_durable(path: Path) -> str:
    """The output's bytes and name on disk before anything it holds is deleted; the sha256 of
    those bytes, which the journal then records (a file gone by now raises)."""
    with open(path, "rb") as handle:
        durable.fsync_file(handle, path)
        handle.seek(0)
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    durable.fsync_dir(path.parent)
    return digest


def _companion_covered(
    folder: Path, output: str, name: str
) -> tuple[FileIdentity | None, str | None]:
    """The identity of `name`'s companion (None: it has none), when the output's companion
    lists every container of it, so that both may go; else why `name` stays. Deleting the
    file and keeping its companion left the companion beside no parquet file, which the
    viewer never reads: its containers were gone all the same."""
    theirs_path = folder / companion_name(name)
    identity = durable.optional_identity(theirs_path)
    if identity is None:
        return None, None
    try:
        theirs = companions.read_companion(theirs_path)
        ours = companions.read_companion(folder / companion_name(output))
    except CompanionError as exc:
        return None, f"{name}'s containers cannot be shown to be in {output}'s: {exc.reason}"
    missing = companions.missing_from(ours, theirs)
    if missing:
        return None, (
            f"{name}'s companion lists {len(missing)} containers"
            f" {companion_name(output)} lacks; a person decides"
        )
    return identity, None
