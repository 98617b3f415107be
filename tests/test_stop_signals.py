"""Every way a sidecar is told to stop ends the same way: at a step boundary, `stopped`, exit 0.

SIGTERM during start-up recovery (a backlog left by a lost journal can outlast the kubelet's
30 s), and SIGHUP (the terminal that started `run` closed). Waits poll a log line with a
deadline; nothing sleeps in place of synchronisation.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PAST, small_spec
from oracle import RowKey, check, expected_rows, quiescent_pass
from test_service import DEADLINE_S, POD_A, running

from fgm_consolidator.durable import FileIdentity
from fgm_consolidator.journal import Journal, SourceRecord
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.recovery import recover
from fgm_consolidator.simulate import PodSpec, generate

PODS = 20  # ~0.25 s of lineage checks each: ~5 s of start-up recovery in all


def lineage_backlog(data_dir: Path, keep: Path) -> Counter[RowKey]:
    """Every partition consolidated, then its sources put back (a restore from backup): start-up
    recovery settles it partition by partition from the outputs' lineage, as it does after a
    crash between rename and unlinks with the journal lost."""
    generate(data_dir, small_spec(tuple(PodSpec(f"pod-{i:02d}") for i in range(PODS))))
    expected = expected_rows(data_dir)
    sources = sorted(data_dir.rglob("metrics-*"))
    for path in sources:
        kept = keep / path.relative_to(data_dir)
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, kept)
    assert quiescent_pass(data_dir, Policy(min_age_s=0)) == 0
    for path in sources:
        os.link(keep / path.relative_to(data_dir), path)
    return expected


def test_sigterm_during_start_up_recovery_stops_between_partitions(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    expected = lineage_backlog(data_dir, tmp_path / "keep")
    with running(data_dir) as start:
        service = start("--check-interval", "300")
        service.wait_for("lineage-recovery")  # the recovery has begun on the first partition
        code, took = service.terminate(timeout=DEADLINE_S)
    log = "\n".join(service.lines)
    assert code == 0, log
    events = [e["event"] for e in service.events]
    assert events[-1] == "stopped", log
    assert service.events[-1]["reason"] == "signal"
    assert "pass-finished" not in events, log  # no pass starts after the signal
    settled = {e["partition"] for e in service.events if e["event"] == "lineage-recovery"}
    # it stopped after a partition or two, not after the whole backlog
    assert len(settled) <= PODS // 2, log
    assert took < 10.0, log
    # the next start resumes where it stopped; no row was lost or doubled on the way
    assert quiescent_pass(data_dir, Policy(min_age_s=0)) == 0
    assert check(data_dir, expected).violations == []


def test_recovery_stops_between_merges_and_leaves_the_rest_unfinished(data_dir: Path) -> None:
    """Each merge's recovery runs whole; the ones not reached stay for the next recovery."""
    generate(data_dir, small_spec(rotations=3))
    folder = data_dir / POD_A
    journal = Journal.open(default_journal_path(data_dir))
    try:
        ids = []
        for n, path in enumerate(sorted(folder.glob("metrics-*.parquet"))):
            st = path.stat()
            source = SourceRecord(path.name, FileIdentity.of(st), 90, "f", None)
            merge_id = journal.record_planned(
                partition=POD_A, output=f"consolidated-{n}.parquet", era="flat", policy={},
                sources=[source], has_companion=False,
            )  # fmt: skip
            ids.append(merge_id)
        asked = iter([False])  # asked before each merge: go on once, then stop
        report = recover(journal, data_dir, should_stop=lambda: next(asked, True))
        assert [a.merge_id for a in report.actions] == ids[:1]
        assert report.lineage == [] and report.swept == []
        assert [r.id for r in journal.unfinished()] == ids[1:]
        rest = recover(journal, data_dir)
        assert [a.merge_id for a in rest.actions] == ids[1:]
        assert journal.unfinished() == []
    finally:
        journal.close()


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _default_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_sighup_stops_gracefully_like_sigterm(data_dir: Path) -> None:
    """Started as a terminal would start it: a suite run under `nohup` passes its ignored
    SIGHUP on to every child, and the service rightly keeps it ignored then (below)."""
    generate(data_dir, small_spec(start=PAST))
    with running(data_dir) as start:
        service = start("--check-interval", "300", preexec_fn=_default_sighup)
        service.wait_for("pass-finished")
        service.proc.send_signal(signal.SIGHUP)
        code = service.proc.wait(timeout=DEADLINE_S)
        service._reader.join(timeout=DEADLINE_S)
    log = "\n".join(service.lines)
    assert code == 0, log
    assert service.wait_for("stop-requested")["signal"] == str(int(signal.SIGHUP)), log
    assert (service.events[-1]["event"], service.events[-1]["reason"]) == ("stopped", "signal")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("signum", "ignore"),
    [(signal.SIGHUP, _ignore_sighup), (signal.SIGINT, _ignore_sigint)],
    ids=["sighup-under-nohup", "sigint-in-a-background-job"],
)
def test_an_ignored_stop_signal_stays_ignored(
    data_dir: Path, signum: int, ignore: Callable[[], None]
) -> None:
    """`nohup fgm-consolidator run` asked for SIGHUP to be ignored, and a shell script's
    `run &` starts it with SIGINT ignored: each stays so, and SIGTERM still stops the service
    (the kernel drops an ignored signal when it is sent, so no wait)."""
    generate(data_dir, small_spec(start=PAST))
    with running(data_dir) as start:
        service = start("--check-interval", "300", preexec_fn=ignore)
        service.wait_for("pass-finished")
        service.proc.send_signal(signum)
        code, _took = service.terminate(timeout=DEADLINE_S)
    log = "\n".join(service.lines)
    assert code == 0, log
    assert service.wait_for("stop-requested")["signal"] == str(int(signal.SIGTERM)), log
    assert service.events[-1]["event"] == "stopped", log
