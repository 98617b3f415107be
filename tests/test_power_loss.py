"""Simulated power loss, in the manner of SQLite's crash VFS and LevelDB's fault-injection env:
drop what was not synced, then recover.

A shim stands in for `os` inside `durable` (through which every mutation of the data directory
goes) and records each create, link, unlink and fsync. At the n-th crash point of a workload of
four merges in two partitions it raises `PowerCut`, which nothing in the package catches, and
every later mutation raises it again, so the disk stays exactly as it was at that instant. From
the record it then builds what a power cut could have left, in several variants:

- `lose-all`: every create, link and unlink not followed by an fsync of its folder is undone,
  and file data not fsynced is dropped;
- `keep-unlinks`: only the unsynced unlinks reached the disk (no order is promised between
  unsynced operations of one folder), unsynced data dropped;
- `torn`: every operation reached the disk but unsynced data is cut in the middle;
- `prefix`: the first half of each folder's unsynced operations reached the disk.

SQLite journal commits that returned are kept (the journal is `synchronous=FULL`). Recovery runs
on each variant, then a quiescent pass, then the oracle checks all six conditions.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import PAST, clone_tree
from oracle import (
    RAN_THROUGH,
    RowKey,
    check,
    expected_rows,
    quiescent_pass,
    recover_in_process,
)

from fgm_consolidator import crashpoints, durable, merge
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path, iter_partitions
from fgm_consolidator.merge import execute
from fgm_consolidator.plan import Policy, plan_one
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate

# Two partitions of six files; aligned 6-minute windows make two merges in each, of four and
# of two sources.
SPEC = SimulationSpec(
    pods=(PodSpec("pod-a"), PodSpec("pod-b")),
    start=PAST,
    rotations=6,
    metrics=5,
    containers=2,
    seconds_per_row_sample=10,
    seed=5,
)
POLICY = Policy(min_files=2, min_age_s=0, max_span_s=360)
MERGES = 4
VARIANTS = ("lose-all", "keep-unlinks", "torn", "prefix")


class PowerCut(BaseException):
    """The lights went out: raised by the shim, caught by no `except Exception` in the package."""


@dataclass(frozen=True)
class DirOp:
    """One change to a folder's entries: `create` and `link` add `name`, `unlink` removes it."""

    kind: str
    folder: Path
    name: str
    stash: Path  # a hard link to the inode, kept aside so an undone unlink can be restored


@dataclass
class Disk:
    """What reached the disk for sure (synced) and what a power cut may still take back."""

    stash_dir: Path
    cut_at: int | None = None  # cut at the n-th crash point; None records only
    points: list[str] = field(default_factory=list)
    syncs_at_point: list[int] = field(default_factory=list)  # len(dir_syncs) at each point
    log: list[DirOp] = field(default_factory=list)  # every folder operation, in order
    unsynced: dict[Path, list[DirOp]] = field(default_factory=dict)
    synced_size: dict[int, int] = field(default_factory=dict)  # inode -> bytes fsynced
    created: dict[int, Path] = field(default_factory=dict)  # inode -> its stash link
    size_at_cut: dict[int, int] = field(default_factory=dict)
    dir_syncs: list[Path] = field(default_factory=list)
    after_cut: list[str] = field(default_factory=list)
    cut: bool = False

    def stash(self, path: Path) -> Path:
        self.stash_dir.mkdir(exist_ok=True)
        target = self.stash_dir / str(len(self.log))
        os.link(path, target)
        return target

    def guard(self) -> None:
        if self.cut:
            raise PowerCut("no mutation after the power cut")

    def record(self, kind: str, path: Path, stash: Path) -> None:
        op = DirOp(kind, Path(os.path.realpath(path.parent)), path.name, stash)
        self.log.append(op)
        self.unsynced.setdefault(op.folder, []).append(op)

    def reach(self, point: str) -> None:
        if self.cut:
            self.after_cut.append(point)
            return
        self.points.append(point)
        self.syncs_at_point.append(len(self.dir_syncs))
        if self.cut_at is not None and len(self.points) == self.cut_at:
            self.cut = True
            self.size_at_cut = {ino: os.stat(link).st_size for ino, link in self.created.items()}
            raise PowerCut(point)


