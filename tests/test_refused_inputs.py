"""Valid parquet files the merge cannot carry exactly are refused and reported: never merged
into other values, never a merge that fails the same way on every pass.

Each source here is a file that pyarrow (`read_table`), DuckDB and polars read without
complaint. After one pass, either an output holds exactly the sources' rows (every column, the
order within each metric, read by pyarrow and by DuckDB), or the sources are kept *and*
reported unreadable. Found by an adversarial review; each failed before its fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_fidelity import BASE, HISTOGRAM, MAP_LABELS

from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import Settings, StopFlag, run_service

PAST = datetime(2025, 12, 30, 8, 0, 0, tzinfo=UTC)
PARTITION = "dt=2025-12-30/identifier=pod-h"


def flat_schema(labels: list[str]) -> pa.Schema:
    return pa.schema([*BASE, *[pa.field(f"l_{k}", pa.utf8()) for k in sorted(labels)], HISTOGRAM])


def row(i: int, metric: str = "m", run: str = "r", **labels: str | None) -> dict[str, Any]:
    return {
        "run_id": run,
        "time": datetime(2025, 12, 30, 8, 0, 0) + timedelta(seconds=i),
        "fetch_index": i,
        "metric_name": metric,
        "metric_kind": "gauge",
        "value_int": i,
        "value_float": None,
        "value_histogram": None,
        **{f"l_{k}": v for k, v in labels.items()},
    }


def source_path(data_dir: Path, rotation: int) -> Path:
    stamp = (PAST + timedelta(seconds=90 * rotation)).strftime("%Y%m%dT%H%M%SZ")
    folder = data_dir / PARTITION
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"metrics-{stamp}.parquet"


def aged(path: Path) -> None:
    old = (PAST - timedelta(days=1)).timestamp()
    os.utime(path, (old, old))


def run_once(data_dir: Path) -> int:
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_age_s=0, min_files=2))
    return run_service(settings, StopFlag(grace_s=0), once=True)


def parquet_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / PARTITION).glob("*.parquet"))


def unreadable(data_dir: Path) -> list[str]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return [record.name for record in journal.unreadable()]
    finally:
        journal.close()


def rows_pyarrow(data_dir: Path, names: list[str]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for path in parquet_files(data_dir):
        table = pq.read_table(path)
        rows += [tuple(r[n] for n in names) for r in table.select(names).to_pylist()]
    return rows


def rows_duckdb(data_dir: Path, names: list[str]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    con = duckdb.connect()
    columns = ", ".join(f'"{n}"' for n in names)
    for path in parquet_files(data_dir):
        rows += con.execute(
            f"SELECT {columns} FROM read_parquet(?, hive_partitioning = false)", [str(path)]
        ).fetchall()
    return rows


def by_metric(rows: list[tuple[Any, ...]], names: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    at = names.index("metric_name")
    grouped: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        grouped.setdefault(r[at], []).append(r)
    return grouped


Reader = Callable[[Path, list[str]], list[tuple[Any, ...]]]


def assert_merged_exactly_or_refused(
    data_dir: Path, names: list[str], readers: tuple[Reader, ...] = (rows_pyarrow, rows_duckdb)
) -> None:
    """One pass: an output with every row as it was (by metric, in order, read by each of
    `readers`), or every source kept and reported."""
    sources = parquet_files(data_dir)
    before = [by_metric(read(data_dir, names), names) for read in readers]
    run_once(data_dir)
    after = parquet_files(data_dir)
    if any(p.name.startswith("consolidated-") for p in after):
        assert [by_metric(read(data_dir, names), names) for read in readers] == before
        return
    assert after == sources, "no output, yet sources are gone"
    assert unreadable(data_dir), (
        "no output and no file reported: the merge fails the same way on every pass, "
        "blocking these files for good without naming them"
    )


# -- a parquet dictionary page that lists one value twice -------------------------------------


def write_with_repeated_dictionary_value(
    path: Path, table: pa.Table, column: str, repeated: bytes, replaced: bytes
) -> None:
    """`table` written plainly, then the dictionary page of `column` edited so that the entry
    `replaced` spells `repeated` too: a dictionary page listing one value twice. The parquet
    format does not forbid it, and pyarrow's `read_table`, DuckDB and polars read every value
    right (the page is a list of values; the data pages index it). pyarrow's
    `read_dictionary` does not: it drops the repeated entry and keeps the page's indices, so
    every later index points one entry off, and the last one past the end."""
    assert len(repeated) == len(replaced)
    pq.write_table(table, path, compression="none", store_schema=True, write_statistics=False)
    chunk = next(
        pq.read_metadata(path).row_group(0).column(i)
        for i in range(table.num_columns)
        if pq.read_metadata(path).row_group(0).column(i).path_in_schema == column
    )
    data = bytearray(path.read_bytes())
    at = data.index(replaced, chunk.dictionary_page_offset)
    assert at < chunk.data_page_offset
    data[at : at + len(replaced)] = repeated
    path.write_bytes(bytes(data))
    aged(path)


LABELED = flat_schema(["a", "b", "c"])
NAMES = ["run_id", "metric_name", "fetch_index", "l_b", "l_c"]


def two_sources_repeating(
    data_dir: Path, rows: list[dict[str, Any]], column: str, repeated: bytes, replaced: bytes
) -> None:
    """Two rotations of `rows`, each with `column`'s dictionary page listing `repeated` twice."""
    for rotation in range(2):
        table = pa.Table.from_pylist(rows, LABELED)
        path = source_path(data_dir, rotation)
        write_with_repeated_dictionary_value(path, table, column, repeated, replaced)


