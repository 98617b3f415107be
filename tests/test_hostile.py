"""Hostile surroundings: what people, clocks and other processes do to a running consolidator.

- two instances at once, the lock bypassed (a network file system without flock, a second
  pod with its own journal): no source is merged twice, no row lost or doubled;
- the journal (or its WAL) lost after a crash: the outputs' own lineage lets recovery remove
  exactly the sources they provably hold, and report (and hold back) anything uncertain;
- the journal truncated: refuse to run, exit non-zero, delete nothing, say how to repair;
- a source touched or replaced while its merge is written: never deleted, nothing published;
- the wall clock jumping days back and forth under a running service (libfaketime);
- SIGTERM at random moments: exit 0 at a step boundary within the grace period.

Every process is real; every wait polls a condition with a deadline.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    LOCK_PATHS,
    StopOnceRowsAreRead,
    add_late_container,
    clone_tree,
    data_files,
    rows_pyarrow,
    run_cli,
    small_spec,
    tmp_files,
)
from oracle import (
    ContainerIds,
    canonical_row,
    check,
    expected_rows,
    journal_records,
    viewer_containers,
)
from test_crash import (
    OUTPUT,
    OUTPUT_COMPANION,
    POD_A,
    SOURCES,
    json_lines,
    make_data,
    recover,
    run_once,
    snapshot,
)
from test_service import DEADLINE_S, SLOW, Service, fields, poll, running

from fgm_consolidator import crashpoints, lineage, lock, merge, recovery
from fgm_consolidator import status as status_module
from fgm_consolidator.errors import LockError
from fgm_consolidator.journal import Journal, MergeRecord
from fgm_consolidator.layout import default_journal_path, lock_path, tmp_name
from fgm_consolidator.merge import execute
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import plan_one
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate
from fgm_consolidator.states import MergeState
from fgm_consolidator.status import compute_status

EXIT_NEEDS_PERSON = 3
# Five sources and their companions unlinked (two temp names first): 19 sources left.
AFTER_FIVE_DELETES = "durable:unlinked#12"
LEFT = SOURCES - 5


@pytest.fixture
def service(data_dir: Path) -> Iterator[Callable[..., Service]]:
    with running(data_dir) as make:
        yield make


def journal_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def records_of(path: Path) -> list[MergeRecord]:
    journal = Journal.open(path, read_only=True)
    try:
        return sorted(journal.history(), key=lambda r: r.id)
    finally:
        journal.close()


def unfinished_in(path: Path) -> list[MergeRecord]:
    return [r for r in records_of(path) if r.state not in (MergeState.SOURCES_DELETED,
                                                           MergeState.ROLLED_BACK)]  # fmt: skip


def live_lineages(data_dir: Path) -> dict[str, lineage.Lineage]:
    found = {}
    for path in data_files(data_dir):
        held = lineage.read(path)
        if held is not None:
            found[str(path.relative_to(data_dir))] = held
    return found


def assert_no_source_in_two_outputs(data_dir: Path) -> None:
    seen: dict[tuple[str, str], str] = {}
    for output, held in live_lineages(data_dir).items():
        partition = str(Path(output).parent)
        for name in {source.name for source in held.sources}:
            other = seen.setdefault((partition, name), output)
            assert other == output, f"{name} is held by {other} and {output}"


# -- two instances, the lock bypassed ---------------------------------------------------------

POD = "dt=2025-12-30/identifier=pod-a"
POLICY = Policy(min_files=2, min_age_s=0)


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    """30 rotations of pod-a waiting outside the data directory, moved in by `arrive`."""
    staging = tmp_path / "staging"
    generate(staging, small_spec((PodSpec("pod-a"),), rotations=30))
    return staging


def arrive(staging: Path, data_dir: Path, rotations: range) -> None:
    names = sorted(p.name for p in (staging / POD).glob("metrics-*.parquet"))
    (data_dir / POD).mkdir(parents=True, exist_ok=True)
    for name in (names[i] for i in rotations):
        for moved in (name, name.replace(".parquet", ".containers")):
            (staging / POD / moved).rename(data_dir / POD / moved)


def two_journals(tmp_path: Path) -> tuple[Journal, Journal]:
    return Journal.open(tmp_path / "a.db"), Journal.open(tmp_path / "b.db")


def test_a_rival_that_deletes_our_sources_before_we_publish_makes_us_withdraw(
    data_dir: Path, tmp_path: Path, staged: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B plans rotations 0-9, A (later) plans 0-11 and finishes while B is about to publish.

    Regression: B used to publish, find its sources gone, take them for deleted before a
    crash, and finish: rotations 0-9 were then in both outputs for good."""
    arrive(staged, data_dir, range(10))
    expected = rows_pyarrow(data_dir) + rows_pyarrow(staged)
    journal_a, journal_b = two_journals(tmp_path)
    [plan_b] = plan_one(data_dir, POD, POLICY, journal_b, time.time())[1]
    arrive(staged, data_dir, range(10, 12))
    [plan_a] = plan_one(data_dir, POD, POLICY, journal_a, time.time())[1]
    real_publish = merge.publish
    outcomes_a = []

    def publish(folder: Path, output: str, **kwargs: Any) -> None:
        if output == plan_b.output and not outcomes_a:
            outcomes_a.append(execute(journal_a, data_dir, plan_a, POLICY))
        real_publish(folder, output, **kwargs)

    monkeypatch.setattr(merge, "publish", publish)
    outcome_b = execute(journal_b, data_dir, plan_b, POLICY)
    journal_a.close()
    journal_b.close()

    assert outcomes_a[0].state is MergeState.SOURCES_DELETED
    assert outcome_b.state is MergeState.ROLLED_BACK
    assert f"{plan_a.output} already hold(s) sources of {plan_b.output}" in (outcome_b.error or "")
    assert [p.name for p in data_files(data_dir)] == [plan_a.output]
    assert rows_pyarrow(data_dir) == expected - rows_pyarrow(staged)
    assert tmp_files(data_dir) == []


