"""Memory, CPU and size that grew with input cardinality instead of staying bounded.

Invariant 8 (DESIGN.md) and the README's Memory section promise a peak RSS of
`run --once` that is bounded (<= 128 MiB) and does not grow with the data. Each test below
runs the real CLI in a fresh process on a small but pathological partition (legal inputs:
the flat-label era schema, one row group per source) and compares it with the same number
of rows laid out like a realistic partition (50 metrics, 45 containers).

Figures on the code these tests were written against (2 shared cores), then after the fixes:
- 12,000 rows, 3,000 metrics: 189 MB peak RSS, 3.9 s CPU, output 12.5 MB from 139 KB
  (baseline 50 metrics: ~80 MiB, ~0.3 s); now 99 MiB, 1.0 s, 0.3 MB.
- 200,000 rows, each with its own l_container_id: 201 MiB peak; now 97-111 MiB.
- 3,000 one-row sources: 148 MiB; now within the baseline's margin.
- 5,000 metrics parked on disk, 4 and 16 sources of 100,000 rows: 113 -> 132 MiB, and 33 s
  of CPU where 50 metrics take about 2 s; now 107 -> 107 MiB, 1.3-2.5 times the CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import say_stored_schema

import fgm_consolidator
from fgm_consolidator import footers

SRC = str(Path(fgm_consolidator.__file__).resolve().parent.parent)
BOUND = 128 * 1024 * 1024
PARTITION = ("dt=2025-01-01", "identifier=pod")
START = datetime(2025, 1, 1)

# Runs the CLI as a child and reports the child's peak RSS and CPU (a fresh wrapper, so no
# earlier child of the test process is counted).
MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": done.returncode, "stderr": done.stderr[-2000:],
                  "rss": usage.ru_maxrss * 1024, "cpu": usage.ru_utime + usage.ru_stime}))
"""


LETTERS = bytes(97 + b % 26 for b in range(256))


def _pads(count: int, width: int, seed: int) -> list[str]:
    """`count` distinct, poorly compressible strings of `width` letters (deterministic)."""
    blob = random.Random(seed).randbytes(count * width).translate(LETTERS).decode()
    return [blob[i * width : (i + 1) * width] for i in range(count)]


def write_partition(
    data_dir: Path,
    *,
    files: int,
    rows: int,
    metrics: int,
    containers: int | None = 45,
    pod_width: int = 0,
) -> int:
    """Flat-era sources, one row group each; `containers=None` gives every row its own
    container id. Returns the sources' total size in bytes."""
    folder = data_dir.joinpath(*PARTITION)
    folder.mkdir(parents=True)
    total = 0
    for f in range(files):
        base = f * rows
        if containers is None:
            cid = [f"u{base + i:015d}" for i in range(rows)]
        else:
            cid = [f"c{(i // metrics) % containers:011d}" for i in range(rows)]
        pods = _pads(rows, pod_width, seed=f) if pod_width else [f"pod-{c[-4:]}" for c in cid]
        table = pa.table(
            {
                "run_id": ["run-1"] * rows,
                "time": pa.array(
                    [1735689600000 + (base + i) * 10 for i in range(rows)], pa.timestamp("ms")
                ),
                "fetch_index": pa.array(range(base, base + rows), pa.uint64()),
                "metric_name": [f"metric.{i % metrics:06d}" for i in range(rows)],
                "metric_kind": ["gauge"] * rows,
                "value_int": pa.array([None] * rows, pa.uint64()),
                "value_float": [float(base + i) for i in range(rows)],
                "l_container_id": cid,
                "l_container_name": [c[-4:] for c in cid],
                "l_namespace": ["default"] * rows,
                "l_node_name": ["node-1"] * rows,
                "l_pod_name": pods,
                "l_qos_class": ["Burstable"] * rows,
                "value_histogram": pa.array([None] * rows, pa.binary()),
            }
        )
        stamp = START + timedelta(seconds=90 * f)
        path = folder / f"metrics-{stamp:%Y%m%dT%H%M%SZ}.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=rows)
        total += path.stat().st_size
    return total


def run_once(data_dir: Path) -> dict[str, float]:
    """`run --once` in a fresh process: its peak RSS (bytes) and CPU (s)."""
    return measure_cli(data_dir, "run", "--once", "--min-age", "0")


