"""A merge that kills its process at every try must not crash-loop the sidecar for good, nor
starve the partitions after it.

Out of memory on one input, or a crash in a decoder, kills the process with no chance to record
a failure; the next start plans the same merge first and dies the same way. Real processes
here: a crash point SIGKILLs the first merge of a run (pod-a's, the first partition) while it
writes, twice; the third start must hold pod-a back and merge pod-b, `status` must name pod-a,
and once the hold is over pod-a is merged too. No row is lost or kept twice on the way.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import invoke, rows_pyarrow, run_cli, small_spec

from fgm_consolidator import cli, recovery
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


def sources_of(tmp_path: Path) -> Path:
    """Where `journal_lost_beside_an_output` keeps a copy of the sources it puts back."""
    return tmp_path / "sources"


def journal_lost_beside_an_output(data_dir: Path, tmp_path: Path) -> tuple[Counter[Any], Path]:
    """pod-a merged, its sources put back and the journal lost: start-up must prove the output
    holds them before they go. The rows expected, and the folder."""
    generate(data_dir, small_spec((PodSpec("pod-a"),)))
    expected = rows_pyarrow(data_dir)
    folder = data_dir / POD_A
    shutil.copytree(folder, kept := sources_of(tmp_path))
    assert run_once(data_dir).returncode == 0
    for path in kept.iterdir():
        shutil.copy2(path, folder / path.name)
    for path in default_journal_path(data_dir).parent.glob("journal.db*"):
        path.unlink()
    return expected, folder


def _stop_signals_as_a_terminal_leaves_them() -> None:
    """A suite started in the background (`cmd &` in a script, `nohup`) passes SIGINT and
    SIGHUP on ignored, and the commands rightly keep them ignored then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def signalled_past(scratch: Path, point: str, signum: int, *command: str) -> subprocess.Popen[str]:
    """`command` run until it reaches `point`, then sent `signum` before it reaches another.

    The run writes each point it reaches to a FIFO (`FGM_CRASH_COUNT`) that this test reads.
    Once `point` is read, the FIFO is filled up, so the run's next point waits in its write
    until the signal has been sent; then the FIFO is drained until the run exits."""
    fifo = scratch / "points"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    read_end = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    ours = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # no EOF while the run opens and closes
    proc = subprocess.Popen(
        [sys.executable, "-m", "fgm_consolidator", *command],
        env={**os.environ, "FGM_CRASH_COUNT": str(fifo), "FGM_CRASH_AT": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_stop_signals_as_a_terminal_leaves_them,
    )
    seen, deadline = b"", time.monotonic() + 60
    while point.encode() + b"\n" not in seen:
        assert proc.poll() is None and time.monotonic() < deadline, f"{point} never reached"
        if select.select([read_end], [], [], 0.1)[0]:
            seen += os.read(read_end, 4096)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(ours, b"\0" * 4096)
    proc.send_signal(signum)
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not end after the signal"
        if select.select([read_end], [], [], 0.1)[0]:
            os.read(read_end, 65536)
    os.close(ours)
    os.close(read_end)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_to_recover_during_a_proof_stops_it_and_is_no_death(
    data_dir: Path, tmp_path: Path, signum: int
) -> None:
    """`recover` took no signal: the default action killed it inside the proof, so two Ctrl-Cs
    counted as two proofs that died with their process, and held the output for a person (the
    third `recover` exited 3). Now it stops between steps, exits 128 + the signal, as a shell
    reports a process its signal ended, and the next `recover` settles everything."""
    expected, folder = journal_lost_beside_an_output(data_dir, tmp_path)
    for _ in range(2):
        proc = signalled_past(
            tmp_path, "recovery:attempt-begun", signum, "recover", "--data-dir", str(data_dir)
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum, out + err
        assert "stopped=True" in out, out
        assert "event=stopped reason=signal" in err, err

    settled = run_cli("recover", "--data-dir", str(data_dir))

    assert settled.returncode == 0, settled.stdout + settled.stderr
    assert not any(folder.glob("metrics-*.parquet"))
    assert rows_pyarrow(data_dir) == expected


def test_a_signal_after_recover_finished_is_no_stop(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM that came after the last step asked whether to stop (the last unlinks are
    not interruptible) made `recover` print `stopped=True consistent=False` and exit 143 for
    work all done. Only a recovery that was cut short says so."""
    expected, folder = journal_lost_beside_an_output(data_dir, tmp_path)
    real = recovery.recover

    def then_a_signal(*args: Any, **kwargs: Any) -> recovery.RecoveryReport:
        report = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # taken by `recover`'s own handler
        return report

    monkeypatch.setattr(cli, "recover", then_a_signal)
    result = invoke("recover", "--data-dir", data_dir)

    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].endswith("consistent=True stopped=False")
    assert not any(folder.glob("metrics-*.parquet"))
    assert rows_pyarrow(data_dir) == expected


def test_a_lineage_proof_that_kills_its_process_twice_is_held_and_start_up_goes_on(
    data_dir: Path, tmp_path: Path
) -> None:
    """The journal is lost between an output's rename and its sources' deletes, so start-up
    must prove the output holds them, reading both; that proof kills its process (a crash
    point stands in for a decoder's crash or the OOM killer). Without the hold every start
    died there. The third start skips it, keeps the files and says why; `status` names the
    output; once the wait is over the proof runs again and removes the sources."""
    expected, folder = journal_lost_beside_an_output(data_dir, tmp_path)
    sources = sources_of(tmp_path)
    [output] = [p.name for p in folder.glob("consolidated-*.parquet")]
    after = a_proof_that_kills_its_process_twice(data_dir)
    kept_files = events(after.stderr, "lineage-recovery")
    assert kept_files and {e["action"] for e in kept_files} == {"kept"}
    assert all("died with the process 2 times in a row" in e["reason"] for e in kept_files)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [output, output.replace(".parquet", ".containers"), *(p.name for p in sources.iterdir())]
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
