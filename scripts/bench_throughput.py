#!/usr/bin/env python3
"""Throughput and cost: one partition consolidated by fgm-consolidator and by the tools a user
would reach for instead, each in its own child process (wall, CPU and peak RSS from wait4).

- fgm-consolidator: `run --once --min-age 0` on a hard-linked copy of the data directory;
- duckdb: `COPY (SELECT * FROM read_parquet(files, union_by_name = true)) TO out (FORMAT
  parquet, COMPRESSION zstd, COMPRESSION_LEVEL 3)`;
- polars: `scan_parquet(files, schema=<every file's columns>, missing_columns="insert")
  .sink_parquet(out, compression="zstd", compression_level=3)`;
- pyarrow: `dataset.write_dataset(dataset(files, schema=unify_schemas(...)), out, zstd level 3)`.
Every tool is told to write ZSTD level 3: the monitor's level, our default, and DuckDB's and
polars' own. pyarrow's own default is level 1, which compresses less for less CPU (a 40-file
flat output 5% larger): a codec setting, not a faster copy, and not what the targets compare.
Each alternative is given what it needs to keep the `l_*` columns that differ between files
(union by name / a unified schema); without that, all three fail or drop columns.

Those three copy rows in arrival order, which is not the layout that makes the viewer fast
(rows grouped by metric, arrival order kept within each). Two more runs show what that layout
costs the alternatives: `duckdb-by-metric` (the same COPY with `ORDER BY metric_name, filename,
file_row_number`) and `polars-by-metric` (`.sort("metric_name", maintain_order=True)` before
the sink). They are reported beside the targets, not judged by them: the targets name the
plain commands.

Fidelity is checked for every tool: the output's Arrow types per column against the input's,
and the rows as a multiset (DuckDB: count and sum of a hash of each row over all columns,
read back with union by name) - values can survive a type change, so both are reported.
A flat-era and a map-era partition are both run, so dictionary labels are exercised.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import pyarrow as pa
import pyarrow.parquet as pq

TOOLS = (
    "fgm-consolidator",
    "duckdb",
    "polars",
    "pyarrow",
    "duckdb-by-metric",
    "polars-by-metric",
)
# The alternatives made to lay rows out as fgm-consolidator does; not judged by the targets.
BY_METRIC = ("duckdb-by-metric", "polars-by-metric")
ZSTD_LEVEL = 3  # every tool's output level, given to each (see the docstring)
INVOCATIONS = {
    "fgm-consolidator": "fgm-consolidator run --once --min-age 0 --data-dir <copy>"
    f" --compression-level {ZSTD_LEVEL}",
    "duckdb": "COPY (SELECT * FROM read_parquet(files, union_by_name = true)) TO out"
    f" (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL {ZSTD_LEVEL})",
    "polars": "pl.scan_parquet(files, schema=<all files' columns>, missing_columns='insert')"
    f".sink_parquet(out, compression='zstd', compression_level={ZSTD_LEVEL})",
    "pyarrow": "ds.write_dataset(ds.dataset(files, schema=pa.unify_schemas(<all>)), out,"
    f" file_options=<zstd, level {ZSTD_LEVEL}>)",
    "duckdb-by-metric": "COPY (SELECT * EXCLUDE (filename, file_row_number) FROM"
    " read_parquet(files, union_by_name = true, filename = true, file_row_number = true)"
    " ORDER BY metric_name, filename, file_row_number) TO out (FORMAT parquet,"
    f" COMPRESSION zstd, COMPRESSION_LEVEL {ZSTD_LEVEL})",
    "polars-by-metric": "pl.scan_parquet(...).sort('metric_name', maintain_order=True)"
    f".sink_parquet(out, compression='zstd', compression_level={ZSTD_LEVEL})",
}
SKIPPED = 3  # a worker's exit code when its tool is not installed
ERAS: tuple[benchlib.Era, ...] = ("flat", "map")


# -- the workers: each runs alone in a child, importing only its own tool ---------------------


def _inputs(source: Path) -> list[str]:
    return [str(p) for p in sorted(source.glob("*.parquet"))]


def work_duckdb(source: Path, output: Path, by_metric: bool = False) -> None:
    import duckdb

    query = (
        "SELECT * EXCLUDE (filename, file_row_number) FROM read_parquet($1,"
        " union_by_name = true, hive_partitioning = false, filename = true,"
        " file_row_number = true) ORDER BY metric_name, filename, file_row_number"
        if by_metric
        else "SELECT * FROM read_parquet($1, union_by_name = true, hive_partitioning = false)"
    )
    con = duckdb.connect()
    con.execute(
        f"COPY ({query}) TO '{output / 'duckdb.parquet'}'"
        f" (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL {ZSTD_LEVEL})",
        [_inputs(source)],
    )


def work_polars(source: Path, output: Path, by_metric: bool = False) -> None:
    import polars as pl

    files = _inputs(source)
    schema: dict[str, Any] = {}
    for path in files:
        schema.update(pl.read_parquet_schema(path))
    frame = pl.scan_parquet(files, schema=schema, missing_columns="insert")
    if by_metric:
        frame = frame.sort("metric_name", maintain_order=True)  # stable: arrival order kept
    frame.sink_parquet(output / "polars.parquet", compression="zstd", compression_level=ZSTD_LEVEL)


def work_pyarrow(source: Path, output: Path) -> None:
    import pyarrow.dataset as ds

    files = _inputs(source)
    schema = pa.unify_schemas([pq.read_schema(path) for path in files])
    dataset = ds.dataset(files, schema=schema, format="parquet")
    options = ds.ParquetFileFormat().make_write_options(
        compression="zstd", compression_level=ZSTD_LEVEL
    )
    ds.write_dataset(dataset, output, format="parquet", file_options=options)


WORKERS: dict[str, Callable[[Path, Path], None]] = {
    "duckdb": work_duckdb,
    "polars": work_polars,
    "pyarrow": work_pyarrow,
    "duckdb-by-metric": functools.partial(work_duckdb, by_metric=True),
    "polars-by-metric": functools.partial(work_polars, by_metric=True),
}


def worker_main(tool: str, source: Path, output: Path) -> int:
    try:
        WORKERS[tool](source, output)
    except ImportError as exc:
        print(f"skipped: {tool} is not installed ({exc})")
        return SKIPPED
    return 0


# -- measuring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fidelity:
    types: str  # "exact" or what changed
    values: str  # "kept", "n/a" or what differs


@dataclass(frozen=True)
class Outcome:
    era: str
    tool: str
    bytes_in: int
    run: benchlib.ChildRun | None
    outputs: list[Path]
    fidelity: Fidelity | None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.run is not None and self.run.returncode == 0

    @property
    def cpu_per_gb(self) -> float | None:
        return self.run.cpu_s / (self.bytes_in / 1e9) if self.ok and self.run else None


def run_tool(tool: str, era: str, partition: Path, work: Path, check: bool = True) -> Outcome:
    """`partition` is a monitor partition folder; nothing of it is changed. `check`: compare
    types and values (one DuckDB pass over inputs and outputs)."""
    bytes_in = benchlib.total_size(partition.glob("*.parquet"))
    target = work / f"{era}-{tool}"
    if target.exists():
        shutil.rmtree(target)  # an earlier round's
    if tool == "fgm-consolidator":
        data_dir = target / "data"
        benchlib.link_tree(partition.parents[1], data_dir)
        level = ["--compression-level", str(ZSTD_LEVEL)]
        run = benchlib.run_consolidator(data_dir, level, check=False)
        outputs = benchlib.parquet_files(data_dir)
    else:
        target.mkdir(parents=True)
        run = benchlib.run_child(
            [sys.executable, __file__, "--worker", tool, str(partition), str(target)]
        )
        outputs = sorted(target.rglob("*.parquet"))
    if run.returncode == SKIPPED:
        return Outcome(era, tool, bytes_in, None, [], None, run.stdout.strip())
    if run.returncode != 0:
        return Outcome(era, tool, bytes_in, run, [], None, f"failed: {run.tail(3)}")
    fidelity = check_fidelity(partition, outputs) if check else None
    return Outcome(era, tool, bytes_in, run, outputs, fidelity)


def median_outcome(rounds: Sequence[Outcome]) -> Outcome:
    """One tool's rounds as one: the median wall, CPU and peak RSS, and the first round's
    fidelity. A round that failed or was skipped stands for the tool."""
    first = rounds[0]
    failed = next((o for o in rounds if not o.ok or o.run is None), None)
    if failed is not None:
        return failed
    runs = [o.run for o in rounds if o.run is not None]
    run = dataclasses.replace(
        runs[0],
        wall_s=statistics.median(r.wall_s for r in runs),
        # The median CPU, user and system together, so that `cpu_s` gives it.
        user_s=statistics.median(r.cpu_s for r in runs),
        system_s=0.0,
        max_rss_bytes=int(statistics.median(r.max_rss_bytes for r in runs)),
    )
    return dataclasses.replace(first, run=run, outputs=rounds[-1].outputs)


def _types(paths: Sequence[Path]) -> dict[str, pa.Field]:
    """Column name -> Arrow field, as a reader of each file's footer sees it."""
    fields: dict[str, pa.Field] = {}
    for path in paths:
        for item in pq.read_schema(path):
            fields.setdefault(item.name, item)
    return fields


