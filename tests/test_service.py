"""The sidecar as Kubernetes runs it: a long-lived `run` process, its lock, its passes, SIGTERM.

Every wait below polls a condition (a log line, a file) with a deadline; nothing sleeps in
place of synchronisation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from conftest import PAST, rows_pyarrow, run_cli, small_spec, tmp_files

from fgm_consolidator import lock, service
from fgm_consolidator.journal import Journal, MergeRecord
from fgm_consolidator.layout import default_journal_path, lock_path
from fgm_consolidator.service import StopFlag
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate
from fgm_consolidator.states import MergeState

POD_A = "dt=2025-12-30/identifier=pod-a"
POD_B = "dt=2025-12-30/identifier=pod-b"
OUTPUT = "consolidated-20251230T080000Z-20251230T083430Z.parquet"
OUTPUT_COMPANION = "consolidated-20251230T080000Z-20251230T083430Z.containers"
DEADLINE_S = 30.0


def fields(line: str) -> dict[str, str]:
    """One `key=value` log line (logs.format_fields) back into its fields."""
    return dict(item.split("=", 1) for item in shlex.split(line) if "=" in item)


class Service:
    """A `fgm-consolidator run` process whose stderr log is collected line by line."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """`prefix` runs the service under a wrapper (fiu-run, strace, faketime)."""
        full_env = {**os.environ, "FGM_CRASH_AT": "", **(env or {})}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fgm_consolidator", "run", "--data-dir",
             str(data_dir), "--min-age", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            preexec_fn=preexec_fn,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def events(self) -> list[dict[str, str]]:
        with self._changed:
            return [fields(line) for line in self.lines]

    def wait_for(
        self, event: str, where: Callable[[dict[str, str]], bool] = lambda _: True, n: int = 1
    ) -> dict[str, str]:
        """The n-th log event named `event` that satisfies `where`, waiting up to the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        with self._changed:
            while True:
                found = [f for f in map(fields, self.lines) if f.get("event") == event and where(f)]
                if len(found) >= n:
                    return found[n - 1]
                if not self._reader.is_alive():
                    raise AssertionError(f"exited before {event!r}:\n" + "\n".join(self.lines))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event!r} in time:\n" + "\n".join(self.lines))
                self._changed.wait(left)

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        took = time.monotonic() - sent
        self._reader.join(timeout=DEADLINE_S)
        return code, took


@contextmanager
def running(data_dir: Path) -> Iterator[Callable[..., Service]]:
    """Start services at will; whatever still runs at the end is killed, by its own handle."""
    started: list[Service] = []

    def make(*args: str, **kwargs: Any) -> Service:
        service = Service(data_dir, *args, **kwargs)
        started.append(service)
        return service

    try:
        yield make
    finally:
        for service in started:
            if service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait(timeout=DEADLINE_S)


@pytest.fixture
def start(data_dir: Path) -> Iterator[Callable[..., Service]]:
    with running(data_dir) as make:
        yield make


def poll(condition: Callable[[], bool], what: str, interval: float = 0.002) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".fgm-consolidator" not in path.parts:
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(folder))] = (st.st_ino, st.st_size, digest)
    return found


def journal_records(data_dir: Path) -> list[MergeRecord]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        assert journal.unfinished() == []
        return sorted(journal.history(), key=lambda r: r.id)
    finally:
        journal.close()


def names(folder: Path) -> set[str]:
    return set(os.listdir(folder))


# -- (a) one consolidator per data directory --------------------------------------------------


def test_a_second_instance_is_refused_and_told_who_holds_the_lock(
    data_dir: Path, populate: Any, start: Callable[..., Service]
) -> None:
    populate()
    service = start("--check-interval", "300")
    holder = f"pid={service.proc.pid} "
    lock = lock_path(data_dir)
    poll(lambda: lock.exists() and holder in lock.read_text(), "the service to hold the lock")
    # the first pass runs at once, not after the 300 s interval
    assert service.wait_for("pass-finished")["merges"] == "1"
    files = snapshot(data_dir)

    for command in (
        ("run", "--once", "--data-dir", str(data_dir), "--min-age", "0"),
        ("recover", "--data-dir", str(data_dir)),
    ):
        refused = run_cli(*command, env={"FGM_CRASH_AT": ""})
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        assert "another fgm-consolidator holds this data directory" in refused.stderr
        assert holder in refused.stderr
        assert refused.stdout == ""
    assert snapshot(data_dir) == files
    assert len(journal_records(data_dir)) == 1

    code, _took = service.terminate(timeout=DEADLINE_S)
    assert code == 0
    # the kernel dropped the lock with the process: a new instance is welcome
    after = run_cli("recover", "--data-dir", str(data_dir), env={"FGM_CRASH_AT": ""})
    assert after.returncode == 0, after.stderr


