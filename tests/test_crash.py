"""Crash tests: a real `fgm-consolidator` process SIGKILLs itself at a named point (crashpoints),
the disk is checked against DESIGN.md's table of journal states, then `recover` must bring every
merge to a terminal state with every row kept once, idempotently, and a later `run` finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    PAST,
    StopOnceRowsAreRead,
    add_late_container,
    rows_pyarrow,
    run_cli,
    small_spec,
    tmp_files,
)
from oracle import check, expected_rows, viewer_containers
from test_name_reuse import pass_now

from fgm_consolidator import companions, durable, footers, lineage, merge, recovery
from fgm_consolidator.journal import Journal, MergeRecord
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate
from fgm_consolidator.states import MergeState

POD_A = "dt=2025-12-30/identifier=pod-a"
POD_B = "dt=2025-12-30/identifier=pod-b"
OUTPUT = "consolidated-20251230T080000Z-20251230T083430Z.parquet"
OUTPUT_COMPANION = "consolidated-20251230T080000Z-20251230T083430Z.containers"
SOURCES = 24  # rotations of small_spec: one merge of 24 sources per partition
# One merge of a partition unlinks 2 temp names (publish) then 24 sources and 24 companions.
UNLINKS_PER_MERGE = 2 + 2 * SOURCES
EXIT_NEEDS_PERSON = 3
INTERRUPTED = "interrupted"


# -- helpers ----------------------------------------------------------------------------------


def run_once(data_dir: Path, crash_at: str | None = None) -> Any:
    env = {"FGM_CRASH_AT": crash_at} if crash_at else {"FGM_CRASH_AT": ""}
    return run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0",
        "--row-group-size", "1", env=env,
    )  # fmt: skip


def recover(data_dir: Path, crash_at: str | None = None) -> Any:
    env = {"FGM_CRASH_AT": crash_at or ""}
    return run_cli("recover", "--data-dir", str(data_dir), "--json", env=env)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def history(data_dir: Path) -> list[dict[str, Any]]:
    result = run_cli("history", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr
    return json_lines(result.stdout)


def journal_records(data_dir: Path) -> list[MergeRecord]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return sorted(journal.history(), key=lambda r: r.id)
    finally:
        journal.close()


def unfinished(data_dir: Path) -> list[MergeRecord]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return journal.unfinished()
    finally:
        journal.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(data_dir: Path) -> dict[str, tuple[int, int, str]]:
    """Every file outside our state folder: inode, size and content."""
    found = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and ".fgm-consolidator" not in path.parts:
            st = path.stat()
            found[str(path.relative_to(data_dir))] = (st.st_ino, st.st_size, sha256(path))
    return found


def names_in(folder: Path) -> set[str]:
    return set(os.listdir(folder))


def count(folder: Path, prefix: str, suffix: str) -> int:
    return sum(1 for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix))


def medium_spec(pods: tuple[PodSpec, ...] = (PodSpec("pod-a"),)) -> SimulationSpec:
    """Ten times the rows of small_spec: ~6 MB of Arrow data, so several 1 MB row groups."""
    return SimulationSpec(
        pods=pods,
        start=PAST,
        rotations=SOURCES,
        metrics=5,
        containers=2,
        seconds_per_row_sample=1,
        seed=1,
    )


def make_data(data_dir: Path, kind: str) -> None:
    """Data and an existing journal: the crash points below count from the first merge on."""
    Journal.open(default_journal_path(data_dir)).close()
    if kind == "small":
        generate(data_dir, small_spec())
    elif kind == TWO:
        generate(data_dir, small_spec((PodSpec("pod-a"), PodSpec("pod-b"))))
    elif kind == "medium":
        generate(data_dir, medium_spec())
    else:  # pragma: no cover - a typo in a case
        raise AssertionError(kind)


def assert_fully_consolidated(data_dir: Path, partitions: list[str]) -> None:
    for partition in partitions:
        assert names_in(data_dir / partition) == {OUTPUT, OUTPUT_COMPANION}, partition


def resumed_and_settled(data_dir: Path, expected: Counter[Any]) -> Any:
    """`recover` resumes the one merge, every row is there once, and only the output and its
    companion are left. Its result."""
    result = recover(data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [a["action"] for a in json_lines(result.stdout) if a["kind"] == "recovery"] == [
        "resumed"
    ]
    assert check(data_dir, expected).violations == []
    assert_fully_consolidated(data_dir, [POD_A])
    return result


def assert_settled(data_dir: Path, before: Counter[Any]) -> None:
    assert tmp_files(data_dir) == []
    assert unfinished(data_dir) == []
    assert rows_pyarrow(data_dir) == before


# -- one crash per point ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Where the process dies and what DESIGN.md's table says the disk holds at that moment."""

    point: str
    state: MergeState  # the interrupted merge's latest journal state
    sources: int  # its metrics-*.parquet still present
    companions: int  # its metrics-*.containers still present
    output: bool  # final consolidated parquet present
    output_tmp: str  # "none", "partial" or "complete"
    companion_out: bool = False
    companion_tmp: bool = False
    data: str = "small"

    @property
    def partitions(self) -> list[str]:
        return [POD_A, POD_B] if self.data == TWO else [POD_A]

    @property
    def merge_id(self) -> int:
        return len(self.partitions)


