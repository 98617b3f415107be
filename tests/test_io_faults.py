"""I/O faults injected into a real `fgm-consolidator` process, not into Python objects.

- libfiu (`fiu-run -x`, LD_PRELOAD) fails the process's write(2), fsync(2) and unlink(2) calls,
  and `fiu-ctrl` switches a fault off while the service runs. The journal is untouched by
  these: SQLite writes with pwrite64 and syncs with fdatasync, and deletes nothing while open.
- strace's syscall tampering (`-e inject=`) fails one chosen call: the first fsync, the link
  of one output, the unlink of one source (libfiu has no wrapper for link at all).
- A tiny tmpfs gives a real ENOSPC, for data (size=) and for link (nr_inodes=: each link
  takes an inode slot on tmpfs); RLIMIT_FSIZE gives a real short write, then EFBIG.

Expected every time: the merge rolls back or waits, no source is lost, no row is duplicated
once things settle, the service keeps running and backs off instead of retrying every interval,
and the next attempt after the fault is gone succeeds. Each wait polls a condition.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from conftest import PAST, data_files, rows_pyarrow, run_cli, tmp_files
from test_service import DEADLINE_S, Service, poll, running

from fgm_consolidator import durable, merge
from fgm_consolidator.backoff import Backoff, cap_for
from fgm_consolidator.journal import Journal, MergeRecord
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import Settings, StopFlag, consolidation_pass
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate
from fgm_consolidator.states import MergeState

POD_A = "dt=2025-12-30/identifier=pod-a"
OUTPUT = "consolidated-20251230T080000Z-20251230T083430Z.parquet"
FIU_PRELOAD = Path("/usr/lib/fiu/fiu_posix_preload.so")
INTERVAL = 0.1  # --check-interval of the services below: backoff makes it 0.1, 0.2, 0.4 ...


# -- tools ------------------------------------------------------------------------------------


def need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed ({hint}); .ci/run installs it when run as root")
    return path


class Fiu:
    """libfiu's POSIX preload around one process, with its remote control."""

    def __init__(self, base: Path) -> None:
        need("fiu-run", "apt-get install fiu-utils")
        need("fiu-ctrl", "apt-get install fiu-utils")
        if not FIU_PRELOAD.exists():
            pytest.skip(f"{FIU_PRELOAD} is missing (apt-get install fiu-utils)")
        self.base = str(base)

    def prefix(self, *commands: str) -> tuple[str, ...]:
        """libfiu wraps malloc too, and takes its own lock inside: pyarrow's jemalloc
        background thread, started while the loader lock is held, then deadlocks the start-up
        about one time in three. Without that thread (an allocator setting) it never does."""
        enables = [part for command in commands for part in ("-c", command)]
        no_bg_thread = "JE_ARROW_MALLOC_CONF=background_thread:false"
        return ("env", no_bg_thread, "fiu-run", "-x", "-f", self.base, *enables)

    def control(self, pid: int, command: str) -> None:
        """Send one command; fiu-ctrl returns once the process has applied it."""
        fifo = Path(f"{self.base}-{pid}.in")
        poll(fifo.exists, f"libfiu's control fifo {fifo}")
        done = subprocess.run(
            ["fiu-ctrl", "-f", self.base, "-c", command, str(pid)],
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
            check=False,
        )
        assert done.returncode == 0, done.stderr


def strace_prefix(log: Path, *rules: str) -> tuple[str, ...]:
    need("strace", "apt-get install strace")
    return ("strace", "-f", "-qq", "-y", "-o", str(log), *rules)


def mount_tmpfs(target: Path, options: str) -> None:
    target.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root in a VM or a "
                    "privileged container")  # fmt: skip


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    mounted: list[Path] = []

    def make(options: str) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        mount_tmpfs(target, options)
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False, timeout=DEADLINE_S)


@pytest.fixture
def service(data_dir: Path) -> Iterator[Callable[..., Service]]:
    with running(data_dir) as make:
        yield make


# -- data and checks --------------------------------------------------------------------------


