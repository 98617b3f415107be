"""Start-up checks of the configuration that click's types cannot express, before anything is
touched: no journal created, no lock taken, no folder made.

click already refuses what a type can say (a data dir that is missing or not writable,
min-files below 2, an interval not above 0), but it lets `nan` and `inf` through every float
range: `--min-age nan` would make every file eligible however young, `--check-interval nan`
would loop without sleeping and `inf` would crash after the first pass. The journal must live
on the data's file system so that it sees the same crashes as the data (DESIGN.md); that is
checked here too.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError
from .layout import (
    MONITOR_ROTATION_S,
    data_dir_id_path,
    is_utf8,
    lock_path,
    partition_day,
)
from .logs import log_event

log = logging.getLogger(__name__)


def check_finite(values: Mapping[str, float]) -> None:
    """`values` maps an option's name (`--min-age`) to its value."""
    for option, value in values.items():
        if not math.isfinite(value):
            raise ConfigError(option, f"must be a finite number (got {value})")


def warn_min_age(min_age_s: float) -> None:
    """Below one rotation of the monitor, a file it is still writing may be planned (read as
    unreadable until its footer is there, or taken as it stands). Not refused: tests and
    benchmarks take every file at once on purpose (`--min-age 0`)."""
    if min_age_s < MONITOR_ROTATION_S:
        log_event(
            log,
            "min-age-below-rotation",
            logging.WARNING,
            min_age_s=min_age_s,
            rotation_s=MONITOR_ROTATION_S,
            reason="files younger than one rotation of the monitor may still be written",
        )


def warn_max_span(max_span_s: int) -> None:
    """A window shorter than two rotations of the monitor seldom holds two of its files, and
    one of 90 s or less never does: every pass then ends `ok` with nothing merged, and a unit
    mistake (`--max-span 60` meant as minutes) went unnoticed. Not refused: such a window still
    merges files a monitor writes more often (a restart cuts a rotation short)."""
    if max_span_s < 2 * MONITOR_ROTATION_S:
        log_event(
            log,
            "max-span-below-two-rotations",
            logging.WARNING,
            max_span_s=max_span_s,
            rotation_s=MONITOR_ROTATION_S,
            reason="an output window this short seldom or never holds two files to merge",
        )


def check_data_dir(data_dir: Path) -> None:
    """Refused before anything is touched: see `_check_a_folder`, `_check_utf8` and
    `_check_not_a_partition`."""
    _check_a_folder(data_dir)
    _check_utf8(data_dir)
    _check_not_a_partition(data_dir)


def check_writable(data_dir: Path) -> None:
    """For a command that writes there; `run --dry-run` only reads, and is given a read-only
    data directory (a snapshot, a volume mounted read-only for inspection)."""
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError("--data-dir", f"Directory '{data_dir}' is not writable.")


def _check_a_folder(data_dir: Path) -> None:
    """click's `file_okay=False` refuses a regular file only: given a FIFO or `/dev/null`,
    `run --dry-run` planned nothing and exited 0, `status` said "never ran here", and `recover`
    blamed `--journal`."""
    if not data_dir.is_dir():
        raise ConfigError("--data-dir", f"{data_dir} is not a directory")


def _check_utf8(data_dir: Path) -> None:
    """pyarrow takes paths as UTF-8 text: under a data directory whose name is not UTF-8 every
    merge would be rolled back with a UnicodeEncodeError, pass after pass."""
    text = str(data_dir.absolute())
    if not is_utf8(text):
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise ConfigError(
            "--data-dir", f"{shown} is not valid UTF-8, and pyarrow cannot open files under it"
        )


def _check_not_a_partition(data_dir: Path) -> None:
    """A `dt=` or `identifier=` folder given as the data directory holds no partition to
    walk: every pass would merge nothing, `status` would say healthy, and `run` would make its
    state folder among the monitor's files. Nothing would say the path is wrong."""
    folder = data_dir.absolute()
    day = folder.parent if folder.name.startswith("identifier=") else folder
    if partition_day(f"{day.name}/identifier=x") is not None:
        raise ConfigError(
            "--data-dir",
            f"{data_dir} is a partition folder ({folder.name}); give the monitor's data "
            f"directory, the one that holds the dt=YYYY-MM-DD folders ({day.parent})",
        )


def _existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest existing parent: where a new file would be created."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_journal_to_read(journal: Path, data_dir: Path) -> None:
    """The journal for a command that only reads it (`status`, `history`, `run --dry-run`): a
    path under a regular file is a mistyped `--journal`, not a directory where `run` never
    ran, and a folder there no journal; nor is a file of ours or of the monitor's
    (`_check_not_a_data_file`)."""
    _check_not_a_data_file(journal, data_dir)
    journal = journal.absolute()
    existing = _existing_ancestor(journal)
    if existing == journal and not journal.is_file():
        raise ConfigError("--journal", f"{journal} exists and is not a regular file")
    if existing != journal and not existing.is_dir():
        raise ConfigError("--journal", f"{existing} is not a directory, so {journal} cannot be")


def check_journal(journal: Path, data_dir: Path) -> None:
    """The journal (or the folder it would be created in) for a command that writes it: one
    a reader may read (`check_journal_to_read`), then may write, on the data volume."""
    check_journal_to_read(journal, data_dir)
    journal = journal.absolute()
    existing = _existing_ancestor(journal)
    folder = journal.parent if existing == journal else existing
    if existing == journal and not os.access(journal, os.R_OK | os.W_OK):
        raise ConfigError("--journal", f"{journal} must be readable and writable")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("--journal", f"{folder} must be writable to hold the journal")
    # `existing` is the journal itself when there is one: stat follows a symbolic link to
    # where SQLite really writes (a journal linked to a tmpfs passed when its folder was asked).
    journal_dev, data_dev = os.stat(existing).st_dev, os.stat(data_dir).st_dev
    if journal_dev != data_dev:
        raise ConfigError(
            "--journal",
            f"{journal} is on another file system than --data-dir {data_dir} "
            f"(device {_device(journal_dev)} vs {_device(data_dev)}); the journal must live on "
            "the data volume to see the same crashes",
        )


def _check_not_a_data_file(journal: Path, data_dir: Path) -> None:
    """A `--journal` naming the lock file or the data directory's id, or a file in a partition
    folder: SQLite would make a database of it. The lock file once became the journal, and the
    next start truncated it to the holder's line; the data directory's id became unreadable to
    every command; and the hint given for a journal that will not open, to move it aside, would
    move a monitor's file out of its partition."""
    where = Path(os.path.realpath(journal))
    for ours, what in ((lock_path(data_dir), "lock file"), (data_dir_id_path(data_dir), "id")):
        if where == Path(os.path.realpath(ours)):
            raise ConfigError(
                "--journal", f"{journal} is the data directory's {what}, not a journal"
            )
    try:
        inside = where.relative_to(os.path.realpath(data_dir)).parts
    except ValueError:
        return  # elsewhere on the volume
    if len(inside) > 2 and partition_day("/".join(inside[:2])) is not None:
        raise ConfigError(
            "--journal",
            f"{journal} is in the partition folder {'/'.join(inside[:2])}, among the "
            "monitor's files; keep the journal outside the dt= folders",
        )


def _device(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"
