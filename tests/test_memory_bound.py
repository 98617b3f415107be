"""Invariant 8: memory is bounded by the row-group buffer, not by the data volume.

The benchmark (`scripts/bench_memory.py`) measures the whole process's RSS, but its quick run
is too small to tell a bounded writer from one that holds every row, and it asserts nothing.
Here one merge of 2 sources and one of 20 run each in a fresh process, and Arrow's own count
of the bytes it had allocated at peak is compared: ten times the rows must not cost more.
A writer that buffered the whole output (the sorter's buffer unbounded) peaked at 8.6 MB for
2 sources and 78 MB for 20; the bounded one at 6.0 MB for both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = 20_000  # per source: ~2.9 MB decoded, 10 metrics x 97 containers
METRICS = 10
SCHEMA = pa.schema(
    [
        ("run_id", pa.utf8()),
        ("time", pa.timestamp("ms")),
        ("fetch_index", pa.uint64()),
        ("metric_name", pa.utf8()),
        ("metric_kind", pa.utf8()),
        ("value_int", pa.uint64()),
        ("value_float", pa.float64()),
        ("l_container_id", pa.utf8()),
        ("value_histogram", pa.binary()),
    ]
)

# Runs in a fresh process, so that Arrow's peak counts this merge alone.
MERGE = """
import json, sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from fgm_consolidator import durable
from fgm_consolidator.writer import WriteOptions, WriteSource, write_merged

folder = Path(sys.argv[1])
paths = sorted(folder.glob("metrics-*.parquet"))
schema = pq.read_schema(paths[0])
sources = [WriteSource(p, durable.identity(p), pq.read_metadata(p).num_rows) for p in paths]
pool = pa.default_memory_pool()
before = pool.max_memory()
result = write_merged(
    sources, folder / "out.parquet.tmp", schema, WriteOptions(row_group_bytes=1_000_000),
    metadata={},
)
print(json.dumps({"before": before, "peak": pool.max_memory(), "rows": result.rows}))
"""


def source(index: int) -> pa.Table:
    base = index * ROWS
    return pa.table(
        {
            "run_id": ["run"] * ROWS,
            "time": pa.array([(base + i) * 1000 for i in range(ROWS)], pa.timestamp("ms")),
            "fetch_index": pa.array(range(base, base + ROWS), pa.uint64()),
            "metric_name": [f"metric.{i % METRICS}" for i in range(ROWS)],
            "metric_kind": ["gauge"] * ROWS,
            "value_int": pa.array([None] * ROWS, pa.uint64()),
            "value_float": [float(base + i) for i in range(ROWS)],
            "l_container_id": [f"c{(base + i) % 97:011d}" for i in range(ROWS)],
            "value_histogram": pa.array([b"x" * 64] * ROWS, pa.binary()),
        },
        schema=SCHEMA,
    )


def peak_of_merge(folder: Path, count: int) -> tuple[int, int]:
    """Arrow's peak allocation while merging `count` sources, and the sources' decoded size."""
    folder.mkdir()
    decoded = 0
    for index in range(count):
        table = source(index)
        decoded += table.nbytes
        pq.write_table(table, folder / f"metrics-{index:04d}.parquet", compression="zstd")
    done = subprocess.run(
        [sys.executable, "-c", MERGE, str(folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["before"] < 1_000_000  # nothing but the merge is counted
    assert figures["rows"] == count * ROWS
    return figures["peak"], decoded


def test_ten_times_the_rows_need_no_more_memory(tmp_path: Path) -> None:
    small, small_decoded = peak_of_merge(tmp_path / "small", 2)
    large, large_decoded = peak_of_merge(tmp_path / "large", 20)
    assert large_decoded >= 10 * small_decoded * 0.99
    # Bounded: the larger merge may cost a little more (dictionaries, one more run parked),
    # never in proportion to its rows; and far below what holding its rows would take.
    assert large <= small * 1.5 + 2_000_000, (small, large)
    assert large < large_decoded / 4, (large, large_decoded)
