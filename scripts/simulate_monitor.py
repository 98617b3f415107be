#!/usr/bin/env python3
"""Fill a data directory the way fine-grained-monitor does, for benchmarks and by-hand tests.

    simulate_monitor.py DATA batch --rotations 960 --pods 3 --era upgrade
    simulate_monitor.py DATA live --interval 90 --pods 2

`batch` writes finished history at once (ending now unless --start is given). `live` behaves
like a running monitor: each window's file appears under its final name when the window opens
(header only, no footer: what a consolidator must leave alone) and is completed when it ends.
SIGTERM/SIGINT flush the current window short, as a graceful monitor shutdown does; SIGKILL
leaves it footer-less, as a crash does.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

try:
    from fgm_consolidator import simulate
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fgm_consolidator import simulate


def _pods(args: argparse.Namespace) -> tuple[simulate.PodSpec, ...]:
    """`--pods 3` names them like monitor pods; `--pods a,b` takes the names as given."""
    names = (
        [f"fine-grained-monitor-{i}" for i in range(int(args.pods))]
        if args.pods.isdigit()
        else [n for n in args.pods.split(",") if n]
    )
    era: simulate.Era = "map" if args.era in ("map", "upgrade") else "flat"
    switch = None
    if args.era == "upgrade":
        planned = args.rotations or args.count
        switch = args.switch_at if args.switch_at is not None else max(planned // 2, 1)
    return tuple(
        simulate.PodSpec(
            identifier=name,
            era=era,
            switch_to_flat_at=switch,
            companions=not args.no_companions,
            companion_version=args.companion_version,
        )
        for name in names
    )


def _parse_start(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _lifetime(text: str) -> tuple[int, int]:
    shortest, _, longest = text.partition(",")
    try:
        return int(shortest), int(longest or shortest)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX rotations") from None


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _spec(args: argparse.Namespace, start: datetime, rotations: int) -> simulate.SimulationSpec:
    return simulate.SimulationSpec(
        pods=_pods(args),
        start=start,
        rotations=rotations,
        rotation_seconds=args.interval,
        metrics=args.metrics,
        containers=args.containers,
        seconds_per_row_sample=args.stride,
        seed=args.seed,
        container_lifetime=args.container_lifetime,
    )


def run_batch(args: argparse.Namespace) -> int:
    start = (
        _parse_start(args.start)
        if args.start
        else _now() - timedelta(seconds=args.rotations * args.interval)
    )
    spec = _spec(args, start, args.rotations)
    began = time.perf_counter()
    summary = simulate.generate(args.data_dir, spec)
    elapsed = time.perf_counter() - began
    print(
        f"wrote {summary.files} files ({summary.rows} rows, {summary.bytes} bytes) and "
        f"{summary.companions} companions in {elapsed:.2f}s"
    )
    return 0


def _install_stop() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run_live(args: argparse.Namespace) -> int:
    """Deadlines are computed from the start, not slept relative, so windows never drift."""
    stop = _install_stop()
    spec = _spec(args, _now(), args.count)
    rotation = 0
    while not stop.is_set() and (args.count == 0 or rotation < args.count):
        start = simulate.rotation_start(spec, rotation)
        handles = simulate.open_rotations(args.data_dir, spec, rotation)
        deadline = start.timestamp() + spec.rotation_seconds
        stop.wait(max(0.0, deadline - time.time()))
        seconds = spec.rotation_seconds
        if stop.is_set():
            seconds = min(seconds, max(1, math.floor(time.time() - start.timestamp())))
        for handle in handles:
            written = handle.finish(seconds)
            print(f"{written.path} rows={written.rows} bytes={written.bytes}", flush=True)
        rotation += 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="the monitor's data directory")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pods", default="1", help="a count, or comma-separated identifiers")
    common.add_argument(
        "--era",
        choices=("flat", "map", "upgrade"),
        default="flat",
        help="upgrade = map era, then flat from --switch-at on (a monitor upgrade)",
    )
    common.add_argument("--switch-at", type=int, help="rotation index of the upgrade")
    common.add_argument("--interval", type=int, default=90, help="rotation seconds")
    common.add_argument("--metrics", type=int, default=20)
    common.add_argument("--containers", type=int, default=4)
    common.add_argument("--stride", type=int, default=1, help="seconds between samples")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--container-lifetime",
        type=_lifetime,
        default=(2, 4),
        metavar="MIN,MAX",
        help="rotations a container lives (default 2,4: heavy churn; a real node: 40,960)",
    )
    common.add_argument("--no-companions", action="store_true")
    common.add_argument("--companion-version", type=int, choices=(1, 2), default=2)
    modes = parser.add_subparsers(dest="mode", required=True)
    batch = modes.add_parser("batch", parents=[common], help="write finished history at once")
    batch.add_argument("--rotations", type=int, default=10, help="files per pod")
    batch.add_argument("--start", help="ISO time of the first window (default: end now)")
    batch.set_defaults(func=run_batch)
    live = modes.add_parser("live", parents=[common], help="write a rotation per interval")
    live.add_argument("--count", type=int, default=0, help="stop after N rotations (0 = never)")
    live.set_defaults(func=run_live, rotations=0)
    batch.set_defaults(count=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
