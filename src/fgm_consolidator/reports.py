"""What the commands print, as plain dicts: one shape for the text lines and the JSON lines."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from . import durable, lineage
from .durable import FileIdentity
from .isolation import PartitionFailure
from .journal import MergeRecord, PassRecord, UnreadableRecord
from .layout import SkippedFolder, tmp_name
from .plan import MergePlan, Skipped
from .recovery import LineageAction, RecoveryAction, copied_sources
from .scan import UnreadableFile
from .status import Backlog, Problem, Status


def _duration_s(record: MergeRecord) -> float:
    first = datetime.fromisoformat(record.transitions[0].at)
    last = datetime.fromisoformat(record.transitions[-1].at)
    return round((last - first).total_seconds(), 3)


def merge_fields(record: MergeRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "kind": "merge",
        "id": record.id,
        "partition": record.partition,
        "output": record.output,
        "state": str(record.state),
        "sources": len(record.sources),
        "rows": record.output_rows if record.output_rows is not None else record.rows_in,
        "bytes_in": record.bytes_in,
        "bytes_out": record.output_bytes,
    }
    for step in record.transitions:
        fields.setdefault(str(step.state), step.at)
    fields["duration_s"] = _duration_s(record)
    fields["error"] = record.error
    if record.adopted:  # recorded by recovery from the output's lineage, after a lost journal
        fields["adopted"] = True
    return fields


def source_fields(record: MergeRecord, data_dir: Path) -> Iterator[dict[str, Any]]:
    """Each source of a merge as journaled, and what is under its name now: `as-merged`
    (the identity journaled), `same-footer` (another inode or mtime, the footer digest the
    output's lineage records: a copy, a `touch`), `changed` or `gone`. What a person deciding
    on a merge left for them needs to see (README, "When a merge needs a person")."""
    folder = data_dir / record.partition
    copies: dict[str, FileIdentity] | None = None  # looked for once, only when needed
    for source in record.sources:
        now = durable.optional_identity(folder / source.name)
        if now is None:
            found = "gone"
        elif now == source.identity:
            found = "as-merged"
        else:
            if copies is None:
                output = folder / record.output  # its temp name, until published
                if not output.exists():
                    output = folder / tmp_name(record.output)
                held = lineage.read(output)
                copies = copied_sources(folder, record, held) if held else {}
            found = "same-footer" if source.name in copies else "changed"
        yield {
            "kind": "source",
            "merge_id": record.id,
            "file": source.name,
            "rows": source.rows,
            "now": found,
        }


def unreadable_fields(record: UnreadableRecord) -> dict[str, Any]:
    return {
        "kind": "unreadable",
        "partition": record.partition,
        "file": record.name,
        "size": record.size,
        "reason": record.reason,
        "first_seen": record.first_seen or None,  # empty: `status` found it before `run` did
    }


def recovery_fields(action: RecoveryAction) -> dict[str, Any]:
    return {
        "kind": "recovery",
        "merge_id": action.merge_id,
        "partition": action.partition,
        "output": action.output,
        "found": str(action.found),
        "result": str(action.result),
        "action": action.action,
        "reason": action.reason,
    }


def lineage_fields(action: LineageAction) -> dict[str, Any]:
    return {
        "kind": "lineage",
        "partition": action.partition,
        "output": action.output,
        "file": action.file,
        "action": "kept, needs a person" if action.verb == "kept" else action.verb,
        "reason": action.reason,
    }


def skipped_fields(folder: SkippedFolder) -> dict[str, Any]:
    return {"kind": "skipped", "path": str(folder.path), "reason": folder.reason}


def skipped_merge_fields(partition: str, skip: Skipped) -> dict[str, Any]:
    """A group whose output name is taken by its `output`; a file kept apart or held, by its
    name."""
    if skip.output is None:
        kind = "held" if skip.needs_person else "apart"
        file = skip.sources[0]
        return {"kind": kind, "partition": partition, "file": file, "reason": skip.reason}
    return {"kind": "skipped", "partition": partition, "output": skip.output, "reason": skip.reason}


def found_unreadable_fields(partition: str, bad: UnreadableFile) -> dict[str, Any]:
    """A file this look found unreadable, before any journal recorded it."""
    return {"kind": "unreadable", "partition": partition, "file": bad.name, "reason": bad.reason}


def partition_error_fields(partition: str, failure: PartitionFailure) -> dict[str, Any]:
    """`where` only for an exception no check foresaw; None is left out of a text line."""
    return {"kind": "error", "partition": partition, "error": failure.text, "where": failure.where}


def plan_fields(plan: MergePlan) -> dict[str, Any]:
    return {
        "kind": "plan",
        "partition": plan.partition,
        "output": plan.output,
        "era": plan.era,
        "sources": len(plan.sources),
        "rows": plan.rows_in,
        "bytes_in": plan.bytes_in,
        "first": plan.sources[0].name,
        "last": plan.sources[-1].name,
    }


def pass_fields(record: PassRecord) -> dict[str, Any]:
    return {
        "kind": "pass",
        "id": record.id,
        "started": record.started,
        "ended": record.ended,
        "result": str(record.result) if record.result else "running",
        "merges_finished": record.merges_finished,
        "merges_failed": record.merges_failed,
        "partition_errors": record.partition_errors,
        "unreadable": record.unreadable,
        "error": record.error,
    }


def backlog_fields(backlog: Backlog) -> dict[str, Any]:
    return {
        "kind": "partition",
        "partition": backlog.partition,
        "waiting": backlog.waiting,
        "mergeable": backlog.mergeable,
        "young": backlog.young,
        "unreadable": backlog.unreadable,
        "error": backlog.error,
        "where": backlog.where,
    }


def problem_fields(problem: Problem) -> dict[str, Any]:
    return {"kind": "problem", "exit_code": problem.exit_code, "problem": problem.text}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


def status_fields(status: Status) -> dict[str, Any]:
    """The summary line: health first, then what it was judged on."""
    last, success = status.last_pass, status.last_success
    progress = status.progress_at
    return {
        "kind": "status",
        "healthy": not status.problems,
        "exit_code": status.exit_code,
        "now": _iso(status.now),
        "last_pass_started": last.started if last else None,
        "last_pass_ended": last.ended if last else None,
        "last_pass_result": (str(last.result) if last.result else "running") if last else None,
        "last_success": success.ended if success else None,
        "service_started": _iso(status.service_started),
        "progress_age_s": None
        if progress is None
        else round((status.now - progress).total_seconds(), 3),
        "threshold_s": status.threshold_s,
        "check_interval_s": status.check_interval_s,
        "stale_after": status.stale_after,
        "needs_person": len(status.needs_person),
        "unfinished": len(status.unfinished),
        "waiting": sum(b.waiting for b in status.backlog) if status.scanned else None,
        "unreadable": len(status.unreadable) if status.scanned else None,
        "held": len(status.held) if status.scanned else None,
        "journal_bytes": status.journal_bytes,
    }
