"""The expected-state oracle of the crash harnesses: what must hold after any crash, recovered.

Every harness (white-box kill points, the kill -9 torture loop, simulated power loss) captures
the rows the monitor wrote *outside* the data directory, as a multiset of row keys (partition
plus a digest of the row's content: the simulator never writes one row twice in a partition),
then lets the consolidator crash and recover, and asks `check` for the six conditions of
issue 3:

1. no loss and 2. no duplicates: the live files' row multiset equals the expected one exactly;
3. every live parquet file and companion reads back cleanly, with row counts that match the
   journal (a finished merge's `output_rows`, a journaled source's `rows`);
4. no `*.tmp` left in a partition, no merge in a non-terminal state;
5. the journal matches the disk: a finished merge's output exists with its recorded checksum
   (or was itself consumed by a later finished merge), none of its sources exists any more, and
   every live consolidated file is the output of a finished merge;
6. recovery is idempotent: two more recoveries change neither a file nor the journal.

One copy, used by the tests (`from oracle import ...`) and by `scripts/torture.py` (which puts
this folder on `sys.path`). It reads the disk with pyarrow and the journal through the
package's read-only `Journal`, and runs recovery in-process: it must be called when no
consolidator process is running.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fgm_consolidator import companions, lock
from fgm_consolidator.durable import FileIdentity, identity
from fgm_consolidator.errors import ConsolidatorError
from fgm_consolidator.exit_codes import EXIT_NEEDS_PERSON
from fgm_consolidator.journal import Journal, MergeRecord, UnreadableRecord
from fgm_consolidator.layout import (
    COMPANION_SUFFIX,
    PARQUET_SUFFIX,
    STATE_DIR,
    companion_name,
    default_journal_path,
    is_our_tmp,
    iter_partitions,
    parse_data_file,
)
from fgm_consolidator.plan import Policy
from fgm_consolidator.recovery import recover
from fgm_consolidator.service import Settings, StopFlag, run_service
from fgm_consolidator.states import TERMINAL, MergeState

Row = tuple[Any, ...]
RowKey = tuple[str, bytes]  # (partition, digest of the canonical row)

EXAMPLES = 3  # rows or files named per violation, enough to start a diagnosis


def canonical_row(row: dict[str, Any]) -> Row:
    """One row independent of layout: flat `l_*` columns and map labels become one label set,
    and a label column that is null in this row (absent from the file it came from) vanishes."""
    labels = row.pop("labels", None)
    label_items = dict(labels) if labels is not None else {}
    for key in [k for k in row if k.startswith("l_")]:
        value = row.pop(key)
        if value is not None:
            label_items[key[2:]] = value
    era = "map" if labels is not None else "flat"
    return (era, *sorted(row.items()), tuple(sorted(label_items.items())))


def _canonical_rows(table: pa.Table) -> Iterator[Row]:
    """`canonical_row` of every row, column by column (no dict per row: ~4x faster)."""
    names = table.column_names
    values = [table.column(name).to_pylist() for name in names]
    flat = [(name[2:], values[i]) for i, name in enumerate(names) if name.startswith("l_")]
    mapped = values[names.index("labels")] if "labels" in names else None
    base = sorted(
        (name, values[i])
        for i, name in enumerate(names)
        if name != "labels" and not name.startswith("l_")
    )
    era = "flat" if mapped is None else "map"
    for r in range(table.num_rows):
        labels = {} if mapped is None else dict(mapped[r])
        for key, column in flat:
            if column[r] is not None:
                labels[key] = column[r]
        yield (era, *((name, column[r]) for name, column in base), tuple(sorted(labels.items())))


def row_keys(table: pa.Table, partition: str) -> Counter[RowKey]:
    """The keys of a table's rows; the same row read from any file gives the same key."""
    keys: Counter[RowKey] = Counter()
    for row in _canonical_rows(table):
        keys[(partition, hashlib.blake2b(repr(row).encode(), digest_size=16).digest())] += 1
    return keys


