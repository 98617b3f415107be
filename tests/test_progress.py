"""`run --once` and `recover` draw click's progress bar on a terminal and log plain
`progress` events anywhere else. The terminal is a real pseudo-terminal (os.openpty) on the
process's stderr; the other case is the pipe every other test uses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MIN_AGE_WARNING, run_cli, small_spec
from test_cli import parse_kv
from test_service import DEADLINE_S, Service

from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path, iter_partitions
from fgm_consolidator.plan import Policy, plan_one
from fgm_consolidator.simulate import PodSpec, generate

PODS = ("pod-a", "pod-b", "pod-c")
PARTITIONS = [f"dt=2025-12-30/identifier={pod}" for pod in PODS]
LOG_LINE = re.compile(r"ts=[^\r\n]*")


def on_terminal(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """The command with stderr on a pseudo-terminal and stdout in a file: the exit code, the
    stdout text and everything the terminal received."""
    master, slave = os.openpty()
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fgm_consolidator", *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=slave,
            env={**os.environ, "FGM_CRASH_AT": ""},
        )
        os.close(slave)
        received = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal's last writer
                break
            if not chunk:
                break
            received += chunk
        os.close(master)
        code = proc.wait(timeout=timeout)
        stdout.seek(0)
        return code, stdout.read(), received.decode()


def three_partitions(data_dir: Path) -> None:
    generate(data_dir, small_spec(tuple(PodSpec(p) for p in PODS)))


def three_interrupted_merges(data_dir: Path) -> list[int]:
    """Merges journaled as planned and never started, as a kill right after planning leaves
    them: recovery rolls each back."""
    three_partitions(data_dir)
    journal = Journal.open(default_journal_path(data_dir))
    ids = []
    try:
        policy = Policy(min_age_s=0)
        for partition in iter_partitions(data_dir):
            _scan, plans, _skipped = plan_one(data_dir, partition, policy, journal, time.time())
            for plan in plans:
                ids.append(
                    journal.record_planned(
                        partition=plan.partition,
                        output=plan.output,
                        era=plan.era,
                        policy=policy.as_dict(),
                        sources=[s.record() for s in plan.sources],
                        has_companion=True,
                    )
                )
    finally:
        journal.close()
    assert len(ids) == 3
    return ids


def log_lines(terminal: str) -> list[dict[str, str]]:
    """Every log line the terminal showed; a line torn by the bar would not parse."""
    return [parse_kv(line) for line in LOG_LINE.findall(terminal)]


# -- run --once -----------------------------------------------------------------------------


def test_run_once_on_a_terminal_draws_a_bar_and_keeps_log_lines_whole(data_dir: Path) -> None:
    three_partitions(data_dir)
    code, stdout, terminal = on_terminal("run", "--once", "--data-dir", str(data_dir),
                                         "--min-age", "0")  # fmt: skip
    assert (code, stdout) == (0, ""), terminal
    assert "consolidating  [" in terminal
    assert "\r" in terminal
    for done in range(4):
        assert f"  {done}/3" in terminal
    assert re.search(rf"\[#+\]  3/3  {PARTITIONS[-1]}", terminal)  # full at the end
    events = log_lines(terminal)
    assert [e["event"] for e in events] == [MIN_AGE_WARNING, "started"] + ["merge-finished"] * 3 + [
        "pass-finished",
        "stopped",
    ]
    assert [e["partition"] for e in events[2:5]] == PARTITIONS


def test_run_once_in_a_pipe_logs_plain_progress_lines(data_dir: Path) -> None:
    three_partitions(data_dir)
    result = run_cli("run", "--once", "--data-dir", str(data_dir), "--min-age", "0")
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert "\r" not in result.stderr and "\033" not in result.stderr
    events = [parse_kv(line) for line in result.stderr.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert [(e["task"], e["done"], e["total"], e["partition"]) for e in progress] == [
        ("consolidate", str(n), "3", p) for n, p in enumerate(PARTITIONS, start=1)
    ]
    # each partition's progress line follows its merge
    order = [e["event"] for e in events]
    assert order == [MIN_AGE_WARNING, "started"] + ["merge-finished", "progress"] * 3 + [
        "pass-finished",
        "stopped",
    ]


def test_the_long_running_service_shows_no_progress(data_dir: Path) -> None:
    """Only `--once` shows progress: a sidecar's log has no use for it."""
    three_partitions(data_dir)
    service = Service(data_dir, "--check-interval", "300")
    try:
        service.wait_for("pass-finished")
        code, _took = service.terminate(timeout=DEADLINE_S)
    finally:
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait(timeout=DEADLINE_S)
    assert code == 0
    assert [e["event"] for e in service.events].count("merge-finished") == 3
    assert "progress" not in [e["event"] for e in service.events]


# -- recover --------------------------------------------------------------------------------


def test_recover_on_a_terminal_draws_a_bar(data_dir: Path) -> None:
    ids = three_interrupted_merges(data_dir)
    code, stdout, terminal = on_terminal("recover", "--data-dir", str(data_dir), "--json")
    assert code == 0, terminal
    assert "recovering  [" in terminal
    assert re.search(rf"\[#+\]  3/3  merge {ids[-1]} rolled-back", terminal)
    assert log_lines(terminal) == []  # nothing else to say at info
    report = [json.loads(line) for line in stdout.splitlines()]
    assert [r["merge_id"] for r in report if r["kind"] == "recovery"] == ids
    assert report[-1]["kind"] == "summary"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_recover_in_a_pipe_logs_one_progress_line_per_merge(data_dir: Path, fmt: str) -> None:
    ids = three_interrupted_merges(data_dir)
    result = run_cli("recover", "--data-dir", str(data_dir), "--log-format", fmt)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    parse: Any = json.loads if fmt == "json" else parse_kv
    events = [parse(line) for line in result.stderr.splitlines()]
    assert [
        (e["event"], e["task"], str(e["done"]), str(e["total"]), str(e["merge_id"]),
         e["partition"], e["result"])
        for e in events
    ] == [
        ("progress", "recover", str(n), "3", str(i), p, "rolled-back")
        for n, (i, p) in enumerate(zip(ids, PARTITIONS, strict=True), start=1)
    ]  # fmt: skip
    assert all(e["output"].startswith("consolidated-") for e in events)
