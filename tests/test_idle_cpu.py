"""Between passes the sidecar sleeps on an event: no polling, no CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_idle_between_passes_uses_no_cpu(data_dir: Path, populate) -> None:  # type: ignore[no-untyped-def]
    populate(rotations=12)
    process = subprocess.Popen(
        [sys.executable, "-m", "fgm_consolidator", "run", "--data-dir", str(data_dir),
         "--min-age", "0", "--check-interval", "3600"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:  # blocks until the first pass is over
            if "event=pass-finished" in line:
                break
        else:
            pytest.fail(f"no pass-finished line; exit code {process.wait()}")
        before = cpu_seconds(process.pid)
        time.sleep(2.0)  # the measured idle window, not a synchronisation
        used = cpu_seconds(process.pid) - before
        assert used <= 0.02, f"{used:.3f} s of CPU in 2 s idle"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
