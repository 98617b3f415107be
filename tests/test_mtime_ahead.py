"""Files whose mtime lies ahead of the clock.

After the node's clock steps back (NTP correcting a clock that ran ahead, a VM resumed or
migrated, an RTC that was ahead at boot), the files the monitor finished before the step have
mtimes in the future. `scan.scan_partition` counted a file as young while `now - mtime <
min_age`, which is true for as long as the mtime is ahead, whatever `--min-age` is (even 0):
those files are held out of every merge until the wall clock catches up (a year, for an RTC a
year ahead), they are barriers in their partition, their day never counts as over (young > 0),
and `status` reports nothing (waiting=0, healthy). Expected: a file that has stayed unchanged
for `--min-age` as the service itself sees it is eligible, so a day whose files are all
complete converges.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import rows_pyarrow, small_spec

from fgm_consolidator import scan
from fgm_consolidator.simulate import generate

PARTITION = "dt=2025-12-30/identifier=pod-a"
DEADLINE_S = 20.0


def test_files_with_a_future_mtime_are_merged_once_they_stay_unchanged(data_dir: Path) -> None:
    generate(data_dir, small_spec(rotations=6))
    folder = data_dir / PARTITION
    ahead = time.time() + 365 * 86400  # finished while the clock was a year ahead
    for path in folder.iterdir():
        os.utime(path, (ahead, ahead))
    expected = rows_pyarrow(data_dir)
    service = subprocess.Popen(
        [sys.executable, "-m", "fgm_consolidator", "run", "--data-dir", str(data_dir),
         "--min-age", "1", "--min-files", "2", "--check-interval", "0.3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and list(folder.glob("metrics-*.parquet")):
            time.sleep(0.2)  # polling a condition, with a deadline
        left = sorted(p.name for p in folder.glob("metrics-*.parquet"))
    finally:
        service.send_signal(signal.SIGTERM)
        service.communicate(timeout=30)
    assert rows_pyarrow(data_dir) == expected
    assert left == [], f"still unmerged after {DEADLINE_S:.0f} s with --min-age 1: {left}"


def test_an_mtime_ahead_counts_from_when_this_version_was_first_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics-20251230T080000Z.parquet"
    path.write_bytes(b"x")
    now = time.time()
    os.utime(path, (now + 3600, now + 3600))
    clock = [1000.0]
    monkeypatch.setattr(scan.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(scan, "_ahead", {})
    assert scan._age(path, path.stat(), now) == 0.0
    clock[0] += 42.0
    assert scan._age(path, path.stat(), now) == 42.0
    path.write_bytes(b"xy")  # another version: counted from now on
    os.utime(path, (now + 3600, now + 3600))
    assert scan._age(path, path.stat(), now) == 0.0
    os.utime(path, (now - 5, now - 5))  # the clock caught up: by its mtime again
    assert 4.9 < scan._age(path, path.stat(), now) < 5.1