PLANNED, WRITING, WRITTEN = MergeState.PLANNED, MergeState.WRITING, MergeState.WRITTEN
RENAMED, DELETED = MergeState.RENAMED, MergeState.SOURCES_DELETED
N, TWO = SOURCES, "two-pods"

# fmt: off
CASES = [
    Case("journal:planned", PLANNED, N, N, False, "none"),
    Case("journal:writing", WRITING, N, N, False, "none"),
    Case("writer:row-group", WRITING, N, N, False, "partial"),
    Case("writer:row-group#2", WRITING, N, N, False, "partial", data="medium"),
    Case("writer:row-group#5", WRITING, N, N, False, "partial", data="medium"),
    Case("durable:fsync-file#1", WRITING, N, N, False, "complete"),
    Case("durable:fsync-file#2", WRITING, N, N, False, "complete", companion_tmp=True),
    Case("durable:fsync-dir#1", WRITING, N, N, False, "complete", companion_tmp=True),
    Case("journal:written", WRITTEN, N, N, False, "complete", companion_tmp=True),
    # link done, unlink of the temp name not yet: one inode under both names
    Case("durable:linked#1", WRITTEN, N, N, True, "complete", companion_tmp=True),
    Case("durable:unlinked#1", WRITTEN, N, N, True, "none", companion_tmp=True),
    Case("durable:linked#2", WRITTEN, N, N, True, "none", True, companion_tmp=True),
    Case("durable:unlinked#2", WRITTEN, N, N, True, "none", True),
    Case("durable:fsync-dir#2", WRITTEN, N, N, True, "none", True),
    Case("journal:renamed", RENAMED, N, N, True, "none", True),
    # sources are unlinked one by one, each companion then its parquet (a companion never
    # outlives its file: nothing would name it once the journal is lost)
    Case("durable:unlinked#3", RENAMED, N, N - 1, True, "none", True),
    Case("durable:unlinked#4", RENAMED, N - 1, N - 1, True, "none", True),
    Case("durable:unlinked#25", RENAMED, N - 11, N - 12, True, "none", True),
    Case("durable:unlinked#50", RENAMED, 0, 0, True, "none", True),
    Case("durable:fsync-dir#3", RENAMED, 0, 0, True, "none", True),
    Case("journal:sources-deleted", DELETED, 0, 0, True, "none", True),
    # the second partition's merge, the first one already finished
    Case("journal:planned#2", PLANNED, N, N, False, "none", data=TWO),
    Case("journal:written#2", WRITTEN, N, N, False, "complete", companion_tmp=True, data=TWO),
    Case(f"durable:unlinked#{UNLINKS_PER_MERGE + 11}", RENAMED, N - 4, N - 5, True, "none", True,
         data=TWO),
]
# fmt: on


def check_disk(data_dir: Path, case: Case) -> None:
    folder = data_dir / case.partitions[-1]
    record = journal_records(data_dir)[-1]
    assert record.id == case.merge_id
    assert record.state is case.state
    assert [t.actor for t in record.transitions] == ["merge"] * len(record.transitions)
    assert count(folder, "metrics-", ".parquet") == case.sources
    assert count(folder, "metrics-", ".containers") == case.companions
    assert (folder / OUTPUT).exists() is case.output
    assert (folder / OUTPUT_COMPANION).exists() is case.companion_out
    assert (folder / (OUTPUT_COMPANION + ".tmp")).exists() is case.companion_tmp
    tmp = folder / (OUTPUT + ".tmp")
    assert tmp.exists() is (case.output_tmp != "none")
    if case.output_tmp == "partial":
        with pytest.raises(Exception, match=r"(?i)parquet|footer|size"):
            pq.read_metadata(tmp)
    if case.output_tmp == "complete":
        assert pq.read_metadata(tmp).num_rows == record.rows_in
    if case.state in (WRITTEN, RENAMED, DELETED):
        assert record.output_checksum is not None
        proof = folder / OUTPUT if case.output else tmp
        assert sha256(proof) == record.output_checksum
    if case.output and case.output_tmp == "complete":
        assert os.path.samefile(tmp, folder / OUTPUT)
    for earlier in case.partitions[:-1]:
        assert names_in(data_dir / earlier) == {OUTPUT, OUTPUT_COMPANION}


def check_recovered(data_dir: Path, case: Case, report: list[dict[str, Any]]) -> None:
    """What recovery did to the interrupted merge, as the journal and `history` tell it."""
    record = journal_records(data_dir)[-1]
    merges = {m["id"]: m for m in history(data_dir) if m["kind"] == "merge"}
    shown = merges[case.merge_id]
    actions = [line for line in report if line["kind"] == "recovery"]
    summary = report[-1]
    assert summary["kind"] == "summary"
    assert summary["needs_person"] == 0
    assert summary["consistent"] is True
    actors = [t.actor for t in record.transitions]
    if case.state in (PLANNED, WRITING):
        assert shown["state"] == "rolled-back"
        assert INTERRUPTED in shown["error"]
        assert str(case.state) in shown["error"]
        assert actors[-1] == "recovery"
        assert [a["action"] for a in actions] == ["rolled back"]
        assert actions[0]["merge_id"] == case.merge_id
        assert actions[0]["found"] == str(case.state)
    elif case.state in (WRITTEN, RENAMED):
        assert shown["state"] == "sources-deleted"
        assert shown["error"] is None
        resumed = [t.state for t in record.transitions if t.actor == "recovery"]
        expected = [RENAMED, DELETED] if case.state is WRITTEN else [DELETED]
        assert resumed == expected
        assert [a["action"] for a in actions] == ["resumed"]
        assert actions[0]["result"] == "sources-deleted"
    else:
        assert shown["state"] == "sources-deleted"
        assert actions == []
        assert "recovery" not in actors
    for other in case.partitions[:-1]:
        assert next(m for m in merges.values() if m["partition"] == other)["state"] == (
            "sources-deleted"
        )


