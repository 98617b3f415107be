"""The bounded version of `scripts/torture.py`: thirty kill -9s of a running consolidator while a
live monitor rotates files, then the oracle. The long runs (300 to 1,000 kills and more, on
each session's final code) are by hand; these keep the suite near ten minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLS = 30
sys.path.insert(0, str(ROOT / "scripts"))
import torture  # noqa: E402


def figures(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split())


def test_thirty_kills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """The monitor's clock also steps back now and then (10 s every 12 rotations), so new
    files take the names of files merged since (`tests/test_name_reuse.py`)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "torture.py"), "--kills", str(KILLS),
         "--seed", "20251230", "--max-delay", "1.0", "--work-dir", str(tmp_path / "work"),
         "--step-back-every", "12", "--step-back-s", "10"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    header, summary = result.stdout.splitlines()[:2]
    assert header.startswith("seed=20251230 ")
    shown = figures(summary)
    assert shown["kills"] == str(KILLS)
    assert shown["violations"] == "0"
    assert shown["unfinished"] == "0"
    assert int(shown["finished"]) > 0
    assert int(shown["rows_checked"]) == int(shown["rows_written"]) > 0
    assert int(shown["live_files"]) < int(shown["files_written"])  # it did consolidate
    assert int(shown["mid_run_checks"]) == KILLS // 10
    assert int(shown["names_reused"]) > 0
    assert not (tmp_path / "work").exists()  # removed when nothing was found


def test_kills_with_the_journal_lost_now_and_then_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    """After every second kill that interrupts a merge the journal is deleted: each start must
    settle what the lost journal knew from the outputs' lineage (adopting proven outputs into
    the new journal) and sweep unknown temp files, and still no row is lost or kept twice.
    Kills land in a merge at random (1 to 5 of 24 here), so the run goes on until a journal
    was lost, 60 kills at most."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "torture.py"), "--kills", "60",
         "--seed", "20261128", "--max-delay", "1.0", "--lose-journal-every", "2",
         "--stop-after-journals-lost", "1", "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    shown = figures(result.stdout.splitlines()[1])
    assert shown["violations"] == "0"
    assert int(shown["journals_lost"]) == int(shown["kills_in_a_merge"]) // 2 == 1
    assert int(shown["rows_checked"]) == int(shown["rows_written"]) > 0
    assert shown["unfinished"] == "0"


def test_the_mid_run_check_tells_a_reused_name_in_progress_from_a_torn_file(
    tmp_path: Path,
) -> None:
    """Its snapshot of finished files is taken before it reads them, and a monitor whose clock
    stepped back may start a new file under a finished name meanwhile: a torn file is a
    violation only if that name was not opened again since (a run here once read 4 bytes there)."""
    monitor = torture.Monitor(tmp_path, pods=1, seed=1)
    path = tmp_path / "dt=2025-12-30" / "identifier=pod-a" / "metrics-20251230T080000Z.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1")
    monitor.writes[path] = 1
    monitor.finished.add(path)
    figures = torture.Figures(seed=1)
    torture.rows_now(tmp_path, monitor, figures)
    assert len(figures.violations) == 1
    assert figures.violations[0].startswith(f"kill 0: {path} unreadable: ")
    figures.violations.clear()
    stale = monitor.snapshot()
    monitor.writes[path] += 1  # the monitor opens the name again right after the snapshot
    monitor.snapshot = lambda: stale  # type: ignore[method-assign]
    torture.rows_now(tmp_path, monitor, figures)
    assert figures.violations == []