# -- (b) SIGTERM between passes ---------------------------------------------------------------


def test_sigterm_while_idle_exits_0_promptly(
    data_dir: Path, populate: Any, start: Callable[..., Service]
) -> None:
    populate()
    before = rows_pyarrow(data_dir)
    service = start("--check-interval", "300")
    service.wait_for("pass-finished")
    code, took = service.terminate(timeout=DEADLINE_S)
    assert code == 0, "\n".join(service.lines)
    assert took < 5.0
    assert service.events[-1]["event"] == "stopped"
    assert service.events[-1]["reason"] == "signal"
    assert names(data_dir / POD_A) == {OUTPUT, OUTPUT_COMPANION}
    assert rows_pyarrow(data_dir) == before
    assert tmp_files(data_dir) == []


# -- (c) SIGTERM during a merge ---------------------------------------------------------------


def slow_merge_data(data_dir: Path) -> None:
    """pod-a: 172,800 rows, a merge of about a second at zstd level 22; pod-b: small, later."""
    generate(
        data_dir,
        SimulationSpec(
            pods=(PodSpec("pod-a"),),
            start=PAST,
            rotations=24,
            metrics=20,
            containers=4,
            seconds_per_row_sample=1,
            seed=3,
        ),
    )
    generate(data_dir, small_spec((PodSpec("pod-b"),)))


def sigterm_once_writing(data_dir: Path, service: Service, grace_s: float) -> tuple[int, float]:
    tmp = data_dir / POD_A / (OUTPUT + ".tmp")
    poll(lambda: tmp.exists() or service.proc.poll() is not None, "the merge to start writing")
    assert service.proc.poll() is None, "\n".join(service.lines)
    return service.terminate(timeout=grace_s + DEADLINE_S)


SLOW = ("--check-interval", "300", "--compression-level", "22", "--row-group-size", "1")


def test_sigterm_during_a_merge_lets_it_finish_within_the_grace_period(
    data_dir: Path, start: Callable[..., Service]
) -> None:
    slow_merge_data(data_dir)
    before = rows_pyarrow(data_dir)
    pod_b = snapshot(data_dir / POD_B)
    service = start(*SLOW, "--grace-period", "60")

    code, took = sigterm_once_writing(data_dir, service, 60)
    assert code == 0, "\n".join(service.lines)
    assert took < 20.0
    order = [e["event"] for e in service.events]
    # the signal came in while the merge was being written, and the merge still finished
    assert order.index("stop-requested") < order.index("merge-finished")
    assert order[-1] == "stopped"
    assert "merge-failed" not in order

    assert tmp_files(data_dir) == []
    assert names(data_dir / POD_A) == {OUTPUT, OUTPUT_COMPANION}
    assert snapshot(data_dir / POD_B) == pod_b  # no new merge starts after SIGTERM
    records = journal_records(data_dir)
    assert [(r.partition, r.state) for r in records] == [(POD_A, MergeState.SOURCES_DELETED)]
    assert rows_pyarrow(data_dir) == before


def test_sigterm_during_a_merge_past_the_grace_period_rolls_it_back(
    data_dir: Path, start: Callable[..., Service]
) -> None:
    slow_merge_data(data_dir)
    files = snapshot(data_dir)
    service = start(*SLOW, "--grace-period", "0")

    code, took = sigterm_once_writing(data_dir, service, 0)
    assert code == 0, "\n".join(service.lines)
    assert took < 5.0
    stopped = service.wait_for("merge-stopped")
    assert stopped["state"] == "rolled-back" and stopped["level"] == "info"
    assert "stopped on request" in stopped["error"]
    # no failure (README): an alert on failed merges fired at every slow rollout (helper-51)
    assert service.wait_for("pass-finished")["failed"] == "0"
    events = [e["event"] for e in service.events]
    assert "merge-finished" not in events and "merge-failed" not in events

    assert tmp_files(data_dir) == []
    assert snapshot(data_dir) == files  # every source byte for byte, nothing else
    records = journal_records(data_dir)
    assert [(r.partition, r.state) for r in records] == [(POD_A, MergeState.ROLLED_BACK)]
    assert [t.actor for t in records[0].transitions] == ["merge", "merge", "stop"]
    assert "stopped on request" in (records[0].error or "")


