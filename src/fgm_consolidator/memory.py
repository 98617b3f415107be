"""Hand memory freed by a merge back to the system before the next one starts.

glibc keeps freed heap for reuse, and its arenas fragment over many merges: measured over 34
merges of a 2 GB backlog, peak RSS grew by a fifth against 2 merges of the same data. One
`malloc_trim` per merge (a few milliseconds) keeps each merge starting from the same floor.
Elsewhere (musl, macOS) there is no such call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _find_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_trim = _find_trim()


def release() -> bool:
    """True when memory was handed back (glibc only)."""
    return bool(_trim(0)) if _trim is not None else False
