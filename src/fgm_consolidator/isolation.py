"""One partition's failure is its own: a pass, `status` and `run --dry-run` each look at every
partition, and whatever one of them throws is reported with that partition's name while the
others go on. Foreseen failures (a folder we may not read, a file that does not decode, an I/O
error) and exceptions no check foresaw (a bug, an input nothing anticipated: an `Unexpected`,
which also says where it was raised) alike. Raised further, one bad partition stopped every
pass, and turned the probe and the preview into a traceback naming no partition.

A journal (sqlite3) error is not isolated: no partition can be worked or judged without the
journal, so it ends the pass or the command.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import pyarrow as pa

from .errors import ConsolidatorError, Unexpected

# What one partition may throw that the code foresees.
PARTITION_ERRORS = (ConsolidatorError, OSError, pa.ArrowException)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class PartitionFailure:
    """Why one partition could not be worked or looked at."""

    error: Exception
    unexpected: Unexpected | None  # None: one of PARTITION_ERRORS

    @property
    def text(self) -> str:
        return self.unexpected.text if self.unexpected else str(self.error)

    @property
    def where(self) -> str | None:
        """Where an unforeseen error was raised; a foreseen one's text names its path."""
        return self.unexpected.where if self.unexpected else None

    @property
    def logged(self) -> object:
        """A log line's `error`: a foreseen error itself, so that the merge context it left
        (`logs.context`) joins the line; an unforeseen one's text, as `Unexpected` spells it."""
        return self.unexpected.text if self.unexpected else self.error

    @property
    def fields(self) -> dict[str, object]:
        """For `log_event`, and for a report line beside the partition's name."""
        if self.unexpected is not None:
            return dict(self.unexpected.fields)
        return {"error": self.error}


def isolated(work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T | PartitionFailure:
    """`work(*args, **kwargs)` on one partition, or why it failed; a journal error is raised."""
    try:
        return work(*args, **kwargs)
    except sqlite3.Error:
        raise
    except PARTITION_ERRORS as exc:
        return PartitionFailure(exc, None)
    except Exception as exc:
        return PartitionFailure(exc, Unexpected.of(exc))
