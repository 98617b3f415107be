"""Group a partition's eligible files into merges: a pure function from a scan to a plan.

Rules, in the order they cut a group:
- windows: an output never spans more than `max_span` seconds of source stamps, and windows
  are aligned to multiples of `max_span` (hours by default), so a full window is never
  rewritten again and a closed day converges to one file per window;
- size: the sum of the sources stays under `max_output_bytes`;
- schema: only sources that `schemas.unify` accepts share an output.
Groups keep time order and cover contiguous runs of eligible files: a group never spans a data
file it cannot take now (young, unreadable, held), because once that file can be merged, its
stamp inside the group's range would give the merge with this output the output's own name,
and that merge would be skipped on every pass. A partition is worked once it has `min_files`
eligible `metrics-*` files, or once its day is over (then every group of two or more files is
merged, so the tail of a day is not left behind).

`plan_one` is the one look at a partition that everything shares: it gathers what the plan
must respect (the journal's unreadable and held files, the outputs' lineage), scans, and plans.
A pass acts on it; `run --dry-run` and `status` only report it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from . import durable, lineage
from .errors import SchemaConflictError
from .journal import Deletion, Journal, UnreadableRecord
from .layout import companion_name, format_consolidated, parse_data_file, partition_day
from .scan import PartitionScan, SourceFile, scan_partition
from .schemas import Era, era_of, unify

MB = 1_000_000


@dataclass(frozen=True)
class Policy:
    """What the operator chose; journaled with every merge it plans."""

    min_files: int = 10
    min_age_s: float = 300.0
    max_output_bytes: int = 500 * MB
    max_span_s: int = 3600
    compression_level: int = 3
    row_group_bytes: int = 4 * MB

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class MergePlan:
    partition: str
    output: str
    sources: tuple[SourceFile, ...]
    schema: pa.Schema

    @property
    def era(self) -> Era:
        return era_of(self.schema)

    @property
    def bytes_in(self) -> int:
        return sum(s.identity.size for s in self.sources)

    @property
    def rows_in(self) -> int:
        return sum(s.rows for s in self.sources)


@dataclass(frozen=True)
class Skipped:
    """Files old enough to merge that this pass leaves as they are, and why: a group whose
    output name is taken (invariant 5), a monitor's file kept apart by its schema, with no
    neighbour in its window to merge with, or one whose rows an output holds already
    (`merged_before`), which only a person may remove."""

    partition: str
    output: str | None  # the group's output; None for a file kept apart or held
    sources: tuple[str, ...]
    reason: str
    needs_person: bool = False


def _name_taken(partition: str, output: str, sources: tuple[str, ...], taken: str) -> Skipped:
    """`taken`: the output's name or its companion's, the file already there."""
    return Skipped(partition, output, sources, f"{taken} already exists; nothing is overwritten")


class Group(NamedTuple):
    """Sources that share an output, their output's schema, and the conflict that kept the
    next eligible file out (a schema's, or a name's), if that is what ended the group."""

    sources: list[SourceFile]
    schema: pa.Schema
    refused: str | None = None


def _window(source: SourceFile, span_s: int) -> int:
    return int(source.file.start.timestamp()) // span_s


def _output_range(group: Sequence[SourceFile], candidate: SourceFile) -> tuple[datetime, datetime]:
    """The output's range, `candidate` taken in: the group's earliest start to its latest end,
    not the candidate's end, since a `consolidated-*` file we did not write may span hours or
    cover its neighbours' stamps."""
    return group[0].file.start, max(candidate.file.end, *(s.file.end for s in group))


def _fits(group: Sequence[SourceFile], candidate: SourceFile, policy: Policy) -> bool:
    start, end = _output_range(group, candidate)
    size = sum(s.identity.size for s in group) + candidate.identity.size
    return (
        _window(group[0], policy.max_span_s) == _window(candidate, policy.max_span_s)
        and (end - start).total_seconds() <= policy.max_span_s
        and size <= policy.max_output_bytes
    )


def _range_taken(group: Sequence[SourceFile], candidate: SourceFile) -> str | None:
    """The file of the group, `candidate` taken in, whose range the output's would be: it
    would be named like that file, so skipped on every pass and its other files never merged.
    After the clock steps back, a new file's stamp can fall inside an output's range."""
    start, end = _output_range(group, candidate)
    same = (s for s in (*group, candidate) if (s.file.start, s.file.end) == (start, end))
    return next((s.name for s in same), None)