@pytest.mark.parametrize("case", CASES, ids=[c.point for c in CASES])
def test_kill_at_every_point_then_recover(data_dir: Path, case: Case) -> None:
    make_data(data_dir, case.data)
    before = rows_pyarrow(data_dir)
    expected = expected_rows(data_dir)

    crashed = run_once(data_dir, case.point)
    assert crashed.returncode == -9, crashed.stderr
    check_disk(data_dir, case)

    recovered = recover(data_dir)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert_settled(data_dir, before)
    check_recovered(data_dir, case, json_lines(recovered.stdout))
    if case.state in (WRITTEN, RENAMED, DELETED):
        assert_fully_consolidated(data_dir, case.partitions)
    else:
        folder = data_dir / case.partitions[-1]
        assert count(folder, "metrics-", ".parquet") == SOURCES
        assert count(folder, "metrics-", ".containers") == SOURCES
        assert count(folder, "consolidated-", "") == 0

    # a second recovery finds nothing to do and changes nothing
    files, transitions = snapshot(data_dir), journal_records(data_dir)
    again = recover(data_dir)
    assert again.returncode == 0, again.stderr
    assert json_lines(again.stdout) == [
        {
            "kind": "summary",
            "merges": 0,
            "needs_person": 0,
            "orphans_removed": 0,
            "consistent": True,
            "stopped": False,
        }
    ]
    assert snapshot(data_dir) == files
    assert journal_records(data_dir) == transitions
    assert check(data_dir, expected).violations == []

    final = run_once(data_dir)
    assert final.returncode == 0, final.stderr
    assert_settled(data_dir, before)
    assert_fully_consolidated(data_dir, case.partitions)
    records = journal_records(data_dir)
    assert records[-1].state is DELETED
    assert len(records) == case.merge_id + (case.state in (PLANNED, WRITING))
    assert check(data_dir, expected).violations == []


def test_row_group_size_of_1_mb_gives_several_row_groups(data_dir: Path) -> None:
    """The precondition of the writer:row-group#k cases above: small_spec fits one group."""
    generate(data_dir, medium_spec())
    assert run_once(data_dir).returncode == 0
    assert pq.ParquetFile(data_dir / POD_A / OUTPUT).metadata.num_row_groups >= 5


def test_kill_at_the_first_sync_of_a_fresh_data_dir(data_dir: Path) -> None:
    """No journal yet: the first folder sync is the journal's own creation (or the first merge's);
    either way recovery and the next run must cope."""
    generate(data_dir, small_spec())
    before = rows_pyarrow(data_dir)
    assert run_once(data_dir, "durable:fsync-dir#1").returncode == -9
    assert rows_pyarrow(data_dir) == before
    recovered = recover(data_dir)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert json_lines(recovered.stdout)[-1]["consistent"] is True
    assert_settled(data_dir, before)
    assert run_once(data_dir).returncode == 0
    assert_settled(data_dir, before)
    assert_fully_consolidated(data_dir, [POD_A])


# -- a kill during recovery itself ------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryCrash:
    first: str  # where `run` dies
    second: str  # where the recovery of that dies
    by: str  # "recover", or "run" for the start-up recovery of the service
    result: MergeState


RECOVERY_CRASHES = [
    RecoveryCrash("journal:planned", "journal:rolled-back", "recover", MergeState.ROLLED_BACK),
    RecoveryCrash("journal:writing", "journal:rolled-back", "run", MergeState.ROLLED_BACK),
    RecoveryCrash("durable:fsync-dir#1", "durable:unlinked#1", "recover", MergeState.ROLLED_BACK),
    RecoveryCrash("journal:written", "durable:linked#1", "recover", DELETED),
    RecoveryCrash("journal:written", "journal:renamed", "run", DELETED),
    RecoveryCrash("journal:renamed", "durable:unlinked#3", "recover", DELETED),
    RecoveryCrash("durable:unlinked#7", "durable:fsync-dir#1", "recover", DELETED),
]


@pytest.mark.parametrize(
    "crash", RECOVERY_CRASHES, ids=[f"{c.first}+{c.by}@{c.second}" for c in RECOVERY_CRASHES]
)
def test_kill_during_recovery_is_recovered(data_dir: Path, crash: RecoveryCrash) -> None:
    make_data(data_dir, "small")
    before = rows_pyarrow(data_dir)
    expected = expected_rows(data_dir)
    assert run_once(data_dir, crash.first).returncode == -9

    again = run_once if crash.by == "run" else recover
    second = again(data_dir, crash.second)
    assert second.returncode == -9, second.stdout + second.stderr
    assert rows_pyarrow(data_dir) >= before  # every row still there, maybe twice until resumed

    third = recover(data_dir)
    assert third.returncode == 0, third.stdout + third.stderr
    assert_settled(data_dir, before)
    assert check(data_dir, expected).violations == []
    record = journal_records(data_dir)[0]
    assert record.state is crash.result
    assert record.transitions[-1].actor == "recovery"
    if crash.result is MergeState.ROLLED_BACK:
        assert INTERRUPTED in (record.error or "")
        assert count(data_dir / POD_A, "metrics-", ".parquet") == SOURCES
    else:
        assert_fully_consolidated(data_dir, [POD_A])
    # each state entered once, whoever entered it: the killed recovery left no duplicate step
    states = [t.state for t in record.transitions]
    assert len(states) == len(set(states))

    final = run_once(data_dir)
    assert final.returncode == 0, final.stderr
    assert_settled(data_dir, before)
    assert_fully_consolidated(data_dir, [POD_A])
    assert check(data_dir, expected).violations == []


