"""Every name and path the consolidator reads or writes, each format paired with its parser.

Cleanup decides what to delete only by parsing names here (a LevelDB habit): a file whose
name does not parse as ours is never touched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

STAMP = r"[0-9]{8}T[0-9]{6}Z"
STATE_DIR = ".fgm-consolidator"
JOURNAL_NAME = "journal.db"
LOCK_NAME = "lock"
DATA_DIR_ID_NAME = "data-dir-id"
TMP_SUFFIX = ".tmp"
PARQUET_SUFFIX = ".parquet"
COMPANION_SUFFIX = ".containers"

# The monitor opens a new `metrics-<ts>.parquet` every 90 s by default, the stamp marking the
# start of its window, and writes that file's footer only when it rotates (FORMATS.md): a file
# younger than one rotation may still be written.
MONITOR_ROTATION_S = 90

# Matched whole (`fullmatch`): `$` matches before a trailing newline too, and a
# `metrics-<ts>.parquet\n`, which the viewer never reads, was merged with the rest and deleted.
_METRICS_RE = re.compile(rf"metrics-(?P<start>{STAMP})\.parquet")
_CONSOLIDATED_RE = re.compile(rf"consolidated-(?P<start>{STAMP})-(?P<end>{STAMP})\.parquet")
_OUR_TMP_RE = re.compile(rf"consolidated-{STAMP}-{STAMP}(\.parquet|\.containers)\.tmp")
_STAMP_RE = re.compile(STAMP)
_PARTITION_RE = re.compile(r"dt=(?P<day>[0-9]{4}-[0-9]{2}-[0-9]{2})/identifier=[^/]+")

Kind = Literal["metrics", "consolidated"]


def format_stamp(moment: datetime) -> str:
    """Fixed-width, sortable UTC stamp exactly as the monitor and the viewer spell it. Not
    `strftime`: its `%Y` does not pad a year below 1000, and such a name parses as nothing."""
    m = moment.astimezone(UTC)
    return f"{m.year:04d}{m.month:02d}{m.day:02d}T{m.hour:02d}{m.minute:02d}{m.second:02d}Z"


def parse_stamp(text: str) -> datetime:
    """The moment a stamp names. ValueError when `text` is not a stamp, or is shaped like one
    but names no moment (a month 13, a second 60). Sliced by hand: `strptime` cost a tenth of a
    second per pass over a partition's names."""
    if not _STAMP_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a stamp of the form YYYYMMDDTHHMMSSZ")
    return datetime(
        int(text[0:4]),
        int(text[4:6]),
        int(text[6:8]),
        int(text[9:11]),
        int(text[11:13]),
        int(text[13:15]),
        tzinfo=UTC,
    )


@dataclass(frozen=True, order=True)
class DataFileName:
    """A parquet name the viewer understands: `metrics-<ts>` or `consolidated-<start>-<end>`."""

    start: datetime
    end: datetime
    name: str
    kind: Kind


def parse_data_file(name: str) -> DataFileName | None:
    """What a data file's name says, or None for a name that is not one: such files are never
    planned, merged or deleted. That includes a name shaped like ours whose stamp names no
    moment (`metrics-20261399T000000Z.parquet`), which once stopped every pass."""
    try:
        if match := _METRICS_RE.fullmatch(name):
            stamp = parse_stamp(match["start"])
            return DataFileName(stamp, stamp, name, "metrics")
        if match := _CONSOLIDATED_RE.fullmatch(name):
            return DataFileName(
                parse_stamp(match["start"]), parse_stamp(match["end"]), name, "consolidated"
            )
    except ValueError:
        return None
    return None


def format_consolidated(start: datetime, end: datetime) -> str:
    return f"consolidated-{format_stamp(start)}-{format_stamp(end)}{PARQUET_SUFFIX}"


def tmp_name(name: str) -> str:
    """Where an output is written before its rename (the viewer skips names not ending .parquet)."""
    return name + TMP_SUFFIX


def is_our_tmp(name: str) -> bool:
    """Temp files of our own outputs only; the monitor's `metrics-*.containers.tmp` is not ours."""
    return _OUR_TMP_RE.fullmatch(name) is not None


def companion_name(parquet_name: str) -> str:
    """The viewer looks for `<parquet path with extension .containers>`."""
    return parquet_name.removesuffix(PARQUET_SUFFIX) + COMPANION_SUFFIX


