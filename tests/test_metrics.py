"""Prometheus metrics of a real `run` process, scraped over HTTP during a pass and after it.

The pass is made long on purpose (two large partitions at zstd level 22), and the scrape is
polled until it shows a merge counted while the pass is still running; nothing sleeps in place
of synchronisation. After the pass every figure is checked against the journal and the disk.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import PAST, metrics_name, run_cli, small_spec
from prometheus_client.parser import text_string_to_metric_families
from test_service import DEADLINE_S, Service, poll

from fgm_consolidator.durable import FileIdentity
from fgm_consolidator.journal import Journal, MergeRecord, SourceRecord, UnreadableRecord
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.metrics import MetricsObserver
from fgm_consolidator.recovery import RecoveryReport
from fgm_consolidator.service import PassReport
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate
from fgm_consolidator.states import MergeState

POD = "dt=2025-12-30/identifier={}"
DONE = 'fgm_consolidator_merges_total{outcome="sources-deleted"}'

Scrape = dict[str, float]


def scrape(port: int) -> Scrape:
    """Every sample of /metrics by name and labels, e.g. `x_total{outcome="a"}`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def long_pass_data(data_dir: Path) -> None:
    """pod-a: one quick merge; pod-b, pod-c: 172,800 rows each, about a second each at level 22;
    pod-d: three files of a closed day, the middle one corrupt, so its two good neighbours stay
    apart (backlog 2, unreadable 1)."""
    generate(data_dir, small_spec((PodSpec("pod-a"),)))
    generate(
        data_dir,
        SimulationSpec(pods=(PodSpec("pod-b"), PodSpec("pod-c")), start=PAST, rotations=24, seed=3),
    )
    generate(data_dir, small_spec((PodSpec("pod-d"),), rotations=3))
    (data_dir / POD.format("pod-d") / metrics_name(1)).write_bytes(b"PAR1 not really")


def journal_a_merge_that_needs_a_person(data_dir: Path) -> None:
    """A merge the journal says was renamed, whose output and sources are both gone: recovery
    can prove nothing and flags it at start-up. (Its folder is there: a merge whose folder is
    gone is rolled back.)"""
    (data_dir / POD.format("pod-e")).mkdir(parents=True, exist_ok=True)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        source = SourceRecord(metrics_name(0), FileIdentity(1, 100, 1), 10, "fingerprint", None)
        merge_id = journal.record_planned(
            partition=POD.format("pod-e"),
            output="consolidated-20251230T080000Z-20251230T080130Z.parquet",
            era="flat",
            policy={},
            sources=[source],
            has_companion=False,
        )
        journal.transition(merge_id, MergeState.WRITING, actor="merge")
        journal.record_written(merge_id, rows=10, size=100, checksum="0" * 64)
        journal.transition(merge_id, MergeState.RENAMED, actor="merge")
    finally:
        journal.close()


@contextmanager
def running(data_dir: Path, *args: str) -> Iterator[Service]:
    """A `run` process, killed (by its handle) if the test leaves it running."""
    service = Service(data_dir, *args)
    try:
        yield service
    finally:
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait(timeout=DEADLINE_S)


def serving_port(service: Service) -> int:
    return int(service.wait_for("metrics-serving")["port"])