# -- what recovery must not do on its own -----------------------------------------------------


def published_then_killed(data_dir: Path) -> tuple[Counter[Any], Path]:
    """One merge killed once its output was published (`journal:renamed`): the rows expected,
    and the source a test changes (the sixth)."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    assert run_once(data_dir, "journal:renamed").returncode == -9
    return expected, sorted((data_dir / POD_A).glob("metrics-*.parquet"))[5]


def touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def replace_with_copy(path: Path) -> None:
    """Same bytes, new inode: a copy put in its place."""
    copy = path.with_name(path.name + ".copy")
    shutil.copy2(path, copy)
    os.replace(copy, path)


def one_row_fewer(path: Path) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pq.read_table(path).slice(1), sink)
    return sink.getvalue().to_pybytes()


def rewritten(path: Path) -> None:
    """Other rows, new inode: what a monitor rewriting its file would leave."""
    copy = path.with_name(path.name + ".copy")
    copy.write_bytes(one_row_fewer(path))
    os.replace(copy, path)


def edited_in_place(path: Path) -> None:
    """Other rows, same inode."""
    data = one_row_fewer(path)
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate()


@pytest.mark.parametrize("modify", [rewritten, edited_in_place], ids=["inode", "in-place"])
def test_source_changed_after_planning_is_kept_and_flagged(data_dir: Path, modify: Any) -> None:
    _expected, changed = published_then_killed(data_dir)
    modify(changed)
    files = snapshot(data_dir)

    # the flag is committed, then the process dies: the next recovery must not flag twice
    flagged = recover(data_dir, "journal:needs-attention")
    assert flagged.returncode == -9
    assert journal_records(data_dir)[0].state is MergeState.NEEDS_ATTENTION

    # not one file deleted, the changed one included
    lines = left_for_a_person(data_dir, files, changed.name, "changed after merge 1 was planned")
    assert (lines[0]["kind"], lines[0]["result"]) == ("recovery", "needs-attention")
    assert lines[-1]["needs_person"] == 1
    assert lines[-1]["consistent"] is False

    record = journal_records(data_dir)[0]
    assert [(t.state, t.actor) for t in record.transitions] == [
        (PLANNED, "merge"),
        (WRITING, "merge"),
        (WRITTEN, "merge"),
        (RENAMED, "merge"),
        (MergeState.NEEDS_ATTENTION, "recovery"),
    ]
    assert changed.name in (record.error or "")
    shown = history(data_dir)[0]
    assert shown["state"] == "needs-attention"
    assert changed.name in shown["error"]

    # the service leaves a flagged merge's files alone too
    assert run_once(data_dir).returncode == EXIT_NEEDS_PERSON
    assert snapshot(data_dir) == files
    assert len(journal_records(data_dir)) == 1


def sources_now(data_dir: Path) -> dict[str, str]:
    """What `history --sources` says is under each name of merge 1's sources now."""
    shown = run_cli("history", "--data-dir", str(data_dir), "--sources", "--json")
    merge_line, *source_lines = json_lines(shown.stdout)
    assert (merge_line["kind"], merge_line["id"]) == ("merge", 1)
    return {line["file"]: line["now"] for line in source_lines}


@pytest.mark.parametrize("decision", ["deleted", "moved out"])
def test_a_person_who_deletes_or_moves_out_a_changed_source_lets_the_merge_finish(
    data_dir: Path, tmp_path: Path, decision: str
) -> None:
    """The README's advice for "changed after merge N was planned": delete the file, or move
    it and its companion out of the folder to keep it; the next `recover` finishes the merge
    with every other row kept once."""
    expected, changed = published_then_killed(data_dir)
    rewritten(changed)
    assert recover(data_dir).returncode == EXIT_NEEDS_PERSON
    now = sources_now(data_dir)
    assert len(now) == SOURCES
    assert now.pop(changed.name) == "changed"
    assert set(now.values()) == {"as-merged"}

    if decision == "deleted":
        changed.unlink()
    else:
        for path in (changed, changed.with_suffix(".containers")):
            path.rename(tmp_path / path.name)
    resumed_and_settled(data_dir, expected)  # its rows as merged too: the output has them
    assert set(sources_now(data_dir).values()) == {"gone"}
    if decision == "moved out":
        assert (tmp_path / changed.name).exists()
        assert (tmp_path / changed.with_suffix(".containers").name).exists()


@pytest.mark.parametrize("modify", [touch, replace_with_copy], ids=["mtime", "inode"])
def test_a_source_whose_bytes_are_unchanged_goes_whatever_its_identity(
    data_dir: Path, modify: Any
) -> None:
    """A source, and its companion, touched or copied in place after the output was published
    hold the rows and containers the output holds: its footer digest, which the output's
    lineage records, says so. Taken for changed files, they were left beside the output, every
    row of theirs twice, until a person came."""
    expected, changed = published_then_killed(data_dir)
    modify(changed)
    modify(changed.with_suffix(".containers"))

    resumed_and_settled(data_dir, expected)


