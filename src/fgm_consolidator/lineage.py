"""What each output says it holds, readable without the journal.

Every output carries its lineage in its parquet key-value metadata: the merge id, its rows, and
each source's name and rows. That is enough, with the journal lost, to tell which live files
an output already holds, and to prove it row by row: every row of the files still present is
among the output's rows (`unproven` answers which are not). Only names that parse as ours are
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

from . import containment, footers, reading
from .errors import ConsolidatorError
from .layout import parse_data_file
from .schemas import LINEAGE_KEY, misfit


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

    def held_besides(self, output: str) -> frozenset[str]:
        """The files this lineage of `output` says it holds, other than `output` itself: no
        file is a copy of itself (one listing its own name was once removed as its own copy)."""
        return self.names - {output}

    def rows_of(self, name: str) -> int:
        return next(s.rows for s in self.sources if s.name == name)


def encode(merge_id: int, sources: Sequence[tuple[str, int]]) -> dict[bytes, bytes]:
    doc = {
        "merge_id": merge_id,
        "rows": sum(rows for _, rows in sources),
        "sources": [{"name": name, "rows": rows} for name, rows in sources],
    }
    return {LINEAGE_KEY: json.dumps(doc, separators=(",", ":")).encode()}


def decode(raw: bytes | None) -> Lineage | None:
    """The lineage `encode` stored under LINEAGE_KEY; None when absent or not ours."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        sources = tuple(LineageSource(str(s["name"]), int(s["rows"])) for s in doc["sources"])
        return Lineage(int(doc["merge_id"]), int(doc["rows"]), sources)
    except (ValueError, TypeError, KeyError, OverflowError):  # Overflow: `"rows": Infinity`
        return None


def read(path: Path) -> Lineage | None:
    try:
        raw = footers.read(path).lineage
    except (OSError, pa.ArrowException):
        return None
    return decode(raw)


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
        for name in lineage.held_besides(output):
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
        held_here = lineage.held_besides(output) & present
        if held_here:
            found.add(output)
            found.update(held_here)
    for output, others in overlaps(held).items():
        found.add(output)
        found.update(others)
    return found


def list_names(folder: Path) -> set[str]:
    return {entry.name for entry in os.scandir(folder)}


# -- proof ---------------------------------------------------------------------------------


def output_reads_back(path: Path, held: Lineage, *, decode: bool = True) -> str | None:
    """None when every row group of `path` decodes and the rows add up; else why not. Without
    `decode`, only the footer's count is held against the lineage."""
    try:
        parquet = pq.ParquetFile(path)
        with parquet:
            listed = parquet.metadata.num_rows
            rows = sum(b.num_rows for b in _batches(parquet)) if decode else listed
    except (OSError, pa.ArrowException) as exc:
        return f"output does not read back: {exc}"
    total = sum(s.rows for s in held.sources)
    if not rows == listed == held.rows == total:
        return f"output has {rows} rows (footer {listed}), its lineage lists {held.rows} ({total})"
    return None


def unproven(
    output: Path, held: Lineage, sources: Sequence[Path], *, compare_rows: bool = True
) -> dict[str, str]:
    """Why each present source is not shown to lie inside the output; a source not in the
    answer is proven, and may go.

    The rows are compared by `containment`, in bounded memory. Without
    `compare_rows` only the footers' row counts are compared, which proves nothing: a source
    whose count agrees is answered with that.
    """
    problems: dict[str, str] = {}
    try:
        counted: list[Path] = []
        target = pq.read_schema(output)
        for source in sources:
            metadata = pq.read_metadata(source)
            rows, listed = metadata.num_rows, held.rows_of(source.name)
            why = misfit(metadata.schema.to_arrow_schema(), target)
            if why is not None:
                # Compared as the output's columns, its rows would match without that one.
                problems[source.name] = f"{source.name} does not fit {output.name}: {why}"
            elif rows == listed:
                counted.append(source)
            else:
                problems[source.name] = (
                    f"{source.name} has {rows} rows, the lineage of {output.name} lists {listed}"
                )
        if not compare_rows:
            return problems | {
                s.name: f"{s.name} is still here; its rows were not compared with {output.name}'s"
                for s in counted
            }
        missing = containment.rows_not_found(output, counted)
    # OverflowError: a value no Python object holds (a time nested in a struct, say) is a
    # doubt, not a traceback out of start-up recovery.
    except (
        OSError,
        pa.ArrowException,
        ValueError,
        KeyError,
        OverflowError,
        ConsolidatorError,
    ) as exc:
        return {s.name: f"cannot compare {s.name} with {output.name}: {exc}" for s in sources}
    for name, rows in missing.items():
        problems[name] = f"{name} differs from its rows in {output.name} ({rows} rows not found)"
    return problems


def _batches(parquet: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
    """Small batches, without threads: only their count is wanted (every page decoded), and
    65,536-row batches of an output took 25 MB at start-up."""
    return reading.batches(parquet, containment.BATCH_ROWS, use_threads=False)