def data_file_paths(data_dir: Path) -> list[tuple[str, Path]]:
    """(partition, path) of every parquet file a viewer would read."""
    return [
        (partition, data_dir / partition / name)
        for partition in iter_partitions(data_dir)
        for name in sorted(os.listdir(data_dir / partition))
        if parse_data_file(name) is not None
    ]


def expected_rows(data_dir: Path) -> Counter[RowKey]:
    """The multiset to hold the consolidator to, read before it runs (outside its reach after)."""
    expected: Counter[RowKey] = Counter()
    for partition, path in data_file_paths(data_dir):
        expected.update(row_keys(pq.read_table(path), partition))
    return expected


ContainerIds = dict[str, set[str]]  # partition -> container ids some companion lists


def viewer_containers(data_dir: Path) -> ContainerIds:
    """The containers the viewer lists per partition: those of the companion of each live data
    file (FORMATS: a parquet file without one contributes none). A companion that does not
    decode contributes none either (reported by `read_live`)."""
    found: ContainerIds = {}
    for partition, path in data_file_paths(data_dir):
        ids = found.setdefault(partition, set())
        companion = path.parent / companion_name(path.name)
        if companion.exists():
            with contextlib.suppress(ConsolidatorError):
                sidecar = companions.read_companion(companion)
                ids.update(c.container_id for c in sidecar.containers)
    return found


def check_containers(data_dir: Path, expected: ContainerIds, report: OracleReport) -> None:
    """FORMATS: an output's companion is the union of its sources', or containers that lived
    only in consolidated periods vanish from the viewer."""
    live = viewer_containers(data_dir)
    for partition, ids in sorted(expected.items()):
        lost = ids - live.get(partition, set())
        if lost:
            report.add(f"{partition}: containers no companion lists any more: {_examples(lost)}")


# -- the state of the disk and the journal ------------------------------------------------------


@dataclass
class LiveFile:
    partition: str
    path: Path
    identity: FileIdentity
    rows: int
    keys: Counter[RowKey]


@dataclass
class OracleReport:
    violations: list[str] = field(default_factory=list)
    files_checked: int = 0
    rows_checked: int = 0
    merges: int = 0

    def add(self, message: str) -> None:
        self.violations.append(message)


def _examples(items: Iterable[Any]) -> str:
    listed = [str(i) for i in items]
    more = f" (and {len(listed) - EXAMPLES} more)" if len(listed) > EXAMPLES else ""
    return ", ".join(listed[:EXAMPLES]) + more


def read_live(
    data_dir: Path, report: OracleReport, unreadable: set[tuple[str, str, int, int]]
) -> list[LiveFile]:
    """Read every live file whole (a footer is not enough: pages can be torn) and companions.

    `unreadable` holds (partition, name, size, mtime_ns) of the files the journal reported
    unreadable: left alone as they are, they are no violation (invariant 4)."""
    live = []
    for partition, path in data_file_paths(data_dir):
        try:
            table = pq.read_table(path)
            found = identity(path)
        except (OSError, pa.ArrowException) as exc:
            st = path.stat()
            if (partition, path.name, st.st_size, st.st_mtime_ns) not in unreadable:
                report.add(f"{path}: does not read back: {exc}")
            continue
        live.append(LiveFile(partition, path, found, table.num_rows, row_keys(table, partition)))
    for partition in iter_partitions(data_dir):
        folder = data_dir / partition
        for name in sorted(os.listdir(folder)):
            if is_our_tmp(name):
                report.add(f"{folder / name}: temp file left behind")
            elif name.endswith(COMPANION_SUFFIX):
                _check_companion(folder, name, report)
    report.files_checked = len(live)
    report.rows_checked = sum(f.rows for f in live)
    return live


def _check_companion(folder: Path, name: str, report: OracleReport) -> None:
    parquet = folder / (name.removesuffix(COMPANION_SUFFIX) + PARQUET_SUFFIX)
    if not parquet.exists():
        report.add(f"{folder / name}: companion left without its parquet file")
    try:
        companions.read_companion(folder / name)
    except ConsolidatorError as exc:
        report.add(f"{folder / name}: companion does not decode: {exc.reason}")


