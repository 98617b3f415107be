"""Freed memory goes back to the system after a merge, where the C library allows it."""

from __future__ import annotations

import platform

import pytest

from fgm_consolidator import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_finds_malloc_trim_on_glibc() -> None:
    assert memory._trim is not None
    big = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB of heap, then freed
    del big
    assert isinstance(memory.release(), bool)


def test_release_does_nothing_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_trim", None)
    assert memory.release() is False
