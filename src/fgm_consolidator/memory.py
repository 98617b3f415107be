"""How a merge's memory comes from and goes back to the C library.

Two habits of glibc's allocator matter to a process that frees and allocates megabytes for
every row group. It hands the top of its heap back to the system as soon as enough of it is
free, and it maps big blocks one by one; either way the next buffer of the same size arrives
as fresh pages, each faulted in and zeroed by the kernel. And its arenas fragment over many
merges: measured over 34 merges of a 2 GB backlog, peak RSS grew by a fifth against 2 merges
of the same data.

So, during a merge, freed heap stays mapped for reuse (`keep_freed_heap`), blocks of a few
megabytes and more excepted, which left holes in it (`MMAP_THRESHOLD`); and after each merge
one `malloc_trim` (a few milliseconds) hands everything free back (`release`), so each merge
starts from the same floor. Elsewhere (musl, macOS) neither call exists and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

# mallopt(3) parameters, from malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Up to this much free heap stays mapped while a merge runs (32 MiB: 8 did as well on a
# partition, 4 did not, when the two thresholds were one).
TRIM_THRESHOLD = 32 * 1024 * 1024
# Blocks up to this size come from the heap; larger ones are mapped on their own and go back
# to the system when freed. At 32 MiB, blocks of a few megabytes (a buffer's column of long
# distinct labels, combined) left holes the heap could not reuse: a partition of three
# 400,000-row sources with a 120-byte label distinct in every row peaked at 121 to 176 MiB
# from one run to the next; 130 at 4 MiB, 120 at 2. The monitor's ordinary partitions
# allocate few such blocks and kept their CPU and peak (3 interleaved rounds); labels of
# 1 KB distinct in every row take 15-20% more CPU, at the same peak.
MMAP_THRESHOLD = 2 * 1024 * 1024


def _libc_function(name: str) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    return function


_trim = _libc_function("malloc_trim")
_mallopt = _libc_function("mallopt")


def keep_freed_heap() -> bool:
    """Keep freed heap mapped for reuse until `release`; True when the C library took it.

    Left to its defaults, glibc page-faulted 390,000 times over one partition of the map era
    (61,000 with this), 5-7% of the merge's CPU, for 0.5-1 MiB more peak RSS. Malloc settings
    an operator gives in GLIBC_TUNABLES are left as they are.
    """
    if _mallopt is None or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    # Setting either threshold also stops glibc from moving them on its own.
    return bool(
        _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release() -> bool:
    """Hand freed memory back to the system; True when some was (glibc only)."""
    return bool(_trim(0)) if _trim is not None else False