def is_utf8(name: str) -> bool:
    """False for a name decoded from bytes that are not UTF-8 (it holds surrogates)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def partition_day(key: str) -> date | None:
    """The day of a `dt=YYYY-MM-DD/identifier=<name>` partition key; None when `key` is not
    one, including a folder shaped like one whose date is no day (`dt=2026-13-45`) or whose
    name is not UTF-8 (the journal could not record it)."""
    if not is_utf8(key):
        return None
    match = _PARTITION_RE.fullmatch(key)
    if match is None:
        return None
    try:
        return date.fromisoformat(match["day"])
    except ValueError:
        return None


def parse_partition(text: str) -> str:
    """Check a `dt=YYYY-MM-DD/identifier=<name>` key given by a person (`history --partition`)."""
    text = text.strip("/")
    if partition_day(text) is None:
        raise ValueError(
            f"{text!r} is not of the form dt=YYYY-MM-DD/identifier=<name> with a real date"
        )
    return text


@dataclass(frozen=True)
class SkippedFolder:
    """A folder named like a partition (or its day) that is not walked, and why."""

    path: Path
    reason: str
    unlisted: bool = False  # it could not be listed: what it holds is unknown, not left alone


NOT_FOLLOWED = "a symbolic link; not followed, so no file outside the data directory is merged"
NOT_UTF8 = "its name is not valid UTF-8, which the journal cannot record; rename the folder"


def walk_partitions(data_dir: Path) -> tuple[list[str], list[SkippedFolder]]:
    """Partition keys in sorted order, and the folders named like one that are left alone.

    Anything not shaped like the monitor's folders is ignored. A `dt=` or `identifier=` folder
    that is a symbolic link is not followed: it once brought files from outside the data
    directory into merges, which then deleted them there. Links are judged by the name itself
    (lstat), and only where their name would make a partition, so that they can be reported.
    """
    keys: list[str] = []
    skipped: list[SkippedFolder] = []
    for day in _named(data_dir, "dt=", skipped):
        if partition_day(f"{day.name}/identifier=x") is None:
            continue
        if day.is_symlink():
            skipped.append(SkippedFolder(Path(day.path), NOT_FOLLOWED))
            continue
        if not day.is_dir(follow_symlinks=False):
            continue
        for ident in _named(Path(day.path), "identifier=", skipped):
            key = f"{day.name}/{ident.name}"
            if not is_utf8(ident.name):
                skipped.append(SkippedFolder(Path(ident.path), NOT_UTF8))
                continue
            if partition_day(key) is None:
                continue
            if ident.is_symlink():
                skipped.append(SkippedFolder(Path(ident.path), NOT_FOLLOWED))
            elif ident.is_dir(follow_symlinks=False):
                keys.append(key)
    return keys, skipped


def _named(folder: Path, prefix: str, skipped: list[SkippedFolder]) -> list[os.DirEntry[str]]:
    """Entries of `folder` whose name starts with `prefix`, by name; a folder that cannot be
    listed is reported and holds none (as glob, used here before, said nothing)."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if e.name.startswith(prefix)), key=lambda e: e.name)
    except OSError as exc:
        reason = f"cannot be listed: {exc.strerror or exc}"
        skipped.append(SkippedFolder(folder, reason, unlisted=True))
        return []


def linked_folder(data_dir: Path, partition: str) -> Path | None:
    """The first folder of `partition` that is now a symbolic link, which `walk_partitions`
    would not follow, or None. For records made while it was a real folder."""
    folder = data_dir
    for part in Path(partition).parts:
        folder = folder / part
        if folder.is_symlink():
            return folder
    return None


def iter_partitions(data_dir: Path) -> Iterator[str]:
    """Partition keys in sorted order (see `walk_partitions`), for whoever does not report the
    folders left alone: only a pass and `status` do."""
    yield from walk_partitions(data_dir)[0]


def state_dir(data_dir: Path) -> Path:
    return data_dir / STATE_DIR


def default_journal_path(data_dir: Path) -> Path:
    return state_dir(data_dir) / JOURNAL_NAME


def lock_path(data_dir: Path) -> Path:
    return state_dir(data_dir) / LOCK_NAME


def is_default_journal(journal: Path, data_dir: Path) -> bool:
    """The journal inside its data directory's state folder: it can belong to no other."""
    return journal.absolute() == default_journal_path(data_dir).absolute()


def data_dir_id_path(data_dir: Path) -> Path:
    """Where the data directory's identity lives: it travels with the data, whatever the path
    the volume is mounted at (the host's, the pod's)."""
    return state_dir(data_dir) / DATA_DIR_ID_NAME
