"""A bad configuration stops the command at start-up with one line naming the option, exit 2
like every click usage error, before anything is touched: no journal, no lock, no folder.

Every case runs the real command in a real process, as a container would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_as, run_cli, small_spec

from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.simulate import PodSpec, SimulationSummary, generate


def env_name(option: str) -> str:
    return "FGM_" + option.removeprefix("--").replace("-", "_").upper()


def usage_error(option: str, reason: str) -> str:
    return f"Error: Invalid value for '{option}' (env var: '{env_name(option)}'): {reason}"


def assert_refused(proc: subprocess.CompletedProcess[str], option: str, reason: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == usage_error(option, reason)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("command", "option", "value", "reason"),
    [
        ("run", "--check-interval", "nan", "must be a finite number (got nan)"),
        ("run", "--check-interval", "inf", "must be a finite number (got inf)"),
        ("run", "--check-interval", "0", "0.0 is not in the range x>0."),
        ("run", "--check-interval", "-5", "-5.0 is not in the range x>0."),
        ("run", "--min-files", "1", "1 is not in the range x>=2."),
        ("run", "--min-age", "-1", "-1.0 is not in the range x>=0."),
        ("run", "--min-age", "nan", "must be a finite number (got nan)"),
        ("run", "--grace-period", "inf", "must be a finite number (got inf)"),
        ("run", "--history-retention-days", "0", "0.0 is not in the range x>0."),
        ("run", "--history-retention-days", "nan", "must be a finite number (got nan)"),
        ("status", "--check-interval", "nan", "must be a finite number (got nan)"),
        ("status", "--check-interval", "0", "0.0 is not in the range x>0."),
        ("status", "--stale-after", "0.5", "0.5 is not in the range x>=1."),
        ("status", "--stale-after", "inf", "must be a finite number (got inf)"),
    ],
)
def test_a_bad_number_is_refused_before_anything_is_touched(
    data_dir: Path, tmp_path: Path, command: str, option: str, value: str, reason: str
) -> None:
    journal = tmp_path / "elsewhere" / "journal.db"
    args = [command, "--data-dir", str(data_dir), "--journal", str(journal), option, value]
    assert_refused(run_cli(*args), option, reason)
    assert os.listdir(data_dir) == []
    assert not journal.parent.exists()


def test_a_bad_number_from_the_environment_names_the_variable(data_dir: Path) -> None:
    proc = run_cli("run", env={"FGM_DATA_DIR": str(data_dir), "FGM_CHECK_INTERVAL": "inf"})
    assert_refused(proc, "--check-interval", "must be a finite number (got inf)")
    assert "FGM_CHECK_INTERVAL" in proc.stderr.splitlines()[-1]
    assert os.listdir(data_dir) == []


@pytest.fixture
def other_file_system(data_dir: Path) -> Iterator[Path]:
    """A folder name on a file system other than the data's (that does not exist yet)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(data_dir).st_dev:
        pytest.skip("no second file system (tmpfs /dev/shm) to put a journal on")
    folder = shm / f"fgm-test-{uuid.uuid4().hex}"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("command", ["run", "recover"])
def test_a_journal_on_another_file_system_is_refused(
    data_dir: Path, other_file_system: Path, command: str
) -> None:
    journal = other_file_system / "state" / "journal.db"
    proc = run_cli(command, "--data-dir", str(data_dir), "--journal", str(journal))
    theirs, ours = os.stat("/dev/shm").st_dev, os.stat(data_dir).st_dev
    assert_refused(
        proc,
        "--journal",
        f"{journal} is on another file system than --data-dir {data_dir} (device"
        f" {os.major(theirs)}:{os.minor(theirs)} vs {os.major(ours)}:{os.minor(ours)});"
        " the journal must live on the data volume to see the same crashes",
    )
    assert not other_file_system.exists()
    assert os.listdir(data_dir) == []


