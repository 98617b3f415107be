"""What each output says it holds, readable without the journal.

Every output carries its lineage in its parquet key-value metadata: the merge id, its rows, and
each source's name and rows in output order. That is enough, with the journal lost, to tell
which live files an output already holds, and to prove it row by row: source k's rows are the
output's rows from the sum of the rows listed before it. Only names that parse as ours are
read, and a file whose lineage does not decode simply has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConsolidatorError
from .layout import parse_data_file
from .schemas import LINEAGE_KEY, conform


@dataclass(frozen=True)
class LineageSource:
    name: str
    rows: int


@dataclass(frozen=True)
class Lineage:
    merge_id: int
    rows: int
    sources: tuple[LineageSource, ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.sources)

    def offset_of(self, name: str) -> int:
        """Where `name`'s rows start in the output."""
        offset = 0
        for source in self.sources:
            if source.name == name:
                return offset
            offset += source.rows
        raise KeyError(name)

    def rows_of(self, name: str) -> int:
        return next(s.rows for s in self.sources if s.name == name)


def encode(merge_id: int, sources: Sequence[tuple[str, int]]) -> dict[bytes, bytes]:
    doc = {
        "merge_id": merge_id,
        "rows": sum(rows for _, rows in sources),
        "sources": [{"name": name, "rows": rows} for name, rows in sources],
    }
    return {LINEAGE_KEY: json.dumps(doc, separators=(",", ":")).encode()}


def decode(metadata: Mapping[bytes, bytes] | None) -> Lineage | None:
    """The lineage in a footer's key-value metadata; None when absent or not ours."""
    raw = (metadata or {}).get(LINEAGE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        sources = tuple(LineageSource(str(s["name"]), int(s["rows"])) for s in doc["sources"])
        return Lineage(int(doc["merge_id"]), int(doc["rows"]), sources)
    except (ValueError, TypeError, KeyError):
        return None


def read(path: Path) -> Lineage | None:
    try:
        return decode(pq.read_metadata(path).metadata)
    except (OSError, pa.ArrowException):
        return None


def lineages(folder: Path, names: Collection[str]) -> dict[str, Lineage]:
    """The lineage of every output of ours among `names` that has one."""
    found = {}
    for name in sorted(names):
        parsed = parse_data_file(name)
        if parsed is not None and parsed.kind == "consolidated":
            held = read(folder / name)
            if held is not None:
                found[name] = held
    return found


def overlaps(held: Mapping[str, Lineage]) -> dict[str, set[str]]:
    """Outputs listing a source that another live output lists too: those rows are in the
    folder twice, whether the source is still there or not."""
    first: dict[str, str] = {}
    shared: dict[str, set[str]] = {}
    for output, lineage in held.items():
        for name in lineage.names:
            other = first.setdefault(name, output)
            if other != output:
                shared.setdefault(output, set()).add(other)
                shared.setdefault(other, set()).add(output)
    return shared


def claimed_names(folder: Path, names: Collection[str]) -> set[str]:
    """Files whose rows are in the folder twice by the outputs' own account: every present
    file named by a present output's lineage, those outputs, and outputs sharing a source.
    None may be planned into a new merge: that would make the duplicate permanent."""
    present = set(names)
    held = lineages(folder, present)
    found: set[str] = set()
    for output, lineage in held.items():
        if lineage.names & present:
            found.add(output)
            found.update(lineage.names & present)
    for output, others in overlaps(held).items():
        found.add(output)
        found.update(others)
    return found


def list_names(folder: Path) -> set[str]:
    return {entry.name for entry in os.scandir(folder)}


# -- proof ---------------------------------------------------------------------------------


def output_reads_back(path: Path, held: Lineage) -> str | None:
    """None when every row group of `path` decodes and the rows add up; else why not."""
    try:
        parquet = pq.ParquetFile(path)
        with parquet:
            listed = parquet.metadata.num_rows
            rows = sum(batch.num_rows for batch in parquet.iter_batches())
    except (OSError, pa.ArrowException) as exc:
        return f"output does not read back: {exc}"
    total = sum(s.rows for s in held.sources)
    if not rows == listed == held.rows == total:
        return f"output has {rows} rows (footer {listed}), its lineage lists {held.rows} ({total})"
    return None


def source_matches(output: Path, held: Lineage, source: Path) -> str | None:
    """None when `source` holds exactly the rows the output's lineage places at its offset."""
    try:
        src = pq.ParquetFile(source)
        out = pq.ParquetFile(output)
        with src, out:
            rows = held.rows_of(source.name)
            if src.metadata.num_rows != rows:
                return (
                    f"{source.name} has {src.metadata.num_rows} rows, "
                    f"the lineage of {output.name} lists {rows}"
                )
            schema = out.schema_arrow
            theirs = (conform(b, schema) for b in src.iter_batches())
            ours = _rows_from(out, held.offset_of(source.name), rows)
            if not _same_batches(theirs, ours):
                return f"{source.name} differs from its rows in {output.name}"
    except (OSError, pa.ArrowException, ValueError, ConsolidatorError) as exc:
        return f"cannot compare {source.name} with {output.name}: {exc}"
    return None


def _rows_from(parquet: pq.ParquetFile, start: int, count: int) -> Iterator[pa.RecordBatch]:
    """Rows [start, start + count) of a file, reading only the row groups that hold them."""
    first = 0
    for group in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        lo, hi = max(start, first), min(start + count, first + size)
        if lo < hi:
            table = parquet.read_row_group(group)
            yield from table.slice(lo - first, hi - lo).to_batches()
        first += size


def _same_batches(left: Iterator[pa.RecordBatch], right: Iterator[pa.RecordBatch]) -> bool:
    """Row-for-row equality of two batch streams cut at different places; NaN equals NaN."""
    a: pa.RecordBatch | None = None
    b: pa.RecordBatch | None = None
    while True:
        while a is None or a.num_rows == 0:
            a = next(left, None)
            if a is None:
                break
        while b is None or b.num_rows == 0:
            b = next(right, None)
            if b is None:
                break
        if a is None or b is None:
            return a is None and b is None
        n = min(a.num_rows, b.num_rows)
        if not _same_rows(a.slice(0, n), b.slice(0, n)):
            return False
        a, b = a.slice(n), b.slice(n)


def _same_rows(a: pa.RecordBatch, b: pa.RecordBatch) -> bool:
    if a.schema.names != b.schema.names:
        return False
    return all(_same_column(x, y) for x, y in zip(a.columns, b.columns, strict=True))


_FLOAT_BITS = {16: pa.uint16(), 32: pa.uint32(), 64: pa.uint64()}


def _same_column(x: pa.Array, y: pa.Array) -> bool:
    """Logical equality: dictionaries decoded, floats compared bit for bit (NaN == NaN)."""
    if x.type != y.type:
        return False
    if pa.types.is_dictionary(x.type):
        return _same_column(x.dictionary_decode(), y.dictionary_decode())
    if pa.types.is_floating(x.type):
        bits = _FLOAT_BITS[x.type.bit_width]
        return bool(x.view(bits).equals(y.view(bits)))
    if pa.types.is_nested(x.type):
        return bool(x.to_pylist() == y.to_pylist())
    return bool(x.equals(y))
