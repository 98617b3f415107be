"""The README's first command: simulate a monitor, consolidate with the real engine, compare.

It proves on the spot what the project promises: fewer files, the same rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq

from .journal import Journal, MergeRecord
from .layout import default_journal_path, iter_partitions, parse_data_file
from .plan import Policy
from .service import Settings, StopFlag, run_service
from .simulate import PodSpec, SimulationSpec, generate

DEMO_PODS = (
    PodSpec("demo-pod-a", era="flat"),
    PodSpec("demo-pod-b", era="map", switch_to_flat_at=60),
)


@dataclass(frozen=True)
class DirectoryCount:
    files: Counter[str]  # partition -> parquet files
    rows: int


@dataclass(frozen=True)
class DemoReport:
    data_dir: Path
    before: DirectoryCount
    after: DirectoryCount
    history: list[MergeRecord]


def count_files(data_dir: Path) -> DirectoryCount:
    files: Counter[str] = Counter()
    rows = 0
    for partition in iter_partitions(data_dir):
        for path in sorted((data_dir / partition).iterdir()):
            if parse_data_file(path.name) is not None:
                files[partition] += 1
                rows += pq.read_metadata(path).num_rows
    return DirectoryCount(files, rows)


def run_demo(data_dir: Path, *, hours: float = 3.0, seed: int = 7) -> DemoReport:
    rotations = int(hours * 3600 // 90)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=hours + 1)
    spec = SimulationSpec(
        pods=DEMO_PODS, start=start, rotations=rotations, seconds_per_row_sample=5, seed=seed
    )
    generate(data_dir, spec)
    before = count_files(data_dir)
    settings = Settings(data_dir, default_journal_path(data_dir), Policy())
    run_service(settings, StopFlag(grace_s=20.0), once=True)
    after = count_files(data_dir)
    journal = Journal.open(settings.journal_path, read_only=True)
    try:
        history = journal.history()
    finally:
        journal.close()
    return DemoReport(data_dir, before, after, history)
