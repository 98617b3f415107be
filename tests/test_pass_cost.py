"""Per-pass work does not grow with the history kept on disk.

footers.py remembers each footer by the file's identity so that a pass over closed days costs
a stat per file. The memory was an LRU bounded at CAPACITY entries, and every pass walks
every file in the same order: once the data directory held more files than that, each pass
evicted exactly the entries the next one needed first, so the hit rate fell from ~100% to 0%
and every pass parsed every footer again (measured with hourly outputs of 60 metrics: 4,008
files -> 0.5 s a pass, 4,500 files -> 4.4 s a pass, at a capacity of 4,096). Here the capacity
is made small, so that a history larger than it takes seconds to write, not minutes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fgm_consolidator import footers
from fgm_consolidator.journal import Journal
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import Settings, StopFlag, consolidation_pass
from fgm_consolidator.simulate import BASE_FIELDS, HISTOGRAM_FIELD

SCHEMA = pa.schema([*BASE_FIELDS, pa.field("l_container_id", pa.utf8()), HISTOGRAM_FIELD])


def _closed_history(data_dir: Path, files: int) -> None:
    """`files` hourly outputs (one identifier, closed days): a converged history, nothing to
    merge, so a pass over it should only look."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    table = pa.table(
        {
            "run_id": ["r"],
            "time": [0],
            "fetch_index": [0],
            "metric_name": ["m"],
            "metric_kind": ["gauge"],
            "value_int": [None],
            "value_float": [1.0],
            "l_container_id": ["c"],
            "value_histogram": [None],
        },
        schema=SCHEMA,
    )
    for i in range(files):
        t0 = start + timedelta(hours=i)
        t1 = t0 + timedelta(minutes=58, seconds=30)
        folder = data_dir / f"dt={t0:%Y-%m-%d}" / "identifier=node-1"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"consolidated-{t0:%Y%m%dT%H%M%SZ}-{t1:%Y%m%dT%H%M%SZ}.parquet"
        pq.write_table(table, folder / name)


class _CountingParquet:
    """Stands in for `pyarrow.parquet` inside `footers`: counts the footers it parses."""

    def __init__(self) -> None:
        self.parsed = 0

    def ParquetFile(self, *args: Any, **kwargs: Any) -> pq.ParquetFile:
        self.parsed += 1
        return pq.ParquetFile(*args, **kwargs)


CAPACITY = 60


@pytest.mark.parametrize("files", [CAPACITY - 20, CAPACITY + 20])
def test_second_pass_over_a_long_history_parses_only_what_the_memory_cannot_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _closed_history(data_dir, files)
    monkeypatch.setattr(footers, "CAPACITY", CAPACITY)
    monkeypatch.setattr(footers, "_seen", type(footers._seen)())
    counting = _CountingParquet()
    monkeypatch.setattr(footers, "pq", counting)
    journal = Journal.open(data_dir / ".fgm-consolidator" / "journal.db")
    settings = Settings(data_dir, journal.path, policy=Policy(min_age_s=0))
    try:
        first = consolidation_pass(journal, settings, StopFlag(1.0))
        assert not first.merges and not first.errors
        assert counting.parsed >= files  # the first look reads every footer once
        counting.parsed = 0
        second = consolidation_pass(journal, settings, StopFlag(1.0))
        assert not second.merges and not second.errors
    finally:
        journal.close()
    # Nothing changed on disk: the second pass costs a stat per file the memory holds, and
    # footers only for the files beyond it (read by the scan and by the lineage check).
    beyond = max(0, files - CAPACITY)
    assert beyond <= counting.parsed <= 2 * beyond, (
        f"the second pass over {files} unchanged files parsed {counting.parsed} footers again"
    )
