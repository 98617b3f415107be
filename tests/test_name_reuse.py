"""A file written under a name an output's lineage already lists.

The monitor names a file by the second its window starts, from the wall clock. After the clock
steps back by a multiple of a rotation (an hour is 40 of them: an RTC read as local time at
boot, say), every new file takes the name of one written an hour before, which may be merged
and deleted by then. Lineage matched files by name alone, so the new file passed for a copy of
rows its output already held: it and the output were held out of every merge, `status` and
`recover` said a person must decide, for good, and the window never merged again. An output
now records each source's footer digest too, and a file whose footer differs from the one
recorded under its name is another file.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PAST, consolidated_name, metrics_name, run_cli, small_spec
from oracle import RowKey, check, expected_rows, journal_records, recover_in_process, row_keys

from fgm_consolidator import durable, footers, lineage, recovery
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.recovery import judge_partition
from fgm_consolidator.schemas import LINEAGE_KEY
from fgm_consolidator.service import Settings, StopFlag, consolidation_pass
from fgm_consolidator.simulate import generate
from fgm_consolidator.states import MergeState

PARTITION = "dt=2025-12-30/identifier=pod-a"
REWRITTEN = range(3, 7)  # rotations whose names the monitor uses again
EXIT_NEEDS_PERSON = 3


def run_once(data_dir: Path, crash_at: str = "") -> None:
    result = run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0",
        env={"FGM_CRASH_AT": crash_at},
    )  # fmt: skip
    assert (result.returncode != 0) == bool(crash_at), result.stderr


def first_day(data_dir: Path) -> None:
    """The day merged into one output."""
    generate(data_dir, small_spec())
    run_once(data_dir)
    assert sorted(os.listdir(data_dir / PARTITION)) == [
        consolidated_name(0, 23).replace(".parquet", ".containers"),
        consolidated_name(0, 23),
    ]


def write_again(data_dir: Path) -> Counter[RowKey]:
    """The monitor, its clock stepped back, writes other rows under names merged before."""
    spec = small_spec(start=PAST + timedelta(seconds=90 * REWRITTEN.start), seed=7)
    generate(data_dir, spec, only=range(len(REWRITTEN)))
    folder = data_dir / PARTITION
    for rotation in REWRITTEN:
        assert (folder / metrics_name(rotation)).exists()
    return expected_rows(data_dir)  # every live row: the output's and the new files'


def status_code(data_dir: Path) -> int:
    return run_cli("status", "--data-dir", str(data_dir)).returncode


def test_a_new_file_under_a_merged_name_is_merged_like_any_other(data_dir: Path) -> None:
    first_day(data_dir)
    expected = write_again(data_dir)
    assert status_code(data_dir) == 0  # nothing a person must look at: only files to merge
    run_once(data_dir)
    left = sorted(n for n in os.listdir(data_dir / PARTITION) if n.endswith(".parquet"))
    assert left == [consolidated_name(0, 23), consolidated_name(3, 6)]
    report = check(data_dir, expected)
    assert report.violations == []
    assert status_code(data_dir) == 0


def test_with_the_journal_lost_the_new_files_go_by_the_output_that_holds_them(
    data_dir: Path,
) -> None:
    first_day(data_dir)
    expected = write_again(data_dir)
    run_once(data_dir, crash_at="journal:renamed")  # published; no source deleted yet
    folder = data_dir / PARTITION
    assert (folder / consolidated_name(3, 6)).exists()
    assert (folder / metrics_name(REWRITTEN.start)).exists()
    default_journal_path(data_dir).unlink()
    result = run_cli("recover", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    removed = [
        event["file"]
        for event in map(json.loads, result.stdout.splitlines())
        if event.get("action") == "removed"
    ]
    assert sorted(removed) == [metrics_name(r) for r in REWRITTEN]
    report = check(data_dir, expected, journal_lost=True)
    assert report.violations == []
    run_once(data_dir)  # the service's start after the incident: nothing left to do
    assert status_code(data_dir) == 0
    assert check(data_dir, expected, journal_lost=True).violations == []


def test_a_merge_cut_among_its_deletes_is_finished_not_withdrawn(data_dir: Path) -> None:
    """Its first source gone, the older output listing that name looked like a rival holding
    it, and withdrawing our output for it would have lost the new file's rows: a rival must
    list the file our output's lineage records, footer and all."""
    first_day(data_dir)
    expected = write_again(data_dir)
    # Unlinks: the two temp names at publish, then the first source's companion, then it.
    run_once(data_dir, crash_at="durable:unlinked#4")
    folder = data_dir / PARTITION
    assert not (folder / metrics_name(REWRITTEN.start)).exists()
    assert (folder / metrics_name(REWRITTEN.start + 1)).exists()
    result = run_cli("recover", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    left = sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))
    assert left == [consolidated_name(0, 23), consolidated_name(3, 6)]
    assert check(data_dir, expected).violations == []


