"""`status` does not call a service healthy whose merges fail in every pass, nor a start that
was refused, and does not call a start-up recovery that journals progress stale."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import consolidated_name, install_journal_clock, invoke, run_cli
from pytest import MonkeyPatch

from fgm_consolidator import durable
from fgm_consolidator.journal import MERGE_ACTOR, Journal, PassResult
from fgm_consolidator.layout import default_journal_path, lock_path
from fgm_consolidator.merge import execute
from fgm_consolidator.plan import Policy, plan_one
from fgm_consolidator.service import Settings, StopFlag, run_service
from fgm_consolidator.simulate import SimulationSummary
from fgm_consolidator.states import MergeState
from fgm_consolidator.status import (
    EXIT_HEALTHY,
    EXIT_NEEDS_PERSON,
    EXIT_NEVER_RAN,
    compute_status,
)

P_A = "dt=2025-12-30/identifier=pod-a"
T0 = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)


def test_status_is_not_healthy_while_the_same_merge_fails_in_every_pass(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """A folder squats the output's temp name (sweep leaves it: not a regular file), so the
    one merge of the partition is rolled back with EEXIST in every pass, for ever. Each pass
    was recorded `result=ok` (a rolled-back merge "counts as done") and `status` said
    healthy=True, exit 0, although nothing has been consolidated in any pass and never will
    be: the probe, the only health signal, hides a permanent failure."""
    populate()
    (data_dir / P_A / (consolidated_name(0, 23) + ".tmp")).mkdir()
    for _ in range(3):
        ran = run_cli("run", "--data-dir", str(data_dir), "--once", "--min-age", "0")
        assert "event=merge-failed" in ran.stderr, ran.stderr  # the same merge, every pass
    proc = run_cli("status", "--data-dir", str(data_dir), "--json", timeout=60)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    summary = lines[-1]
    assert summary["waiting"] == 24  # nothing was ever consolidated
    assert proc.returncode != EXIT_HEALTHY and summary["healthy"] is False, proc.stdout
    assert any(line["kind"] == "problem" for line in lines), proc.stdout


def test_merges_a_stop_cut_short_are_not_failures_of_the_partition(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """Three deploys in a row, each SIGTERM landing past the grace period while a merge was
    written: each merge is rolled back, as it should be, and `status` then called them the
    partition's "last 3 merges failed" and exited 3, for a person with nothing to do."""
    populate()
    policy = Policy(min_age_s=0)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        for _ in range(3):
            [plan, *_] = plan_one(data_dir, P_A, policy, journal, time.time())[1]
            cut = execute(journal, data_dir, plan, policy, should_abort=lambda: True)
            assert cut.state is MergeState.ROLLED_BACK
            assert "stopped on request" in (cut.error or "")
        ran = journal.begin_pass({"check_interval_s": 300})
        journal.end_pass(ran, PassResult.OK)
        assert journal.failures(P_A, MERGE_ACTOR).count == 0
    finally:
        journal.close()

    proc = run_cli("status", "--data-dir", str(data_dir), "--json", timeout=60)

    assert proc.returncode == EXIT_HEALTHY, proc.stdout


def refuse_unlinking_sources(monkeypatch: MonkeyPatch, code: int) -> None:
    """The disk refuses to unlink a `metrics-*` file, with `code`, as it would a file of
    another owner in a sticky folder; every other unlink goes through."""
    real_remove = durable.remove

    def refused(path: Path) -> bool:
        if path.name.startswith("metrics-"):
            raise PermissionError(code, os.strerror(code), str(path))
        return real_remove(path)

    monkeypatch.setattr(durable, "remove", refused)