def make_data(data_dir: Path, metrics: int = 5) -> None:
    """One partition of 24 files (about 300 KB at 5 metrics), and a journal that exists."""
    Journal.open(default_journal_path(data_dir)).close()
    generate(
        data_dir,
        SimulationSpec(
            pods=(PodSpec("pod-a"),),
            start=PAST,
            rotations=24,
            metrics=metrics,
            containers=2,
            seconds_per_row_sample=1,
            seed=1,
        ),
    )


def records(data_dir: Path) -> list[MergeRecord]:
    """The journal as another process sees it while the service writes it."""
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return sorted(journal.history(), key=lambda r: r.id)
    finally:
        journal.close()


def attempts(data_dir: Path) -> list[MergeRecord]:
    return [r for r in records(data_dir) if r.state is MergeState.ROLLED_BACK]


def planned_at(record: MergeRecord) -> float:
    return datetime.fromisoformat(record.transitions[0].at).timestamp()


def assert_backs_off(times: list[float]) -> None:
    """Attempt k+1 comes at least interval * 2**k after attempt k (ms stamps: 5 ms slack)."""
    assert len(times) >= 4, times
    for k, gap in enumerate(b - a for a, b in pairwise(times)):
        assert gap >= INTERVAL * 2**k - 0.005, (k, [round(t - times[0], 3) for t in times])


def assert_settled(data_dir: Path, before: Any, files: int = 1) -> None:
    assert tmp_files(data_dir) == []
    assert rows_pyarrow(data_dir) == before
    assert len(data_files(data_dir)) == files
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        assert journal.unfinished() == []
    finally:
        journal.close()


def stop(service: Service) -> None:
    code, _took = service.terminate(timeout=DEADLINE_S)
    assert code == 0, "\n".join(service.lines)


# -- libfiu: a running service, the fault switched off while it runs --------------------------


def test_enospc_while_writing_backs_off_and_merges_once_space_returns(
    data_dir: Path, tmp_path: Path, service: Callable[..., Service]
) -> None:
    make_data(data_dir)
    before, sources = rows_pyarrow(data_dir), data_files(data_dir)
    fiu = Fiu(tmp_path / "fiu")
    # every write(2) of the process fails, its log lines included; the journal's pwrite64 works
    running = service(
        "--check-interval", str(INTERVAL),
        prefix=fiu.prefix(f"enable name=posix/io/rw/write,failinfo={errno.ENOSPC}"),
    )  # fmt: skip
    poll(lambda: len(attempts(data_dir)) >= 4, "four failed attempts")
    assert running.proc.poll() is None
    failed = attempts(data_dir)
    assert all("No space left on device" in (r.error or "") for r in failed)
    assert_backs_off([planned_at(r) for r in failed])
    assert data_files(data_dir) == sources
    assert tmp_files(data_dir) == []

    fiu.control(running.proc.pid, "disable name=posix/io/rw/write")
    finished = running.wait_for("merge-finished")
    assert finished["output"] == OUTPUT
    assert running.wait_for("recovered")["key"] == POD_A
    stop(running)
    assert_settled(data_dir, before)


def pass_waits(service_: Service, n: int = 3) -> list[float]:
    """The first `n` waits of passes whose recovery had to leave a merge as it was: each of
    them tries that merge again, so a failing device is not hit at every interval."""
    return [
        float(service_.wait_for("backing-off", lambda e: e["key"] == "<pass>", n=i)["retry_in_s"])
        for i in range(1, n + 1)
    ]


def test_eio_on_every_fsync_waits_without_publishing_then_merges(
    data_dir: Path, tmp_path: Path, service: Callable[..., Service]
) -> None:
    """fsync fails for the output and for the folder: the roll back cannot be made durable
    either, so the merge waits in `writing`, and holds its partition, until the device heals.
    Each pass tries its recovery again and goes on with the other partitions."""
    make_data(data_dir)
    before, sources = rows_pyarrow(data_dir), data_files(data_dir)
    fiu = Fiu(tmp_path / "fiu")
    running = service(
        "--check-interval", str(INTERVAL),
        prefix=fiu.prefix(f"enable name=posix/io/sync/fsync,failinfo={errno.EIO}"),
    )  # fmt: skip
    running.wait_for("partition-failed")
    assert pass_waits(running) == [INTERVAL, INTERVAL * 2, INTERVAL * 4]
    assert running.proc.poll() is None
    assert all("Input/output error" in e["error"] for e in running.events if "error" in e)
    [record] = records(data_dir)
    assert [t.state for t in record.transitions] == [MergeState.PLANNED, MergeState.WRITING]
    assert data_files(data_dir) == sources  # never renamed
    assert tmp_files(data_dir) == []  # the unsynced output was removed at once

    fiu.control(running.proc.pid, "disable name=posix/io/sync/fsync")
    rolled = running.wait_for("recovery", lambda e: e["action"] != "failed")
    assert (rolled["found"], rolled["action"]) == ("writing", "rolled back")
    running.wait_for("merge-finished")
    stop(running)
    assert_settled(data_dir, before)
    assert [r.state for r in records(data_dir)] == [
        MergeState.ROLLED_BACK,
        MergeState.SOURCES_DELETED,
    ]