def _barrier_between(
    previous: SourceFile, candidate: SourceFile, barriers: Sequence[datetime]
) -> bool:
    return any(previous.file.start < stamp < candidate.file.start for stamp in barriers)


def group_sources(
    eligible: Sequence[SourceFile], policy: Policy, barriers: Sequence[datetime] = ()
) -> list[Group]:
    """Greedy, in time order: a file joins the open group unless a rule above says no.

    `barriers` are the start stamps of the partition's data files that are not eligible.
    """
    groups: list[Group] = []
    current: list[SourceFile] = []
    schema: pa.Schema | None = None
    for source in eligible:
        refused = None
        if (
            current
            and schema is not None
            and _fits(current, source, policy)
            and not _barrier_between(current[-1], source, barriers)
        ):
            taken = _range_taken(current, source)
            if taken is not None:
                refused = (
                    f"merged with {taken}, whose range holds its stamp (the clock stepped"
                    " back?), it would give the output that file's own name"
                )
            else:
                try:
                    schema = unify([schema, source.schema])
                    current.append(source)
                    continue
                except SchemaConflictError as exc:
                    refused = f"its schema keeps it from the files beside it: {exc.reason}"
        if current and schema is not None:
            groups.append(Group(current, schema, refused))
        current, schema = [source], unify([source.schema])
    if current and schema is not None:
        groups.append(Group(current, schema))
    return groups


def _kept_apart(partition: str, groups: Sequence[Group]) -> list[Skipped]:
    """Each monitor's file alone in its group because a conflict cut it from the files beside
    it: it is never merged, and nothing said why (an extra column, a type changed, a file of
    the other era among this one's; a stamp inside an output's range). A lone output is not
    reported: it is complete."""
    found = []
    for position, group in enumerate(groups):
        [source, *others] = group.sources
        before = groups[position - 1].refused if position else None
        why = before or group.refused
        if not others and why is not None and source.file.kind == "metrics":
            found.append(Skipped(partition, None, (source.name,), why))
    return found


def _barriers(scan: PartitionScan) -> list[datetime]:
    """Start stamps of the data files in the folder that this pass leaves alone."""
    eligible = {s.name for s in scan.eligible}
    return [
        parsed.start
        for name in scan.names
        if name not in eligible and (parsed := parse_data_file(name)) is not None
    ]


def is_day_over(partition: str, today: date) -> bool:
    day = partition_day(partition)
    if day is None:  # iter_partitions yields no such key
        raise ValueError(f"{partition!r} is not a partition key")
    return day < today


def waiting_metrics(scan: PartitionScan) -> list[SourceFile]:
    """The eligible `metrics-*` files: what `min_files` counts and a backlog reports. Outputs
    are eligible too (a window is merged again as it fills) but are no work left undone: a
    day that converged to one output per window must not look like a backlog."""
    return [s for s in scan.eligible if s.file.kind == "metrics"]


def plan_partition(
    scan: PartitionScan, policy: Policy, today: date
) -> tuple[list[MergePlan], list[Skipped]]:
    waiting = len(waiting_metrics(scan))
    closed = is_day_over(scan.partition, today) and scan.young == 0
    if waiting < policy.min_files and not closed:
        return [], []
    plans: list[MergePlan] = []
    groups = group_sources(scan.eligible, policy, _barriers(scan))
    skipped = _kept_apart(scan.partition, groups)
    taken = set(scan.names)
    for sources, schema, _refused in groups:
        if len(sources) < 2:
            continue
        start = min(s.file.start for s in sources)
        end = max(s.file.end for s in sources)
        output = format_consolidated(start, end)
        clash = next((name for name in (output, companion_name(output)) if name in taken), None)
        if clash is not None:
            names = tuple(s.name for s in sources)
            skipped.append(_name_taken(scan.partition, output, names, clash))
            continue
        taken.add(output)
        plans.append(MergePlan(scan.partition, output, tuple(sources), schema))
    return plans, skipped


def shown_new(journal: Journal | None, partition: str) -> lineage.ShownNew:
    """Whether the journal shows a file of `partition` to be new though an output lists its
    name (`lineage.PresentFiles`): the merge that wrote the output deleted that name, or
    lineage recovery found none of this version's rows in the output. No journal, nothing."""
    if journal is None:
        return lineage.nothing_shown

    def new(name: str, footer: str | None, output: str) -> bool:
        # asked only of a name an output lists under another footer, which is rare
        if any(d.output == output for d in journal.deletions(partition, [name])):
            return True
        return footer is not None and journal.released(partition, name, footer, output)

    return new


