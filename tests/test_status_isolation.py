"""`status` and `run --dry-run` look at every partition as a pass does, and like a pass they
keep an exception no check foresaw (a bug, an input nothing anticipated) to the partition it
came from: that partition is reported with the error and where it was raised, the others are
still reported. Raised further, one bad partition turned the probe and the preview into a
traceback naming no partition. A journal error still ends both: nothing can be judged without
the journal.

Injected in-process at the step, as test_unexpected does for a pass.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from conftest import invoke

from fgm_consolidator import plan, status
from fgm_consolidator.exit_codes import EXIT_NEEDS_PERSON
from fgm_consolidator.simulate import PodSpec, SimulationSummary

POD_A = "dt=2025-12-30/identifier=pod-a"
POD_B = "dt=2025-12-30/identifier=pod-b"
HERE = Path(__file__).name


@pytest.fixture
def served(data_dir: Path, populate: Callable[..., SimulationSummary]) -> Path:
    """A healthy service's record (one pass, before the monitor wrote anything), then two pods'
    files waiting for the next pass: `status` has nothing to say but their backlog."""
    first = invoke("run", "--once", "--data-dir", data_dir, "--log-level", "error")
    assert first.exit_code == 0, first.output
    populate(PodSpec("pod-a"), PodSpec("pod-b"))
    return data_dir


def fail_for_pod_a(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, exc: Exception) -> None:
    """`module.name` raises `exc` when its second argument (the partition) is pod-a's."""
    real = getattr(module, name)

    def fake(*args: Any, **kwargs: Any) -> Any:
        if args[1] == POD_A:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)


def lines_of(result: Result, kind: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(f"kind={kind} ")]


# Planning and scanning (`plan_one` scans through this name), and the footer-only lineage
# check `status` adds.
LOOKS = [
    pytest.param(plan, "scan_partition", KeyError("x"), "unexpected KeyError: 'x'", id="scan"),
    pytest.param(
        status, "judge_partition", TypeError("t"), "unexpected TypeError: t", id="lineage"
    ),
]


@pytest.mark.parametrize(("module", "name", "exc", "text"), LOOKS)
def test_status_reports_an_unexpected_error_in_one_partition_and_the_others(
    served: Path, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, exc: Exception, text: str
) -> None:
    fail_for_pod_a(monkeypatch, module, name, exc)

    result = invoke("status", "--data-dir", served)

    assert result.exit_code == EXIT_NEEDS_PERSON, result.output
    assert "Traceback" not in result.stderr and result.stderr == ""
    [failed, waiting] = lines_of(result, "partition")
    assert failed.startswith(f'kind=partition partition="{POD_A}" waiting=0 ')
    assert f'error="{text}" where="{HERE}:' in failed, failed
    assert waiting.startswith(f'kind=partition partition="{POD_B}" waiting=24 mergeable=24 ')
    [problem] = lines_of(result, "problem")
    assert f"exit_code={EXIT_NEEDS_PERSON} " in problem
    assert f"{served / POD_A}: {text}" in problem and f"raised at {HERE}:" in problem, problem
    assert "healthy=False" in lines_of(result, "status")[0]


def test_the_dry_run_reports_an_unexpected_error_in_one_partition_and_plans_the_others(
    data_dir: Path, populate: Callable[..., SimulationSummary], monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(PodSpec("pod-a"), PodSpec("pod-b"))
    fail_for_pod_a(monkeypatch, plan, "scan_partition", KeyError("x"))

    result = invoke("run", "--data-dir", data_dir, "--dry-run")

    assert result.exit_code == 1, result.output  # as `run --once` with a partition failed
    assert "Traceback" not in result.stderr
    [error] = lines_of(result, "error")
    assert error.startswith(
        f'kind=error partition="{POD_A}" error="unexpected KeyError: \'x\'" where="{HERE}:'
    ), error
    assert [line.split()[1] for line in lines_of(result, "plan")] == [f'partition="{POD_B}"']
    assert result.stdout.splitlines()[-1] == (
        "dry run: 1 merges of 24 files planned; 1 partition(s) could not be planned; "
        "nothing was changed"
    )


def test_the_dry_run_exits_1_on_a_foreseen_partition_error_too(
    data_dir: Path, populate: Callable[..., SimulationSummary], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It printed the error and exited 0, so a script could not tell the preview failed."""
    populate(PodSpec("pod-a"), PodSpec("pod-b"))
    fail_for_pod_a(monkeypatch, plan, "scan_partition", PermissionError(13, "Permission denied"))

    result = invoke("run", "--data-dir", data_dir, "--dry-run")

    assert result.exit_code == 1, result.output
    [error] = lines_of(result, "error")
    assert error == f'kind=error partition="{POD_A}" error="[Errno 13] Permission denied"'
    assert len(lines_of(result, "plan")) == 1


@pytest.mark.parametrize("command", [["status"], ["run", "--dry-run"]])
def test_a_journal_error_in_one_partition_still_ends_the_look(
    served: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """Not isolated like the others: `Error:` naming the journal, exit 1, pod-b not reported."""
    error = sqlite3.OperationalError("disk I/O error")
    fail_for_pod_a(monkeypatch, plan, "scan_partition", error)

    result = invoke(*command, "--data-dir", served)

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: {served / '.fgm-consolidator' / 'journal.db'}: ")
    assert "disk I/O error" in result.stderr
    assert POD_B not in result.stdout


def test_compute_status_raises_a_journal_error_in_one_partition(
    served: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_for_pod_a(monkeypatch, plan, "scan_partition", sqlite3.OperationalError("locked"))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        status.compute_status(served, served / ".fgm-consolidator" / "journal.db")
