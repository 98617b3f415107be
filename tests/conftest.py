"""Shared fixtures: simulated monitor data, row oracles read two independent ways, the CLI."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from oracle import canonical_row

from fgm_consolidator import companions, footers
from fgm_consolidator.cli import main
from fgm_consolidator.journal import _migrations
from fgm_consolidator.layout import STATE_DIR, iter_partitions, parse_data_file
from fgm_consolidator.schemas import ARROW_SCHEMA
from fgm_consolidator.simulate import PodSpec, SimulationSpec, SimulationSummary, generate

# A closed day long ago: every file is old enough, and the day-over rule applies.
PAST = datetime(2025, 12, 30, 8, 0, 0, tzinfo=UTC)

Row = tuple[Any, ...]


def stamp(rotation: int) -> str:
    """The stamp of rotation N of `small_spec`, spelled independently of `layout`."""
    return (PAST + timedelta(seconds=90 * rotation)).strftime("%Y%m%dT%H%M%SZ")


def metrics_name(rotation: int) -> str:
    return f"metrics-{stamp(rotation)}.parquet"


def consolidated_name(first: int, last: int) -> str:
    return f"consolidated-{stamp(first)}-{stamp(last)}.parquet"


def small_spec(
    pods: tuple[PodSpec, ...] = (PodSpec("pod-a"),),
    *,
    rotations: int = 24,
    start: datetime = PAST,
    seed: int = 1,
) -> SimulationSpec:
    """Small files (90 rows each) so a test merges dozens of them in well under a second."""
    return SimulationSpec(
        pods=pods,
        start=start,
        rotations=rotations,
        metrics=5,
        containers=2,
        seconds_per_row_sample=10,
        seed=seed,
    )


@pytest.fixture(scope="module")
def fast_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder on tmpfs when there is one, for harnesses that make thousands of trees: a kill
    -9 leaves the page cache alone and the power-loss shim decides itself what is durable, so
    real fsyncs there only cost time (a lot of it on a disk other tests keep busy)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp("fast")
        return
    path = Path(tempfile.mkdtemp(prefix="fgm-tests-", dir=shm))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def scratch(fast_root: Path, request: pytest.FixtureRequest) -> Path:
    """One test's own folder under `fast_root`."""
    path = fast_root / request.node.name
    path.mkdir()
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def populate(data_dir: Path) -> Callable[..., SimulationSummary]:
    def make(*pods: PodSpec, **kwargs: Any) -> SimulationSummary:
        return generate(data_dir, small_spec(pods or (PodSpec("pod-a"),), **kwargs))

    return make


def data_files(data_dir: Path) -> list[Path]:
    """Every parquet file a viewer would read."""
    return [
        data_dir / partition / name
        for partition in iter_partitions(data_dir)
        for name in sorted(os.listdir(data_dir / partition))
        if parse_data_file(name) is not None
    ]


def tmp_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*.tmp"))


def rows_pyarrow(data_dir: Path) -> Counter[Row]:
    rows: Counter[Row] = Counter()
    for path in data_files(data_dir):
        for row in pq.read_table(path).to_pylist():
            rows[canonical_row(row)] += 1
    return rows


def rows_duckdb(data_dir: Path) -> Counter[Row]:
    """The same multiset through DuckDB, a reader that shares no code with pyarrow."""
    import duckdb

    rows: Counter[Row] = Counter()
    con = duckdb.connect()
    for path in data_files(data_dir):
        cursor = con.execute(
            "SELECT * FROM read_parquet(?, hive_partitioning = false)", [str(path)]
        )
        names = [d[0] for d in cursor.description]
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            if isinstance(row.get("labels"), dict):
                row["labels"] = list(row["labels"].items())
            if row.get("time") is not None:
                row["time"] = row["time"].replace(tzinfo=None)
            rows[canonical_row(row)] += 1
    return rows


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real command in a real process, as an operator or Kubernetes would start it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fgm_consolidator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """The CLI in-process, with no FGM_* variable leaking in from the test's environment."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FGM_")}
    clean.update(env or {})
    return CliRunner().invoke(
        main,
        [str(a) for a in args],
        env=clean,
        prog_name="fgm-consolidator",
        catch_exceptions=False,
    )


# The warning every `run --min-age 0` starts with (`config.warn_min_age`): tests take files at
# once on purpose.
MIN_AGE_WARNING = "min-age-below-rotation"


def complaints(stderr: str) -> list[str]:
    """The warning and error lines of a text log, but the one `--min-age 0` starts with."""
    return [
        line
        for line in stderr.splitlines()
        if ("level=warning" in line or "level=error" in line)
        and f"event={MIN_AGE_WARNING} " not in line
    ]


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A command prefix under which file modes apply: root without CAP_DAC_OVERRIDE (as a
    container's non-root user would be), or nothing when we are not root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop the file-mode override")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    locked = tmp_path_factory.mktemp("probe")
    locked.chmod(0o555)
    probe = f"import os, sys; sys.exit(os.access({str(locked)!r}, os.W_OK))"
    try:
        works = subprocess.run([*prefix, sys.executable, "-c", probe], check=False, timeout=60)
    except OSError:
        works = None
    finally:
        locked.chmod(0o755)
    if works is None or works.returncode != 0:
        pytest.skip("cannot drop root's file-mode override here")
    return prefix


def run_as(prefix: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "fgm_consolidator", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def old_journal(path: Path, version: int) -> None:
    """A journal as an older release left it: the first `version` migrations, no later one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for number, sql in _migrations()[:version]:
            conn.executescript(f"BEGIN;\n{sql}\n;PRAGMA user_version = {number:d};\nCOMMIT;")
    finally:
        conn.close()


