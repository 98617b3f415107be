"""What the commands print, as plain dicts: one shape for the text lines and the JSON lines."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .journal import MergeRecord, UnreadableRecord
from .plan import MergePlan
from .recovery import LineageAction, RecoveryAction


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
    return fields


def unreadable_fields(record: UnreadableRecord) -> dict[str, Any]:
    return {
        "kind": "unreadable",
        "partition": record.partition,
        "file": record.name,
        "size": record.size,
        "reason": record.reason,
        "first_seen": record.first_seen,
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
        "action": "removed" if action.removed else "kept, needs a person",
        "reason": action.reason,
    }


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
