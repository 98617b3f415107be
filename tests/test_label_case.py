"""Label columns whose names differ only in case, seen through a case-insensitive reader.

Found by an adversarial fidelity review. One source has `l_pod`, the next `l_Pod`
(a label key spelled two ways; legal: Arrow, parquet, pyarrow and polars names are
case-sensitive). Each source alone reads the same in DuckDB as in pyarrow. The label union
(`schemas.unify`) put both columns into one output, and DuckDB, whose identifiers are
case-insensitive, then renamed one of them (`l_pod_1`) and resolved `l_pod` to the other: the
first source's values vanished from the column a query names. Such files now go to separate
outputs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
from conftest import run_cli
from test_fidelity import BASE, HISTOGRAM
from test_source_metadata import PARTITION, row, write_source


def labelled(key: str) -> pa.Schema:
    return pa.schema(
        [*BASE, pa.field("l_container_id", pa.utf8()), pa.field(key, pa.utf8()), HISTOGRAM]
    )


def duckdb_column(data_dir: Path, column: str) -> Counter[object]:
    con = duckdb.connect()
    values: Counter[object] = Counter()
    for path in sorted((data_dir / PARTITION).glob("*.parquet")):
        values.update(
            value
            for (value,) in con.execute(
                f'SELECT "{column}" FROM read_parquet(?, hive_partitioning = false)', [str(path)]
            ).fetchall()
        )
    return values


def test_label_names_differing_only_in_case_read_the_same_in_duckdb_after_consolidation(
    data_dir: Path,
) -> None:
    for rotation, key, value in [(0, "pod", "lower"), (1, "pod", "lower"), (2, "Pod", "UPPER"),
                                 (3, "Pod", "UPPER")]:  # fmt: skip
        rows = [row(10 * rotation + i, container_id="c1", **{key: value}) for i in range(3)]
        write_source(data_dir, rotation, pa.Table.from_pylist(rows, labelled(f"l_{key}")))
    before = duckdb_column(data_dir, "l_pod")
    assert before == Counter({"lower": 6, "UPPER": 6})

    args = ("run", "--once", "--min-age", "0", "--min-files", "2", "--data-dir", str(data_dir))
    result = run_cli(*args)

    assert result.returncode == 0, result.stderr
    assert "differ only in case" not in result.stderr  # a split, not a refusal of any file
    outputs = list((data_dir / PARTITION).glob("consolidated-*.parquet"))
    assert outputs, sorted(p.name for p in (data_dir / PARTITION).iterdir())
    assert duckdb_column(data_dir, "l_pod") == before