def test_failing_unlink_waits_with_the_output_published_then_finishes(
    data_dir: Path, tmp_path: Path, service: Callable[..., Service]
) -> None:
    make_data(data_dir)
    before = rows_pyarrow(data_dir)
    fiu = Fiu(tmp_path / "fiu")
    running = service(
        "--check-interval", str(INTERVAL),
        prefix=fiu.prefix(f"enable name=posix/io/dir/unlink,failinfo={errno.EIO}"),
    )  # fmt: skip
    running.wait_for("partition-failed")
    running.wait_for("recovery-failed", n=3)
    assert running.proc.poll() is None
    folder = data_dir / POD_A
    # the link took, the unlink of the temp name did not: one inode, two names, sources all here
    assert os.path.samefile(folder / OUTPUT, folder / (OUTPUT + ".tmp"))
    assert len(list(folder.glob("metrics-*.parquet"))) == 24
    [record] = records(data_dir)
    assert record.state is MergeState.WRITTEN

    fiu.control(running.proc.pid, "disable name=posix/io/dir/unlink")
    resumed = running.wait_for("recovery", lambda e: e["action"] != "failed")
    assert (resumed["found"], resumed["result"]) == ("written", "sources-deleted")
    running.wait_for("recovered")
    stop(running)
    assert_settled(data_dir, before)


def test_a_journal_that_cannot_sync_fails_the_pass_until_it_can(
    data_dir: Path, tmp_path: Path, service: Callable[..., Service]
) -> None:
    """SQLite syncs with fdatasync: every commit fails, so nothing on disk may change."""
    make_data(data_dir)
    before, sources = rows_pyarrow(data_dir), data_files(data_dir)
    fiu = Fiu(tmp_path / "fiu")
    running = service(
        "--check-interval", str(INTERVAL),
        prefix=fiu.prefix(f"enable name=posix/io/sync/fdatasync,failinfo={errno.EIO}"),
    )  # fmt: skip
    waits = [float(running.wait_for("pass-failed", n=n)["retry_in_s"]) for n in (1, 2, 3)]
    assert waits == [INTERVAL, INTERVAL * 2, INTERVAL * 4]
    error = running.wait_for("pass-failed")["error"]
    assert error.startswith(f"{default_journal_path(data_dir)}: journal failed (disk I/O error); ")
    assert "the volume may be full or failing" in error
    assert data_files(data_dir) == sources and tmp_files(data_dir) == []
    assert records(data_dir) == []  # no commit took

    fiu.control(running.proc.pid, "disable name=posix/io/sync/fdatasync")
    assert running.wait_for("merge-finished")["merge_id"] == "1"
    assert running.wait_for("recovered")["key"] == "<pass>"
    stop(running)
    assert_settled(data_dir, before)


def test_short_writes_everywhere_still_give_a_complete_output(
    data_dir: Path, tmp_path: Path
) -> None:
    """Half of all write(2) calls write only part of their buffer (libfiu's write/reduce).

    Regression: the output sink took one write call as the whole buffer, so such a merge
    failed its size check (or, worse, would have hashed bytes that never reached the disk)."""
    make_data(data_dir)
    before = rows_pyarrow(data_dir)
    fiu = Fiu(tmp_path / "fiu")
    shorten = "enable_random name=posix/io/rw/write/reduce,probability=0.5"
    result = run_once(data_dir, fiu.prefix(shorten))
    assert result.returncode == 0, result.stderr
    [record] = records(data_dir)
    assert record.state is MergeState.SOURCES_DELETED, record.error
    assert_settled(data_dir, before)


