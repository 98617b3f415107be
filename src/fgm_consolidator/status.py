"""Is the consolidator working, and does anything need a person? The answer `status` prints.

Read-only, so that it can run as an exec probe beside a running service: the journal is opened
read-only (no lock taken, no file created) and the data directory is only listed and its
footers read, by the same scan and planner a pass uses, with the settings the service recorded
with its last pass. Health has three parts:

- the service makes progress: a successful pass ended, or the running pass started or moved a
  merge, within `stale_after` x the check interval;
- a service that just started gets that same window before its first successful pass, and
  the merges its start-up recovery moves count as progress (its start is when, holding the
  data directory's lock with its journal open, it wrote its line in the lock file: the file's
  mtime, if the lock path is a regular file: `run` refuses any other, so it is reported and
  says nothing);
- no merge waits for a person (state needs-attention), none is left unfinished by the recovery
  of a pass that failed (`recover` says why), no partition's latest merges failed
  `FAILING_MERGES` times in a row (a pass retries them, and the same error comes back), no
  partition is held because its latest merges died with the process (`backoff.Hold`), no
  output's lineage lists files still beside it that `recover` would have to settle (see
  `_lineage_check`), no partition escaped the look with an exception no check foresaw
  (`isolation`), and no file a finished merge deleted is back while an output holds its rows
  (`plan.merged_before`: a backup restored over the folder).
  A foreseen error (a folder it may not read) is listed with its partition but is no problem by
  itself: a pass logs it and retries that partition after a backoff, and may well succeed then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from . import lock
from .backoff import DEFAULT_INTERVAL_S, Hold, wait_after
from .errors import LockError
from .exit_codes import EXIT_HEALTHY, EXIT_NEEDS_PERSON, EXIT_NEVER_RAN, EXIT_STALE
from .isolation import PartitionFailure, isolated
from .journal import (
    MERGE_ACTOR,
    Failures,
    Journal,
    MergeRecord,
    PassRecord,
    PassResult,
    UnreadableRecord,
)
from .layout import SkippedFolder, lock_path, walk_partitions
from .lineage import ShownNew
from .plan import Policy, Skipped, plan_one, shown_new, waiting_metrics
from .recovery import LineageAction, ProofGuard, hold, judge_partition
from .retention import journal_bytes
from .scan import UnreadableFile, still_on_disk
from .states import MergeState

# Merges of one partition rolled back in a row on an error before a person is told: one or two
# may be a race the next pass does not meet (a source rewritten under the merge).
FAILING_MERGES = 3


@dataclass(frozen=True)
class Backlog:
    """One partition as the next pass would see it."""

    partition: str
    waiting: int  # metrics-* files old enough and readable: not consolidated yet
    mergeable: int  # files the next pass would merge (the rest wait for --min-files or time)
    young: int  # files younger than --min-age: the monitor may still write them
    unreadable: int
    error: str | None = None  # the partition could not be looked at
    # where an exception no check foresaw was raised (a bug, an input nothing anticipated):
    # a person must look (`EXIT_NEEDS_PERSON`); a foreseen error's text names its path
    where: str | None = None


@dataclass(frozen=True)
class Problem:
    exit_code: int
    text: str


@dataclass(frozen=True)
class Status:
    now: datetime
    check_interval_s: float
    stale_after: float
    service_started: datetime | None  # when a process last took the data directory's lock
    lock_problem: str | None  # why the lock path is one `run` refuses, naming it
    last_pass: PassRecord | None
    last_success: PassRecord | None
    progress_at: datetime | None  # the latest sign that the service gets somewhere
    # --liveness: how much longer than an interval the service may wait after its failed
    # passes (`backoff.wait_after`); 0 otherwise
    backoff_s: float
    needs_person: tuple[MergeRecord, ...]
    unfinished: tuple[MergeRecord, ...]  # in progress, or interrupted until the next start
    scanned: bool  # False for --liveness: backlog and unreadable were not looked at
    backlog: tuple[Backlog, ...]
    unreadable: tuple[UnreadableRecord, ...]
    lineage: tuple[LineageAction, ...]  # files an output's lineage lists, still beside it
    held: tuple[tuple[str, Hold], ...]  # partitions whose latest merges died with the process
    failing: tuple[tuple[str, Failures], ...]  # partitions whose latest merges failed
    skipped: tuple[SkippedFolder, ...]  # folders named like partitions that are not walked
    restored: tuple[Skipped, ...]  # files merged before and here again (`plan.merged_before`)
    journal_bytes: int
    problems: tuple[Problem, ...]

    @property
    def threshold_s(self) -> float:
        return self.stale_after * self.check_interval_s + self.backoff_s

    @property
    def exit_code(self) -> int:
        return self.problems[0].exit_code if self.problems else EXIT_HEALTHY


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _service_started(data_dir: Path) -> tuple[datetime | None, str | None]:
    """When a service last took the lock, or why the lock path cannot say: `run`'s own check.
    A FIFO's or a folder's mtime is no service's start, and no service can start beside it."""
    path = lock_path(data_dir)
    try:
        st = path.lstat()  # a link, dangling or not, is refused by `run`: no lock to go by
    except FileNotFoundError:
        return None, None
    except NotADirectoryError:
        return None, f"{path.parent} is not a directory, so {path} cannot be"
    try:
        lock.refuse_irregular(path, st.st_mode)
    except LockError as exc:
        return None, str(exc)
    try:
        holder = path.read_text(errors="replace")
    except PermissionError as exc:  # `run` cannot open it either: it refuses to start
        return None, str(LockError(f"cannot open the lock file: {exc.strerror or exc}", path))
    except OSError:  # unreadable for another reason: take it for a service's, as before
        holder = None
    if holder is not None and (not holder or lock.ONE_SHOT in holder):
        return None, None  # no service announced its start: refused at start-up, a `recover`
    return datetime.fromtimestamp(st.st_mtime, UTC), None


