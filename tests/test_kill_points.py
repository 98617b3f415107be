"""White-box kill points, enumerated rather than listed: every point a small multi-source merge
reaches (with a start-up sweep of an orphan temp file and an unreadable leftover reported on the
way), at every occurrence, kills a real `run` process; then a `recover` process is killed in
its turn, recovery runs again, a quiescent pass follows, and the oracle checks the six
conditions of issue 3.

The points and occurrences come from a dry run with `FGM_CRASH_COUNT`, not from a list here,
so a point added to the code is killed at without touching this file. The kill during recovery
is chosen the same way: an in-process dry recovery of the crashed state (on a hard-link clone)
lists what recovery reaches, and `FGM_CRASH_AT=*#j` kills the j-th of them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PAST, clone_tree, run_cli
from oracle import (
    RAN_THROUGH,
    ContainerIds,
    RowKey,
    check,
    expected_rows,
    quiescent_pass,
    recover_in_process,
    viewer_containers,
)

from fgm_consolidator import crashpoints
from fgm_consolidator.plan import MB, Policy
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate

# One partition, four sources with companions, ~2.7k rows each: with 1 MB row groups the
# output is written in two row groups, so `writer:row-group#2` exists.
SPEC = SimulationSpec(
    pods=(PodSpec("pod-a"),),
    start=PAST,
    rotations=4,
    metrics=10,
    containers=3,
    seconds_per_row_sample=1,
    seed=3,
)
RUN_ARGS = ("--min-age", "0", "--min-files", "2", "--row-group-size", "1")
POLICY = Policy(min_files=2, min_age_s=0, row_group_bytes=1 * MB)
# Every place the merge path is instrumented; the enumeration must reach each (a vanished
# point would silently shrink the test otherwise).
MERGE_POINTS = {
    "journal:planned",
    "journal:writing",
    "journal:written",
    "journal:renamed",
    "journal:sources-deleted",
    "journal:migrated",
    "journal:unreadable",
    "recovery:swept",
    "writer:row-group",
    "durable:created",
    "durable:fsync-file",
    "durable:fsync-dir",
    "durable:linked",
    "durable:renamed",
    "durable:unlinked",
}


@dataclass(frozen=True)
class Template:
    data_dir: Path
    expected: Counter[RowKey]
    containers: ContainerIds
    run_kills: list[str]  # every `<point>#<n>` the dry run reached, in order


@contextmanager
def counting(path: Path) -> Iterator[Path]:
    """Record the points this process reaches into `path` while the block runs."""
    os.environ[crashpoints.COUNT_ENV_VAR] = str(path)
    try:
        yield path
    finally:
        del os.environ[crashpoints.COUNT_ENV_VAR]


def cli(*args: str, crash_at: str = "", count: Path | None = None) -> int:
    env = {crashpoints.ENV_VAR: crash_at, crashpoints.COUNT_ENV_VAR: str(count or "")}
    result = run_cli(*args, env=env)
    assert result.returncode in (0, -9), result.stdout + result.stderr
    return result.returncode


# Beside the four sources: a crash leftover of the monitor (no footer, reported unreadable and
# left alone) and a temp file of ours that no journal knows (swept at start-up).
LEFTOVER = "dt=2025-12-30/identifier=pod-a/metrics-20251230T081000Z.parquet"
ORPHAN = "dt=2025-12-30/identifier=pod-a/consolidated-20251230T070000Z-20251230T071500Z.parquet.tmp"


@pytest.fixture(scope="module")
def template(fast_root: Path) -> Template:
    root = fast_root / "template"
    root.mkdir()
    data_dir = root / "data"
    data_dir.mkdir()
    generate(data_dir, SPEC)
    expected = expected_rows(data_dir)
    containers = viewer_containers(data_dir)
    assert all(containers.values())  # the spec writes companions
    (data_dir / LEFTOVER).write_bytes(b"PAR1" + bytes(100))
    (data_dir / ORPHAN).write_bytes(b"PAR1 partial")
    dry = clone_tree(data_dir, root / "dry")
    count = root / "dry.count"
    assert cli("run", "--once", "--data-dir", str(dry), *RUN_ARGS, count=count) == 0
    reached = crashpoints.read_reached(count)
    return Template(data_dir, expected, containers, crashpoints.occurrences(reached))


def recovery_reaches(crashed: Path, scratch: Path) -> list[str]:
    """What a recovery of `crashed` reaches, from an in-process dry run on a clone."""
    with counting(scratch.with_suffix(".count")) as count:
        recover_in_process(clone_tree(crashed, scratch))
    return crashpoints.read_reached(count)


def kill_recovery_then_check(
    template: Template, crashed: Path, scratch: Path, reaches: list[str], j: int
) -> list[str]:
    """Kill a `recover` process at its j-th point, recover again, settle, ask the oracle."""
    state = clone_tree(crashed, scratch)
    count = scratch.with_suffix(".count")
    code = cli("recover", "--data-dir", str(state), crash_at=f"*#{j}", count=count)
    killed_at = crashpoints.read_reached(count)
    if code != -9 or killed_at != reaches[:j]:
        return [f"recover was to die at {reaches[j - 1]} (#{j}), got rc={code} after {killed_at}"]
    return settle_and_check(template, state)


def settle_and_check(template: Template, state: Path) -> list[str]:
    recover_in_process(state)
    if quiescent_pass(state, POLICY) not in RAN_THROUGH:
        return ["the quiescent pass failed"]
    return check(state, template.expected, containers=template.containers).violations


def test_the_dry_run_reaches_every_merge_point(template: Template) -> None:
    names = {spec.partition("#")[0] for spec in template.run_kills}
    assert names == MERGE_POINTS
    assert "writer:row-group#2" in template.run_kills
    # the orphan, 2 temp names, 4 sources and 4 companions
    assert "durable:unlinked#11" in template.run_kills


def test_kill_at_every_point_and_occurrence_of_a_merge(template: Template, scratch: Path) -> None:
    """Each run kill is followed by one recovery kill, at the middle of what recovery does; the
    journal commits, where recovery takes its distinct paths, get a recovery kill at every point
    (see the next test)."""
    failures = {}
    recovery_kills = 0
    for i, spec in enumerate(template.run_kills):
        crashed = clone_tree(template.data_dir, scratch / f"case-{i}")
        code = cli("run", "--once", "--data-dir", str(crashed), *RUN_ARGS, crash_at=spec)
        if code != -9:
            failures[spec] = [f"run was to die at {spec}, exited {code}"]
            continue
        reaches = recovery_reaches(crashed, scratch / f"case-{i}-dry")
        if reaches:
            j = (len(reaches) + 1) // 2
            recovery_kills += 1
            violations = kill_recovery_then_check(
                template, crashed, scratch / f"case-{i}-r{j}", reaches, j
            )
        else:
            violations = settle_and_check(template, crashed)
        if violations:
            failures[spec] = violations
    assert failures == {}
    assert recovery_kills >= len(template.run_kills) // 2


# `renamed` is left out on purpose: a recovery from `written` commits `renamed` half-way, so
# killing it at every later point already covers every kill of a recovery from `renamed`.
@pytest.mark.parametrize("state", ["planned", "writing", "written"], ids=lambda s: f"journal:{s}")
def test_kill_at_every_point_of_the_recovery_of_each_state(
    template: Template, scratch: Path, state: str
) -> None:
    """The run dies right after journaling `state`; recovery is then killed at each of its
    points in turn (each from the same crashed state), recovered, settled and checked."""
    crashed = clone_tree(template.data_dir, scratch / "crashed")
    code = cli("run", "--once", "--data-dir", str(crashed), *RUN_ARGS, crash_at=f"journal:{state}")
    assert code == -9
    reaches = recovery_reaches(crashed, scratch / "dry")
    assert reaches[-1] in ("recovery:rolled-back", "recovery:resumed")
    failures = {}
    for j in range(1, len(reaches) + 1):
        violations = kill_recovery_then_check(template, crashed, scratch / f"r{j}", reaches, j)
        if violations:
            failures[f"{reaches[j - 1]} (#{j})"] = violations
    assert failures == {}
