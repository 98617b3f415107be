"""Every name and path the consolidator reads or writes, each format paired with its parser.

Cleanup decides what to delete only by parsing names here (a LevelDB habit): a file whose
name does not parse as ours is never touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
STAMP = r"\d{8}T\d{6}Z"
STATE_DIR = ".fgm-consolidator"
JOURNAL_NAME = "journal.db"
LOCK_NAME = "lock"
TMP_SUFFIX = ".tmp"
PARQUET_SUFFIX = ".parquet"
COMPANION_SUFFIX = ".containers"

_METRICS_RE = re.compile(rf"^metrics-(?P<start>{STAMP})\.parquet$")
_CONSOLIDATED_RE = re.compile(rf"^consolidated-(?P<start>{STAMP})-(?P<end>{STAMP})\.parquet$")
_OUR_TMP_RE = re.compile(rf"^consolidated-{STAMP}-{STAMP}(\.parquet|\.containers)\.tmp$")
_PARTITION_RE = re.compile(r"^dt=\d{4}-\d{2}-\d{2}/identifier=[^/]+$")

Kind = Literal["metrics", "consolidated"]


def format_stamp(moment: datetime) -> str:
    """Fixed-width, sortable UTC stamp exactly as the monitor and the viewer spell it."""
    return moment.astimezone(UTC).strftime(STAMP_FORMAT)


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, STAMP_FORMAT).replace(tzinfo=UTC)


@dataclass(frozen=True, order=True)
class DataFileName:
    """A parquet name the viewer understands: `metrics-<ts>` or `consolidated-<start>-<end>`."""

    start: datetime
    end: datetime
    name: str
    kind: Kind


def parse_data_file(name: str) -> DataFileName | None:
    if match := _METRICS_RE.match(name):
        stamp = parse_stamp(match["start"])
        return DataFileName(stamp, stamp, name, "metrics")
    if match := _CONSOLIDATED_RE.match(name):
        return DataFileName(
            parse_stamp(match["start"]), parse_stamp(match["end"]), name, "consolidated"
        )
    return None


def format_consolidated(start: datetime, end: datetime) -> str:
    return f"consolidated-{format_stamp(start)}-{format_stamp(end)}{PARQUET_SUFFIX}"


def tmp_name(name: str) -> str:
    """Where an output is written before its rename (the viewer skips names not ending .parquet)."""
    return name + TMP_SUFFIX


def is_our_tmp(name: str) -> bool:
    """Temp files of our own outputs only; the monitor's `metrics-*.containers.tmp` is not ours."""
    return _OUR_TMP_RE.match(name) is not None


def companion_name(parquet_name: str) -> str:
    """The viewer looks for `<parquet path with extension .containers>`."""
    return parquet_name.removesuffix(PARQUET_SUFFIX) + COMPANION_SUFFIX


def parse_partition(text: str) -> str:
    """Check a `dt=YYYY-MM-DD/identifier=<name>` key given by a person (`history --partition`)."""
    text = text.strip("/")
    if not _PARTITION_RE.match(text):
        raise ValueError(f"{text!r} is not of the form dt=YYYY-MM-DD/identifier=<name>")
    return text


def iter_partitions(data_dir: Path) -> Iterator[str]:
    """Partition keys in sorted order; anything not shaped like the monitor's folders is ignored."""
    for day in sorted(data_dir.glob("dt=*")):
        if not day.is_dir():
            continue
        for ident in sorted(day.glob("identifier=*")):
            key = f"{day.name}/{ident.name}"
            if ident.is_dir() and _PARTITION_RE.match(key):
                yield key


def state_dir(data_dir: Path) -> Path:
    return data_dir / STATE_DIR


def default_journal_path(data_dir: Path) -> Path:
    return state_dir(data_dir) / JOURNAL_NAME


def lock_path(data_dir: Path) -> Path:
    return state_dir(data_dir) / LOCK_NAME
