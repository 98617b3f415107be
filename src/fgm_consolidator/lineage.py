"""What each output says it holds, readable without the journal.

Every output carries its lineage in its parquet key-value metadata: the merge id, its rows, and
each source's name, rows and footer digest. That is enough, with the journal lost, to tell
which live files an output already holds, and to prove it row by row: every row of the files
still present is among the output's rows (`unproven` answers which are not). Only names that
parse as ours are read, and a file whose lineage does not decode simply has none.

A name alone does not say which file: the monitor names a file by the second its window
starts, so after the clock steps back by whole rotations a new file takes the name of one
merged long ago. Taken for a copy of rows its output held, it and the output were held out of
every merge for good, a person asked to decide. Which present file a lineage means is now
`PresentFiles`' answer, by footer digest; two lineages that record different footers under
one name list different files (`LineageSource.may_be`), so they share no rows. Outputs written
before digests were recorded match by name, as before.

An output merged again is listed by the new output, its files are not: those go into the new
lineage as ancestors, with their footer digests. A copy of one brought back (a backup restored
over the folder) is held by the output under that very footer only, and proven and removed as
a listed file is, with the journal or without it.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import containment, footers, reading
from .containment import StopCheck
from .errors import ConsolidatorError, SourceChangedError
from .layout import parse_data_file
from .reading import UNREADABLE
from .schemas import LINEAGE_KEY, misfit


@dataclass(frozen=True)
class LineageSource:
    name: str
    rows: int
    footer: str | None = None  # `footers.footer_digest`; None in outputs from before it

    def may_be(self, other: LineageSource) -> bool:
        """Whether two lineages may list the same file here: by name, unless both recorded
        which footer it had and they differ."""
        return self.name == other.name and (
            self.footer is None or other.footer is None or self.footer == other.footer
        )


@dataclass(frozen=True)
class Lineage:
    merge_id: int
    rows: int
    sources: tuple[LineageSource, ...]
    # Files whose rows came in through an output of ours among `sources`, at any depth. Not
    # counted in `rows`: their rows are that output's.
    ancestors: tuple[LineageSource, ...] = ()

    def rows_of(self, name: str, footer: str | None = None) -> int:
        """The rows listed of the file `name` with the footer digest `footer`, else of the
        first entry of that name: after the clock stepped back, two files of one name can
        both have come in through outputs merged again, with their own rows."""
        entries = [s for s in (*self.sources, *self.ancestors) if s.name == name]
        return next(
            (s.rows for s in entries if footer is not None and s.footer == footer), entries[0].rows
        )

    def footers(self) -> dict[str, str | None]:
        """Each source's footer digest, by name."""
        return {s.name: s.footer for s in self.sources}


def encode(
    merge_id: int, sources: Sequence[LineageSource], ancestors: Sequence[LineageSource] = ()
) -> dict[bytes, bytes]:
    doc: dict[str, Any] = {
        "merge_id": merge_id,
        "rows": sum(s.rows for s in sources),
        "sources": [_source_doc(s) for s in sources],
    }
    if ancestors:  # an output of monitor's files alone reads as before
        doc["ancestors"] = [_source_doc(s) for s in ancestors]
    return {LINEAGE_KEY: json.dumps(doc, separators=(",", ":")).encode()}


def _source_doc(source: LineageSource) -> dict[str, str | int]:
    doc: dict[str, str | int] = {"name": source.name, "rows": source.rows}
    if source.footer is not None:
        doc["footer"] = source.footer
    return doc


def decode(raw: bytes | None, among: Collection[str] | None = None) -> Lineage | None:
    """The lineage `encode` stored under LINEAGE_KEY; None when absent or not ours. With
    `among`, only the ancestors under those names: an output of a day-long window lists a
    thousand, and every pass reads every output's lineage to ask after the files present."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        sources = tuple(_decode_source(s) for s in doc["sources"])
        fields = [_source_fields(s) for s in doc.get("ancestors", ())]  # each one checked
        ancestors = tuple(LineageSource(*f) for f in fields if among is None or f[0] in among)
        return Lineage(int(doc["merge_id"]), int(doc["rows"]), sources, ancestors)
    # Overflow: `"rows": Infinity`; Recursion: a value nested a hundred thousand deep, which
    # escaped as an unexpected error naming no file and failed its partition at every pass.
    # Attribute: an entry that is no object (`"sources": ["a"]`).
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError, AttributeError):
        return None


def _decode_source(doc: Any) -> LineageSource:
    return LineageSource(*_source_fields(doc))


def _source_fields(doc: Any) -> tuple[str, int, str | None]:
    """An entry's name, rows and footer digest; raises when it is not one `encode` writes."""
    footer = doc.get("footer")
    if footer is not None and not isinstance(footer, str):
        raise TypeError(f"footer digest {footer!r} is not text")
    return str(doc["name"]), int(doc["rows"]), footer