def measure_cli(data_dir: Path, *command: str) -> dict[str, float]:
    """A command of the CLI on `data_dir` in a fresh process: its peak RSS and CPU."""
    cli = [sys.executable, "-m", "fgm_consolidator", *command]
    cli += ["--data-dir", str(data_dir), "--log-level", "error"]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *cli],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["rc"] == 0, figures["stderr"]
    return figures


def outputs(data_dir: Path) -> list[Path]:
    return sorted(data_dir.joinpath(*PARTITION).glob("consolidated-*.parquet"))


def check_rows(data_dir: Path, rows: int) -> None:
    (out,) = outputs(data_dir)
    table = pq.read_table(out, columns=["fetch_index"])
    assert table.num_rows == rows
    assert sorted(table.column(0).to_pylist()) == list(range(rows))


MIB = 1024 * 1024


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """A realistic layout of 12,000 rows: 50 metrics, 45 containers."""
    data_dir = tmp_path_factory.mktemp("baseline")
    write_partition(data_dir, files=4, rows=3_000, metrics=50)
    figures = run_once(data_dir)
    check_rows(data_dir, 12_000)
    return figures


@pytest.fixture(scope="module")
def many_metrics(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, dict[str, float]]:
    """The same 12,000 rows over 3,000 metrics (4 rows per metric per source)."""
    data_dir = tmp_path_factory.mktemp("many-metrics")
    size = write_partition(data_dir, files=4, rows=3_000, metrics=3_000)
    figures = run_once(data_dir)
    check_rows(data_dir, 12_000)
    return data_dir, size, figures


def test_many_metrics_cpu_stays_proportional_to_rows(
    baseline: dict[str, float], many_metrics: tuple[Path, int, dict[str, float]]
) -> None:
    """Same rows, 60x the metrics: CPU must not grow with metrics x metrics (every row group
    writes the buffer's whole metric dictionary; unify_dictionaries per metric)."""
    _, _, figures = many_metrics
    assert figures["cpu"] <= 4 * baseline["cpu"], (figures["cpu"], baseline["cpu"])


def test_many_metrics_output_not_many_times_its_sources(
    many_metrics: tuple[Path, int, dict[str, float]],
) -> None:
    """`--max-output-size` bounds the sources' sum; the output was 90x it (12.5 MB from
    139 KB): a dictionary of every metric and a footer entry per row group per metric."""
    data_dir, size, _ = many_metrics
    (out,) = outputs(data_dir)
    assert out.stat().st_size <= 3 * size, (out.stat().st_size, size)


def test_row_group_dictionary_holds_only_its_rows_values(tmp_path: Path) -> None:
    """A row group of one metric carried the dictionary of every container id in the output
    (20 MB uncompressed for 20,000 rows in a 1M-row output): a reader of one metric decodes
    the whole output's ids, and every row group writes them again."""
    write_partition(tmp_path, files=4, rows=10_000, metrics=50, containers=None)
    run_once(tmp_path)
    (out,) = outputs(tmp_path)
    metadata = pq.read_metadata(out)
    column = metadata.schema.to_arrow_schema().get_field_index("l_container_id")
    for index in range(1, metadata.num_row_groups):
        chunk = metadata.row_group(index).column(column)
        # 16-byte ids + 4-byte length each, plus the indices: well under 64 bytes a row.
        assert chunk.total_uncompressed_size <= 64 * chunk.num_values + 4096, (
            index,
            chunk.num_values,
            chunk.total_uncompressed_size,
        )


