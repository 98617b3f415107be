"""Look at one partition folder and say which files could be merged now.

Only names that parse as the monitor's or ours count. A file is eligible when it is older than
`min_age` by mtime and its footer reads; a file that fails to read is reported once per version
(identity) and then skipped, so it never blocks its partition (invariant 4).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from . import durable, footers
from .durable import FileIdentity
from .errors import SchemaConflictError, SourceReadError
from .journal import SourceRecord
from .layout import DataFileName, companion_name, parse_data_file
from .schemas import check_mergeable, fingerprint


@dataclass(frozen=True)
class SourceFile:
    """A readable data file with what its footer says, ready to be planned."""

    file: DataFileName
    identity: FileIdentity
    rows: int
    schema: pa.Schema
    companion: FileIdentity | None

    @property
    def name(self) -> str:
        return self.file.name

    def record(self) -> SourceRecord:
        return SourceRecord(
            self.name, self.identity, self.rows, fingerprint(self.schema), self.companion
        )


@dataclass(frozen=True)
class UnreadableFile:
    name: str
    identity: FileIdentity
    reason: str


@dataclass(frozen=True)
class PartitionScan:
    partition: str
    folder: Path
    eligible: tuple[SourceFile, ...]
    unreadable: tuple[UnreadableFile, ...]
    young: int
    names: frozenset[str]


def read_footer(path: Path) -> tuple[FileIdentity, int, pa.Schema]:
    """Identity, row count and Arrow schema, taken from one open file so they agree."""
    try:
        footer = footers.read(path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceReadError(f"unreadable parquet footer: {exc}", path) from exc
    return footer.identity, footer.rows, footer.schema


def optional_identity(path: Path) -> FileIdentity | None:
    try:
        return durable.identity(path)
    except FileNotFoundError:
        return None


def scan_partition(
    data_dir: Path,
    partition: str,
    *,
    min_age_s: float,
    now: float,
    known_unreadable: Collection[tuple[str, int, int]],
    held: Collection[str],
) -> PartitionScan:
    """`known_unreadable` holds (name, size, mtime_ns) of files already reported unreadable."""
    folder = data_dir / partition
    names = frozenset(entry.name for entry in os.scandir(folder))
    eligible: list[SourceFile] = []
    unreadable: list[UnreadableFile] = []
    young = 0
    for name in sorted(names):
        parsed = parse_data_file(name)
        if parsed is None or name in held:
            continue
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # deleted between listing and now
        if now - st.st_mtime_ns / 1e9 < min_age_s:
            young += 1
            continue
        if (name, st.st_size, st.st_mtime_ns) in known_unreadable:
            continue
        on_disk = FileIdentity.of(st)
        try:
            not_regular = durable.not_regular_reason(st.st_mode)
            if not_regular is not None:
                raise SourceReadError(f"{not_regular}; left alone", path)
            identity, rows, schema = read_footer(path)
            check_mergeable(schema)
        except SchemaConflictError as exc:
            unreadable.append(UnreadableFile(name, on_disk, f"cannot be merged: {exc.reason}"))
            continue
        except SourceReadError as exc:
            unreadable.append(UnreadableFile(name, on_disk, exc.reason))
            continue
        companion = optional_identity(folder / companion_name(name))
        eligible.append(SourceFile(parsed, identity, rows, schema, companion))
    eligible.sort(key=lambda s: s.file)
    return PartitionScan(partition, folder, tuple(eligible), tuple(unreadable), young, names)
