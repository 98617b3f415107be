import re

import pyarrow as pa
import pytest

from fgm_consolidator.errors import SchemaConflictError
from fgm_consolidator.schemas import LINEAGE_KEY, conform, era_of, fingerprint, unify

BASE = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("time", pa.timestamp("ms"), nullable=False),
    pa.field("metric_name", pa.string(), nullable=False),
    pa.field("value_float", pa.float64()),
]
HIST = pa.field("value_histogram", pa.binary())
DICT = pa.dictionary(pa.int32(), pa.string())
MAP = pa.field("labels", pa.map_(pa.field("key", DICT, nullable=False), DICT), nullable=False)


UTF8 = pa.string()


def flat(*labels: str, label_type: pa.DataType = UTF8) -> pa.Schema:
    return pa.schema([*BASE, *(pa.field(f"l_{k}", label_type) for k in labels), HIST])


def test_label_union_is_sorted_and_placed_before_the_histogram() -> None:
    schema = unify([flat("pod_name", "container_id"), flat("device", "pod_name")])
    assert schema.names == [
        "run_id", "time", "metric_name", "value_float",
        "l_container_id", "l_device", "l_pod_name", "value_histogram",
    ]  # fmt: skip
    assert all(schema.field(n).nullable for n in ("l_container_id", "l_device", "l_pod_name"))


def test_non_nullable_label_missing_elsewhere_becomes_nullable() -> None:
    strict = pa.schema([*BASE, pa.field("l_pod", pa.string(), nullable=False), HIST])
    assert unify([strict, flat()]).field("l_pod").nullable
    assert not unify([strict, strict]).field("l_pod").nullable


def test_label_type_conflict_is_refused() -> None:
    with pytest.raises(SchemaConflictError, match="l_pid"):
        unify([flat("pid"), flat("pid", label_type=pa.int64())])


def test_labels_that_differ_only_in_case_never_meet_in_one_output() -> None:
    """DuckDB ignores case: in a file holding `l_pod` and `l_Pod` it renames one of them and
    reads the other's values for `l_pod`."""
    with pytest.raises(SchemaConflictError, match="l_Pod and l_pod differ only in case"):
        unify([flat("pod"), flat("Pod")])
    both = flat("pod", "Pod")  # a source that already holds both reads no differently merged
    assert sorted(unify([both, flat("pod")]).names) == sorted(both.names)


def test_a_label_keeps_the_field_metadata_its_sources_share() -> None:
    tagged = pa.schema([*BASE, pa.field("l_pod", UTF8).with_metadata({b"k": b"v"}), HIST])
    assert unify([tagged, tagged, flat("other")]).field("l_pod").metadata == {b"k": b"v"}
    strict = pa.schema(
        [*BASE, pa.field("l_pod", UTF8, nullable=False).with_metadata({b"k": b"v"}), HIST]
    )
    widened = unify([strict, tagged]).field("l_pod")
    assert widened.nullable and widened.metadata == {b"k": b"v"}


def map_labels(value: bytes) -> pa.Field:
    key = pa.field("key", DICT, nullable=False).with_metadata({b"unit": value})
    return pa.field("labels", pa.map_(key, DICT), nullable=False)


def tag(schema: pa.Schema, column: str, value: bytes) -> pa.Schema:
    index = schema.get_field_index(column)
    return schema.set(index, schema.field(index).with_metadata({b"unit": value}))


@pytest.mark.parametrize(
    ("one", "other", "message"),
    [
        (
            tag(flat("pod"), "l_pod", b"a"),
            flat("pod"),
            "field metadata of l_pod differs: unit is 'a' in one source and absent in another",
        ),
        (
            tag(flat("pod"), "value_float", b"s"),
            tag(flat("pod"), "value_float", b"ms"),
            "field metadata of value_float differs: unit is 's' in one source and 'ms'",
        ),
        (
            flat("pod").with_metadata({b"version": b"1"}),
            flat("pod"),
            "key-value metadata differs: version is '1' in one source and absent in another",
        ),
        (
            pa.schema([*BASE, map_labels(b"1"), HIST]),
            pa.schema([*BASE, map_labels(b"2"), HIST]),
            "field metadata inside labels differs",
        ),
    ],
    ids=["label", "base column", "key-value", "map key"],
)
def test_sources_whose_metadata_differs_never_share_an_output(
    one: pa.Schema, other: pa.Schema, message: str
) -> None:
    """An output holds one metadata of each kind: the first source's was kept, and the
    others' were dropped without a word (an adversarial fidelity review)."""
    for pair in ([one, other], [other, one]):
        with pytest.raises(SchemaConflictError, match=message.split(" is ")[0]):
            unify(pair)
    with pytest.raises(SchemaConflictError, match=re.escape(message)):
        unify([one, other])