def test_a_label_dictionary_listing_a_value_twice_is_not_merged_into_other_values(
    data_dir: Path,
) -> None:
    """pyarrow reads l_c's dictionary as [cA, cC] with indices [0, 1, 2, 2]: index 1 turns cA
    into cC, and index 2 (past the end) was folded into the row's label-set number as a digit
    one too large, which carried into the next columns. Every reader saw (r0,b0,cA)
    (r1,b1,cA) (r0,b0,cC) (r0,b1,cC); the output held (r0,b0,cA) (r1,b1,cC) (r0,b1,cA)
    (r1,b0,cA), and the sources were deleted. Now the index past the end makes the file
    unreadable."""
    rows = [
        row(0, run="r0", b="b0", c="cB"),  # cB is rewritten to cA in the dictionary page
        row(1, run="r1", b="b1", c="cA"),
        row(2, run="r0", b="b0", c="cC"),
        row(3, run="r0", b="b1", c="cC"),
    ]
    two_sources_repeating(data_dir, rows, "l_c", b"cA", b"cB")
    assert pq.read_table(parquet_files(data_dir)[0]).column("l_c").to_pylist() == [
        "cA",
        "cA",
        "cC",
        "cC",
    ]
    assert_merged_exactly_or_refused(data_dir, NAMES)


def test_a_metric_name_dictionary_listing_a_name_twice_is_reported_not_retried_forever(
    data_dir: Path,
) -> None:
    """The same page in `metric_name` failed every merge with "unexpected IndexError: index
    out of bounds": rolled back, backed off, tried again next pass, the file never named."""
    metrics = ["mmB", "mmA", "mmB", "mmA", "zz", "mmB", "mmA"]
    rows = [row(i, metric=m, a="x") for i, m in enumerate(metrics)]
    two_sources_repeating(data_dir, rows, "metric_name", b"mmA", b"mmB")
    assert_merged_exactly_or_refused(data_dir, NAMES)
    assert_merged_exactly_or_refused(data_dir, NAMES)  # and the next pass does not retry it


