"""One consolidator per data directory (invariant 7), by an advisory lock the kernel releases.

flock() is dropped by the kernel when the process dies, however it dies, so a kill -9 never
leaves a stale lock behind. The file also says who holds it, for the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import durable
from .errors import LockError, LockHeldError
from .layout import is_default_journal, lock_path


def refuse_irregular(path: Path, mode: int) -> None:
    """A lock path must be a regular file: flock on a FIFO fails with a bare EINVAL, and the
    mtime of a FIFO or a folder is no service's start (`status` reads the file's mtime)."""
    reason = durable.not_regular_reason(mode)
    if reason is not None:
        raise LockError(f"the lock file is {reason}; remove it", path)


@dataclass(frozen=True)
class HeldLock:
    """The lock file this process holds, as it was when taken."""

    path: Path
    file: durable.FileKey
    fd: int

    def announce(self, suffix: str = "") -> None:
        """Say in the file who holds it, and since when. `status` takes this write (the file's
        mtime) for a service's start, and gives it a grace before its first pass: so `run`
        announces itself only once its start-up has succeeded. A start refused after the lock
        was taken (a metrics port in use, a journal that cannot be opened) is then no start,
        and a crash loop of such refusals does not look like a service starting."""
        holder = (
            f"pid={os.getpid()} host={socket.gethostname()} "
            f"since={datetime.now(UTC).isoformat(timespec='seconds')}{suffix}"
        )
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, holder.encode(), 0)
        except OSError as exc:  # a full volume: its error alone would not name the file
            reason = f"cannot write the lock file: {exc.strerror or exc}"
            raise LockError(reason, self.path) from exc

    def check(self) -> None:
        """LockError when the path no longer names the file this process locked: removed (with
        the state folder, say) or replaced. Another instance would then lock a new file and
        work beside this one (invariant 7), so the holder stops instead."""
        if durable.named_file(self.path) != self.file:
            raise LockError(
                "the lock file was removed or replaced while this service ran; stopping, as"
                " another instance could now take the data directory",
                self.path,
            )


ONE_SHOT = "command=recover"  # in the holder's line: a process that is no service


@contextmanager
def exclusive(data_dir: Path, *, one_shot: bool = False) -> Iterator[HeldLock]:
    """A service announces itself once started (`HeldLock.announce`); `one_shot` (recover) at
    once, and says so in the holder's line: `status` must not give a `recover` that ended long
    ago the start-up grace of a service that never ran."""
    with _exclusive(lock_path(data_dir), "data directory") as held:
        if one_shot:
            held.announce(f" {ONE_SHOT}")
        yield held


@contextmanager
def exclusive_journal(journal: Path, data_dir: Path) -> Iterator[HeldLock | None]:
    """A journal outside its data directory is locked too (`<journal>.lock`): two data
    directories given one `--journal` each hold their own lock, and each one's recovery would
    judge the other's merges by its own folders. The default journal needs no second lock."""
    if is_default_journal(journal, data_dir):
        yield None
        return
    with _exclusive(journal.with_name(journal.name + ".lock"), "journal") as held:
        held.announce()
        yield held


@contextmanager
def _exclusive(path: Path, what: str) -> Iterator[HeldLock]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_NOFOLLOW: through a symbolic link the lock would be some other file, created
        # wherever the link points, and `status` could not tell it from no lock at all.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a folder or a link there: say so as for a FIFO
            refuse_irregular(path, os.lstat(path).st_mode)
        raise LockError(f"cannot open the lock file: {exc.strerror or exc}", path) from exc
    try:
        refuse_irregular(path, os.fstat(fd).st_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
            raise LockHeldError(
                f"another fgm-consolidator holds this {what} ({holder})", path
            ) from None
        yield HeldLock(path, durable.file_key(os.fstat(fd)), fd)
    finally:
        os.close(fd)
