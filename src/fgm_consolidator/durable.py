"""The few file-system primitives that must be exactly right, implemented once.

Every mutation the consolidator makes to the data directory goes through here, so the order
of syncs can be audited (and faked) in one place. Transient errors (EINTR, EAGAIN, EBUSY) are
retried with capped exponential backoff; fsync never is: after a failed fsync the kernel may
already have dropped the dirty pages, so the caller must redo the whole step from scratch.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from . import crashpoints
from .errors import TRANSIENT_ERRNOS, NameTakenError, NotRegularFileError
from .logs import log_event

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger(__name__)

T = TypeVar("T")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _log_retry(state: RetryCallState) -> None:
    """One structured line per retry; inside a merge it carries the merge's fields too."""
    log_event(
        log,
        "transient-error-retry",
        logging.WARNING,
        call=getattr(state.fn, "__name__", None),
        attempt=state.attempt_number,
        error=state.outcome.exception() if state.outcome else None,
        retry_in_s=round(state.next_action.sleep, 3) if state.next_action else None,
    )


def retry_transient(func: Callable[..., T]) -> Callable[..., T]:
    """Retry only errors that may pass on their own; ENOSPC, EIO or EACCES surface at once."""
    return retry(
        retry=retry_if_exception(_is_transient),
        stop=stop_after_attempt(5),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        before_sleep=_log_retry,
        reraise=True,
    )(func)


@dataclass(frozen=True)
class FileIdentity:
    """What must not change between planning a source and deleting it."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


FileKey = tuple[int, int]  # (device, inode): which file a name points at


def file_key(st: os.stat_result) -> FileKey:
    return st.st_dev, st.st_ino


def named_file(path: Path) -> FileKey | None:
    """The file `path` now names (a link followed), or None when nothing does: a process
    holding a file open learns this way whether the name still leads to it."""
    try:
        return file_key(os.stat(path))
    except FileNotFoundError:
        return None


def identity(path: Path) -> FileIdentity:
    """The identity of the name itself: a symbolic link is not its target."""
    return FileIdentity.of(os.lstat(path))


def optional_identity(path: Path) -> FileIdentity | None:
    """None for a file that is gone: to the checks before a publish or a delete, gone is an
    answer ("deleted before a crash", "taken by a rival"), not an error."""
    try:
        return identity(path)
    except FileNotFoundError:
        return None


def not_regular_reason(mode: int) -> str | None:
    """Why a file of this mode is left alone, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"{kind}, not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, without following a link or waiting on a FIFO."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # what O_NOFOLLOW answers for a link
            raise NotRegularFileError(
                errno.ELOOP, "a symbolic link, not a regular file", str(path)
            ) from None
        raise
    try:
        reason = not_regular_reason(os.fstat(fd).st_mode)
        if reason is not None:
            raise NotRegularFileError(errno.EINVAL, reason, str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@retry_transient
def create_exclusive(path: Path) -> BinaryIO:
    """Open a new file for writing; fails if the name exists, so a stale file is never reused."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    handle = os.fdopen(fd, "wb", buffering=0)
    crashpoints.reach("durable:created")
    return handle


def write_all(handle: BinaryIO, data: bytes | memoryview) -> None:
    """Write every byte or raise: an unbuffered write may be short (RLIMIT_FSIZE, a nearly full
    disk, a signal), and a short write taken as whole would shift every later byte of the file.
    The retry after a short write reports the real error (EFBIG, ENOSPC)."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(f"write returned {written!r} with {len(view)} bytes left")
        view = view[written:]


class Sink:
    """The file object pyarrow writes into: every byte written whole (see `write_all`),
    counted, and hashed when a digest is given. Closing it leaves the file open: its owner
    syncs and closes it."""

    def __init__(self, handle: BinaryIO, digest: Hash | None = None) -> None:
        self.handle = handle
        self.digest = digest
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        write_all(self.handle, view)
        if self.digest is not None:
            self.digest.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self.handle.flush()

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True


def _synced(fd: int, path: Path) -> None:
    """fsync, its error naming `path`: os.fsync names no file, so an EIO reached the merge
    and the partition's log line as a bare "[Errno 5] Input/output error". The errno is kept."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (fsync)", str(path)) from exc


def fsync_file(handle: BinaryIO, path: Path) -> None:
    """`path` is the file `handle` has open, for the error."""
    handle.flush()
    _synced(handle.fileno(), path)
    crashpoints.reach("durable:fsync-file")


def fsync_dir(path: Path) -> None:
    """Make creates, renames and unlinks in `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _synced(fd, path)
    finally:
        os.close(fd)
    crashpoints.reach("durable:fsync-dir")


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` exclusively with `data`, synced; a partial file is removed on failure."""
    handle = create_exclusive(path)
    try:
        with handle:
            write_all(handle, data)
            fsync_file(handle, path)
    except BaseException:
        remove(path)
        raise


@retry_transient
def _link(src: Path, dst: Path) -> None:
    os.link(src, dst)


def rename_no_replace(src: Path, dst: Path) -> None:
    """Give `src` the name `dst` unless `dst` exists (invariant 5).

    A hard link then an unlink: the kernel refuses a link onto an existing name atomically,
    which plain rename() does not. A crash between the two leaves both names on one inode;
    recovery removes the temp name. The caller syncs the folder.
    """
    try:
        _link(src, dst)
    except FileExistsError:
        raise NameTakenError("name already exists, refusing to overwrite", dst) from None
    crashpoints.reach("durable:linked")
    remove(src)
    crashpoints.reach("durable:renamed")


@retry_transient
def remove(path: Path) -> bool:
    """Unlink `path` if present; True when something was removed. The caller syncs the folder."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    crashpoints.reach("durable:unlinked")
    return True
