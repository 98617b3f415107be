"""Key-value and field metadata of the sources, as pyarrow (and pandas through it) sees it.

Found by an adversarial fidelity review. Each test writes two flat-era sources with
pyarrow (`store_schema=True`, its default, as arrow-rs also does), consolidates them with the
real CLI, and compares what `pyarrow.parquet.read_schema` returns before and after.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import run_cli
from test_fidelity import BASE, HISTOGRAM

PAST = datetime(2025, 12, 30, 8, 0, 0, tzinfo=UTC)
PARTITION = "dt=2025-12-30/identifier=pod-meta"


def row(i: int, **labels: str | None) -> dict[str, Any]:
    return {
        "run_id": "r",
        "time": datetime(2025, 12, 30, 8, 0, 0) + timedelta(seconds=i),
        "fetch_index": i,
        "metric_name": f"m{i % 2}",
        "metric_kind": "gauge",
        "value_int": i,
        "value_float": None,
        "value_histogram": None,
        **{f"l_{k}": v for k, v in labels.items()},
    }


def write_source(
    data_dir: Path, rotation: int, table: pa.Table, partition: str = PARTITION
) -> Path:
    folder = data_dir / partition
    folder.mkdir(parents=True, exist_ok=True)
    stamp = (PAST + timedelta(seconds=90 * rotation)).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"metrics-{stamp}.parquet"
    pq.write_table(table, path, compression="zstd")
    old = (PAST - timedelta(days=1)).timestamp()
    os.utime(path, (old, old))
    return path


def consolidate(data_dir: Path, partition: str = PARTITION) -> Path:
    result = run_cli(
        "run", "--once", "--min-age", "0", "--min-files", "2", "--data-dir", str(data_dir)
    )
    assert result.returncode == 0, result.stderr
    outputs = sorted((data_dir / partition).glob("consolidated-*.parquet"))
    assert len(outputs) == 1, sorted(p.name for p in (data_dir / partition).iterdir())
    assert not list((data_dir / partition).glob("metrics-*.parquet"))
    return outputs[0]


def test_schema_key_value_metadata_shared_by_every_source_is_still_seen_by_pyarrow(
    data_dir: Path,
) -> None:
    """Both sources carry the same schema metadata (as a writer that tags its files does, or
    pandas' `b"pandas"` key). pyarrow reads it from each source; from the output it read
    None, because the output's stored Arrow schema (`writer._stored`) was serialized without
    metadata and pyarrow takes the schema's metadata from the stored schema."""
    metadata = {b"origin": b"fine-grained-monitor", b"monitor_version": b"1.2.3"}
    schema = pa.schema([*BASE, pa.field("l_container_id", pa.utf8()), HISTOGRAM], metadata=metadata)
    for rotation in range(2):
        rows = [row(10 * rotation + i, container_id="c1") for i in range(4)]
        write_source(data_dir, rotation, pa.Table.from_pylist(rows, schema))
    before = pq.read_schema(sorted((data_dir / PARTITION).glob("*.parquet"))[0]).metadata
    assert before is not None
    assert {k: v for k, v in before.items() if k != b"ARROW:schema"} == metadata

    output = consolidate(data_dir)

    after = pq.read_schema(output).metadata or {}
    assert {k: after.get(k) for k in metadata} == metadata


def test_field_metadata_of_a_label_column_survives_consolidation(data_dir: Path) -> None:
    """Every source gives `l_pod_name` the same field metadata; `value_float`'s is kept but
    the label's was dropped (`schemas.unify` took `field.remove_metadata()` for labels)."""
    tagged = {b"description": b"the pod's name"}
    schema = pa.schema(
        [
            *BASE[:6],
            BASE[6].with_metadata(tagged),
            pa.field("l_container_id", pa.utf8()),
            pa.field("l_pod_name", pa.utf8()).with_metadata(tagged),
            HISTOGRAM,
        ]
    )
    for rotation in range(2):
        rows = [row(10 * rotation + i, container_id="c1", pod_name="p") for i in range(4)]
        write_source(data_dir, rotation, pa.Table.from_pylist(rows, schema))
    source = pq.read_schema(sorted((data_dir / PARTITION).glob("*.parquet"))[0])
    assert source.field("l_pod_name").metadata == tagged

    output = consolidate(data_dir)

    written = pq.read_schema(output)
    assert written.field("value_float").metadata == tagged
    assert written.field("l_pod_name").metadata == tagged


def unit_schema(unit: bytes) -> pa.Schema:
    value_float = BASE[6].with_metadata({b"unit": unit})
    return pa.schema([*BASE[:6], value_float, pa.field("l_container_id", pa.utf8()), HISTOGRAM])


def test_field_metadata_stays_with_its_partition(data_dir: Path) -> None:
    """Footers of one era and label set shared one schema object, found by schema equality,
    which ignores field metadata: the second partition's output carried the first one's."""
    units = {"pod-a": b"seconds", "pod-b": b"milliseconds"}
    for pod, unit in units.items():
        for rotation in range(2):
            rows = [row(10 * rotation + i, container_id="c1") for i in range(4)]
            table = pa.Table.from_pylist(rows, unit_schema(unit))
            write_source(data_dir, rotation, table, f"dt=2025-12-30/identifier={pod}")

    for pod, unit in units.items():
        output = consolidate(data_dir, f"dt=2025-12-30/identifier={pod}")
        assert pq.read_schema(output).field("value_float").metadata == {b"unit": unit}


def test_sources_whose_metadata_differs_are_kept_apart(data_dir: Path) -> None:
    """The output took the first source's metadata and dropped the others' without a word."""
    units = [b"seconds", b"seconds", b"milliseconds", b"milliseconds"]
    for rotation, unit in enumerate(units):
        rows = [row(10 * rotation + i, container_id="c1") for i in range(4)]
        write_source(data_dir, rotation, pa.Table.from_pylist(rows, unit_schema(unit)))

    result = run_cli(
        "run", "--once", "--min-age", "0", "--min-files", "2", "--data-dir", str(data_dir)
    )

    assert result.returncode == 0, result.stderr
    outputs = sorted((data_dir / PARTITION).glob("consolidated-*.parquet"))
    assert [pq.read_schema(p).field("value_float").metadata for p in outputs] == [
        {b"unit": b"seconds"},
        {b"unit": b"milliseconds"},
    ]
    assert not list((data_dir / PARTITION).glob("metrics-*.parquet"))