# -- strace: one chosen call fails ------------------------------------------------------------


def run_once(data_dir: Path, prefix: tuple[str, ...] = (), **kwargs: Any) -> Any:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "fgm_consolidator", "run", "--once",
         "--data-dir", str(data_dir), "--min-age", "0"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "FGM_CRASH_AT": ""}, **kwargs,
    )  # fmt: skip


def test_a_failed_fsync_is_never_retried_and_the_output_never_renamed(
    data_dir: Path, tmp_path: Path
) -> None:
    make_data(data_dir)
    before, sources = rows_pyarrow(data_dir), data_files(data_dir)
    log = tmp_path / "strace.log"
    # the journal syncs with fdatasync: the first fsync is the output's
    rules = ("-e", "trace=fsync,link,unlink", "-e", "inject=fsync:error=EIO:when=1")
    result = run_once(data_dir, strace_prefix(log, *rules))
    assert result.returncode == 0, result.stderr  # rolled back is not a failure
    calls = [line for line in log.read_text().splitlines() if "(" in line]
    tmp = f"{OUTPUT}.tmp>"
    failed = [i for i, line in enumerate(calls) if "(INJECTED)" in line]
    assert len(failed) == 1 and tmp in calls[failed[0]], calls
    after = calls[failed[0] + 1 :]
    assert not [c for c in after if c.split("(", 1)[0].endswith("fsync") and tmp in c]
    assert not [c for c in calls if re.search(r"(?<![a-z])link(at)?\(", c)]
    assert any("unlink(" in c and OUTPUT + ".tmp" in c for c in after)  # removed at once
    assert "Input/output error" in result.stderr and "event=merge-failed" in result.stderr
    assert data_files(data_dir) == sources and tmp_files(data_dir) == []
    [record] = records(data_dir)
    assert record.state is MergeState.ROLLED_BACK

    assert run_once(data_dir).returncode == 0
    assert_settled(data_dir, before)


def test_a_failed_link_leaves_the_merge_written_and_recovery_publishes_it(
    data_dir: Path, tmp_path: Path
) -> None:
    make_data(data_dir)
    before, sources = rows_pyarrow(data_dir), data_files(data_dir)
    target = data_dir / POD_A / OUTPUT
    rules = ("-e", "trace=link,linkat", "-P", str(target), "-e", "inject=link,linkat:error=EACCES")
    result = run_once(data_dir, strace_prefix(tmp_path / "strace.log", *rules))
    assert result.returncode == 1, result.stderr
    assert "event=partition-failed" in result.stderr and "Permission denied" in result.stderr
    assert data_files(data_dir) == sources
    [record] = records(data_dir)
    assert record.state is MergeState.WRITTEN  # complete, synced .tmp: finish, never redo

    result = run_once(data_dir)
    assert result.returncode == 0, result.stderr
    assert "action=resumed" in result.stderr
    assert_settled(data_dir, before)


def test_a_failed_unlink_of_one_source_keeps_the_rest_until_recovery(
    data_dir: Path, tmp_path: Path
) -> None:
    make_data(data_dir)
    before = rows_pyarrow(data_dir)
    victim = sorted((data_dir / POD_A).glob("metrics-*.parquet"))[5]
    rules = ("-e", "trace=unlink,unlinkat", "-P", str(victim), "-e", "inject=all:error=EIO")
    result = run_once(data_dir, strace_prefix(tmp_path / "strace.log", *rules))
    assert result.returncode == 1, result.stderr
    assert victim.exists() and (data_dir / POD_A / OUTPUT).exists()
    assert len(list((data_dir / POD_A).glob("metrics-*.parquet"))) == 24 - 5
    [record] = records(data_dir)
    assert record.state is MergeState.RENAMED

    result = run_once(data_dir)
    assert result.returncode == 0, result.stderr
    assert "found=renamed" in result.stderr
    assert_settled(data_dir, before)