class ShimOs:
    """`os` as `durable` sees it: every mutating call recorded, or refused after the cut."""

    def __init__(self, disk: Disk) -> None:
        self._disk = disk

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        creating = bool(flags & os.O_CREAT)
        if creating:
            self._disk.guard()
        fd = os.open(path, flags, mode)
        if creating:
            stash = self._disk.stash(Path(path))
            self._disk.created[os.fstat(fd).st_ino] = stash
            self._disk.record("create", Path(path), stash)
        return fd

    def fsync(self, fd: int) -> None:
        self._disk.guard()
        os.fsync(fd)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            folder = Path(os.readlink(f"/proc/self/fd/{fd}"))
            self._disk.dir_syncs.append(folder)
            self._disk.unsynced.pop(folder, None)
        else:
            self._disk.synced_size[st.st_ino] = st.st_size

    def link(self, src: Any, dst: Any) -> None:
        self._disk.guard()
        os.link(src, dst)
        self._disk.record("link", Path(dst), self._disk.stash(Path(dst)))

    def unlink(self, path: Any) -> None:
        self._disk.guard()
        stash = self._disk.stash(Path(path))  # FileNotFoundError, as the real unlink would
        os.unlink(path)
        self._disk.record("unlink", Path(path), stash)


# -- what a power cut leaves ------------------------------------------------------------------


def undo(op: DirOp, target: Path, source: Path) -> None:
    """Take one folder operation back in the clone `target` of the crashed tree `source`."""
    path = target / op.folder.relative_to(source) / op.name
    if op.kind == "unlink":
        os.link(op.stash, path)
    else:
        path.unlink(missing_ok=True)


