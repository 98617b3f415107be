"""Every `Error:` message is one line naming its path and the true reason, and every folder
left alone is reported."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import run_as, run_cli, small_spec

from fgm_consolidator.layout import default_journal_path, lock_path
from fgm_consolidator.simulate import SimulationSummary, generate

P_A = "dt=2025-12-30/identifier=pod-a"
PAGE = 4096


def _corrupt_so_quick_check_spans_lines(journal: Path) -> None:
    """Overwrite the first page whose loss makes `PRAGMA quick_check` answer with a
    multi-line text ('*** in database main ***\\nPage N: ...') rather than fail to open."""
    sound = journal.read_bytes()
    trial = journal.with_name("trial.db")
    for page in range(1, len(sound) // PAGE):
        broken = sound[: page * PAGE] + b"\xff" * PAGE + sound[(page + 1) * PAGE :]
        trial.write_bytes(broken)
        try:
            conn = sqlite3.connect(trial)
            try:
                answer = conn.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            continue
        if "\n" in answer:
            journal.write_bytes(broken)
            trial.unlink()
            return
    raise AssertionError("no page found whose loss quick_check reports on several lines")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_corrupt_journal_is_reported_on_one_error_line(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """`Journal._check_integrity` put quick_check's answer into the message as it was, and
    SQLite's answer holds a newline: every command printed an `Error:` line and then an
    orphan `Page 7: btreeInitPage() returns error code 11); stop the consolidator...` line
    that names no journal, in the container's log."""
    populate()
    assert run_cli("run", "--data-dir", str(data_dir), "--once", "--min-age", "0").returncode == 0
    journal = default_journal_path(data_dir)
    for stale in journal.parent.glob("journal.db-*"):
        stale.unlink()
    _corrupt_so_quick_check_spans_lines(journal)
    saved = journal.read_bytes()
    for command in (("run", "--once"), ("recover",), ("history",), ("status",)):
        proc = run_cli(*command, "--data-dir", str(data_dir), timeout=60)
        assert proc.returncode == 1, (command, proc.stderr)
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, (command, lines)
        assert lines[0].startswith(f"Error: {journal}: journal is corrupt"), lines
    assert journal.read_bytes() == saved  # nothing was touched