def test_a_journal_under_a_file_is_refused(data_dir: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    journal = afile / "journal.db"
    proc = run_cli("run", "--once", "--data-dir", str(data_dir), "--journal", str(journal))
    assert_refused(proc, "--journal", f"{afile} is not a directory, so {journal} cannot be")
    assert afile.read_text() == "not a folder"
    assert os.listdir(data_dir) == []


def test_a_journal_that_is_a_folder_is_refused(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "journal.db"
    folder.mkdir()
    proc = run_cli("recover", "--data-dir", str(data_dir), "--journal", str(folder))
    assert_refused(proc, "--journal", f"File '{folder}' is a directory.")
    assert os.listdir(folder) == [] and os.listdir(data_dir) == []


def test_the_default_journal_passes_the_check(data_dir: Path) -> None:
    proc = run_cli("run", "--once", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    assert default_journal_path(data_dir).exists()


# -- permissions: as a user whom file modes bind ----------------------------------------------


@pytest.fixture
def read_only(data_dir: Path) -> Iterator[Path]:
    data_dir.chmod(0o555)
    yield data_dir
    data_dir.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "recover"])
def test_a_data_dir_that_is_not_writable_is_refused(
    read_only: Path, unprivileged: list[str], command: str
) -> None:
    proc = run_as(unprivileged, command, "--data-dir", str(read_only))
    assert_refused(proc, "--data-dir", f"Directory '{read_only}' is not writable.")
    assert os.listdir(read_only) == []


def dry_run_with_mode(
    unprivileged: list[str], data_dir: Path, folder: Path, mode: int
) -> subprocess.CompletedProcess[str]:
    """`run --dry-run` as a user whom file modes bind, `folder` at `mode` meanwhile."""
    folder.chmod(mode)
    try:
        return run_as(
            unprivileged, "run", "--dry-run", "--data-dir", str(data_dir), "--min-age", "0"
        )
    finally:
        folder.chmod(0o755)


def test_a_dry_run_plans_a_data_dir_it_may_not_write(
    data_dir: Path, unprivileged: list[str]
) -> None:
    """`--dry-run` changes nothing, so it needs no write access: a snapshot or a volume
    mounted read-only can be planned. It was refused like a real run."""
    generate(data_dir, small_spec())
    before = sorted(p.name for p in data_dir.rglob("*"))
    proc = dry_run_with_mode(unprivileged, data_dir, data_dir, 0o555)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: 1 merges of 24 files planned; nothing was changed" in proc.stdout
    assert sorted(p.name for p in data_dir.rglob("*")) == before


def test_a_dry_run_names_a_day_folder_it_cannot_list_and_exits_1(
    data_dir: Path, unprivileged: list[str]
) -> None:
    """A `dt=` folder we may not list held partitions `run --dry-run` never saw: it planned
    the rest and exited 0 without a word, where an `identifier=` folder we may not read is a
    `kind=error` line and exit 1. Found by a bad-input review (helper-44)."""
    generate(data_dir, small_spec())
    [day] = data_dir.glob("dt=*")
    proc = dry_run_with_mode(unprivileged, data_dir, day, 0o000)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert f'kind=skipped path="{day}" reason="cannot be listed: Permission denied"' in lines
    assert lines[-1] == (
        "dry run: 0 merges of 0 files planned; 1 partition(s) could not be planned;"
        " nothing was changed"
    )


def test_status_reads_a_data_dir_it_may_not_write(read_only: Path, unprivileged: list[str]) -> None:
    proc = run_as(unprivileged, "status", "--data-dir", str(read_only))
    assert proc.returncode == 5, proc.stdout + proc.stderr  # never ran here, and says so
    assert os.listdir(read_only) == []


def test_a_journal_folder_that_is_not_writable_is_refused(
    data_dir: Path, tmp_path: Path, unprivileged: list[str]
) -> None:
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    journal = folder / "state" / "journal.db"
    try:
        proc = run_as(unprivileged, "run", "--data-dir", str(data_dir), "--journal", str(journal))
        assert_refused(proc, "--journal", f"{folder} must be writable to hold the journal")
        assert os.listdir(folder) == [] and os.listdir(data_dir) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("command", [["run", "--once"], ["recover"]], ids=["run", "recover"])
def test_a_data_dir_whose_name_is_not_utf8_is_refused(tmp_path: Path, command: list[str]) -> None:
    """pyarrow cannot open a path that is not UTF-8: `run` rolled every merge back with a
    UnicodeEncodeError, exited 0 and left `status` healthy, pass after pass."""
    data_dir = Path(os.fsdecode(os.fsencode(tmp_path) + b"/data-\xff"))
    data_dir.mkdir()
    (data_dir / "dt=2025-12-30").mkdir()
    proc = run_cli(*command, "--data-dir", str(data_dir))
    shown = os.fsencode(data_dir).decode("utf-8", "backslashreplace")
    assert_refused(
        proc, "--data-dir", f"{shown} is not valid UTF-8, and pyarrow cannot open files under it"
    )
    assert os.listdir(data_dir) == ["dt=2025-12-30"]


@pytest.mark.parametrize(
    ("command", "own"),
    [
        (["run", "--once"], 0),
        (["recover"], 0),
        (["run", "--dry-run"], 0),
        (["status"], 5),  # its own journal, not there yet: never ran
        (["history"], 1),  # "no journal here"
    ],
    ids=["run", "recover", "dry-run", "status", "history"],
)
def test_a_journal_in_another_data_dirs_state_folder_is_refused(
    tmp_path: Path, command: list[str], own: int
) -> None:
    """Its recovery would judge the other data directory's merges by this one's folders: one
    killed after `renamed` was marked needs-attention by a run on a second data directory.
    `status` read the other's passes and called a directory that never ran healthy, and
    `history` listed the other's merges."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    theirs = default_journal_path(first)
    proc = run_cli(*command, "--data-dir", str(second), "--journal", str(theirs))
    assert_refused(
        proc,
        "--journal",
        f"{theirs} is the journal of another data directory ({first}); each data directory"
        " needs its own",
    )
    assert os.listdir(first) == [] and os.listdir(second) == []
    # its own journal, by any spelling, is fine
    ours = run_cli(*command, "--data-dir", str(second), "--journal",
                   str(tmp_path / "." / "second" / ".fgm-consolidator" / "journal.db"))  # fmt: skip
    assert ours.returncode == own, ours.stderr
    # nor by a link to it, or a path through `..`: only the place it really is tells
    theirs.parent.mkdir()
    theirs.touch()
    link = tmp_path / "link.db"
    link.symlink_to(theirs)
    roundabout = first / ".fgm-consolidator" / "x" / ".." / "journal.db"
    for spelled in (link, roundabout):
        proc = run_cli(*command, "--data-dir", str(second), "--journal", str(spelled))
        assert_refused(
            proc,
            "--journal",
            f"{spelled} is the journal of another data directory ({first}); each data"
            " directory needs its own",
        )


@pytest.mark.parametrize("target", ["lock", "data-dir-id", "monitor-file"])
def test_a_journal_naming_our_state_or_the_monitors_file_is_refused(
    data_dir: Path, populate: Callable[..., SimulationSummary], target: str
) -> None:
    """`--journal <data-dir>/.fgm-consolidator/lock` was taken: the first `run` made a
    database of the lock file, and the next one truncated it to the holder's line, the
    journal's record gone. Named `data-dir-id`, every command then failed to read the data
    directory's id; named a monitor's file, the hint for a journal that will not open was to
    move it aside, out of its partition. Found by a bad-input review (helper-44)."""
    populate()
    assert run_cli("run", "--once", "--data-dir", str(data_dir), "--min-age", "1e9").returncode == 0
    state = data_dir / ".fgm-consolidator"
    monitors = sorted(data_dir.glob("dt=*/identifier=pod-a/metrics-*.parquet"))[0]
    partition = monitors.parent.relative_to(data_dir).as_posix()
    journal, reason = {
        "lock": (state / "lock", "is the data directory's lock file, not a journal"),
        "data-dir-id": (state / "data-dir-id", "is the data directory's id, not a journal"),
        "monitor-file": (
            monitors,
            f"is in the partition folder {partition}, among the monitor's files; keep the"
            " journal outside the dt= folders",
        ),
    }[target]
    before = {path: path.read_bytes() for path in (*state.iterdir(), monitors)}

    # `run --once` twice: the second start truncated the lock file become a journal
    for command in ("run --once", "run --once", "recover", "status", "history", "run --dry-run"):
        proc = run_cli(*command.split(), "--data-dir", str(data_dir), "--journal", str(journal))
        assert_refused(proc, "--journal", f"{journal} {reason}")

    assert {path: path.read_bytes() for path in (*state.iterdir(), monitors)} == before
    assert not list(monitors.parent.glob("*.lock"))  # `recover` locks a journal beside it


@pytest.mark.parametrize("command", ["status", "history", "run --dry-run"])
def test_a_journal_path_under_a_regular_file_is_refused_by_readers_too(
    data_dir: Path, tmp_path: Path, command: str
) -> None:
    """A mistyped `FGM_JOURNAL`: `status` said "no journal: `run` has not started here"
    (exit 5) and `run --dry-run` planned as if no journal existed, where `run` refuses it."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    journal = afile / "journal.db"

    proc = run_cli(*command.split(), "--data-dir", str(data_dir), "--journal", str(journal))

    assert_refused(proc, "--journal", f"{afile} is not a directory, so {journal} cannot be")


def test_a_journal_linked_to_another_file_system_is_refused(
    data_dir: Path, other_file_system: Path
) -> None:
    """The check asked the link's folder, on the data volume, and let the journal live on a
    tmpfs that a reboot empties while the data stays."""
    other_file_system.mkdir()
    target = other_file_system / "journal.db"
    target.touch()
    link = default_journal_path(data_dir)
    link.parent.mkdir()
    link.symlink_to(target)
    proc = run_cli("run", "--once", "--data-dir", str(data_dir))
    theirs, ours = os.stat(other_file_system).st_dev, os.stat(data_dir).st_dev
    assert_refused(
        proc,
        "--journal",
        f"{link} is on another file system than --data-dir {data_dir} (device"
        f" {os.major(theirs)}:{os.minor(theirs)} vs {os.major(ours)}:{os.minor(ours)});"
        " the journal must live on the data volume to see the same crashes",
    )
    assert target.read_bytes() == b""


@pytest.mark.parametrize("command", ["run --once", "run --dry-run", "recover", "status", "history"])
def test_a_data_dir_that_is_a_fifo_or_a_device_is_refused(tmp_path: Path, command: str) -> None:
    """click's `file_okay=False` refuses regular files only: on a FIFO `run --dry-run` planned
    nothing and exited 0, `status` said "never ran here" (5), `history` "no journal here" (1)
    and `recover` blamed `--journal`. Found by a bad-input review (helper-44)."""
    fifo = tmp_path / "data"
    os.mkfifo(fifo)
    for data_dir in (fifo, Path(os.devnull)):
        proc = run_cli(*command.split(), "--data-dir", str(data_dir))
        assert_refused(proc, "--data-dir", f"{data_dir} is not a directory")
    assert os.listdir(tmp_path) == ["data"]


def test_demo_refuses_hours_that_are_not_a_number_before_making_its_folder(
    tmp_path: Path,
) -> None:
    """click's float range lets `nan` through: the demo made its folder, then died with a
    ValueError traceback (exit 1)."""
    target = tmp_path / "demo"
    proc = run_cli("demo", "--data-dir", str(target), "--hours", "nan")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--hours': must be a finite number (got nan)"
    )
    assert not target.exists()


