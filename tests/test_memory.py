"""Freed heap is reused during a merge and handed back after it, where the C library allows."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fgm_consolidator import memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# A child allocates, fills and frees a 16 MiB block twice, and prints the page faults the
# second round took: with freed heap kept, none of its 4,096 pages is new.
SECOND_ROUND_FAULTS = """
import ctypes, resource, sys
from fgm_consolidator import memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 16 * 1024 * 1024
def round_trip():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", SECOND_ROUND_FAULTS, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return int(result.stdout)


@glibc_only
def test_freed_heap_is_reused_instead_of_faulted_in_again() -> None:
    pages = 16 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    kept = second_round_faults("keep")
    default = second_round_faults("default")
    assert kept < pages // 20, (kept, default)
    assert default > pages // 2, (kept, default)  # the test can tell the two apart


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