def undone(ops: list[DirOp], variant: str) -> list[DirOp]:
    if variant == "lose-all":
        return ops
    if variant == "keep-unlinks":
        return [op for op in ops if op.kind != "unlink"]
    if variant == "prefix":
        return ops[len(ops) // 2 :]
    return []  # torn: every operation reached the disk


def kept_bytes(disk: Disk, inode: int, variant: str) -> int:
    synced = disk.synced_size.get(inode, 0)
    at_cut = disk.size_at_cut[inode]
    return synced + (at_cut - synced) // 2 if variant == "torn" else synced


def power_cut_state(disk: Disk, crashed: Path, target: Path, variant: str) -> Path:
    clone_tree(crashed, target)
    for ops in disk.unsynced.values():
        for op in reversed(undone(ops, variant)):
            undo(op, target, crashed)
    copies: dict[int, Path] = {}  # one private copy per inode, so two names stay one file
    for partition in iter_partitions(target):
        for entry in os.scandir(target / partition):
            inode = entry.inode()
            if inode not in disk.size_at_cut or entry.stat().st_size == kept_bytes(
                disk, inode, variant
            ):
                continue  # not ours, or nothing of it lost: the same file as on the disk
            if inode not in copies:  # the inode is shared with the other clones: copy it
                copies[inode] = target / f".private-{inode}"
                data = Path(entry.path).read_bytes()[: kept_bytes(disk, inode, variant)]
                copies[inode].write_bytes(data)
            os.unlink(entry.path)
            os.link(copies[inode], entry.path)
    for copy in copies.values():
        copy.unlink()
    return target


# -- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    template: Path
    expected: Counter[RowKey]


def run_workload(data_dir: Path, disk: Disk, skip_sync_in: str | None = None) -> bool:
    """One `run --once` in-process with the shim in place of `os` in `durable`; True when the
    power was cut. `skip_sync_in` names a function whose folder syncs become no-ops (a mutant,
    to show that the harness notices a missing sync)."""
    real_fsync_dir = durable.fsync_dir

    def fsync_dir(path: Path) -> None:
        if sys._getframe(1).f_code.co_name != skip_sync_in:
            real_fsync_dir(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(durable, "os", ShimOs(disk))
        patch.setattr(crashpoints, "reach", disk.reach)
        if skip_sync_in:
            patch.setattr(durable, "fsync_dir", fsync_dir)
        try:
            quiescent_pass(data_dir, POLICY)
        except PowerCut:
            return True
    return False


@pytest.fixture(scope="module")
def workload(fast_root: Path) -> Workload:
    template = fast_root / "template"
    template.mkdir()
    generate(template, SPEC)
    return Workload(template.resolve(), expected_rows(template))


def dry_run(workload: Workload, scratch: Path) -> Disk:
    disk = Disk(scratch / "dry-stash")
    assert not run_workload(clone_tree(workload.template, scratch / "dry"), disk)
    return disk


def test_the_shim_sees_every_change_of_the_data_directory(
    workload: Workload, scratch: Path
) -> None:
    """Replaying the recorded operations on the names before the run gives the names after it:
    nothing touched a partition behind the shim's back; and the run ends fully synced."""
    names = {
        partition: set(os.listdir(workload.template / partition))
        for partition in iter_partitions(workload.template)
    }
    disk = dry_run(workload, scratch)
    assert disk.points.count("journal:sources-deleted") == MERGES
    assert disk.unsynced == {}
    data_dir = (scratch / "dry").resolve()
    for op in disk.log:
        folder = names[str(op.folder.relative_to(data_dir))]
        if op.kind == "unlink":
            folder.remove(op.name)
        else:
            assert op.name not in folder
            folder.add(op.name)
    assert {p: set(os.listdir(data_dir / p)) for p in iter_partitions(data_dir)} == names


def test_the_state_folder_is_durable_before_the_first_commit(
    workload: Workload, scratch: Path
) -> None:
    """Regression: a new journal's folder was created in the data directory and never synced
    there, so a power cut could take the whole journal away with every merge it recorded."""
    disk = dry_run(workload, scratch)
    first_commit = next(i for i, p in enumerate(disk.points) if p.startswith("journal:"))
    synced = disk.dir_syncs[: disk.syncs_at_point[first_commit]]
    data_dir = (scratch / "dry").resolve()
    assert {default_journal_path(data_dir).parent, data_dir} <= set(synced)


def cut_and_recover(
    workload: Workload, scratch: Path, n: int, skip_sync_in: str | None = None
) -> dict[str, list[str]]:
    """Cut the power at the n-th point, then recover and check every distinct variant."""
    crashed = clone_tree(workload.template, scratch / f"cut-{n}").resolve()
    disk = Disk(scratch / f"cut-{n}-stash", cut_at=n)
    assert run_workload(crashed, disk, skip_sync_in)
    assert disk.after_cut == []  # nothing, not even a journal commit, ran on after the cut
    failures: dict[str, list[str]] = {}
    seen: set[tuple[Any, ...]] = set()
    for variant in VARIANTS:
        ops = tuple(op for folder in disk.unsynced.values() for op in undone(folder, variant))
        sizes = tuple(sorted((i, kept_bytes(disk, i, variant)) for i in disk.size_at_cut))
        if (ops, sizes) in seen:
            continue  # the same state as an earlier variant
        seen.add((ops, sizes))
        state = power_cut_state(disk, crashed, scratch / f"cut-{n}-{variant}", variant)
        recover_in_process(state)
        if quiescent_pass(state, POLICY) not in RAN_THROUGH:
            failures[variant] = ["the quiescent pass failed"]
            continue
        violations = check(state, workload.expected).violations
        if violations:
            failures[variant] = violations
    return failures


def test_power_cut_at_every_crash_point_of_four_merges(workload: Workload, scratch: Path) -> None:
    points = dry_run(workload, scratch).points
    failures = {}
    for n, point in enumerate(points, start=1):
        found = cut_and_recover(workload, scratch, n)
        if found:
            failures[f"{point} (#{n})"] = found
    assert failures == {}


def test_the_harness_finds_a_missing_folder_sync(workload: Workload, scratch: Path) -> None:
    """The mutant publishes without syncing the folder, so the output's new name and the
    sources' unlinks are both pending when the journal says `renamed`: a cut while the sources
    are being deleted may keep the unlinks and lose the name. The harness must see the loss."""
    points = dry_run(workload, scratch).points
    renamed = points.index("journal:renamed") + 1
    deleted = points.index("journal:sources-deleted") + 1
    found: dict[str, list[str]] = {}
    for n in range(renamed, deleted):
        cut = cut_and_recover(workload, scratch, n, skip_sync_in=merge.publish.__name__)
        for variant, violations in cut.items():
            found.setdefault(variant, []).extend(violations)
    assert any("expected rows lost" in v for v in found.get("keep-unlinks", [])), found


# -- a power cut while the lineage settles a merge whose journal was lost ----------------------


class Killed(BaseException):
    """kill -9: the process stops, and the page cache, with every change not yet synced, stays."""


def killed_after_publish(workload: Workload, crashed: Path, disk: Disk) -> None:
    """Run until the first output and its companion have their final names, not yet synced,
    then die; and the journal is lost (a person removed it). Only the outputs' lineage is left
    to say which sources they hold."""
    clone_tree(workload.template, crashed)

    def reach(point: str) -> None:
        disk.reach(point)
        if disk.points.count("durable:renamed") == 2:  # the companion's: no temp name is left
            raise Killed(point)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(durable, "os", ShimOs(disk))
        patch.setattr(crashpoints, "reach", reach)
        with pytest.raises(Killed):
            quiescent_pass(crashed, POLICY)
    journal = default_journal_path(crashed)
    for name in (journal.name, journal.name + "-wal", journal.name + "-shm"):
        (journal.parent / name).unlink(missing_ok=True)


def recover_under_the_shim(data_dir: Path, disk: Disk) -> bool:
    """`recover` in-process with the shim; True when the power was cut."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(durable, "os", ShimOs(disk))
        patch.setattr(crashpoints, "reach", disk.reach)
        try:
            recover_in_process(data_dir)
        except PowerCut:
            return True
    return False


def test_power_cut_at_every_point_of_a_lineage_recovery(workload: Workload, scratch: Path) -> None:
    """The output's name is still only in the page cache when lineage recovery proves its
    sources held: the output must be durable before the first of them is unlinked, or a cut
    that keeps the unlinks and loses the name loses their rows."""
    dry = Disk(scratch / "dry-stash")
    killed_after_publish(workload, scratch / "dry", dry)
    assert any(op.kind == "link" for ops in dry.unsynced.values() for op in ops)
    before = len(dry.points)
    assert not recover_under_the_shim(scratch / "dry", dry)
    points = dry.points[before:]
    assert points.count("durable:unlinked") == 8  # four sources and their companions
    failures: dict[str, list[str]] = {}
    for n, point in enumerate(points, start=1):
        crashed = (scratch / f"cut-{n}").resolve()
        disk = Disk(scratch / f"cut-{n}-stash")
        killed_after_publish(workload, crashed, disk)
        disk.cut_at = len(disk.points) + n
        assert recover_under_the_shim(crashed, disk)
        for variant in VARIANTS:
            state = power_cut_state(disk, crashed, scratch / f"cut-{n}-{variant}", variant)
            recover_in_process(state)
            if quiescent_pass(state, POLICY) not in RAN_THROUGH:
                failures.setdefault(f"{point} (#{n})", []).append(f"{variant}: pass failed")
            elif expected_rows(state) != workload.expected:
                failures.setdefault(f"{point} (#{n})", []).append(f"{variant}: rows differ")
    assert failures == {}


# -- a power cut after an instance past the lock withdrew its output --------------------------

WHOLE_DAY = Policy(min_files=2, min_age_s=0)  # one output of all six files of a partition


def withdraw_under_the_shim(data_dir: Path, journals: Path, disk: Disk) -> bool:
    """Two instances past the lock: B plans the first window of a partition, A (a wider
    policy) all of it. A finishes while B is about to publish, so B publishes, finds A's
    output holding its sources, and withdraws its own. True when the power was cut."""
    partition = next(iter_partitions(data_dir))
    journal_a = Journal.open(journals / "a.db")
    journal_b = Journal.open(journals / "b.db")
    now = time.time()
    plan_b = plan_one(data_dir, partition, POLICY, journal_b, now)[1][0]
    [plan_a] = plan_one(data_dir, partition, WHOLE_DAY, journal_a, now)[1]
    real_publish = merge.publish

    def publish(folder: Path, output: str, **kwargs: Any) -> None:
        if output == plan_b.output:
            assert execute(journal_a, data_dir, plan_a, WHOLE_DAY).error is None
        real_publish(folder, output, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(durable, "os", ShimOs(disk))
            patch.setattr(crashpoints, "reach", disk.reach)
            patch.setattr(merge, "publish", publish)
            outcome = execute(journal_b, data_dir, plan_b, POLICY)
            assert "withdrawn, sources kept" in (outcome.error or "")
    except PowerCut:
        return True
    finally:
        journal_a.close()
        journal_b.close()
    return False


def test_a_withdrawn_output_is_gone_for_good_before_the_journal_says_so(
    workload: Workload, scratch: Path
) -> None:
    """B's withdrawal is journaled `rolled-back`, a terminal state: were the unlink of its
    output not yet synced, a power cut would bring the output back beside A's, every row of
    B's sources twice, and no recovery would take it away again."""
    dry = Disk(scratch / "dry-stash")
    (scratch / "dry-journals").mkdir()
    assert not withdraw_under_the_shim(
        clone_tree(workload.template, scratch / "dry").resolve(), scratch / "dry-journals", dry
    )
    n = dry.points.index("journal:rolled-back") + 1
    crashed = clone_tree(workload.template, scratch / "crashed").resolve()
    journals = scratch / "journals"
    journals.mkdir()
    disk = Disk(scratch / "cut-stash", cut_at=n)
    assert withdraw_under_the_shim(crashed, journals, disk)
    failures = {}
    for variant in VARIANTS:
        state = power_cut_state(disk, crashed, scratch / variant, variant)
        journal = scratch / f"{variant}.db"
        for suffix in ("", "-wal"):
            if (journals / f"b.db{suffix}").exists():
                shutil.copy2(journals / f"b.db{suffix}", f"{journal}{suffix}")
        recover_in_process(state, journal)
        if expected_rows(state) != workload.expected:
            failures[variant] = "rows differ"
    assert failures == {}