def test_a_stop_during_the_proof_of_copied_sources_ends_it_and_the_next_start_proves_again(
    data_dir: Path, tmp_path: Path
) -> None:
    """The proof reads the output and every copied source: about a minute of CPU for an
    output of 160 files, which a SIGTERM at start-up waited for, past the 30 s Kubernetes
    gives. Now it is given up (`recovery-stopped`): nothing deleted, no death counted, the
    merge as it was; the next start proves again. Found by a crash-safety review."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    assert run_once(data_dir, "journal:renamed").returncode == -9
    copy = Path(shutil.copytree(data_dir, tmp_path / "copy", symlinks=True))
    before = snapshot(copy)
    stop_once_rows_are_read = StopOnceRowsAreRead()

    journal = Journal.open(default_journal_path(copy))
    try:
        report = recovery.recover(journal, copy, should_stop=stop_once_rows_are_read)
        assert stop_once_rows_are_read.asked == 2
        assert report.actions == []
        assert journal.attempt_deaths(recovery.proof_subject(POD_A, OUTPUT)).count == 0
        assert [r.state for r in journal.history()] == [MergeState.RENAMED]
    finally:
        journal.close()
    assert snapshot(copy) == before
    resumed_and_settled(copy, expected)


def test_a_source_touched_before_its_delete_stops_the_merge_and_recovery_proves_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN step 7: the merge itself stops at a source whose mtime changed once its output
    was published, and deletes nothing. Recovery then finds the footer merged, proves every
    row of the file in the output, and finishes."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    touched = sorted(folder.glob("metrics-*.parquet"))[5]
    real_publish = merge.publish

    def publish_then_touch(*args: Any, **kwargs: Any) -> None:
        real_publish(*args, **kwargs)
        touch(touched)

    monkeypatch.setattr(merge, "publish", publish_then_touch)
    pass_now(data_dir)
    [record] = journal_records(data_dir)
    assert record.state is MergeState.NEEDS_ATTENTION
    assert touched.name in (record.error or "")
    assert count(folder, "metrics-", ".parquet") == SOURCES

    result = resumed_and_settled(data_dir, expected)
    [proven] = [line for line in result.stderr.splitlines() if "event=sources-proven" in line]
    assert "files=1" in proven.split()


def flip_a_byte_that_changes_the_rows(path: Path) -> None:
    """The first byte of the data pages whose flip makes the file read otherwise (or not at
    all); the footer is left as it is."""
    original = path.read_bytes()
    before = pq.read_table(path)
    for offset in range(4, len(original) // 2):
        data = bytearray(original)
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            if not pq.read_table(path).equals(before):
                return
        except (OSError, pa.ArrowException):
            return
    raise AssertionError(f"no byte of {path}'s first half changes its rows")


def test_a_source_with_the_footer_merged_but_other_rows_stays_for_a_person(
    data_dir: Path,
) -> None:
    """The footer is only the gate: a source whose data pages changed under the footer
    merged (here a flipped byte) is not proven by its rows, and nothing is deleted."""
    _expected, changed = published_then_killed(data_dir)
    digest = footers.digest_now(changed)
    flip_a_byte_that_changes_the_rows(changed)
    assert footers.digest_now(changed) == digest
    files = snapshot(data_dir)

    left_for_a_person(data_dir, files, changed.name, "its footer as merged, its rows not shown")


def test_a_copy_whose_rows_differ_is_not_proven_again_while_it_is_unchanged(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge waits for a person and every pass checks it again: proving again a file
    that did not change read the output and the file each time, a minute of CPU per pass for
    a 4 h output. Found by a crash-safety review. Once the file changes, it is proven anew."""
    _expected, changed = published_then_killed(data_dir)
    flip_a_byte_that_changes_the_rows(changed)
    proofs = []
    unproven = lineage.unproven

    def counted(*args: Any, **kwargs: Any) -> dict[str, str]:
        proofs.append(args)
        return unproven(*args, **kwargs)

    monkeypatch.setattr(lineage, "unproven", counted)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        for _ in range(3):
            report = recovery.recover(journal, data_dir)
            assert [a.result for a in report.actions] == [MergeState.NEEDS_ATTENTION]
            assert "its rows not shown to be the output's" in report.actions[0].reason
        assert len(proofs) == 1
        touch(changed)
        assert recovery.recover(journal, data_dir).actions[0].result is MergeState.NEEDS_ATTENTION
        assert len(proofs) == 2
    finally:
        journal.close()


