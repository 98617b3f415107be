"""The sidecar loop: lock, recover, then a pass now and every interval until told to stop.

SIGTERM/SIGINT/SIGHUP are noticed between steps: no new merge starts, the merge being written
may finish within the grace period and is rolled back cleanly past it, and a merge already
written is always finished (renames and unlinks take milliseconds). Start-up recovery stops
between merges and between partitions, so a large backlog does not outlast the kubelet's grace
period. Between passes the process sleeps on an event, using no CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from . import footers, identity, lock, memory, retention
from .backoff import DEFAULT_INTERVAL_S, Backoff
from .exit_codes import EXIT_NEEDS_PERSON
from .isolation import PARTITION_ERRORS, isolated
from .journal import Journal, PassResult, explained
from .layout import walk_partitions
from .logs import log_event
from .merge import MergeOutcome, execute, report_unreadable
from .observe import Observer
from .plan import Policy, Skipped, plan_one, waiting_metrics
from .recovery import ProofGuard, RecoveryReport, hold, recover, release_new_files
from .reports import recovery_fields
from .scan import PartitionScan, UnreadableFile
from .states import MergeState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    journal_path: Path
    policy: Policy = field(default_factory=Policy)
    check_interval_s: float = DEFAULT_INTERVAL_S
    grace_s: float = 20.0
    retention_days: float = 30.0
    observer: Observer = field(default_factory=Observer)  # metrics, progress; no-op by default

    def as_record(self) -> dict[str, object]:
        """What each pass record keeps, so `status` judges by the settings really in use."""
        return {
            "policy": self.policy.as_dict(),
            "check_interval_s": self.check_interval_s,
            "retention_days": self.retention_days,
        }


class StopFlag:
    """Set by a signal; lets the current merge run on until the grace period is over."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signal: int | None = None  # the first signal that asked to stop
        self._requested = False
        self._deadline: float | None = None
        self._wake: tuple[int, int] | None = None  # a pipe, made by the first `wait`

    def request(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Also the signal handler, which runs in the main thread wherever that thread was, so
        it takes no lock the main thread may hold. It used to set a `threading.Event`, whose
        lock is not reentrant: a SIGTERM landing while the main thread held that lock inside
        the event's own `wait` deadlocked the service for good (the likely cause of a CI run
        whose service did not stop within 30 s). A byte in a pipe wakes the wait instead.
        The stop is recorded before anything is logged: a handler that lands inside a write to
        stderr (one interrupted while the pipe is full) makes logging's own write a reentrant
        call on that stream, which raises, and the stop was lost with it."""
        first = self._deadline is None
        if first:
            self._deadline = time.monotonic() + self.grace_s
            self.signal = signum
        self._requested = True
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):  # full: a byte is there already
                os.write(self._wake[1], b"\0")
        if first:
            with contextlib.suppress(RuntimeError):  # the line is lost, not the stop
                log_event(log, "stop-requested", signal=signum, grace_s=self.grace_s)

    @property
    def requested(self) -> bool:
        return self._requested

    def past_grace(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def wait(self, seconds: float) -> bool:
        """True once a stop is requested, at the latest after `seconds`."""
        if self._wake is None:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._wake = (read, write)
        if not self._requested:  # a request from here on writes to the pipe
            # A wait past TIMEOUT_MAX (~292 years) raises OverflowError: `--check-interval
            # 1e10` would crash the service after its first pass. Such a wait ends by signal.
            select.select([self._wake[0]], [], [], min(seconds, threading.TIMEOUT_MAX))
        return self._requested

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """This flag as the handler of the stop signals, the ones before it put back after
        (a command run in-process, by a test, leaves its caller's handlers as they were).

        SIGHUP (the terminal that started `run` closed) stops as SIGTERM does: its default
        action killed the process mid-step, without the `stopped` line. Under `nohup`, which
        starts it ignored, it stays ignored, as SIGINT does for a job a script started in the
        background (the shell ignores it there, so a Ctrl-C meant for the script does not
        stop it)."""
        stops = [signal.SIGTERM]
        stops += [
            s for s in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN
        ]
        before = {signum: signal.signal(signum, self.request) for signum in stops}
        try:
            yield
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)


@dataclass
class PassReport:
    recovery: RecoveryReport
    merges: list[MergeOutcome] = field(default_factory=list)
    unreadable: list[tuple[str, UnreadableFile]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (partition, error)
    backlog: dict[str, int] = field(default_factory=dict)  # partition -> metrics-* files left
    held: dict[str, int] = field(default_factory=dict)  # partition -> data files held out
    deferred: list[str] = field(default_factory=list)  # partitions waiting out a backoff

    @property
    def finished(self) -> list[MergeOutcome]:
        return [m for m in self.merges if m.state is MergeState.SOURCES_DELETED]

    @property
    def failed(self) -> list[MergeOutcome]:
        """Not finished, and not cut short by a stop: the README calls that no failure, and an
        alert on failed merges fired at every rollout whose merge outlasted the grace period."""
        return [
            m for m in self.merges if m.state is not MergeState.SOURCES_DELETED and not m.stopped
        ]

    def result(self, stopped: bool) -> PassResult:
        if stopped:
            return PassResult.STOPPED
        return PassResult.FAILED if self.errors else PassResult.OK


EMPTY = "no dt=YYYY-MM-DD/identifier=NAME folder yet; is this the monitor's data directory?"


def consolidation_pass(
    journal: Journal, settings: Settings, stop: StopFlag, backoff: Backoff | None = None
) -> PassReport:
    """Recover, then each partition in turn. A partition that fails (a folder we may not
    write, an I/O error while writing or publishing, an exception no check foresaw) is
    reported and the others go on (`isolation`); a journal error ends the pass. With
    `backoff`, a partition that failed is skipped until its backoff is over, so a full disk is
    not hit with a whole merge every interval."""
    footers.next_pass()
    report = PassReport(
        recovery=recover(
            journal, settings.data_dir, sweep=False, should_stop=lambda: stop.requested
        )
    )
    log_recovery(report.recovery)
    # A merge recovery had to leave as it was holds its partition until a recovery settles it:
    # planned again, its sources would go into a second merge. The other partitions go on.
    report.errors.extend((action.partition, action.reason) for action in report.recovery.failed)
    stuck = {action.partition for action in report.recovery.failed}
    now = time.time()
    partitions, left_alone = walk_partitions(settings.data_dir)
    for folder in left_alone:
        log_event(log, "partition-skipped", logging.WARNING, path=folder.path, reason=folder.reason)
    if not partitions and not left_alone:  # a wrong mount or path looked healthy for good
        log_event(log, "no-partitions", logging.WARNING, data_dir=settings.data_dir, reason=EMPTY)
    settings.observer.pass_started(partitions)
    for partition in partitions:
        if stop.requested:
            break
        if (
            partition in stuck
            or (backoff is not None and not backoff.due(partition))
            or _held(journal, partition, settings.check_interval_s, now)
        ):
            report.deferred.append(partition)
            settings.observer.partition_done(partition)
            continue
        merges_before = len(report.merges)
        failure = isolated(_consolidate_partition, journal, settings, stop, partition, now, report)
        if failure is not None:
            report.errors.append((partition, failure.text))
            log_event(log, "partition-failed", logging.ERROR, partition=partition, **failure.fields)
            if backoff is not None:
                backoff.failed(partition, failure.logged)
        elif backoff is not None:
            _settle_backoff(backoff, partition, report.merges[merges_before:])
        settings.observer.partition_done(partition)
    return report


def _held(journal: Journal, partition: str, interval_s: float, now: float) -> bool:
    """Logged at every pass it holds, like a partition that fails."""
    held = hold(journal, partition, interval_s)
    if held is None or not held.active(datetime.fromtimestamp(now, UTC)):
        return False
    log_event(
        log,
        "partition-held",
        logging.WARNING,
        partition=partition,
        deaths=held.deaths,
        until=held.until.isoformat(timespec="seconds"),
        reason=f"its last {held.deaths} merges died with the process (out of memory? killed?)",
    )
    return True


def _settle_backoff(backoff: Backoff, partition: str, merges: list[MergeOutcome]) -> None:
    """A merge that failed on our side of the disk (full, EIO) would fail again right now."""
    faults = [m.error for m in merges if m.retry_later]
    if faults:
        backoff.failed(partition, faults[0])
    else:
        backoff.succeeded(partition)


def recorded_pass(
    journal: Journal, settings: Settings, stop: StopFlag, backoff: Backoff | None = None
) -> PassReport:
    """A pass with its record in the journal, opened before and closed after it."""
    pass_id = journal.begin_pass(settings.as_record())
    try:
        report = consolidation_pass(journal, settings, stop, backoff)
    except Exception as exc:
        with contextlib.suppress(sqlite3.Error):  # the journal may be what failed
            journal.end_pass(pass_id, PassResult.FAILED, error=str(exc))
        raise
    stuck = report.recovery.failed
    journal.end_pass(
        pass_id,
        report.result(stop.requested),
        merges_finished=len(report.finished),
        merges_failed=len(report.failed),
        partition_errors=len(report.errors),
        unreadable=len(report.unreadable),
        # A pass failed with an error is one the service backs off after (`_loop`), as one
        # that raised: `status --liveness` allows for that wait, and only for that one.
        error=f"recovery left a merge as it was: {stuck[0].reason}" if stuck else None,
    )
    return report


# Files kept apart by their schema, as (partition, name, reason), that this process has named:
# such a file stays apart pass after pass, and one line per start of the service says so.
_told_apart: set[tuple[str, str, str]] = set()
_TOLD_APART_LIMIT = 65_536


def _log_skipped(skip: Skipped) -> None:
    if skip.output is not None:
        log_event(
            log,
            "merge-skipped",
            logging.WARNING,
            partition=skip.partition,
            output=skip.output,
            reason=skip.reason,
        )
        return
    told = (skip.partition, skip.sources[0], skip.reason)
    if told in _told_apart:
        return
    if len(_told_apart) >= _TOLD_APART_LIMIT:
        _told_apart.clear()
    _told_apart.add(told)
    log_event(
        log,
        "file-held" if skip.needs_person else "file-kept-apart",
        logging.WARNING,
        partition=skip.partition,
        file=skip.sources[0],
        reason=skip.reason,
    )


# The files each partition held out of merges when this process last said so: one line each
# time that changes, not one per pass.
_told_held: dict[str, frozenset[str]] = {}


def _log_held(scan: PartitionScan) -> None:
    """Files restored under a running service were held, their rows in the folder twice, and
    nothing but `status` said so until the next start (a review, helper-51)."""
    if _told_held.get(scan.partition, frozenset()) == scan.held:
        return
    _told_held[scan.partition] = scan.held
    if not scan.held:
        del _told_held[scan.partition]
        return
    log_event(
        log,
        "files-held",
        logging.WARNING,
        partition=scan.partition,
        files=len(scan.held),
        first=min(scan.held),
        reason="held out of merges: files an output's lineage lists beside it (a restored"
        " backup?) and that output, or the files of a merge waiting for a person; `status`"
        " names each, and `recover` or the next start removes the copies it proves",
    )


def _consolidate_partition(
    journal: Journal,
    settings: Settings,
    stop: StopFlag,
    partition: str,
    now: float,
    report: PassReport,
) -> None:
    scan, plans, skipped = plan_one(settings.data_dir, partition, settings.policy, journal, now)
    if scan.held and _released(journal, settings, partition):  # merged in this pass
        scan, plans, skipped = plan_one(settings.data_dir, partition, settings.policy, journal, now)
    for bad in scan.unreadable:
        report.unreadable.append((scan.partition, bad))
        report_unreadable(journal, scan.partition, bad)
    for skip in skipped:
        report.skipped.append(skip)
        _log_skipped(skip)
    report.held[partition] = len(scan.held)
    _log_held(scan)
    consolidated: set[str] = set()
    for plan in plans:
        if stop.requested:
            break
        outcome = execute(
            journal, settings.data_dir, plan, settings.policy, should_abort=stop.past_grace
        )
        memory.release()
        report.merges.append(outcome)
        report.unreadable.extend((partition, bad) for bad in outcome.unreadable)
        log_outcome(outcome)
        settings.observer.observe_merge(outcome)
        if outcome.state is MergeState.SOURCES_DELETED:
            consolidated.update(source.name for source in plan.sources)
    report.backlog[partition] = backlog(scan, consolidated)


def _released(journal: Journal, settings: Settings, partition: str) -> bool:
    """Whether files held under a name an output lists were shown new (`release_new_files`);
    asked only of a partition holding files, so a pass reads no lineage twice otherwise."""
    guard = ProofGuard(journal, settings.check_interval_s)
    actions = release_new_files(journal, settings.data_dir / partition, partition, guard)
    return any(action.released for action in actions)


def backlog(scan: PartitionScan, consolidated: set[str]) -> int:
    """Eligible `metrics-*` files this pass did not consolidate (held back, failed, stopped)."""
    return sum(1 for s in waiting_metrics(scan) if s.name not in consolidated)


def log_outcome(outcome: MergeOutcome) -> None:
    ok = outcome.state is MergeState.SOURCES_DELETED
    log_event(
        log,
        "merge-finished" if ok else "merge-stopped" if outcome.stopped else "merge-failed",
        logging.INFO if ok or outcome.stopped else logging.WARNING,
        merge_id=outcome.merge_id,
        partition=outcome.partition,
        output=outcome.output,
        state=outcome.state,
        sources=outcome.sources,
        rows=outcome.rows,
        bytes_in=outcome.bytes_in,
        bytes_out=outcome.bytes_out,
        error=outcome.error,
    )


def log_recovery(report: RecoveryReport) -> None:
    """The same fields `recover` prints, as log events."""
    for action in report.actions:
        fields = recovery_fields(action)
        del fields["kind"]
        level = logging.WARNING if action.result is MergeState.NEEDS_ATTENTION else logging.INFO
        log_event(log, "recovery", level, **fields)
    for path in report.published:
        log_event(log, "orphan-published", path=path)
    for path in report.swept:
        log_event(log, "orphan-removed", path=path)


def run_service(
    settings: Settings,
    stop: StopFlag,
    *,
    once: bool = False,
    serve: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> int:
    """The `run` command: returns the exit code (0 also after a clean stop on a signal).
    `serve` (the metrics endpoint) starts only once the lock is ours, so a second instance is
    refused by the lock, with its holder named, not by a port it cannot bind."""
    with (
        lock.exclusive(settings.data_dir) as held,
        lock.exclusive_journal(settings.journal_path, settings.data_dir),
        serve(),
    ):
        memory.keep_freed_heap()
        journal = Journal.open(settings.journal_path)
        try:
            identity.bind(journal, settings.data_dir)
            held.announce()
            log_event(
                log,
                "started",
                data_dir=settings.data_dir,
                journal=settings.journal_path,
                check_interval_s=settings.check_interval_s,
                once=once,
            )
            startup = recover(
                journal,
                settings.data_dir,
                observer=settings.observer,
                should_stop=lambda: stop.requested,
                interval_s=settings.check_interval_s,
            )
            log_recovery(startup)
            if stop.requested:  # the rest of the recovery is the next start's
                log_event(log, "stopped", reason="signal")
                return 0
            return _loop(journal, settings, stop, once, held, startup)
        finally:
            journal.close()


# The backoff key of a pass that failed as a whole (the journal), or whose recovery had to
# leave a merge as it was.
PASS = "<pass>"


def _loop(
    journal: Journal,
    settings: Settings,
    stop: StopFlag,
    once: bool,
    held: lock.HeldLock,
    startup: RecoveryReport,
) -> int:
    """Exit code for `--once`: 1 when a partition or the pass failed (rolled-back merges are
    not failures: their sources are intact and the next pass retries them), else 3 when a
    merge waits for a person, as `recover` exits. A pass that fails as a whole, or whose
    recovery had to leave a merge as it was, is retried after a growing wait, not every
    interval."""
    backoff = Backoff(settings.check_interval_s)
    while True:
        held.check()  # the state folder is still ours: else stop, with the path (no retry)
        journal.check_in_place()
        started = time.monotonic()
        report: PassReport | None = None
        wait = settings.check_interval_s
        try:
            report = recorded_pass(journal, settings, stop, backoff)
            ok = not report.errors
            stuck = report.recovery.failed
            if stuck and not once:  # a failing device is not hit at every interval
                wait = backoff.failed(PASS, stuck[0].reason)
            elif not stuck:
                backoff.succeeded(PASS)
            log_event(
                log,
                "pass-finished",
                merges=len(report.merges),
                failed=len(report.failed),
                held=sum(report.held.values()),
                unreadable=len(report.unreadable),
                partition_errors=len(report.errors),
                deferred=len(report.deferred),
                duration_s=round(time.monotonic() - started, 3),
            )
        except (*PARTITION_ERRORS, sqlite3.Error) as exc:
            ok = False
            if not once:
                wait = backoff.failed(PASS, exc)
            if isinstance(exc, sqlite3.DatabaseError):  # SQLite's text names no file
                exc = explained(exc, journal.path, opening=False)
            log_event(
                log, "pass-failed", logging.ERROR, error=exc, retry_in_s=None if once else wait
            )
        settings.observer.observe_pass(report, time.monotonic() - started, journal)
        if not stop.requested:
            retention.prune_if_due(journal, settings.retention_days, data_dir=settings.data_dir)
        # a signal during the wait ends the loop there: no pass starts after SIGTERM
        if once or stop.requested or stop.wait(wait):
            if stop.requested:
                log_event(log, "stopped", reason="signal")
                return 0
            waiting = _waiting_for_a_person(journal, startup, report) if ok else 0
            log_event(log, "stopped", reason="once", needs_person=waiting)
            return 1 if not ok else EXIT_NEEDS_PERSON if waiting else 0


def _waiting_for_a_person(
    journal: Journal, startup: RecoveryReport, report: PassReport | None
) -> int:
    """Merges in needs-attention, whoever flagged them (a recovery, this pass, a pass long
    ago), and files a recovery kept beside an output for a person: what `recover` exits 3 for.
    A `run --once` that exited 0 with such a merge left a cron job nothing to alert on."""
    flagged = [r for r in journal.unfinished() if r.state is MergeState.NEEDS_ATTENTION]
    found = startup.uncertain + (report.recovery.uncertain if report else [])
    kept = {(a.partition, a.file) for a in found}  # both recoveries may keep the same file
    return len(flagged) + len(kept)