def test_a_map_label_dictionary_listing_a_value_twice_is_not_merged_into_other_values(
    data_dir: Path,
) -> None:
    """The same page in the map era, whose `labels` is a map of dictionaries: the map's value
    leaf was read as [pA, pC] with indices [0, 0, 1, 2]. Only dictionary columns were
    checked, not a dictionary inside a map, so every row after the first took another pod's
    label and the sources were deleted. DuckDB and polars read pA, pA, pC, pC (pyarrow's own
    `to_pylist` raises on the source, so DuckDB is the witness here)."""
    pods = ["pB", "pA", "pC", "pC"]  # pB is rewritten to pA in the dictionary page
    rows = [row(i, metric=f"m{i % 2}") for i in range(len(pods))]
    plain = pa.Table.from_pylist(rows, pa.schema([*BASE, HISTOGRAM]))
    keys = pa.array(["pod"] * len(pods)).dictionary_encode()
    offsets = pa.array(range(len(pods) + 1), pa.int32())
    labels = pa.MapArray.from_arrays(
        offsets, keys, pa.array(pods).dictionary_encode(), type=MAP_LABELS.type
    )
    table = plain.add_column(len(BASE), MAP_LABELS, labels)
    for rotation in range(2):
        path = source_path(data_dir, rotation)
        write_with_repeated_dictionary_value(path, table, "labels.key_value.value", b"pA", b"pB")
    names = ["metric_name", "fetch_index", "labels"]
    seen = [dict(labels)["pod"] for *_, labels in rows_duckdb(data_dir, names)]
    assert seen == ["pA", "pA", "pC", "pC"] * 2

    assert_merged_exactly_or_refused(data_dir, names, readers=(rows_duckdb,))


# -- view types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "kind", "value"),
    [
        ("l_c", pa.string_view(), "x"),
        ("metric_kind", pa.string_view(), "gauge"),
        ("value_histogram", pa.binary_view(), b"sketch"),
    ],
)
def test_a_view_typed_column_is_merged_or_reported(
    data_dir: Path, column: str, kind: pa.DataType, value: Any
) -> None:
    """A source whose stored Arrow schema says string_view / binary_view (pyarrow writes it;
    every reader reads it) failed every merge in the sort with "Function 'array_take' has no
    kernel matching input types (string_view, int64)": rolled back and retried every pass,
    the file never reported. `check_mergeable` now refuses view types."""
    fields = [f.with_type(kind) if f.name == column else f for f in LABELED]
    rows = [row(i, metric=f"m{i % 3}", a="a", b="b", c="x") for i in range(20)]
    for r in rows:
        r[column] = value
    table = pa.Table.from_pylist(rows, LABELED).cast(pa.schema(fields))
    for rotation in range(2):
        path = source_path(data_dir, rotation)
        pq.write_table(table, path, compression="zstd")
        aged(path)
    assert pq.read_schema(path).field(column).type == kind
    assert_merged_exactly_or_refused(data_dir, ["metric_name", "fetch_index", column])


# -- types a merge would change ---------------------------------------------------------------


def unreadable_reasons(data_dir: Path) -> dict[str, str]:
    journal = Journal.open(default_journal_path(data_dir), read_only=True)
    try:
        return {record.name: record.reason for record in journal.unreadable()}
    finally:
        journal.close()


def sources_with(data_dir: Path, column: str, kind: pa.DataType, values: list[Any]) -> list[str]:
    """Three rotations of LABELED rows whose `column` is stored as `kind` (an extra column when
    LABELED has none of that name), written by pyarrow with its Arrow schema, as the monitor
    writes; their names."""
    names = []
    for rotation in range(3):
        rows = [row(i, metric=f"m{i % 3}", a="a", b="b", c=f"c{i % 2}") for i in range(12)]
        table = pa.Table.from_pylist(rows, LABELED)
        if column in table.column_names:
            table = table.set_column(
                table.schema.get_field_index(column), column, table.column(column).cast(kind)
            )
        else:
            integers = pa.int32() if kind.bit_width == 32 else pa.int64()
            table = table.append_column(column, pa.array(values * 4, integers).cast(kind))
        path = source_path(data_dir, rotation)
        pq.write_table(table, path, compression="zstd")
        aged(path)
        names.append(path.name)
    return names


def assert_refused_in_one_pass(data_dir: Path, names: list[str], because: str) -> None:
    """One pass keeps every one of `names` and reports each, `because` in its reason."""
    run_once(data_dir)
    assert [p.name for p in parquet_files(data_dir)] == names
    reasons = unreadable_reasons(data_dir)
    assert sorted(reasons) == names
    for reason in reasons.values():
        assert because in reason


