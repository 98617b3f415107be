"""Keep the journal from growing forever without losing the audit trail a person may need.

After a pass, at most once a day (the journal records each prune, so restarts and `run --once`
do not repeat it), finished history older than `--history-retention-days` is forgotten: merges
that reached sources-deleted, rolled-back merges whose every source went into a later merge,
and old pass records. Nothing unfinished, nothing ever flagged for a person, and no failure
that is still the latest word on its files is pruned (the rule is `journal._PRUNABLE`).
Records of unreadable files older than the retention go too once the version they describe is
no longer on disk (deleted by the monitor's retention, or merged once readable): without this
the table grew with history. A record of a file still there stays, however old: it is what
keeps that file out of merges without reading it again every pass.

Space: deleted rows leave free pages that later inserts reuse, so a journal in steady state (a
day forgotten, a day added) stays flat on its own. A prune that frees more than a quarter of
the file (the first one after months, a shorter retention) is followed by a VACUUM; measured
(scripts/bench_retention.py) on 10,000 merges with 9,000 pruned: 46.5 MB -> 4.7 MB, prune
0.3 s + VACUUM 0.05 s, as small as auto_vacuum=INCREMENTAL gets, which would need a VACUUM
anyway to convert existing journals. The WAL is truncated after every prune: it grows to the
size of the prune's transaction and never shrinks by itself.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .journal import Journal
from .logs import log_event
from .scan import still_on_disk

log = logging.getLogger(__name__)

PRUNE_EVERY = timedelta(days=1)
VACUUM_ABOVE = 0.25  # share of free pages after a prune that is worth a VACUUM


@dataclass(frozen=True)
class PruneReport:
    cutoff: str
    merges: int
    passes: int
    unreadable: int
    bytes_before: int
    bytes_after: int
    vacuumed: bool


def journal_bytes(path: Path) -> int:
    """The database and its WAL: what the journal really takes on the volume."""
    total = 0
    for part in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            total += part.stat().st_size
    return total


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _cutoff(now: datetime, retention_days: float) -> datetime:
    """A retention longer than the calendar reaches back (`--history-retention-days 1e6`)
    keeps everything; `now - timedelta(...)` would raise OverflowError after the first pass."""
    try:
        return now - timedelta(days=retention_days)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


def prune(journal: Journal, retention_days: float, now: datetime, *, data_dir: Path) -> PruneReport:
    """One lstat per unreadable record older than the cutoff: few, and once a day."""
    cutoff = _iso(_cutoff(now, retention_days))
    before = journal_bytes(journal.path)
    gone = [
        record
        for record in journal.unreadable()
        if record.first_seen < cutoff and not still_on_disk(data_dir, record)
    ]
    counts = journal.prune(cutoff=cutoff, at=_iso(now), unreadable=gone)
    vacuum = journal.free_fraction() > VACUUM_ABOVE
    journal.compact(vacuum=vacuum)
    report = PruneReport(
        cutoff,
        counts.merges,
        counts.passes,
        counts.unreadable,
        before,
        journal_bytes(journal.path),
        vacuum,
    )
    log_event(
        log,
        "journal-pruned",
        logging.INFO if report.merges or report.passes or report.unreadable else logging.DEBUG,
        cutoff=report.cutoff,
        merges=report.merges,
        passes=report.passes,
        unreadable=report.unreadable,
        bytes_before=report.bytes_before,
        bytes_after=report.bytes_after,
        vacuumed=report.vacuumed,
    )
    return report


def prune_if_due(
    journal: Journal, retention_days: float, now: datetime | None = None, *, data_dir: Path
) -> PruneReport | None:
    """Prune when the last prune is a day old, or dated after now (recorded while the clock
    was ahead: waiting for the clock to reach it kept every record for as long); a failure (a
    full volume during VACUUM) is logged and never stops the service: the journal is only
    bigger than it needs to be."""
    now = now or journal.now()
    try:
        last = journal.last_prune_at()
        if last is not None and timedelta(0) <= now - datetime.fromisoformat(last) < PRUNE_EVERY:
            return None
        return prune(journal, retention_days, now, data_dir=data_dir)
    except sqlite3.Error as exc:
        log_event(log, "prune-failed", logging.ERROR, error=exc)
        return None
