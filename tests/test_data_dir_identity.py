"""A journal belongs to one data directory, known by an id kept in the directory's state folder.

A `--journal` outside the data directory could be given with one data directory and later with
another: the second's recovery then acted on the first one's merges. Each case through the real
commands: the default layout needs no step, a journal from before adopts the directory it is
next used with, one recorded for another directory is refused by every command (exit 2, both
paths named, nothing touched), and the same directory at another path is still itself.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import old_journal, run_cli, small_spec

from fgm_consolidator import durable, identity
from fgm_consolidator.errors import ConfigError, JournalError
from fgm_consolidator.journal import DataDirBinding, Journal, recorded_data_dir
from fgm_consolidator.layout import data_dir_id_path, default_journal_path, state_dir
from fgm_consolidator.simulate import PodSpec, generate

ENV = {"FGM_CRASH_AT": ""}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Data directories A and B, and a journal path outside both (on the same volume)."""
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, small_spec((PodSpec("pod-a"),)))
    generate(b, small_spec((PodSpec("pod-b"),)))
    return a, b, tmp_path / "journals" / "journal.db"


def run_once(data_dir: Path, journal: Path | None = None) -> None:
    extra = ["--journal", str(journal)] if journal is not None else []
    result = run_cli("run", "--once", "--min-age", "0", "--data-dir", str(data_dir), *extra,
                     env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr


def binding(journal: Path) -> DataDirBinding:
    found = recorded_data_dir(journal)
    assert found is not None
    return found


def data_dir_id(data_dir: Path) -> str:
    return data_dir_id_path(data_dir).read_text().strip()


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_the_default_layout_needs_no_step_and_writes_nothing_new(
    dirs: tuple[Path, Path, Path],
) -> None:
    a, _b, journal = dirs
    old_journal(default_journal_path(a), 3)  # a journal from before data directory ids
    run_once(a)
    assert not data_dir_id_path(a).exists()
    assert recorded_data_dir(default_journal_path(a)) is None
    # an external journal gives the directory its id; the default journal is bound with it
    run_once(a, journal)
    known = data_dir_id(a)
    run_once(a)
    assert binding(default_journal_path(a)) == DataDirBinding(known, str(a))
    # the id file alone lost beside its bound default journal: written back, nothing refused
    data_dir_id_path(a).unlink()
    run_once(a)
    assert data_dir_id(a) == known


COMMANDS = [
    ("run", "--once", "--min-age", "0"),
    ("run", "--dry-run"),
    ("recover",),
    ("history",),
    ("status",),
]


@pytest.mark.parametrize("b_has_an_id", [False, True])
def test_a_journal_of_another_data_directory_is_refused_by_every_command(
    dirs: tuple[Path, Path, Path], b_has_an_id: bool
) -> None:
    a, b, journal = dirs
    run_once(a, journal)
    if b_has_an_id:
        run_once(b, journal.parent.parent / "b-journal.db")  # B ran before, with its own
    before = (tree(b), tree(journal.parent))
    for command in COMMANDS:
        result = run_cli(*command, "--data-dir", str(b), "--journal", str(journal), env=ENV)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        message = " ".join(result.stderr.split())  # click wraps nothing, but be safe
        assert f"{journal} is the journal of data directory {a}" in message, message
        assert f"not of {b}" in message
        assert "a journal of its own" in message
        if b_has_an_id:
            assert f"(id {data_dir_id(b)})" in message
        assert result.stdout == ""
        assert (tree(b), tree(journal.parent)) == before, command  # nothing touched
    if not b_has_an_id:
        assert not state_dir(b).exists()
    run_once(a, journal)  # still A's journal, and works for A


def test_the_same_data_directory_at_another_path_is_itself(
    dirs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """As on the host and in the pod: the volume mounted elsewhere, its id with it."""
    a, _b, journal = dirs
    run_once(a, journal)
    moved = tmp_path / "mounted-elsewhere"
    a.rename(moved)
    run_once(moved, journal)
    assert binding(journal).path == str(moved)  # the next refusal names where it was last
    history = run_cli("history", "--data-dir", str(moved), "--journal", str(journal), env=ENV)
    assert history.returncode == 0 and "kind=merge" in history.stdout, history.stderr


def test_a_journal_from_before_adopts_the_data_directory_it_is_next_used_with(
    dirs: tuple[Path, Path, Path],
) -> None:
    a, b, journal = dirs
    old_journal(journal, 3)
    run_once(b, journal)
    assert binding(journal).id == data_dir_id(b)
    refused = run_cli("recover", "--data-dir", str(a), "--journal", str(journal), env=ENV)
    assert refused.returncode == 2, refused.stderr
    assert f"data directory {b}" in refused.stderr


def test_a_directory_that_lost_its_id_gets_its_journal_back_as_the_message_says(
    dirs: tuple[Path, Path, Path],
) -> None:
    a, _b, journal = dirs
    run_once(a, journal)
    known = data_dir_id(a)
    data_dir_id_path(a).unlink()
    refused = run_cli("run", "--once", "--data-dir", str(a), "--journal", str(journal), env=ENV)
    assert refused.returncode == 2, refused.stderr
    told = f"write {known} into {data_dir_id_path(a)}"
    assert told in " ".join(refused.stderr.split())
    data_dir_id_path(a).write_text(known + "\n")
    run_once(a, journal)
    assert binding(journal).id == known
    assert list(state_dir(a).glob("*.tmp")) == []


def test_a_disk_that_refuses_the_id_leaves_the_journal_unbound_until_the_next_start(
    dirs: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk must not stop the service that frees space: logged, bound next time."""
    a, _b, journal_path = dirs

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    journal = Journal.open(journal_path)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(durable, "write_new_file", full)
            with caplog.at_level(logging.WARNING, logger="fgm_consolidator"):
                identity.bind(journal, a)
        assert [r.getMessage() for r in caplog.records] == ["data-dir-id-failed"]
        assert journal.data_dir_binding() is None and not data_dir_id_path(a).exists()
        identity.bind(journal, a)
        assert journal.data_dir_binding() == DataDirBinding(data_dir_id(a), str(a))
    finally:
        journal.close()


def test_a_fifo_under_the_id_files_name_is_an_error_not_a_hang(
    dirs: tuple[Path, Path, Path],
) -> None:
    """Every command read the id with a plain open, which waits on a FIFO for a writer: all
    of them hung, `status --liveness` (the probe) included."""
    a, _, journal = dirs
    run_once(a, journal)
    data_dir_id_path(a).unlink()
    os.mkfifo(data_dir_id_path(a))
    for command in COMMANDS:
        result = run_cli(*command, "--data-dir", str(a), "--journal", str(journal), env=ENV,
                         timeout=60)  # fmt: skip
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "cannot read the data directory's id" in result.stderr
        assert "a FIFO, not a regular file" in result.stderr


def test_a_journal_locked_by_another_process_is_not_taken_for_one_of_no_directory(
    dirs: tuple[Path, Path, Path],
) -> None:
    """The check read a locked journal's binding as "none recorded" and let the command go
    on: with the lock gone by the command's own open (5 s later), `history` listed A's merges
    as B's and `status` called B healthy. Found by an operability review."""
    a, b, journal = dirs
    run_once(a, journal)
    holder = sqlite3.connect(journal, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("SELECT count(*) FROM merges").fetchone()
        with pytest.raises(JournalError, match="kept it locked"):
            identity.check(journal, b)
        result = run_cli("history", "--data-dir", str(b), "--journal", str(journal), env=ENV)
        assert (result.returncode, result.stdout) == (1, ""), result.stderr
        assert result.stderr.startswith(f"Error: {journal}: cannot open journal (database is")
        assert "Traceback" not in result.stderr
    finally:
        holder.execute("COMMIT")
        holder.close()
    with pytest.raises(ConfigError, match="is the journal of data directory"):
        identity.check(journal, b)
