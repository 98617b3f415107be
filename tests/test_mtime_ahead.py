"""Files whose mtime lies ahead of the clock.

After the node's clock steps back (NTP correcting a clock that ran ahead, a VM resumed or
migrated, an RTC that was ahead at boot), the files the monitor finished before the step have
mtimes in the future. `scan.scan_partition` counted a file as young while `now - mtime <
min_age`, which is true for as long as the mtime is ahead, whatever `--min-age` is (even 0):
those files are held out of every merge until the wall clock catches up (a year, for an RTC a
year ahead), they are barriers in their partition, their day never counts as over (young > 0),
and `status` reports nothing (waiting=0, healthy). Now a file that has stayed unchanged for a
rotation and `--min-age` as the service itself sees it is eligible, so a day whose files are
all complete converges (`test_bad_input` has the pass before and after).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fgm_consolidator import scan


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
    rotation = scan.MONITOR_ROTATION_S  # its writer's clock may be ahead: a rotation first
    assert scan._age(path, path.stat(), now) == -rotation
    clock[0] += rotation + 42.0
    assert scan._age(path, path.stat(), now) == 42.0
    path.write_bytes(b"xy")  # another version: counted from now on
    os.utime(path, (now + 3600, now + 3600))
    assert scan._age(path, path.stat(), now) == -rotation
    os.utime(path, (now - 5, now - 5))  # the clock caught up: by its mtime again
    assert 4.9 < scan._age(path, path.stat(), now) < 5.1
