"""Carry a row's text labels through the external sort as one number, and give them back at
the end.

A flat-era row has eleven text columns besides its metric (labels, kind, run id) but an output
holds only a few dozen distinct combinations of them, about one per container and run. Taking,
parking and reading back eleven columns of dictionary indices was a large part of the sort.
So each buffer's rows get the number of their combination (their *label set*, numbered in the
order the output first meets it) in place of those columns, and `unpack` restores the columns
just before a row group is written: 5% less CPU for a merge, and the same bytes on disk.

Exact by construction: a label set is the tuple of its values (text, or None for null), never
a hash of them, and `unpack` rebuilds every value from that tuple.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .schemas import METRIC_NAME

LABEL_SET = "\x00label_set"  # a name no column of the monitor's can have
TEXT = pa.dictionary(pa.int32(), pa.utf8())
INDEX_BYTES = 4
# Below three columns, folding costs more than it saves: the map era has two (kind and run
# id; its labels are one map column) and a merge took 1% more CPU with them folded.
MIN_COLUMNS = 3
# Each row's indices are combined as the digits of one int64; before the number could
# overflow, the combinations seen so far are renumbered from 0.
_COMBINED_LIMIT = 1 << 62
# The label sets and distinct text one output may fold; past either, `full` says stop. They
# are held until the output is written (about 0.75 KB a set), so a label that differs in
# every row made memory grow with the output: 200,000 containers of one row took 201 MiB.
# The monitor's labels name containers and processes: hundreds of sets an hour.
MAX_SETS = 8192
MAX_TEXT_BYTES = 4 * 1024 * 1024


def is_packed(schema: pa.Schema) -> bool:
    return LABEL_SET in schema.names


def for_schema(schema: pa.Schema) -> LabelSets | None:
    """A `LabelSets` for rows of `schema`, or None where folding its text would not pay."""
    if LABEL_SET in schema.names:  # a column of that name would be shadowed
        return None
    sets = LabelSets(schema)
    return sets if len(sets.columns) >= MIN_COLUMNS else None


class LabelSets:
    """The label sets of one output, numbered in the order they are first met."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.columns = [f.name for f in schema if f.type == TEXT and f.name != METRIC_NAME]
        kept = [f for f in schema if f.name not in self.columns]
        self.packed = pa.schema(
            [*kept, pa.field(LABEL_SET, pa.int32(), nullable=False)], metadata=schema.metadata
        )
        self._numbers: dict[tuple[int | None, ...], int] = {}
        # Per column: each distinct value's code, and each label set's code (None for null).
        self._codes: list[dict[str | None, int]] = [{} for _ in self.columns]
        self._members: list[list[int | None]] = [[] for _ in self.columns]
        self._last: list[tuple[tuple[str | None, ...], list[int]] | None] = [None] * len(
            self.columns
        )
        self._arrays: list[tuple[pa.Array, pa.Array]] | None = None
        self._text_bytes = 0  # of the distinct values held in `_codes`, about
        self.full = False  # set once a batch would take the output past MAX_SETS or its text

    def pack(self, batch: pa.RecordBatch) -> pa.RecordBatch | None:
        """`batch` (of `schema`, one dictionary per column) as `packed`: its label columns
        replaced by the number of each row's label set. None, and `full` from then on, when
        that would hold more than `MAX_SETS` sets or `MAX_TEXT_BYTES` of text: the rest of
        the output's rows go through the sort as they are. Checked before any set or value
        of the batch is kept, so one batch cannot take the output past either."""
        if self.full:
            return None
        columns = [batch.column(name) for name in self.columns]
        rows, keys, steps = _distinct_rows(columns)
        text = sum(column.dictionary.nbytes for column in columns)
        if len(self._numbers) + len(keys) > MAX_SETS or self._text_bytes + text > MAX_TEXT_BYTES:
            self.full = True
            return None
        distinct = [_digits(key, steps) for key in keys.to_pylist()]
        codes = [self._codes_of(position, column) for position, column in enumerate(columns)]
        numbers = pa.array(
            [self._number(_members(digits, codes)) for digits in distinct], pa.int32()
        )
        kept = [batch.column(f.name) for f in self.packed if f.name != LABEL_SET]
        label_set = pc.take(numbers, rows, boundscheck=False)  # `rows` index `distinct`
        return pa.RecordBatch.from_arrays([*kept, label_set], schema=self.packed)

    def unpack(self, table: pa.Table) -> pa.Table:
        """`table` (of `packed`) as `schema` again, each label column with one dictionary."""
        numbers = table.column(LABEL_SET).combine_chunks()
        if self._arrays is None:  # label sets were added since the last call
            self._arrays = [
                (pa.array(members, pa.int32()), pa.array(list(codes), pa.utf8()))
                for members, codes in zip(self._members, self._codes, strict=True)
            ]
        restored: dict[str, pa.ChunkedArray] = {}
        for name, (members, dictionary) in zip(self.columns, self._arrays, strict=True):
            indices = pc.take(members, numbers, boundscheck=False)  # numbers are ours
            restored[name] = pa.chunked_array([pa.DictionaryArray.from_arrays(indices, dictionary)])
        columns = [
            restored[f.name] if f.name in restored else table.column(f.name) for f in self.schema
        ]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def unfolded_bytes(self, rows: int) -> int:
        """What `rows` folded rows gain when unpacked: an index per column in place of one
        number (the dictionaries are small and shared)."""
        return rows * INDEX_BYTES * (len(self.columns) - 1)

    def _codes_of(self, position: int, column: pa.DictionaryArray) -> list[int]:
        """The output's code for each entry of `column`'s dictionary. A dictionary holds a
        handful of values and the next buffer usually has the same one, so the last is kept
        (only the last: a cache of every one would grow with the output)."""
        local = tuple(column.dictionary.to_pylist())
        last = self._last[position]
        if last is not None and last[0] == local:
            return last[1]
        codes = self._codes[position]
        found = []
        for value in local:
            code = codes.get(value)
            if code is None:
                code = codes[value] = len(codes)
                self._text_bytes += len(value or "")
            found.append(code)
        self._last[position] = (local, found)
        return found

    def _number(self, members: tuple[int | None, ...]) -> int:
        found = self._numbers.get(members)
        if found is None:
            found = self._numbers[members] = len(self._numbers)
            for position, member in enumerate(members):
                self._members[position].append(member)
            self._arrays = None
        return found


