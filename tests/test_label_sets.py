"""Label sets: a row's text columns folded into one number and restored exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from fgm_consolidator import clustering, label_sets
from fgm_consolidator.clustering import MetricSorter
from fgm_consolidator.label_sets import LABEL_SET, TEXT, LabelSets

LABELS = [f"l_{n}" for n in range(9)]


def flat_schema(labels: list[str] = LABELS) -> pa.Schema:
    return pa.schema(
        [
            pa.field("run_id", TEXT, nullable=False),
            pa.field("metric_name", TEXT, nullable=False),
            pa.field("value_int", pa.uint64()),
            *[pa.field(name, TEXT) for name in labels],
        ]
    )


def text(values: list[str | None], dictionary: list[str]) -> pa.DictionaryArray:
    """`values` dictionary-encoded against `dictionary`, in that order (unused entries too)."""
    indices = [None if v is None else dictionary.index(v) for v in values]
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(dictionary))


def random_batch(seed: int, rows: int, labels: list[str], values_per_label: int) -> pa.RecordBatch:
    """Label columns of every shape the monitor writes: many values, one value, nulls, a
    column missing from a source (all null, empty dictionary), and dictionaries that list
    values no row uses, in a shuffled order."""
    rng = random.Random(seed)
    columns: list[pa.Array] = [
        text(["run-1"] * rows, ["run-1"]),
        text([rng.choice("abc") for _ in range(rows)], ["c", "a", "b"]),
        pa.array([rng.randrange(10**6) for _ in range(rows)], pa.uint64()),
    ]
    for position, _name in enumerate(labels):
        shape = position % 4
        if shape == 3:
            columns.append(text([None] * rows, []))
            continue
        count = 1 if shape == 2 else values_per_label
        dictionary = [f"v{position}-{n}" for n in range(count + 2)]  # two never used
        rng.shuffle(dictionary)
        used = dictionary[:count]
        chance_of_null = 0.2 if shape == 1 else 0.0
        column = [None if rng.random() < chance_of_null else rng.choice(used) for _ in range(rows)]
        columns.append(text(column, dictionary))
    return pa.RecordBatch.from_arrays(columns, schema=flat_schema(labels))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("values_per_label", [3, 200])
def test_unpacking_a_packed_batch_gives_every_value_and_type_back(
    seed: int, values_per_label: int
) -> None:
    batch = random_batch(seed, rows=3_000, labels=LABELS, values_per_label=values_per_label)
    sets = LabelSets(batch.schema)
    packed = sets.pack(batch)
    assert packed.schema.names == ["metric_name", "value_int", LABEL_SET]
    restored = sets.unpack(pa.Table.from_batches([packed]))
    assert restored.schema.equals(batch.schema)
    assert restored.to_pylist() == pa.Table.from_batches([batch]).to_pylist()
    distinct_rows = {tuple(row[name] for name in sets.columns) for row in restored.to_pylist()}
    assert len(set(packed.column(LABEL_SET).to_pylist())) == len(distinct_rows)


def test_renumbering_at_every_column_keeps_rows_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The combined number is renumbered before it passes the limit; here, at every column."""
    monkeypatch.setattr(label_sets, "_COMBINED_LIMIT", 4)
    batch = random_batch(7, rows=2_000, labels=LABELS, values_per_label=5)
    sets = LabelSets(batch.schema)
    restored = sets.unpack(pa.Table.from_batches([sets.pack(batch)]))
    assert restored.to_pylist() == pa.Table.from_batches([batch]).to_pylist()


def test_the_same_labels_get_the_same_number_whatever_the_dictionary_order() -> None:
    schema = flat_schema(["l_a", "l_b", "l_c"])
    rows = [("x", "p", None), ("y", "q", "r"), ("x", "p", None)]

    def batch_with(dictionaries: list[list[str]]) -> pa.RecordBatch:
        labels = [text([row[i] for row in rows], dictionaries[i]) for i in range(3)]
        fixed = [
            text(["run"] * 3, ["run"]),
            text(["m"] * 3, ["m"]),
            pa.array([1, 2, 3], pa.uint64()),
        ]
        return pa.RecordBatch.from_arrays([*fixed, *labels], schema=schema)

    sets = LabelSets(schema)
    first = sets.pack(batch_with([["x", "y"], ["p", "q"], ["r"]]))
    second = sets.pack(batch_with([["z", "y", "x"], ["q", "p"], ["s", "r"]]))
    assert first.column(LABEL_SET).to_pylist() == [0, 1, 0]
    assert second.column(LABEL_SET).to_pylist() == [0, 1, 0]
    both = pa.Table.from_batches([first, second])
    assert [row["l_c"] for row in sets.unpack(both).to_pylist()] == [None, "r", None] * 2


