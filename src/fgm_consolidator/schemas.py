"""Which sources may share an output, and the one schema they share.

The monitor's two eras never mix. Within the flat-label era the set of `l_*` columns is fixed at
each file's first flush, so files of one partition differ; they share an output under the union
of their label columns (a missing label reads as null). Anything else that differs, or a label
whose type differs, is a true conflict: those files go to separate outputs rather than change a
type (invariant 6).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Literal

import pyarrow as pa

from .errors import SchemaConflictError

Era = Literal["flat", "map"]

LABEL_PREFIX = "l_"
HISTOGRAM = "value_histogram"
MAP_LABELS = "labels"
LINEAGE_KEY = b"fgm_consolidator.lineage"
ARROW_SCHEMA = b"ARROW:schema"  # where pyarrow and arrow-rs store a file's Arrow schema


def is_label(name: str) -> bool:
    return name.startswith(LABEL_PREFIX)


def is_text_or_bytes(kind: pa.DataType) -> bool:
    """Text or bytes of variable length, plain (not dictionary-encoded), in either width."""
    return bool(
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


def era_of(schema: pa.Schema) -> Era:
    return "map" if MAP_LABELS in schema.names else "flat"


def fingerprint(schema: pa.Schema) -> str:
    """Stable short digest of names, types and nullability (metadata ignored)."""
    return hashlib.sha256(str(schema.remove_metadata()).encode()).hexdigest()[:16]


METRIC_NAME = "metric_name"


def check_mergeable(schema: pa.Schema) -> None:
    """SchemaConflictError unless an output can be laid out from rows of this schema: they are
    clustered by `metric_name`, which the monitor writes as text in every row. A file without
    it is left alone rather than merged: two such files once stopped every pass, failing inside
    the sort. (A null in a nullable `metric_name` is caught as the rows are read.)"""
    repeated = sorted(name for name, count in Counter(schema.names).items() if count > 1)
    if repeated:
        raise SchemaConflictError(f"columns named more than once: {', '.join(repeated)}")
    if METRIC_NAME not in schema.names:
        raise SchemaConflictError(f"no {METRIC_NAME} column")
    viewed = [field.name for field in schema if _holds_a_view(field.type)]
    if viewed:
        # pyarrow writes them and every reader reads them, but `take`, which the sort is made
        # of, has no kernel for them: each merge failed and was retried, the file never named.
        raise SchemaConflictError(f"column {viewed[0]} is a view type, which the sort cannot move")
    narrowed = [field for field in schema if _is_other_dictionary(field.type)]
    if narrowed:
        # A merge reads text columns with pyarrow's `read_dictionary`, which gives int32
        # indices, unordered, whatever the file stored: each such source failed its merge on
        # the type, one file reported per pass under a reason that named the types backwards.
        # Kept narrower indices would not hold the union of many sources' dictionaries.
        raise SchemaConflictError(
            f"column {narrowed[0].name} is {narrowed[0].type}; only int32, unordered"
            " dictionaries (the monitor's) keep their type through a merge"
        )
    kind = schema.field(METRIC_NAME).type
    if kind != pa.utf8():
        raise SchemaConflictError(f"{METRIC_NAME} is {kind}; the monitor writes utf8")


def holds_dictionary(kind: pa.DataType) -> bool:
    """A dictionary, at any depth (a map's labels too)."""
    if pa.types.is_dictionary(kind):
        return True
    return any(holds_dictionary(kind.field(i).type) for i in range(kind.num_fields))


def _is_other_dictionary(kind: pa.DataType) -> bool:
    """A dictionary not of int32 unordered indices, at any depth (a map's labels too: an int8
    one failed every merge of its partition, the union of the sources' values too many)."""
    if pa.types.is_dictionary(kind):
        other = kind.index_type != pa.int32() or bool(kind.ordered)
        return other or _is_other_dictionary(kind.value_type)
    return any(_is_other_dictionary(kind.field(i).type) for i in range(kind.num_fields))


def _holds_a_view(kind: pa.DataType) -> bool:
    """A string, binary or list view, at any depth."""
    if (
        pa.types.is_string_view(kind)
        or pa.types.is_binary_view(kind)
        or pa.types.is_list_view(kind)
        or pa.types.is_large_list_view(kind)
    ):
        return True
    if pa.types.is_dictionary(kind):
        return _holds_a_view(kind.value_type)
    return any(_holds_a_view(kind.field(i).type) for i in range(kind.num_fields))


def _base_fields(schema: pa.Schema) -> list[pa.Field]:
    return [field for field in schema if not is_label(field.name)]


def unify(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """The output schema for sources with these schemas, or SchemaConflictError.

    Non-label columns must agree exactly, in order. Label columns are the union, sorted by key
    and placed where the monitor puts them: before `value_histogram`, or last. Key-value and
    field metadata must agree too: an output holds one of each, and keeping the first
    source's silently dropped the others' (and the monitor writes the same in every file).
    """
    if not schemas:
        raise ValueError("unify needs at least one schema")
    first = schemas[0]
    base = _base_fields(first)
    labels: dict[str, pa.Field] = {}
    for schema in schemas:
        if era_of(schema) != era_of(first):
            raise SchemaConflictError(f"schema eras differ: {era_of(first)} and {era_of(schema)}")
        _check_same_metadata("key-value metadata", _plain_metadata(first), _plain_metadata(schema))
        other = _base_fields(schema)
        if [f.remove_metadata() for f in other] != [f.remove_metadata() for f in base]:
            raise SchemaConflictError(_base_difference(base, other))
        for known, field in zip(base, other, strict=True):
            _check_same_field_metadata(known, field)
        for field in schema:
            if not is_label(field.name):
                continue
            known = labels.get(field.name)
            if known is not None and known.type != field.type:
                raise SchemaConflictError(
                    f"label column {field.name} is {known.type} in one source and "
                    f"{field.type} in another"
                )
            if known is None:
                labels[field.name] = field
                continue
            _check_same_field_metadata(known, field)
            if field.nullable and not known.nullable:
                labels[field.name] = known.with_nullable(True)
    for name, field in labels.items():
        if any(name not in schema.names for schema in schemas):
            labels[name] = field.with_nullable(True)
    clash = _case_clash(schemas, labels)
    if clash:
        raise SchemaConflictError(
            f"label columns {' and '.join(clash)} differ only in case: readers that ignore case"
            " (DuckDB) would take one for the other in a file holding both"
        )
    names = [f.name for f in base]
    cut = names.index(HISTOGRAM) if HISTOGRAM in names else len(base)
    fields = base[:cut] + [labels[name] for name in sorted(labels)] + base[cut:]
    return pa.schema(fields, metadata=_plain_metadata(first))


def _case_clash(schemas: Sequence[pa.Schema], labels: Collection[str]) -> list[str]:
    """Label names the union would put in one file that differ only in case, where no source
    already holds them all (such a source reads no differently once merged)."""
    spellings: dict[str, list[str]] = {}
    for name in labels:
        spellings.setdefault(name.casefold(), []).append(name)
    for names in spellings.values():
        if len(names) > 1 and not any(set(names) <= set(s.names) for s in schemas):
            return sorted(names)
    return []


def _check_same_metadata(
    what: str, one: dict[bytes, bytes] | None, other: dict[bytes, bytes] | None
) -> None:
    """SchemaConflictError naming the first key whose value differs between `one` and
    `other`, either absent."""
    one, other = one or {}, other or {}
    for key in sorted(one.keys() | other.keys()):
        if one.get(key) != other.get(key):
            raise SchemaConflictError(
                f"{what} differs: {key.decode(errors='replace')}"
                f" is {_shown(one.get(key))} in one source and {_shown(other.get(key))} in another"
            )


def _check_same_field_metadata(known: pa.Field, field: pa.Field) -> None:
    """SchemaConflictError when the metadata of `field` or of a field inside it (a map's key
    or value) differs from `known`'s, which has the same type."""
    _check_same_metadata(f"field metadata of {field.name}", known.metadata, field.metadata)
    if _inner_metadata(known.type) != _inner_metadata(field.type):
        raise SchemaConflictError(f"field metadata inside {field.name} differs")


def _inner_metadata(kind: pa.DataType) -> list[dict[bytes, bytes]]:
    """The metadata of every field inside `kind` (a map's entries, key and value; a list's
    item), depth first: only that, not their names, which equal types may spell apart
    (`item` and `element`) and which were merged before metadata was compared."""
    found = []
    for i in range(kind.num_fields):
        inner = kind.field(i)
        found.append(dict(inner.metadata or {}))
        found += _inner_metadata(inner.type)
    return found


def _shown(value: bytes | None, limit: int = 60) -> str:
    if value is None:
        return "absent"
    text = value.decode(errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _plain_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """A source's key-value metadata without any lineage of ours (an output's, merged again)."""
    return {k: v for k, v in (schema.metadata or {}).items() if k != LINEAGE_KEY}


def _base_difference(base: Sequence[pa.Field], other: Sequence[pa.Field]) -> str:
    """Why two sources' non-label columns differ: the first column that does, spelled with
    the nullability at every depth, where the columns are the same ones; printed as types
    alone, a column that differs only in nullability read the same on both sides."""
    if [f.name for f in base] != [f.name for f in other]:
        return f"non-label columns differ: {_describe(base)} and {_describe(other)}"
    pairs = zip(base, other, strict=True)
    one, two = next((a, b) for a, b in pairs if a.remove_metadata() != b.remove_metadata())
    return f"non-label column {one.name} differs: {_spelled(one)} and {_spelled(two)}"


def _spelled(field: pa.Field) -> str:
    """`field`'s type with each field's nullability, inside it too (a map's value)."""
    kind = field.type
    inner = [f"{kind.field(i).name}: {_spelled(kind.field(i))}" for i in range(kind.num_fields)]
    text = f"{str(kind).split('<')[0]}<{', '.join(inner)}>" if inner else str(kind)
    return text if field.nullable else f"{text} not null"


def _describe(fields: Sequence[pa.Field]) -> str:
    return "[" + ", ".join(f"{f.name}: {f.type}" for f in fields) + "]"


def misfit(schema: pa.Schema, target: pa.Schema) -> str | None:
    """Why rows of `schema` cannot be laid out as `target` without dropping a value: a column
    `target` has no place for, or a name given to two columns (pyarrow looks such a name up
    as absent). None when they fit."""
    names = set(target.names)
    present = set(schema.names)
    if len(present) == len(schema.names) and present <= names:
        return None  # every batch of a merge asks: the quick answer first
    for name, count in Counter(schema.names).items():
        if count > 1:
            return f"column {name} is named more than once"
        if name not in names:
            return f"column {name} is not in the output"
    return None


def conform(batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
    """A source batch laid out as the output: missing labels as nulls, columns in target order.

    Raises SchemaConflictError when a column's type is not the target's, or when the batch has
    a column the target lacks or two columns of one name (`misfit`): no cast ever happens and
    no value is ever dropped. (A merge's target holds every source column; the lineage
    proof's is the output's, and a file with a column its output lacks is not held by it.)
    """
    why = misfit(batch.schema, target)
    if why is not None:
        raise SchemaConflictError(why)
    columns = []
    for field in target:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            if not is_label(field.name):
                raise SchemaConflictError(f"column {field.name} is missing from a source")
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(index)
        if field.name == METRIC_NAME and column.null_count:
            raise SchemaConflictError(f"{column.null_count} rows without a {METRIC_NAME}")
        if column.type != field.type:
            raise SchemaConflictError(
                f"column {field.name} is {column.type} in a source, {field.type} in the output"
            )
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=target)
