"""The simulator must honour the monitor's contract, or every test built on it proves nothing.

Expected schemas are spelled out here literally rather than imported from `simulate`, so a
mistake in the module cannot agree with itself.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fgm_consolidator.companions import read_companion
from fgm_consolidator.simulate import (
    OpenRotation,
    PodSpec,
    SimulationSpec,
    SimulationSummary,
    containers_at,
    generate,
    run_at,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "simulate_monitor.py"
START = datetime(2025, 12, 30, 23, 48, tzinfo=UTC)  # 8 windows on the 30th, 2 on the 31st
SPEC = SimulationSpec(
    pods=(
        PodSpec("fgm-flat"),
        PodSpec("fgm-upgrade", era="map", switch_to_flat_at=4, companion_version=1),
        PodSpec("fgm-map", era="map", companions=False),
    ),
    start=START,
    rotations=10,
    metrics=5,
    containers=2,
    seconds_per_row_sample=10,
    seed=7,
)
ROWS_PER_FILE = (90 // 10) * 5 * 2

BASE = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("time", pa.timestamp("ms"), nullable=False),
    pa.field("fetch_index", pa.uint64(), nullable=False),
    pa.field("metric_name", pa.string(), nullable=False),
    pa.field("metric_kind", pa.string(), nullable=False),
    pa.field("value_int", pa.uint64(), nullable=True),
    pa.field("value_float", pa.float64(), nullable=True),
]
HISTOGRAM = pa.field("value_histogram", pa.binary(), nullable=True)
DICT = pa.dictionary(pa.int32(), pa.string())
MAP_SCHEMA = pa.schema(
    [
        *BASE,
        pa.field(
            "labels",
            pa.map_(pa.field("key", DICT, nullable=False), pa.field("value", DICT, nullable=False)),
            nullable=False,
        ),
        HISTOGRAM,
    ]
)
COMMON_KEYS = {
    "cluster_name",
    "container_id",
    "container_name",
    "namespace",
    "node_name",
    "pod_name",
    "pod_uid",
    "qos_class",
}


def flat_schema(keys: list[str]) -> pa.Schema:
    labels = [pa.field(f"l_{k}", pa.string(), nullable=True) for k in sorted(keys)]
    return pa.schema([*BASE, *labels, HISTOGRAM])


def label_keys(schema: pa.Schema) -> list[str]:
    return [n.removeprefix("l_") for n in schema.names if n.startswith("l_")]


def stamp_of(path: Path) -> datetime:
    return datetime.strptime(path.stem.removeprefix("metrics-"), "%Y%m%dT%H%M%SZ").replace(
        tzinfo=UTC
    )


def files_of(root: Path, identifier: str) -> list[Path]:
    return sorted(root.glob(f"dt=*/identifier={identifier}/*.parquet"), key=stamp_of)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationSummary]:
    root = tmp_path_factory.mktemp("data")
    return root, generate(root, SPEC)


def test_summary_matches_files_on_disk(tree: tuple[Path, SimulationSummary]) -> None:
    root, summary = tree
    parquets = sorted(root.rglob("*.parquet"))
    assert summary.files == len(parquets) == 30
    assert summary.rows == sum(pq.ParquetFile(p).metadata.num_rows for p in parquets)
    assert summary.rows == 30 * ROWS_PER_FILE
    assert summary.bytes == sum(p.stat().st_size for p in parquets)
    assert summary.companions == len(list(root.rglob("*.containers"))) == 20


def test_names_partitions_and_mtimes(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    for pod in SPEC.pods:
        files = files_of(root, pod.identifier)
        expected = [START + timedelta(seconds=90 * r) for r in range(SPEC.rotations)]
        assert [stamp_of(p) for p in files] == expected
        for path, start in zip(files, expected, strict=True):
            assert path.parent.parent.name == f"dt={start:%Y-%m-%d}"
            assert path.name == f"metrics-{start:%Y%m%dT%H%M%SZ}.parquet"
            assert path.stat().st_mtime == (start + timedelta(seconds=90)).timestamp()
    days = {p.parent.parent.name for p in root.rglob("*.parquet")}
    assert days == {"dt=2025-12-30", "dt=2025-12-31"}


def test_writer_properties(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    for path in [*files_of(root, "fgm-flat")[:1], *files_of(root, "fgm-map")[:1]]:
        meta = pq.ParquetFile(path).metadata
        assert meta.num_row_groups == 1
        assert meta.format_version == "2.6"
        assert b"ARROW:schema" in meta.metadata
        group = meta.row_group(0)
        for i in range(group.num_columns):
            column = group.column(i)
            name = column.path_in_schema
            dictionary = name in ("run_id", "metric_kind") or name.startswith(("l_", "labels."))
            assert column.compression == "ZSTD"
            assert column.is_stats_set
            assert ("RLE_DICTIONARY" in column.encodings) == dictionary, name


def test_flat_era_schema_is_exact(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    for path in files_of(root, "fgm-flat"):
        schema = pq.read_schema(path)
        keys = label_keys(schema)
        assert COMMON_KEYS <= set(keys) <= COMMON_KEYS | {"device", "pid"}
        assert schema.equals(flat_schema(keys), check_metadata=False)


def test_label_columns_differ_within_a_partition(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    files = [p for p in files_of(root, "fgm-flat") if "2025-12-30" in str(p)]
    sets = {tuple(label_keys(pq.read_schema(p))) for p in files}
    assert len(sets) > 1
    assert any("device" in s for s in sets)
    assert any("device" not in s for s in sets)


def test_map_era_schema_round_trips(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    path = files_of(root, "fgm-map")[0]
    table = pq.read_table(path)
    assert table.schema.equals(MAP_SCHEMA, check_metadata=False)
    assert table.schema.field("labels").type == MAP_SCHEMA.field("labels").type
    stored = pa.ipc.read_schema(
        pa.py_buffer(base64.b64decode(pq.ParquetFile(path).metadata.metadata[b"ARROW:schema"]))
    )
    # The stored schema keeps lading's entry name; pyarrow's reader renames it (type equality
    # ignores it), which is worth knowing for anyone comparing field names.
    assert stored.field("labels").type.field(0).name == "entries"
    row = table.slice(0, 1).to_pylist()[0]
    assert {k for k, _ in row["labels"]} == COMMON_KEYS


def test_values_follow_the_metric_kind(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    table = pq.read_table(files_of(root, "fgm-flat")[1]).to_pylist()
    for row in table:
        kind = row["metric_kind"]
        assert (row["value_int"] is not None) == (kind == "counter")
        assert (row["value_float"] is not None) == (kind == "gauge")
        assert (row["value_histogram"] is not None) == (kind == "histogram")
        elapsed = (row["time"].replace(tzinfo=UTC) - START).total_seconds()
        assert row["fetch_index"] == elapsed
    assert {r["metric_kind"] for r in table} == {"counter", "gauge", "histogram"}


def test_counters_never_decrease_across_files(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    series: dict[tuple[str, str], list[int]] = defaultdict(list)
    for path in files_of(root, "fgm-flat"):
        for row in pq.read_table(path).to_pylist():
            if row["metric_kind"] == "counter":
                series[(row["l_container_id"], row["metric_name"])].append(row["value_int"])
    assert series
    assert all(values == sorted(values) for values in series.values())


def test_companions_list_the_file_containers(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    for identifier, version in (("fgm-flat", 2), ("fgm-upgrade", 1)):
        for path in files_of(root, identifier):
            companion = path.with_suffix(".containers")
            sidecar = read_companion(companion)
            assert sidecar.version == version
            assert all((c.labels is not None) == (version == 2) for c in sidecar.containers)
            assert all(len(c.container_id) == 12 for c in sidecar.containers)
            table = pq.read_table(path)
            if "l_container_id" in table.schema.names:
                ids = set(table.column("l_container_id").to_pylist())
                assert ids == {c.container_id for c in sidecar.containers}
            assert companion.stat().st_mtime == path.stat().st_mtime
    assert not list(root.glob("**/identifier=fgm-map/*.containers"))
    assert not list(root.rglob("*.tmp"))


def test_upgrade_switches_era_run_and_fetch_index(tree: tuple[Path, SimulationSummary]) -> None:
    root, _ = tree
    files = files_of(root, "fgm-upgrade")
    eras = ["labels" in pq.read_schema(p).names for p in files]
    assert eras == [True] * 4 + [False] * 6
    before, after = pq.read_table(files[3]), pq.read_table(files[4])
    assert before.schema.equals(MAP_SCHEMA, check_metadata=False)
    assert after.schema.equals(flat_schema(label_keys(after.schema)), check_metadata=False)
    assert set(before.column("run_id").to_pylist()) != set(after.column("run_id").to_pylist())
    assert min(after.column("fetch_index").to_pylist()) == 0
    assert min(before.column("fetch_index").to_pylist()) == 3 * 90


def _snapshot(root: Path) -> dict[str, tuple[bytes, float]]:
    """Every file under `root` with its bytes and mtime."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    spec = SimulationSpec(
        pods=(PodSpec("p", era="map", switch_to_flat_at=2),),
        start=START,
        rotations=4,
        metrics=5,
        containers=2,
        seconds_per_row_sample=30,
        seed=3,
    )

    generate(tmp_path / "a", spec)
    generate(tmp_path / "b", spec)
    generate(tmp_path / "c", SimulationSpec(**{**spec.__dict__, "seed": 4}))
    a, b, c = (_snapshot(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a != c


def test_rotations_written_in_shares_equal_the_whole(tmp_path: Path) -> None:
    """A benchmark splits one spec over processes; the files must not depend on the split."""
    whole = generate(tmp_path / "whole", SPEC)
    first = generate(tmp_path / "split", SPEC, only=range(0, 3))
    second = generate(tmp_path / "split", SPEC, only=range(3, SPEC.rotations))

    assert first.files == 3 * len(SPEC.pods)
    assert first.rows + second.rows == whole.rows
    assert _snapshot(tmp_path / "split") == _snapshot(tmp_path / "whole")


def test_open_rotation_is_footerless_until_finished(tmp_path: Path) -> None:
    spec = SimulationSpec(pods=(PodSpec("p"),), start=START, rotations=1, metrics=5, containers=2)
    pod = spec.pods[0]
    handle = OpenRotation(
        tmp_path,
        pod,
        START,
        spec=spec,
        run=run_at(spec, pod, 0),
        containers=containers_at(spec, "p", 0),
    )
    assert handle.path.exists()
    assert not handle.path.with_suffix(".containers").exists()
    with pytest.raises(pa.ArrowInvalid):
        pq.ParquetFile(handle.path)
    written = handle.finish(seconds=7)
    assert written.rows == pq.ParquetFile(handle.path).metadata.num_rows == 7 * 5 * 2
    assert handle.path.stat().st_mtime == (START + timedelta(seconds=7)).timestamp()
    assert written.companion is not None and written.companion.exists()


def test_container_lifetime_sets_how_often_slots_change() -> None:
    def distinct_ids(lifetime: tuple[int, int]) -> int:
        spec = SimulationSpec(
            pods=(PodSpec("p"),),
            start=START,
            rotations=20,
            containers=3,
            container_lifetime=lifetime,
        )
        return len({c.container_id for r in range(20) for c in containers_at(spec, "p", r)})

    # A slot whose containers live 40 rotations changes at most once in 20; at 2-4, each of
    # the 3 slots changes at least 4 times.
    assert distinct_ids((40, 40)) <= 2 * 3
    assert distinct_ids((2, 4)) >= 5 * 3


@pytest.mark.parametrize("lifetime", [(0, 3), (4, 2)])
def test_spec_rejects_impossible_container_lifetime(lifetime: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="container_lifetime"):
        SimulationSpec(pods=(), start=START, rotations=1, container_lifetime=lifetime)


def test_spec_rejects_naive_start() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        SimulationSpec(pods=(), start=datetime(2025, 1, 1), rotations=1)


def _script(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_script_batch(tmp_path: Path) -> None:
    proc = _script(
        str(tmp_path), "batch", "--rotations", "3", "--pods", "2", "--era", "upgrade",
        "--metrics", "3", "--containers", "1", "--stride", "30",
        "--start", "2025-12-30T10:00:00",
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("wrote 6 files (54 rows")
    names = sorted(p.name for p in tmp_path.glob("dt=2025-12-30/identifier=*/*.parquet"))
    assert names[:3] == [
        "metrics-20251230T100000Z.parquet",
        "metrics-20251230T100000Z.parquet",
        "metrics-20251230T100130Z.parquet",
    ]


def test_script_live_flushes_short_window_on_sigterm(tmp_path: Path) -> None:
    proc = _script(
        str(tmp_path), "live", "--interval", "60", "--metrics", "3", "--containers", "1",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not list(tmp_path.rglob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    [path] = list(tmp_path.rglob("*.parquet"))
    with pytest.raises(pa.ArrowInvalid):  # mid-window: under its final name, no footer yet
        pq.ParquetFile(path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    rows = pq.ParquetFile(path).metadata.num_rows
    assert 0 < rows < 60 * 3
    assert rows % 3 == 0
    assert str(path) in out
    assert path.with_suffix(".containers").exists()