def reuse_first_source_during_a_cut_delete(
    data_dir: Path, seed: int
) -> tuple[Path, Counter[RowKey]]:
    """The merge of the second files is killed right after it deleted its first source, and
    the monitor writes that name a third time before recovery runs: that file and every row
    expected."""
    first_day(data_dir)
    expected = write_again(data_dir)
    run_once(data_dir, crash_at="durable:unlinked#4")  # as in the test above
    reused = data_dir / PARTITION / metrics_name(REWRITTEN.start)
    assert not reused.exists()
    generate(data_dir, small_spec(start=PAST + timedelta(seconds=90 * 3), seed=seed), range(1))
    return reused, expected + row_keys(pq.read_table(reused), PARTITION)


@pytest.mark.parametrize("half_written", [False, True], ids=["finished", "being-written"])
def test_a_name_reused_between_a_cut_delete_and_recovery_is_a_new_file(
    data_dir: Path, half_written: bool
) -> None:
    """The changed source went to needs-attention for a person. Deletes go in order, so a
    source whose predecessors are all gone may have gone too; sharing no row with the output,
    the file under its name is new: recovery leaves it and finishes the merge. The real monitor
    writes a file for its whole window (90 s), so recovery seconds after the kill finds it
    without a footer: begun after ours was planned complete, it is new too, and once finished
    a new file to the next start (the journal shows the merge deleted that name)."""
    reused, expected = reuse_first_source_during_a_cut_delete(data_dir, seed=8)
    complete = reused.read_bytes()
    if half_written:
        reused.write_bytes(complete[: len(complete) // 2])  # the monitor, mid-window
    result = run_cli("recover", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert journal_records(data_dir)[-1].state is MergeState.SOURCES_DELETED
    if half_written:
        reused.write_bytes(complete)  # finished
    run_once(data_dir)
    assert reused.exists()
    assert check(data_dir, expected).violations == []
    assert status_code(data_dir) == 0


def test_a_reused_name_whose_file_takes_the_deleted_ones_identity_is_not_deleted(
    data_dir: Path,
) -> None:
    """A source is "unchanged" by inode, size and mtime, and a new file under a reused name can
    match all three: the inode reused, the same size, an mtime equal at a coarse clock's
    granularity. Here the journal is given the new file's identity, as such a collision would;
    the footer digest the output's lineage records tells them apart, so it is not deleted."""
    reused, expected = reuse_first_source_during_a_cut_delete(data_dir, seed=8)
    merge = journal_records(data_dir)[-1]
    st = reused.stat()
    with sqlite3.connect(default_journal_path(data_dir)) as journal:
        journal.execute(
            "UPDATE sources SET inode = ?, size = ?, mtime_ns = ? WHERE merge_id = ? AND name = ?",
            (st.st_ino, st.st_size, st.st_mtime_ns, merge.id, reused.name),
        )
    result = run_cli("recover", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert reused.exists()
    # every row once; the oracle, going by the identity forged above, sees the source kept
    assert check(data_dir, expected).violations == [
        f"{reused}: source of finished merge {merge.id} still present"
    ]


def test_a_reused_names_companion_that_takes_the_deleted_ones_identity_is_not_deleted(
    data_dir: Path,
) -> None:
    """The same collision on the companion. Ours went before its file did, so a companion
    beside a new file under the name is the new file's, whatever its identity says: deleting
    it took that file's containers from the viewer's list and its per-file pruning."""
    reused, expected = reuse_first_source_during_a_cut_delete(data_dir, seed=8)
    companion = reused.with_suffix(".containers")
    assert companion.exists()
    merge = journal_records(data_dir)[-1]
    st = companion.stat()
    with sqlite3.connect(default_journal_path(data_dir)) as journal:
        journal.execute(
            "UPDATE sources SET companion_inode = ?, companion_size = ?, companion_mtime_ns = ?"
            " WHERE merge_id = ? AND name = ?",
            (st.st_ino, st.st_size, st.st_mtime_ns, merge.id, reused.name),
        )
    result = run_cli("recover", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert journal_records(data_dir)[-1].state is MergeState.SOURCES_DELETED
    assert reused.exists()
    assert companion.exists()
    assert check(data_dir, expected).violations == []


def test_a_source_whose_footer_does_not_read_at_its_delete_keeps_the_identitys_word(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO on the footer of a source whose identity matched says nothing of what it holds; a
    new file under a reused name was just written, and reads. Deleted as before digests, not
    left to fail every recovery."""
    first_day(data_dir)
    expected = write_again(data_dir)
    run_once(data_dir, crash_at="journal:renamed")  # published; no source deleted yet

    def unreadable(path: Path) -> str | None:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(footers, "digest_now", unreadable)
    recover_in_process(data_dir)
    assert journal_records(data_dir)[-1].state is MergeState.SOURCES_DELETED
    assert not any((data_dir / PARTITION / metrics_name(r)).exists() for r in REWRITTEN)
    assert check(data_dir, expected).violations == []


def test_a_first_source_changed_in_place_during_a_cut_delete_is_left_for_a_person(
    data_dir: Path,
) -> None:
    """The same interleaving, but the file under the name holds rows the output holds (the
    merged file, rewritten one row short): deleting it, or keeping it as new, would be a guess."""
    reused, _ = reuse_first_source_during_a_cut_delete(data_dir, seed=7)  # the second files'
    table = pq.read_table(reused)
    pq.write_table(table.slice(1), reused)
    result = run_cli("recover", "--data-dir", str(data_dir), "--json")
    assert result.returncode == EXIT_NEEDS_PERSON, result.stdout + result.stderr
    assert f"{reused}: changed after merge" in result.stdout
    assert reused.exists()


def test_with_the_journal_lost_first_the_rows_tell(data_dir: Path) -> None:
    """No journal says the name was deleted, so the file may be the merged one rewritten in
    place, whose rows the output holds: start-up compares them, finds none of the new file's
    in the output, records it in the journal as new, and the pass merges it."""
    first_day(data_dir)
    default_journal_path(data_dir).unlink()
    expected = write_again(data_dir)
    assert status_code(data_dir) == EXIT_NEEDS_PERSON  # footers alone cannot tell
    result = run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0", "--log-format", "json"
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    released = [e["file"] for e in events if e.get("action") == "released"]
    assert sorted(released) == [metrics_name(r) for r in REWRITTEN]
    left = sorted(n for n in os.listdir(data_dir / PARTITION) if n.endswith(".parquet"))
    assert left == [consolidated_name(0, 23), consolidated_name(3, 6)]
    assert check(data_dir, expected, journal_lost=True).violations == []
    assert status_code(data_dir) == 0


def test_a_new_file_with_a_label_its_namesakes_output_lacks_is_compared(data_dir: Path) -> None:
    """Rows were compared as the output's columns, and a file with a column the output lacks
    cannot be: it was held for a person. A new monitor run often brings new labels."""
    first_day(data_dir)
    default_journal_path(data_dir).unlink()
    expected = write_again(data_dir)
    path = data_dir / PARTITION / metrics_name(REWRITTEN.start)
    table = pq.read_table(path)
    at = table.schema.get_field_index("value_histogram")
    extra = pa.array([f"v{i}" for i in range(table.num_rows)], pa.string())
    pq.write_table(table.add_column(at, pa.field("l_zz_extra", pa.string()), extra), path)
    expected = expected - row_keys(table, PARTITION) + row_keys(pq.read_table(path), PARTITION)
    run_once(data_dir)
    left = sorted(n for n in os.listdir(data_dir / PARTITION) if n.endswith(".parquet"))
    assert left == [consolidated_name(0, 23), consolidated_name(3, 6)]
    assert check(data_dir, expected, journal_lost=True).violations == []


def test_a_name_used_three_times_is_judged_by_each_output_that_lists_it(data_dir: Path) -> None:
    """Two outputs list the name, each with a file of its own, and the journal that says so is
    lost. "Listed by several outputs" held the third file for a person; it is new to each."""
    first_day(data_dir)
    write_again(data_dir)
    run_once(data_dir)  # the second files merged: consolidated(3, 6) lists them
    default_journal_path(data_dir).unlink()
    third = small_spec(start=PAST + timedelta(seconds=90 * 4), seed=8)
    generate(data_dir, third, only=range(2))  # rotations 4 and 5, a third time
    expected = expected_rows(data_dir)
    run_once(data_dir)
    left = sorted(n for n in os.listdir(data_dir / PARTITION) if n.endswith(".parquet"))
    assert left == [consolidated_name(0, 23), consolidated_name(3, 6), consolidated_name(4, 5)]
    assert check(data_dir, expected, journal_lost=True).violations == []
    assert status_code(data_dir) == 0


def test_an_output_name_made_again_after_its_output_was_merged_on(data_dir: Path) -> None:
    """Rotations 3-6 merge, their output joins the day's, then the monitor reuses their names:
    the new files make `consolidated(3, 6)` again, a name two finished merges wrote. That is no
    overwrite, since a merge between them took the first as a source (the oracle knows: the
    suite's torture met it), but with that merge forgotten the oracle must call it one."""
    folder = data_dir / PARTITION
    spec = small_spec()
    generate(data_dir, spec, only=REWRITTEN)
    run_once(data_dir)
    generate(data_dir, spec, only=range(REWRITTEN.start))
    generate(data_dir, spec, only=range(REWRITTEN.stop, spec.rotations))
    run_once(data_dir)
    assert not (folder / consolidated_name(3, 6)).exists()
    expected = write_again(data_dir)
    run_once(data_dir)
    left = sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))
    assert left == [consolidated_name(0, 23), consolidated_name(3, 6)]
    assert check(data_dir, expected).violations == []
    with sqlite3.connect(default_journal_path(data_dir)) as journal:  # the merge in between
        journal.execute("DELETE FROM sources WHERE name = ?", (consolidated_name(3, 6),))
    violations = check(data_dir, expected).violations
    assert [v for v in violations if "overwritten by merge" in v] == [
        f"{folder / consolidated_name(3, 6)}: output of merge 1 overwritten by merge 3"
    ], violations


def pass_now(data_dir: Path) -> None:
    """One pass of a running service: no start-up recovery before it."""
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_age_s=0))
    journal = Journal.open(settings.journal_path)
    try:
        consolidation_pass(journal, settings, StopFlag(20))
    finally:
        journal.close()


def test_with_the_journal_lost_a_name_reused_while_the_service_runs_is_compared_in_a_pass(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up check came before the file: it waited for the next start, `status`
    asking a person meanwhile. A pass compares it now, once per version."""
    first_day(data_dir)
    default_journal_path(data_dir).unlink()
    run_once(data_dir)  # the service's start after the loss: nothing to settle yet
    expected = write_again(data_dir)
    compared = []
    real = lineage.share_rows

    def counted(output: Path, files: list[Path], should_stop: Any = None) -> dict[str, str]:
        compared.append(sorted(f.name for f in files))
        return real(output, files, should_stop)

    monkeypatch.setattr(lineage, "share_rows", counted)
    monkeypatch.setattr(recovery, "_compared_in_passes", set())
    pass_now(data_dir)
    assert compared == [[metrics_name(r) for r in REWRITTEN]]
    left = sorted(n for n in os.listdir(data_dir / PARTITION) if n.endswith(".parquet"))
    assert left == [consolidated_name(0, 23), consolidated_name(3, 6)]
    assert check(data_dir, expected, journal_lost=True).violations == []
    assert status_code(data_dir) == 0


def test_a_pass_compares_a_version_that_shares_rows_once(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held, reported once, and not compared again by every pass (each reads the output)."""
    first_day(data_dir)
    default_journal_path(data_dir).unlink()
    run_once(data_dir)
    write_again(data_dir)
    compared = []

    def shares(output: Path, files: list[Path], should_stop: Any = None) -> dict[str, str]:
        compared.append(len(files))
        return {f.name: "holds 1 of its rows" for f in files}

    monkeypatch.setattr(lineage, "share_rows", shares)
    monkeypatch.setattr(recovery, "_compared_in_passes", set())
    before = sorted(os.listdir(data_dir / PARTITION))
    pass_now(data_dir)
    pass_now(data_dir)
    assert compared == [len(REWRITTEN)]
    assert sorted(os.listdir(data_dir / PARTITION)) == before


def test_which_file_a_lineage_means(data_dir: Path) -> None:
    first_day(data_dir)
    write_again(data_dir)
    folder = data_dir / PARTITION
    output = consolidated_name(0, 23)
    held = lineage.read(folder / output)
    assert held is not None and all(s.footer is not None for s in held.sources)
    legacy = replace(held, sources=tuple(replace(s, footer=None) for s in held.sources))
    reused = {metrics_name(r) for r in REWRITTEN}

    def claims(claim: lineage.Lineage, *, new: bool) -> frozenset[str]:
        files = lineage.PresentFiles(
            folder, os.listdir(folder), {output: claim}, lambda name, footer, by: new
        )
        return files.held_by(output, claim)

    assert claims(held, new=True) == frozenset()  # the journal shows them new
    assert claims(held, new=False) == reused  # maybe the merged files, rewritten in place
    assert claims(legacy, new=True) == reused  # no footer recorded: by name, as before
    # A file whose very footer another output records was merged as a file of its own.
    other = replace(
        held, sources=tuple(lineage.LineageSource(n, 90, digest(folder / n)) for n in reused)
    )
    files = lineage.PresentFiles(folder, os.listdir(folder), {output: held, "o": other})
    assert files.held_by(output, held) == frozenset()
    assert files.held_by("o", other) == reused


def digest(path: Path) -> str:
    return footers.read(path).digest


def test_which_file_an_ancestor_means(data_dir: Path) -> None:
    """An ancestor (a file whose rows came in through an output merged again) is the present
    file only under the footer recorded: never by name alone, which the monitor reuses."""
    first_day(data_dir)
    write_again(data_dir)
    folder = data_dir / PARTITION
    reused = sorted(metrics_name(r) for r in REWRITTEN)
    exact, other, unknown = reused[0], reused[1], reused[2]
    ancestors = (
        lineage.LineageSource(exact, 90, digest(folder / exact)),
        lineage.LineageSource(other, 90, "0" * 32),
        lineage.LineageSource(unknown, 90),
    )
    output = consolidated_name(0, 23)
    merged_again = lineage.Lineage(9, 5, (lineage.LineageSource(output, 5),), ancestors)
    doc = lineage.encode(9, merged_again.sources, ancestors)
    assert lineage.decode(doc[LINEAGE_KEY]) == merged_again
    files = lineage.PresentFiles(folder, os.listdir(folder), {"later": merged_again})
    assert files.held_by("later", merged_again) == {exact, output}
    assert files.under_another_footer("later", merged_again) == frozenset()
    assert merged_again.rows_of(exact) == 90
    among = lineage.decode(doc[LINEAGE_KEY], among={exact, output})  # as a pass reads it
    assert among == replace(merged_again, ancestors=ancestors[:1])
    plain = lineage.encode(9, merged_again.sources)  # no ancestors: the format of before
    assert b"ancestors" not in plain[LINEAGE_KEY]
    assert lineage.decode(plain[LINEAGE_KEY]) == replace(merged_again, ancestors=())


def test_rows_are_those_listed_under_the_files_own_footer() -> None:
    """Two files of one name (the clock stepped back) can both reach an output as ancestors."""
    first, second = (lineage.LineageSource("m", 90, "a"), lineage.LineageSource("m", 135, "b"))
    held = lineage.Lineage(3, 7, (lineage.LineageSource("o", 7),), (first, second))
    assert [held.rows_of("m", "b"), held.rows_of("m", "a"), held.rows_of("m")] == [135, 90, 90]
    assert held.rows_of("m", "c") == 90  # another footer: compared by rows, as before


def test_a_listed_file_with_a_column_its_output_lacks_is_not_proven(tmp_path: Path) -> None:
    """Compared as the output's columns, its rows would match without that one."""
    rows = {"time": pa.array([1, 2], pa.int64()), "value_int": pa.array([3, 4], pa.int64())}
    output, source = tmp_path / consolidated_name(0, 1), tmp_path / metrics_name(0)
    pq.write_table(pa.table(rows), output)
    pq.write_table(pa.table({**rows, "l_pod": pa.array(["a", "b"])}), source)
    held = lineage.Lineage(1, 2, (lineage.LineageSource(source.name, 2),))  # no footer: by name
    assert lineage.unproven(output, held, [source]) == {
        source.name: f"{source.name} does not fit {output.name}: column l_pod is not in the output"
    }


@pytest.mark.parametrize(
    "entry",
    [{"name": "m", "rows": "r"}, {"name": "m", "rows": 1, "footer": 5}, {"name": "m"}, "m"],
)
def test_a_malformed_ancestor_is_no_lineage_whatever_files_are_present(entry: Any) -> None:
    """A pass decodes only the ancestors under present names: it took an output with such an
    entry for ours while the merge, which reads them all, did not (helper-50)."""
    doc = {"merge_id": 1, "rows": 5, "sources": [{"name": "s", "rows": 5}], "ancestors": [entry]}
    raw = json.dumps(doc).encode()
    assert [lineage.decode(raw, among) for among in (None, set(), {"m"})] == [None] * 3


def test_a_file_without_a_footer_under_a_listed_name_is_never_taken_for_held(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file the monitor is still writing has no footer yet, so no digest to record as
    new. Were it finished as its rows were compared (here: the comparison finds none shared),
    the verdict had no doubt and no footer, which reads as "proven held": deleted."""
    first_day(data_dir)
    folder = data_dir / PARTITION
    name = metrics_name(REWRITTEN.start)
    (folder / name).write_bytes(b"PAR1" + bytes(100))  # open, not finished
    monkeypatch.setattr(lineage, "share_rows", lambda output, files, should_stop=None: {})
    [verdict] = judge_partition(folder, PARTITION, os.listdir(folder), set())
    assert (verdict.file, verdict.new_footer) == (name, None)
    assert verdict.doubt is not None and "no complete footer" in verdict.doubt


def test_a_file_put_under_a_sources_name_while_the_sources_are_deleted_is_kept(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sources were checked once, all of them, and then deleted one by one by name: a file
    the monitor (its clock stepped back) put under the last one's name while the first were
    deleted was deleted too, and its rows were in no output. Found by a crash-safety review
    that stopped the process among its deletes."""
    first_day(data_dir)
    expected = write_again(data_dir)
    folder = data_dir / PARTITION
    first, last = folder / metrics_name(REWRITTEN.start), folder / metrics_name(REWRITTEN[-1])
    remove = durable.remove
    replaced: list[Path] = []

    def remove_then_replace_the_last(path: Path) -> bool:
        gone = remove(path)
        if path == first and not replaced:
            start = PAST + timedelta(seconds=90 * REWRITTEN[-1])
            generate(data_dir, small_spec(start=start, seed=11), only=range(1))
            replaced.append(last)
        return gone

    monkeypatch.setattr(durable, "remove", remove_then_replace_the_last)
    pass_now(data_dir)
    assert replaced and last.exists()
    new_rows = row_keys(pq.read_table(last), PARTITION)
    assert journal_records(data_dir)[-1].state is MergeState.NEEDS_ATTENTION
    monkeypatch.undo()
    result = run_cli("recover", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert last.exists()
    assert check(data_dir, expected + new_rows).violations == []