def _policy(last: PassRecord | None) -> Policy:
    """The policy the service runs with, as its last pass recorded it (defaults before one)."""
    recorded = dict(last.settings.get("policy", {})) if last else {}
    known = {f.name for f in fields(Policy)}
    return Policy(**{k: v for k, v in recorded.items() if k in known})


def _not_yet_recorded(partition: str, bad: UnreadableFile) -> UnreadableRecord:
    """Found by this look, before the service did: no first-seen time yet."""
    size, mtime_ns = bad.identity.size, bad.identity.mtime_ns
    return UnreadableRecord(partition, bad.name, size, mtime_ns, bad.reason, "", bad.ctime_ns)


@dataclass(frozen=True)
class _Look:
    backlog: list[Backlog] = field(default_factory=list)
    unreadable: list[UnreadableRecord] = field(default_factory=list)
    lineage: list[LineageAction] = field(default_factory=list)
    held: list[tuple[str, Hold]] = field(default_factory=list)
    failing: list[tuple[str, Failures]] = field(default_factory=list)
    # named like partitions and left alone (symbolic links)
    skipped: list[SkippedFolder] = field(default_factory=list)
    restored: list[Skipped] = field(default_factory=list)


def _lineage_check(
    folder: Path,
    partition: str,
    names: frozenset[str],
    busy: set[tuple[str, str]],
    guard: ProofGuard | None,
    new: ShownNew,
) -> list[LineageAction]:
    """`recover`'s lineage check (`judge_partition`) on footers only, the reading a pass has
    done already (`plan_one` reads every output's lineage): proving an output holds a file's
    rows reads both whole, minutes for a large output, on every call of a probe. So a file an
    output lists and that is still beside it is a finding even where `recover` would prove and
    remove it: rows may be there twice, and a running service leaves such files alone (they
    are settled at start-up), so a person looks either way. The footers do give recover's own
    reason where they suffice: counts that differ, outputs sharing a source, and a proof held
    because it died with its process (`guard`, read only)."""
    verdicts = judge_partition(
        folder, partition, names, busy, compare_rows=False, guard=guard, shown_new=new
    )
    return [verdict.action(partition) for verdict in verdicts]


