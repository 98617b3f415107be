"""A source whose `time` is stored as legacy INT96 (legal parquet; Spark, Impala and pyarrow's
`use_deprecated_int96_timestamps` write it).

Found by an adversarial fidelity review. pyarrow reads INT96 as timestamp[ns] whatever
the stored Arrow schema says, and silently wraps a value outside 1677-2262. DuckDB and polars
read the source right (2500-01-01, 1600-01-01, and polars as Datetime(ms) from the stored
schema). The merge read the source through pyarrow and wrote what it got: the output held the
wrapped instants (1915-06-14..., 2184-07-20...) as INT64 ns, which every reader then believes.
Either the output holds the instants the source holds, or the source is kept and reported.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import run_cli
from test_fidelity import BASE, HISTOGRAM
from test_source_metadata import PARTITION, row, write_source

from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path

# 2025-12-30 08:00:00.123, 2500-01-01, 1600-01-01, 1970-01-01: the middle two outside ns range.
INSTANTS_MS = [1767081600123, 16725225600000, -11676096000000, 0]


def write_int96_sources(data_dir: Path) -> None:
    schema = pa.schema([*BASE, pa.field("l_container_id", pa.utf8()), HISTOGRAM])
    for rotation in range(2):
        table = pa.Table.from_pylist(
            [row(10 * rotation + i, container_id="c1") for i in range(len(INSTANTS_MS))], schema
        )
        times = pa.array(INSTANTS_MS, pa.int64()).cast(pa.timestamp("ms"))
        table = table.set_column(1, schema.field("time"), times)
        path = write_source(data_dir, rotation, table)
        # rewrite with INT96 time, keeping the aged mtime
        stat = path.stat()
        pq.write_table(table, path, compression="zstd", use_deprecated_int96_timestamps=True)
        os.utime(path, (stat.st_atime, stat.st_mtime))


def duckdb_times(data_dir: Path) -> Counter[str]:
    con = duckdb.connect()
    times: Counter[str] = Counter()
    for path in sorted((data_dir / PARTITION).glob("*.parquet")):
        times.update(
            value
            for (value,) in con.execute(
                "SELECT time::VARCHAR FROM read_parquet(?, hive_partitioning = false)", [str(path)]
            ).fetchall()
        )
    return times


def test_int96_times_outside_the_nanosecond_range_are_kept_or_the_file_refused(
    data_dir: Path,
) -> None:
    write_int96_sources(data_dir)
    sources = sorted(p.name for p in (data_dir / PARTITION).glob("*.parquet"))
    before = duckdb_times(data_dir)
    assert before["2500-01-01 00:00:00"] == 2
    assert before["1600-01-01 00:00:00"] == 2

    result = run_cli(
        "run", "--once", "--min-age", "0", "--min-files", "2", "--data-dir", str(data_dir)
    )
    assert result.returncode in (0, 1), result.stderr

    after = sorted(p.name for p in (data_dir / PARTITION).glob("*.parquet"))
    if after == sources:  # refused: kept, and said so
        journal = Journal.open(default_journal_path(data_dir), read_only=True)
        try:
            assert journal.unreadable(), "sources kept but not reported"
        finally:
            journal.close()
        return
    assert duckdb_times(data_dir) == before
