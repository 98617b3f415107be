"""The one exception hierarchy of fgm-consolidator.

Every error names the path it concerns and the reason, so that a log line or a CLI message is
enough to act on. None of these is retried: the durable layer retries only OSErrors whose errno
is in TRANSIENT_ERRNOS (doing the same thing again may succeed); everything else fails the
merge, which is rolled back and tried again by the next pass.
"""

from __future__ import annotations

import errno
import traceback
from dataclasses import dataclass
from pathlib import Path

TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY})


class ConsolidatorError(Exception):
    """Base of every error this package raises on purpose; the CLI turns it into `Error: ...`."""

    def __init__(self, reason: str, path: Path | str | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class ConfigError(ConsolidatorError):
    """An option's value cannot work; refused at start-up, before anything is touched."""

    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        super().__init__(reason)


class LockError(ConsolidatorError):
    """The data directory's lock cannot be taken: its file cannot be opened or locked."""


class LockHeldError(LockError):
    """Another consolidator holds the data directory's lock (invariant 7)."""


class JournalError(ConsolidatorError):
    """The journal cannot be opened, is corrupt, or is newer than this version understands."""


class IllegalTransitionError(JournalError):
    """A merge was asked to move between two states the state machine does not connect."""


class SourceReadError(ConsolidatorError):
    """A source file (parquet or companion) could not be read completely.

    The file is recorded as unreadable, left where it is and excluded from later merges until
    it changes (invariant 4).
    """


class CompanionError(SourceReadError):
    """A `.containers` companion does not decode as the monitor's bincode format."""


class SchemaConflictError(ConsolidatorError):
    """Sources whose columns cannot share one output without changing a type."""


class NameTakenError(ConsolidatorError):
    """The final name of an output already exists; nothing is ever overwritten (invariant 5)."""


class SourceChangedError(ConsolidatorError):
    """A source's inode, size or mtime changed after it was planned; it must not be deleted."""


class OutputCheckError(ConsolidatorError):
    """A freshly written output does not read back with the rows and schema we wrote."""


class TempReplacedError(ConsolidatorError):
    """Our output's temp file is no longer the one we wrote: another process is at work here."""


class ProofStopped(Exception):
    """A lineage proof given up because the service is stopping. Nothing was decided or
    deleted; the next start proves again. Not a ConsolidatorError: those a proof reports as a
    doubt about its files, and this is no doubt."""


class MergeAborted(ConsolidatorError):
    """A merge was stopped on request (SIGTERM past the grace period) and rolled back."""


class NotRegularFileError(OSError):
    """A data file's name on something that is not a regular file: a symbolic link, a folder, a
    FIFO, a device. Never opened, merged or deleted. Opening a FIFO waits for a writer forever,
    and merging a link's target and then deleting the link leaves its rows twice. An OSError,
    not a ConsolidatorError, so that every reader of a file treats it as the read failure it
    is, where it already handles the others."""


@dataclass(frozen=True)
class Unexpected:
    """An exception no check foresaw (a bug, an input nothing anticipated), as a log line
    carries it. Whoever catches one isolates the item it was working on (a merge, a partition)
    and goes on with the others: raised further, one bad partition stopped every pass, or every
    start-up, for the whole data directory."""

    text: str
    where: str  # the innermost frame: file:line in function

    @classmethod
    def of(cls, exc: BaseException) -> Unexpected:
        frames = traceback.extract_tb(exc.__traceback__)
        where = "unknown"
        if frames:
            last = frames[-1]
            where = f"{Path(last.filename).name}:{last.lineno} in {last.name}"
        return cls(f"unexpected {type(exc).__name__}: {exc}", where)

    @property
    def fields(self) -> dict[str, str]:
        """For `log_event`: the error and where it was raised."""
        return {"error": self.text, "where": self.where}


def described(exc: BaseException, where: Path) -> str:
    """An error's text naming a path. An OSError carries its file, except pyarrow's and a
    write through a file object (`[Errno 28] No space left on device` under the parquet
    writer or the spill): `where` then says where the work was."""
    if isinstance(exc, OSError) and exc.filename is None:
        return f"{where}: {exc}"
    return str(exc)
