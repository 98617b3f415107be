"""Structured logs: one event per line, as `key=value` pairs or as one JSON object.

Callers log an event name and fields (`log_event(log, "merge-finished", merge_id=3, ...)`);
the formatter renders them. Every line about a merge carries its id, partition and output:
code that works on one merge runs inside `context(merge_id=..., partition=..., output=...)`,
whose fields join every event logged inside it, including events of lower layers (a retried
rename) and the error that escapes it (logged by whoever catches it).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol

FIELDS = "fgm_fields"
FORMATS = ("text", "json")
EMPTY: Mapping[str, Any] = MappingProxyType({})

_context: ContextVar[Mapping[str, Any]] = ContextVar("fgm_log_context", default=EMPTY)


class Stream(Protocol):
    """Where log lines go: a text stream, or a progress bar that prints them above itself."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """An error caught outside the `context` it escaped from still names its merge: the fields
    `context` attached to it join the line, over the current context's and under `fields`."""
    merged = dict(_context.get())
    for value in fields.values():
        if isinstance(value, BaseException):
            merged.update(getattr(value, FIELDS, {}))
    merged.update(fields)
    logger.log(level, event, extra={FIELDS: merged})


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add `fields` to every event logged in this block and to the exception leaving it."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, FIELDS):
            setattr(exc, FIELDS, dict(_context.get()))
        raise
    finally:
        _context.reset(token)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    """Anything unprintable is spelled out: a `\\r`, a `\\u2028` or a non-UTF-8 name's
    surrogate would otherwise end the line for some readers (`str.splitlines`, a terminal)."""
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def one_line(text: str) -> str:
    """`text` with its unprintable characters spelled out, as a message of one line: a path
    may hold a newline, and SQLite's own reports do."""
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in ' "=\\' or not c.isprintable() for c in text):
        return '"' + "".join(map(_escape, text)) + '"'
    return text


def format_fields(fields: Mapping[str, Any]) -> str:
    """`key=value` pairs, values quoted only when they must be; None values are left out."""
    return " ".join(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)


def _record_fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "event": record.getMessage(),
        **getattr(record, FIELDS, {}),
    }
    if record.exc_info:
        fields["exception"] = formatter.formatException(record.exc_info)
    return fields


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return format_fields(_record_fields(record, self))


def to_json(fields: Mapping[str, Any]) -> str:
    """One JSON object on one line. Values JSON cannot hold (paths, errors) become their text,
    and a number that is not finite (a threshold of `--check-interval 1e308`, which means
    never) becomes null: Python's `Infinity` is not JSON, and strict parsers refused the line."""
    return json.dumps(_finite(fields), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line (`to_json`)."""

    def format(self, record: logging.LogRecord) -> str:
        return to_json(_record_fields(record, self))


def configure(level: str = "INFO", fmt: str = "text", stream: Stream | None = None) -> None:
    handler: logging.StreamHandler[Any] = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("fgm_consolidator")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
