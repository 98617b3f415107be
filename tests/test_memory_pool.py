"""The process uses the C library's allocator unless the operator chose another, and loads no
cloud filesystem (see `fgm_consolidator/__init__.py` and scripts/bench_memory.py for why)."""

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


def _probe(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_the_cloud_filesystems_stay_out_of_the_process() -> None:
    """Nothing here reads remote storage; pyarrow would load the AWS SDK for it anyway (on
    `import pyarrow.parquet`). The probe reads through `ParquetFile`, as the package does:
    `pq.read_table` goes through pyarrow's datasets, whose threads made 22 of 120 such
    processes abort at exit on a loaded machine (pyarrow 26.0.1, "terminate called without an
    active exception"; none through `ParquetFile`), and nothing in the package uses them."""
    probe = (
        "import fgm_consolidator.cli, pyarrow.parquet as pq, pyarrow as pa, io\n"
        "sink = io.BytesIO(); pq.write_table(pa.table({'a': [1]}), sink)\n"
        "assert pq.ParquetFile(io.BytesIO(sink.getvalue())).read().num_rows == 1\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('s3' if 'libarrow_s3' in maps else 'local only')"
    )
    assert _probe(probe) == "local only"


def test_a_program_that_loaded_pyarrow_first_keeps_its_cloud_filesystems() -> None:
    probe = "import pyarrow.fs, fgm_consolidator; from pyarrow.fs import S3FileSystem; print('ok')"
    assert _probe(probe) == "ok"
