#!/usr/bin/env python3
"""Recovery after a lost journal: peak RSS and CPU of `fgm-consolidator recover` proving an
output by its lineage, at two output sizes ten times apart.

The incident: a merge published its output, the journal was lost (its volume, a restore from
an old backup), and the output's sources are still beside it. Start-up (and `recover`) must
then prove, row by row, that the output holds every source before deleting any (see
`containment.py`), inside the sidecar's memory. One hour of a pod (40 rotations) is
simulated at each scale, consolidated, its sources hard-linked back and the journal removed;
`recover` is then measured in its own child process (wait4), and must remove every source.

    bench_recovery.py [--scale 1.0] [--small-scale 0.1] [--era flat|map]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import benchlib
import pyarrow.parquet as pq

IDENTIFIER = "fine-grained-monitor-0"
TARGET_MIB = 128


@dataclass(frozen=True)
class Proof:
    scale: float
    sources: int
    rows: int
    run: benchlib.ChildRun


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = benchlib.common_arguments(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--scale", type=float, default=1.0, help="the larger output's scale")
    parser.add_argument("--small-scale", type=float, default=0.1, help="the smaller's")
    parser.add_argument("--metrics", type=int, default=benchlib.DEFAULT_METRICS)
    parser.add_argument("--rotations", type=int, default=40, help="sources of the output")
    parser.add_argument("--era", choices=["flat", "map"], default="flat", help="monitor schema")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.small_scale, args.metrics, args.rotations = 0.1, 0.01, 5, 4
    return args


def prove(work: Path, scale: float, args: argparse.Namespace) -> Proof:
    """One output and its sources side by side, journal gone; `recover` measured."""
    shape = benchlib.DayShape.from_scale(scale, args.metrics, rotations=args.rotations)
    day = benchlib.past_day(30)
    block, data_dir = work / f"block-{scale}", work / f"data-{scale}"
    benchlib.generate_day(
        block, day, shape, identifiers=(IDENTIFIER,), era=args.era, seed=args.seed
    )
    benchlib.link_tree(block, data_dir)
    benchlib.run_consolidator(
        data_dir, ["--max-span", str(90 * args.rotations), "--min-files", "2"]
    )
    partition = benchlib.partition_dir(data_dir, day, IDENTIFIER)
    outputs = sorted(partition.glob("consolidated-*.parquet"))
    if len(outputs) != 1:
        raise benchlib.BenchError(f"{partition}: {len(outputs)} outputs, the benchmark needs 1")
    sources = sorted(benchlib.partition_dir(block, day, IDENTIFIER).glob("metrics-*.parquet"))
    for source in sources:
        os.link(source, partition / source.name)
    for journal in (data_dir / ".fgm-consolidator").glob("journal.db*"):
        journal.unlink()
    run = benchlib.run_child(
        [*benchlib.consolidator_command(), "recover", "--data-dir", str(data_dir)]
    )
    left = sorted(partition.glob("metrics-*.parquet"))
    if run.returncode != 0 or left:
        raise benchlib.BenchError(
            f"recover exited {run.returncode} and left {len(left)} sources:\n{run.tail()}"
        )
    return Proof(scale, len(sources), pq.read_metadata(outputs[0]).num_rows, run)


def row(proof: Proof) -> list[object]:
    return [
        proof.scale,
        proof.sources,
        f"{proof.rows:,}",
        benchlib.mebibytes(proof.run.max_rss_bytes),
        benchlib.seconds(proof.run.cpu_s),
        f"{proof.run.cpu_s / proof.rows * 1e6:.2f}",
    ]


def run(args: argparse.Namespace, work: Path) -> int:
    benchlib.print_header(
        "Recovery: `fgm-consolidator recover` proving one output by its lineage",
        options={
            "sources per output": str(args.rotations),
            "metrics": str(args.metrics),
            "era": args.era,
        },
    )
    small = prove(work, args.small_scale, args)
    large = prove(work, args.scale, args)
    benchlib.print_table(
        "Larger vs smaller output",
        ["rows ratio", "peak RSS ratio", "CPU per row ratio", f"<= {TARGET_MIB} MiB both"],
        [
            [
                benchlib.ratio(large.rows, small.rows),
                benchlib.ratio(large.run.max_rss_bytes, small.run.max_rss_bytes),
                benchlib.ratio(large.run.cpu_s / large.rows, small.run.cpu_s / small.rows),
                "met"
                if max(small.run.max_rss_bytes, large.run.max_rss_bytes) <= TARGET_MIB * 2**20
                else "MISSED",
            ]
        ],
    )
    benchlib.print_table(
        "Absolute figures (every source proven and removed)",
        ["scale", "sources", "output rows", "peak RSS MiB", "CPU s", "CPU µs per row"],
        [row(small), row(large)],
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return benchlib.in_work_dir(args.work_dir, args.keep, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