def test_many_one_row_sources_peak_rss_is_bounded(
    tmp_path: Path, baseline: dict[str, float]
) -> None:
    """3,000 one-row sources in one hour (one output): MetricSorter.add counts a batch by its
    buffers (~220 bytes here) and never reaches `buffer_bytes`, while each held RecordBatch
    costs ~19 KB of RSS: 3,000 of them took the peak to ~151 MB (1,000: ~103 MB)."""
    folder = tmp_path.joinpath(*PARTITION)
    folder.mkdir(parents=True)
    one = pa.table(
        {
            "run_id": ["run-1"],
            "time": pa.array([1735689600000], pa.timestamp("ms")),
            "fetch_index": pa.array([0], pa.uint64()),
            "metric_name": ["metric.000000"],
            "metric_kind": ["gauge"],
            "value_int": pa.array([None], pa.uint64()),
            "value_float": [0.0],
            "l_container_id": ["c00000000000"],
            "l_container_name": ["0000"],
            "l_namespace": ["default"],
            "l_node_name": ["node-1"],
            "l_pod_name": ["pod-0000"],
            "l_qos_class": ["Burstable"],
            "value_histogram": pa.array([None], pa.binary()),
        }
    )
    for f in range(3_000):
        stamp = START + timedelta(seconds=f)
        index = pa.array([f], pa.uint64())
        pq.write_table(
            one.set_column(2, "fetch_index", index),
            folder / f"metrics-{stamp:%Y%m%dT%H%M%SZ}.parquet",
            compression="zstd",
        )
    figures = run_once(tmp_path)
    check_rows(tmp_path, 3_000)
    assert figures["rss"] <= BOUND, (figures["rss"] / MIB, baseline["rss"] / MIB)
    assert figures["rss"] <= baseline["rss"] + 24 * MIB, (
        figures["rss"] / MIB,
        baseline["rss"] / MIB,
    )


def test_many_metrics_peak_rss_is_bounded(
    baseline: dict[str, float], many_metrics: tuple[Path, int, dict[str, float]]
) -> None:
    """One row group per metric: the parquet writer keeps every row group's metadata (and page
    index, bloom filter) until close, ~12-23 KB per row group, so RSS grew with metrics
    (184 MiB; 99 MiB since small metrics share row groups)."""
    _, _, figures = many_metrics
    assert figures["rss"] <= BOUND, (figures["rss"] / MIB, baseline["rss"] / MIB)
    assert figures["rss"] <= baseline["rss"] + 24 * MIB, (
        figures["rss"] / MIB,
        baseline["rss"] / MIB,
    )


PARKED_ROWS = 100_000  # per source: outputs of 4 and 16 sources are parked on disk


@pytest.fixture(scope="module")
def parked(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], dict[str, float]]:
    """`run --once` over outputs whose rows are parked on disk while they are sorted, by
    (sources, metrics): 5,000 metrics in 4 and 16 sources, and 50 metrics in 16."""
    figures = {}
    for files, metrics in [(4, 5_000), (16, 5_000), (16, 50)]:
        data_dir = tmp_path_factory.mktemp(f"parked-{files}-{metrics}")
        write_partition(data_dir, files=files, rows=PARKED_ROWS, metrics=metrics)
        figures[files, metrics] = run_once(data_dir)
        check_rows(data_dir, files * PARKED_ROWS)
    return figures


def test_thousands_of_metrics_parked_on_disk_need_no_more_memory_for_more_sources(
    parked: dict[tuple[int, int], dict[str, float]],
) -> None:
    """The sort parked one IPC batch per metric per buffer, and every row group of small
    metrics met a piece from every buffer; the writer held the metadata of a row group per
    few metrics. Here 4 -> 16 sources took 113 -> 132 MiB (5,000 metrics in 40 sources of
    200,000 rows: 325 MiB); now 107 -> 107 MiB."""
    small, large = parked[4, 5_000]["rss"], parked[16, 5_000]["rss"]
    assert large <= small + 8 * MIB, (small / MIB, large / MIB)
    assert large <= BOUND, large / MIB


def test_thousands_of_metrics_parked_on_disk_cost_about_the_cpu_of_fifty(
    parked: dict[tuple[int, int], dict[str, float]],
) -> None:
    """The same 1.6 million rows over 5,000 metrics instead of 50 took 13 times the CPU
    (33 s: a batch parked, read and unified per metric per buffer); now 1.3-2.5 times."""
    many, few = parked[16, 5_000]["cpu"], parked[16, 50]["cpu"]
    assert many <= 5 * few, (many, few)


