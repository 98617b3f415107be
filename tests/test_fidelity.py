"""Consolidation keeps every value, every type and the sources' order (invariant 6).

Every expectation is derived from the simulator's spec or from the source files as read before
the pass, never from the consolidator's own output: output names from the rotation stamps, the
output schema spelled out literally, the output rows as the concatenation of the sources' rows
in name order, the companion as the union by container id computed here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    Row,
    complaints,
    consolidated_name,
    data_files,
    metrics_name,
    rows_duckdb,
    rows_pyarrow,
    run_cli,
    small_spec,
    tmp_files,
)

from fgm_consolidator.companions import Container, ContainerSidecar, read_companion
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path, iter_partitions
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import (
    PassReport,
    Settings,
    StopFlag,
    consolidation_pass,
    run_service,
)
from fgm_consolidator.simulate import PodSpec, generate
from fgm_consolidator.states import MergeState
from fgm_consolidator.writer import CONTAINER_ID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import parquet_bloom

LINEAGE = b"fgm_consolidator.lineage"
DAY = "dt=2025-12-30"
ROWS_PER_FILE = (90 // 10) * 5 * 2  # samples per window x metrics x containers (small_spec)

# The monitor's types, written out here rather than imported, so the simulator and the
# consolidator cannot agree on a mistake.
BASE = [
    pa.field("run_id", pa.utf8(), nullable=False),
    pa.field("time", pa.timestamp("ms"), nullable=False),
    pa.field("fetch_index", pa.uint64(), nullable=False),
    pa.field("metric_name", pa.utf8(), nullable=False),
    pa.field("metric_kind", pa.utf8(), nullable=False),
    pa.field("value_int", pa.uint64(), nullable=True),
    pa.field("value_float", pa.float64(), nullable=True),
]
HISTOGRAM = pa.field("value_histogram", pa.binary(), nullable=True)
LABEL_DICT = pa.dictionary(pa.int32(), pa.utf8())
MAP_LABELS = pa.field(
    "labels",
    pa.map_(
        pa.field("key", LABEL_DICT, nullable=False), pa.field("value", LABEL_DICT, nullable=False)
    ),
    nullable=False,
)

# Three monitors: flat labels (companions v2), lading map labels (companions v1), and a map-era
# monitor upgraded to the flat era at rotation 7 (08:10:30), i.e. in the middle of an hour.
PODS = (
    PodSpec("pod-flat"),
    PodSpec("pod-map", era="map", companion_version=1),
    PodSpec("pod-up", era="map", switch_to_flat_at=7),
)
ROTATIONS = 48  # 08:00:00 .. 09:10:30: one full hour window and the start of the next


def partition(identifier: str) -> str:
    return f"{DAY}/identifier={identifier}"


# Which rotations each output must hold: aligned hour windows, eras never mixed.
EXPECTED_GROUPS: dict[str, list[tuple[int, int]]] = {
    partition("pod-flat"): [(0, 39), (40, 47)],
    partition("pod-map"): [(0, 39), (40, 47)],
    partition("pod-up"): [(0, 6), (7, 39), (40, 47)],
}


@dataclass(frozen=True)
class Source:
    """One data file as read before the pass."""

    schema: pa.Schema
    rows: list[dict[str, Any]]
    companion: ContainerSidecar | None


Before = dict[str, dict[str, Source]]  # partition -> file name -> what it held


def read_before(data_dir: Path) -> Before:
    before: Before = {}
    for path in data_files(data_dir):
        key = str(path.parent.relative_to(data_dir))
        companion_path = path.with_suffix(".containers")
        companion = read_companion(companion_path) if companion_path.exists() else None
        table = pq.read_table(path)
        before.setdefault(key, {})[path.name] = Source(table.schema, table.to_pylist(), companion)
    return before


def settings(data_dir: Path, **policy: Any) -> Settings:
    return Settings(data_dir, default_journal_path(data_dir), Policy(min_age_s=0, **policy))


def one_pass(data_dir: Path, **policy: Any) -> PassReport:
    journal = Journal.open(default_journal_path(data_dir))
    try:
        return consolidation_pass(journal, settings(data_dir, **policy), StopFlag(20))
    finally:
        journal.close()


def lineage(path: Path) -> dict[str, Any]:
    metadata = pq.ParquetFile(path).metadata.metadata or {}
    return json.loads(metadata[LINEAGE])


def is_map(schema: pa.Schema) -> bool:
    return "labels" in schema.names


def expected_schema(sources: list[pa.Schema]) -> pa.Schema:
    """The sorted union of `l_*` columns before the histogram; the map column as it is."""
    if is_map(sources[0]):
        return pa.schema([*BASE, MAP_LABELS, HISTOGRAM])
    labels = sorted({name for schema in sources for name in schema.names if name.startswith("l_")})
    return pa.schema([*BASE, *(pa.field(n, pa.utf8(), nullable=True) for n in labels), HISTOGRAM])


def describe(schema: pa.Schema) -> list[tuple[str, pa.DataType, bool]]:
    """Names, types and nullability; types compare by Arrow equality (a map read back from
    parquet names its entries field differently, which is not a type difference)."""
    return [(f.name, f.type, f.nullable) for f in schema]


def union_by_id(sidecars: list[ContainerSidecar]) -> list[Container]:
    """First occurrence of each container id wins and keeps its place; a later occurrence
    fills in the options it lacks (labels, pod, names), unless it names another pod, name,
    namespace or pod uid where both know one."""
    seen: dict[str, Container] = {}
    for sidecar in sidecars:
        for container in sidecar.containers:
            known = seen.setdefault(container.container_id, container)
            places = ("pod_name", "container_name", "namespace", "pod_uid")
            if any(
                None not in (getattr(known, f), getattr(container, f))
                and getattr(known, f) != getattr(container, f)
                for f in places
            ):
                continue
            seen[container.container_id] = Container(
                known.container_id,
                first_known(known.pod_name, container.pod_name),
                first_known(known.container_name, container.container_name),
                first_known(known.namespace, container.namespace),
                first_known(known.pod_uid, container.pod_uid),
                known.qos_class,
                first_known(known.labels, container.labels),
            )
    return list(seen.values())


def first_known(value: Any, later: Any) -> Any:
    return later if value is None else value


def disk_state(data_dir: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file of the data directory (not ours) with inode, size, mtime and content hash."""
    state = {}
    for key in iter_partitions(data_dir):
        for entry in os.scandir(data_dir / key):
            st = entry.stat()
            digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
            state[f"{key}/{entry.name}"] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return state