def _look_at_partitions(
    data_dir: Path,
    journal: Journal | None,
    policy: Policy,
    now: datetime,
    busy: set[tuple[str, str]],
    interval_s: float,
) -> _Look:
    partitions, skipped = walk_partitions(data_dir)
    look = _Look(skipped=skipped)
    for partition in partitions:
        found = isolated(_look_at_one, data_dir, partition, journal, policy, now, busy, interval_s)
        if isinstance(found, PartitionFailure):
            failed = Backlog(partition, 0, 0, 0, 0, error=found.text, where=found.where)
            look.backlog.append(failed)
            continue
        look.unreadable.extend(found.unreadable)
        look.lineage.extend(found.lineage)
        look.restored.extend(found.restored)
        if found.held is not None:
            look.held.append((partition, found.held))
        if found.failing is not None:
            look.failing.append((partition, found.failing))
        if found.backlog is not None:
            look.backlog.append(found.backlog)
    return look


@dataclass(frozen=True)
class _PartitionLook:
    backlog: Backlog | None  # None: nothing waits but young files
    unreadable: list[UnreadableRecord]
    lineage: list[LineageAction]
    held: Hold | None
    failing: Failures | None
    restored: list[Skipped]


def _look_at_one(
    data_dir: Path,
    partition: str,
    journal: Journal | None,
    policy: Policy,
    now: datetime,
    busy: set[tuple[str, str]],
    interval_s: float,
) -> _PartitionLook:
    scan, plans, skipped = plan_one(data_dir, partition, policy, journal, now.timestamp())
    known = journal.unreadable(partition) if journal else []
    held = hold(journal, partition, interval_s) if journal else None
    failures = journal.failures(partition, MERGE_ACTOR) if journal else None
    failing = failures if failures is not None and failures.count >= FAILING_MERGES else None
    guard = ProofGuard(journal, interval_s) if journal else None
    new = shown_new(journal, partition)
    doubts = _lineage_check(data_dir / partition, partition, scan.names, busy, guard, new)
    bad = [r for r in known if r.name in scan.names and still_on_disk(data_dir, r)]
    bad += [_not_yet_recorded(partition, u) for u in scan.unreadable]
    waiting = len(waiting_metrics(scan))
    mergeable = sum(len(p.sources) for p in plans)
    backlog = None
    if waiting or bad:  # young files alone: the monitor's current file, or our new output
        backlog = Backlog(partition, waiting, mergeable, scan.young, len(bad))
    restored = [skip for skip in skipped if skip.needs_person]
    return _PartitionLook(backlog, bad, doubts, held, failing, restored)


def _backoff_s(failed_in_a_row: int, interval_s: float) -> float:
    return wait_after(failed_in_a_row, interval_s) - interval_s if failed_in_a_row else 0.0


def _progress(
    service_started: datetime | None,
    last: PassRecord | None,
    success: PassRecord | None,
    latest_transition: datetime | None,
) -> datetime | None:
    # the running pass, or one that died with its process (until the next pass starts)
    running = _at(last.started) if last is not None and last.result is None else None
    marks = [service_started, _at(success.ended) if success else None, running]
    # A merge moved by the running pass, or since the service started: its start-up recovery
    # journals each output it proves, about half a minute each after a lost journal.
    since = max((m for m in (service_started, running) if m is not None), default=None)
    if since and latest_transition and latest_transition >= since:
        marks.append(latest_transition)
    present = [m for m in marks if m is not None]
    return max(present) if present else None


def _lineage_problems(data_dir: Path, found: Sequence[LineageAction]) -> list[Problem]:
    """One problem per output, naming it, with the first reason."""
    by_output: dict[tuple[str, str], list[LineageAction]] = {}
    for action in found:
        by_output.setdefault((action.partition, action.output), []).append(action)
    problems = []
    for (partition, output), actions in by_output.items():
        more = f" (and {len(actions) - 1} more)" if len(actions) > 1 else ""
        problems.append(
            Problem(
                EXIT_NEEDS_PERSON,
                f"{data_dir / partition / output}: lineage check: {actions[0].reason}{more}; "
                "`fgm-consolidator recover` (with the service stopped) settles what it can "
                "prove and reports the rest",
            )
        )
    return problems


