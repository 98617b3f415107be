"""A backup restored over a live data directory brings back files already merged and deleted.

An output that lists such a file holds its rows, and the lineage check proves and removes it.
Once that output was merged again, the new output lists only the old one: the restored files
were merged a second time and their rows stayed twice for good, without a word (an adversarial
crash-safety review, helper-45: +1,080 rows of 2,160). Outputs now list such files as
ancestors, by footer, so the lineage check proves and removes them with the journal or
without, whatever mtimes the restore kept. For outputs written before that, the journal still
knows which merge deleted them and where their rows went: a pass holds them out of every merge
and names them, `status` asks a person, and a file whose rows no output here holds is merged
as before.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import (
    PAST,
    consolidated_name,
    data_files,
    invoke,
    metrics_name,
    run_cli,
    small_spec,
)
from oracle import OracleReport, RowKey, check, check_rows, expected_rows, read_live

from fgm_consolidator import crashpoints, lineage, merge, recovery
from fgm_consolidator.durable import FileIdentity
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.recovery import LineageVerdict
from fgm_consolidator.simulate import generate

POD = "dt=2025-12-30/identifier=pod-a"
EXIT_NEEDS_PERSON = 3
EXIT_NEVER_RAN = 5


ONCE = ("run", "--once", "--min-age", "0", "--min-files", "2")


def run_once(data_dir: Path, *more: str, env: dict[str, str] | None = None) -> str:
    result = run_cli(*ONCE, "--data-dir", str(data_dir), *more, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def invoke_once(data_dir: Path) -> None:
    """`run --once` in this process, where a test may change what it writes."""
    result = invoke(*ONCE, "--data-dir", data_dir)
    assert result.exit_code == 0, result.output


def status(data_dir: Path) -> tuple[int, str]:
    result = run_cli("status", "--data-dir", str(data_dir))
    return result.returncode, result.stdout + result.stderr


def restore(backup: Path, folder: Path) -> list[str]:
    """`rsync -a --ignore-existing`: what the backup holds and the folder lacks."""
    restored = []
    for path in sorted(backup.iterdir()):
        if not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)
            restored.append(path.name)
    return restored


def restore_to_the_second(backup: Path, folder: Path) -> list[str]:
    """GNU tar's default format: mtimes to the whole second."""
    restored = restore(backup, folder)
    for name in restored:
        mtime = int((folder / name).stat().st_mtime)
        os.utime(folder / name, (mtime, mtime))
    return restored


def lose_journal(data_dir: Path) -> None:
    for path in default_journal_path(data_dir).parent.glob("journal.db*"):
        path.unlink()


def merged_twice(
    data_dir: Path,
    backup: Path,
    once: Callable[[Path], object] = run_once,
    put_back: Callable[[Path, Path], list[str]] = restore,
) -> tuple[list[str], Counter[RowKey]]:
    """Twelve files merged into one output, that output merged again with twelve more; then
    the backup of the first twelve, taken before any merge, restored. The restored parquet
    files' names, and the rows before the restore."""
    generate(data_dir, small_spec(rotations=12))
    shutil.copytree(data_dir / POD, backup)
    once(data_dir)
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 11)]
    generate(data_dir, small_spec(rotations=12, start=PAST + timedelta(seconds=90 * 12)))
    once(data_dir)
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 23)]
    expected = expected_rows(data_dir)
    restored = put_back(backup, data_dir / POD)
    return [name for name in restored if name.endswith(".parquet")], expected


