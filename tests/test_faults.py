"""I/O errors injected in-process at the durable seams: the merge rolls back, nothing is lost,
and the next pass succeeds once the fault is gone. Transient errors are retried."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import data_files, rows_pyarrow, tmp_files

from fgm_consolidator import durable, merge, writer
from fgm_consolidator.cli import main
from fgm_consolidator.companions import read_companion
from fgm_consolidator.errors import NameTakenError
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import Settings, StopFlag, consolidation_pass, run_service
from fgm_consolidator.simulate import PodSpec
from fgm_consolidator.states import MergeState


@pytest.fixture
def setup(data_dir: Path, populate) -> Iterator[tuple[Settings, Journal]]:  # type: ignore[no-untyped-def]
    populate(PodSpec("pod-a"), rotations=12)
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_files=2, min_age_s=0))
    journal = Journal.open(settings.journal_path)
    yield settings, journal
    journal.close()


def failing(exc_errno: int, times: int, real: Callable[..., object]) -> Callable[..., object]:
    """Raise OSError(exc_errno) on the first `times` calls, then behave."""
    calls = {"n": 0}

    def fake(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] <= times:
            raise OSError(exc_errno, os.strerror(exc_errno))
        return real(*args, **kwargs)

    fake.calls = calls  # type: ignore[attr-defined]
    return fake


def run_pass(settings: Settings, journal: Journal):  # type: ignore[no-untyped-def]
    return consolidation_pass(journal, settings, StopFlag(grace_s=20))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
def test_write_error_rolls_back_and_the_next_pass_succeeds(
    setup, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:  # type: ignore[no-untyped-def]
    settings, journal = setup
    before_files = data_files(settings.data_dir)
    before_rows = rows_pyarrow(settings.data_dir)
    real_write = durable.Sink.write
    calls = {"n": 0}

    def write(self: durable.Sink, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(code, os.strerror(code))
        return real_write(self, data)

    monkeypatch.setattr(durable.Sink, "write", write)
    monkeypatch.setattr(writer, "OUTPUT_BUFFER", 1024)  # several writes: the first one lands
    report = run_pass(settings, journal)
    assert calls["n"] >= 2  # one write landed, then they failed
    assert [m.state for m in report.merges] == [MergeState.ROLLED_BACK]
    assert os.strerror(code) in (report.merges[0].error or "")
    assert data_files(settings.data_dir) == before_files
    assert tmp_files(settings.data_dir) == []
    assert journal.unreadable() == []  # a full disk is not the sources' fault

    monkeypatch.undo()
    report = run_pass(settings, journal)
    assert [m.state for m in report.merges] == [MergeState.SOURCES_DELETED]
    assert rows_pyarrow(settings.data_dir) == before_rows
    assert len(data_files(settings.data_dir)) == 1


def test_fsync_failure_is_not_retried_and_the_step_is_redone(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    settings, journal = setup
    before_rows = rows_pyarrow(settings.data_dir)
    fake = failing(errno.EIO, 1, durable.fsync_file)
    monkeypatch.setattr(durable, "fsync_file", fake)
    report = run_pass(settings, journal)
    assert fake.calls["n"] == 1  # type: ignore[attr-defined]
    assert [m.state for m in report.merges] == [MergeState.ROLLED_BACK]
    assert tmp_files(settings.data_dir) == []
    report = run_pass(settings, journal)
    assert [m.state for m in report.merges] == [MergeState.SOURCES_DELETED]
    assert rows_pyarrow(settings.data_dir) == before_rows


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EAGAIN])
def test_transient_errors_are_retried(setup, monkeypatch: pytest.MonkeyPatch, code: int) -> None:  # type: ignore[no-untyped-def]
    settings, journal = setup
    fake = failing(code, 2, os.link)
    monkeypatch.setattr(os, "link", fake)
    report = run_pass(settings, journal)
    assert [m.state for m in report.merges] == [MergeState.SOURCES_DELETED]
    assert fake.calls["n"] == 4  # type: ignore[attr-defined]  # 2 failures, output + companion


def test_failed_rename_leaves_the_merge_to_recovery(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    settings, journal = setup
    before_rows = rows_pyarrow(settings.data_dir)
    monkeypatch.setattr(os, "link", failing(errno.EACCES, 99, os.link))
    report = run_pass(settings, journal)
    assert [(p, "Permission denied" in e) for p, e in report.errors] == [
        ("dt=2025-12-30/identifier=pod-a", True)
    ]
    assert [r.state for r in journal.unfinished()] == [MergeState.WRITTEN]
    assert rows_pyarrow(settings.data_dir) == before_rows  # the .tmp is not a data file
    monkeypatch.undo()
    report = run_pass(settings, journal)
    assert [a.action for a in report.recovery.actions] == ["resumed"]
    assert rows_pyarrow(settings.data_dir) == before_rows
    assert tmp_files(settings.data_dir) == []


def test_failed_unlink_keeps_the_remaining_sources_until_recovery(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    settings, journal = setup
    before_rows = rows_pyarrow(settings.data_dir)
    real_unlink = os.unlink
    count = {"n": 0}

    def unlink(path: object) -> None:
        if str(path).endswith(".parquet") and "metrics-" in str(path):
            count["n"] += 1
            if count["n"] == 3:
                raise OSError(errno.EIO, "Input/output error")
        real_unlink(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    report = run_pass(settings, journal)
    assert [(p, "Input/output" in e) for p, e in report.errors] == [
        ("dt=2025-12-30/identifier=pod-a", True)
    ]
    assert [r.state for r in journal.unfinished()] == [MergeState.RENAMED]
    monkeypatch.undo()
    report = run_pass(settings, journal)
    assert [(a.found, a.result) for a in report.recovery.actions] == [
        (MergeState.RENAMED, MergeState.SOURCES_DELETED)
    ]
    assert rows_pyarrow(settings.data_dir) == before_rows
    assert len(data_files(settings.data_dir)) == 1


def test_merge_module_uses_the_durable_primitives() -> None:
    """The fault seams above only prove something if merge really goes through them."""
    assert merge.durable is durable


def test_a_failing_partition_does_not_stop_the_others(
    data_dir: Path, populate, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    populate(PodSpec("pod-a"), PodSpec("pod-b"), rotations=12)
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_files=2, min_age_s=0))
    before_rows = rows_pyarrow(data_dir)
    real_scandir = os.scandir

    def scandir(path: object) -> object:
        if "identifier=pod-a" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    journal = Journal.open(settings.journal_path)
    try:
        report = run_pass(settings, journal)
    finally:
        journal.close()
    assert [p for p, _ in report.errors] == ["dt=2025-12-30/identifier=pod-a"]
    assert [(m.partition, m.state) for m in report.merges] == [
        ("dt=2025-12-30/identifier=pod-b", MergeState.SOURCES_DELETED)
    ]
    assert rows_pyarrow(data_dir) == before_rows
    assert run_service(settings, StopFlag(grace_s=20), once=True) == 1  # --once says so


def test_an_unexpected_error_in_a_merge_rolls_it_back_and_the_service_goes_on(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A bug, or an input no check foresaw, fails its merge, not the process: the merge is
    rolled back like any other failure, the partition backs off, and the next pass succeeds."""
    settings, journal = setup
    before_files = data_files(settings.data_dir)
    before_rows = rows_pyarrow(settings.data_dir)
    real = merge.write_merged

    def buggy(*args: object, **kwargs: object) -> object:
        real(*args, **kwargs)  # the output is written whole, then something unforeseen happens
        raise KeyError("Field 'metric_name' does not exist in schema")

    monkeypatch.setattr(merge, "write_merged", buggy)
    report = run_pass(settings, journal)
    assert [m.state for m in report.merges] == [MergeState.ROLLED_BACK]
    assert (report.merges[0].error or "").startswith("unexpected KeyError: ")
    assert report.merges[0].retry_later  # our side: the partition backs off
    assert data_files(settings.data_dir) == before_files
    assert tmp_files(settings.data_dir) == []
    assert journal.merge(report.merges[0].merge_id).state is MergeState.ROLLED_BACK
    assert journal.unfinished() == []

    monkeypatch.undo()
    report = run_pass(settings, journal)
    assert [m.state for m in report.merges] == [MergeState.SOURCES_DELETED]
    assert rows_pyarrow(settings.data_dir) == before_rows


