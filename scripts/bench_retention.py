"""Measure journal retention: size before and after a prune, with and without compaction.

Builds a journal of N synthetic finished merges (24 sources and 5 transitions each, like a
real hour of 90 s files), most of them older than the retention, then prunes it the way the
service does and reports database + WAL bytes and the time each step took. Strategies:

- `none`: prune only; freed pages stay in the file for later inserts to reuse;
- `vacuum`: prune, then VACUUM and a TRUNCATE checkpoint (what `retention` does);
- `incremental`: journal created with auto_vacuum=INCREMENTAL, prune, then
  `PRAGMA incremental_vacuum` and a TRUNCATE checkpoint.

    python scripts/bench_retention.py --merges 10000 --old-fraction 0.9

`--steady-days N` instead runs N days of a service: `--merges` merges a day, then the daily
prune (`retention.prune`, 30 days), and prints the journal's size every 10 days.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fgm_consolidator import retention
from fgm_consolidator.journal import Journal

STATES = ["planned", "writing", "written", "renamed", "sources-deleted"]


def fill(path: Path, merges: int, old_fraction: float, now: datetime, first_id: int = 1) -> None:
    """Bulk insert in one transaction (the real service commits each step; same rows)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    old = int(merges * old_fraction)
    for merge_id in range(first_id, first_id + merges):
        age = timedelta(days=60) if merge_id - first_id < old else timedelta(days=1)
        at = (now - age + timedelta(seconds=merge_id)).isoformat(timespec="milliseconds")
        start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(hours=merge_id)
        partition = f"dt={start.date()}/identifier=pod-{merge_id % 7}"
        conn.execute(
            "INSERT INTO merges (id, partition, output, era, policy, rows_in, bytes_in,"
            " has_companion, output_rows, output_bytes, output_checksum)"
            " VALUES (?, ?, ?, 'flat', ?, ?, ?, 1, ?, ?, ?)",
            (
                merge_id,
                partition,
                f"consolidated-{start:%Y%m%dT%H%M%SZ}-{start:%Y%m%dT%H%M%SZ}.parquet",
                json.dumps({"min_files": 10, "min_age_s": 300.0}),
                24 * 200_000,
                24 * 2_500_000,
                24 * 200_000,
                50_000_000,
                "ab" * 32,
            ),
        )
        for position in range(24):
            stamp = start + timedelta(seconds=90 * position)
            conn.execute(
                "INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    merge_id,
                    position,
                    f"metrics-{stamp:%Y%m%dT%H%M%SZ}.parquet",
                    merge_id * 100 + position,
                    2_500_000,
                    1_700_000_000_000_000_000,
                    200_000,
                    "cd" * 32,
                    merge_id * 100 + position + 50,
                    900,
                    1_700_000_000_000_000_000,
                ),
            )
        for state in STATES:
            conn.execute(
                "INSERT INTO transitions (merge_id, state, at, actor) VALUES (?, ?, ?, 'merge')",
                (merge_id, state, at),
            )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def measure(strategy: str, merges: int, old_fraction: float, folder: Path) -> dict[str, object]:
    path = folder / strategy / "journal.db"
    path.parent.mkdir()
    if strategy == "incremental":
        # The mode is fixed by the first table created on the connection that set it.
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("CREATE TABLE x (a)")
        conn.execute("DROP TABLE x")
        conn.close()
    now = datetime.now(UTC)
    journal = Journal.open(path)
    journal.close()
    fill(path, merges, old_fraction, now)
    journal = Journal.open(path)
    before = retention.journal_bytes(path)
    cutoff = (now - timedelta(days=30)).isoformat(timespec="milliseconds")
    t0 = time.perf_counter()
    counts = journal.prune(cutoff=cutoff, at=now.isoformat(timespec="milliseconds"))
    t1 = time.perf_counter()
    after_prune = retention.journal_bytes(path)
    free = journal.free_fraction()
    if strategy == "incremental":
        journal.db.conn.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page
    journal.compact(vacuum=strategy == "vacuum")
    t2 = time.perf_counter()
    after = retention.journal_bytes(path)
    journal.close()
    return {
        "strategy": strategy,
        "merges": merges,
        "pruned": counts.merges,
        "bytes_before": before,
        "bytes_after_prune_incl_wal": after_prune,
        "free_fraction_after_prune": round(free, 3),
        "bytes_after": after,
        "prune_s": round(t1 - t0, 3),
        "compact_s": round(t2 - t1, 3),
    }


def steady(days: int, per_day: int, folder: Path) -> None:
    path = folder / "steady.db"
    Journal.open(path).close()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for day in range(days):
        now = start + timedelta(days=day + 1)
        fill(path, per_day, 0.0, now, first_id=day * per_day + 1)  # finished a day before `now`
        journal = Journal.open(path)
        report = retention.prune(journal, 30, now, data_dir=folder)
        journal.close()
        if (day + 1) % 10 == 0:
            print(json.dumps({"day": day + 1, "bytes": retention.journal_bytes(path),
                              "pruned": report.merges, "vacuumed": report.vacuumed}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--merges", type=int, default=10_000)
    parser.add_argument("--old-fraction", type=float, default=0.9)
    parser.add_argument("--steady-days", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fgm-retention-") as tmp:
        if args.steady_days:
            steady(args.steady_days, args.merges, Path(tmp))
            return
        for strategy in ("none", "vacuum", "incremental"):
            print(json.dumps(measure(strategy, args.merges, args.old_fraction, Path(tmp))))


if __name__ == "__main__":
    main()