@pytest.mark.parametrize(
    ("put_back", "journal_lost"),
    [(restore, False), (restore_to_the_second, False), (restore, True)],
    ids=["cp-a", "mtimes-to-the-second", "journal-lost"],
)
def test_files_restored_after_their_output_was_merged_again_are_proven_and_removed(
    data_dir: Path,
    tmp_path: Path,
    put_back: Callable[[Path, Path], list[str]],
    journal_lost: bool,
) -> None:
    """The output lists them as ancestors with their footers, which a restore keeps: none of
    these restores could the journal recognise, besides `cp -a` with it intact."""
    restored, expected = merged_twice(data_dir, tmp_path / "backup", put_back=put_back)
    assert len(restored) == 12
    if journal_lost:
        lose_journal(data_dir)
    output = consolidated_name(0, 23)
    assert status(data_dir)[0] == EXIT_NEEDS_PERSON  # the copies wait for their proof

    logs = run_once(data_dir)

    removed = [line for line in logs.splitlines() if "action=removed" in line]
    assert sorted(re.search(r"\bfile=(\S+)", line)[1] for line in removed) == restored
    assert all(f"output={output}" in line for line in removed)
    assert "event=file-held" not in logs
    assert [p.name for p in data_files(data_dir)] == [output]
    assert sorted(p.name for p in (data_dir / POD).iterdir() if p.suffix == ".containers") == [
        f"{Path(output).stem}.containers"
    ]
    assert status(data_dir)[0] == 0
    assert check(data_dir, expected, journal_lost=journal_lost).violations == []


def test_files_restored_after_an_output_without_ancestors_was_merged_again_are_held_and_named(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs written before ancestors were recorded list only the output they merged: the
    journal's account of the merges holds the restored files for a person."""
    monkeypatch.setattr(merge, "ancestors_of", lambda plan: [])
    restored, expected = merged_twice(data_dir, tmp_path / "backup", once=invoke_once)
    assert len(restored) == 12
    output = consolidated_name(0, 23)
    assert lineage.read(data_dir / POD / output).ancestors == ()

    dry = run_cli("run", "--dry-run", "--min-age", "0", "--data-dir", str(data_dir))
    logs = run_once(data_dir)

    # nothing merged: the output and the restored files are as they were
    assert [p.name for p in data_files(data_dir)] == sorted([output, *restored])
    held = [line for line in logs.splitlines() if "event=file-held" in line]
    assert len(held) == len(restored)
    assert all(f"by the journal its rows are in {output}" in line for line in held)
    assert sum("kind=held" in line for line in dry.stdout.splitlines()) == len(restored)
    code, said = status(data_dir)
    assert code == EXIT_NEEDS_PERSON
    assert all(f"{data_dir / POD / name}: merge 1 merged it" in said for name in restored)

    # what the person does: remove them (and their companions), after which all is well
    for name in restored:
        (data_dir / POD / name).unlink()
        (data_dir / POD / name).with_suffix(".containers").unlink(missing_ok=True)
    assert status(data_dir)[0] == 0
    run_once(data_dir)
    assert [p.name for p in data_files(data_dir)] == [output]
    assert check(data_dir, expected).violations == []


def test_restored_files_whose_rows_no_output_here_holds_are_merged(
    data_dir: Path, tmp_path: Path
) -> None:
    """The output that took their rows is gone (removed by hand): the restored files may
    hold the only copy of their rows, so they are merged as any file is."""
    merged_twice(data_dir, tmp_path / "backup")
    (data_dir / POD / consolidated_name(0, 23)).unlink()
    (data_dir / POD / consolidated_name(0, 23)).with_suffix(".containers").unlink()
    expected = expected_rows(data_dir)

    logs = run_once(data_dir)

    assert "event=file-held" not in logs
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 11)]
    report = OracleReport()  # rows only: the journal's finished merge 2 lost its output by hand
    check_rows(read_live(data_dir, report, set()), expected, report)
    assert report.violations == []


@pytest.mark.parametrize("journal_lost", [False, True], ids=["journal", "journal-lost"])
def test_an_output_and_files_restored_two_merges_later_are_proven_and_removed(
    data_dir: Path, tmp_path: Path, journal_lost: bool
) -> None:
    """A backup taken between merges holds an output and new files beside it; restored once
    both went into an output that was merged again in turn: its ancestors are listed at
    every depth."""
    generate(data_dir, small_spec(rotations=12))
    run_once(data_dir)
    generate(data_dir, small_spec(rotations=12, start=PAST + timedelta(seconds=90 * 12)))
    backup = tmp_path / "backup"
    shutil.copytree(data_dir / POD, backup)
    run_once(data_dir)
    generate(data_dir, small_spec(rotations=12, start=PAST + timedelta(seconds=90 * 24)))
    run_once(data_dir)
    output = consolidated_name(0, 35)
    assert [p.name for p in data_files(data_dir)] == [output]
    expected = expected_rows(data_dir)
    restored = [n for n in restore(backup, data_dir / POD) if n.endswith(".parquet")]
    assert consolidated_name(0, 11) in restored and len(restored) == 13
    if journal_lost:
        lose_journal(data_dir)

    logs = run_once(data_dir)

    assert logs.count("action=removed") == len(restored)
    assert [p.name for p in data_files(data_dir)] == [output]
    assert status(data_dir)[0] == 0
    assert check(data_dir, expected, journal_lost=journal_lost).violations == []