@pytest.mark.parametrize("point", ["journal:written", "journal:renamed", "durable:unlinked#9"])
def test_a_copy_of_the_data_directory_made_mid_merge_settles_in_the_copy(
    data_dir: Path, tmp_path: Path, point: str
) -> None:
    """`cp -a` of a data directory whose merge was cut (a backup, a move to a new volume):
    every file, journal included, is the same but for its inode. Recovery in the copy
    finishes the merge as it would have in place, each row once and no companion left over."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    assert run_once(data_dir, point).returncode == -9
    copy = Path(shutil.copytree(data_dir, tmp_path / "copy", symlinks=True))
    source = next((copy / POD_A).glob("metrics-*.parquet"))
    assert source.stat().st_ino != (data_dir / POD_A / source.name).stat().st_ino
    shown = sources_now(copy)
    assert shown[source.name] == "same-footer"
    assert set(shown.values()) <= {"same-footer", "gone"}

    resumed_and_settled(copy, expected)


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def left_for_a_person(
    data_dir: Path, files: dict[str, tuple[int, int, str]], *reasons: str
) -> list[dict[str, Any]]:
    """Two recoveries in a row: each exits 3, names every one of `reasons` in the merge's
    reason, and deletes nothing. The lines the last one printed."""
    for _ in range(2):
        result = recover(data_dir)
        assert result.returncode == EXIT_NEEDS_PERSON, result.stdout + result.stderr
        lines = json_lines(result.stdout)
        action = lines[0]
        assert action["action"] == "needs a person"
        for reason in reasons:
            assert reason in action["reason"], action["reason"]
        assert snapshot(data_dir) == files
    return lines


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_output_lost_while_sources_are_gone_needs_a_person(data_dir: Path, damage: str) -> None:
    make_data(data_dir, "small")
    folder = data_dir / POD_A
    assert run_once(data_dir, "durable:unlinked#12").returncode == -9  # 5 sources deleted
    if damage == "missing":
        (folder / OUTPUT).unlink()
    else:
        corrupt(folder / OUTPUT)
    files = snapshot(data_dir)
    assert count(folder, "metrics-", ".parquet") == SOURCES - 5

    what = "missing" if damage == "missing" else "corrupt (checksum differs)"
    lines = left_for_a_person(
        data_dir, files, f"output {OUTPUT} is {what}", "metrics-20251230T080000Z.parquet (missing)"
    )
    assert lines[0]["found"] == "needs-attention"  # as the first recovery left it

    record = journal_records(data_dir)[0]
    assert record.state is MergeState.NEEDS_ATTENTION
    assert [t.actor for t in record.transitions].count("recovery") == 1
    # nor does a pass merge the sources left: with the output gone, no lineage claims them,
    # and only the journal holds them back for the person
    assert run_once(data_dir).returncode == EXIT_NEEDS_PERSON
    assert snapshot(data_dir) == files
    assert len(journal_records(data_dir)) == 1


def test_a_published_output_whose_checksum_differs_is_left_for_a_person(data_dir: Path) -> None:
    """DESIGN: a checksum that does not match is left untouched, flagged, and `recover` exits
    non-zero, even when every source is still there. Rolling the merge back would keep the
    damaged output beside its sources (rows twice); finishing would delete the sources."""
    make_data(data_dir, "small")
    folder = data_dir / POD_A
    assert run_once(data_dir, "journal:renamed").returncode == -9  # no source deleted yet
    assert count(folder, "metrics-", ".parquet") == SOURCES
    corrupt(folder / OUTPUT)
    files = snapshot(data_dir)

    left_for_a_person(data_dir, files, f"output {OUTPUT} is corrupt (checksum differs)")
    assert journal_records(data_dir)[0].state is MergeState.NEEDS_ATTENTION
    assert run_once(data_dir).returncode == EXIT_NEEDS_PERSON
    assert snapshot(data_dir) == files


# -- a foreign file under the companion's final name (invariants 2 and 5) ---------------------


def test_a_taken_companion_name_skips_the_merge(data_dir: Path) -> None:
    make_data(data_dir, "small")
    folder = data_dir / POD_A
    (folder / OUTPUT_COMPANION).write_bytes(b"not ours")
    before, files = rows_pyarrow(data_dir), snapshot(data_dir)

    result = run_once(data_dir)
    assert result.returncode == 0, result.stderr
    assert "event=merge-skipped" in result.stderr
    assert snapshot(data_dir) == files
    assert rows_pyarrow(data_dir) == before
    assert journal_records(data_dir) == []


@pytest.mark.parametrize("point", ["durable:linked#1", "durable:unlinked#1"])
def test_companion_name_taken_after_the_output_is_published_needs_a_person(
    data_dir: Path, point: str
) -> None:
    """The parquet already has its final name: rolling back now would keep every row twice."""
    make_data(data_dir, "small")
    folder = data_dir / POD_A
    assert run_once(data_dir, point).returncode == -9
    assert (folder / OUTPUT).exists()
    (folder / OUTPUT_COMPANION).write_bytes(b"not ours")
    files = snapshot(data_dir)

    left_for_a_person(data_dir, files, "name already exists", OUTPUT_COMPANION)
    record = journal_records(data_dir)[0]
    assert record.state is MergeState.NEEDS_ATTENTION
    assert [t.actor for t in record.transitions].count("recovery") == 1


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_person_who_restores_the_output_from_a_backup_lets_the_merge_finish(
    data_dir: Path, tmp_path: Path, damage: str
) -> None:
    """The README's advice for an output "missing" or "corrupt" once sources are gone:
    restore it from a backup; recovery takes the journaled sha256's bytes and finishes."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, "durable:unlinked#9").returncode == -9
    backup = Path(shutil.copy2(folder / OUTPUT, tmp_path / OUTPUT))
    if damage == "missing":
        (folder / OUTPUT).unlink()
    else:
        corrupt(folder / OUTPUT)
    assert recover(data_dir).returncode == EXIT_NEEDS_PERSON

    shutil.copy2(backup, folder / OUTPUT)
    resumed_and_settled(data_dir, expected)


