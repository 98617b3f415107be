"""One consolidator per data directory (invariant 7), by an advisory lock the kernel releases.

flock() is dropped by the kernel when the process dies, however it dies, so a kill -9 never
leaves a stale lock behind. The file also says who holds it, for the refusal message.
"""

from __future__ import annotations

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
from .layout import lock_path


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
    inode: tuple[int, int]

    def check(self) -> None:
        """LockError when the path no longer names the file this process locked: removed (with
        the state folder, say) or replaced. Another instance would then lock a new file and
        work beside this one (invariant 7), so the holder stops instead."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self.inode:
            raise LockError(
                "the lock file was removed or replaced while this service ran; stopping, as"
                " another instance could now take the data directory",
                self.path,
            )


@contextmanager
def exclusive(data_dir: Path) -> Iterator[HeldLock]:
    path = lock_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise LockError(f"cannot open the lock file: {exc.strerror or exc}", path) from exc
    try:
        refuse_irregular(path, os.fstat(fd).st_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
            raise LockHeldError(
                f"another fgm-consolidator holds this data directory ({holder})", path
            ) from None
        holder = (
            f"pid={os.getpid()} host={socket.gethostname()} "
            f"since={datetime.now(UTC).isoformat(timespec='seconds')}"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        st = os.fstat(fd)
        yield HeldLock(path, (st.st_dev, st.st_ino))
    finally:
        os.close(fd)
