"""`status`: pass records written by the service, health judged from them, the backlog and the
unreadable files seen on disk, exit codes a probe can use; and it never changes anything.

Health over time is driven through the journal's clock (`journal.utc_now`) and an explicit
`now`; the exit codes through real processes, as Kubernetes would run them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    LOCK_PATHS,
    PAST,
    data_files,
    install_journal_clock,
    run_as,
    run_cli,
    small_spec,
)
from conftest import JournalClock as Clock

from fgm_consolidator import plan as plan_module
from fgm_consolidator import service as service_module
from fgm_consolidator.journal import Journal, PassResult
from fgm_consolidator.layout import default_journal_path, lock_path
from fgm_consolidator.observe import Observer
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import Settings, StopFlag, run_service
from fgm_consolidator.simulate import PodSpec, SimulationSpec, SimulationSummary, generate
from fgm_consolidator.states import MergeState
from fgm_consolidator.status import (
    EXIT_HEALTHY,
    EXIT_NEEDS_PERSON,
    EXIT_NEVER_RAN,
    EXIT_STALE,
    compute_status,
)

P_A = "dt=2025-12-30/identifier=pod-a"
P_B = "dt=2025-12-30/identifier=pod-b"
T0 = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)
DEADLINE_S = 30.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return install_journal_clock(monkeypatch, T0)


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


def status_json(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def files_of(root: Path) -> dict[str, str]:
    """Every file under root (the journal too) and a digest of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass(frozen=True)
class Pass:
    started: str
    ended: str | None
    result: PassResult | None
    merges_finished: int
    merges_failed: int
    partition_errors: int
    unreadable: int
    error: str | None
    settings: dict[str, Any]


def passes(data_dir: Path) -> list[Pass]:
    """Every pass record, oldest first, read with plain SQL."""
    with sqlite3.connect(default_journal_path(data_dir)) as conn:
        rows = conn.execute(
            "SELECT started, ended, result, merges_finished, merges_failed, partition_errors,"
            " unreadable, error, settings FROM passes ORDER BY id"
        ).fetchall()
    conn.close()
    return [
        Pass(
            *row[:2], None if row[2] is None else PassResult(row[2]), *row[3:8], json.loads(row[8])
        )
        for row in rows
    ]


# -- pass records -----------------------------------------------------------------------------