# -- a real full disk -------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_tmpfs_rolls_back_backs_off_and_merges_once_space_is_freed(
    tmpfs: Callable[[str], Path],
) -> None:
    volume = tmpfs("size=8m")
    data_dir = volume / "data"
    data_dir.mkdir()
    make_data(data_dir, metrics=20)  # ~680 KB of sources, a ~700 KB output
    before, sources = rows_pyarrow(data_dir), data_files(data_dir)
    filler = volume / "filler"
    filler.write_bytes(b"\0" * (free_bytes(volume) - 400_000))  # 400 KB left: the journal fits

    with running(data_dir) as start:
        service_ = start("--check-interval", str(INTERVAL))
        poll(lambda: len(attempts(data_dir)) >= 4, "four failed attempts")
        assert service_.proc.poll() is None
        failed = attempts(data_dir)
        assert all("No space left on device" in (r.error or "") for r in failed)
        assert_backs_off([planned_at(r) for r in failed])
        assert data_files(data_dir) == sources and tmp_files(data_dir) == []

        filler.unlink()
        service_.wait_for("merge-finished")
        service_.wait_for("recovered")
        stop(service_)
    assert_settled(data_dir, before)


def test_a_journal_refused_by_a_full_volume_leaves_the_probe_able_to_read_it(
    tmpfs: Callable[[str], Path],
) -> None:
    """`run` on a full volume cannot size the journal's `-shm`: its open failed and left an
    empty `-wal` and a 3-byte `-shm`, and from then on `status --liveness` and `history`, which
    read it without writing, failed with a disk I/O error until space was freed (the probe
    restarting a container that could do nothing else). Found by an operability review."""
    volume = tmpfs("size=8m")
    data_dir = volume / "data"
    data_dir.mkdir()
    make_data(data_dir)
    assert run_cli("run", "--once", "--data-dir", str(data_dir)).returncode == 0
    journal = default_journal_path(data_dir)
    assert sorted(p.name for p in journal.parent.iterdir()) == ["journal.db", "lock"]
    (volume / "filler").write_bytes(b"\0" * free_bytes(volume))
    refused = run_cli("run", "--once", "--data-dir", str(data_dir))
    assert refused.returncode == 1
    assert "cannot open journal (disk I/O error)" in refused.stderr, refused.stderr
    assert sorted(p.name for p in journal.parent.iterdir()) == ["journal.db", "lock"]
    for command in (("status", "--liveness"), ("history",)):
        result = run_cli(*command, "--data-dir", str(data_dir))
        assert result.returncode == 0, (command, result.stderr)


