"""What the benchmark scripts share: the machine line, child processes measured one at a time,
simulated days and their cheap replicas, page-cache eviction, Markdown tables.

The benchmarks measure whatever version of fgm-consolidator is installed (the console script
next to this interpreter), so the same scripts compare two versions of the output layout.
Everything that shapes a result is printed with it: the machine, the package version and
where it was loaded from, and the options of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeAlias

import pyarrow as pa
import pyarrow.parquet as pq

try:
    from fgm_consolidator import simulate
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fgm_consolidator import simulate

Era: TypeAlias = simulate.Era
ROTATIONS_PER_DAY = 960
# A busy node per FORMATS.md: ~200k rows per 90 s file. 50 metrics x 45 containers x 90 s
# = 202,500 rows; `--scale` multiplies the containers, so rows per file scale with it.
BUSY_CONTAINERS = 45
DEFAULT_METRICS = 50
# Containers on a real node live for hours (1 h to a day here), not minutes as in the tests.
NODE_CONTAINER_LIFETIME = (40, ROTATIONS_PER_DAY)
PARQUET_GLOB = "dt=*/identifier=*/*.parquet"


class BenchError(Exception):
    """A benchmark step failed; the message names the command or path and the reason."""


# -- the machine and what is measured ---------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def installed_version(distribution: str) -> str | None:
    """A distribution's version without importing it (an import would cost memory)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_line(*extra: str) -> str:
    """One line: CPU model, cores, RAM, kernel, python, pyarrow and any `extra` tools."""
    memory = _memory_bytes()
    parts = [
        _cpu_model(),
        f"{os.cpu_count()} cores",
        f"{memory / 2**30:.1f} GiB RAM" if memory else "RAM unknown",
        f"Linux {platform.release()}",
        f"python {platform.python_version()}",
        f"pyarrow {pa.__version__}",
    ]
    for name in extra:
        parts.append(f"{name} {installed_version(name) or 'not installed'}")
    return "machine: " + ", ".join(parts)


def package_line() -> str:
    """Which fgm-consolidator is measured: version, source folder and git commit if any."""
    source = Path(simulate.__file__).resolve().parent
    line = f"measured: fgm-consolidator {installed_version('fgm-consolidator')} from {source}"
    git = ["git", "-C", str(source)]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
        line += f" (git {commit}{', uncommitted changes' if dirty else ''})"
    return line


def print_header(
    title: str, *extra_tools: str, options: Mapping[str, object] | None = None
) -> None:
    print(f"## {title}\n")
    print(machine_line(*extra_tools))
    print(package_line())
    if options:
        print("options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    print(flush=True)


# -- Markdown ---------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    print(f"### {title}\n")
    print(markdown_table(headers, rows))
    print(flush=True)


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def megabytes(size: float) -> str:
    return f"{size / 1e6:.1f}"


def mebibytes(size: float) -> str:
    return f"{size / 2**20:.1f}"


def seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# -- child processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildRun:
    """One finished child: its own wall, CPU and peak RSS (from wait4, not a poll)."""

    command: tuple[str, ...]
    returncode: int
    wall_s: float
    user_s: float
    system_s: float
    max_rss_bytes: int
    stdout: str
    stderr: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    def tail(self, lines: int = 15) -> str:
        return "\n".join((self.stderr or self.stdout).strip().splitlines()[-lines:])


# Spawns the measured command and reports its rusage. A child's ru_maxrss is not its own:
# exec records the high-water RSS of the memory it replaces, and a child forked (or vforked)
# from this benchmark starts with the benchmark's memory, so a 20 MiB command measured
# straight from a 300 MiB parent reads 300 MiB. This launcher is a bare interpreter of about
# 10 MiB, so the command it spawns starts from that.
_LAUNCHER = """
import json, os, sys, time
report, command = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(command[0], command, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(report, "w") as out:
    json.dump({"code": os.waitstatus_to_exitcode(status), "wall": wall, "user": usage.ru_utime,
               "system": usage.ru_stime, "maxrss_kib": usage.ru_maxrss}, out)
"""


def run_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> ChildRun:
    """Run `command` to completion and take its own wall, CPU and peak RSS (see _LAUNCHER)."""
    full_env = {**os.environ, **(env or {})}
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r", suffix=".json") as report,
    ):
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, report.name, *command]
        launched = subprocess.run(launcher, stdout=out, stderr=err, env=full_env, check=False)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        try:
            usage = json.load(report)
        except ValueError as exc:
            raise BenchError(
                f"{command[0]}: could not be started (launcher exit {launched.returncode}):"
                f" {stderr.strip()[-500:]}"
            ) from exc
    return ChildRun(
        command=tuple(command),
        returncode=usage["code"],
        wall_s=usage["wall"],
        user_s=usage["user"],
        system_s=usage["system"],
        max_rss_bytes=usage["maxrss_kib"] * 1024,  # KiB on Linux
        stdout=stdout,
        stderr=stderr,
    )


