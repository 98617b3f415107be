"""Recovery leaves no file of ours stranded and deletes nothing it has not compared whole.

Found by an adversarial review of lineage adoption, withdrawal and the orphan sweep; each
case failed before its fix. Killed runs are real processes stopped at named crash points, and
the oracle judges the end state, the viewer's containers included where they are at stake.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from oracle import check, expected_rows, row_keys
from test_crash import POD_A, make_data, recover, run_once
from test_hostile import AFTER_FIVE_DELETES, lose


def _with_extra_label(path: Path, key: str) -> pa.Table:
    """The same rows, plus a label column (a key the output never saw) with a value each."""
    table = pq.read_table(path)
    column = pa.array([f"v{i}" for i in range(table.num_rows)], pa.string())
    index = table.schema.get_field_index("value_histogram")
    table = table.add_column(index, pa.field(key, pa.string()), column)
    return table


def test_the_lineage_proof_keeps_a_file_with_a_column_its_output_lacks(data_dir: Path) -> None:
    """With the journal lost after a merge's rename, a file its output's lineage names is
    still there, with the same row count, but with one more label column (values in every
    row) than the output holds. Its rows were fingerprinted as the output's columns, and
    `conform` dropped the column the output lacks: the file passed as held, was adopted and
    deleted, and its label values were gone (invariants 1 and 6). Now it stays, a doubt."""
    make_data(data_dir, "small")
    original = expected_rows(data_dir)
    assert run_once(data_dir, AFTER_FIVE_DELETES).returncode == -9
    lose(data_dir, "journal")
    folder = data_dir / POD_A
    victim = sorted(folder.glob("metrics-*.parquet"))[3]
    new = _with_extra_label(victim, "l_zz_extra")
    pq.write_table(new, victim)
    # The output still holds the file as it was merged; the file now holds more.
    expected: Counter[Any] = original + row_keys(new, POD_A)

    result = recover(data_dir)

    report = check(data_dir, expected, journal_lost=True)
    assert report.violations == [], report.violations
    assert victim.exists(), "a file whose rows the output does not hold was deleted"
    assert result.returncode == 3