def test_distinct_container_per_row_peak_rss_is_bounded(
    tmp_path: Path, baseline: dict[str, float]
) -> None:
    """label_sets.LabelSets kept every label set and value of the output in Python dicts
    (`_numbers`, `_codes`, `_members`): ~0.75 KB per distinct set, 201 MiB here. It now stops
    folding at MAX_SETS, and a buffer with large dictionaries is parked one run a part."""
    write_partition(tmp_path, files=8, rows=25_000, metrics=50, containers=None)
    figures = run_once(tmp_path)
    check_rows(tmp_path, 200_000)
    assert figures["rss"] <= BOUND, figures["rss"] / MIB
    assert figures["rss"] <= baseline["rss"] + 24 * MIB, (
        figures["rss"] / MIB,
        baseline["rss"] / MIB,
    )


def test_a_long_label_distinct_in_every_row_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """A text label differing in every row, long enough that the writer's dictionary page
    filled and it stored the rest plain: read dictionary-encoded, pyarrow grew one dictionary
    over the whole row group (1 KB values in 50,000-row sources: 273 MiB; in 200,000-row
    sources: 708 MiB). Such a column is now read plain and encoded batch by batch (here 4x
    the rows took 141 -> 278 MiB before, 120 -> 145 MiB after), and sources are read page by
    page instead of a row group's column chunks whole, which pyarrow held while it decoded
    them (115 -> 122 MiB now)."""
    peaks = []
    for rows in (20_000, 80_000):
        data_dir = tmp_path / str(rows)
        write_partition(data_dir, files=2, rows=rows, metrics=50, pod_width=512)
        figures = run_once(data_dir)
        check_rows(data_dir, 2 * rows)
        peaks.append(figures["rss"])
    small, large = peaks
    assert large <= small + 16 * MIB, (small / MIB, large / MIB)
    assert large <= 2 * BOUND, large / MIB  # the sidecar's memory limit


TEXT = pa.dictionary(pa.int32(), pa.utf8())
MAP_LABELS = pa.map_(pa.field("key", TEXT, nullable=False), pa.field("value", TEXT, nullable=False))
PLAIN_LABELS = pa.map_(
    pa.field("key", pa.utf8(), nullable=False), pa.field("value", pa.utf8(), nullable=False)
)


def write_map_partition(
    data_dir: Path, *, files: int, rows: int, label_width: int, like_the_monitor: bool = False
) -> None:
    """Map-era sources (labels in one map column of dictionaries, as the monitor's newest
    files), one row group each, every row with a label `label_width` long and its own.

    pyarrow writes the dictionary of an Arrow dictionary column in one page, however large;
    `like_the_monitor` writes plain text through parquet's own dictionary encoder instead,
    whose page stops at 1 MiB, the rest stored plain, as the monitor's writer does, with the
    stored Arrow schema still saying dictionaries."""
    folder = data_dir.joinpath(*PARTITION)
    folder.mkdir(parents=True)
    for f in range(files):
        base = f * rows
        pads = _pads(rows, label_width, seed=f) if label_width else ["x"] * rows
        labels = [[("container_id", f"c{i % 45:011d}"), ("request", pads[i])] for i in range(rows)]
        table = pa.table(
            {
                "time": pa.array(
                    [1735689600000 + (base + i) * 10 for i in range(rows)], pa.timestamp("ms")
                ),
                "fetch_index": pa.array(range(base, base + rows), pa.uint64()),
                "metric_name": [f"metric.{i % 50:06d}" for i in range(rows)],
                "value_float": [float(base + i) for i in range(rows)],
                "labels": pa.array(labels, MAP_LABELS),
            }
        )
        stamp = START + timedelta(seconds=90 * f)
        path = folder / f"metrics-{stamp:%Y%m%dT%H%M%SZ}.parquet"
        written = _decoded(table) if like_the_monitor else table
        pq.write_table(written, path, compression="zstd", row_group_size=rows)
        if like_the_monitor:
            say_stored_schema(path, table.schema)


def _decoded(table: pa.Table) -> pa.Table:
    """`table` with its labels as plain text: dictionaries of equal values may differ."""
    labels = table.column("labels").cast(PLAIN_LABELS)
    return table.set_column(table.schema.get_field_index("labels"), "labels", labels)