def test_files_restored_under_a_running_service_are_logged_held(
    data_dir: Path, tmp_path: Path, start: Callable[..., Service]
) -> None:
    """Merged files copied back while the service runs are held out of merges until the next
    start proves them: their rows were in the folder twice and nothing but `status` said so
    (helper-51)."""
    generate(data_dir, small_spec(rotations=12))
    folder = data_dir / POD_A
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    service = start("--check-interval", "1")
    service.wait_for("merge-finished")
    for path in backup.iterdir():
        shutil.copy2(path, folder / path.name)

    # the twelve copies and the output that lists them (a pass may see the copy half done)
    held = service.wait_for("files-held", lambda e: e["files"] == "13")

    assert held["partition"] == POD_A and held["level"] == "warning"
    assert held["first"] == min(p.name for p in folder.glob("*.parquet"))  # the output
    service.wait_for("pass-finished", lambda e: e["held"] == "13", n=2)  # two passes held
    told = [e for e in service.events if e["event"] == "files-held" and e["files"] == "13"]
    assert len(told) == 1  # once, not per pass


# -- (d) a pass every --check-interval --------------------------------------------------------


def test_files_dropped_after_a_pass_are_consolidated_by_the_next(
    data_dir: Path, tmp_path: Path, populate: Any, start: Callable[..., Service]
) -> None:
    populate()
    staging = tmp_path / "staging"
    staging.mkdir()
    generate(staging, small_spec((PodSpec("pod-b"),)))
    before = rows_pyarrow(data_dir) + rows_pyarrow(staging)

    service = start("--check-interval", "1")
    first = service.wait_for("pass-finished")
    assert first["merges"] == "1"
    assert names(data_dir / POD_A) == {OUTPUT, OUTPUT_COMPANION}
    # the new partition appears at once, whole: no pass can see half-written files
    os.rename(staging / POD_B, data_dir / POD_B)

    merged = service.wait_for("merge-finished", lambda f: f["partition"] == POD_B)
    service.wait_for("pass-finished", lambda f: f["merges"] == "1", n=2)
    passes = [e for e in service.events if e["event"] == "pass-finished"]
    code, _took = service.terminate(timeout=DEADLINE_S)
    assert code == 0, "\n".join(service.lines)

    assert merged["state"] == "sources-deleted"
    assert len(passes) >= 2
    stamps = [time_of(e) for e in passes]
    gaps = [b - a for a, b in pairwise(stamps)]
    assert min(gaps) >= 0.99  # never sooner than --check-interval after the previous pass
    assert time_of(merged) - stamps[0] >= 0.99
    assert names(data_dir / POD_B) == {OUTPUT, OUTPUT_COMPANION}
    assert tmp_files(data_dir) == []
    assert rows_pyarrow(data_dir) == before
    assert [(r.partition, r.state) for r in journal_records(data_dir)] == [
        (POD_A, MergeState.SOURCES_DELETED),
        (POD_B, MergeState.SOURCES_DELETED),
    ]