@pytest.mark.parametrize("taken", [(1, 3), (0, 2, 3)], ids=["outputs", "every-generation"])
def test_backups_of_several_generations_restored_at_once_are_proven_and_removed(
    data_dir: Path, tmp_path: Path, taken: tuple[int, ...]
) -> None:
    """Backups taken as a window was merged three times (rsync without `--delete` keeps them
    all): a restored output and the files it lists are copies of the same rows. Proven
    together against the last output, the first took the rows and the others were found to
    differ, and each file was claimed by two outputs, for a person: 3,240 rows twice for good
    (a review of ancestors, helper-49). Each is proven against the nearest output holding it."""
    folder = data_dir / POD
    backups = [tmp_path / f"backup-{n}" for n in range(4)]
    generate(data_dir, small_spec(rotations=12))
    shutil.copytree(folder, backups[0])  # the first twelve files
    run_once(data_dir)
    shutil.copytree(folder, backups[1])  # their output
    generate(data_dir, small_spec(rotations=12, start=PAST + timedelta(seconds=90 * 12)))
    shutil.copytree(folder, backups[2])  # that output and twelve new files
    run_once(data_dir)
    shutil.copytree(folder, backups[3])  # their output
    generate(data_dir, small_spec(rotations=12, start=PAST + timedelta(seconds=90 * 24)))
    run_once(data_dir)
    output = consolidated_name(0, 35)
    expected = expected_rows(data_dir)
    restored = {n for i in taken for n in restore(backups[i], folder) if n.endswith(".parquet")}
    assert {consolidated_name(0, 11), consolidated_name(0, 23)} <= restored

    logs = run_once(data_dir)

    assert logs.count("action=removed") == len(restored)
    assert "action=kept" not in logs
    assert [p.name for p in data_files(data_dir)] == [output]
    assert status(data_dir)[0] == 0
    assert check(data_dir, expected).violations == []


@pytest.mark.parametrize("journal_lost", [False, True], ids=["journal", "journal-lost"])
def test_a_restored_output_that_sorts_after_its_holder_is_settled_first(
    data_dir: Path, tmp_path: Path, journal_lost: bool
) -> None:
    """Files stamped earlier than an output's first came late and were merged with it: the
    new output's name sorts before the old one's. Restored with its files, the old output must
    give them up before its holder removes it."""
    folder = data_dir / POD
    generate(data_dir, small_spec(rotations=12, start=PAST + timedelta(seconds=90 * 10)))
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)  # the files
    run_once(data_dir)
    restore(folder, backup)  # and their output
    generate(data_dir, small_spec(rotations=10, seed=5))  # earlier stamps, late
    run_once(data_dir)
    output = consolidated_name(0, 21)
    assert [p.name for p in data_files(data_dir)] == [output]
    expected = expected_rows(data_dir)
    restored = [n for n in restore(backup, folder) if n.endswith(".parquet")]
    assert output < consolidated_name(10, 21) in restored and len(restored) == 13
    if journal_lost:
        lose_journal(data_dir)

    logs = run_once(data_dir)

    assert logs.count("action=removed") == len(restored), logs
    assert "lineage-check-failed" not in logs and "action=kept" not in logs
    assert [p.name for p in data_files(data_dir)] == [output]
    assert status(data_dir)[0] == 0
    assert check(data_dir, expected, journal_lost=journal_lost).violations == []