@pytest.mark.parametrize("command", ["run --once", "recover", "status", "history"])
@pytest.mark.parametrize("level", ["dt=2025-12-30", "dt=2025-12-30/identifier=pod a"])
def test_a_partition_folder_given_as_the_data_dir_is_refused(
    data_dir: Path, command: str, level: str
) -> None:
    """`--data-dir /data/dt=...` (or one pod's folder) found no `dt=*/identifier=*` under it:
    every pass merged nothing, `status` said healthy, and `run` made its state folder among
    the monitor's files. Nothing said the path was wrong."""
    folder = data_dir / level
    folder.mkdir(parents=True)
    (folder / "metrics-20251230T080000Z.parquet").write_bytes(b"")
    before = sorted(p.name for p in folder.iterdir())

    proc = run_cli(*command.split(), "--data-dir", str(folder), timeout=60)

    reason = (
        f"{folder} is a partition folder ({folder.name}); give the monitor's data directory, "
        f"the one that holds the dt=YYYY-MM-DD folders ({data_dir})"
    )
    assert_refused(proc, "--data-dir", reason)
    assert sorted(p.name for p in folder.iterdir()) == before


# -- warned, not refused -------------------------------------------------------------------


def warnings_of(proc: subprocess.CompletedProcess[str], event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == event]