def test_a_person_who_moves_the_file_taking_the_companions_name_lets_the_merge_finish(
    data_dir: Path, tmp_path: Path
) -> None:
    """The README's advice for "name already exists": move that file out of the folder; the
    next `recover` publishes the companion and finishes."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, "durable:linked#1").returncode == -9
    (folder / OUTPUT_COMPANION).write_bytes(b"not ours")
    assert recover(data_dir).returncode == EXIT_NEEDS_PERSON

    (folder / OUTPUT_COMPANION).rename(tmp_path / "not-ours")
    resumed_and_settled(data_dir, expected)


def test_run_once_exits_3_while_a_merge_waits_for_a_person_as_recover_does(
    data_dir: Path,
) -> None:
    """A cron job running `run --once` is told by its exit code, as it would be by `recover`:
    whether this run's recovery flagged the merge or an earlier one did. Once the person has
    acted, the same command finishes the merge and exits 0."""
    expected, changed = published_then_killed(data_dir)
    rewritten(changed)
    for _ in range(2):  # flagged by this run's recovery, then found flagged in the journal
        result = run_once(data_dir)
        assert result.returncode == EXIT_NEEDS_PERSON, result.stderr
        assert "event=stopped reason=once needs_person=1" in result.stderr.splitlines()[-1]

    changed.unlink()
    result = run_once(data_dir)

    assert result.returncode == 0, result.stderr
    assert "event=stopped reason=once needs_person=0" in result.stderr.splitlines()[-1]
    assert check(data_dir, expected).violations == []


@pytest.mark.parametrize("point", ["durable:linked#1", "durable:linked#2"])
def test_a_copy_of_the_output_under_its_final_name_is_not_kept_twice(
    data_dir: Path, point: str
) -> None:
    """Regression: killed between link and unlink, then the directory copied without hard
    links (a backup restored, `cp -r`): the final name holds the temp file's very bytes on
    another inode. Recovery took that for a foreign file, rolled the merge back and left the
    output beside its sources: every row twice."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, point).returncode == -9
    final = OUTPUT if point.endswith("#1") else OUTPUT_COMPANION
    copy = folder / (final + ".copy")
    shutil.copy2(folder / final, copy)
    os.replace(copy, folder / final)
    assert not os.path.samefile(folder / final, folder / (final + ".tmp"))

    resumed_and_settled(data_dir, expected)


def test_a_temp_output_damaged_after_written_is_rolled_back_not_published(
    data_dir: Path,
) -> None:
    """`written` promises a complete temp file with the recorded checksum, and recovery rolls
    forward only from a verified one: a temp file changed since (a disk that lost a synced
    page, a person's tool) is never published, the sources being intact it is rolled back,
    and the next run merges again."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, "journal:written").returncode == -9
    corrupt(folder / (OUTPUT + ".tmp"))

    result = recover(data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    [action] = [a for a in json_lines(result.stdout) if a["kind"] == "recovery"]
    assert (action["found"], action["action"]) == ("written", "rolled back")
    assert "output not verifiable" in action["reason"]
    assert not (folder / OUTPUT).exists()
    assert count(folder, "metrics-", ".parquet") == SOURCES
    assert tmp_files(data_dir) == []

    assert run_once(data_dir).returncode == 0
    assert check(data_dir, expected).violations == []
    assert_fully_consolidated(data_dir, [POD_A])


def alter(companion: Path) -> None:
    """A companion that still decodes, one container short: what a disk that returns other
    bytes than it acknowledged could leave, and no decoding can tell."""
    sidecar = companions.read_companion(companion)
    assert len(sidecar.containers) > 1
    fewer = dataclasses.replace(sidecar, containers=sidecar.containers[1:])
    companion.write_bytes(companions.encode(fewer))


@pytest.mark.parametrize("damage", ["torn", "gone", "altered"])
def test_a_temp_companion_damaged_after_written_is_rolled_back_not_published(
    data_dir: Path, damage: str
) -> None:
    """`written` promises the companion's temp file too (DESIGN step 3). Recovery verified
    only the output's checksum: a torn companion temp was published and every source's
    companion deleted (a gone one: the output published with none), so their containers
    vanished from the viewer. An altered one still decodes: only its journaled checksum
    tells. Not verifiable, the sources intact: rolled back, merged again."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    containers = viewer_containers(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, "journal:written").returncode == -9
    temp = folder / (OUTPUT_COMPANION + ".tmp")
    if damage == "torn":
        temp.write_bytes(temp.read_bytes()[:-3])
    elif damage == "altered":
        alter(temp)
    else:
        temp.unlink()

    result = recover(data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    [action] = [a for a in json_lines(result.stdout) if a["kind"] == "recovery"]
    assert (action["found"], action["action"]) == ("written", "rolled back")
    assert OUTPUT_COMPANION in action["reason"]
    assert not (folder / OUTPUT).exists() and not (folder / OUTPUT_COMPANION).exists()
    assert count(folder, "metrics-", ".parquet") == SOURCES
    assert count(folder, "metrics-", ".containers") == SOURCES
    assert tmp_files(data_dir) == []

    assert run_once(data_dir).returncode == 0
    assert check(data_dir, expected, containers=containers).violations == []
    assert_fully_consolidated(data_dir, [POD_A])


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("torn", "is not the one written"),
        ("altered", "is not the one written"),
        ("torn, written before migration 6", "does not read"),  # no checksum: decoded
    ],
)
def test_a_published_companion_that_is_not_the_one_written_stops_the_deletes(
    data_dir: Path, damage: str, said: str
) -> None:
    """The output is published and verified, but its companion is torn, or altered (it still
    decodes, one container short): deleting the sources' companions would leave the viewer no
    list of their containers. A person decides; nothing is deleted, and `recover` exits 3."""
    make_data(data_dir, "small")
    folder = data_dir / POD_A
    assert run_once(data_dir, "journal:renamed").returncode == -9
    companion = folder / OUTPUT_COMPANION
    if damage.startswith("torn"):
        companion.write_bytes(companion.read_bytes()[:-3])
    else:
        alter(companion)
    if "before migration 6" in damage:
        with sqlite3.connect(default_journal_path(data_dir)) as conn:
            conn.execute("UPDATE merges SET companion_checksum = NULL")
        conn.close()
    files = snapshot(data_dir)

    result = recover(data_dir)
    assert result.returncode == EXIT_NEEDS_PERSON, result.stdout + result.stderr
    [action] = [a for a in json_lines(result.stdout) if a["kind"] == "recovery"]
    assert action["action"] == "needs a person"
    assert f"companion {OUTPUT_COMPANION} {said}" in action["reason"]
    assert snapshot(data_dir) == files


