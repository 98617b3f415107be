#!/usr/bin/env python3
"""Scale: does a pass cost grow with the backlog and the journal's history?

One day of 960 files is simulated for each of two identifiers, then hard-linked under later
dates to make a backlog of `--days` days. The backlog is consolidated day by day into one data
directory and one journal (one `run --once` per day, both identifiers), so each pass sees the
history of every earlier pass: seconds per file should stay flat. Then passes with nothing to
do run after each day and over the whole consolidated backlog: each should cost well under a
second, and not grow with the backlog. CPU seconds (not wall) are compared across days,
because other processes on the same cores inflate wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import benchlib

from fgm_consolidator.layout import default_journal_path

IDENTIFIERS = ("fine-grained-monitor-0", "fine-grained-monitor-1")
FLAT_MARGIN = 1.5  # a ratio of seconds per file under this counts as flat on 2 shared cores
IDLE_TARGET_S = 1.0


@dataclass(frozen=True)
class Pass:
    label: str
    files: int  # new metrics files this pass had to merge
    files_on_disk: int  # parquet files in the data directory when it started
    merges_before: int | None
    journal_bytes: int
    run: benchlib.ChildRun

    @property
    def seconds(self) -> float:
        """The pass itself, from its log; the process wall if the log line is missing."""
        logged = benchlib.pass_duration(self.run.stderr)
        return self.run.wall_s if logged is None else logged

    @property
    def cpu_per_file(self) -> float | None:
        """CPU rather than wall: other processes on the same cores inflate wall time."""
        return self.run.cpu_s / self.files if self.files else None


@dataclass(frozen=True)
class Day:
    work: Pass  # the pass that merged the day
    idle: Pass  # a pass right after it, with nothing to do


def journal_merges(data_dir: Path) -> int | None:
    """Merges in the journal so far (read-only): 0 before the first pass, None when the
    journal does not read."""
    path = default_journal_path(data_dir)
    if not path.exists():
        return 0
    with contextlib.suppress(sqlite3.Error):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (count,) = con.execute("SELECT count(*) FROM merges").fetchone()
            return int(count)
        finally:
            con.close()
    return None


def journal_size(data_dir: Path) -> int:
    path = default_journal_path(data_dir)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) if path.exists() else 0


def consolidate(label: str, data_dir: Path, files: int) -> Pass:
    merges = journal_merges(data_dir)
    on_disk = len(benchlib.parquet_files(data_dir))
    run = benchlib.run_consolidator(data_dir)
    return Pass(label, files, on_disk, merges, journal_size(data_dir), run)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = benchlib.common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=7, help="days of backlog per identifier")
    parser.add_argument("--rotations", type=int, default=benchlib.ROTATIONS_PER_DAY)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--containers", type=int, default=2)
    parser.add_argument("--stride", type=int, default=10, help="seconds between rows")
    parser.add_argument("--idle-passes", type=int, default=3, help="passes with nothing to do")
    args = parser.parse_args(argv)
    if args.quick:
        args.days, args.rotations, args.metrics, args.idle_passes = 2, 16, 5, 1
    if args.days < 1 or args.idle_passes < 1:
        parser.error("--days and --idle-passes must be at least 1")
    return args


def print_report(days: Sequence[Day], final_idle: Sequence[Pass]) -> None:
    rates = [d.work.cpu_per_file or 0.0 for d in days]
    idles = [d.idle.seconds for d in days]
    growth = benchlib.ratio(rates[-1], rates[0])
    idle_pass = statistics.median(p.seconds for p in final_idle)
    benchlib.print_table(
        "Cost per file as the history grows, and a pass with nothing to do",
        [
            "CPU per file, last day / first day",
            "CPU per file, slowest / fastest day",
            "idle pass, after last / after first day",
            "idle pass s over the whole backlog",
            "idle process wall s",
            f"flat (< {FLAT_MARGIN}x)",
            f"idle pass < {IDLE_TARGET_S:.0f} s",
        ],
        [
            [
                growth,
                benchlib.ratio(max(rates), min(rates)),
                benchlib.ratio(idles[-1], idles[0]),
                benchlib.seconds(idle_pass),
                benchlib.seconds(statistics.median(p.run.wall_s for p in final_idle)),
                "met" if rates[0] and rates[-1] / rates[0] < FLAT_MARGIN else "MISSED",
                "met" if idle_pass < IDLE_TARGET_S else "MISSED",
            ]
        ],
    )
    benchlib.print_table(
        "Passes (pass s from the pass-finished log line, CPU of the whole process;"
        " each day's merging pass is followed by an idle one)",
        [
            "pass",
            "new files",
            "files on disk before",
            "merges",
            "merges in journal before",
            "journal kB after",
            "pass s",
            "CPU s",
            "CPU ms per new file",
            "vs day 1",
        ],
        [_row(p, rates[0]) for d in days for p in (d.work, d.idle)]
        + [_row(p, rates[0]) for p in final_idle],
    )


def _row(item: Pass, first_rate: float) -> list[object]:
    rate = item.cpu_per_file
    return [
        item.label,
        item.files,
        item.files_on_disk,
        benchlib.merge_count(item.run.stderr),
        "-" if item.merges_before is None else item.merges_before,
        f"{item.journal_bytes / 1e3:,.0f}",
        benchlib.seconds(item.seconds),
        benchlib.seconds(item.run.cpu_s),
        f"{rate * 1000:.2f}" if rate is not None else "-",
        benchlib.ratio(rate, first_rate) if rate is not None else "-",
    ]


def run(args: argparse.Namespace, work: Path) -> int:
    shape = benchlib.DayShape(
        metrics=args.metrics,
        containers=args.containers,
        rotations=args.rotations,
        stride=args.stride,
    )
    benchlib.print_header(
        "Scale: a backlog consolidated day by day into one journal",
        options={
            "backlog": f"{args.days} days x {len(IDENTIFIERS)} identifiers",
            "day": shape.describe(),
        },
    )
    first = benchlib.past_day(args.days + 3)
    source = work / "source"
    benchlib.generate_day(source, first, shape, identifiers=IDENTIFIERS, seed=args.seed)
    data_dir = work / "data"
    data_dir.mkdir()
    days = []
    for number in range(args.days):
        files = sum(
            benchlib.replicate_shifted(
                benchlib.partition_dir(source, first, name),
                data_dir,
                name,
                timedelta(days=number),
            )
            for name in IDENTIFIERS
        )
        label = f"day {number + 1}"
        work_pass = consolidate(label, data_dir, files)
        days.append(Day(work_pass, consolidate(f"{label}, idle", data_dir, 0)))
    idle = [consolidate(f"backlog idle {n + 1}", data_dir, 0) for n in range(args.idle_passes)]
    print_report(days, idle)
    leftover = [p for p in benchlib.parquet_files(data_dir) if p.name.startswith("metrics-")]
    idle_merges = [benchlib.merge_count(p.run.stderr) for p in (*idle, *(d.idle for d in days))]
    if leftover or any(idle_merges):
        print(f"unexpected: {len(leftover)} metrics files left, or an idle pass merged")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return benchlib.in_work_dir(args.work_dir, args.keep, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