def test_outputs_sharing_sources_do_not_keep_an_inner_output_from_being_settled_first() -> None:
    """An overlap's verdict names the other output as its file; taken for a file to remove, two
    outputs sharing a source blocked each other, and everything was settled by name, the
    holder of a restored output before it (helper-50)."""
    before = FileIdentity(1, 2, 3)
    shared = "X and Y list the same sources"
    by_output = {
        "O": [LineageVerdict("O", "X", None, before)],
        "X": [LineageVerdict("X", "s", None, before), LineageVerdict("X", "Y", shared, None)],
        "Y": [LineageVerdict("Y", "X", shared, None)],
    }
    order = recovery._inner_first(by_output)
    assert sorted(order) == ["O", "X", "Y"] and order.index("X") < order.index("O")


def test_a_restored_file_is_proven_by_the_rows_listed_under_its_own_footer(
    data_dir: Path, tmp_path: Path
) -> None:
    """After the clock stepped back two files of one name, with other rows, came into an
    output through two outputs merged again: its ancestors list the name twice. The restored
    second one was held for good, its rows counted against the first entry's (helper-49)."""
    folder = data_dir / POD
    generate(data_dir, small_spec(rotations=3))
    run_once(data_dir)
    stepped_back = small_spec(rotations=4, start=PAST + timedelta(seconds=90), seed=7)
    again = replace(stepped_back, containers=3)  # 135 rows a file, not 90
    generate(data_dir, again, only=range(0, 1))  # the name of rotation 1 again
    generate(data_dir, again, only=range(2, 4))
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy2(folder / metrics_name(1), backup / metrics_name(1))
    for _ in range(4):
        run_once(data_dir)
    [output] = [p.name for p in data_files(data_dir)]
    held = lineage.read(folder / output)
    assert held is not None
    assert sorted(a.rows for a in held.ancestors if a.name == metrics_name(1)) == [90, 135]
    expected = expected_rows(data_dir)
    restore(backup, folder)

    logs = run_once(data_dir)

    assert logs.count("action=removed") == 1, logs
    assert [p.name for p in data_files(data_dir)] == [output]
    assert status(data_dir)[0] == 0
    assert check(data_dir, expected).violations == []


@pytest.mark.parametrize("generations", [1, 2])
def test_an_older_journal_names_the_output_its_merge_was_merged_into(
    data_dir: Path, tmp_path: Path, generations: int
) -> None:
    """A copy of the journal taken while merge 1 was unfinished, restored after its output was
    merged again (or that output in turn: the last lists it as an ancestor): recovery found
    the output missing and its sources gone, and called their rows lost; the README's recipe,
    restoring the output from a backup, would have kept them twice. The merge still waits for
    a person (a journal begun again looks the same, and then the rows may be lost), but the
    reason names the output that lists it."""
    generate(data_dir, small_spec(rotations=12))
    killed = run_cli(*ONCE, "--data-dir", str(data_dir), env={"FGM_CRASH_AT": "journal:renamed"})
    assert killed.returncode == -9
    state = default_journal_path(data_dir).parent
    older = tmp_path / "journal-copy"
    older.mkdir()
    for path in state.glob("journal.db*"):
        shutil.copy2(path, older / path.name)
    run_once(data_dir)  # finishes merge 1
    for generation in range(1, generations + 1):  # its output merged again, and that one's
        start = PAST + timedelta(seconds=90 * 12 * generation)
        generate(data_dir, small_spec(rotations=12, start=start))
        run_once(data_dir)
    last = consolidated_name(0, 12 * (generations + 1) - 1)
    assert [p.name for p in data_files(data_dir)] == [last]
    for path in state.glob("journal.db*"):
        path.unlink()
    for path in older.iterdir():
        shutil.copy2(path, state / path.name)

    recovered = run_cli("recover", "--data-dir", str(data_dir))

    assert recovered.returncode == EXIT_NEEDS_PERSON
    said = f"is missing, and {last} lists an output of its name and rows"
    assert said in recovered.stdout
    code, shown = status(data_dir)
    # the older journal's pass died with its process, and no service started since: that
    # comes first (exit 5), the merge waiting for a person after it
    assert code == EXIT_NEVER_RAN and "1 merge(s) need a person" in shown