def check_rows(live: list[LiveFile], expected: Counter[RowKey], report: OracleReport) -> None:
    """Conditions 1 and 2, naming the files that hold a duplicated row."""
    found: Counter[RowKey] = Counter()
    for file in live:
        found.update(file.keys)
    missing = expected - found
    extra = found - expected
    if missing:
        partitions = Counter(partition for partition, _ in missing.elements())
        report.add(f"{sum(missing.values())} expected rows lost, by partition: {dict(partitions)}")
    if extra:
        holders = {str(f.path) for f in live if any(key in extra for key in f.keys)}
        report.add(
            f"{sum(extra.values())} rows present more often than written (duplicates or rows "
            f"nobody wrote), in: {_examples(sorted(holders))}"
        )


def journal_records(data_dir: Path, journal_path: Path | None = None) -> list[MergeRecord]:
    return read_journal(data_dir, journal_path)[0]


def read_journal(
    data_dir: Path, journal_path: Path | None = None
) -> tuple[list[MergeRecord], list[UnreadableRecord]]:
    path = journal_path or default_journal_path(data_dir)
    if not path.exists():
        return [], []
    journal = Journal.open(path, read_only=True)
    try:
        return sorted(journal.history(), key=lambda r: r.id), journal.unreadable()
    finally:
        journal.close()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_journal(
    data_dir: Path,
    records: list[MergeRecord],
    live: list[LiveFile],
    report: OracleReport,
    *,
    journal_lost: bool = False,
) -> None:
    """Conditions 3 (row counts), 4 (terminal states) and 5 (journal matches disk)."""
    report.merges = len(records)
    by_path = {f.path: f for f in live}
    finished = [r for r in records if r.state is MergeState.SOURCES_DELETED]
    consumers: dict[tuple[str, str], list[int]] = {}  # file -> finished merges that took it
    writers: dict[tuple[str, str], list[MergeRecord]] = {}  # output -> finished merges of it
    for r in finished:
        writers.setdefault((r.partition, r.output), []).append(r)
        for s in r.sources:
            consumers.setdefault((r.partition, s.name), []).append(r.id)
    outputs = set()
    for record in records:
        if record.state not in TERMINAL:
            report.add(f"merge {record.id} ({record.output}) left in state {record.state}")
        folder = data_dir / record.partition
        for source in record.sources:
            file = by_path.get(folder / source.name)
            if file is not None and file.identity == source.identity:
                if record.state is MergeState.SOURCES_DELETED:
                    report.add(f"{file.path}: source of finished merge {record.id} still present")
                if file.rows != source.rows:
                    report.add(
                        f"{file.path}: {file.rows} rows, merge {record.id} journaled {source.rows}"
                    )
    for record in finished:
        folder = data_dir / record.partition
        output = folder / record.output
        key = (record.partition, record.output)
        later = next((w for w in writers[key] if w.id > record.id), None)
        if later is not None:
            # The later one checks the file. Legitimate if it is the same file (adopted again
            # by a later start with the journal lost), or if a merge between the two took this
            # output as a source: new files under its sources' reused names make the same
            # range again (test_name_reuse).
            same = later.output_checksum == record.output_checksum
            if not same and not any(record.id < c < later.id for c in consumers.get(key, ())):
                report.add(f"{output}: output of merge {record.id} overwritten by merge {later.id}")
            continue
        file = by_path.get(output)
        if file is None:  # unreadable (reported above), or merged again by a later merge
            if not output.exists() and key not in consumers:
                report.add(f"{output}: output of finished merge {record.id} missing")
            continue
        outputs.add(output)
        if file.rows != record.output_rows:
            report.add(
                f"{output}: {file.rows} rows, merge {record.id} journaled {record.output_rows}"
            )
        if _sha256(output) != record.output_checksum:
            report.add(f"{output}: checksum differs from the one merge {record.id} journaled")
        if record.has_companion and not (folder / companion_name(record.output)).exists():
            report.add(f"{output}: companion of finished merge {record.id} missing")
    if journal_lost:
        return
    for file in live:
        parsed = parse_data_file(file.path.name)
        if parsed is not None and parsed.kind == "consolidated" and file.path not in outputs:
            report.add(f"{file.path}: consolidated file no finished merge accounts for")


