"""A merge that kills its process at every try must not crash-loop the sidecar for good, nor
starve the partitions after it.

Out of memory on one input, or a crash in a decoder, kills the process with no chance to record
a failure; the next start plans the same merge first and dies the same way. Real processes
here: a crash point SIGKILLs the first merge of a run (pod-a's, the first partition) while it
writes, twice; the third start must hold pod-a back and merge pod-b, `status` must name pod-a,
and once the hold is over pod-a is merged too. No row is lost or kept twice on the way.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import rows_pyarrow, run_cli, small_spec

from fgm_consolidator.backoff import MAX_WAIT_S, hold_for
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.simulate import PodSpec, generate

POD_A = "dt=2025-12-30/identifier=pod-a"
POD_B = "dt=2025-12-30/identifier=pod-b"
KILLED = -signal.SIGKILL
EXIT_NEEDS_PERSON = 3


def run_once(data_dir: Path, *options: str, crash: bool = False) -> Any:
    return run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0", "--min-files", "2",
        "--log-format", "json", *options,
        env={"FGM_CRASH_AT": "writer:row-group" if crash else ""},
    )  # fmt: skip


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == name]


def consolidated(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir()]
    return any(n.startswith("consolidated-") for n in names) and not any(
        n.startswith("metrics-") for n in names
    )


def test_a_merge_that_kills_its_process_twice_holds_its_partition_and_the_rest_go_on(
    data_dir: Path,
) -> None:
    generate(data_dir, small_spec((PodSpec("pod-a"), PodSpec("pod-b"))))
    expected = rows_pyarrow(data_dir)
    names_a = sorted(p.name for p in (data_dir / POD_A).iterdir())

    for attempt in (1, 2):
        died = run_once(data_dir, crash=True)
        assert died.returncode == KILLED, (attempt, died.stderr)
        assert not consolidated(data_dir / POD_B), "pod-a's merge is the first of a run"

    after = run_once(data_dir)
    assert after.returncode == 0, after.stderr
    [held] = events(after.stderr, "partition-held")
    assert (held["partition"], held["deaths"]) == (POD_A, 2)
    assert sorted(p.name for p in (data_dir / POD_A).iterdir()) == names_a
    assert consolidated(data_dir / POD_B)
    assert rows_pyarrow(data_dir) == expected

    status = run_cli("status", "--data-dir", str(data_dir))
    assert status.returncode == EXIT_NEEDS_PERSON, status.stdout + status.stderr
    assert f"{data_dir / POD_A}: its last 2 merges died with the process" in status.stdout
    assert " held=1 " in status.stdout
    liveness = run_cli("status", "--data-dir", str(data_dir), "--liveness")
    assert liveness.returncode == 0, liveness.stdout  # a restart cannot help with it

    # With a 0.2 s interval the hold (one interval after the latest death) ends at once.
    deadline = time.monotonic() + 60
    while not consolidated(data_dir / POD_A):
        assert time.monotonic() < deadline, "pod-a was never tried again"
        retried = run_once(data_dir, "--check-interval", "0.2")
        assert retried.returncode == 0, retried.stderr
    assert rows_pyarrow(data_dir) == expected
    settled = run_cli("status", "--data-dir", str(data_dir), "--check-interval", "300")
    assert settled.returncode == 0, settled.stdout  # a success ends the count of deaths


def test_one_death_costs_no_wait(data_dir: Path) -> None:
    """What a deploy's SIGKILL or a power cut leaves: the next start merges as usual."""
    generate(data_dir, small_spec((PodSpec("pod-a"),)))
    expected = rows_pyarrow(data_dir)
    assert run_once(data_dir, crash=True).returncode == KILLED
    after = run_once(data_dir)
    assert after.returncode == 0, after.stderr
    assert events(after.stderr, "partition-held") == []
    assert consolidated(data_dir / POD_A)
    assert rows_pyarrow(data_dir) == expected


def test_the_hold_doubles_with_each_death_up_to_the_cap_and_a_clock_set_back_ends_it() -> None:
    died = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert hold_for(1, died.isoformat(), 300) is None
    waits = [hold_for(n, died.isoformat(), 300) for n in (2, 3, 4, 12)]
    assert [(h.until - died).total_seconds() for h in waits if h] == [300, 600, 1200, MAX_WAIT_S]
    second = waits[0]
    assert second is not None
    assert second.active(died + timedelta(seconds=299))
    assert not second.active(died + timedelta(seconds=300))
    assert not second.active(died - timedelta(days=3))  # not a three-day wait