def test_metrics_during_and_after_a_pass_match_the_journal_and_the_disk(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_pass_data(data_dir)
    journal_a_merge_that_needs_a_person(data_dir)
    monkeypatch.setenv("FGM_METRICS_PORT", "0")  # any free port; the service logs which
    monkeypatch.setenv("FGM_METRICS_ADDR", "127.0.0.1")
    before = time.time()
    slow = ("--check-interval", "300", "--compression-level", "22", "--row-group-size", "1")
    with running(data_dir, *slow) as service:
        port = serving_port(service)

        during: list[Scrape] = []

        def merge_counted_mid_pass() -> bool:
            during.append(scrape(port))
            return during[-1]["fgm_consolidator_pass_in_progress"] == 1 and during[-1][DONE] >= 1

        poll(merge_counted_mid_pass, "a scrape showing a merge counted while the pass runs")
        mid = during[-1]
        assert mid["fgm_consolidator_pass_duration_seconds_count"] == 0
        assert mid["fgm_consolidator_last_success_timestamp_seconds"] == 0
        assert mid["fgm_consolidator_files_consolidated_total"] >= 24

        finished = service.wait_for("pass-finished")
        passes = "fgm_consolidator_pass_duration_seconds_count"
        poll(lambda: scrape(port)[passes] == 1, "the pass to be observed")
        after = scrape(port)
        records, unreadable = read_journal(data_dir)
        done = [r for r in records if r.state is MergeState.SOURCES_DELETED]
        assert [r.partition for r in done] == [POD.format(p) for p in ("pod-a", "pod-b", "pod-c")]
        outputs = [data_dir / r.partition / r.output for r in done]

        assert after[DONE] == len(done) == int(finished["merges"])
        assert after['fgm_consolidator_merges_total{outcome="rolled-back"}'] == 0
        assert after['fgm_consolidator_merges_total{outcome="needs-attention"}'] == 0
        assert after["fgm_consolidator_files_consolidated_total"] == sum(
            len(r.sources) for r in done
        )
        assert after["fgm_consolidator_rows_consolidated_total"] == sum(
            r.output_rows or 0 for r in done
        )
        assert after["fgm_consolidator_bytes_consolidated_total"] == sum(r.bytes_in for r in done)
        assert after["fgm_consolidator_output_bytes_written_total"] == sum(
            p.stat().st_size for p in outputs
        )
        assert after["fgm_consolidator_pass_in_progress"] == 0
        # the log's figure is rounded to 1 ms and taken a moment before the observation
        logged = float(finished["duration_s"])
        assert logged - 0.0005 <= after["fgm_consolidator_pass_duration_seconds_sum"] < logged + 1
        assert after['fgm_consolidator_passes_total{result="ok"}'] == 1
        assert after['fgm_consolidator_passes_total{result="failed"}'] == 0
        assert before < after["fgm_consolidator_last_success_timestamp_seconds"] < time.time()
        # pod-d: two good files the corrupt one keeps apart
        assert after["fgm_consolidator_backlog_files"] == 2
        assert after["fgm_consolidator_backlog_partitions"] == 1
        assert after["fgm_consolidator_unreadable_files"] == 1 == len(unreadable)
        attention = [r for r in records if r.state is MergeState.NEEDS_ATTENTION]
        assert after["fgm_consolidator_merges_needing_person"] == 1 == len(attention)
        assert after["fgm_consolidator_held_files"] == int(finished["held"])
        assert after[f'fgm_consolidator_build_info{{version="{version("fgm-consolidator")}"}}'] == 1

        code, _took = service.terminate(timeout=DEADLINE_S)
        assert code == 0, "\n".join(service.lines)
        # SIGTERM while idle starts no empty pass that would zero the backlog on the way out
        assert [e["event"] for e in service.events].count("pass-finished") == 1


def read_journal(data_dir: Path) -> tuple[list[MergeRecord], list[UnreadableRecord]]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return sorted(journal.history(), key=lambda r: r.id), journal.unreadable()
    finally:
        journal.close()


def test_a_taken_metrics_port_fails_at_start_up_naming_the_option(data_dir: Path) -> None:
    generate(data_dir, small_spec((PodSpec("pod-a"),)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "run", "--once", "--data-dir", str(data_dir), "--min-age", "0",
            "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: --metrics-port {port}: cannot listen on 127.0.0.1: Address already in use"
    )
    assert not default_journal_path(data_dir).exists()  # no journal, no merge: nothing touched


def test_a_second_instance_on_the_same_port_is_refused_by_the_lock_not_the_port(
    data_dir: Path,
) -> None:
    generate(data_dir, small_spec((PodSpec("pod-a"),)))
    with running(data_dir, "--metrics-port", "0", "--metrics-addr", "127.0.0.1") as first:
        port = serving_port(first)
        first.wait_for("pass-finished")
        second = run_cli(
            "run", "--once", "--data-dir", str(data_dir),
            "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
        )  # fmt: skip
        assert second.returncode == 1
        assert "another fgm-consolidator holds this data directory" in second.stderr, second.stderr
        assert scrape(port)  # the first one still serves
        code, _took = first.terminate(timeout=DEADLINE_S)
        assert code == 0


def test_the_held_files_gauge_is_the_last_pass_count(data_dir: Path) -> None:
    observer = MetricsObserver(data_dir)
    journal = Journal.open(default_journal_path(data_dir))
    try:
        report = PassReport(recovery=RecoveryReport(), held={"a": 13, "b": 0, "c": 2})
        observer.observe_pass(report, 0.1, journal)
    finally:
        journal.close()
    assert observer.registry.get_sample_value("fgm_consolidator_held_files") == 15