def clone_tree(source: Path, target: Path) -> Path:
    """A copy of a data directory that shares every data file's inode (hard links), so the
    identities the journal recorded stay true; the state folder is copied, because SQLite
    writes its files in place. Neither recovery nor a pass ever writes into an existing data
    file, so one crashed state can be recovered many times, each clone on its own."""
    for root, _dirs, names in os.walk(source):
        relative = Path(root).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in names:
            if STATE_DIR in relative.parts:
                shutil.copy2(Path(root) / name, target / relative / name)
            else:
                os.link(Path(root) / name, target / relative / name)
    return target


class JournalClock:
    """What `journal.utc_now` returns while installed; a test moves it by setting `at`."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> str:
        return self.at.isoformat(timespec="milliseconds")


def install_journal_clock(monkeypatch: pytest.MonkeyPatch, at: datetime) -> JournalClock:
    from fgm_consolidator import journal

    clock = JournalClock(at)
    monkeypatch.setattr(journal, "utc_now", clock)
    return clock


def add_late_container(folder: Path) -> Path:
    """The monitor rewrites the fourth companion of `folder` with a container it had missed:
    one no output's companion lists. Returns that companion."""
    victim = sorted(folder.glob("metrics-*.containers"))[3]
    sidecar = companions.read_companion(victim)
    extra = companions.Container("late-one", "pod-late", "c", "ns", "uid", "BestEffort")
    victim.write_bytes(companions.encode(replace(sidecar, containers=(*sidecar.containers, extra))))
    return victim


class StopOnceRowsAreRead:
    """A stop flag for a proof that says stop from its second question on: asked once before
    the proof starts, then before each batch of rows it reads. `asked` counts the questions."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked > 1


# What may stand at a lock path instead of a regular file, and how `run` and `status` name it.
def dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere")  # a lock followed through it was created there


def link_to_a_file(path: Path) -> None:
    target = path.parent / "elsewhere"
    target.write_text("pid=1")
    path.symlink_to(target)


LOCK_PATHS = {
    "fifo": (os.mkfifo, "a FIFO"),
    "folder": (os.mkdir, "a folder"),
    "dangling link": (dangling_link, "a symbolic link"),  # `status` said healthy
    "link to a file": (link_to_a_file, "a symbolic link"),
}


def say_stored_schema(path: Path, schema: pa.Schema) -> None:
    """Give the file `path` the stored Arrow schema `schema`, its pages left as they are: a
    file written plain under dictionary types, as the monitor's writer stores text past its
    dictionary page."""
    with path.open("rb") as handle:
        metadata = footers.with_stored_schema(handle, lambda _stored: schema)
    assert metadata is not None
    alone = io.BytesIO()
    metadata.write_metadata_file(alone)  # "PAR1", the footer, its length, "PAR1"
    footer = alone.getvalue()[4:-8]
    data = path.read_bytes()
    length = int.from_bytes(data[-8:-4], "little")
    path.write_bytes(data[: -8 - length] + footer + len(footer).to_bytes(4, "little") + b"PAR1")
    stored = footers.stored_schema((pq.read_metadata(path).metadata or {}).get(ARROW_SCHEMA))
    assert stored is not None and stored.equals(schema)