def consolidator_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("fgm-consolidator")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fgm_consolidator"]


def run_consolidator(
    data_dir: Path,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    check: bool = True,
) -> ChildRun:
    """`fgm-consolidator run --once --min-age 0` on `data_dir`; with `check`, a failure stops
    the benchmark."""
    command = [
        *consolidator_command(),
        "run",
        "--once",
        "--min-age",
        "0",
        "--data-dir",
        str(data_dir),
        *extra,
    ]
    run = run_child(command, env)
    if check and run.returncode != 0:
        raise BenchError(f"{' '.join(command)} exited {run.returncode}:\n{run.tail()}")
    return run


_PASS_RE = re.compile(r"event=pass-finished .*?\bduration_s=(?P<s>[0-9.]+)")


def pass_duration(stderr: str) -> float | None:
    """The last pass's own duration from its `pass-finished` log line, without process start."""
    found = _PASS_RE.findall(stderr)
    return float(found[-1]) if found else None


def merge_count(stderr: str) -> int:
    return stderr.count("event=merge-finished")


# -- simulated data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DayShape:
    """Rows per file = (rotation_seconds / stride) x metrics x containers."""

    metrics: int
    containers: int
    rotations: int = ROTATIONS_PER_DAY
    stride: int = 1
    lifetime: tuple[int, int] = NODE_CONTAINER_LIFETIME

    @classmethod
    def from_scale(
        cls, scale: float, metrics: int = DEFAULT_METRICS, rotations: int = ROTATIONS_PER_DAY
    ) -> DayShape:
        """`scale` 1.0 = a busy node (~200k rows per file); containers scale with it."""
        if scale <= 0:
            raise BenchError(f"--scale must be positive, not {scale}")
        containers = max(1, int(BUSY_CONTAINERS * scale + 0.5))
        return cls(metrics=metrics, containers=containers, rotations=rotations)

    @property
    def rows_per_file(self) -> int:
        return -(-90 // self.stride) * self.metrics * self.containers

    def describe(self) -> str:
        return (
            f"{self.rotations} files x {self.rows_per_file} rows ({self.metrics} metrics x "
            f"{self.containers} containers, 1 row per {self.stride} s)"
        )


def metric_names(count: int) -> list[str]:
    """The metric names a simulated day of `count` metrics holds."""
    return [metric.name for metric in simulate.metric_catalog(count)]


def past_day(days_ago: int) -> date:
    """A closed UTC day, so the consolidator's day-over rule merges every file of it."""
    return datetime.now(UTC).date() - timedelta(days=days_ago)


def generate_day(
    data_dir: Path,
    day: date,
    shape: DayShape,
    *,
    identifiers: Sequence[str] = ("fine-grained-monitor-0",),
    era: Era = "flat",
    seed: int = 0,
) -> simulate.SimulationSummary:
    """`shape.rotations` files from midnight of `day` for each identifier, written by one
    process per core: the simulator builds rows in Python, the slowest step of every
    benchmark, and each file is a pure function of the spec and its rotation."""
    spec = simulate.SimulationSpec(
        pods=tuple(simulate.PodSpec(name, era=era) for name in identifiers),
        start=datetime(day.year, day.month, day.day, tzinfo=UTC),
        rotations=shape.rotations,
        metrics=shape.metrics,
        containers=shape.containers,
        seconds_per_row_sample=shape.stride,
        seed=seed,
        container_lifetime=shape.lifetime,
    )
    workers = max(1, min(os.cpu_count() or 1, shape.rotations // 8))
    shares = [range(i, shape.rotations, workers) for i in range(workers)]
    if workers == 1:
        return simulate.generate(data_dir, spec)
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = list(pool.map(partial(simulate.generate, data_dir, spec), shares))
    return simulate.SimulationSummary(
        files=sum(p.files for p in parts),
        rows=sum(p.rows for p in parts),
        bytes=sum(p.bytes for p in parts),
        companions=sum(p.companions for p in parts),
    )


def partition_dir(data_dir: Path, day: date, identifier: str) -> Path:
    return data_dir / f"dt={day.isoformat()}" / f"identifier={identifier}"


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs nothing and survives the consolidator unlinking the other name."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def link_tree(source_dir: Path, target_dir: Path) -> None:
    """Every data file under `source_dir` (not our journal) linked into `target_dir`."""
    for path in sorted(source_dir.rglob("*")):
        relative = path.relative_to(source_dir)
        if path.is_dir() or relative.parts[0].startswith("."):
            continue
        (target_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target_dir / relative)


_MONITOR_NAME = re.compile(r"^metrics-(?P<stamp>\d{8}T\d{6}Z)(?P<suffix>\.parquet|\.containers)$")
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def replicate_shifted(source: Path, data_dir: Path, identifier: str, shift: timedelta) -> int:
    """Link a monitor partition's files (and companions) under `identifier`, each renamed to
    its stamp + `shift` and placed in the date partition of the new stamp.

    The rows still carry the source's timestamps: the consolidator plans by name and never
    looks at row values, so for it this is simply more data. Returns the parquet files linked.
    """
    count = 0
    for path in sorted(source.iterdir()):
        match = _MONITOR_NAME.match(path.name)
        if match is None:
            continue
        stamp = datetime.strptime(match["stamp"], _STAMP_FORMAT).replace(tzinfo=UTC) + shift
        target = partition_dir(data_dir, stamp.date(), identifier)
        target.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target / f"metrics-{stamp.strftime(_STAMP_FORMAT)}{match['suffix']}")
        count += match["suffix"] == ".parquet"
    return count


def parquet_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob(PARQUET_GLOB))


def total_size(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def single_value(stats: pq.Statistics | None) -> bool:
    """Row-group statistics that name one value: for `metric_name`, a row group a reader
    looking for any other metric skips. Without statistics it cannot skip it."""
    return bool(stats is not None and stats.has_min_max and stats.min == stats.max)


# -- page cache -------------------------------------------------------------------------------


def evict(paths: Iterable[Path]) -> None:
    """Drop the files from the page cache (dirty pages are written first: they cannot go)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def device_read_bytes() -> int | None:
    """Bytes this process made the kernel fetch from storage (not from the page cache)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return None


# -- command line -----------------------------------------------------------------------------


def common_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work-dir", type=Path, help="where to build data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed and choices")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test only")
    return parser


@contextlib.contextmanager
def work_dir(requested: Path | None, keep: bool) -> Iterator[Path]:
    """A fresh folder (or `requested`, which must be empty), removed unless `keep`."""
    if requested is None:
        path = Path(tempfile.mkdtemp(prefix="fgm-bench-"))
    else:
        path = requested
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise BenchError(f"{path}: not empty; the benchmark needs a fresh work dir")
    try:
        yield path
    finally:
        if keep:
            print(f"work dir kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def report_error(exc: BenchError) -> int:
    print(f"Error: {exc}", file=sys.stderr)
    return 1


def in_work_dir(work_dir_arg: Path | None, keep: bool, body: Callable[[Path], int]) -> int:
    """Run a benchmark's body in the folder `--work-dir`/`--keep` ask for; a BenchError becomes
    a report and an exit code, the one way every script fails."""
    try:
        with work_dir(work_dir_arg, keep) as work:
            return body(work)
    except BenchError as exc:
        return report_error(exc)