def test_each_pass_is_recorded_with_its_result_counts_and_settings(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    populate(PodSpec("pod-a"), PodSpec("pod-b"))
    proc = run_cli("run", "--data-dir", str(data_dir), "--once", "--min-files", "7")
    assert proc.returncode == 0, proc.stderr
    [record] = passes(data_dir)
    assert record.result is PassResult.OK
    assert (record.merges_finished, record.merges_failed) == (2, 0)
    assert (record.partition_errors, record.unreadable, record.error) == (0, 0, None)
    assert record.ended is not None and record.started <= record.ended
    assert record.settings["policy"] == {**Policy(min_files=7).as_dict()}
    assert record.settings["check_interval_s"] == 300.0
    assert record.settings["retention_days"] == 30.0


def test_a_pass_killed_midway_is_marked_interrupted_by_the_next(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    populate()
    killed = run_cli(
        "run", "--data-dir", str(data_dir), "--once", env={"FGM_CRASH_AT": "journal:writing"}
    )
    assert killed.returncode == -signal.SIGKILL
    assert [(p.result, p.ended) for p in passes(data_dir)] == [(None, None)]
    again = run_cli("run", "--data-dir", str(data_dir), "--once")
    assert again.returncode == 0, again.stderr
    first, second = passes(data_dir)
    assert (first.result, first.ended) == (PassResult.INTERRUPTED, None)
    assert (second.result, second.merges_finished) == (PassResult.OK, 1)


def test_a_partition_error_fails_the_pass_and_a_signal_stops_it(
    data_dir: Path, populate: Callable[..., SimulationSummary], monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(PodSpec("pod-a"), PodSpec("pod-b"))
    real = plan_module.scan_partition

    def scan_partition(data: Path, partition: str, **kwargs: Any) -> Any:
        if partition == P_A:
            raise PermissionError(13, "Permission denied", str(data / partition))
        return real(data, partition, **kwargs)

    monkeypatch.setattr(plan_module, "scan_partition", scan_partition)
    settings = Settings(data_dir, default_journal_path(data_dir))
    assert run_service(settings, StopFlag(0), once=True) == 1
    stop = StopFlag(0)

    class SignalledOnceThePassBegins(Observer):
        """A stop requested before the pass would end start-up recovery and begin no pass."""

        def pass_started(self, partitions: Sequence[str]) -> None:
            stop.request()

    assert run_service(replace(settings, observer=SignalledOnceThePassBegins()), stop) == 0
    failed, stopped = passes(data_dir)
    assert (failed.result, failed.partition_errors, failed.merges_finished) == (
        PassResult.FAILED, 1, 1,
    )  # fmt: skip
    assert (stopped.result, stopped.merges_finished) == (PassResult.STOPPED, 0)


def test_a_pass_that_fails_as_a_whole_records_why(
    data_dir: Path, populate: Callable[..., SimulationSummary], monkeypatch: pytest.MonkeyPatch
) -> None:
    populate()

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error (injected)")

    monkeypatch.setattr(service_module, "consolidation_pass", broken)
    settings = Settings(data_dir, default_journal_path(data_dir))
    assert run_service(settings, StopFlag(0), once=True) == 1
    [record] = passes(data_dir)
    assert (record.result, record.error) == (PassResult.FAILED, "disk I/O error (injected)")


# -- health over time -------------------------------------------------------------------------


def test_health_follows_progress_with_a_startup_grace(data_dir: Path, clock: Clock) -> None:
    path = default_journal_path(data_dir)

    def code(at: datetime, **kwargs: Any) -> int:
        return compute_status(data_dir, path, now=at, check_interval_s=60, **kwargs).exit_code

    assert code(T0) == EXIT_NEVER_RAN  # no lock, no journal: never started here
    lock = lock_path(data_dir)
    lock.parent.mkdir()
    lock.write_text("pid=1")
    os.utime(lock, (T0.timestamp(), T0.timestamp()))
    # started: healthy for 3 x 60 s before anything is recorded, then stale
    assert code(T0 + seconds(179)) == EXIT_HEALTHY
    assert code(T0 + seconds(181)) == EXIT_STALE

    journal = Journal.open(path)
    try:
        clock.at = T0 + seconds(10)
        first = journal.begin_pass({"check_interval_s": 60})
        assert code(T0 + seconds(189)) == EXIT_HEALTHY  # a running pass counts from its start
        assert code(T0 + seconds(191)) == EXIT_STALE
        clock.at = T0 + seconds(100)  # ... and from its latest merge step
        journal.record_planned(
            partition=P_A, output="o", era="flat", policy={}, sources=[], has_companion=False
        )
        assert code(T0 + seconds(279)) == EXIT_HEALTHY
        assert code(T0 + seconds(281)) == EXIT_STALE
        clock.at = T0 + seconds(200)
        journal.transition(1, MergeState.ROLLED_BACK, actor="merge", error="test")
        journal.end_pass(first, PassResult.OK)
        assert code(T0 + seconds(379)) == EXIT_HEALTHY
        assert code(T0 + seconds(381)) == EXIT_STALE
        # failing passes do not count: the last success does
        clock.at = T0 + seconds(300)
        failing = journal.begin_pass({"check_interval_s": 60})
        clock.at = T0 + seconds(301)
        journal.end_pass(failing, PassResult.FAILED, error="disk full")
        late = compute_status(data_dir, path, now=T0 + seconds(381), check_interval_s=60)
        assert late.exit_code == EXIT_STALE
        assert [p.text for p in late.problems] == [
            "no progress for 181 s (limit 180 s = 3 x the check interval of 60 s);"
            " last pass failed: disk full"
        ]
        # without --check-interval, the one the service recorded; --stale-after scales it
        assert compute_status(data_dir, path, now=T0 + seconds(381)).exit_code == EXIT_STALE
        assert code(T0 + seconds(381), stale_after=4) == EXIT_HEALTHY
        assert compute_status(data_dir, path, now=T0).check_interval_s == 60
    finally:
        journal.close()


def test_liveness_allows_for_the_wait_after_failed_passes(data_dir: Path, clock: Clock) -> None:
    """A service whose every pass fails on something a restart cannot fix (a source it may
    not delete) waits longer after each failed pass, up to an hour. `--liveness` took its
    failed passes for no progress and exited 4 once that wait passed 3 intervals, so the
    probe restarted the sidecar every half hour into the same failure. It now counts a pass
    that ended, whatever its result, and allows for that wait: only the passes the service
    backs off after (failed with an error), and only those of the running service, whose
    backoff lives in memory. The full `status` still says stale (no successful pass)."""
    path = default_journal_path(data_dir)
    journal = Journal.open(path)

    def failed(at: datetime, error: str | None) -> None:
        clock.at = at
        ran = journal.begin_pass({"check_interval_s": 60})
        journal.end_pass(ran, PassResult.FAILED, error=error)

    def code(at: datetime, **kwargs: Any) -> int:
        return compute_status(data_dir, path, now=at, **kwargs).exit_code

    try:
        failed(T0 - seconds(600), "before this start: its backoff died with its process")
        failed(T0 - seconds(300), "before this start: its backoff died with its process")
        lock = lock_path(data_dir)
        lock.write_text("pid=1")
        os.utime(lock, (T0.timestamp(), T0.timestamp()))  # the service started at T0
        for n in range(4):  # then waits of 1, 2, 4 and 8 intervals of 60 s
            failed(T0 + seconds(60 * 2**n), "disk I/O error")
        ended = clock.at

        limit = 3 * 60 + (8 - 1) * 60
        assert code(ended + seconds(limit - 1), liveness=True) == EXIT_HEALTHY
        assert code(ended + seconds(limit + 1), liveness=True) == EXIT_STALE
        assert code(ended + seconds(limit - 1)) == EXIT_STALE
        late = compute_status(data_dir, path, now=ended + seconds(limit + 1), liveness=True)
        assert [p.text for p in late.problems] == [
            f"no progress for {limit + 1} s (limit {limit} s = 3 x the check interval of 60 s"
            f" + {7 * 60} s the service backs off after failed passes); last pass failed:"
            " disk I/O error"
        ]

        # a pass that failed on a partition alone: the service waits one interval after it
        failed(ended + seconds(60), None)
        assert code(clock.at + seconds(179), liveness=True) == EXIT_HEALTHY
        assert code(clock.at + seconds(181), liveness=True) == EXIT_STALE
    finally:
        journal.close()


@pytest.mark.parametrize("case", LOCK_PATHS)
def test_a_lock_path_that_is_not_a_regular_file_is_unhealthy_and_named(
    data_dir: Path, case: str
) -> None:
    """`status` took the lock path's mtime for a service's start whatever it was: a FIFO or a
    folder there, which `run` refuses, looked like a service that had just started."""
    lock = lock_path(data_dir)
    lock.parent.mkdir()
    make, kind = LOCK_PATHS[case]
    make(lock)
    for probe in ((), ("--liveness",)):
        proc = run_cli("status", "--data-dir", str(data_dir), "--json", *probe, timeout=60)
        assert proc.returncode == EXIT_NEVER_RAN, proc.stdout + proc.stderr
        lines = status_json(proc)
        problems = [line["problem"] for line in lines if line["kind"] == "problem"]
        assert f"{lock}: the lock file is {kind}, not a regular file; remove it" in "".join(
            problems
        ), problems
        assert (lines[-1]["healthy"], lines[-1]["service_started"]) == (False, None)


def test_a_lock_file_we_may_not_open_is_named_like_run_names_it(
    data_dir: Path, unprivileged: list[str]
) -> None:
    """A lock file another user owns (mode 600): `run` stops with `cannot open the lock file:
    Permission denied`, and `status`, as the same user, said healthy, taking the unreadable
    file for a service's. Found by a bad-input review (helper-44)."""
    generate(data_dir, small_spec())
    assert run_cli("run", "--once", "--data-dir", str(data_dir)).returncode == 0
    lock = lock_path(data_dir)
    lock.chmod(0o000)
    try:
        refused = run_as(unprivileged, "run", "--once", "--data-dir", str(data_dir))
        proc = run_as(unprivileged, "status", "--data-dir", str(data_dir), "--json")
    finally:
        lock.chmod(0o644)
    assert refused.returncode == 1 and refused.stderr.splitlines()[-1] == (
        f"Error: {lock}: cannot open the lock file: Permission denied"
    ), refused.stderr
    assert proc.returncode == EXIT_NEEDS_PERSON, proc.stdout + proc.stderr
    problems = [line["problem"] for line in status_json(proc) if line["kind"] == "problem"]
    assert problems == [
        f"{lock}: cannot open the lock file: Permission denied; `fgm-consolidator run` refuses"
        " to start"
    ]


def test_a_state_folder_that_is_a_file_is_named_not_a_raw_os_error(data_dir: Path) -> None:
    """`.fgm-consolidator` as a regular file: `run` says why it cannot start, but `status`
    printed only `[Errno 20] Not a directory`, naming neither the folder nor what to do, and
    `history` asked whether `run` had ever run."""
    state = lock_path(data_dir).parent
    state.write_text("not a folder")
    for probe in ((), ("--liveness",)):
        proc = run_cli("status", "--data-dir", str(data_dir), "--json", *probe, timeout=60)
        assert proc.returncode == EXIT_NEVER_RAN, proc.stdout + proc.stderr
        problems = [line["problem"] for line in status_json(proc) if line["kind"] == "problem"]
        assert f"{state} is not a directory" in "".join(problems), problems
    history = run_cli("history", "--data-dir", str(data_dir))
    assert history.returncode == 1
    assert history.stderr.strip() == (
        f"Error: {state} is not a directory, so {state / 'journal.db'} cannot be"
    )


def test_a_lock_path_replaced_under_a_working_service_needs_a_person_not_a_restart(
    data_dir: Path, clock: Clock
) -> None:
    """The service holds the old lock file and works on; a restart would be refused, so a
    liveness probe must not restart it: exit 3, which liveness leaves out."""
    path = default_journal_path(data_dir)
    journal = Journal.open(path)
    try:
        journal.end_pass(journal.begin_pass({"check_interval_s": 60}), PassResult.OK)
    finally:
        journal.close()
    lock_path(data_dir).mkdir()
    now = T0 + seconds(1)
    full = compute_status(data_dir, path, now=now)
    assert [p.exit_code for p in full.problems] == [EXIT_NEEDS_PERSON]
    assert str(lock_path(data_dir)) in full.problems[0].text
    assert compute_status(data_dir, path, now=now, liveness=True).exit_code == EXIT_HEALTHY
    # and once it has stopped working, the service not working comes first
    late = compute_status(data_dir, path, now=T0 + seconds(1000))
    assert [p.exit_code for p in late.problems] == [EXIT_STALE, EXIT_NEEDS_PERSON]


def test_a_merge_needing_a_person_is_exit_3_unless_judging_liveness(
    data_dir: Path, clock: Clock
) -> None:
    path = default_journal_path(data_dir)
    journal = Journal.open(path)
    try:
        merge_id = journal.record_planned(
            partition=P_A, output="o", era="flat", policy={}, sources=[], has_companion=False
        )
        journal.transition(merge_id, MergeState.WRITING, actor="merge")
        journal.record_written(merge_id, rows=1, size=1, checksum="c")
        journal.transition(merge_id, MergeState.NEEDS_ATTENTION, actor="recovery", error="gone")
        ok = journal.begin_pass({"check_interval_s": 60})
        journal.end_pass(ok, PassResult.OK)
    finally:
        journal.close()
    fresh = compute_status(data_dir, path, now=T0 + seconds(1))
    assert fresh.exit_code == EXIT_NEEDS_PERSON
    assert [r.id for r in fresh.needs_person] == [merge_id]
    assert compute_status(data_dir, path, now=T0 + seconds(1), liveness=True).exit_code == 0
    # stale and waiting for a person: the service not working comes first
    both = compute_status(data_dir, path, now=T0 + seconds(1000))
    assert [p.exit_code for p in both.problems] == [EXIT_STALE, EXIT_NEEDS_PERSON]
    assert both.exit_code == EXIT_STALE


# -- what is on disk --------------------------------------------------------------------------


def test_backlog_uses_the_policy_the_service_recorded(
    data_dir: Path, populate: Callable[..., SimulationSummary], clock: Clock
) -> None:
    populate(PodSpec("pod-a"))
    # An hour after the files: their day is not over, so --min-files decides.
    now = PAST + timedelta(hours=2)
    path = default_journal_path(data_dir)
    [default] = compute_status(data_dir, path, now=now).backlog
    assert (default.partition, default.waiting, default.mergeable, default.young) == (
        P_A, 24, 24, 0,
    )  # fmt: skip
    journal = Journal.open(path)
    try:
        recorded = journal.begin_pass({"policy": Policy(min_files=30).as_dict()})
        journal.end_pass(recorded, PassResult.OK)
    finally:
        journal.close()
    [held_back] = compute_status(data_dir, path, now=now).backlog
    assert (held_back.waiting, held_back.mergeable) == (24, 0)


def test_unreadable_files_are_listed_with_their_reason_while_they_are_there(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    populate()
    bad = data_dir / P_A / "metrics-20251230T120000Z.parquet"
    bad.write_bytes(b"not parquet")
    os.utime(bad, (1_700_000_000, 1_700_000_000))
    path = default_journal_path(data_dir)
    [before_run] = compute_status(data_dir, path).unreadable
    assert (before_run.name, before_run.size, before_run.first_seen) == (bad.name, 11, "")
    assert before_run.reason.startswith("unreadable parquet footer")
    assert run_cli("run", "--data-dir", str(data_dir), "--once").returncode == 0
    after = compute_status(data_dir, path)
    [known] = after.unreadable
    assert (known.name, known.reason) == (bad.name, before_run.reason)
    assert known.first_seen != ""
    assert [(b.partition, b.unreadable) for b in after.backlog] == [(P_A, 1)]
    bad.unlink()
    assert compute_status(data_dir, path).unreadable == ()


# -- the command, in real processes -----------------------------------------------------------


def test_status_through_healthy_and_unhealthy_states(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    # 1. never ran here: exit 5, and status created nothing
    proc = run_cli("status", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == EXIT_NEVER_RAN, proc.stderr
    assert status_json(proc)[-1]["healthy"] is False
    assert os.listdir(data_dir) == []

    # 2. files waiting, before the first run: listed per partition
    populate(PodSpec("pod-a"))
    proc = run_cli("status", "--data-dir", str(data_dir))
    assert proc.returncode == EXIT_NEVER_RAN
    assert proc.stdout.splitlines()[0] == (
        f'kind=partition partition="{P_A}" waiting=24 mergeable=24 young=0 unreadable=0'
    )

    # 3. after a pass: healthy, the pass and its result in the output
    assert run_cli("run", "--data-dir", str(data_dir), "--once").returncode == 0
    before = files_of(data_dir)
    proc = run_cli("status", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == EXIT_HEALTHY, proc.stdout + proc.stderr
    last_pass, summary = status_json(proc)
    assert (last_pass["kind"], last_pass["result"], last_pass["merges_finished"]) == (
        "pass", "ok", 1,
    )  # fmt: skip
    assert (summary["kind"], summary["healthy"], summary["exit_code"]) == ("status", True, 0)
    assert summary["last_success"] == last_pass["ended"]
    assert summary["waiting"] == 0 and summary["journal_bytes"] > 0
    assert files_of(data_dir) == before  # read-only: not a byte changed, no file added

    # 4. the last success an hour ago: stale for a 60 s interval, fine with a wider margin
    path = default_journal_path(data_dir)
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="milliseconds")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE passes SET started = ?, ended = ?", [hour_ago, hour_ago])
        conn.execute("UPDATE transitions SET at = ?", [hour_ago])  # the pass's merge, too
    conn.close()
    old = time.time() - 3600
    os.utime(lock_path(data_dir), (old, old))
    proc = run_cli("status", "--data-dir", str(data_dir), "--check-interval", "60")
    assert proc.returncode == EXIT_STALE, proc.stdout
    problem = proc.stdout.splitlines()[-2]
    assert problem.startswith('kind=problem exit_code=4 problem="no progress for 36')
    assert "(limit 180 s = 3 x the check interval of 60 s)" in problem
    wider = {"FGM_CHECK_INTERVAL": "60", "FGM_STALE_AFTER": "100"}
    wide = run_cli("status", "--data-dir", str(data_dir), env=wider)
    assert wide.returncode == EXIT_HEALTHY, wide.stdout

    # 5. a merge that a person must decide: exit 3, and the merge listed
    populate(PodSpec("pod-b"))
    names = sorted(p.name for p in data_files(data_dir) if p.parent.name == "identifier=pod-b")
    killed = run_cli(
        "run", "--data-dir", str(data_dir), "--once", env={"FGM_CRASH_AT": "journal:renamed"}
    )
    assert killed.returncode == -signal.SIGKILL
    [output] = [p.name for p in data_files(data_dir) if p.name.startswith("consolidated-")][1:]
    (data_dir / P_B / output).unlink()
    (data_dir / P_B / names[0]).unlink()
    assert run_cli("run", "--data-dir", str(data_dir), "--once").returncode == EXIT_NEEDS_PERSON
    proc = run_cli("status", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == EXIT_NEEDS_PERSON, proc.stdout
    lines = status_json(proc)
    flagged = [r for r in lines if r["kind"] == "merge"]
    assert [(r["partition"], r["output"], r["state"]) for r in flagged] == [
        (P_B, output, "needs-attention")
    ]
    assert [r["exit_code"] for r in lines if r["kind"] == "problem"] == [EXIT_NEEDS_PERSON]
    assert lines[-1]["needs_person"] == 1
    live = run_cli("status", "--data-dir", str(data_dir), "--liveness")
    assert live.returncode == EXIT_HEALTHY, live.stdout


@pytest.fixture
def service(data_dir: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fgm_consolidator", "run", "--data-dir", str(data_dir), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "FGM_CRASH_AT": ""},
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:  # only our own processes, by their handle
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)


def test_status_reads_beside_a_running_service_without_touching_it(
    data_dir: Path,
    populate: Callable[..., SimulationSummary],
    service: Callable[..., subprocess.Popen[str]],
) -> None:
    populate(PodSpec("pod-a"), PodSpec("pod-b"))
    running = service("--check-interval", "300")
    path = default_journal_path(data_dir)
    wal = path.with_name(path.name + "-wal")
    deadline = time.monotonic() + DEADLINE_S
    while True:
        # Poll status itself until the first pass is recorded and the prune after it has
        # emptied the WAL: from then on the service is idle for 300 s.
        proc = run_cli("status", "--data-dir", str(data_dir), "--json")
        summary = status_json(proc)[-1] if proc.stdout else {}
        if summary.get("last_pass_result") == "ok" and wal.stat().st_size == 0:
            break
        assert running.poll() is None, "the service exited"
        assert time.monotonic() < deadline, proc.stdout + proc.stderr
    assert proc.returncode == EXIT_HEALTHY
    assert wal.exists()  # the service holds the journal open
    journal_before = (path.read_bytes(), wal.read_bytes())
    again = run_cli("status", "--data-dir", str(data_dir))
    assert again.returncode == EXIT_HEALTHY, again.stdout + again.stderr
    assert (path.read_bytes(), wal.read_bytes()) == journal_before
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=DEADLINE_S) == 0
    assert run_cli("status", "--data-dir", str(data_dir)).returncode == EXIT_HEALTHY


def test_status_of_a_partition_of_1000_files_is_quick(data_dir: Path) -> None:
    spec = SimulationSpec(
        pods=(PodSpec("pod-a"),),
        start=datetime(2025, 12, 30, tzinfo=UTC),
        rotations=1000,
        rotation_seconds=60,
        metrics=5,
        containers=2,
        seconds_per_row_sample=10,
    )
    generate(data_dir, spec)
    assert len(data_files(data_dir)) == 1000
    assert run_cli("recover", "--data-dir", str(data_dir)).returncode == 0  # a journal to read
    # a service that ran a pass with the default settings (a `recover` is no service)
    journal = Journal.open(default_journal_path(data_dir))
    pass_id = journal.begin_pass(Settings(data_dir, default_journal_path(data_dir)).as_record())
    journal.end_pass(pass_id, PassResult.OK)
    journal.close()
    took = []
    for _ in range(3):
        started = time.monotonic()
        proc = run_cli("status", "--data-dir", str(data_dir), "--json")
        took.append(time.monotonic() - started)
        assert proc.returncode == EXIT_HEALTHY, proc.stdout + proc.stderr
    [last_pass, backlog, summary] = status_json(proc)
    assert last_pass["kind"] == "pass"
    assert (backlog["waiting"], backlog["mergeable"]) == (1000, 1000)
    assert summary["waiting"] == 1000
    # ~1 s on an idle 2-core machine, half of it Python and pyarrow starting; generous margin
    assert min(took) < 10.0, took
    # the liveness probe reads the journal only: no partition lines, no footers read
    live = run_cli("status", "--data-dir", str(data_dir), "--json", "--liveness")
    assert live.returncode == EXIT_HEALTHY, live.stdout + live.stderr
    [last_pass, summary] = status_json(live)
    assert (summary["kind"], summary["waiting"], summary["unreadable"]) == ("status", None, None)


def test_status_works_on_a_journal_from_before_pass_records(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    populate()
    assert run_cli("run", "--data-dir", str(data_dir), "--once").returncode == 0
    path = default_journal_path(data_dir)
    with sqlite3.connect(path) as conn:  # what an older version left: schema 1 only
        conn.executescript(
            "DROP TABLE passes; DROP TABLE prunes; ALTER TABLE unreadable DROP COLUMN ctime_ns;"
            " DROP TABLE data_dir; DROP TABLE attempts; DROP TABLE released;"
            " ALTER TABLE merges DROP COLUMN companion_checksum; PRAGMA user_version = 1;"
        )
    conn.close()
    proc = run_cli("status", "--data-dir", str(data_dir), "--json")
    # no pass recorded, but the lock says the service started a moment ago
    assert proc.returncode == EXIT_HEALTHY, proc.stdout + proc.stderr
    summary = status_json(proc)[-1]
    assert (summary["last_pass_result"], summary["service_started"] is not None) == (None, True)
    again = run_cli("run", "--data-dir", str(data_dir), "--once")  # migrates to schema 2
    assert again.returncode == 0, again.stderr
    assert [p.result for p in passes(data_dir)] == [PassResult.OK]


def test_a_recover_is_no_service_start(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """`status` took any process that had taken the lock for a service just started: after a
    one-shot `recover` it said healthy (exit 0, service_started) for stale-after x interval,
    with files waiting and nothing running."""
    populate(PodSpec("pod-a"))
    recovered = run_cli("recover", "--data-dir", str(data_dir))
    assert recovered.returncode == 0, recovered.stderr
    proc = run_cli("status", "--data-dir", str(data_dir), "--json")
    assert proc.returncode == EXIT_NEVER_RAN, proc.stdout
    last = status_json(proc)[-1]
    assert (last["healthy"], last["service_started"]) == (False, None)
    # a `run` that takes the lock is a service start, as before
    ran = run_cli("run", "--once", "--data-dir", str(data_dir), "--min-files", "99",
                  "--min-age", "99999999999")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    proc = run_cli("status", "--data-dir", str(data_dir), "--json")
    assert status_json(proc)[-1]["service_started"] is not None


def test_status_json_is_strict_json_when_passes_are_never_due(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """`--check-interval 1e308` means never again; the threshold then is infinite, which
    Python's json printed as `Infinity`: not JSON, and a strict parser (Node's JSON.parse, jq
    on some versions) refused the whole answer. It is null now."""
    populate(PodSpec("pod-a"))
    ran = run_cli("run", "--data-dir", str(data_dir), "--once", "--check-interval", "1e308")
    assert ran.returncode == 0, ran.stderr
    proc = run_cli("status", "--data-dir", str(data_dir), "--json")

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON: {proc.stdout}")

    lines = [json.loads(line, parse_constant=refuse) for line in proc.stdout.splitlines()]
    assert lines[-1]["kind"] == "status"
    assert lines[-1]["threshold_s"] is None
