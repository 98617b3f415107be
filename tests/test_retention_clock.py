"""Retention after the clock was once ahead.

`retention.prune_if_due` pruned only when `now - last_prune_at >= 1 day`, with `last_prune_at` the
newest `prunes.at`. A node that ran once with its clock ahead (an RTC a year off at boot, the
service started before NTP stepped it back) records a prune in the future; once the clock is
right, `now - last` is negative and no prune runs until the wall clock passes that moment:
for a year, the journal keeps every merge and pass record however short the retention.
Expected: a last prune dated after `now` is a clock that was wrong, not a prune done today.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import install_journal_clock

from fgm_consolidator import retention
from fgm_consolidator.durable import FileIdentity
from fgm_consolidator.journal import Journal, SourceRecord
from fgm_consolidator.states import MergeState as S

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AHEAD = NOW + timedelta(days=365)


def _finished_merge(journal: Journal, name: str) -> None:
    merge_id = journal.record_planned(
        partition="dt=2026-01-15/identifier=pod-a", output=f"out-{name}", era="flat",
        policy={}, sources=[SourceRecord(name, FileIdentity(1, 100, 5), 10, "fp", None)],
        has_companion=False,
    )  # fmt: skip
    for step in (S.WRITING, S.WRITTEN, S.RENAMED, S.SOURCES_DELETED):
        if step is S.WRITTEN:
            journal.record_written(merge_id, rows=10, size=1, checksum="c")
        else:
            journal.transition(merge_id, step, actor="merge")


def test_a_prune_recorded_in_the_future_does_not_stop_pruning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = install_journal_clock(monkeypatch, AHEAD)
    journal = Journal.open(tmp_path / "journal.db")
    try:
        # One pass ran while the node's clock was a year ahead, and pruned then.
        assert retention.prune_if_due(journal, 30, now=AHEAD, data_dir=tmp_path) is not None
        # The clock is right again; the service merges, day after day.
        clock.at = NOW
        for name in ("a", "b", "c"):
            _finished_merge(journal, name)
        later = NOW + timedelta(days=40)  # a and b are past the 30-day retention
        clock.at = later
        report = retention.prune_if_due(journal, 30, now=later, data_dir=tmp_path)
    finally:
        journal.close()
    assert report is not None, "no prune until the wall clock reaches the prune dated ahead"
    assert report.merges == 2