def _contract_order(names: Sequence[str], base: Sequence[str]) -> list[str]:
    """FORMATS.md's column order: base columns, `l_*` sorted (or `labels`), histogram last."""

    def rank(name: str) -> tuple[int, int, str]:
        if name == "value_histogram":
            return (2, 0, name)
        if name.startswith("l_") or name == "labels":
            return (1, 0, name)
        return (0, base.index(name) if name in base else len(base), name)

    return sorted(names, key=rank)


def compare_types(inputs: Sequence[Path], outputs: Sequence[Path]) -> str:
    """What changed, one entry per kind of change with the columns it hit."""
    before, after = _types(inputs), _types(outputs)
    changes = [f"{name} lost" for name in before if name not in after]
    changes += [f"{name} added" for name in after if name not in before]
    grouped: dict[str, list[str]] = {}
    for name, item in before.items():
        other = after.get(name)
        if other is None:
            continue
        if not other.type.equals(item.type):
            grouped.setdefault(f"{item.type} -> {other.type}", []).append(name)
        if other.nullable != item.nullable:
            grouped.setdefault(f"nullable {item.nullable} -> {other.nullable}", []).append(name)
    changes += [f"{change}: {', '.join(names)}" for change, names in grouped.items()]
    base = pq.read_schema(inputs[0]).names
    for path in outputs:
        names = pq.read_schema(path).names
        if names != _contract_order(names, base):
            changes.append(f"column order of {path.name}: {', '.join(names[-3:])} last")
            break
    return "; ".join(changes) if changes else "exact"