def test_both_published_then_the_later_to_look_withdraws(
    data_dir: Path, tmp_path: Path, staged: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (rotations 0-11) publishes; before A looks for rivals, B (rotations 0-9, planned
    earlier) publishes, looks, finds A's output holding its sources, and withdraws."""
    arrive(staged, data_dir, range(10))
    journal_a, journal_b = two_journals(tmp_path)
    [plan_b] = plan_one(data_dir, POD, POLICY, journal_b, time.time())[1]
    arrive(staged, data_dir, range(10, 12))
    before = rows_pyarrow(data_dir)
    [plan_a] = plan_one(data_dir, POD, POLICY, journal_a, time.time())[1]
    real_rivals = merge.rivals
    outcomes_b = []

    def b_first(
        folder: Path, record: MergeRecord, ours: Sequence[lineage.LineageSource]
    ) -> dict[str, lineage.Lineage]:
        if record.output == plan_a.output and not outcomes_b:
            outcomes_b.append(execute(journal_b, data_dir, plan_b, POLICY))
        return real_rivals(folder, record, ours)

    monkeypatch.setattr(merge, "rivals", b_first)
    outcome_a = execute(journal_a, data_dir, plan_a, POLICY)
    journal_a.close()
    journal_b.close()

    [outcome_b] = outcomes_b
    assert outcome_b.state is MergeState.ROLLED_BACK
    assert "withdrawn, sources kept" in (outcome_b.error or "")
    assert outcome_a.state is MergeState.SOURCES_DELETED
    assert [p.name for p in data_files(data_dir)] == [plan_a.output]
    assert rows_pyarrow(data_dir) == before
    assert tmp_files(data_dir) == []


@pytest.mark.parametrize("then", ["removed", "replaced"])
def test_a_temp_another_instance_removed_or_replaced_is_never_published(
    data_dir: Path, tmp_path: Path, staged: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """Found by the two-instance test (1 run in ~25): instance A's start-up sweep removed B's
    output temp, or A's roll back after a name clash did; at publish B took the missing temp
    for one renamed before a crash, published its companion alone, deleted its sources, and
    their rows were gone. The temp must still be the file B wrote, or nothing is published
    and the merge rolls back, leaving another's temp where it is."""
    arrive(staged, data_dir, range(12))
    before = rows_pyarrow(data_dir)
    journal = Journal.open(tmp_path / "b.db")
    [plan] = plan_one(data_dir, POD, POLICY, journal, time.time())[1]
    temp = data_dir / POD / tmp_name(plan.output)
    real_check = merge._check_sources

    def meanwhile(folder: Path, checked: Any) -> None:
        real_check(folder, checked)
        temp.unlink()  # the other instance's doing
        if then == "replaced":
            temp.write_bytes(b"theirs")

    monkeypatch.setattr(merge, "_check_sources", meanwhile)
    outcome = execute(journal, data_dir, plan, POLICY)
    journal.close()

    assert outcome.state is MergeState.ROLLED_BACK
    assert "removed or replaced since it was written" in (outcome.error or "")
    assert rows_pyarrow(data_dir) == before
    folder_now = sorted(os.listdir(data_dir / POD))
    assert not [
        name
        for name in folder_now
        if name.startswith("consolidated-") and not name.endswith(".tmp")
    ]
    assert (temp.read_bytes() == b"theirs") if then == "replaced" else not temp.exists()


def test_a_temp_name_taken_by_another_instance_is_not_removed(
    data_dir: Path, tmp_path: Path, staged: Path
) -> None:
    """Regression: the roll back after EEXIST removed the other instance's file in progress."""
    arrive(staged, data_dir, range(12))
    journal = Journal.open(tmp_path / "a.db")
    [plan] = plan_one(data_dir, POD, POLICY, journal, time.time())[1]
    theirs = data_dir / POD / tmp_name(plan.output)
    theirs.write_bytes(b"another instance is writing this")
    files = snapshot(data_dir)
    outcome = execute(journal, data_dir, plan, POLICY)
    journal.close()
    assert outcome.state is MergeState.ROLLED_BACK and "File exists" in (outcome.error or "")
    assert snapshot(data_dir) == files


BYPASS = (
    "import contextlib, sys, types\n"
    "from fgm_consolidator import lock\n"
    "# no lock, so none to lose or to announce a start in\n"
    "held = types.SimpleNamespace(check=lambda: None, announce=lambda suffix='': None)\n"
    "lock.exclusive = lambda data_dir: contextlib.nullcontext(held)\n"
    "from fgm_consolidator.cli import main\n"
    "main()\n"
)


def parquet_count(folder: Path) -> int:
    return sum(1 for name in os.listdir(folder) if name.endswith(".parquet"))


def bypassing_service(data_dir: Path, journal: Path) -> subprocess.Popen[str]:
    args = ["run", "--data-dir", str(data_dir), "--journal", str(journal), "--min-age", "0",
            "--min-files", "2", "--check-interval", "0.02"]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", BYPASS, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FGM_CRASH_AT": ""},
    )


