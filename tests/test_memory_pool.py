"""The process uses the C library's allocator unless the operator chose another (see
`fgm_consolidator/__init__.py` and scripts/bench_memory.py for why)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import fgm_consolidator, pyarrow; print(pyarrow.default_memory_pool().backend_name)"


@pytest.mark.parametrize(("chosen", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_the_memory_pool_is_the_system_one_unless_chosen(chosen: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == expected