def _fingerprint(paths: Sequence[Path], columns: Sequence[str]) -> tuple[int, int]:
    """Rows and the sum of a hash per row: equal for equal multisets of rows. A map is hashed
    as its entries, so a map written as a list of key/value structs hashes the same."""
    import duckdb

    con = duckdb.connect()
    source = "read_parquet($1, union_by_name = true, hive_partitioning = false)"
    files = [str(p) for p in paths]
    described = con.execute(f"DESCRIBE SELECT * FROM {source}", [files]).fetchall()
    types = {row[0]: str(row[1]) for row in described}
    terms = [f'map_entries("{c}")' if types[c].startswith("MAP(") else f'"{c}"' for c in columns]
    row = con.execute(
        f"SELECT count(*), coalesce(sum(hash({', '.join(terms)})), 0) FROM {source}", [files]
    ).fetchone()
    con.close()
    if row is None:
        raise benchlib.BenchError(f"{paths[0].parent}: DuckDB returned no fingerprint")
    return int(row[0]), int(row[1])


def compare_values(inputs: Sequence[Path], outputs: Sequence[Path]) -> str:
    if benchlib.installed_version("duckdb") is None:
        return "n/a (duckdb not installed)"
    columns = sorted(_types(inputs))
    lost = [c for c in columns if c not in _types(outputs)]
    if lost:
        return "columns lost: " + ", ".join(lost)
    rows_in, hash_in = _fingerprint(inputs, columns)
    rows_out, hash_out = _fingerprint(outputs, columns)
    if rows_in != rows_out:
        return f"rows {rows_in:,} -> {rows_out:,}"
    return "kept" if hash_in == hash_out else "DIFFER (same row count)"


def check_fidelity(partition: Path, outputs: Sequence[Path]) -> Fidelity:
    inputs = sorted(partition.glob("*.parquet"))
    if not outputs:
        return Fidelity("no output", "no output")
    return Fidelity(compare_types(inputs, outputs), compare_values(inputs, outputs))


# -- reporting --------------------------------------------------------------------------------