@pytest.mark.parametrize("mode", ["--dry-run", "--once"])
@pytest.mark.parametrize(
    ("min_age", "warned"), [(["--min-age", "0"], True), (["--min-age", "90"], False), ([], False)]
)
def test_a_min_age_below_one_rotation_is_warned_about_at_start_up(
    data_dir: Path, mode: str, min_age: list[str], warned: bool
) -> None:
    """A file younger than one rotation (90 s) may still be written by the monitor; tests and
    benchmarks use `--min-age 0` on purpose, so it runs, with one warning saying so."""
    proc = run_cli("run", mode, "--data-dir", str(data_dir), "--log-format", "json", *min_age)
    assert proc.returncode == 0, proc.stderr
    found = warnings_of(proc, "min-age-below-rotation")
    if warned:
        [warning] = found
        assert (warning["level"], warning["min_age_s"], warning["rotation_s"]) == ("warning", 0, 90)
    else:
        assert found == []


@pytest.mark.parametrize(
    ("max_span", "warned"), [("60", True), ("179", True), ("180", False), ("3600", False)]
)
def test_a_max_span_below_two_rotations_is_warned_about_at_start_up(
    data_dir: Path, populate: Callable[..., SimulationSummary], max_span: str, warned: bool
) -> None:
    """`--max-span 60` (minutes meant, seconds read) ran every pass `ok` and merged nothing,
    without a word: no window of 60 s holds two of the monitor's 90 s files."""
    populate(PodSpec("pod-a"))
    proc = run_cli("run", "--once", "--data-dir", str(data_dir), "--log-format", "json",
                   "--min-age", "0", "--max-span", max_span)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = warnings_of(proc, "max-span-below-two-rotations")
    if warned:
        [warning] = found
        assert (warning["max_span_s"], warning["rotation_s"]) == (int(max_span), 90)
    else:
        assert found == []
    if max_span == "60":
        assert not list(data_dir.rglob("consolidated-*")), "a 60 s window merged files"