def read(path: Path, among: Collection[str] | None = None) -> Lineage | None:
    try:
        raw = footers.read(path).lineage
    except UNREADABLE:
        return None
    return decode(raw, among)


def lineages(
    folder: Path, names: Collection[str], *, every_ancestor: bool = False
) -> dict[str, Lineage]:
    """The lineage of every output of ours among `names` (the files present) that has one,
    with the ancestors among `names` only, unless `every_ancestor`."""
    found = {}
    for name in sorted(names):
        parsed = parse_data_file(name)
        if parsed is not None and parsed.kind == "consolidated":
            held = read(folder / name, None if every_ancestor else names)
            if held is not None:
                found[name] = held
    return found


def overlaps(held: Mapping[str, Lineage]) -> dict[str, set[str]]:
    """Outputs listing a source that another live output lists too: those rows are in the
    folder twice, whether the source is still there or not."""
    listed: dict[str, list[tuple[str, LineageSource]]] = {}  # by name: (output, its entry)
    for output, lineage in held.items():
        for source in lineage.sources:
            if source.name != output:
                listed.setdefault(source.name, []).append((output, source))
    shared: dict[str, set[str]] = {}
    for entries in listed.values():
        for (output, source), (other, entry) in itertools.combinations(entries, 2):
            if output != other and source.may_be(entry):
                shared.setdefault(output, set()).add(other)
                shared.setdefault(other, set()).add(output)
    return shared


def held_elsewhere(sources: Sequence[LineageSource], others: Mapping[str, Lineage]) -> set[str]:
    """The names of `sources` that one of the outputs `others` lists as the same file."""
    return {
        source.name
        for source in sources
        for output, held in others.items()
        if any(entry.may_be(source) for entry in held.sources if entry.name != output)
    }


# Whether the journal shows the file under a name, with this footer, to be new though the
# output named last lists the name (`plan.shown_new`).
ShownNew = Callable[[str, str | None, str], bool]


def nothing_shown(name: str, footer: str | None, output: str) -> bool:
    return False


class PresentFiles:
    """The files of a folder as the outputs beside them see them (see the module's docstring).

    A present file is the one a lineage lists under its name when the footer digests agree, or
    when the lineage recorded none (an output from before digests). Under another footer it
    may still be that file rewritten in place, whose rows the output holds: it stays the
    lineage's (held; the lineage check compares the rows), unless something shows it
    is new: the journal (`shown_new`: the merge that wrote the output deleted the file it
    lists, or that check found none of its rows in the output), or another output's lineage
    recording this very footer (it was merged as a file of its own). Each footer is read at
    most once.
    """

    def __init__(
        self,
        folder: Path,
        names: Collection[str],
        held: Mapping[str, Lineage],
        shown_new: ShownNew = nothing_shown,
    ) -> None:
        self.folder = folder
        self.names = frozenset(names)
        self._held = held
        self._shown_new = shown_new
        self._footers: dict[str, footers.Footer | None] = {}
        self._new: dict[tuple[str, str], bool] = {}  # (output, name): the journal asked once

    def held_by(self, output: str, lineage: Lineage) -> frozenset[str]:
        """The present files that `lineage`, the lineage of `output`, lists. Never `output`
        itself: no file is a copy of itself (one listing its own name was once removed as its
        own copy). An ancestor is held only under the footer recorded: under another, it is
        a new file under a used name, as a file listed nowhere is."""
        listed = {s.name for s in self._listed(output, lineage) if not self._is_new(output, s)}
        copies = {
            a.name
            for a in lineage.ancestors
            if a.name != output
            and a.name in self.names
            and a.footer is not None
            and a.footer == self.digest(a.name)
        }
        return frozenset(listed | copies)

    def held_nearest(self) -> dict[str, frozenset[str]]:
        """`held_by` of each output, less the files held in turn by a present output it
        holds. A restored output and the files it lists are copies of the same rows: proven
        together against an output that merged them all, one took the shared rows and the
        others were found to differ, and each file was claimed by two outputs, for a person:
        all kept for good. Each is proven against the nearest output that holds it instead."""
        holds = {output: self.held_by(output, held) for output, held in self._held.items()}
        return {
            output: frozenset(
                name
                for name in here
                if not any(name in holds.get(other, ()) for other in here - {name})
            )
            for output, here in holds.items()
        }

    def under_another_footer(self, output: str, lineage: Lineage) -> frozenset[str]:
        """Those of `held_by` whose footer is not the one `lineage` records: new, or the
        merged file rewritten in place, and held until their rows tell."""
        return frozenset(
            s.name
            for s in self._listed(output, lineage)
            if s.footer is not None
            and s.footer != self.digest(s.name)
            and not self._is_new(output, s)
        )

    def footer(self, name: str) -> footers.Footer | None:
        """The footer of the present file `name` as this look read it (its identity is that
        version's); None when it has no complete footer, which no merge ever read."""
        if name not in self._footers:
            try:
                self._footers[name] = footers.read(self.folder / name)
            except UNREADABLE:
                self._footers[name] = None
        return self._footers[name]

    def digest(self, name: str) -> str | None:
        footer = self.footer(name)
        return None if footer is None else footer.digest

    def _listed(self, output: str, lineage: Lineage) -> Iterator[LineageSource]:
        return (s for s in lineage.sources if s.name != output and s.name in self.names)

    def _is_new(self, output: str, source: LineageSource) -> bool:
        digest = self.digest(source.name)
        if source.footer is None or source.footer == digest:
            return False
        merged = digest is not None and any(
            entry.name == source.name and entry.footer == digest
            for held in self._held.values()
            for entry in (*held.sources, *held.ancestors)
        )
        key = (output, source.name)
        if key not in self._new:
            self._new[key] = merged or self._shown_new(source.name, digest, output)
        return self._new[key]