def test_the_demo_on_a_full_volume_is_one_error_line(tmpfs: Callable[[str], Path]) -> None:
    """The demo writing its sample data onto a volume too small ended in pyarrow's traceback.
    Found by an operability review."""
    volume = tmpfs("size=200k")
    result = run_cli("demo", "--data-dir", str(volume / "demo"), "--hours", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert "No space left on device" in error, result.stderr


def test_link_fails_with_enospc_when_the_tmpfs_has_no_inode_left(
    tmpfs: Callable[[str], Path],
) -> None:
    """On tmpfs every link takes an inode slot: with none left, publishing fails for real."""
    volume = tmpfs("size=64m,nr_inodes=200")
    data_dir = volume / "data"
    data_dir.mkdir()
    make_data(data_dir)
    before = rows_pyarrow(data_dir)
    fill = volume / "fill"
    fill.mkdir()
    # the run creates its lock, the journal's -wal and -shm, the output's and the companion's
    # .tmp: 5 inodes; the link of the output then finds none
    for i in range(os.statvfs(volume).f_ffree - 5):
        (fill / str(i)).touch()
    assert os.statvfs(volume).f_ffree == 5

    with running(data_dir) as start:
        service_ = start("--check-interval", str(INTERVAL))
        service_.wait_for("partition-failed")
        assert pass_waits(service_) == [INTERVAL, INTERVAL * 2, INTERVAL * 4]
        assert all("No space left on device" in e["error"] for e in service_.events
                   if e["event"] in ("partition-failed", "recovery-failed"))  # fmt: skip
        assert records(data_dir)[0].state is MergeState.WRITTEN
        assert not (data_dir / POD_A / OUTPUT).exists()

        for path in list(fill.iterdir())[:10]:
            path.unlink()
        resumed = service_.wait_for("recovery", lambda e: e["action"] != "failed")
        assert (resumed["found"], resumed["result"]) == ("written", "sources-deleted")
        stop(service_)
    assert_settled(data_dir, before)


# -- RLIMIT_FSIZE: a real short write, then EFBIG ---------------------------------------------


def small_file_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_file_size_limit_gives_a_short_write_and_the_merge_rolls_back(data_dir: Path) -> None:
    make_data(data_dir)  # a ~205 KB output; the journal's files stay far below the limit
    before, sources = rows_pyarrow(data_dir), data_files(data_dir)
    result = run_once(data_dir, preexec_fn=small_file_limit(128 * 1024))
    assert result.returncode == 0, result.stderr
    assert "File too large" in result.stderr and "event=merge-failed" in result.stderr
    assert data_files(data_dir) == sources and tmp_files(data_dir) == []
    [record] = records(data_dir)
    assert record.state is MergeState.ROLLED_BACK

    assert run_once(data_dir).returncode == 0
    assert_settled(data_dir, before)


class ShortWrites:
    """A file that takes at most `chunk` bytes per write, as a write near a limit does."""

    def __init__(self, path: Path, chunk: int) -> None:
        self.handle = open(path, "wb", buffering=0)  # noqa: SIM115
        self.chunk = chunk
        self.calls = 0

    def write(self, data: bytes | memoryview) -> int:
        self.calls += 1
        return int(self.handle.write(memoryview(data)[: self.chunk]) or 0)

    def flush(self) -> None:
        self.handle.flush()


def test_short_writes_are_completed_not_dropped(tmp_path: Path) -> None:
    """Regression: the sink took one write call as the whole buffer; a short write would have
    shifted every later byte and been caught, at best, by the size check."""
    handle = ShortWrites(tmp_path / "out", 7)
    sink = durable.Sink(handle)  # type: ignore[arg-type]
    payload = bytes(range(256)) * 3
    assert sink.write(payload[:100]) == 100
    assert sink.write(payload[100:]) == len(payload) - 100
    handle.handle.close()
    assert (tmp_path / "out").read_bytes() == payload
    assert handle.calls >= len(payload) // 7


def test_a_write_that_takes_nothing_raises() -> None:
    class Stuck:
        def write(self, _data: object) -> int:
            return 0

    with pytest.raises(OSError, match="write returned 0"):
        durable.write_all(Stuck(), b"abc")  # type: ignore[arg-type]


# -- the backoff itself -----------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    backoff = Backoff(10.0)
    waits = [backoff.failed("p", "boom", now=0.0) for _ in range(8)]
    assert waits == [10, 20, 40, 80, 160, 320, 320, 320]
    assert cap_for(300) == 3600 and cap_for(0.1) == pytest.approx(3.2) and cap_for(7200) == 7200
    assert not backoff.due("p", now=319.0) and backoff.due("p", now=320.0)
    assert backoff.due("other", now=0.0)
    backoff.succeeded("p")
    assert backoff.due("p", now=0.0) and backoff.delay("p") == 10


def test_a_failing_partition_is_deferred_while_the_others_merge(
    data_dir: Path, populate: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(PodSpec("pod-a"), PodSpec("pod-b"), rotations=12)
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_files=2, min_age_s=0))
    real = merge.write_merged

    def write_merged(sources: Any, target: Path, *args: Any, **kwargs: Any) -> Any:
        if "pod-a" in str(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real(sources, target, *args, **kwargs)

    monkeypatch.setattr(merge, "write_merged", write_merged)
    backoff = Backoff(3600.0)
    journal = Journal.open(settings.journal_path)
    try:
        first = consolidation_pass(journal, settings, StopFlag(20), backoff)
        second = consolidation_pass(journal, settings, StopFlag(20), backoff)
    finally:
        journal.close()
    assert [(m.partition, m.state, m.retry_later) for m in first.merges] == [
        (POD_A, MergeState.ROLLED_BACK, True),
        ("dt=2025-12-30/identifier=pod-b", MergeState.SOURCES_DELETED, False),
    ]
    assert second.deferred == [POD_A] and second.merges == []
    assert backoff.failures == {POD_A: 1}