@pytest.mark.parametrize(
    "kind",
    [
        pa.dictionary(pa.int8(), pa.utf8()),  # what pyarrow stores for a pandas Categorical
        pa.dictionary(pa.int16(), pa.utf8()),
        pa.dictionary(pa.uint32(), pa.utf8()),
        pa.dictionary(pa.int64(), pa.utf8()),
        pa.dictionary(pa.int32(), pa.utf8(), ordered=True),
    ],
)
@pytest.mark.parametrize("column", ["l_c", "metric_kind"])
def test_a_dictionary_of_other_indices_is_reported_in_one_pass_by_its_type(
    data_dir: Path, column: str, kind: pa.DataType
) -> None:
    """Such sources failed every merge: rows are read with int32, unordered indices, which the
    output's type did not match. Each pass reported one more file, under "dictionary<int32> in
    a source, dictionary<int8> in the output", the other way round from the file."""
    names = sources_with(data_dir, column, kind, [])
    assert pq.read_schema(source_path(data_dir, 0)).field(column).type == kind
    assert_refused_in_one_pass(data_dir, names, f"column {column} is {kind};")


def test_a_map_of_other_dictionaries_is_reported_in_one_pass_by_its_type(data_dir: Path) -> None:
    """The check saw top-level dictionaries only: a map of int8-indexed dictionaries failed
    every merge of its partition ("The unified dictionary requires a larger index type"),
    each pass, naming no file."""
    text = pa.dictionary(pa.int8(), pa.utf8())
    kind = pa.map_(pa.field("key", text, nullable=False), pa.field("value", text, nullable=False))
    names = []
    for rotation in range(3):
        rows = [row(i, metric=f"m{i % 3}", a="a", b="b", c=f"c{i % 2}") for i in range(12)]
        labels = pa.array([[("c", f"c{i % 2}")] for i in range(12)], pa.map_(pa.utf8(), pa.utf8()))
        table = pa.Table.from_pylist(rows, LABELED).append_column("labels", labels.cast(kind))
        path = source_path(data_dir, rotation)
        pq.write_table(table, path, compression="zstd")
        aged(path)
        names.append(path.name)
    stored = pq.read_schema(source_path(data_dir, 0)).field("labels").type
    assert stored == kind
    assert_refused_in_one_pass(data_dir, names, f"column labels is {stored};")


def test_an_int32_dictionary_is_merged_with_its_type(data_dir: Path) -> None:
    kind = pa.dictionary(pa.int32(), pa.utf8())
    sources_with(data_dir, "l_c", kind, [])
    before = sorted(rows_pyarrow(data_dir, NAMES))
    run_once(data_dir)
    [output] = parquet_files(data_dir)
    assert output.name.startswith("consolidated-")
    assert pq.read_schema(output).field("l_c").type == kind
    assert sorted(rows_pyarrow(data_dir, NAMES)) == before
    assert not unreadable_reasons(data_dir)


@pytest.mark.parametrize(
    ("column", "kind", "read_as"),
    [
        ("extra", pa.date64(), pa.date32()),
        ("extra", pa.timestamp("s"), pa.timestamp("ms")),
        ("extra", pa.time32("s"), pa.time32("ms")),
        ("l_c", pa.dictionary(pa.int32(), pa.large_utf8()), pa.dictionary(pa.int32(), pa.utf8())),
    ],
)
def test_a_column_pyarrow_reads_as_another_type_is_reported_not_retyped(
    data_dir: Path, column: str, kind: pa.DataType, read_as: pa.DataType
) -> None:
    """pyarrow reads these as `read_as` whatever the stored Arrow schema says, and the output
    stored what pyarrow read: polars, which takes types from the stored schema, read a
    source's `date64` column as datetimes and the output's as dates."""
    names = sources_with(data_dir, column, kind, [1, 2, 3])
    assert pq.read_schema(source_path(data_dir, 0)).field(column).type == read_as
    because = f"column {column} (stored as {kind}, read as {read_as})"
    assert_refused_in_one_pass(data_dir, names, because)
