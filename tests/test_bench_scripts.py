"""The benchmark scripts run end to end at a tiny scale, and the helpers they trust are right:
the bloom-filter probe agrees with DuckDB, wait4 measures one child alone, replicas land in
the partition of their new date. Figures are not asserted (2 shared cores make them noise),
only that each script finishes, prints its tables and its fidelity checks pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import benchlib  # noqa: E402
import parquet_bloom  # noqa: E402


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("## "), result.stdout
    assert "machine: " in result.stdout and "measured: fgm-consolidator" in result.stdout
    return result.stdout


def table_rows(output: str, title: str) -> list[list[str]]:
    """The data rows of the Markdown table under `### <title>...`."""
    lines = output.split(f"### {title}", 1)[1].splitlines()[2:]  # title line, blank line
    assert lines[0].startswith("| ") and lines[1].startswith("|---"), lines[:2]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_viewer_quick() -> None:
    out = run_script("bench_viewer.py", "--quick")
    ratios = table_rows(out, "Speed-up")
    assert {(r[0], r[1]) for r in ratios} >= {("reference", "cold"), ("duckdb", "warm")}
    details = table_rows(out, "Per selection")
    assert len(details) == len(ratios) * 2
    assert "correctness: same rows before and after, readers agree" in out
    assert "viewer metric list (after): 10/10 metrics" in out
    assert "page-cache eviction" in out


def test_memory_quick_passes_options_and_env_through() -> None:
    out = run_script(
        "bench_memory.py",
        "--quick",
        "--env",
        "ARROW_DEFAULT_MEMORY_POOL=system",
        "--",
        "--row-group-size",
        "16",
    )
    assert "extra run options=--row-group-size 16" in out
    assert "env=ARROW_DEFAULT_MEMORY_POOL=system" in out
    (summary,) = table_rows(out, "Peak RSS")
    assert summary[0] == "10.00x"
    volumes = table_rows(out, "Volumes")
    assert [v[0] for v in volumes][:2] == ["smaller", "larger"]
    assert all(float(v[-1]) > 0 for v in volumes)


def test_throughput_quick_keeps_types_and_values() -> None:
    out = run_script("bench_throughput.py", "--quick")
    rows = {(r[0], r[1]): r for r in table_rows(out, "Consolidating one partition")}
    assert {era for era, _ in rows} == {"flat", "map"}
    for era in ("flat", "map"):
        assert rows[era, "fgm-consolidator"][4:] == ["yes", "kept"]
        assert rows[era, "duckdb"][4] == "no"  # timestamp[ms] -> timestamp[us]


def test_throughput_reports_the_by_metric_layout_beside_the_targets() -> None:
    out = run_script(
        "bench_throughput.py", "--quick", "--tools", "fgm-consolidator,duckdb-by-metric"
    )
    rows = {(r[0], r[1]): r for r in table_rows(out, "Consolidating one partition")}
    assert rows["flat", "duckdb-by-metric"][5] == "kept"
    layout = {(r[0], r[1]): r[-1] for r in table_rows(out, "Absolute figures")}
    single, total = (int(n) for n in layout["flat", "fgm-consolidator"].split(" / "))
    assert single == total - 1  # every row group but the head of first rows holds one metric
    # the targets name the plain commands: a sorted alternative alone is shown, not judged
    assert "targets (flat): not judged" in out
    assert "same layout (flat): duckdb-by-metric uses " in out


def test_throughput_takes_the_median_of_each_figure_over_rounds() -> None:
    import bench_throughput as bt

    def outcome(cpu: float, rss: int, returncode: int = 0) -> bt.Outcome:
        run = benchlib.ChildRun(("x",), returncode, cpu + 1, cpu, 0.0, rss, "", "")
        return bt.Outcome("flat", "polars", 10**9, run, [], None)

    rounds = [outcome(5.0, 300), outcome(9.0, 100), outcome(6.0, 200)]
    merged = bt.median_outcome(rounds)
    assert merged.run is not None
    assert (merged.run.cpu_s, merged.run.wall_s, merged.run.max_rss_bytes) == (6.0, 7.0, 200)
    assert merged.cpu_per_gb == 6.0
    failed = outcome(1.0, 1, returncode=1)
    assert bt.median_outcome([*rounds, failed]) is failed  # a failure is never averaged away


def test_throughput_prints_the_cpu_of_every_round(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_throughput as bt

    def outcome(tool: str, cpu: float, returncode: int = 0) -> bt.Outcome:
        run = benchlib.ChildRun(("x",), returncode, cpu, cpu, 0.0, 1, "", "")
        return bt.Outcome("map", tool, 10**9, run, [], None)

    bt.print_rounds([[outcome("polars", 5.0)]])
    assert capsys.readouterr().out == ""  # one round: its figures are the medians already
    bt.print_rounds(
        [
            [outcome("fgm-consolidator", 12.5), outcome("fgm-consolidator", 18.3)],
            [outcome("polars", 9.0), outcome("polars", 1.0, returncode=1)],
        ]
    )
    rows = table_rows(capsys.readouterr().out, "CPU s of each round")
    assert rows == [
        ["map", "fgm-consolidator", "12.5", "18.3"],
        ["map", "polars", "9.000", "-"],  # a failed round has no figure
    ]


def test_throughput_pairs_our_cpu_with_each_alternatives_round_by_round() -> None:
    import bench_throughput as bt

    def rounds(tool: str, *cpus: float, failed: int | None = None) -> list[bt.Outcome]:
        runs = [
            benchlib.ChildRun(("x",), int(n == failed), cpu, cpu, 0.0, 1, "", "")
            for n, cpu in enumerate(cpus)
        ]
        return [bt.Outcome("flat", tool, 10**9, run, [], None) for run in runs]

    lines = bt.paired_lines(
        [
            rounds("fgm-consolidator", 10.0, 20.0, 12.0),
            rounds("polars", 8.0, 10.0, 10.0),
            rounds("pyarrow", 5.0, 10.0, 12.0, failed=0),  # a failed round pairs with nothing
            rounds("polars-by-metric", 1.0, 1.0, 1.0),  # shown beside the targets, not paired
        ]
    )
    assert lines == [
        "paired (flat): fgm-consolidator / polars CPU per round: 1.25x, 2.00x, 1.20x"
        " (median 1.25x)",
        "paired (flat): fgm-consolidator / pyarrow CPU per round: 2.00x, 1.00x (median 1.50x)",
    ]


def test_throughput_reports_a_missing_polars_as_skipped(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "polars"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('polars hidden by the test')\n")
    out = run_script(
        "bench_throughput.py",
        "--quick",
        "--tools",
        "fgm-consolidator,polars",
        env={"PYTHONPATH": str(fake.parent)},
    )
    assert "skipped: polars is not installed" in out
    rows = {(r[0], r[1]): r for r in table_rows(out, "Consolidating one partition")}
    assert rows["flat", "fgm-consolidator"][4:] == ["yes", "kept"]


def test_scale_quick() -> None:
    out = run_script("bench_scale.py", "--quick")
    passes = table_rows(out, "Passes")
    assert [p[0] for p in passes] == [
        "day 1",
        "day 1, idle",
        "day 2",
        "day 2, idle",
        "backlog idle 1",
    ]
    assert [p[1] for p in passes] == ["32", "0", "32", "0", "0"]
    assert [p[3] for p in passes] == ["2", "0", "2", "0", "0"]  # merges: none when idle


def test_recovery_quick_proves_every_source_at_both_sizes() -> None:
    out = run_script("bench_recovery.py", "--quick")
    absolute = table_rows(out, "Absolute figures")
    assert [(r[0], r[1]) for r in absolute] == [("0.01", "4"), ("0.1", "4")]
    small_rows, large_rows = (int(r[2].replace(",", "")) for r in absolute)
    assert large_rows > 4 * small_rows
    assert table_rows(out, "Larger vs smaller")[0][3] == "met"


def test_retention_bench_prunes_a_journal_of_the_current_schema() -> None:
    """It writes journal rows by hand: a column added by a migration once broke it unseen."""
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_retention.py"), "--merges", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {line["strategy"] for line in lines} == {"none", "vacuum", "incremental"}
    assert all(line["pruned"] == 180 for line in lines)


def test_bloom_probe_agrees_with_duckdb(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    assert parquet_bloom.xxh64(b"") == 0xEF46DB3751D8E999  # xxHash64 reference values
    assert parquet_bloom.xxh64(b"abc") == 0x44BC2CF5AD770999
    present = [f"{i:012x}" for i in range(0, 6000, 7)]
    path = tmp_path / "bloom.parquet"
    table = pa.table({"l_container_id": present * 2})
    pq.write_table(
        table,
        path,
        row_group_size=len(present),
        bloom_filter_options={"l_container_id": {"ndv": 1000, "fpp": 0.05}},
    )
    chunk = pq.read_metadata(path).row_group(0).column(0)
    fd = os.open(path, os.O_RDONLY)
    try:
        bitset = parquet_bloom.read_bitset(fd, chunk.bloom_filter_offset, chunk.bloom_filter_length)
    finally:
        os.close(fd)
    probes = [f"{i:012x}" for i in range(6000)]
    ours = [parquet_bloom.might_contain(bitset, v.encode()) for v in probes]
    con = duckdb.connect()
    theirs = [
        not con.execute(
            "SELECT bloom_filter_excludes FROM parquet_bloom_probe(?, 'l_container_id', ?)"
            " WHERE row_group_id = 0",
            [str(path), value],
        ).fetchone()[0]
        for value in probes
    ]
    assert ours == theirs
    assert all(ours[i] for i in range(0, 6000, 7))  # no false negatives
    assert sum(ours) < len(probes) / 2  # and it does exclude


def test_run_child_measures_that_child_alone() -> None:
    big = benchlib.run_child([sys.executable, "-c", "b = b'x' * (200 * 2**20)"])
    small = benchlib.run_child([sys.executable, "-c", "pass"])
    assert big.returncode == small.returncode == 0
    assert big.max_rss_bytes > 200 * 2**20
    assert small.max_rss_bytes < 100 * 2**20


def test_replicas_are_renamed_into_the_partition_of_their_new_date(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for suffix in (".parquet", ".containers"):
        (source / f"metrics-20260101T235830Z{suffix}").write_text(suffix)
    (source / "notes.txt").write_text("not a monitor file")
    data = tmp_path / "data"
    assert benchlib.replicate_shifted(source, data, "b", timedelta(minutes=30)) == 1
    moved = data / "dt=2026-01-02" / "identifier=b"
    assert sorted(p.name for p in moved.iterdir()) == [
        "metrics-20260102T002830Z.containers",
        "metrics-20260102T002830Z.parquet",
    ]
    assert (moved / "metrics-20260102T002830Z.parquet").read_text() == ".parquet"