def test_a_new_file_under_a_deleted_name_of_the_same_size_and_rows_is_not_held(
    data_dir: Path, tmp_path: Path
) -> None:
    """After the clock steps back, the monitor writes a file under the name of one merged two
    outputs ago, and for a steady pod with the same rows and, now and then, the same size
    (a review found such a pair within 60 seeds). Name, size and rows made it the deleted
    file: held for good, and `status` told a person to delete rows held nowhere else. It
    differs in its mtime, which a restore keeps."""
    restored, _ = merged_twice(data_dir, tmp_path / "backup")
    for name in restored:  # the restore undone
        (data_dir / POD / name).unlink()
        (data_dir / POD / name).with_suffix(".containers").unlink()
    elsewhere = tmp_path / "stepped-back"
    generate(elsewhere, small_spec(rotations=2, seed=35))
    new = sorted((elsewhere / POD).glob("metrics-*.parquet"))
    old = tmp_path / "backup" / new[0].name
    same = [(p.stat().st_size, pq.read_metadata(p).num_rows) for p in (new[0], old)]
    assert same[0] == same[1], "seed 35 no longer writes a file of that size: find another"
    for path in new:  # written now, as the monitor writes them
        shutil.copyfile(path, data_dir / POD / path.name)
    expected = expected_rows(data_dir)

    logs = run_once(data_dir)

    assert "event=file-held" not in logs
    assert status(data_dir)[0] == 0
    report = OracleReport()
    check_rows(read_live(data_dir, report, set()), expected, report)
    assert report.violations == []


def test_a_lost_output_under_a_reused_name_is_not_taken_for_one_merged_again(
    data_dir: Path, tmp_path: Path
) -> None:
    """With the journal intact: an output X merged into Y; the clock steps back, new files
    are merged under X's name again, killed after their deletes, and that output is lost. Y's
    lineage lists the old X with the same rows: recovery took it for this merge's output,
    journaled the merge finished and said nothing of 990 lost rows (a review of the change
    that finishes merges an older journal forgot)."""
    generate(data_dir, small_spec(rotations=12))
    first = sorted((data_dir / POD).glob("metrics-*.parquet"))[0]
    written = first.stat().st_mtime
    os.utime(first)  # young at the first pass, so that X starts at the second file
    run_once(data_dir, "--min-age", "300")
    os.utime(first, (written, written))
    output = consolidated_name(1, 11)
    assert [p.name for p in data_files(data_dir)] == [output, first.name]
    generate(data_dir, small_spec(rotations=12, start=PAST + timedelta(seconds=90 * 12)))
    run_once(data_dir)
    assert [p.name for p in data_files(data_dir)] == [consolidated_name(0, 23)]
    # the clock steps back: new files under X's sources' names, merged under X's name again
    generate(data_dir, small_spec(rotations=11, start=PAST + timedelta(seconds=90), seed=7))
    dry, count = tmp_path / "dry", tmp_path / "points"
    shutil.copytree(data_dir, dry)
    run_once(dry, env={crashpoints.COUNT_ENV_VAR: str(count)})
    points = crashpoints.occurrences(crashpoints.read_reached(count))
    deleted = points.index("journal:sources-deleted#1")  # its folder synced just before
    assert points[deleted - 1].startswith("durable:fsync-dir")
    assert points[deleted - 2].startswith("durable:unlinked")
    after_deletes = {crashpoints.ENV_VAR: points[deleted - 1]}
    killed = run_cli(*ONCE, "--data-dir", str(data_dir), env=after_deletes)
    assert killed.returncode == -9
    for path in (data_dir / POD).glob(output.removesuffix(".parquet") + ".*"):
        path.unlink()  # lost: its rows are in no file now

    recovered = run_cli("recover", "--data-dir", str(data_dir))

    assert recovered.returncode == EXIT_NEEDS_PERSON, recovered.stdout
    assert f"output {output} is missing; sources not intact" in recovered.stdout
    assert status(data_dir)[0] == EXIT_NEEDS_PERSON