# -- idempotent recovery --------------------------------------------------------------------------


Snapshot = tuple[dict[str, tuple[int, int, int]], list[MergeRecord]]


def snapshot(data_dir: Path, journal_path: Path | None = None) -> Snapshot:
    """Every data file's inode, size and mtime, and the whole journal history."""
    files = {}
    for root, dirs, names in os.walk(data_dir):
        dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in names:
            st = os.stat(os.path.join(root, name))
            key = os.path.relpath(os.path.join(root, name), data_dir)
            files[key] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return files, journal_records(data_dir, journal_path)


def recover_in_process(data_dir: Path, journal_path: Path | None = None) -> None:
    """What `fgm-consolidator recover` does, under the same lock, without a new process."""
    with lock.exclusive(data_dir):
        journal = Journal.open(journal_path or default_journal_path(data_dir))
        try:
            recover(journal, data_dir)
        finally:
            journal.close()


# Exit codes of a quiescent pass that ran through: a merge left for a person is the oracle's
# to judge by the rows, not the exit code's.
RAN_THROUGH = (0, EXIT_NEEDS_PERSON)


def quiescent_pass(data_dir: Path, policy: Policy, journal_path: Path | None = None) -> int:
    """`run --once` in-process: start-up recovery, then one pass over everything eligible."""
    settings = Settings(data_dir, journal_path or default_journal_path(data_dir), policy)
    return run_service(settings, StopFlag(grace_s=0), once=True)


def _describe_change(before: Snapshot, after: Snapshot) -> str:
    changed = sorted(set(before[0].items()) ^ set(after[0].items()))
    parts = []
    if changed:
        parts.append(f"files {_examples(name for name, _ in changed)}")
    if before[1] != after[1]:
        parts.append("the journal")
    return " and ".join(parts)


def check_idempotent(data_dir: Path, journal_path: Path | None, report: OracleReport) -> None:
    """Condition 6: on a recovered, settled directory two more recoveries change nothing."""
    states = [snapshot(data_dir, journal_path)]
    for run in ("first", "second"):
        recover_in_process(data_dir, journal_path)
        states.append(snapshot(data_dir, journal_path))
        if states[-1] != states[-2]:
            report.add(
                f"the {run} recovery of a recovered directory changed "
                f"{_describe_change(states[-2], states[-1])}"
            )


def check(
    data_dir: Path,
    expected: Counter[RowKey],
    *,
    journal_path: Path | None = None,
    idempotence: bool = True,
    containers: ContainerIds | None = None,
    journal_lost: bool = False,
) -> OracleReport:
    """All six conditions; an empty `violations` list means the run kept every promise. With
    `containers` (`viewer_containers` before the run), also that the viewer lists them all.
    `journal_lost`: the journal was deleted on purpose at some point, so an output whose merge
    it held need not be accounted for by the journal there is now."""
    report = OracleReport()
    if idempotence:
        check_idempotent(data_dir, journal_path, report)
    records, unreadable = read_journal(data_dir, journal_path)
    reported = {(u.partition, u.name, u.size, u.mtime_ns) for u in unreadable}
    live = read_live(data_dir, report, reported)
    check_rows(live, expected, report)
    check_journal(data_dir, records, live, report, journal_lost=journal_lost)
    check_unreadable_kept(data_dir, records, unreadable, report)
    if containers is not None:
        check_containers(data_dir, containers, report)
    return report


def check_unreadable_kept(
    data_dir: Path,
    records: list[MergeRecord],
    unreadable: list[UnreadableRecord],
    report: OracleReport,
) -> None:
    """Invariant 4: a file reported unreadable is never deleted (unless it became readable
    later and a finished merge took it, as the monitor's file does once its footer is out; a
    companion reported unreadable goes with its file)."""
    merged = {
        (r.partition, name)
        for r in records
        if r.state is MergeState.SOURCES_DELETED
        for s in r.sources
        for name in (s.name, companion_name(s.name))
    }
    for file in unreadable:
        path = data_dir / file.partition / file.name
        if not path.exists() and (file.partition, file.name) not in merged:
            report.add(f"{path}: reported unreadable, then deleted")