def test_only_schemas_with_several_text_columns_are_folded() -> None:
    assert label_sets.for_schema(flat_schema()) is not None
    map_era = pa.schema(
        [
            pa.field("run_id", TEXT),
            pa.field("metric_name", TEXT),
            pa.field("metric_kind", TEXT),
            pa.field("labels", pa.map_(TEXT, TEXT)),
        ]
    )
    assert label_sets.for_schema(map_era) is None
    shadowing = flat_schema().append(pa.field(LABEL_SET, pa.int32()))
    assert label_sets.for_schema(shadowing) is None


def test_rows_parked_folded_come_back_by_metric_with_their_labels(tmp_path: Path) -> None:
    """Through the external sort: every batch fills the buffer and is parked on disk."""
    batches = [random_batch(seed, rows=500, labels=LABELS, values_per_label=4) for seed in range(4)]
    written: list[pa.Table] = []
    sorter = MetricSorter(
        written.append,
        labels=label_sets.for_schema(batches[0].schema),
        row_group_bytes=10**9,
        buffer_bytes=1,
        spill_folder=tmp_path,
    )
    for batch in batches:
        sorter.add(batch)
    sorter.finish()
    assert all(table.schema.equals(batches[0].schema) for table in written)
    rows_in = pa.Table.from_batches(batches).to_pylist()
    expected = sorted(rows_in, key=lambda row: str(row["metric_name"]))  # stable: arrival order
    assert [row for table in written for row in table.to_pylist()] == expected
    assert [table.column("metric_name").unique().to_pylist() for table in written] == [
        ["a"],
        ["b"],
        ["c"],
    ]


@pytest.mark.parametrize("buffer_bytes", [1, 10**9], ids=["parked", "in memory"])
@pytest.mark.parametrize("compact_above", [0, 10**9], ids=["cut per batch", "shared"])
def test_folding_stops_at_the_cap_and_every_row_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffer_bytes: int, compact_above: int
) -> None:
    """Past MAX_SETS label sets an output folds no more (they are held until it is written):
    runs folded before and runs parked as they are meet in one row group, each unfolded and
    cut to its own dictionary values on its own."""
    monkeypatch.setattr(label_sets, "MAX_SETS", 40)
    monkeypatch.setattr(clustering, "COMPACT_ABOVE", compact_above)  # parked dictionaries
    batches = [random_batch(seed, rows=300, labels=LABELS, values_per_label=4) for seed in range(4)]
    sets = label_sets.for_schema(batches[0].schema)
    assert sets is not None
    written: list[pa.Table] = []
    sorter = MetricSorter(
        written.append,
        labels=sets,
        row_group_bytes=10**9,
        buffer_bytes=buffer_bytes,
        spill_folder=tmp_path,
    )
    for batch in batches:
        sorter.add(batch)
    sorter.finish()
    assert sets.full
    assert all(table.schema.equals(batches[0].schema) for table in written)
    rows_in = pa.Table.from_batches(batches).to_pylist()
    expected = sorted(rows_in, key=lambda row: str(row["metric_name"]))  # stable: arrival order
    assert [row for table in written for row in table.to_pylist()] == expected


def test_a_batch_that_would_pass_the_cap_is_not_folded_and_nothing_of_it_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(label_sets, "MAX_SETS", 10)
    batch = random_batch(1, rows=300, labels=LABELS, values_per_label=4)
    sets = LabelSets(batch.schema)
    assert sets.pack(batch) is None
    assert sets.full and sets.pack(batch.slice(0, 1)) is None  # stays full


def test_folded_rows_are_cut_into_row_groups_as_unfolded_ones_are(tmp_path: Path) -> None:
    """Row groups are sized as they will be written: folding must not make them grow."""
    batches = [
        one_metric(random_batch(seed, 300, LABELS, values_per_label=4)) for seed in range(30)
    ]
    cut: dict[bool, list[int]] = {}
    for folded in (False, True):
        written: list[pa.Table] = []
        sorter = MetricSorter(
            written.append,
            labels=label_sets.for_schema(batches[0].schema) if folded else None,
            row_group_bytes=sum(batch.get_total_buffer_size() for batch in batches) // 5,
            buffer_bytes=1,
            spill_folder=tmp_path,
        )
        for batch in batches:
            sorter.add(batch)
        sorter.finish()
        cut[folded] = [table.num_rows for table in written]
    assert len(cut[False]) >= 5
    assert cut[True] == cut[False]


def one_metric(batch: pa.RecordBatch) -> pa.RecordBatch:
    metric = batch.schema.get_field_index("metric_name")
    return batch.set_column(metric, batch.schema.field(metric), text(["m"] * batch.num_rows, ["m"]))
