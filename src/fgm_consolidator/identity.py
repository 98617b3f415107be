"""Which data directory a journal belongs to, so that one never recovers another's merges.

A journal records partitions relative to its data directory. A `--journal` kept outside the
data directory can be given with one data directory and later with another (at the same time
is refused by `<journal>.lock`); the second's recovery would then judge the first one's merges
by its own folders. So each data directory gets a random id, written once into its state folder
(`.fgm-consolidator/data-dir-id`) where it travels with the data whatever path the volume is
mounted at, and the journal records that id (journal migration 4). A journal recorded for
another id is refused by every command before anything is touched; a journal recorded for none
(new, or from before migration 4) adopts the data directory it is opened with for writing.

The default journal lives in that same state folder, so it cannot be given to another
directory without being moved: a data directory that only ever had its default journal gets
no id file (the default layout writes nothing it did not write before), and its journal is
bound once the directory has an id (given by the first external journal used with it). If the
id file alone was lost beside a bound default journal, the journal's id is written back.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from pathlib import Path

from . import crashpoints, durable
from .errors import ConfigError, ConsolidatorError, NameTakenError
from .journal import DataDirBinding, Journal, recorded_data_dir
from .layout import STATE_DIR, TMP_SUFFIX, data_dir_id_path, is_default_journal
from .logs import log_event

log = logging.getLogger(__name__)
ID_BYTES_READ = 4096  # an id is 33 bytes; a larger file is not one of ours


def read_id(data_dir: Path) -> str | None:
    """The data directory's id, or None before the first `run` or `recover` gave it one.
    Opened as a regular file only: a FIFO under its name hung every command, `status
    --liveness` included, waiting for a writer."""
    path = data_dir_id_path(data_dir)
    try:
        with durable.open_regular(path) as handle:
            text = handle.read(ID_BYTES_READ).decode("utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):  # no state folder: the lock says why
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConsolidatorError(f"cannot read the data directory's id: {exc}", path) from exc
    return text or None


def _establish_id(data_dir: Path, proposed: str) -> str:
    """Write `proposed` as the id, once and durably, before any journal records it: a temp file
    synced, linked to the final name without overwriting, folders synced. Returns the id now in
    place: another instance (its lock bypassed) may have written its own first. The temp name is
    this attempt's own, so two attempts never remove each other's."""
    path = data_dir_id_path(data_dir)
    tmp = path.with_name(f"{path.name}.{proposed}{TMP_SUFFIX}")
    path.parent.mkdir(exist_ok=True)
    with crashpoints.unnamed():
        durable.write_new_file(tmp, (proposed + "\n").encode())
        try:
            durable.rename_no_replace(tmp, path)
        except NameTakenError:
            durable.remove(tmp)
        durable.fsync_dir(path.parent)
        durable.fsync_dir(data_dir)  # the state folder's own name: nobody else syncs it
    found = read_id(data_dir)
    if found is None:
        raise ConsolidatorError("the data directory's id file is empty; remove it", path)
    return found


def _refuse(
    journal: Path, data_dir: Path, recorded: DataDirBinding | None, found: str | None
) -> None:
    """ConfigError (a usage error of --journal, exit 2) when `journal` must not be used with
    `data_dir`."""
    if recorded is None or recorded.id == found:
        return
    if found is None and is_default_journal(journal, data_dir):
        return  # only the id file was lost; `bind` writes it back
    id_path = data_dir_id_path(data_dir)
    here = f"id {found}" if found is not None else "which has no id yet"
    raise ConfigError(
        "--journal",
        f"{journal} is the journal of data directory {recorded.path} (id {recorded.id}), not"
        f" of {data_dir} ({here}): its recovery would act here on merges made there. Give"
        f" {data_dir} a journal of its own (another --journal path; a new one is created), or,"
        f" if {data_dir} is that same directory and lost its {STATE_DIR} folder, write"
        f" {recorded.id} into {id_path} and run again",
    )


def _refuse_anothers_state_folder(journal: Path, data_dir: Path) -> None:
    """A journal records partitions relative to its data directory: pointed at from a second
    data directory, its recovery would judge the first one's merges by the wrong folders (a
    merge half-way through marked needs-attention, its sources then left beside its output).
    A default journal records no binding, so only its place tells: `status` called a data
    directory that never ran healthy by another's journal, and `history` listed its merges."""
    real = journal.resolve()  # through a link, or `..`, to another's journal all the same
    owner = real.parent.parent
    if real.parent.name != STATE_DIR or owner == data_dir.resolve():
        return
    raise ConfigError(
        "--journal",
        f"{journal} is the journal of another data directory ({owner}); each data directory"
        " needs its own",
    )


def check(journal: Path, data_dir: Path) -> None:
    """Before any command touches anything: ConfigError (a usage error of --journal, exit 2)
    when the journal belongs to another data directory. Reads only."""
    _refuse_anothers_state_folder(journal.absolute(), data_dir)
    try:
        found = read_id(data_dir)
    except ConsolidatorError as exc:
        raise ConfigError("--data-dir", str(exc)) from exc
    _refuse(journal, data_dir, recorded_data_dir(journal), found)


def bind(journal: Journal, data_dir: Path) -> None:
    """Under the data directory's lock, with the journal open for writing: give the data
    directory its id if it has none (not for an unbound default journal), and record it in a
    journal that records none. Refuses first: what `check` let through may have changed
    since. A disk that refuses the id or its record (full) is logged and the journal stays
    unbound, as before migration 4, until the next start binds it: a full disk must not stop
    the service that frees space."""
    recorded = journal.data_dir_binding()
    found = read_id(data_dir)
    _refuse(journal.path, data_dir, recorded, found)
    if found is None and recorded is None and is_default_journal(journal.path, data_dir):
        return  # see the module's docstring: the default layout writes nothing new
    try:
        if found is None:
            found = _establish_id(data_dir, recorded.id if recorded else uuid.uuid4().hex)
            _refuse(journal.path, data_dir, recorded, found)  # another instance's id came first
        path = str(data_dir.absolute())
        if recorded is None or recorded.path != path:
            journal.bind_data_dir(found, path)
    except (OSError, sqlite3.Error) as exc:
        log_event(log, "data-dir-id-failed", logging.WARNING, data_dir=data_dir, error=exc,
                  retry="at the next start")  # fmt: skip