def print_report(outcomes: Sequence[Outcome], every_round: Sequence[Sequence[Outcome]]) -> None:
    ours = {o.era: o for o in outcomes if o.tool == "fgm-consolidator" and o.ok}
    rows = []
    for o in outcomes:
        base = ours.get(o.era)
        run, ref = o.run, base.run if base else None
        rows.append(
            [
                o.era,
                o.tool,
                benchlib.ratio(o.cpu_per_gb, base.cpu_per_gb if base else None) if o.ok else "-",
                benchlib.ratio(run.max_rss_bytes, ref.max_rss_bytes if ref else None)
                if o.ok and run
                else "-",
                ("yes" if o.fidelity.types == "exact" else "no") if o.fidelity else "-",
                o.fidelity.values if o.fidelity else o.note or "-",
            ]
        )
    benchlib.print_table(
        "Consolidating one partition, relative to fgm-consolidator (lower is better)",
        ["era", "tool", "CPU s per GB", "peak RSS", "types exact", "rows and values"],
        rows,
    )
    benchlib.print_table(
        "Absolute figures (one child process per tool)",
        [
            "era",
            "tool",
            "MB in",
            "wall s",
            "CPU s",
            "CPU s per GB in",
            "peak RSS MiB",
            "output files",
            "MB out",
            "row groups of one metric",
        ],
        [_absolute_row(o) for o in outcomes],
    )
    print_rounds(every_round)
    benchlib.print_table(
        "Type changes",
        ["era", "tool", "types"],
        [[o.era, o.tool, o.fidelity.types if o.fidelity else o.note] for o in outcomes],
    )
    for line in [*target_lines(outcomes), *paired_lines(every_round)]:
        print(line)
    print(f"\ninvocations (ZSTD level {ZSTD_LEVEL} for every tool):")
    for tool in dict.fromkeys(o.tool for o in outcomes):
        print(f"- {tool}: `{INVOCATIONS[tool]}`")


def print_rounds(every_round: Sequence[Sequence[Outcome]]) -> None:
    """Each round's CPU seconds, so the spread behind each median is in the report: on a
    shared machine one tool's rounds have differed by a third."""
    width = max(len(rounds) for rounds in every_round)
    if width < 2:
        return
    benchlib.print_table(
        "CPU s of each round (rounds run in turn, every tool once per round)",
        ["era", "tool", *(f"round {n + 1}" for n in range(width))],
        [
            [
                rounds[0].era,
                rounds[0].tool,
                *(benchlib.seconds(o.run.cpu_s) if o.ok and o.run else "-" for o in rounds),
            ]
            for rounds in every_round
        ],
    )


def paired_lines(every_round: Sequence[Sequence[Outcome]]) -> list[str]:
    """Our CPU over each alternative's, round by round, and the median of those ratios. Each
    alternative runs in the same round as ours, a minute or two apart, so a machine that is
    slow for minutes slows both: the ratio within a round keeps less of that noise than the
    ratio of two medians, which may come from different rounds."""
    lines = []
    for era in dict.fromkeys(rounds[0].era for rounds in every_round):
        here = {rounds[0].tool: rounds for rounds in every_round if rounds[0].era == era}
        ours = here.get("fgm-consolidator", [])
        for tool, theirs in here.items():
            if not is_compared(tool):
                continue
            ratios = [
                mine.run.cpu_s / other.run.cpu_s
                for mine, other in zip(ours, theirs, strict=False)
                if mine.ok and other.ok and mine.run and other.run and other.run.cpu_s > 0
            ]
            if ratios:
                each = ", ".join(f"{r:.2f}x" for r in ratios)
                lines.append(
                    f"paired ({era}): fgm-consolidator / {tool} CPU per round: {each}"
                    f" (median {statistics.median(ratios):.2f}x)"
                )
    return lines


def _absolute_row(o: Outcome) -> list[object]:
    if not o.ok or o.run is None:
        return [o.era, o.tool, benchlib.megabytes(o.bytes_in), *["-"] * 6, o.note or "skipped"]
    return [
        o.era,
        o.tool,
        benchlib.megabytes(o.bytes_in),
        benchlib.seconds(o.run.wall_s),
        benchlib.seconds(o.run.cpu_s),
        f"{o.cpu_per_gb:.1f}" if o.cpu_per_gb is not None else "-",
        benchlib.mebibytes(o.run.max_rss_bytes),
        len(o.outputs),
        benchlib.megabytes(benchlib.total_size(o.outputs)),
        one_metric_row_groups(o.outputs),
    ]


def one_metric_row_groups(paths: Sequence[Path]) -> str:
    """How many row groups a reader can skip for every metric but one: those whose
    `metric_name` statistics say min == max. "k / n"; row groups without statistics count
    as mixed, since a reader cannot prune them either."""
    single = total = 0
    for path in paths:
        metadata = pq.read_metadata(path)
        column = metadata.schema.names.index("metric_name")
        for index in range(metadata.num_row_groups):
            total += 1
            single += benchlib.single_value(metadata.row_group(index).column(column).statistics)
    return f"{single} / {total}"


def is_compared(tool: str) -> bool:
    """An alternative the targets (and the paired ratios) compare us with: the plain commands,
    not the sorted variants."""
    return tool != "fgm-consolidator" and tool not in BY_METRIC