def test_a_map_label_long_and_distinct_in_every_row_is_read_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """pyarrow gives a map's dictionary-encoded value the type the file's stored schema says,
    and read so, each batch came with the dictionary of its whole row group: here 244-250 MiB
    (80 with short labels), and 1.3 GiB for 4x the rows (a monitor's files, whose dictionary
    page stops at 1 MiB: 40,000 rows of 1 KB took 654 MiB). They are now read plain, encoded
    batch by batch, and parked with the dictionary values their rows use: 113 and 154 MiB
    (pyarrow writes the whole dictionary in one page, which is decoded whole; 111-120 MiB
    for the monitor's files at any size)."""
    peaks = {}
    for width in (0, 512):
        data_dir = tmp_path / str(width)
        write_map_partition(data_dir, files=2, rows=10_000, label_width=width)
        sources = pa.concat_tables(pq.read_table(f) for f in sorted(data_dir.rglob("*.parquet")))
        peaks[width] = run_once(data_dir)["rss"]
        (out,) = outputs(data_dir)
        merged = pq.read_table(out)
        assert merged.schema.equals(sources.schema, check_metadata=False)
        by_row = merged.sort_by("fetch_index")
        assert _decoded(by_row).equals(_decoded(sources.sort_by("fetch_index")))
    assert peaks[512] <= peaks[0] + 48 * MIB, (peaks[0] / MIB, peaks[512] / MIB)


PROOF_ROWS = 20_000


def test_a_proof_of_map_labels_long_and_distinct_in_every_row_is_read_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """After a lost journal, `recover` proves an output by reading it and the sources still
    beside it, row by row. It read them as their footers say, each batch of a file like the
    monitor's with the dictionary of its whole row group, as the merge once did: 183 MiB
    here (86 with short labels), 273 MiB for 200,000 such rows. It now reads them as the
    merge does: 98 MiB."""
    peaks = {}
    for width in (0, 1024):
        data_dir = tmp_path / str(width)
        write_map_partition(
            data_dir, files=2, rows=PROOF_ROWS, label_width=width, like_the_monitor=True
        )
        sources = sorted(data_dir.joinpath(*PARTITION).glob("metrics-*.parquet"))
        assert width == 0 or footers.read(sources[0]).plain_text == {"labels.key_value.value"}
        kept = tmp_path / f"{width}-sources"
        kept.mkdir()
        for source in sources:
            os.link(source, kept / source.name)
        run_once(data_dir)
        assert not any(source.exists() for source in sources)
        shutil.rmtree(data_dir / ".fgm-consolidator")  # the journal is lost
        for source in sources:
            os.link(kept / source.name, source)
        peaks[width] = measure_cli(data_dir, "recover")["rss"]
        assert not any(source.exists() for source in sources)  # proven held, and removed
        check_rows(data_dir, 2 * PROOF_ROWS)
    assert peaks[1024] <= peaks[0] + 48 * MIB, (peaks[0] / MIB, peaks[1024] / MIB)


def test_a_map_output_of_long_distinct_labels_is_not_many_times_its_sources(
    tmp_path: Path,
) -> None:
    """Each row group of a map's labels was written with the dictionaries of every row group
    before it (see `clustering._one_dictionary`): 23 MB from 6 MB of sources here, 407 MB
    from 63 MB for 400,000 rows a source (and 293 MiB peak). Now 7 MB."""
    write_map_partition(tmp_path, files=2, rows=40_000, label_width=120, like_the_monitor=True)
    size = sum(path.stat().st_size for path in tmp_path.rglob("*.parquet"))
    run_once(tmp_path)
    (out,) = outputs(tmp_path)
    assert out.stat().st_size <= 1.5 * size, (out.stat().st_size, size)
    check_rows(tmp_path, 80_000)


def test_a_column_stored_plain_after_a_first_row_group_without_values_is_found(
    tmp_path: Path,
) -> None:
    """The first row group stood for the file: a label all null in the monitor's first flush
    and distinct in every row after it was read dictionary-encoded (282 MiB for three such
    sources of 50,000 rows of 1 KB)."""
    from fgm_consolidator import footers

    rows = 4_000
    labels = pa.array([None] * rows + _pads(rows, 1024, seed=1), pa.utf8())
    path = tmp_path / "metrics-20250101T000000Z.parquet"
    pq.write_table(pa.table({"l_pod_name": labels}), path, row_group_size=rows)
    assert pq.read_metadata(path).num_row_groups == 2

    assert footers.read(path).plain_text == {"l_pod_name"}