def _members(digits: list[int], codes: list[list[int]]) -> tuple[int | None, ...]:
    """One distinct row's dictionary indices as the output's codes; an index one past its
    dictionary is a null."""
    return tuple(
        None if digit == len(known) else known[digit]
        for digit, known in zip(digits, codes, strict=True)
    )


Steps = list[tuple[int, list[int] | None]]  # per later column: radix, renumbering


def _distinct_rows(columns: list[pa.DictionaryArray]) -> tuple[pa.Array, pa.Array, Steps]:
    """Each row's place among the distinct rows of `columns`, each distinct row as one number,
    and how `_digits` takes that number apart into its dictionary indices (the dictionary's
    length standing for null).

    The indices are combined as the digits of one mixed-radix number per row, so a single
    dictionary encoding finds the distinct rows; the few distinct numbers are then taken apart
    digit by digit. A column with one value and no nulls has a digit that is always 0, and
    costs nothing.
    """
    combined: pa.Array | None = None
    radix = 1
    steps: Steps = []
    for column in columns:
        digit = column.indices
        size = len(column.dictionary)
        if digit.null_count:
            digit = pc.fill_null(digit, size)
            size += 1
        if combined is None:
            combined, radix = pc.cast(digit, pa.int64()), size
            continue
        if size == 1:
            steps.append((1, None))
            continue
        renumbering = None
        if radix * size >= _COMBINED_LIMIT:
            encoded = pc.dictionary_encode(combined)
            combined, radix = pc.cast(encoded.indices, pa.int64()), len(encoded.dictionary)
            renumbering = encoded.dictionary.to_pylist()
        combined = pc.add(pc.multiply(combined, size), digit)
        radix *= size
        steps.append((size, renumbering))
    if combined is None:
        raise ValueError("no columns to combine")
    encoded = pc.dictionary_encode(combined)
    return encoded.indices, encoded.dictionary, steps


def _digits(key: int, steps: Steps) -> list[int]:
    """The digits `_distinct_rows` combined into `key`, first column first."""
    digits = []
    for size, renumbering in reversed(steps):
        key, digit = divmod(key, size)
        digits.append(digit)
        if renumbering is not None:
            key = renumbering[key]
    digits.append(key)
    digits.reverse()
    return digits
