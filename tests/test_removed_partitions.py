"""A partition folder removed while the sidecar works (a pod's folder, or an old day, cleaned
up by a person or a job) is a partition that is gone, not a failure that never ends.

Found by an adversarial review of the pass path; each failed before its fix.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import run_cli, small_spec

from fgm_consolidator import service
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path, state_dir
from fgm_consolidator.merge import execute
from fgm_consolidator.plan import Policy, plan_one
from fgm_consolidator.service import Settings, StopFlag, run_service
from fgm_consolidator.simulate import PodSpec, generate
from fgm_consolidator.states import MergeState

POLICY = Policy(min_age_s=0, min_files=2)
GONE = "dt=2025-12-30/identifier=pod-a"  # a pod's folder that someone removes
KEPT = "dt=2025-12-30/identifier=pod-b"


def run_once(data_dir: Path) -> int:
    settings = Settings(data_dir, default_journal_path(data_dir), POLICY)
    return run_service(settings, StopFlag(grace_s=0), once=True)


def unfinished(data_dir: Path) -> list[tuple[int, MergeState]]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return [(r.id, r.state) for r in journal.unfinished()]
    finally:
        journal.close()


def two_pods(data_dir: Path) -> None:
    generate(data_dir, small_spec((PodSpec("pod-a"), PodSpec("pod-b")), rotations=6))
    state_dir(data_dir).mkdir(exist_ok=True)


def test_a_partition_folder_removed_under_a_merge_does_not_leave_it_unfinished_for_good(
    data_dir: Path,
) -> None:
    """A pod's `identifier=` folder (or an old `dt=` day) removed by a person or a clean-up
    job while a merge of it is planned: creating the temp file fails, and the roll back then
    fsynced the folder that is gone, which raised out of the `except` block. The merge
    stayed `writing`, and every later recovery failed the same way (`recovery-failed` at
    every pass, `run --once` exit 1 for good, `recover` exit 3, the whole pass backing off to
    once an hour) although nothing was left on disk to roll back or to keep."""
    two_pods(data_dir)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        _, plans, _ = plan_one(data_dir, GONE, POLICY, journal, time.time())
        shutil.rmtree(data_dir / GONE)  # removed between the plan and the write
        try:
            outcome = execute(journal, data_dir, plans[0], POLICY)
            assert outcome.state is MergeState.ROLLED_BACK
        except FileNotFoundError as exc:
            pytest.fail(f"execute raised out of its own roll back: {exc}")
    finally:
        journal.close()
    assert unfinished(data_dir) == []
    assert run_once(data_dir) == 0


def test_a_merge_cut_by_a_kill_whose_folder_is_then_removed_is_rolled_back(
    data_dir: Path,
) -> None:
    """The same after a SIGKILL: a merge left `planned`/`writing` (nothing published, the
    sources intact) whose folder is removed before the restart. Recovery's roll back
    fsynced the folder that is gone and left the merge `writing` for good."""
    two_pods(data_dir)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        _, plans, _ = plan_one(data_dir, GONE, POLICY, journal, time.time())
        plan = plans[0]
        merge_id = journal.record_planned(
            partition=plan.partition,
            output=plan.output,
            era=plan.era,
            policy=POLICY.as_dict(),
            sources=[s.record() for s in plan.sources],
            has_companion=True,
        )
        journal.transition(merge_id, MergeState.WRITING, actor="merge")  # then SIGKILL
    finally:
        journal.close()
    shutil.rmtree(data_dir / GONE)  # the pod's folder cleaned up before the restart
    assert run_once(data_dir) == 0
    assert unfinished(data_dir) == []
    assert (data_dir / KEPT).is_dir()


def test_a_partition_folder_removed_between_the_walk_and_its_scan_is_no_failure(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder listed by the walk and removed before its scan (the same clean-up, timed a
    moment later) was a `partition-failed` error: the pass recorded failed, `run --once`
    exit 1 and the key backing off, for a partition with nothing left in it."""
    two_pods(data_dir)
    walk = service.walk_partitions

    def walk_then_remove(path: Path):  # type: ignore[no-untyped-def]
        found = walk(path)
        shutil.rmtree(data_dir / GONE, ignore_errors=True)
        return found

    monkeypatch.setattr(service, "walk_partitions", walk_then_remove)
    assert run_once(data_dir) == 0


def test_a_published_merge_whose_folder_is_then_removed_is_rolled_back(data_dir: Path) -> None:
    """Killed between the rename and the deletes, and the folder removed before the restart:
    output and sources went with it, so there is nothing to keep or to finish. The merge is
    rolled back, naming the folder (it waited for a person, and looking for rival outputs
    in the folder that is gone failed every recovery)."""
    two_pods(data_dir)
    crash = {"FGM_CRASH_AT": "journal:renamed"}
    args = ("run", "--once", "--min-age", "0", "--data-dir", str(data_dir))
    assert run_cli(*args, env=crash).returncode == -9
    assert [state for _id, state in unfinished(data_dir)] == [MergeState.RENAMED]
    shutil.rmtree(data_dir / GONE)

    recovered = run_cli("recover", "--data-dir", str(data_dir))

    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert recovered.stdout.count(" is gone") == 1, recovered.stdout
    assert f"the folder {data_dir / GONE} is gone" in recovered.stdout
    assert unfinished(data_dir) == []
    assert run_once(data_dir) == 0
