"""An exception no check foresaw (a bug, an input nothing anticipated) in one partition or one
merge must not stop the others: not in a pass, not in start-up recovery, not in the lineage
check. Raised further, one bad partition failed every pass, or every start-up, for the whole
data directory. Injected in-process at the step, as test_faults does for I/O errors; a journal
error still ends the pass, since nothing is safe without the journal.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import rows_pyarrow, run_cli

from fgm_consolidator import recovery, service
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.logs import FIELDS
from fgm_consolidator.plan import Policy
from fgm_consolidator.recovery import Step
from fgm_consolidator.service import Settings, StopFlag, consolidation_pass
from fgm_consolidator.simulate import PodSpec
from fgm_consolidator.states import MergeState

POD_A = "dt=2025-12-30/identifier=pod-a"
POD_B = "dt=2025-12-30/identifier=pod-b"


@pytest.fixture
def settings(data_dir: Path, populate: Callable[..., Any]) -> Settings:
    populate(PodSpec("pod-a"), PodSpec("pod-b"))
    return Settings(data_dir, default_journal_path(data_dir), Policy(min_files=2, min_age_s=0))


@pytest.fixture
def journal(settings: Settings) -> Iterator[Journal]:
    opened = Journal.open(settings.journal_path)
    yield opened
    opened.close()


def failing_for(partition_of: Callable[..., str], real: Callable[..., Any], exc: Exception) -> Any:
    """`real`, except that it raises `exc` for pod-a."""

    def fake(*args: Any, **kwargs: Any) -> Any:
        if partition_of(*args, **kwargs) == POD_A:
            raise exc
        return real(*args, **kwargs)

    return fake


def consolidated(folder: Path) -> bool:
    return not any(folder.glob("metrics-*.parquet")) and any(folder.glob("consolidated-*"))


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS) for r in caplog.records if r.getMessage() == event]


def test_an_unexpected_error_in_one_partition_leaves_the_others_to_the_pass(
    settings: Settings,
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = rows_pyarrow(settings.data_dir)
    names_a = sorted(p.name for p in (settings.data_dir / POD_A).iterdir())
    plan = failing_for(lambda _dir, partition, *_: partition, service.plan_one, KeyError("x"))
    monkeypatch.setattr(service, "plan_one", plan)

    with caplog.at_level(logging.ERROR):
        report = consolidation_pass(journal, settings, StopFlag(grace_s=20))

    assert [(p, e) for p, e in report.errors] == [(POD_A, "unexpected KeyError: 'x'")]
    assert consolidated(settings.data_dir / POD_B)
    assert sorted(p.name for p in (settings.data_dir / POD_A).iterdir()) == names_a
    assert rows_pyarrow(settings.data_dir) == before
    [failed] = logged(caplog, "partition-failed")
    assert failed["partition"] == POD_A
    assert failed["where"].startswith("test_unexpected.py:"), failed  # where it was raised


def test_a_journal_error_in_a_partition_still_ends_the_pass(
    settings: Settings, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = sqlite3.OperationalError("disk I/O error")
    plan = failing_for(lambda _dir, partition, *_: partition, service.plan_one, error)
    monkeypatch.setattr(service, "plan_one", plan)
    with pytest.raises(sqlite3.OperationalError):
        consolidation_pass(journal, settings, StopFlag(grace_s=20))
    assert not consolidated(settings.data_dir / POD_B)


def test_an_unexpected_error_recovering_one_merge_leaves_it_and_the_rest_go_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = settings.data_dir
    before = rows_pyarrow(data_dir)
    killed = run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0", "--min-files", "2",
        env={"FGM_CRASH_AT": "writer:row-group"},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr  # in pod-a's merge, the first of the run
    resolve = failing_for(lambda _j, _d, record: record.partition, recovery.resolve, TypeError("t"))
    monkeypatch.setattr(recovery, "resolve", resolve)
    journal = Journal.open(settings.journal_path)
    try:
        report = consolidation_pass(journal, settings, StopFlag(grace_s=20))
        [left] = report.recovery.actions
        assert (left.partition, left.action) == (POD_A, Step.FAILED)
        assert left.result is MergeState.WRITING  # left as it was, for the next recovery
        assert "unexpected TypeError: t" in left.reason
        assert report.deferred == [POD_A]  # its sources are the unfinished merge's
        assert consolidated(data_dir / POD_B)
        assert rows_pyarrow(data_dir) == before

        monkeypatch.undo()  # the bug fixed: the next pass settles pod-a and merges it
        consolidation_pass(journal, settings, StopFlag(grace_s=20))
    finally:
        journal.close()
    assert consolidated(data_dir / POD_A)
    assert rows_pyarrow(data_dir) == before


def test_an_unexpected_error_in_one_partitions_lineage_check_leaves_the_others_to_it(
    settings: Settings,
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pod-b's output lists a source found beside it again (a backup restored): the check
    proves and removes it, while pod-a's check raises."""
    data_dir = settings.data_dir
    before = rows_pyarrow(data_dir)
    restored = sorted((data_dir / POD_B).glob("metrics-*.parquet"))[0]
    copy = data_dir.parent / restored.name
    copy.write_bytes(restored.read_bytes())
    consolidation_pass(journal, settings, StopFlag(grace_s=20))
    assert consolidated(data_dir / POD_A) and consolidated(data_dir / POD_B)
    restored.write_bytes(copy.read_bytes())
    settle = failing_for(
        lambda _folder, partition, _busy, _guard, _journal, _should_stop: partition,
        recovery._settle_partition,
        ValueError("v"),
    )
    monkeypatch.setattr(recovery, "_settle_partition", settle)

    with caplog.at_level(logging.ERROR):
        report = recovery.recover(journal, data_dir)

    assert [(a.partition, a.file, a.removed) for a in report.lineage] == [
        (POD_B, restored.name, True)
    ]
    assert rows_pyarrow(data_dir) == before
    [failed] = logged(caplog, "lineage-check-failed")
    assert (failed["partition"], failed["error"]) == (POD_A, "unexpected ValueError: v")
    assert failed["where"].startswith("test_unexpected.py:"), failed
