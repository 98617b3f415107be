"""Structured logs: one event per line, `key=value` pairs a person can read and a machine can parse.

Callers log an event name and fields (`log_event(log, "merge-finished", merge_id=3, ...)`);
the formatter renders them. Every line about a merge carries its id, partition and output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

FIELDS = "fgm_fields"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, event, extra={FIELDS: fields})


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


def format_fields(fields: Mapping[str, Any]) -> str:
    """`key=value` pairs, values quoted only when they must be; None values are left out."""
    return " ".join(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, FIELDS, {}),
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return format_fields(fields)


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("fgm_consolidator")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