def claimed_names(
    folder: Path, names: Collection[str], shown_new: ShownNew = nothing_shown
) -> set[str]:
    """Files whose rows are in the folder twice by the outputs' own account: every present
    file a present output's lineage lists, those outputs, and outputs sharing a source.
    None may be planned into a new merge: that would make the duplicate permanent."""
    held = lineages(folder, names)
    files = PresentFiles(folder, names, held, shown_new)
    found: set[str] = set()
    for output, lineage in held.items():
        held_here = files.held_by(output, lineage)
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


# What comparing rows may raise. OverflowError: a value no Python object holds (a time nested
# in a struct, say) is a doubt, not a traceback out of start-up recovery.
COMPARE_ERRORS = (
    OSError,
    pa.ArrowException,
    ValueError,
    KeyError,
    OverflowError,
    ConsolidatorError,
)


def cannot_compare(output: Path, files: Sequence[Path], exc: Exception) -> dict[str, str]:
    return {f.name: f"cannot compare {f.name} with {output.name}: {exc}" for f in files}


def output_reads_back(
    path: Path, held: Lineage, *, decode: bool = True, should_stop: StopCheck | None = None
) -> str | None:
    """None when every row group of `path` decodes and the rows add up; else why not. Without
    `decode`, only the footer's count is held against the lineage. `should_stop`: as for
    `containment.rows_not_found`."""
    try:
        parquet, _footer = reading.open_file(path)
        with parquet:
            listed = parquet.metadata.num_rows
            batches = containment.stoppable(_batches(parquet), should_stop)
            rows = sum(b.num_rows for b in batches) if decode else listed
    except (*UNREADABLE, SourceChangedError) as exc:
        return f"output does not read back: {exc}"
    total = sum(s.rows for s in held.sources)
    if not rows == listed == held.rows == total:
        return f"output has {rows} rows (footer {listed}), its lineage lists {held.rows} ({total})"
    return None


def unproven(
    output: Path,
    held: Lineage,
    sources: Sequence[Path],
    *,
    compare_rows: bool = True,
    should_stop: StopCheck | None = None,
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
            footer = footers.read(source)
            rows, listed = footer.rows, held.rows_of(source.name, footer.digest)
            why = misfit(footer.schema, target)
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
        missing = containment.rows_not_found(output, counted, should_stop=should_stop)
    except COMPARE_ERRORS as exc:
        return cannot_compare(output, sources, exc)
    for name, rows in missing.items():
        problems[name] = f"{name} differs from its rows in {output.name} ({rows} rows not found)"
    return problems


def share_rows(
    output: Path, files: Sequence[Path], should_stop: StopCheck | None = None
) -> dict[str, str]:
    """Why each of `files`, which `output`'s lineage lists by name under other footers, is not
    shown to be new; none in the answer: no row of any of them is among the output's.

    All or none: `containment` hands each output row to the first file holding it, so a file
    counted as sharing nothing may share a row with another file that took it. Only when no
    file took any row does no file share one. Labels the output lacks are left out of the
    comparison (a new monitor run often brings new ones): a file rewritten in place with one
    more label still shares every row, and one with other rows shares none.
    """
    try:
        missing = containment.rows_not_found(
            output, files, drop_labels=True, should_stop=should_stop
        )
        rows = {path.name: pq.read_metadata(path).num_rows for path in files}
    except COMPARE_ERRORS as exc:
        return cannot_compare(output, files, exc)
    shared = {name: count - missing[name] for name, count in rows.items()}
    if not any(shared.values()):
        return {}
    return {
        name: f"{output.name} lists {name} under another footer and holds {count} of its"
        f" {rows[name]} rows: the merged file, changed? ({sum(shared.values())} rows shared by"
        f" {', '.join(sorted(n for n, c in shared.items() if c))})"
        for name, count in shared.items()
    }


def _batches(parquet: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
    """Small batches, without threads: only their count is wanted (every page decoded), and
    65,536-row batches of an output took 25 MB at start-up."""
    return reading.batches(parquet, containment.BATCH_ROWS, use_threads=False)