def _problems(status: Status, journal_path: Path, data_dir: Path) -> list[Problem]:
    """Most urgent first: a service that does not work, then what a person must decide."""
    found: list[Problem] = []
    limit = (
        f"{status.threshold_s:g} s = {status.stale_after:g} x the check interval of "
        f"{status.check_interval_s:g} s"
    )
    if status.backoff_s:
        limit += f" + {status.backoff_s:g} s the service backs off after failed passes"
    if status.progress_at is None:
        last = status.last_pass
        if last is not None:  # ended by `recover` after its process died, or failed
            said = (
                f"no pass has succeeded here and no service has started since the last one"
                f" (begun {last.started}, {last.result})"
            )
        else:
            where = "no journal" if not journal_path.exists() else "no pass recorded"
            said = f"{where}: `fgm-consolidator run` has not started here"
        found.append(Problem(EXIT_NEVER_RAN, said))
    else:
        age = (status.now - status.progress_at).total_seconds()
        if age > status.threshold_s:
            failed = status.last_pass
            why = f"; last pass {failed.result}: {failed.error}" if failed and failed.error else ""
            found.append(Problem(EXIT_STALE, f"no progress for {age:.0f} s (limit {limit}){why}"))
    if status.lock_problem is not None:
        # A service that still runs (it holds the lock file that was replaced) is not stuck,
        # so a liveness probe must not restart it into a refusal: then only a person can help.
        code = EXIT_NEVER_RAN if status.progress_at is None else EXIT_NEEDS_PERSON
        found.append(
            Problem(code, f"{status.lock_problem}; `fgm-consolidator run` refuses to start")
        )
    if status.needs_person:
        ids = ", ".join(str(r.id) for r in status.needs_person)
        found.append(
            Problem(
                EXIT_NEEDS_PERSON,
                f"{len(status.needs_person)} merge(s) need a person (ids {ids}); "
                "see `fgm-consolidator history --state needs-attention`",
            )
        )
    left = _left_by_a_failed_pass(status)
    if left:
        ids = ", ".join(str(r.id) for r in left)
        found.append(
            Problem(
                EXIT_NEEDS_PERSON,
                f"merge(s) {ids} still unfinished after the last pass, which failed on them; "
                "`fgm-consolidator recover` (with the service stopped) says why",
            )
        )
    found += [_failing_problem(data_dir, partition, f) for partition, f in status.failing]
    found += [_held_problem(data_dir, partition, held) for partition, held in status.held]
    found += [_unexpected_problem(data_dir, b) for b in status.backlog if b.where is not None]
    found += _lineage_problems(data_dir, status.lineage)
    found += [
        Problem(EXIT_NEEDS_PERSON, f"{data_dir / skip.partition / skip.sources[0]}: {skip.reason}")
        for skip in status.restored
    ]
    return found


def _left_by_a_failed_pass(status: Status) -> list[MergeRecord]:
    """Unfinished merges the last pass left so: it ended in failure and they have not moved
    since it ended. Its recovery met them and could not finish them, or the pass made them and
    failed on a step (a source it may not delete, say): the service retries them at every pass,
    and the same step fails again. Only those its recovery met counted once, so a merge whose
    deletes failed in the pass that made it, its output and its sources beside each other (the
    viewer counting rows twice), was healthy until the next pass, five minutes later."""
    last = status.last_pass
    if last is None or last.result is not PassResult.FAILED or last.ended is None:
        return []
    ended = datetime.fromisoformat(last.ended)
    return [r for r in status.unfinished if datetime.fromisoformat(r.transitions[-1].at) <= ended]


def _failing_problem(data_dir: Path, partition: str, failures: Failures) -> Problem:
    return Problem(
        EXIT_NEEDS_PERSON,
        f"{data_dir / partition}: its last {failures.count} merges failed, the latest with: "
        f"{failures.last_error}; each pass tries again; see "
        f"`fgm-consolidator history --partition {partition}`",
    )