def test_two_instances_without_the_lock_never_merge_a_source_twice(
    data_dir: Path, tmp_path: Path
) -> None:
    """Two real services with their own journals and no lock, while files keep arriving in
    three partitions; then the oracle: every row exactly once, no source in two merges."""
    staging = tmp_path / "staging"
    pods = (PodSpec("pod-a"), PodSpec("pod-b"), PodSpec("pod-c"))
    generate(staging, small_spec(pods, rotations=36))
    expected = rows_pyarrow(staging)
    partitions = sorted(str(p.relative_to(staging)) for p in staging.glob("dt=*/identifier=*"))
    journals = [tmp_path / "a.db", tmp_path / "b.db"]
    procs = [bypassing_service(data_dir, journal) for journal in journals]
    try:
        poll(lambda: all(j.exists() for j in journals), "both services to start")
        rng = random.Random(7)
        for rotation in range(36):
            for partition in partitions:
                folder = data_dir / partition
                folder.mkdir(parents=True, exist_ok=True)
                name = sorted(p.name for p in (staging / partition).glob("metrics-*.parquet"))[0]
                for moved in (name.replace(".parquet", ".containers"), name):
                    (staging / partition / moved).rename(folder / moved)
            if rotation % 6 == 5:  # let both catch up now and then, at a random pace
                time.sleep(rng.uniform(0.0, 0.1))  # picks a moment; nothing waits on it
        poll(lambda: all(parquet_count(data_dir / p) == 1 for p in partitions), "one file each")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        logs = [proc.communicate(timeout=DEADLINE_S)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    for journal in journals:
        assert unfinished_in(journal) == []
    assert tmp_files(data_dir) == []
    assert rows_pyarrow(data_dir) == expected
    assert_no_source_in_two_outputs(data_dir)
    finished = Counter(
        (r.partition, s.name)
        for journal in journals
        for r in records_of(journal)
        if r.state is MergeState.SOURCES_DELETED
        for s in r.sources
    )
    assert finished and max(finished.values()) == 1


# -- the journal lost -------------------------------------------------------------------------


def crash_between_rename_and_deletes(data_dir: Path) -> Counter[Any]:
    make_data(data_dir, "small")
    before = rows_pyarrow(data_dir)
    assert run_once(data_dir, AFTER_FIVE_DELETES).returncode == -9
    folder = data_dir / POD_A
    assert (folder / OUTPUT).exists()
    assert len(list(folder.glob("metrics-*.parquet"))) == LEFT
    assert rows_pyarrow(data_dir) != before  # 19 sources' rows are there twice right now
    return before


def lose(data_dir: Path, what: str) -> None:
    """`journal`: every file of it; `wal`: its WAL, which held every commit since the last
    checkpoint (all of this run's), as a disk that lost it would leave it."""
    files = journal_files(default_journal_path(data_dir))
    for path in files if what == "journal" else files[1:]:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("what", ["journal", "wal"])
@pytest.mark.parametrize("command", ["recover", "run"])
def test_lineage_recovery_removes_what_the_output_provably_holds(
    data_dir: Path, what: str, command: str
) -> None:
    before = crash_between_rename_and_deletes(data_dir)
    lose(data_dir, what)
    if command == "recover":
        result = recover(data_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = json_lines(result.stdout)
        found = [line for line in lines if line["kind"] == "lineage"]
        assert lines[-1]["consistent"] is True
    else:
        result = run_once(data_dir)
        assert result.returncode == 0, result.stderr
        found = [fields(line) for line in result.stderr.splitlines() if "=lineage-recovery" in line]
    assert len(found) == LEFT
    assert all(line["action"] == "removed" and line["output"] == OUTPUT for line in found)
    assert sorted(os.listdir(data_dir / POD_A)) == [OUTPUT_COMPANION, OUTPUT]
    assert rows_pyarrow(data_dir) == before
    assert tmp_files(data_dir) == []
    again = run_once(data_dir)  # nothing left to do, nothing to merge
    assert again.returncode == 0 and "lineage-recovery" not in again.stderr
    assert rows_pyarrow(data_dir) == before


@pytest.mark.parametrize("kill_at", ["journal:adopted", "durable:unlinked#3"])
def test_a_removal_by_lineage_is_journaled_first_and_finished_after_a_kill(
    data_dir: Path, kill_at: str
) -> None:
    """DESIGN invariant 3: a source goes only once the journal says its output holds it. With
    the journal lost, the proven output is adopted as a merge at `renamed` before any file goes,
    so a kill after that commit (or among the deletes) leaves a merge the next start finishes
    like any other, and `history` shows what was removed and why."""
    before = crash_between_rename_and_deletes(data_dir)
    lose(data_dir, "journal")
    left = sorted(p.name for p in (data_dir / POD_A).glob("metrics-*.parquet"))

    assert run_once(data_dir, kill_at).returncode == -9
    [adopted] = journal_records(data_dir)
    assert adopted.adopted and adopted.state is MergeState.RENAMED
    assert [s.name for s in adopted.sources] == left
    assert adopted.output_checksum == recovery.checksum(data_dir / POD_A / OUTPUT)
    gone = {name for name in left if not (data_dir / POD_A / name).exists()}
    assert len(gone) == (0 if kill_at == "journal:adopted" else 1)  # companion, file, companion
    if gone:  # a companion never outlives its file
        second = data_dir / POD_A / left[1]
        assert second.exists() and not second.with_suffix(".containers").exists()

    result = run_once(data_dir)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(data_dir / POD_A)) == [OUTPUT_COMPANION, OUTPUT]
    assert rows_pyarrow(data_dir) == before
    [finished] = journal_records(data_dir)
    assert [(t.state, t.actor) for t in finished.transitions] == [
        (MergeState.RENAMED, "recovery"),
        (MergeState.SOURCES_DELETED, "recovery"),
    ]
    history = run_cli("history", "--data-dir", str(data_dir), "--json")
    [line] = json_lines(history.stdout)
    assert (line["output"], line["state"], line["adopted"]) == (OUTPUT, "sources-deleted", True)
    assert line["sources"] == LEFT


def test_a_kill_anywhere_in_a_lineage_settlement_is_finished_by_the_next_recovery(
    data_dir: Path, tmp_path: Path
) -> None:
    """Kill points enumerated, not listed: a dry `recover` of the lost-journal state lists every
    point the lineage settlement reaches (the proof's attempt, the fsyncs, the adoption, each
    unlink, `sources-deleted`), and a real `recover` is killed at the first and the last
    occurrence of each. The next `recover` must leave what the oracle accepts with the
    journal it has: every row once, every container still listed, and the output accounted
    for by the adopted merge."""
    make_data(data_dir, "small")
    expected, containers = expected_rows(data_dir), viewer_containers(data_dir)
    assert run_once(data_dir, AFTER_FIVE_DELETES).returncode == -9
    lose(data_dir, "journal")
    must_reach = {"recovery:attempt-begun", "journal:adopted", "journal:sources-deleted"}
    assert_every_kill_is_finished(data_dir, tmp_path, expected, containers, must_reach)


def assert_every_kill_is_finished(
    data_dir: Path,
    tmp_path: Path,
    expected: Counter[Any],
    containers: ContainerIds,
    must_reach: set[str],
    *,
    journal_lost: bool = False,
) -> None:
    """Kill a `recover` of `data_dir` (copies of it) at the first and the last occurrence of
    every point a dry `recover` reaches, among them `must_reach`; the next `recover` must
    leave what the oracle accepts, every container still listed (`journal_lost`: outputs no
    merge of this journal accounts for are allowed)."""
    count = tmp_path / "dry.count"
    dry = clone_tree(data_dir, tmp_path / "dry")
    env = {crashpoints.ENV_VAR: "", crashpoints.COUNT_ENV_VAR: str(count)}
    assert run_cli("recover", "--data-dir", str(dry), env=env).returncode == 0
    reached = crashpoints.occurrences(crashpoints.read_reached(count))
    points = {spec.split("#")[0] for spec in reached}
    assert must_reach <= points, sorted(points)
    kills = sorted(
        {next(s for s in reached if s.startswith(f"{p}#")) for p in points}
        | {next(s for s in reversed(reached) if s.startswith(f"{p}#")) for p in points}
    )
    for n, kill_at in enumerate(kills):
        clone = clone_tree(data_dir, tmp_path / f"kill-{n}")
        env = {crashpoints.ENV_VAR: kill_at, crashpoints.COUNT_ENV_VAR: ""}
        assert run_cli("recover", "--data-dir", str(clone), env=env).returncode == -9, kill_at
        result = recover(clone)
        assert result.returncode == 0, (kill_at, result.stdout + result.stderr)
        report = check(clone, expected, containers=containers, journal_lost=journal_lost)
        assert report.violations == [], kill_at


def test_a_publish_cut_between_its_renames_keeps_its_companion_when_the_journal_is_lost(
    data_dir: Path,
) -> None:
    """Killed after the output got its name and before its companion did, with the journal
    lost: the companion's temp was swept as an orphan, the output stayed without companion,
    and its sources' companions stayed behind alone, so the viewer lost their containers.
    Now the temp is published, and the sources and their companions go by lineage."""
    make_data(data_dir, "small")
    expected, containers = expected_rows(data_dir), viewer_containers(data_dir)
    assert run_once(data_dir, "durable:unlinked#1").returncode == -9
    folder = data_dir / POD_A
    assert (folder / OUTPUT).exists() and (folder / tmp_name(OUTPUT_COMPANION)).exists()
    lose(data_dir, "journal")

    result = recover(data_dir)

    assert result.returncode == 0, result.stdout + result.stderr
    published = [
        line["path"] for line in json_lines(result.stdout) if line["kind"] == "orphan-published"
    ]
    assert published == [str(folder / OUTPUT_COMPANION)]
    assert sorted(os.listdir(folder)) == [OUTPUT_COMPANION, OUTPUT]
    assert check(data_dir, expected, containers=containers).violations == []


def test_an_adopted_output_is_never_withdrawn_for_a_rival(data_dir: Path) -> None:
    """An adopted output may hold rows of files deleted before its journal was lost, which its
    record does not list; withdrawing it for a rival that lists one of its sources (as a merge
    of ours yields to a second instance's) would lose those rows. A person decides instead."""
    crash_between_rename_and_deletes(data_dir)
    lose(data_dir, "journal")
    assert run_once(data_dir, "journal:adopted").returncode == -9
    folder = data_dir / POD_A
    [adopted] = journal_records(data_dir)
    rival = folder / "consolidated-20251230T000000Z-20251230T000001Z.parquet"
    table = pq.read_table(folder / adopted.sources[0].name)
    doc = lineage.encode(7, [lineage.LineageSource(adopted.sources[0].name, table.num_rows)])
    pq.write_table(table.replace_schema_metadata(doc), rival)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        state, error = merge.finish(journal, folder, adopted, actor="recovery")
    finally:
        journal.close()

    assert state is MergeState.NEEDS_ATTENTION
    assert f"{OUTPUT} was adopted from its lineage; nothing deleted" in (error or "")
    assert (folder / OUTPUT).exists()
    assert all((folder / s.name).exists() for s in adopted.sources)


def fewer_rows(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows // 2), path)


def one_value_changed(path: Path) -> None:
    table = pq.read_table(path)
    column = table.column("fetch_index").to_pylist()
    column[0] += 1
    index = table.schema.get_field_index("fetch_index")
    table = table.set_column(index, table.schema.field(index), pa.array(column, pa.uint64()))
    pq.write_table(table, path)


def corrupt_page(path: Path) -> None:
    group = pq.read_metadata(path).row_group(0)
    chunk = group.column(group.num_columns // 2)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
    path.write_bytes(bytes(data))


def lineage_damaged(data_dir: Path, damage: str) -> set[str]:
    """An output and the sources left beside it, with the journal lost and one of them
    damaged; the names `recover` keeps for a person."""
    crash_between_rename_and_deletes(data_dir)
    lose(data_dir, "journal")
    folder = data_dir / POD_A
    victim = sorted(folder.glob("metrics-*.parquet"))[3]
    if damage == "fewer-rows":
        fewer_rows(victim)
    elif damage == "one-value":
        one_value_changed(victim)
    else:
        corrupt_page(folder / OUTPUT)
    return {victim.name} if damage != "output-unreadable" else {
        p.name for p in folder.glob("metrics-*.parquet")}  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        # Rewritten, the file has another footer than the lineage records: new, or the merged
        # file changed? Its rows tell: the output holds them, so a person decides.
        ("fewer-rows", "under another footer and holds 45 of its 45 rows"),
        ("one-value", "under another footer and holds 89 of its 90 rows"),
        ("output-unreadable", "output does not read back"),
    ],
)
def test_lineage_that_does_not_prove_it_keeps_the_files_and_says_so(
    data_dir: Path, damage: str, reason: str
) -> None:
    kept = lineage_damaged(data_dir, damage)
    folder = data_dir / POD_A
    held = {name: snapshot_file(folder / name) for name in [*kept, OUTPUT]}

    for _ in range(2):  # the same answer every time; nothing else is touched
        result = recover(data_dir)
        assert result.returncode == EXIT_NEEDS_PERSON, result.stdout + result.stderr
        lines = [line for line in json_lines(result.stdout) if line["kind"] == "lineage"]
        assert {line["file"] for line in lines if line["action"] != "removed"} == kept
        assert all(reason in line["reason"] for line in lines if line["file"] in kept)
        assert json_lines(result.stdout)[-1]["needs_person"] == len(kept)
        assert {name: snapshot_file(folder / name) for name in held} == held

    # the service leaves them out of every merge: no output ever takes a held file again
    result = run_once(data_dir)
    assert result.returncode == EXIT_NEEDS_PERSON, result.stderr
    assert {name: snapshot_file(folder / name) for name in held} == held
    assert sorted(p.name for p in data_files(data_dir)) == sorted(held)
    assert tmp_files(data_dir) == []


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("fewer-rows", "its rows were not compared"),  # another footer: only rows tell
        ("one-value", "its rows were not compared"),
        ("output-unreadable", "its rows were not compared"),
    ],
)
def test_status_names_an_output_that_recover_leaves_for_a_person(
    data_dir: Path, damage: str, reason: str
) -> None:
    """`recover` exited 3 for these while `status` said healthy and did not mention them."""
    kept = lineage_damaged(data_dir, damage)
    assert recover(data_dir).returncode == EXIT_NEEDS_PERSON
    assert run_once(data_dir).returncode == EXIT_NEEDS_PERSON  # a journal, a successful pass
    folder = data_dir / POD_A
    before = {name: snapshot_file(folder / name) for name in os.listdir(folder)}

    proc = run_cli("status", "--data-dir", str(data_dir), "--json")

    assert proc.returncode == EXIT_NEEDS_PERSON, proc.stdout + proc.stderr
    lines = json_lines(proc.stdout)
    found = [line for line in lines if line["kind"] == "lineage"]
    assert {(line["output"], line["file"]) for line in found} == {(OUTPUT, name) for name in kept}
    assert all(reason in line["reason"] for line in found), found
    [problem] = [line["problem"] for line in lines if line["kind"] == "problem"]
    assert problem.startswith(f"{folder / OUTPUT}: lineage check: ") and reason in problem
    assert lines[-1]["healthy"] is False
    live = run_cli("status", "--data-dir", str(data_dir), "--liveness")
    assert live.returncode == 0, live.stdout  # a restart would not help
    assert {name: snapshot_file(folder / name) for name in os.listdir(folder)} == before