def test_eras_never_share_an_output() -> None:
    map_era = pa.schema([*BASE, MAP, HIST])
    assert era_of(map_era) == "map"
    assert era_of(flat("pod")) == "flat"
    with pytest.raises(SchemaConflictError, match="eras differ"):
        unify([flat(), map_era])


def test_base_column_type_change_is_a_conflict() -> None:
    micro = pa.schema([BASE[0], pa.field("time", pa.timestamp("us"), nullable=False), *BASE[2:]])
    said = "non-label column time differs: timestamp[ms] not null and timestamp[us] not null"
    with pytest.raises(SchemaConflictError, match=re.escape(said)):
        unify([pa.schema(BASE), micro])
    with pytest.raises(SchemaConflictError, match=r"non-label columns differ: .*value_float"):
        unify([pa.schema(BASE), pa.schema(BASE[:-1])])


def test_a_nullability_change_inside_a_column_is_named() -> None:
    """Printed as types alone, both sides of such a conflict read the same (a review)."""
    nullable_value = pa.field("labels", pa.map_(pa.field("key", DICT, nullable=False), DICT))
    strict_value = pa.field(
        "labels",
        pa.map_(pa.field("key", DICT, nullable=False), pa.field("value", DICT, nullable=False)),
    )
    with pytest.raises(SchemaConflictError) as raised:
        unify([pa.schema([*BASE, nullable_value]), pa.schema([*BASE, strict_value])])
    one, two = str(raised.value).split(" and ")
    assert one.startswith("non-label column labels differs: map<entries: struct<")
    assert one.count("not null") + 1 == two.count("not null")


def test_lineage_of_a_consolidated_source_is_not_inherited() -> None:
    source = flat("pod").with_metadata({LINEAGE_KEY: b"{}", b"other": b"kept"})
    assert unify([source]).metadata == {b"other": b"kept"}


def test_fingerprint_ignores_metadata_but_not_types() -> None:
    assert fingerprint(flat("a")) == fingerprint(flat("a").with_metadata({b"k": b"v"}))
    assert fingerprint(flat("a")) != fingerprint(flat("a", label_type=pa.large_string()))


def test_conform_fills_missing_labels_with_nulls_without_casting() -> None:
    target = unify([flat("a", "b"), flat("b")])
    batch = pa.RecordBatch.from_pylist(
        [{"run_id": "r", "time": 5, "metric_name": "m", "value_float": 1.5, "l_b": "x"}],
        schema=flat("b"),
    )
    out = conform(batch, target)
    assert out.schema == target
    assert out.to_pylist()[0]["l_a"] is None
    assert out.to_pylist()[0]["l_b"] == "x"
    wrong = pa.RecordBatch.from_pylist([{"run_id": "r", "time": 5, "metric_name": "m",
                                         "value_float": 1.0, "l_b": 1}],
                                       schema=flat("b", label_type=pa.int64()))  # fmt: skip
    with pytest.raises(SchemaConflictError, match="l_b"):
        conform(wrong, target)


def test_conform_never_drops_a_column_the_target_lacks() -> None:
    """The lineage proof conforms a file to its output's schema: a column dropped there would
    let a file with more values than the output pass as held by it."""
    batch = pa.RecordBatch.from_pylist(
        [{"run_id": "r", "time": 5, "metric_name": "m", "value_float": 1.5, "l_a": "x"}],
        schema=flat("a"),
    )
    with pytest.raises(SchemaConflictError, match="column l_a is not in the output"):
        conform(batch, flat("b"))
    twice = pa.RecordBatch.from_arrays(
        [*batch.columns, pa.array(["y"])], schema=batch.schema.append(pa.field("l_a", pa.utf8()))
    )
    with pytest.raises(SchemaConflictError, match="column l_a is named more than once"):
        conform(twice, flat("a"))


def test_inner_field_names_alone_are_no_metadata_conflict() -> None:
    """`item` and `element` name a list's values in equal types: merged before metadata was
    compared, and merged still (a review found the inner check taking names for metadata)."""
    item = pa.schema([*BASE, pa.field("h", pa.list_(pa.field("item", pa.int32())))])
    element = pa.schema([*BASE, pa.field("h", pa.list_(pa.field("element", pa.int32())))])
    assert unify([item, element]).field("h").type == item.field("h").type