def _held_problem(data_dir: Path, partition: str, held: Hold) -> Problem:
    until = held.until.isoformat(timespec="seconds")
    return Problem(
        EXIT_NEEDS_PERSON,
        f"{data_dir / partition}: its last {held.deaths} merges died with the process (out of "
        f"memory? killed?); it waits until {until}, then is tried again; see the logs and "
        f"`fgm-consolidator history --partition {partition}`",
    )


def _unexpected_problem(data_dir: Path, failed: Backlog) -> Problem:
    """Not retried into success like an I/O error may be, and no restart helps: a person looks.
    A pass that meets the same error fails this partition alone and goes on."""
    return Problem(
        EXIT_NEEDS_PERSON,
        f"{data_dir / failed.partition}: {failed.error} (raised at {failed.where}) while "
        "looking at this partition: a bug or an input nothing foresaw; the other partitions "
        "are looked at, and a pass that meets it fails this one alone (`partition-failed` in "
        "the service's log)",
    )


def compute_status(
    data_dir: Path,
    journal_path: Path,
    *,
    check_interval_s: float | None = None,
    stale_after: float = 3.0,
    liveness: bool = False,
    now: datetime | None = None,
) -> Status:
    """`check_interval_s` None: the interval the service recorded with its last pass.

    `liveness` leaves out what needs a person, since a restart cannot help with that, and the
    look at the data directory, so that a frequent probe reads the journal only. It asks only
    whether the service still runs its passes: one that ended failed counts too, and the wait
    the service takes after failed passes is allowed for. A pass failing for good on a
    source it may not delete made the probe restart the sidecar every half hour, into the
    same failure.
    """
    started, lock_problem = _service_started(data_dir)
    journal = Journal.open(journal_path, read_only=True) if journal_path.exists() else None
    try:
        now = now or Journal.now()
        backed_off = 0
        if journal is not None and liveness:
            since = started.isoformat(timespec="milliseconds") if started else None
            backed_off = journal.passes_backed_off(since)
        last = journal.last_pass() if journal else None
        if check_interval_s is None:
            recorded = last.settings.get("check_interval_s") if last else None
            check_interval_s = float(recorded or DEFAULT_INTERVAL_S)
        success = journal.last_successful_pass() if journal else None
        transition = _at(journal.latest_transition_at()) if journal else None
        newest = journal.newest_merge_id() if journal else 0  # before `unfinished`: see below
        unfinished = journal.unfinished() if journal else []
        busy = {(r.partition, r.output) for r in unfinished}
        look = (
            _Look()
            if liveness
            else _look_at_partitions(data_dir, journal, _policy(last), now, busy, check_interval_s)
        )
        doubts = look.lineage
        if journal is not None and doubts:
            # A merge planned during the look may have been caught between its rename and its
            # deletes: its sources beside its output are the journal's business, not a finding.
            busy |= {(r.partition, r.output) for r in journal.merges_after(newest)}
            doubts = [a for a in doubts if (a.partition, a.output) not in busy]
    finally:
        if journal is not None:
            journal.close()
    status = Status(
        now=now,
        check_interval_s=check_interval_s,
        stale_after=stale_after,
        service_started=started,
        lock_problem=lock_problem,
        last_pass=last,
        last_success=success,
        progress_at=_progress(started, last, success if not liveness else last, transition),
        backoff_s=_backoff_s(backed_off, check_interval_s),
        needs_person=tuple(r for r in unfinished if r.state is MergeState.NEEDS_ATTENTION),
        unfinished=tuple(r for r in unfinished if r.state is not MergeState.NEEDS_ATTENTION),
        scanned=not liveness,
        backlog=tuple(look.backlog),
        unreadable=tuple(look.unreadable),
        lineage=tuple(doubts),
        held=tuple(look.held),
        failing=tuple(look.failing),
        skipped=tuple(look.skipped),
        restored=tuple(look.restored),
        journal_bytes=journal_bytes(journal_path),
        problems=(),
    )
    problems = tuple(
        p
        for p in _problems(status, journal_path, data_dir)
        if not (liveness and p.exit_code == EXIT_NEEDS_PERSON)
    )
    return replace(status, problems=problems)