def test_status_leaves_the_sources_of_a_merge_in_progress_to_the_journal(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a merge's rename and its deletes, its sources sit beside an output that lists
    them. That is no lineage finding but an unfinished merge of the journal, also when the
    merge was planned while `status` was looking at the disk."""
    crash_between_rename_and_deletes(data_dir)
    path = default_journal_path(data_dir)
    seen = compute_status(data_dir, path)
    assert seen.lineage == () and [r.output for r in seen.unfinished] == [OUTPUT]

    lose(data_dir, "journal")
    service = Journal.open(path)  # a running service's journal, with its WAL
    try:
        control = compute_status(data_dir, path)
        assert {(a.output, a.removed) for a in control.lineage} == {(OUTPUT, False)}
        look = status_module._lineage_check

        def planned_meanwhile(*args: Any) -> list[Any]:
            service.record_planned(
                partition=POD_A, output=OUTPUT, era="flat", policy={}, sources=[],
                has_companion=False,
            )  # fmt: skip
            return look(*args)

        monkeypatch.setattr(status_module, "_lineage_check", planned_meanwhile)
        assert compute_status(data_dir, path).lineage == ()
    finally:
        service.close()


def contents(data_dir: Path) -> dict[str, str]:
    return {name: digest for name, (_inode, _size, digest) in snapshot(data_dir).items()}


def snapshot_file(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def test_an_empty_journal_file_is_a_lost_journal(data_dir: Path) -> None:
    """A journal cut to zero bytes opens as a new one: the lineage still prevents doubles."""
    before = crash_between_rename_and_deletes(data_dir)
    path = default_journal_path(data_dir)
    for extra in journal_files(path)[1:]:
        extra.unlink(missing_ok=True)
    path.write_bytes(b"")
    result = run_once(data_dir)
    assert result.returncode == 0, result.stderr
    assert rows_pyarrow(data_dir) == before
    assert [p.name for p in data_files(data_dir)] == [OUTPUT]


# -- the journal truncated --------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["half", "header"])
@pytest.mark.parametrize("command", [["run"], ["recover"]])
def test_a_truncated_journal_stops_with_a_repair_hint_and_deletes_nothing(
    data_dir: Path, keep: str, command: list[str]
) -> None:
    """(Garbage and damaged pages are in test_cli; here the file is cut short.)"""
    make_data(data_dir, "small")
    assert run_once(data_dir).returncode == 0  # a real journal with one merge in it
    generate(data_dir, small_spec((PodSpec("pod-b"),)))
    path = default_journal_path(data_dir)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if keep == "half" else data[:50])
    files, journal_bytes = snapshot(data_dir), path.read_bytes()

    result = run_cli(*command, "--data-dir", str(data_dir), env={"FGM_CRASH_AT": ""})
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(f"Error: {path}: cannot open journal (")
    assert "move the journal aside" in result.stderr
    assert "`fgm-consolidator recover`" in result.stderr
    assert snapshot(data_dir) == files
    assert path.read_bytes() == journal_bytes


# -- a source touched or replaced while its merge is written ----------------------------------


@pytest.mark.parametrize("modify", ["touch", "replace"])
def test_a_source_changed_while_the_merge_is_written_is_kept_and_nothing_is_published(
    data_dir: Path, service: Callable[..., Service], modify: str
) -> None:
    """The first source gets a new mtime, or is replaced by a copy (new inode), once the
    writer has opened it. Regression: such a change was found only after the output was
    published; the merge then needed a person, with the rows shown twice meanwhile."""
    make_data(data_dir, "medium")  # ~3 MB of rows: several 1 MB row groups
    before, files = rows_pyarrow(data_dir), contents(data_dir)
    folder = data_dir / POD_A
    first = sorted(folder.glob("metrics-*.parquet"))[0]
    running_ = service(*SLOW, "--grace-period", "0")
    tmp = folder / (OUTPUT + ".tmp")
    # a row group is on disk (past the 4-byte magic): the writer has opened and proved the
    # first source already; the process is held still while the file changes under it
    poll(lambda: tmp.exists() and tmp.stat().st_size > 4, "the first row group")
    running_.proc.send_signal(signal.SIGSTOP)
    if modify == "touch":
        st = first.stat()
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    else:
        copy = first.with_name(first.name + ".copy")
        shutil.copy2(first, copy)
        os.replace(copy, first)
    changed = snapshot_file(first)
    running_.proc.send_signal(signal.SIGCONT)
    failed = running_.wait_for("merge-failed", lambda f: f["partition"] == POD_A)
    assert failed["state"] == "rolled-back"
    # caught when the writer opens the file again (it reads each source twice) or, at the
    # latest, by the re-stat before publishing
    assert re.search(
        "changed (since it was planned|before the output was published)", failed["error"]
    )
    assert first.name in failed["error"]
    code, _took = running_.terminate(timeout=DEADLINE_S)
    assert code == 0
    assert snapshot_file(first) == changed
    assert not (folder / OUTPUT).exists() and tmp_files(data_dir) == []
    assert contents(data_dir) == files  # every source byte for byte, nothing else

    assert run_once(data_dir).returncode == 0  # the file as it is now joins the next merge
    assert rows_pyarrow(data_dir) == before
    assert (folder / OUTPUT).exists() and not first.exists()


# -- the clock jumps --------------------------------------------------------------------------

FAKETIME_LIBS = [
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/faketime/libfaketime.so.1"),
]


def faketime_env(offset_file: Path) -> dict[str, str]:
    """libfaketime re-reading its offset at every call: the wall clock jumps while the process
    runs. CLOCK_MONOTONIC is left alone, as a real clock step leaves it."""
    lib = next((p for p in FAKETIME_LIBS if p.exists()), None)
    if lib is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime); .ci/run does it")
    return {
        "LD_PRELOAD": str(lib),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def live_spec(start: datetime, rotations: int, pods: tuple[PodSpec, ...]) -> SimulationSpec:
    return SimulationSpec(
        pods=pods, start=start, rotations=rotations, metrics=3, containers=2,
        seconds_per_row_sample=30, seed=5,
    )  # fmt: skip


def skew_of(event: dict[str, str]) -> float:
    """How far the service's clock is from ours, from the stamp of one of its log lines."""
    return datetime.fromisoformat(event["ts"]).timestamp() - time.time()


def test_the_clock_jumping_days_back_and_forth_loses_and_doubles_nothing(
    data_dir: Path, tmp_path: Path, service: Callable[..., Service]
) -> None:
    offset = tmp_path / "offset"
    offset.write_text("+0\n")
    env = faketime_env(offset)
    now = datetime.now(UTC).replace(microsecond=0)
    pods = (PodSpec("pod-a"), PodSpec("pod-b"))
    generate(data_dir, live_spec(now - timedelta(hours=2), 40, pods))  # files of 2 h ago
    staging = tmp_path / "staging"
    generate(staging, live_spec(now - timedelta(minutes=9), 5, pods))  # the last minutes
    expected = rows_pyarrow(data_dir) + rows_pyarrow(staging)
    day = 86_400.0

    running_ = service("--check-interval", "0.1", "--min-files", "2", env=env)  # min-age 300 s
    assert running_.wait_for("pass-finished")["merges"] != "0"
    # three days back: every file is from the future, so young; nothing is merged or lost
    offset.write_text("-3d\n")
    for partition in sorted(str(p.relative_to(staging)) for p in staging.glob("dt=*/*")):
        (data_dir / partition).mkdir(parents=True, exist_ok=True)
        for path in sorted((staging / partition).iterdir()):
            path.rename(data_dir / partition / path.name)
    back = running_.wait_for("pass-finished", lambda e: skew_of(e) < -2.9 * day, n=3)
    assert back["merges"] == "0"
    # three days ahead: everything is old and the day is over; the tails are merged
    offset.write_text("+3d\n")
    ahead = running_.wait_for(
        "pass-finished", lambda e: skew_of(e) > 2.9 * day and e["merges"] != "0"
    )
    assert ahead["failed"] == "0"
    offset.write_text("+0\n")
    running_.wait_for("pass-finished", lambda e: abs(skew_of(e)) < 600, n=2)
    code, _took = running_.terminate(timeout=DEADLINE_S)
    assert code == 0, "\n".join(running_.lines)

    assert rows_pyarrow(data_dir) == expected
    assert tmp_files(data_dir) == [] and unfinished_in(default_journal_path(data_dir)) == []
    assert_no_source_in_two_outputs(data_dir)
    assert "merge-failed" not in {e.get("event") for e in running_.events}


# -- SIGTERM at random moments ----------------------------------------------------------------

SEED = 20261127


def test_sigterm_at_random_moments_exits_0_at_a_step_boundary(
    data_dir: Path, tmp_path: Path, service: Callable[..., Service]
) -> None:
    rng = random.Random(SEED)
    print(f"seed={SEED}")
    staging = tmp_path / "staging"
    pods = (PodSpec("pod-a"), PodSpec("pod-b"), PodSpec("pod-c"))
    generate(staging, SimulationSpec(pods=pods, start=datetime(2025, 12, 30, 8, tzinfo=UTC),
                                     rotations=48, metrics=5, containers=3,
                                     seconds_per_row_sample=5, seed=11))  # fmt: skip
    names = sorted(p.relative_to(staging) for p in staging.rglob("metrics-*.parquet"))
    stamps = sorted({name.name for name in names})
    expected: Counter[Any] = Counter()
    outcomes: Counter[str] = Counter()
    for iteration in range(4):
        # ten more rotations of every pod arrive before each start
        batch = set(stamps[12 * iteration : 12 * iteration + 12])
        for name in (n for n in names if n.name in batch):
            for moved in (name, name.with_suffix(".containers")):
                (data_dir / moved).parent.mkdir(parents=True, exist_ok=True)
                (staging / moved).rename(data_dir / moved)
        expected = rows_pyarrow(data_dir)
        grace = rng.choice([0.0, 0.5, 3.0])
        running_ = service("--check-interval", "0.05", "--min-files", "2", "--compression-level",
                           "9", "--row-group-size", "1", "--grace-period", str(grace))  # fmt: skip
        running_.wait_for("started")  # before this, SIGTERM finds no handler: nothing began
        time.sleep(rng.uniform(0.0, 1.0))  # picks the moment of the signal; nothing waits on it
        code, took = running_.terminate(timeout=grace + DEADLINE_S)
        context = f"iteration {iteration} (seed {SEED}):\n" + "\n".join(running_.lines)
        assert code == 0, context
        assert took < grace + 10.0, context
        events = [e["event"] for e in running_.events]
        assert events[-1] == "stopped", context
        outcomes.update(e for e in events if e in ("merge-finished", "merge-failed"))
        # a step boundary: nothing half done is left behind, every row is there once
        assert unfinished_in(default_journal_path(data_dir)) == [], context
        assert tmp_files(data_dir) == [], context
        assert rows_pyarrow(data_dir) == expected, context
    print(f"merges finished={outcomes['merge-finished']} rolled back={outcomes['merge-failed']}")
    assert outcomes["merge-finished"] > 0

    result = run_once(data_dir)
    assert result.returncode == 0, result.stderr
    assert rows_pyarrow(data_dir) == expected
    assert_no_source_in_two_outputs(data_dir)
    assert unfinished_in(default_journal_path(data_dir)) == []


@pytest.mark.parametrize("case", LOCK_PATHS)
def test_a_lock_path_that_is_not_a_regular_file_is_refused_with_its_path(
    tmp_path: Path, case: str
) -> None:
    """flock on a FIFO failed with a bare `[Errno 22] Invalid argument`, naming nothing, and
    a folder gave `Is a directory`, where `status` says what to do about it. A link was
    followed, and the lock created wherever it pointed."""
    data_dir = tmp_path / "data"
    path = lock_path(data_dir)
    path.parent.mkdir(parents=True)
    make, kind = LOCK_PATHS[case]
    make(path)
    with pytest.raises(LockError) as caught, lock.exclusive(data_dir):
        pass
    assert caught.value.path == str(path)
    assert caught.value.reason == f"the lock file is {kind}, not a regular file; remove it"
    assert not (path.parent / "nowhere").exists()


# A name in OUTPUT's window whose range, joined with OUTPUT's, names neither file: a planner
# that took both as mergeable would merge them into one.
COPY = "consolidated-20251230T083500Z-20251230T084000Z.parquet"


def test_two_outputs_listing_the_same_sources_are_kept_apart_for_a_person(
    data_dir: Path,
) -> None:
    """A copy of an output left in the folder (a restore, a second instance's output of the
    same sources): the sources are gone, but every row is there twice. Recovery must say so
    and change nothing, and no pass may merge the two into one file, which would make the
    duplicate permanent and erase the lineage that shows it."""
    make_data(data_dir, "small")
    assert run_once(data_dir).returncode == 0
    folder = data_dir / POD_A
    shutil.copy2(folder / OUTPUT, folder / COPY)
    held = {name: snapshot_file(folder / name) for name in os.listdir(folder)}

    result = recover(data_dir)
    assert result.returncode == EXIT_NEEDS_PERSON, result.stdout + result.stderr
    lines = [line for line in json_lines(result.stdout) if line["kind"] == "lineage"]
    assert {(line["output"], line["file"]) for line in lines} == {(OUTPUT, COPY), (COPY, OUTPUT)}
    assert all("list the same sources" in line["reason"] for line in lines)
    assert all(line["action"] != "removed" for line in lines)

    assert run_once(data_dir).returncode == EXIT_NEEDS_PERSON
    assert {name: snapshot_file(folder / name) for name in os.listdir(folder)} == held


def test_lineage_recovery_keeps_a_file_whose_companion_names_a_container_its_output_lacks(
    data_dir: Path,
) -> None:
    """A file the output provably holds goes only with its companion, and that only when the
    output's companion lists every container of it. Deleting the file and keeping its
    companion (as before) left the companion beside no parquet file, which the viewer never
    reads: the container was gone all the same. Now the file stays, with its companion, for a
    person; the other files go."""
    crash_between_rename_and_deletes(data_dir)
    lose(data_dir, "journal")
    folder = data_dir / POD_A
    victim = add_late_container(folder)
    kept = victim.read_bytes()

    result = recover(data_dir)
    assert result.returncode == EXIT_NEEDS_PERSON, result.stdout + result.stderr
    lines = [line for line in json_lines(result.stdout) if line["kind"] == "lineage"]
    [line] = [line for line in lines if line["file"] == victim.with_suffix(".parquet").name]
    assert line["action"] == "kept, needs a person"
    assert f"lists 1 containers {OUTPUT_COMPANION} lacks" in line["reason"]
    assert victim.read_bytes() == kept
    assert victim.with_suffix(".parquet").exists()
    assert sorted(p.name for p in folder.glob("metrics-*")) == [
        victim.name,
        victim.with_suffix(".parquet").name,
    ]


def test_a_source_gone_that_no_rival_holds_stops_the_withdrawal(
    data_dir: Path, tmp_path: Path, staged: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B (rotations 0-9) publishes while A (rotations 1-11) has finished, and rotation 0 was
    deleted by someone else meanwhile: A holds nine of B's sources, but rotation 0's rows are
    in B's output alone. Withdrawing it would lose them; a person decides instead."""
    arrive(staged, data_dir, range(10))
    journal_a, journal_b = two_journals(tmp_path)
    [plan_b] = plan_one(data_dir, POD, POLICY, journal_b, time.time())[1]
    first = sorted((data_dir / POD).glob("metrics-*.parquet"))[0]
    aside = tmp_path / first.name
    first.rename(aside)  # out of A's sight while it plans; a rename keeps B's identity of it
    arrive(staged, data_dir, range(10, 12))
    [plan_a] = plan_one(data_dir, POD, POLICY, journal_a, time.time())[1]
    aside.rename(first)
    only_in_b = Counter(canonical_row(row) for row in pq.read_table(first).to_pylist())
    real_publish = merge.publish

    def publish(folder: Path, output: str, **kwargs: Any) -> None:
        if output == plan_b.output:
            assert execute(journal_a, data_dir, plan_a, POLICY).state is (
                MergeState.SOURCES_DELETED
            )
            first.unlink()
            first.with_suffix(".containers").unlink()
        real_publish(folder, output, **kwargs)

    monkeypatch.setattr(merge, "publish", publish)
    outcome_b = execute(journal_b, data_dir, plan_b, POLICY)
    journal_a.close()
    journal_b.close()

    assert first.name not in {s.name for s in plan_a.sources}
    assert outcome_b.state is MergeState.NEEDS_ATTENTION
    assert f"{first.name} is changed or gone without a rival holding it" in (outcome_b.error or "")
    assert (data_dir / POD / plan_b.output).exists()
    assert only_in_b - rows_pyarrow(data_dir) == Counter()


def test_lineage_recovery_keeps_a_file_rewritten_while_it_was_compared(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof reads a file's rows, then the file goes: one rewritten in between (twice
    the rows now) is no longer the file proven held, and is kept."""
    crash_between_rename_and_deletes(data_dir)
    lose(data_dir, "journal")
    folder = data_dir / POD_A
    victim = sorted(folder.glob("metrics-*.parquet"))[3]
    grown = pa.concat_tables([pq.read_table(victim)] * 2)
    real_unproven = lineage.unproven

    def unproven(*args: Any, **kwargs: Any) -> dict[str, str]:
        found = real_unproven(*args, **kwargs)
        pq.write_table(grown, victim)
        return found

    monkeypatch.setattr(lineage, "unproven", unproven)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        actions = recovery.recover_from_lineage(journal, data_dir, set())
    finally:
        journal.close()

    [kept] = [a for a in actions if not a.removed]
    assert (kept.file, kept.reason) == (victim.name, f"{victim.name} changed while it was compared")
    assert pq.read_table(victim).equals(grown)
    assert sorted(p.name for p in folder.glob("metrics-*.parquet")) == [victim.name]


def test_a_stop_during_a_lineage_proof_ends_it_and_the_next_start_proves_again(
    data_dir: Path,
) -> None:
    """A proof reads the output and every file beside it, about a minute of CPU for a busy
    node's output of 480 files, and never asked the stop flag: a SIGTERM at start-up waited
    for it, past the 30 s Kubernetes gives before its SIGKILL. Now the proof is given up, is
    not counted as one that died, and nothing is deleted unproven. Found by an operability
    review."""
    crash_between_rename_and_deletes(data_dir)
    lose(data_dir, "journal")
    folder = data_dir / POD_A
    before = sorted(p.name for p in folder.iterdir())
    stop_once_rows_are_read = StopOnceRowsAreRead()

    journal = Journal.open(default_journal_path(data_dir))
    try:
        guard = recovery.ProofGuard(journal, 300)
        stopped = recovery.recover_from_lineage(
            journal, data_dir, set(), stop_once_rows_are_read, guard
        )
        assert stop_once_rows_are_read.asked == 2
        assert stopped == []
        assert sorted(p.name for p in folder.iterdir()) == before
        subject = recovery.proof_subject(POD_A, OUTPUT)
        assert journal.attempt_deaths(subject).count == 0
        settled = recovery.recover_from_lineage(journal, data_dir, set(), guard=guard)
    finally:
        journal.close()
    assert len(settled) == LEFT and all(action.removed for action in settled)
    assert list(folder.glob("metrics-*.parquet")) == []
