"""Freed heap is reused during a merge and handed back after it, where the C library allows."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fgm_consolidator import memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# A child allocates and fills 16 MiB in blocks of half the mmap threshold (a merge's buffers
# and pages), frees them, does it again, and prints the page faults of the second round:
# with freed heap kept, none of its 4,096 pages is new.
SECOND_ROUND_FAULTS = """
import ctypes, resource, sys
from fgm_consolidator import memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = memory.MMAP_THRESHOLD // 2
def round_trip():
    blocks = [libc.malloc(size) for _ in range(16 * 1024 * 1024 // size)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# A child allocates and fills one 4 MiB block (a buffer's column of long distinct labels,
# combined), frees it, and prints how much of it was resident, and how much still is.
LARGE_BLOCK_RESIDENT = """
import ctypes, os
from fgm_consolidator import memory
assert memory.keep_freed_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * page
size = 4 * 1024 * 1024
before = resident()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
held = resident() - before
libc.free(block)
print(held, resident() - before)
"""


def run_child(code: str, *args: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return [int(figure) for figure in result.stdout.split()]


@glibc_only
def test_freed_heap_is_reused_instead_of_faulted_in_again() -> None:
    pages = 16 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    (kept,) = run_child(SECOND_ROUND_FAULTS, "keep")
    (default,) = run_child(SECOND_ROUND_FAULTS, "default")
    assert kept < pages // 20, (kept, default)
    assert default > pages // 2, (kept, default)  # the test can tell the two apart


@glibc_only
def test_a_block_of_megabytes_goes_back_to_the_system_when_freed_during_a_merge() -> None:
    """Blocks of a few megabytes left holes in the heap kept during a merge: a partition of
    long distinct labels peaked at up to 176 MiB instead of 120. Such blocks are mapped on
    their own, and unmapped when freed."""
    held, after = run_child(LARGE_BLOCK_RESIDENT)
    assert held >= 3 * 1024 * 1024  # the block was resident
    assert after < 1024 * 1024, (held, after)


def test_an_operators_malloc_tunables_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(parameter: int, value: int) -> int:
        calls.append((parameter, value))
        return 1

    monkeypatch.setattr(memory, "_mallopt", mallopt)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert memory.keep_freed_heap() is False
    assert calls == []
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert memory.keep_freed_heap() is True
    assert {parameter for parameter, _ in calls} == {-1, -3}


def test_keep_freed_heap_does_nothing_without_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_mallopt", None)
    assert memory.keep_freed_heap() is False


@glibc_only
def test_release_finds_malloc_trim_on_glibc() -> None:
    assert memory._trim is not None
    big = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB of heap, then freed
    del big
    assert isinstance(memory.release(), bool)


def test_release_does_nothing_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_trim", None)
    assert memory.release() is False