def test_status_is_not_healthy_while_recovery_fails_the_same_merge_every_time(
    data_dir: Path, populate: Callable[..., SimulationSummary], monkeypatch: MonkeyPatch
) -> None:
    """A merge killed at `renamed`; its sources cannot be deleted (the disk refuses the
    unlink: EACCES). `recover` says a person must decide (exit 3, as documented), and every
    pass of the service fails on it (`recovery-failed`, pass `failed`, `run --once` exit 1).
    `status`, asked right then, said healthy=True, exit 0: the merge is only listed as
    unfinished, and the failing passes are hidden by the service's start-up grace (the
    lock's mtime). It disagrees with `recover` on the same journal at the same moment."""
    populate()
    killed = run_cli(
        "run", "--data-dir", str(data_dir), "--once", "--min-age", "0",
        env={"FGM_CRASH_AT": "journal:renamed"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    refuse_unlinking_sources(monkeypatch, errno.EACCES)
    recovered = invoke("recover", "--data-dir", data_dir)
    assert recovered.exit_code == EXIT_NEEDS_PERSON, recovered.output
    journal = default_journal_path(data_dir)
    for _ in range(2):
        code = run_service(Settings(data_dir, journal), StopFlag(0), once=True)
        assert code == 1  # every pass fails on that merge
    report = compute_status(data_dir, journal)
    assert [r.state for r in report.unfinished] == [MergeState.RENAMED]
    assert report.last_pass is not None and report.last_pass.result is PassResult.FAILED
    assert report.exit_code != EXIT_HEALTHY, report.problems


def test_status_is_not_healthy_after_a_run_that_failed_to_start(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """`run` takes the data directory's lock (writing the holder line, so the lock file's
    mtime moves) before it binds the metrics port and before it opens the journal. A `run`
    refused at start-up (here: its metrics port is taken; exit 1, `Error: --metrics-port
    ...: Address already in use`) leaves that fresh mtime behind, and `status` takes it for
    a service that has just started: it said healthy=True, exit 0, `service_started=<the failed
    start>`, for --stale-after x --check-interval (15 min by default). A crash loop that
    restarts faster than that (kubelet's back-off is at most 5 min) is healthy for good.
    Nothing ever ran: expected exit 5 (never ran here), as before the failed start."""
    populate()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = run_cli("status", "--data-dir", str(data_dir), timeout=60)
        assert before.returncode == EXIT_NEVER_RAN, before.stdout
        refused = run_cli(
            "run", "--data-dir", str(data_dir), "--metrics-addr", "127.0.0.1",
            "--metrics-port", str(port), timeout=60,
        )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert "Address already in use" in refused.stderr
    assert not default_journal_path(data_dir).exists()  # not one pass, not even a journal
    after = run_cli("status", "--data-dir", str(data_dir), "--json", timeout=60)
    summary = json.loads(after.stdout.splitlines()[-1])
    assert after.returncode == EXIT_NEVER_RAN, after.stdout
    assert summary["healthy"] is False, summary


def test_start_up_recovery_that_keeps_journaling_is_not_called_stale(
    data_dir: Path, monkeypatch: MonkeyPatch
) -> None:
    """After a lost journal, start-up recovery proves outputs from their lineage: about 31 s
    per busy hour-output (README, Performance), so a few pod-days take well over the 15 min
    that `status` grants a fresh service (lock mtime) before its first pass. Each proven
    output is journaled (`record_adopted`, then `sources-deleted`), but `status._progress`
    counted journal transitions only inside a running pass (`last.result is None`), and no
    pass exists yet: `status` (and `--liveness`) exits 4, "no progress for 1000 s", 50 s
    after recovery journaled its latest adoption, and a liveness probe restarts the
    container in the middle of the recovery it is waiting for."""
    clock = install_journal_clock(monkeypatch, T0)
    lock = lock_path(data_dir)
    lock.parent.mkdir()
    lock.write_text("pid=1 host=node since=2026-02-01T12:00:00+00:00")
    os.utime(lock, (T0.timestamp(), T0.timestamp()))
    journal = Journal.open(default_journal_path(data_dir))
    try:
        for minute in range(1, 17):  # one output proven and finished every minute
            clock.at = T0 + timedelta(seconds=60 * minute - 10)
            merge_id = journal.record_adopted(
                partition=P_A, output=f"consolidated-{minute}.parquet", era="flat",
                policy={"adopted": {"lineage_merge_id": None}}, sources=[], output_rows=1,
                output_bytes=1, output_checksum="c", companion_checksum=None,
                actor="recovery",
            )  # fmt: skip
            journal.transition(merge_id, MergeState.SOURCES_DELETED, actor="recovery")
    finally:
        journal.close()
    now = T0 + timedelta(seconds=1000)  # the latest adoption: 50 s ago
    for liveness in (False, True):
        report = compute_status(
            data_dir, default_journal_path(data_dir), now=now, liveness=liveness
        )
        assert report.threshold_s == 900
        assert report.exit_code == EXIT_HEALTHY, [p.text for p in report.problems]


def test_status_is_not_healthy_when_the_pass_that_made_a_merge_cannot_delete_its_sources(
    data_dir: Path, populate: Callable[..., SimulationSummary], monkeypatch: MonkeyPatch
) -> None:
    """The same refused unlink, met by the pass that made the merge (sources of another owner
    in a sticky folder): output and sources side by side, the viewer counting rows twice, and
    `status` said healthy, exit 0, until the next pass found the merge in its recovery. Found
    by an operability review."""
    populate()
    refuse_unlinking_sources(monkeypatch, errno.EPERM)
    journal = default_journal_path(data_dir)
    assert run_service(Settings(data_dir, journal), StopFlag(0), once=True) == 1
    report = compute_status(data_dir, journal)
    assert [r.state for r in report.unfinished] == [MergeState.RENAMED]
    assert report.exit_code == EXIT_NEEDS_PERSON, report.problems
    assert any("still unfinished after the last pass" in p.text for p in report.problems)


def test_a_pass_whose_process_died_is_not_running_once_recover_has_run(
    populate: Callable[..., SimulationSummary], data_dir: Path
) -> None:
    """`recover` after a kill -9 left the dead pass open: `status` showed it running and
    healthy until stale (a review, helper-51). Recovery under the lock ends it interrupted."""
    populate()
    killed = run_cli(
        "run", "--once", "--min-age", "0", "--data-dir", str(data_dir),
        env={"FGM_CRASH_AT": "journal:renamed"},
    )  # fmt: skip
    assert killed.returncode == -9
    assert "result=running" in run_cli("status", "--data-dir", str(data_dir)).stdout

    assert run_cli("recover", "--data-dir", str(data_dir)).returncode == 0

    shown = run_cli("status", "--data-dir", str(data_dir))
    assert shown.returncode == 5, shown.stdout
    assert "result=interrupted" in shown.stdout and "result=running" not in shown.stdout
    assert "no pass has succeeded here and no service has started since the last one" in (
        shown.stdout
    )
