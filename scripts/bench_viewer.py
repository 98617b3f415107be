#!/usr/bin/env python3
"""Viewer latency: how long picking a metric takes before and after consolidating a day.

Builds one simulated day for one identifier (flat-label era, the one fgm-viewer reads), links
it into a second folder, consolidates that copy with the installed `fgm-consolidator run
--once`, then times metric selections over both layouts, cold and warm page cache, with:
- `reference`: fgm-viewer's access path (FORMATS.md): every file opened and its footer parsed,
  row groups pruned by `metric_name` min/max statistics, then by the `l_container_id` bloom
  filter when one is present and the selection names a container, then only
  `time, value_int, value_float, l_container_id` (+ `metric_name` to filter) read from the
  surviving row groups, in parallel over files;
- `reference, 1 container`: the same for one container, the case the bloom filter serves;
- `duckdb`: `read_parquet(<glob>) WHERE metric_name = ?`, an independent reader.
Before/after runs are interleaved per metric so that load from other processes hits both.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import benchlib
import parquet_bloom
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

READ_COLUMNS = ("time", "value_int", "value_float", "l_container_id")
METRIC = "metric_name"
CONTAINER = "l_container_id"
LAYOUTS = ("before", "after")
CACHES = ("cold", "warm")
# Issue 4's targets for the reference reader over the consolidated day, cold cache.
TARGET_SPEEDUP = 10.0
TARGET_SECONDS = 2.0


@dataclass(frozen=True)
class Selection:
    metric: str
    container: str | None = None


@dataclass
class ReadCost:
    """What one selection cost a reader; `None` where the reader does not tell."""

    rows: int = 0
    files: int | None = 0
    row_groups: int | None = 0
    bytes: int | None = 0
    bloom_filters: int = 0  # row groups probed whose l_container_id chunk has a filter
    bloom_skips: int = 0

    def add(self, other: ReadCost) -> None:
        self.rows += other.rows
        self.files = _plus(self.files, other.files)
        self.row_groups = _plus(self.row_groups, other.row_groups)
        self.bytes = _plus(self.bytes, other.bytes)
        self.bloom_filters += other.bloom_filters
        self.bloom_skips += other.bloom_skips


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


# -- the reference reader ---------------------------------------------------------------------


def _excluded_by_stats(chunk: pq.ColumnChunkMetaData, metric: str) -> bool:
    stats = chunk.statistics
    if stats is None or not stats.has_min_max:
        return False
    return bool(metric < stats.min or metric > stats.max)


def _has_bloom(chunk: pq.ColumnChunkMetaData) -> bool:
    return bool(chunk.bloom_filter_offset)


class _BloomProbe:
    """Reads bloom filters of one file through its own descriptor, opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.bytes = 0

    def might_contain(self, chunk: pq.ColumnChunkMetaData, value: str) -> bool:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        bitset = parquet_bloom.read_bitset(
            self.fd, chunk.bloom_filter_offset, chunk.bloom_filter_length
        )
        self.bytes += len(bitset)
        return parquet_bloom.might_contain(bitset, value.encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def reference_file(selection: Selection, path: Path) -> ReadCost:
    """One file the way fgm-viewer reads it for one selection."""
    parquet = pq.ParquetFile(path)
    metadata = parquet.metadata
    index = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    columns = [name for name in (*READ_COLUMNS, METRIC) if name in index]
    cost = ReadCost(files=1)
    probe = _BloomProbe(path)
    keep: list[int] = []
    try:
        for number in range(metadata.num_row_groups):
            group = metadata.row_group(number)
            metric_chunk = group.column(index[METRIC]) if METRIC in index else None
            if metric_chunk is not None and _excluded_by_stats(metric_chunk, selection.metric):
                continue
            if selection.container is not None and CONTAINER in index:
                chunk = group.column(index[CONTAINER])
                if _has_bloom(chunk):
                    cost.bloom_filters += 1
                    if not probe.might_contain(chunk, selection.container):
                        cost.bloom_skips += 1
                        continue
            keep.append(number)
    finally:
        probe.close()
    cost.bytes = probe.bytes + sum(
        metadata.row_group(n).column(index[name]).total_compressed_size
        for n in keep
        for name in columns
    )
    cost.row_groups = len(keep)
    if keep:
        table = parquet.read_row_groups(keep, columns=columns, use_threads=False)
        mask = pc.equal(table[METRIC], selection.metric)
        if selection.container is not None:
            if CONTAINER not in index:
                return cost
            mask = pc.and_(mask, pc.equal(table[CONTAINER], selection.container))
        cost.rows = table.filter(mask).num_rows
    return cost


def reference_select(files: Sequence[Path], selection: Selection, threads: int) -> ReadCost:
    total = ReadCost()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for cost in pool.map(partial(reference_file, selection), files):
            total.add(cost)
    return total


# -- DuckDB -----------------------------------------------------------------------------------


def duckdb_select(data_dir: Path, selection: Selection) -> ReadCost:
    """A fresh connection per selection, as a new query would have; DuckDB does not say how
    many row groups it read, so those cells stay empty."""
    import duckdb

    con = duckdb.connect()
    try:
        relation = con.sql(
            "SELECT time, value_int, value_float, l_container_id FROM read_parquet("
            "$1, union_by_name = true, hive_partitioning = false) WHERE metric_name = $2",
            params=[str(data_dir / benchlib.PARQUET_GLOB), selection.metric],
        )
        fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
        table: pa.Table = fetch()
    finally:
        con.close()
    return ReadCost(rows=table.num_rows, files=None, row_groups=None, bytes=None)


# -- measuring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    name: str
    run: Callable[[Path, Sequence[Path], Selection], ReadCost]
    one_container: bool = False


@dataclass(frozen=True)
class Measurement:
    layout: str
    reader: str
    cache: str
    selection: Selection
    seconds: float
    cost: ReadCost
    device_bytes: int | None


@dataclass
class Layout:
    name: str
    data_dir: Path
    files: list[Path] = field(default_factory=list)


def readers(threads: int, with_duckdb: bool) -> list[Reader]:
    def reference(_data_dir: Path, files: Sequence[Path], selection: Selection) -> ReadCost:
        return reference_select(files, selection, threads)

    found = [
        Reader("reference", reference),
        Reader("reference, 1 container", reference, one_container=True),
    ]
    if with_duckdb:
        found.append(Reader("duckdb", lambda data_dir, _files, sel: duckdb_select(data_dir, sel)))
    return found


def measure_once(layout: Layout, reader: Reader, selection: Selection, cache: str) -> Measurement:
    if cache == "cold":
        benchlib.evict(layout.files)
    device_before = benchlib.device_read_bytes()
    started = time.perf_counter()
    cost = reader.run(layout.data_dir, layout.files, selection)
    elapsed = time.perf_counter() - started
    device_after = benchlib.device_read_bytes()
    device = None
    if device_before is not None and device_after is not None:
        device = device_after - device_before
    return Measurement(layout.name, reader.name, cache, selection, elapsed, cost, device)


def measure_all(
    layouts: Sequence[Layout],
    all_readers: Sequence[Reader],
    metrics: Sequence[str],
    container: str,
) -> list[Measurement]:
    """Per metric and reader, both layouts back to back: cold first, which also warms."""
    results = []
    for metric in metrics:
        for reader in all_readers:
            selection = Selection(metric, container if reader.one_container else None)
            for layout in layouts:
                for cache in CACHES:
                    results.append(measure_once(layout, reader, selection, cache))
    return results


# -- describing layouts -----------------------------------------------------------------------

_STAMP = r"\d{8}T\d{6}Z"
_NAME_RE = re.compile(
    rf"^(?:metrics-(?P<start>{_STAMP})|consolidated-{_STAMP}-(?P<end>{_STAMP}))\.parquet$"
)


def viewer_order(path: Path) -> str:
    """The viewer dates `metrics-*` by their stamp and `consolidated-*` by their end stamp."""
    match = _NAME_RE.match(path.name)
    return (match["start"] or match["end"]) if match else ""


def metric_list(files: Sequence[Path]) -> tuple[Path, set[str]]:
    """What the viewer offers: the metrics in the first row group of the newest file."""
    newest = max(files, key=lambda p: (viewer_order(p), p.name))
    column = pq.ParquetFile(newest).read_row_group(0, columns=[METRIC])[METRIC]
    return newest, {str(v) for v in pc.unique(column).to_pylist()}


def _has_page_index(group: pq.RowGroupMetaData) -> bool:
    """An offset index on every column chunk, and a column index on every chunk with
    statistics (a column index is the statistics of each page)."""
    chunks = [group.column(i) for i in range(group.num_columns)]
    return all(
        chunk.has_offset_index and (chunk.has_column_index or chunk.statistics is None)
        for chunk in chunks
    )


def layout_row(layout: Layout) -> list[object]:
    groups = single_metric = blooms = page_index = rows = 0
    sorting: set[str] = set()
    per_group: list[int] = []
    for path in layout.files:
        metadata = pq.read_metadata(path)
        names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
        for number in range(metadata.num_row_groups):
            group = metadata.row_group(number)
            groups += 1
            per_group.append(group.num_rows)
            rows += group.num_rows
            if METRIC in names:
                stats = group.column(names.index(METRIC)).statistics
                single_metric += benchlib.single_value(stats)
            if CONTAINER in names:
                blooms += _has_bloom(group.column(names.index(CONTAINER)))
            page_index += _has_page_index(group)
            sorting.update(str(c) for c in (getattr(group, "sorting_columns", None) or ()))
    return [
        layout.name,
        len(layout.files),
        groups,
        benchlib.megabytes(benchlib.total_size(layout.files)),
        f"{rows:,}",
        f"{int(statistics.median(per_group)):,}" if per_group else "-",
        f"{single_metric}/{groups}",
        f"{blooms}/{groups}",
        f"{page_index}/{groups}",
        "; ".join(sorted(sorting)) or "none",
    ]


# -- reporting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    seconds_median: float
    seconds_max: float
    files: float | None
    row_groups: float | None
    bytes: float | None
    device_bytes: float | None
    bloom_skips: float


def _mean(values: Sequence[int | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(v for v in values if v is not None)


def summarize(found: Sequence[Measurement]) -> Summary:
    return Summary(
        seconds_median=statistics.median(m.seconds for m in found),
        seconds_max=max(m.seconds for m in found),
        files=_mean([m.cost.files for m in found]),
        row_groups=_mean([m.cost.row_groups for m in found]),
        bytes=_mean([m.cost.bytes for m in found]),
        device_bytes=_mean([m.device_bytes for m in found]),
        bloom_skips=statistics.fmean(m.cost.bloom_skips for m in found),
    )


def _cell(value: float | None, fmt: Callable[[float], str] = lambda v: f"{v:,.0f}") -> str:
    return "-" if value is None else fmt(value)


def summaries(
    results: Sequence[Measurement], all_readers: Sequence[Reader]
) -> dict[tuple[str, str, str], Summary]:
    return {
        (layout, reader.name, cache): summarize(
            [m for m in results if (m.layout, m.reader, m.cache) == (layout, reader.name, cache)]
        )
        for reader in all_readers
        for cache in CACHES
        for layout in LAYOUTS
    }


def print_ratios(table: dict[tuple[str, str, str], Summary], readers_: Sequence[Reader]) -> None:
    rows = []
    for reader in readers_:
        for cache in CACHES:
            before, after = table["before", reader.name, cache], table["after", reader.name, cache]
            rows.append(
                [
                    reader.name,
                    cache,
                    benchlib.ratio(before.seconds_median, after.seconds_median),
                    benchlib.ratio(before.row_groups, after.row_groups),
                    benchlib.ratio(before.bytes, after.bytes),
                    benchlib.seconds(before.seconds_median),
                    benchlib.seconds(after.seconds_median),
                ]
            )
    benchlib.print_table(
        "Speed-up of one metric selection, consolidated vs unconsolidated day (median)",
        [
            "reader",
            "cache",
            "speed-up",
            "row groups read, before/after",
            "MB read, before/after",
            "before s",
            "after s",
        ],
        rows,
    )


def print_details(table: dict[tuple[str, str, str], Summary]) -> None:
    rows = [
        [
            layout,
            reader,
            cache,
            _cell(s.files),
            _cell(s.row_groups, lambda v: f"{v:,.1f}"),
            _cell(s.bytes, benchlib.megabytes),
            _cell(s.device_bytes, benchlib.megabytes),
            benchlib.seconds(s.seconds_median),
            benchlib.seconds(s.seconds_max),
        ]
        for (layout, reader, cache), s in table.items()
    ]
    benchlib.print_table(
        "Per selection (mean over metrics; seconds median and max)",
        [
            "layout",
            "reader",
            "cache",
            "files opened",
            "row groups read",
            "MB read",
            "MB from storage",
            "s median",
            "s max",
        ],
        rows,
    )


def correctness_rows(results: Sequence[Measurement]) -> tuple[list[list[object]], bool]:
    """Rows per selection must not depend on the layout, nor on the reader."""
    rows: list[list[object]] = []
    ok = True
    counts: dict[tuple[str, Selection, str], set[int]] = {}
    for m in results:
        counts.setdefault((m.reader, m.selection, m.layout), set()).add(m.cost.rows)
    for reader, selection in dict.fromkeys((m.reader, m.selection) for m in results):
        before = counts[reader, selection, "before"]
        after = counts[reader, selection, "after"]
        same = len(before) == 1 and before == after
        ok &= same
        label = selection.metric + (f" @ {selection.container}" if selection.container else "")
        rows.append([reader, label, *sorted(before), *sorted(after), "yes" if same else "NO"])
    plain = {(m.selection, m.layout): m.cost.rows for m in results if not m.selection.container}
    readers_agree = all(
        m.cost.rows == plain[m.selection, m.layout] for m in results if not m.selection.container
    )
    return rows, ok and readers_agree


def eviction_verdict(results: Sequence[Measurement]) -> str:
    cold = [m for m in results if m.cache == "cold" and m.reader == "reference"]
    warm = [m for m in results if m.cache == "warm" and m.reader == "reference"]
    if any(m.device_bytes is None for m in cold + warm):
        return "page-cache eviction: unknown (/proc/self/io is not readable here)"
    fetched = sum(m.device_bytes or 0 for m in cold)
    asked = sum(m.cost.bytes or 0 for m in cold)
    warm_fetched = sum(m.device_bytes or 0 for m in warm)
    effective = asked > 0 and fetched >= 0.5 * asked
    verdict = "effective" if effective else "NOT effective"
    return (
        f"page-cache eviction (posix_fadvise DONTNEED): {verdict} - cold reference runs fetched"
        f" {benchlib.megabytes(fetched)} MB from storage for {benchlib.megabytes(asked)} MB of"
        f" column chunks; warm runs {benchlib.megabytes(warm_fetched)} MB"
    )


def target_lines(table: dict[tuple[str, str, str], Summary]) -> list[str]:
    before, after = table["before", "reference", "cold"], table["after", "reference", "cold"]
    speedup = before.seconds_median / after.seconds_median if after.seconds_median else 0.0
    lines = [
        f"target: reference reader, cold, >= {TARGET_SPEEDUP:.0f}x faster: {speedup:.2f}x"
        f" ({'met' if speedup >= TARGET_SPEEDUP else 'MISSED'})",
        f"target: reference reader, cold, consolidated day < {TARGET_SECONDS:.0f} s per"
        f" selection: median {benchlib.seconds(after.seconds_median)} s, max"
        f" {benchlib.seconds(after.seconds_max)} s"
        f" ({'met' if after.seconds_max < TARGET_SECONDS else 'MISSED'})",
    ]
    duck = [k for k in table if k[1] == "duckdb"]
    if duck:
        d_before, d_after = table["before", "duckdb", "cold"], table["after", "duckdb", "cold"]
        faster = d_after.seconds_median < d_before.seconds_median
        speed = benchlib.ratio(d_before.seconds_median, d_after.seconds_median)
        verdict = "met" if faster else "MISSED"
        lines.append(f"target: duckdb also faster (cold): {speed} ({verdict})")
    return lines


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = benchlib.common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=0.1, help="1.0 = a busy node, ~200k rows per file"
    )
    parser.add_argument("--metrics", type=int, default=benchlib.DEFAULT_METRICS)
    parser.add_argument("--rotations", type=int, default=benchlib.ROTATIONS_PER_DAY)
    parser.add_argument("--selections", type=int, default=5, help="metrics timed, by seed")
    parser.add_argument("--threads", type=int, default=0, help="reference reader (0 = cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.metrics, args.rotations, args.selections = 0.05, 10, 24, 2
    return args


def pick_container(files: Sequence[Path], seed: int) -> str:
    """A container of the middle of the day, so some but not all row groups hold it."""
    middle = files[len(files) // 2]
    ids = pq.ParquetFile(middle).read_row_group(0, columns=[CONTAINER])[CONTAINER]
    return str(random.Random(seed).choice(sorted(set(ids.drop_null().to_pylist()))))


def run(args: argparse.Namespace, work: Path) -> int:
    shape = benchlib.DayShape.from_scale(args.scale, args.metrics, rotations=args.rotations)
    with_duckdb = benchlib.installed_version("duckdb") is not None
    benchlib.print_header(
        "Viewer latency: metric selection before and after consolidation",
        "duckdb",
        options={"scale": args.scale, "day": shape.describe(), "seed": args.seed},
    )
    before = Layout("before", work / "before")
    after = Layout("after", work / "after")
    started = time.perf_counter()
    summary = benchlib.generate_day(before.data_dir, benchlib.past_day(3), shape, seed=args.seed)
    generated = time.perf_counter() - started
    benchlib.link_tree(before.data_dir, after.data_dir)
    consolidation = benchlib.run_consolidator(after.data_dir)
    before.files = benchlib.parquet_files(before.data_dir)
    after.files = benchlib.parquet_files(after.data_dir)
    print(
        f"day: {summary.files} files, {summary.rows:,} rows, "
        f"{benchlib.megabytes(summary.bytes)} MB, simulated in {generated:.1f} s; consolidated "
        f"into {len(after.files)} files in {consolidation.wall_s:.1f} s wall, "
        f"{consolidation.cpu_s:.1f} s CPU\n"
    )
    names = benchlib.metric_names(shape.metrics)
    metrics = random.Random(args.seed).sample(names, min(args.selections, len(names)))
    container = pick_container(before.files, args.seed)
    all_readers = readers(args.threads or os.cpu_count() or 1, with_duckdb)
    results = measure_all([before, after], all_readers, metrics, container)

    table = summaries(results, all_readers)
    print_ratios(table, all_readers)
    print_details(table)
    benchlib.print_table(
        "Layouts",
        [
            "layout",
            "files",
            "row groups",
            "MB on disk",
            "rows",
            "rows per row group (median)",
            "row groups of one metric",
            "l_container_id bloom filters",
            "page index",
            "sorting columns",
        ],
        [layout_row(before), layout_row(after)],
    )
    check_rows, same = correctness_rows(results)
    benchlib.print_table(
        "Correctness: rows returned per selection",
        ["reader", "selection", "rows before", "rows after", "same"],
        check_rows,
    )
    for line in target_lines(table):
        print(line)
    print(eviction_verdict(results))
    bloom_note = (
        "bloom filters: pyarrow cannot read them, so the reference reader probes them itself"
        " (scripts/parquet_bloom.py, checked against DuckDB's parquet_bloom_probe);"
    )
    blooms = sum(m.cost.bloom_filters for m in results if m.layout == "after")
    skips = sum(m.cost.bloom_skips for m in results if m.layout == "after")
    print(f"{bloom_note} after: {blooms} probed, {skips} row groups skipped by them")
    ok = same
    for layout in (before, after):
        newest, offered = metric_list(layout.files)
        complete = offered >= set(names)
        ok &= complete
        print(
            f"viewer metric list ({layout.name}): {len(offered & set(names))}/{len(names)} metrics"
            f" in the first row group of {newest.name}: {'complete' if complete else 'INCOMPLETE'}"
        )
    print(f"correctness: {'same rows before and after, readers agree' if same else 'MISMATCH'}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return benchlib.in_work_dir(args.work_dir, args.keep, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