# Generations of outputs followed from a deleted source to the output that holds its rows: an
# hour's window is merged again a few times as it fills, never this often.
MAX_GENERATIONS = 64


def merged_before(journal: Journal | None, scan: PartitionScan) -> list[Skipped]:
    """The eligible monitor's files that a finished merge deleted and that are here again (a
    backup restored over the data directory), whose rows an output here holds by the
    journal's account: merged again, they would be there twice for good. An output that
    lists the file, as a source or an ancestor, proves and removes it (the lineage check); one
    written before ancestors were recorded lists only the output it merged, so such a file is
    held here for a person.

    A file is the deleted one when its name, size, mtime and rows are: a restore (`cp -a`)
    keeps the mtime to the nanosecond, and a new file under a reused name (the monitor's
    clock stepped back) can match in all but that: its rows are in no other file, and held,
    a person would be told to delete them. A file whose rows no output here holds is left
    to be merged."""
    eligible = {s.name: s for s in scan.eligible if s.file.kind == "metrics"}
    if journal is None or not eligible:
        return []
    held = []
    for deletion in journal.deletions(scan.partition, eligible):
        source = eligible.get(deletion.name)
        if source is None or not _is_deleted(source, deletion):
            continue
        holder = _holder_of(journal, scan, deletion)
        if holder is not None:
            del eligible[deletion.name]
            reason = (
                f"merge {deletion.merge_id} merged it into {deletion.output} and deleted it, and"
                " a file of its name, size, mtime and rows is here again (a restored backup?);"
                f" by the journal its rows are in {holder}: check, then remove it (merged again,"
                " its rows would be there twice); until then no merge takes it"
            )
            held.append(Skipped(scan.partition, None, (deletion.name,), reason, True))
    return held


def _is_deleted(source: SourceFile, deletion: Deletion) -> bool:
    size, mtime_ns = source.identity.size, source.identity.mtime_ns
    return (size, mtime_ns, source.rows) == (deletion.size, deletion.mtime_ns, deletion.rows)


def _holder_of(journal: Journal, scan: PartitionScan, deletion: Deletion) -> str | None:
    """The output here that holds the rows `deletion` took away, following each output to the
    finished merge that took it in turn. None when the first output is here (it lists the
    file, and the lineage check settles it) or the trail ends with no output here (the file
    may then hold the only copy of its rows)."""
    step = deletion
    for _generation in range(MAX_GENERATIONS):
        if step.output in scan.names:
            if step is deletion:
                return None
            # the one that merge wrote, not another output under a reused name
            here = durable.optional_identity(scan.folder / step.output)
            return step.output if here is not None and here.size == step.output_bytes else None
        if step.output_bytes is None:
            return None
        taken = [
            later
            for later in journal.deletions(scan.partition, [step.output], after_merge=step.merge_id)
            if later.size == step.output_bytes
        ]
        if not taken:
            return None
        step = taken[0]
    return None


def plan_one(
    data_dir: Path, partition: str, policy: Policy, journal: Journal | None, now: float
) -> tuple[PartitionScan, list[MergePlan], list[Skipped]]:
    """Scan and plan one partition: the one look at a partition that a pass acts on, and that
    `run --dry-run` and `status` report."""
    known: list[UnreadableRecord] = []
    held: set[str] = set()
    if journal is not None:
        known = journal.unreadable(partition)
        held = journal.held_names(partition)
    folder = data_dir / partition
    try:
        new = shown_new(journal, partition)
        held |= lineage.claimed_names(folder, lineage.list_names(folder), new)
        scan = scan_partition(
            data_dir,
            partition,
            min_age_s=policy.min_age_s,
            now=now,
            known_unreadable=known,
            held=held,
        )
    except FileNotFoundError:
        if os.path.lexists(folder):
            raise
        # Removed since the walk listed it (a pod's folder cleaned up): an empty partition,
        # not a failure that fails the pass and backs off a name that no longer exists.
        return PartitionScan(partition, folder, (), (), 0, frozenset()), [], []
    restored = merged_before(journal, scan)
    if restored:
        names = {skip.sources[0] for skip in restored}
        eligible = tuple(s for s in scan.eligible if s.name not in names)
        scan = replace(scan, eligible=eligible, held=scan.held | names)
    today = datetime.fromtimestamp(now, UTC).date()
    plans, skipped = plan_partition(scan, policy, today)
    return scan, plans, skipped + restored