def test_a_person_who_removes_an_output_whose_companion_is_in_doubt_gets_it_merged_again(
    data_dir: Path,
) -> None:
    """The README's advice for a companion "not the one written" while every source is still
    there: delete the output and its companion. `recover` rolls the merge back, and the next
    pass merges the sources again."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, "journal:renamed").returncode == -9
    alter(folder / OUTPUT_COMPANION)
    assert recover(data_dir).returncode == EXIT_NEEDS_PERSON

    (folder / OUTPUT).unlink()
    (folder / OUTPUT_COMPANION).unlink()
    result = recover(data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    [action] = [a for a in json_lines(result.stdout) if a["kind"] == "recovery"]
    assert action["result"] == "rolled-back"
    assert check(data_dir, expected).violations == []
    assert run_once(data_dir).returncode == 0
    assert check(data_dir, expected).violations == []
    assert_fully_consolidated(data_dir, [POD_A])


def test_a_person_who_restores_the_outputs_companion_from_a_backup_lets_the_merge_finish(
    data_dir: Path, tmp_path: Path
) -> None:
    """The README's other advice for a companion "not the one written": restore it from a
    backup; recovery takes the journaled sha256's bytes and finishes."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, "durable:unlinked#9").returncode == -9
    backup = Path(shutil.copy2(folder / OUTPUT_COMPANION, tmp_path / OUTPUT_COMPANION))
    alter(folder / OUTPUT_COMPANION)
    assert recover(data_dir).returncode == EXIT_NEEDS_PERSON

    shutil.copy2(backup, folder / OUTPUT_COMPANION)
    resumed_and_settled(data_dir, expected)


def test_a_companion_rewritten_while_the_sources_are_deleted_stops_the_deletes(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each companion is checked again right before it goes: one the monitor rewrote with a
    container more while the sources before it were deleted stays, with its file, and the
    merge waits for a person; no row is lost."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    first = sorted(folder.glob("metrics-*.parquet"))[0]
    remove = durable.remove
    rewritten: list[Path] = []

    def remove_then_rewrite_a_companion(path: Path) -> bool:
        gone = remove(path)
        if path == first and not rewritten:
            rewritten.append(add_late_container(folder))
        return gone

    monkeypatch.setattr(durable, "remove", remove_then_rewrite_a_companion)
    pass_now(data_dir)
    monkeypatch.undo()
    [record] = journal_records(data_dir)
    assert record.state is MergeState.NEEDS_ATTENTION
    assert f"listing 1 containers {OUTPUT_COMPANION} lacks" in (record.error or "")
    [victim] = rewritten
    assert victim.exists() and victim.with_suffix(".parquet").exists()
    violations = check(data_dir, expected).violations
    assert violations and not [v for v in violations if "lost" in v]  # twice, for a person

    victim.unlink()  # the README's recipe, for containers that do not matter
    resumed_and_settled(data_dir, expected)


@pytest.mark.parametrize("point", ["journal:renamed", "durable:unlinked#9"])
def test_a_companion_rewritten_after_its_merge_was_published_stops_the_deletes(
    data_dir: Path, tmp_path: Path, point: str
) -> None:
    """The run dies once the output is published (or among its deletes); the monitor then
    rewrites a source's companion (a container it had missed). Deleting the source with it
    took that container out of the viewer, and keeping the companion alone left it beside no
    file, where the viewer never reads it. So nothing more is deleted, and a person decides:
    the README's recipe, moving the companion out, lets the merge finish."""
    make_data(data_dir, "small")
    expected = expected_rows(data_dir)
    folder = data_dir / POD_A
    assert run_once(data_dir, point).returncode == -9
    victim = add_late_container(folder)
    files = snapshot(data_dir)

    said = f"companion not the one planned, listing 1 containers {OUTPUT_COMPANION} lacks"
    left_for_a_person(data_dir, files, said)
    assert victim.with_suffix(".parquet").exists()

    victim.rename(tmp_path / victim.name)
    resumed_and_settled(data_dir, expected)