def time_of(event: dict[str, str]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


# -- (e) intervals longer than a thread can wait ----------------------------------------------


def test_a_check_interval_longer_than_a_thread_can_wait_does_not_crash_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`run --check-interval 1e10` passed the option's range, ran a pass, then died with
    OverflowError (timestamp out of range for platform time_t) in the wait between passes."""
    asked: list[float] = []
    real = service.select.select

    def recording(read: Any, write: Any, error: Any, timeout: float) -> Any:
        asked.append(timeout)
        return real(read, write, error, 0)

    monkeypatch.setattr(service.select, "select", recording)
    assert StopFlag(0).wait(1e10) is False
    assert asked == [threading.TIMEOUT_MAX]


def test_a_stop_requested_as_the_wait_begins_ends_it_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The signal handler runs in the main thread wherever it was, inside the wait too. It once
    set a `threading.Event` whose lock the wait could be holding. Here the request lands at
    the worst moment: after the wait saw no request, before it blocks. It must take no lock
    and still wake the wait."""
    stop = StopFlag(0)
    real = service.select.select

    def signal_lands_first(read: Any, write: Any, error: Any, timeout: float) -> Any:
        stop.request(signal.SIGTERM)
        return real(read, write, error, timeout)

    monkeypatch.setattr(service.select, "select", signal_lands_first)
    began = time.monotonic()
    assert stop.wait(60) is True
    assert time.monotonic() - began < 30  # woken by the request, not by the timeout
    assert stop.requested


def test_a_stop_whose_log_line_cannot_be_written_still_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler that lands inside a write to stderr (blocked on a full pipe, then interrupted)
    logs through a reentrant call on that stream, which raises RuntimeError: the stop was
    recorded after the log line, so it was lost, and the service waited out its interval."""

    def stderr_busy(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

    monkeypatch.setattr(service, "log_event", stderr_busy)
    stop = StopFlag(0)
    stop.request(signal.SIGHUP)
    assert stop.requested
    assert stop.wait(60) is True


def test_sigterm_wakes_a_wait_in_this_process() -> None:
    """The real handler, a real signal: the main thread waits, a thread sends SIGTERM."""
    stop = StopFlag(0)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop.request)
    try:
        sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
        began = time.monotonic()
        sender.start()
        assert stop.wait(60) is True
        assert time.monotonic() - began < 30
        sender.join()
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- (f) a lock file that cannot be written ---------------------------------------------------


@pytest.mark.parametrize("command", [["run", "--once"], ["recover"]], ids=["run", "recover"])
def test_a_lock_file_that_cannot_be_written_is_named_in_the_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """On a full volume the holder's line could not be written: `Error: [Errno 28] No space
    left on device`, with no path."""
    from test_cli import invoke

    from fgm_consolidator import lock

    def full(_fd: int, _data: bytes, _offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock.os, "pwrite", full)
    result = invoke(*command, "--data-dir", data_dir)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {lock_path(data_dir)}: cannot write the lock file: No space left on device\n"
    )
    journal = default_journal_path(data_dir)
    if journal.exists():  # `run` writes the lock once its journal is open: see lock.announce
        with contextlib.closing(sqlite3.connect(journal)) as conn:
            assert conn.execute("SELECT count(*) FROM passes").fetchone() == (0,)


# -- (g) one journal given to two data directories --------------------------------------------


def test_a_journal_shared_by_two_data_directories_is_held_by_one_service(
    data_dir: Path, tmp_path: Path, populate: Any, start: Callable[..., Service]
) -> None:
    """Each data directory had its own lock, so both services used the one journal, and each
    one's recovery judged the other's merges by its own folders (a merge killed after
    `renamed` was flagged needs-attention by the other, its sources left beside its output).
    The journal is locked (`<journal>.lock`) and, once bound, names its data directory: the
    other is refused while the service runs and after it stopped, before touching anything."""
    populate()
    shared = tmp_path / "shared" / "journal.db"
    other = tmp_path / "other"
    generate(other, small_spec((PodSpec("pod-b"),)))
    service = start("--journal", str(shared), "--check-interval", "300")
    service.wait_for("pass-finished")
    before = snapshot(other)

    def refused_to_other() -> None:
        for command in (["run", "--once", "--min-age", "0"], ["recover"]):
            refused = run_cli(*command, "--data-dir", str(other), "--journal", str(shared),
                              env={"FGM_CRASH_AT": ""})  # fmt: skip
            assert refused.returncode == 2, (command, refused.stderr)
            assert f"{shared} is the journal of data directory {data_dir}" in refused.stderr
        assert snapshot(other) == before

    refused_to_other()
    code, _took = service.terminate(timeout=DEADLINE_S)
    assert code == 0
    refused_to_other()
    # the kernel dropped both locks with the process
    after = run_cli("run", "--once", "--min-age", "0", "--data-dir", str(data_dir), "--journal",
                    str(shared), env={"FGM_CRASH_AT": ""})  # fmt: skip
    assert after.returncode == 0, after.stderr


def test_the_journal_lock_refuses_a_second_data_directory_before_the_journal_is_bound(
    data_dir: Path, tmp_path: Path, populate: Any
) -> None:
    """The journal's lock holds from before it is bound: a second data directory started in
    that window (its `run` read no binding yet) is refused by the lock, with the holder."""
    populate()
    shared = tmp_path / "shared" / "journal.db"
    other = tmp_path / "other"
    generate(other, small_spec((PodSpec("pod-b"),)))
    with lock.exclusive_journal(shared, data_dir):
        refused = run_cli("recover", "--data-dir", str(other), "--journal", str(shared),
                          env={"FGM_CRASH_AT": ""})  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith(
        f"Error: {shared}.lock: another fgm-consolidator holds this journal (pid={os.getpid()} "
    )
    assert refused.stderr.count("\n") == 1


@pytest.mark.parametrize("removed", ["state folder", "journal"])
def test_a_state_folder_removed_under_the_service_stops_it_with_the_path(
    data_dir: Path, populate: Any, start: Callable[..., Service], removed: str
) -> None:
    """`rm -rf /data/.fgm-consolidator` beside a running service: it went on as if nothing
    happened, journaling into deleted files, with `status` healthy, and a second instance took
    a new lock file and ran beside it (invariant 7). Now it stops at its next pass, saying
    which path went, so a restart recovers from the disk (lineage) under a fresh lock."""
    populate()
    service = start("--check-interval", "0.2")
    assert service.wait_for("pass-finished")["merges"] == "1"
    state = default_journal_path(data_dir).parent
    gone = state if removed == "state folder" else default_journal_path(data_dir)
    if removed == "state folder":
        shutil.rmtree(state)
    else:
        gone.unlink()

    code = service.proc.wait(timeout=DEADLINE_S)

    assert code == 1
    [error] = [line for line in service.lines if line.startswith("Error: ")]
    assert str(gone) in error and "removed or replaced while this service ran" in error
    after = run_cli("run", "--once", "--data-dir", str(data_dir), "--min-age", "0")
    assert after.returncode == 0, after.stderr