def by_metric(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["metric_name"], []).append(row)
    return grouped


def check_metric_layout(path: Path, metrics: set[str]) -> None:
    """Row group 0 names every metric (the viewer's metric list); every later row group holds
    one metric, or small metrics whole, in order, so min/max statistics prune all the others."""
    parquet = pq.ParquetFile(path)
    head = parquet.read_row_group(0, columns=["metric_name"]).column(0).to_pylist()
    assert sorted(head) == sorted(metrics)
    position = parquet.schema_arrow.get_field_index("metric_name")
    ranges = []
    for group in range(1, parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(group).column(position).statistics
        ranges.append((stats.min, stats.max))
    for (low, high), (next_low, next_high) in itertools.pairwise(ranges):
        assert high <= next_low  # sorted: a metric cut in two runs on in the next group
        if low != high or next_low != next_high:
            assert high < next_low  # a shared row group holds its metrics whole


def check_output(path: Path, before: Before, journal: Journal) -> list[str]:
    """Everything one output must be, given its sources as read before; returns their names."""
    key = str(path.parent.relative_to(path.parents[2]))
    held = lineage(path)
    names = [s["name"] for s in held["sources"]]
    sources = [before[key][name] for name in names]

    # Lineage: names and rows of the sources, and the journal's id for this merge.
    assert [s["rows"] for s in held["sources"]] == [len(s.rows) for s in sources]
    assert held["rows"] == sum(len(s.rows) for s in sources)
    [record] = [r for r in journal.history(partition=key) if r.output == path.name]
    assert record.state is MergeState.SOURCES_DELETED
    assert held["merge_id"] == record.id
    assert [s.name for s in record.sources] == names

    # One era per output, and exactly the source types.
    assert len({is_map(s.schema) for s in sources}) == 1, f"{path.name} mixes eras"
    schema = pq.read_schema(path)
    assert schema.equals(pq.ParquetFile(path).schema_arrow)
    assert describe(schema) == describe(expected_schema([s.schema for s in sources]))
    for source in sources:
        assert set(source.schema.names) <= set(schema.names)

    # Rows: the sources' rows, missing labels as null, laid out by metric; within each metric
    # exactly in source order (so time order within every metric and container holds).
    expected = [{name: row.get(name) for name in schema.names} for s in sources for row in s.rows]
    assert by_metric(pq.read_table(path).to_pylist()) == by_metric(expected)
    check_metric_layout(path, {row["metric_name"] for row in expected})

    # Statistics and a column index where a reader prunes (numbers, times, the metric name, the
    # container id), not on the other text; an offset index on every column chunk; min/max the
    # viewer prunes with; delta encoding on the steadily growing time and fetch index.
    pruned = {field.name for field in schema if prunes_by_statistics(field)}
    assert {"time", "metric_name"} <= pruned
    metadata = pq.ParquetFile(path).metadata
    written = pq.read_table(path).to_pylist()
    start = 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        rows = written[start : start + group.num_rows]
        start += group.num_rows
        for column in range(group.num_columns):
            chunk = group.column(column)
            with_statistics = chunk.path_in_schema.split(".")[0] in pruned
            assert (chunk.statistics is not None) == with_statistics, chunk.path_in_schema
            assert chunk.has_column_index == with_statistics, chunk.path_in_schema
            assert chunk.has_offset_index, chunk.path_in_schema
            steady = chunk.path_in_schema in ("time", "fetch_index")
            assert ("DELTA_BINARY_PACKED" in chunk.encodings) == steady, chunk.path_in_schema
            if chunk.path_in_schema == "metric_name":
                assert chunk.statistics.min == min(r["metric_name"] for r in rows)
                assert chunk.statistics.max == max(r["metric_name"] for r in rows)
            if chunk.path_in_schema == CONTAINER_ID:
                check_bloom(path, chunk, {r[CONTAINER_ID] for r in rows} - {None})
    assert start == len(expected)

    # Companion: the union by container id of the sources' companions.
    companions = [s.companion for s in sources if s.companion is not None]
    merged = read_companion(path.with_suffix(".containers"))
    assert list(merged.containers) == union_by_id(companions)
    assert merged.version == max(c.version for c in companions)
    return names


def check_bloom(path: Path, chunk: pq.ColumnChunkMetaData, present: set[str]) -> None:
    """FORMATS: the viewer checks a bloom filter on `l_container_id` before it reads a row
    group. One that answers "absent" for a container the row group holds hides its points."""
    assert chunk.bloom_filter_offset, f"{path.name}: no bloom filter on {CONTAINER_ID}"
    fd = os.open(path, os.O_RDONLY)
    try:
        bitset = parquet_bloom.read_bitset(fd, chunk.bloom_filter_offset, chunk.bloom_filter_length)
    finally:
        os.close(fd)
    hidden = sorted(v for v in present if not parquet_bloom.might_contain(bitset, v.encode()))
    assert hidden == [], f"{path.name}: the bloom filter excludes {hidden}"


def prunes_by_statistics(field: pa.Field) -> bool:
    if field.name in ("metric_name", "l_container_id"):
        return True
    kind = field.type
    return not (pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_nested(kind))


@dataclass(frozen=True)
class Scenario:
    data_dir: Path
    before: Before
    oracle: Counter[Row]
    report: PassReport


@pytest.fixture(scope="module")
def consolidated(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """Both eras and an upgrade, generated and consolidated once for the tests below."""
    data_dir = tmp_path_factory.mktemp("fidelity") / "data"
    data_dir.mkdir()
    summary = generate(data_dir, small_spec(PODS, rotations=ROTATIONS))
    assert summary.files == 3 * ROTATIONS
    before = read_before(data_dir)
    # The test means something only if `l_*` sets really differ inside a partition.
    flat_sets = {
        tuple(n for n in s.schema.names if n.startswith("l_"))
        for s in before[partition("pod-flat")].values()
    }
    assert len(flat_sets) >= 2
    oracle_pa, oracle_duck = rows_pyarrow(data_dir), rows_duckdb(data_dir)
    assert oracle_pa == oracle_duck
    assert sum(oracle_pa.values()) == 3 * ROTATIONS * ROWS_PER_FILE
    return Scenario(data_dir, before, oracle_pa, one_pass(data_dir))


def test_every_row_survives_read_two_ways(consolidated: Scenario) -> None:
    data_dir, report = consolidated.data_dir, consolidated.report
    assert rows_pyarrow(data_dir) == consolidated.oracle
    assert rows_duckdb(data_dir) == consolidated.oracle
    assert report.failed == [] and report.unreadable == [] and report.skipped == []
    assert tmp_files(data_dir) == []


def test_files_dropped_to_one_per_window_and_era(consolidated: Scenario) -> None:
    data_dir, report = consolidated.data_dir, consolidated.report
    for key, groups in EXPECTED_GROUPS.items():
        outputs = [consolidated_name(first, last) for first, last in groups]
        companions = [name.removesuffix(".parquet") + ".containers" for name in outputs]
        assert sorted(os.listdir(data_dir / key)) == sorted(outputs + companions), key
    assert len(data_files(data_dir)) == 7  # from 144
    assert sorted((m.partition, m.output, m.sources) for m in report.merges) == sorted(
        (key, consolidated_name(first, last), last - first + 1)
        for key, groups in EXPECTED_GROUPS.items()
        for first, last in groups
    )


def test_each_output_is_its_sources_exactly(consolidated: Scenario) -> None:
    data_dir, before = consolidated.data_dir, consolidated.before
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        for key, groups in EXPECTED_GROUPS.items():
            for first, last in groups:
                path = data_dir / key / consolidated_name(first, last)
                names = check_output(path, before, journal)
                assert names == [metrics_name(i) for i in range(first, last + 1)]
    finally:
        journal.close()


def test_the_upgraded_pod_keeps_its_map_era_apart(consolidated: Scenario) -> None:
    data_dir = consolidated.data_dir
    folder = data_dir / partition("pod-up")
    map_era = pq.read_schema(folder / consolidated_name(0, 6))
    flat_era = pq.read_schema(folder / consolidated_name(7, 39))
    assert map_era.field("labels").type == MAP_LABELS.type
    assert not any(n.startswith("l_") for n in map_era.names)
    assert "labels" not in flat_era.names
    assert flat_era.field("l_pod_name").type == pa.utf8()
    assert map_era.names[-1] == flat_era.names[-1] == "value_histogram"


def test_a_second_pass_over_a_closed_day_changes_nothing(consolidated: Scenario) -> None:
    data_dir = consolidated.data_dir
    state = disk_state(data_dir)
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    merges = len(journal.history())
    journal.close()

    report = one_pass(data_dir)

    assert report.merges == [] and report.skipped == [] and report.unreadable == []
    assert disk_state(data_dir) == state
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    assert len(journal.history()) == merges
    journal.close()


def test_outputs_under_the_limits_are_merged_again_with_their_neighbours(
    data_dir: Path,
) -> None:
    """Quarter-hour outputs first, then an hour policy: they become one file, order intact."""
    generate(data_dir, small_spec((PodSpec("pod-a"),), rotations=24))  # 08:00:00 .. 08:34:30
    before = read_before(data_dir)
    oracle = rows_pyarrow(data_dir)
    key = partition("pod-a")
    folder = data_dir / key
    stop = StopFlag(20)

    assert run_service(settings(data_dir, max_span_s=900), stop, once=True) == 0
    quarters = [consolidated_name(0, 9), consolidated_name(10, 19), consolidated_name(20, 23)]
    assert sorted(p.name for p in data_files(data_dir)) == quarters
    before[key].update(read_before(data_dir)[key])  # the quarter outputs are the next sources

    assert run_service(settings(data_dir, max_span_s=3600), stop, once=True) == 0
    final = folder / consolidated_name(0, 23)
    assert data_files(data_dir) == [final]
    assert sorted(os.listdir(folder)) == sorted([final.name, final.with_suffix(".containers").name])
    assert rows_pyarrow(data_dir) == oracle
    assert rows_duckdb(data_dir) == oracle

    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        assert check_output(final, before, journal) == quarters
    finally:
        journal.close()
    # Through both generations: the original files' rows, each metric in the original order.
    schema = pq.read_schema(final)
    originals = [before[key][metrics_name(i)] for i in range(24)]
    assert by_metric(pq.read_table(final).to_pylist()) == by_metric(
        [{name: row.get(name) for name in schema.names} for s in originals for row in s.rows]
    )
    companions = [s.companion for s in originals if s.companion is not None]
    assert list(read_companion(final.with_suffix(".containers")).containers) == union_by_id(
        companions
    )


def test_the_cli_consolidates_both_eras_without_loss(data_dir: Path) -> None:
    pods = (PodSpec("pod-flat"), PodSpec("pod-up", era="map", switch_to_flat_at=5))
    generate(data_dir, small_spec(pods, rotations=24))
    before = read_before(data_dir)
    oracle = rows_pyarrow(data_dir)
    assert rows_duckdb(data_dir) == oracle

    result = run_cli("run", "--once", "--data-dir", str(data_dir), "--min-age", "0")

    assert result.returncode == 0, result.stderr
    assert result.stderr.count("event=merge-finished") == 3
    assert complaints(result.stderr) == []
    assert rows_pyarrow(data_dir) == oracle
    assert rows_duckdb(data_dir) == oracle
    expected = {
        partition("pod-flat"): [(0, 23)],
        partition("pod-up"): [(0, 4), (5, 23)],
    }
    assert [str(p.relative_to(data_dir)) for p in data_files(data_dir)] == [
        f"{key}/{consolidated_name(first, last)}"
        for key, groups in expected.items()
        for first, last in groups
    ]
    assert tmp_files(data_dir) == []
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        for key, groups in expected.items():
            for first, last in groups:
                names = check_output(
                    data_dir / key / consolidated_name(first, last), before, journal
                )
                assert names == [metrics_name(i) for i in range(first, last + 1)]
    finally:
        journal.close()
