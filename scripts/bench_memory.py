#!/usr/bin/env python3
"""Memory: peak RSS of a whole `fgm-consolidator run --once` process at two input volumes.

One block of busy-node files (default: one hour, 40 rotations of ~200k rows) is simulated
once, then hard-linked under later stamps to build a smaller and a larger data directory
(the larger at least 2 GB and at least 10x the smaller). Each volume is consolidated by one
child process and its peak RSS is taken from wait4 when it exits: the whole process, Python,
pyarrow and the allocator included, which is what a Kubernetes memory limit sees.

    bench_memory.py [--options] [-- extra `run` options, e.g. --row-group-size 16]
    bench_memory.py --env ARROW_DEFAULT_MEMORY_POOL=system
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import benchlib

TARGET_MIB = 128
TARGET_SPREAD = 0.10
IDENTIFIER = "fine-grained-monitor-0"


@dataclass(frozen=True)
class Volume:
    name: str
    blocks: int
    files: int
    bytes_in: int
    run: benchlib.ChildRun
    bytes_out: int
    outputs: int


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = benchlib.common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="1.0 = a busy node, ~200k rows per file"
    )
    parser.add_argument("--metrics", type=int, default=benchlib.DEFAULT_METRICS)
    parser.add_argument(
        "--block-rotations", type=int, default=40, help="files simulated once (40 = 1 hour)"
    )
    parser.add_argument("--small-blocks", type=int, default=2, help="blocks in the smaller volume")
    parser.add_argument(
        "--min-large-mb", type=float, default=2000, help="the larger volume is at least this"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the consolidator (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.metrics, args.block_rotations = 0.05, 10, 4
        args.small_blocks, args.min_large_mb = 1, 0
    return args, extra


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise benchlib.BenchError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def build_volume(block: Path, data_dir: Path, blocks: int, span: timedelta) -> int:
    """`blocks` copies of the block, back to back in time, as one monitor's history."""
    return sum(
        benchlib.replicate_shifted(block, data_dir, IDENTIFIER, span * number)
        for number in range(blocks)
    )


def measure(
    name: str,
    block: Path,
    data_dir: Path,
    blocks: int,
    span: timedelta,
    extra: Sequence[str],
    env: Mapping[str, str],
) -> Volume:
    files = build_volume(block, data_dir, blocks, span)
    bytes_in = benchlib.total_size(benchlib.parquet_files(data_dir))
    run = benchlib.run_consolidator(data_dir, extra, env)
    outputs = benchlib.parquet_files(data_dir)
    return Volume(name, blocks, files, bytes_in, run, benchlib.total_size(outputs), len(outputs))


def floor_run(env: Mapping[str, str]) -> benchlib.ChildRun:
    """The process before it reads any data: interpreter, click, pyarrow, sqlite."""
    return benchlib.run_child([*benchlib.consolidator_command(), "--version"], env)


def print_report(small: Volume, large: Volume, floor: benchlib.ChildRun) -> None:
    spread = large.run.max_rss_bytes / small.run.max_rss_bytes - 1
    peak = max(small.run.max_rss_bytes, large.run.max_rss_bytes)
    benchlib.print_table(
        "Peak RSS of the whole process, larger vs smaller input",
        [
            "input ratio",
            "peak RSS ratio",
            "smaller: peak RSS MiB",
            "larger: peak RSS MiB",
            f"<= {TARGET_MIB} MiB both",
            f"larger within {TARGET_SPREAD:.0%}",
        ],
        [
            [
                benchlib.ratio(large.bytes_in, small.bytes_in),
                benchlib.ratio(large.run.max_rss_bytes, small.run.max_rss_bytes),
                benchlib.mebibytes(small.run.max_rss_bytes),
                benchlib.mebibytes(large.run.max_rss_bytes),
                "met" if peak <= TARGET_MIB * 2**20 else "MISSED",
                "met" if spread <= TARGET_SPREAD else "MISSED",
            ]
        ],
    )
    benchlib.print_table(
        "Volumes",
        [
            "volume",
            "input files",
            "input MB",
            "outputs",
            "output MB",
            "merges",
            "wall s",
            "CPU s",
            "MB/s",
            "peak RSS MiB",
        ],
        [_volume_row(v) for v in (small, large)]
        + [
            [
                "floor: `fgm-consolidator --version`",
                "-",
                "-",
                "-",
                "-",
                "-",
                benchlib.seconds(floor.wall_s),
                benchlib.seconds(floor.cpu_s),
                "-",
                benchlib.mebibytes(floor.max_rss_bytes),
            ]
        ],
    )
    if peak > TARGET_MIB * 2**20:
        over = peak / 2**20 - TARGET_MIB
        times = peak / 2**20 / TARGET_MIB
        print(f"target {TARGET_MIB} MiB MISSED by {over:.1f} MiB ({times:.2f}x the target)")


def _volume_row(volume: Volume) -> list[object]:
    run = volume.run
    return [
        volume.name,
        volume.files,
        benchlib.megabytes(volume.bytes_in),
        volume.outputs,
        benchlib.megabytes(volume.bytes_out),
        benchlib.merge_count(run.stderr),
        benchlib.seconds(run.wall_s),
        benchlib.seconds(run.cpu_s),
        f"{volume.bytes_in / 1e6 / run.wall_s:.1f}",
        benchlib.mebibytes(run.max_rss_bytes),
    ]


def run(args: argparse.Namespace, extra: list[str], work: Path) -> int:
    env = parse_env(args.env)
    shape = benchlib.DayShape.from_scale(args.scale, args.metrics, rotations=args.block_rotations)
    benchlib.print_header(
        "Memory: peak RSS of `fgm-consolidator run --once`",
        options={
            "block": shape.describe(),
            "extra run options": " ".join(extra) or "none",
            "env": " ".join(args.env) or "none",
        },
    )
    source = work / "block"
    day = benchlib.past_day(30)
    benchlib.generate_day(source, day, shape, identifiers=(IDENTIFIER,), seed=args.seed)
    block = benchlib.partition_dir(source, day, IDENTIFIER)
    block_bytes = benchlib.total_size(block.glob("*.parquet"))
    span = timedelta(seconds=90 * shape.rotations)
    large_blocks = max(
        10 * args.small_blocks, math.ceil(args.min_large_mb * 1e6 / max(block_bytes, 1))
    )
    small = measure("smaller", block, work / "small", args.small_blocks, span, extra, env)
    large = measure("larger", block, work / "large", large_blocks, span, extra, env)
    print_report(small, large, floor_run(env))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(argv)
    return benchlib.in_work_dir(args.work_dir, args.keep, lambda work: run(args, extra, work))


if __name__ == "__main__":
    sys.exit(main())