def test_an_error_naming_a_path_with_a_newline_is_one_line(tmp_path: Path) -> None:
    """A data directory whose name holds a newline (valid on Linux): the lock refusal, and
    every `Error:` made by `cli._fail` from an exception's text, broke into two lines. The
    logs escape the same path (`data_dir="a\\nb"`), and so does click for its own errors
    (`Directory 'a\\nb/x' does not exist.`); `_fail` printed `str(exc)` as it was."""
    data_dir = tmp_path / "da\nta"
    generate(data_dir, small_spec())
    lock = lock_path(data_dir)
    lock.parent.mkdir(exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another instance holds the lock
        proc = run_cli("run", "--once", "--data-dir", str(data_dir), timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert "another fgm-consolidator holds this data directory" in proc.stderr
    assert len(lines) == 1, lines


def test_a_partition_folder_whose_name_is_not_utf8_is_reported_not_silently_ignored(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """`layout.walk_partitions` dropped an `identifier=` folder whose name is not UTF-8 without
    a word (`partition_day` returns None, the same `continue` as for a folder not shaped
    like a partition): `run` never consolidates its files, logs nothing, and `status` lists
    nothing and says healthy. A symbolic link in the same place is reported
    (`partition-skipped`, `kind=skipped`); a data directory whose name is not UTF-8 is
    refused with a message. This one was invisible."""
    populate()
    day = os.fsencode(data_dir / "dt=2025-12-30")
    os.rename(os.path.join(day, b"identifier=pod-a"), os.path.join(day, b"identifier=pod\xff-a"))
    ran = run_cli("run", "--data-dir", str(data_dir), "--once", "--min-age", "0")
    assert ran.returncode == 0, ran.stderr
    assert "event=partition-skipped" in ran.stderr, ran.stderr
    assert "pod\\udcff-a" in ran.stderr or "pod\\xff-a" in ran.stderr, ran.stderr
    status = run_cli("status", "--data-dir", str(data_dir), "--json", timeout=60)
    kinds = [json.loads(line)["kind"] for line in status.stdout.splitlines()]
    assert "skipped" in kinds, status.stdout


def test_a_journal_we_may_not_read_is_not_called_corrupt(
    data_dir: Path, populate: Callable[..., SimulationSummary], unprivileged: list[str]
) -> None:
    """A sound journal whose mode forbids reading it (chmod, another UID's file): `status`
    and `history` said `cannot open journal (unable to open database file)` and advise to
    "stop the consolidator, move the journal aside ... and run `fgm-consolidator recover`",
    the hint for a corrupt journal (`journal.explained` maps SQLITE_CANTOPEN to REPAIR_HINT).
    The reason (permission denied) is not given, and following the advice throws away a
    sound audit trail and forces a lineage recovery, which `explained` itself means to avoid
    for a journal that is only locked or on a full volume. `run` checks the same mode up
    front and says `... must be readable and writable` (exit 2)."""
    populate()
    assert run_cli("run", "--data-dir", str(data_dir), "--once", "--min-age", "0").returncode == 0
    journal = default_journal_path(data_dir)
    journal.chmod(0o000)
    try:
        for command in ("status", "history"):
            proc = run_as(unprivileged, command, "--data-dir", str(data_dir))
            assert proc.returncode == 1, proc.stderr
            assert str(journal) in proc.stderr or "journal.db" in proc.stderr, proc.stderr
            assert "move the journal aside" not in proc.stderr, proc.stderr
            assert "ermission" in proc.stderr, proc.stderr  # the reason, as the OS says it
    finally:
        journal.chmod(0o644)


def test_demo_into_a_folder_it_cannot_create_is_one_error_line(tmp_path: Path) -> None:
    """`demo --data-dir <a file>/sub` (or a read-only place): `cli.demo` calls
    `data_dir.mkdir(...)` outside any `try`, so the OSError came out as a 30-line Python
    traceback ending in `NotADirectoryError: [Errno 20] Not a directory: '.../sub'`; every
    other command turns an OSError into one `Error:` line naming the path (exit 1)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "sub"
    proc = run_cli("demo", "--data-dir", str(target), "--hours", "0.5", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(target) in lines[0], lines


def test_demo_into_a_full_standard_output_is_one_error_line(tmp_path: Path) -> None:
    """`demo > /dev/full` ended in an OSError traceback: the demo printed with `click.echo`,
    where every other command's output goes through `cli._print`."""
    target = tmp_path / "demo"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "fgm_consolidator", "demo", "--data-dir", str(target),
             "--hours", "0.5"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert error_lines(proc.stderr) == [
        "Error: cannot write to standard output: No space left on device"
    ]


def test_the_error_that_ends_run_is_a_json_log_event_too(
    data_dir: Path, populate: Callable[..., SimulationSummary]
) -> None:
    """With `--log-format json` the plain `Error:` line was the only word of why the sidecar
    died (here a second instance, refused by the lock): a collector parsing JSON lines dropped
    it. Found by an operability review."""
    populate()
    lock = lock_path(data_dir)
    lock.parent.mkdir(exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another instance holds the lock
        proc = run_cli("run", "--once", "--data-dir", str(data_dir), "--log-format", "json")
    finally:
        os.close(fd)
    assert proc.returncode == 1, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    [stopped] = [e for e in events if e["event"] == "stopped"]
    assert (stopped["level"], stopped["reason"]) == ("error", "error")
    assert "another fgm-consolidator holds this data directory" in stopped["error"]
    [error] = [line for line in error_lines(proc.stderr) if not line.startswith("{")]
    assert error.startswith("Error: ")


def test_a_journal_side_file_we_may_not_read_is_named_and_not_called_corrupt(
    data_dir: Path, populate: Callable[..., SimulationSummary], unprivileged: list[str]
) -> None:
    """A sound journal whose `-wal` file another user owns (a restore, a shell as another
    user): only the journal itself was tried, so the refusal read `cannot open journal
    (unable to open database file)` with the advice to move the journal aside. Found by a
    bad-input review (helper-44)."""
    populate()
    assert run_cli("run", "--data-dir", str(data_dir), "--once", "--min-age", "0").returncode == 0
    journal = default_journal_path(data_dir)
    wal = journal.with_name(journal.name + "-wal")
    wal.touch()
    wal.chmod(0o000)
    try:
        for command in ("status", "history"):
            proc = run_as(unprivileged, command, "--data-dir", str(data_dir))
            assert proc.returncode == 1, proc.stderr
            assert f"{wal}: Permission denied" in proc.stderr, proc.stderr
            assert "move the journal aside" not in proc.stderr, proc.stderr
    finally:
        wal.chmod(0o644)