def target_lines(outcomes: Sequence[Outcome]) -> list[str]:
    lines = []
    for era in dict.fromkeys(o.era for o in outcomes):
        here = [o for o in outcomes if o.era == era and o.ok and o.run is not None]
        ours = next((o for o in here if o.tool == "fgm-consolidator"), None)
        others = [o for o in here if is_compared(o.tool)]
        if ours is None or ours.run is None or not others:
            lines.append(
                f"targets ({era}): not judged (fgm-consolidator or every alternative missing)"
            )
        else:
            lines += _judged(era, ours, others, here)
        if ours is not None and ours.run is not None:
            lines += [
                f"same layout ({era}): {o.tool} uses"
                f" {benchlib.ratio(o.cpu_per_gb, ours.cpu_per_gb)} the CPU and"
                f" {benchlib.ratio(o.run.max_rss_bytes, ours.run.max_rss_bytes)} the peak RSS"
                for o in here
                if o.tool in BY_METRIC and o.run is not None
            ]
    return lines


def _judged(
    era: str, ours: Outcome, others: Sequence[Outcome], here: Sequence[Outcome]
) -> list[str]:
    fastest = min(others, key=lambda o: o.cpu_per_gb or 0.0)
    leanest = min(others, key=lambda o: o.run.max_rss_bytes if o.run else 0)
    cpu_ok = (ours.cpu_per_gb or 0.0) <= (fastest.cpu_per_gb or 0.0)
    rss = ours.run.max_rss_bytes if ours.run else 0
    lean_rss = leanest.run.max_rss_bytes if leanest.run else 0
    exact = [o.tool for o in here if o.fidelity and o.fidelity.types == "exact"]
    return [
        f"target ({era}): CPU s per GB <= fastest alternative ({fastest.tool}):"
        f" {ours.cpu_per_gb:.1f} vs {fastest.cpu_per_gb:.1f} ({'met' if cpu_ok else 'MISSED'})",
        f"target ({era}): peak RSS <= half the leanest ({leanest.tool}):"
        f" {benchlib.mebibytes(rss)} vs {benchlib.mebibytes(lean_rss)} MiB"
        f" ({'met' if rss <= lean_rss / 2 else 'MISSED'})",
        f"target ({era}): only fgm-consolidator keeps every type: exact = {exact or 'none'}"
        f" ({'met' if exact == ['fgm-consolidator'] else 'MISSED'})",
    ]


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = benchlib.common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=0.1, help="1.0 = a busy node, ~200k rows per file"
    )
    parser.add_argument("--metrics", type=int, default=benchlib.DEFAULT_METRICS)
    parser.add_argument("--rotations", type=int, default=480, help="files per partition")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    parser.add_argument(
        "--rounds",
        type=int,
        help="runs of every tool, interleaved; each figure is their median (default 3, --quick 1)",
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("TOOL", "SOURCE", "OUTPUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.metrics, args.rotations = 0.07, 10, 16
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    unknown = set(args.tools.split(",")) - set(TOOLS)
    if unknown:
        parser.error(
            f"--tools: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TOOLS)}"
        )
    return args


def run(args: argparse.Namespace, work: Path) -> int:
    shape = benchlib.DayShape.from_scale(args.scale, args.metrics, rotations=args.rotations)
    tools = [t for t in TOOLS if t in args.tools.split(",")]
    benchlib.print_header(
        "Throughput and cost: one partition, fgm-consolidator vs the alternatives",
        "duckdb",
        "polars",
        options={
            "partition": shape.describe(),
            "eras": "flat, map",
            "tools": ", ".join(tools),
            "rounds": f"{args.rounds} (tools interleaved; median of each figure)",
        },
    )
    day = benchlib.past_day(5)
    outcomes, every_round = [], []
    for era in ERAS:
        identifier = f"monitor-{era}"
        source = work / f"source-{era}"
        benchlib.generate_day(
            source, day, shape, identifiers=(identifier,), era=era, seed=args.seed
        )
        partition = benchlib.partition_dir(source, day, identifier)
        # Round-robin, so that load from elsewhere on a shared machine hits every tool alike.
        rounds: dict[str, list[Outcome]] = {tool: [] for tool in tools}
        for index in range(args.rounds):
            for tool in tools:
                rounds[tool].append(run_tool(tool, era, partition, work, check=index == 0))
        outcomes += [median_outcome(rounds[tool]) for tool in tools]
        every_round += [rounds[tool] for tool in tools]
    print_report(outcomes, every_round)
    failed = [o for o in outcomes if o.tool == "fgm-consolidator" and not o.ok]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        tool, source, output = args.worker
        return worker_main(tool, Path(source), Path(output))
    return benchlib.in_work_dir(args.work_dir, args.keep, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