def test_a_source_that_stays_undeletable_blocks_neither_start_up_nor_other_partitions(
    data_dir: Path, populate, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A source nobody may delete (`chattr +i`, a folder's mode changed under us) leaves its
    merge renamed. Recovery runs at start-up and before every pass, and its EPERM escaped it:
    `run` and `recover` stopped with an Error line, and a running service failed every pass,
    so no partition was consolidated any more. Now that merge waits, reported, and the rest
    goes on; `recover` exits 3 (a person fixes the file), and the next recovery finishes it."""
    populate(PodSpec("pod-a"), rotations=12)
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_files=2, min_age_s=0))
    before_rows = rows_pyarrow(data_dir)
    stuck = data_files(data_dir)[5]
    real_unlink = os.unlink

    def unlink(path: object) -> None:
        if Path(str(path)) == stuck:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        real_unlink(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    journal = Journal.open(settings.journal_path)
    try:
        run_pass(settings, journal)
        assert [r.state for r in journal.unfinished()] == [MergeState.RENAMED]
        shown = rows_pyarrow(data_dir)  # pod-a's rows, some twice while the merge waits
        populate(PodSpec("pod-b"), rotations=12)
        before_rows += rows_pyarrow(data_dir) - shown

        report = run_pass(settings, journal)

        [action] = report.recovery.actions
        assert (action.result, action.action) == (MergeState.RENAMED, "failed")
        assert str(stuck) in action.reason and "Operation not permitted" in action.reason
        assert report.errors == [(action.partition, action.reason)]
        assert [(m.partition, m.state) for m in report.merges] == [
            ("dt=2025-12-30/identifier=pod-b", MergeState.SOURCES_DELETED)
        ]
    finally:
        journal.close()
    assert run_service(settings, StopFlag(grace_s=20), once=True) == 1  # start-up goes on too
    result = CliRunner().invoke(main, ["recover", "--data-dir", str(data_dir)])
    assert result.exit_code == 3, result.output
    [line] = [x for x in result.output.splitlines() if x.startswith("kind=recovery ")]
    assert "result=renamed action=failed" in line and str(stuck) in line

    monkeypatch.undo()
    assert run_service(settings, StopFlag(grace_s=20), once=True) == 0
    assert rows_pyarrow(data_dir) == before_rows
    assert not stuck.exists() and len(data_files(data_dir)) == 2


def test_a_write_the_disk_silently_lost_is_caught_before_anything_is_published(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A disk that acknowledges a write it never made (a lying cache, a buggy FUSE layer):
    the bytes are hashed and counted, so only reading the output back shows the hole. The
    output check must roll the merge back; without it the torn output was published and
    every source deleted."""
    settings, journal = setup
    before_files = data_files(settings.data_dir)
    before_rows = rows_pyarrow(settings.data_dir)
    real_write_all = durable.write_all
    calls = {"n": 0}

    def lossy(handle: object, data: bytes | memoryview) -> None:
        calls["n"] += 1
        if calls["n"] != 2:  # the second write of the output vanishes, reported as done
            real_write_all(handle, data)  # type: ignore[arg-type]

    monkeypatch.setattr(durable, "write_all", lossy)
    monkeypatch.setattr(writer, "OUTPUT_BUFFER", 1024)  # several writes, the footer last
    report = run_pass(settings, journal)
    assert calls["n"] > 2
    assert [m.state for m in report.merges] == [MergeState.ROLLED_BACK]
    assert "output" in (report.merges[0].error or "")
    assert report.merges[0].retry_later  # our side of the disk: the partition backs off
    assert data_files(settings.data_dir) == before_files
    assert tmp_files(settings.data_dir) == []

    monkeypatch.undo()
    report = run_pass(settings, journal)
    assert [m.state for m in report.merges] == [MergeState.SOURCES_DELETED]
    assert rows_pyarrow(settings.data_dir) == before_rows


def test_a_final_name_taken_after_the_check_is_never_overwritten(tmp_path: Path) -> None:
    """`publish` looks at the final name first, but another process may take it before the
    rename: the primitive itself must refuse, atomically, and leave both files as they were."""
    ours, theirs = tmp_path / "out.parquet.tmp", tmp_path / "out.parquet"
    ours.write_bytes(b"ours")
    theirs.write_bytes(b"theirs")
    with pytest.raises(NameTakenError) as info:
        durable.rename_no_replace(ours, theirs)
    assert info.value.path == str(theirs)
    assert (ours.read_bytes(), theirs.read_bytes()) == (b"ours", b"theirs")


def test_a_companion_write_the_disk_silently_lost_is_caught_before_anything_is_published(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """DESIGN step 3 writes the companion `.containers.tmp` "the same way" as the output:
    synced, then read back. A disk that acknowledges the companion's bytes and keeps none
    published an empty companion and deleted every source's: all their containers vanished
    from the viewer (FORMATS: the consolidated file needs the union of its sources')."""
    settings, journal = setup
    before_companions = companion_files(settings.data_dir)
    assert before_companions
    before_files = data_files(settings.data_dir)
    before_rows = rows_pyarrow(settings.data_dir)
    real_write_all = durable.write_all
    lost: list[str] = []

    def lossy(handle: object, data: bytes | memoryview) -> None:
        name = os.readlink(f"/proc/self/fd/{handle.fileno()}")  # type: ignore[attr-defined]
        if name.endswith(".containers.tmp"):
            lost.append(name)  # acknowledged, never written
            return
        real_write_all(handle, data)  # type: ignore[arg-type]

    monkeypatch.setattr(durable, "write_all", lossy)
    report = run_pass(settings, journal)
    assert lost
    assert [m.state for m in report.merges] == [MergeState.ROLLED_BACK]
    assert "companion" in (report.merges[0].error or "")
    assert report.merges[0].retry_later  # our side of the disk: the partition backs off
    assert data_files(settings.data_dir) == before_files
    assert companion_files(settings.data_dir) == before_companions
    assert tmp_files(settings.data_dir) == []
    assert journal.unreadable() == []  # no source is to blame

    monkeypatch.undo()
    report = run_pass(settings, journal)
    assert [m.state for m in report.merges] == [MergeState.SOURCES_DELETED]
    assert rows_pyarrow(settings.data_dir) == before_rows
    (published,) = companion_files(settings.data_dir)
    assert read_companion(published).containers


def companion_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.rglob("*.containers"))


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_failed_fsync_names_what_it_could_not_sync(
    setup, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:  # type: ignore[no-untyped-def]
    """os.fsync's error names no file: an EIO on the output or its folder was reported as a
    bare "[Errno 5] Input/output error" by the merge and the partition. Errors carry the path
    and the reason; the errno stays, so nothing decides differently."""
    settings, journal = setup
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_folder = stat.S_ISDIR(os.fstat(fd).st_mode)
        if is_folder == (what == "folder"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    report = run_pass(settings, journal)
    partition = settings.data_dir / "dt=2025-12-30/identifier=pod-a"
    if what == "file":
        [merge_] = report.merges
        assert merge_.state is MergeState.ROLLED_BACK
        error = merge_.error or ""
        assert str(partition / (merge_.output + ".tmp")) in error
    else:  # the roll back cannot be made durable either: the partition fails
        [(_, error)] = report.errors
        assert str(partition) in error
    assert os.strerror(errno.EIO) in error and "fsync" in error