def a_proof_that_kills_its_process_twice(data_dir: Path) -> Any:
    """Two `recover`s killed as their proof begins, then a `run --once` whose proof would die
    too, which must get past it: its result."""
    in_the_proof = {"FGM_CRASH_AT": "recovery:attempt-begun"}
    for attempt in (1, 2):
        died = run_cli("recover", "--data-dir", str(data_dir), env=in_the_proof)
        assert died.returncode == KILLED, (attempt, died.stdout + died.stderr)
    after = run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0", "--log-format", "json",
        env=in_the_proof,
    )  # fmt: skip
    assert after.returncode == EXIT_NEEDS_PERSON, after.stderr  # held: kept for a person
    return after


def proven_once_the_wait_is_over(data_dir: Path, folder: Path) -> None:
    """Passes, a fifth of a second apart, until the held proof ran again and `folder` holds
    no source any more."""
    deadline = time.monotonic() + 60
    while any(folder.glob("metrics-*.parquet")):
        assert time.monotonic() < deadline, "the proof was never tried again"
        retried = run_once(data_dir, "--check-interval", "0.2")
        assert retried.returncode == 0, retried.stderr


def test_a_lineage_proof_that_kills_its_process_twice_is_held_and_start_up_goes_on(
    data_dir: Path, tmp_path: Path
) -> None:
    """The journal is lost between an output's rename and its sources' deletes, so start-up
    must prove the output holds them, reading both; that proof kills its process (a crash
    point stands in for a decoder's crash or the OOM killer). Without the hold every start
    died there. The third start skips it, keeps the files and says why; `status` names the
    output; once the wait is over the proof runs again and removes the sources."""
    generate(data_dir, small_spec((PodSpec("pod-a"),)))
    expected = rows_pyarrow(data_dir)
    folder = data_dir / POD_A
    shutil.copytree(folder, kept := tmp_path / "sources")
    assert run_once(data_dir).returncode == 0
    [output] = [p.name for p in folder.glob("consolidated-*.parquet")]
    for path in kept.iterdir():
        shutil.copy2(path, folder / path.name)
    for path in default_journal_path(data_dir).parent.glob("journal.db*"):
        path.unlink()
    after = a_proof_that_kills_its_process_twice(data_dir)
    kept_files = events(after.stderr, "lineage-recovery")
    assert kept_files and {e["action"] for e in kept_files} == {"kept"}
    assert all("died with the process 2 times in a row" in e["reason"] for e in kept_files)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [output, output.replace(".parquet", ".containers"), *(p.name for p in kept.iterdir())]
    )

    status = run_cli("status", "--data-dir", str(data_dir))
    assert status.returncode == EXIT_NEEDS_PERSON, status.stdout + status.stderr
    assert f"{folder / output}: lineage check: its proof died with the process" in status.stdout

    proven_once_the_wait_is_over(data_dir, folder)
    assert sorted(p.name for p in folder.glob("*.parquet")) == [output]
    assert rows_pyarrow(data_dir) == expected


def test_a_proof_of_copied_sources_that_kills_its_process_twice_is_held_and_the_rest_go_on(
    data_dir: Path, tmp_path: Path
) -> None:
    """A data directory copied (`cp -a`) while pod-a's merge was cut after its rename: every
    source has a new inode, so recovery proves by their rows that the output holds them. That
    proof kills its process (a crash point stands in for a decoder's crash or the OOM
    killer); without the hold every start died there and pod-b was never merged. From the
    second death the proof waits, the merge is left for a person meanwhile, pod-b is merged,
    and once the wait is over the proof runs again and finishes pod-a."""
    generate(data_dir, small_spec((PodSpec("pod-a"), PodSpec("pod-b"))))
    expected = rows_pyarrow(data_dir)
    cut = run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0",
        env={"FGM_CRASH_AT": "journal:renamed"},
    )  # fmt: skip
    assert cut.returncode == KILLED, cut.stderr
    copy = Path(shutil.copytree(data_dir, tmp_path / "copy", symlinks=True))
    a_proof_that_kills_its_process_twice(copy)
    assert consolidated(copy / POD_B)
    assert any(copy.joinpath(POD_A).glob("metrics-*.parquet"))
    status = run_cli("status", "--data-dir", str(copy))
    assert status.returncode == EXIT_NEEDS_PERSON, status.stdout + status.stderr
    assert "its proof died with the process 2 times in a row" in status.stdout

    proven_once_the_wait_is_over(copy, copy / POD_A)
    assert rows_pyarrow(copy) == expected
