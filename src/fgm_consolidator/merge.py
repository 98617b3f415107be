"""Drive one merge through the durable sequence, journaling each step before its side effect.

planned -> writing -> written -> renamed -> sources-deleted (DESIGN.md). The steps after
`written` are shared with recovery: `finish` is the one path that publishes an output and
deletes its sources, whoever calls it.
"""

from __future__ import annotations

import filecmp
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from . import companions, durable, footers, lineage
from .durable import FileIdentity
from .errors import (
    CompanionError,
    ConsolidatorError,
    MergeAborted,
    NameTakenError,
    OutputCheckError,
    SourceChangedError,
    SourceReadError,
    TempReplacedError,
    Unexpected,
    described,
)
from .journal import MERGE_ACTOR, STOP_ACTOR, Journal, MergeRecord, SourceRecord
from .layout import companion_name, tmp_name
from .logs import context, log_event
from .plan import MergePlan, Policy
from .scan import UnreadableFile
from .states import MergeState
from .writer import WriteOptions, WriteSource, write_merged

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOutcome:
    merge_id: int
    partition: str
    output: str
    state: MergeState
    sources: int
    rows: int
    bytes_in: int
    bytes_out: int | None
    error: str | None = None
    # The failure lies on our side of the disk (no space, EIO, a check of our own output), not
    # in a source: the same merge would fail again right now, so the service backs off.
    retry_later: bool = False
    # Sources (or companions) the merge found unreadable where the scan could not: corrupt
    # pages behind a good footer, a companion that does not decode. Counted with the scan's.
    unreadable: tuple[UnreadableFile, ...] = ()
    # Rolled back because the service was told to stop (SIGTERM past the grace period): no
    # failure, the next start merges the same files.
    stopped: bool = False


class _Ended(NamedTuple):
    """Where `_write_and_finish` left a merge; see MergeOutcome for each field."""

    state: MergeState
    size: int | None
    error: str | None
    retry_later: bool = False
    unreadable: tuple[UnreadableFile, ...] = ()
    stopped: bool = False


def lineage_of(merge_id: int, plan: MergePlan) -> dict[bytes, bytes]:
    """What an output holds, readable without the journal: merge id, each source's name,
    rows and footer digest, and the same of its ancestors."""
    sources = [lineage.LineageSource(s.name, s.rows, s.digest) for s in plan.sources]
    return lineage.encode(merge_id, sources, ancestors_of(plan))


def ancestors_of(plan: MergePlan) -> list[lineage.LineageSource]:
    """The files whose rows reach this output through the outputs of ours it merges, at any
    depth: the sources and ancestors their lineages list. An output merged again lists only
    that output, so a backup restored over the folder brought its files back unrecognised,
    and they were merged a second time: their rows there twice for good, with the journal lost
    or a restore that kept mtimes to the second (`plan.merged_before` needs them exact).
    Their footers survive any copy. A window's files and its earlier outputs at most."""
    found: dict[tuple[str, str | None], lineage.LineageSource] = {}
    for source in plan.sources:
        held = lineage.decode(footers.unpack(source.packed_lineage))
        for entry in () if held is None else (*held.sources, *held.ancestors):
            found.setdefault((entry.name, entry.footer), entry)
    return list(found.values())


def execute(
    journal: Journal,
    data_dir: Path,
    plan: MergePlan,
    policy: Policy,
    *,
    should_abort: Callable[[], bool] = lambda: False,
) -> MergeOutcome:
    merge_id = journal.record_planned(
        partition=plan.partition,
        output=plan.output,
        era=plan.era,
        policy=policy.as_dict(),
        sources=[s.record() for s in plan.sources],
        has_companion=_has_companion(plan),
    )
    with context(merge_id=merge_id, partition=plan.partition, output=plan.output):
        ended = _write_and_finish(journal, data_dir, plan, policy, merge_id, should_abort)
    return MergeOutcome(
        merge_id,
        plan.partition,
        plan.output,
        ended.state,
        len(plan.sources),
        plan.rows_in,
        plan.bytes_in,
        ended.size,
        ended.error,
        ended.retry_later,
        ended.unreadable,
        ended.stopped,
    )


def _has_companion(plan: MergePlan) -> bool:
    return any(s.companion is not None for s in plan.sources)


def _write_and_finish(
    journal: Journal,
    data_dir: Path,
    plan: MergePlan,
    policy: Policy,
    merge_id: int,
    should_abort: Callable[[], bool],
) -> _Ended:
    """From `planned` to a terminal state."""
    folder = data_dir / plan.partition
    journal.transition(merge_id, MergeState.WRITING, actor=MERGE_ACTOR)
    try:
        result = write_merged(
            [WriteSource(folder / s.name, s.identity, s.rows) for s in plan.sources],
            folder / tmp_name(plan.output),
            plan.schema,
            WriteOptions(policy.compression_level, policy.row_group_bytes),
            metadata=lineage_of(merge_id, plan),
            should_abort=should_abort,
        )
        companion_sum = _write_companion_tmp(folder, plan) if _has_companion(plan) else None
        durable.fsync_dir(folder)
        _check_sources(folder, plan)
    except (ConsolidatorError, OSError, pa.ArrowException) as exc:
        # A temp name someone else created is theirs (an instance that got past the lock).
        foreign = Path(exc.filename).name if isinstance(exc, FileExistsError) else None
        actor = STOP_ACTOR if isinstance(exc, MergeAborted) else MERGE_ACTOR
        reason = described(exc, folder / tmp_name(plan.output))
        roll_back(journal, folder, merge_id, plan.output, error=reason, actor=actor, keep=foreign)
        bad: tuple[UnreadableFile, ...] = ()
        if isinstance(exc, SourceReadError):
            bad = _remember_unreadable(journal, folder, plan, exc)
        not_ours = (SourceReadError, SourceChangedError, MergeAborted)
        stopped = isinstance(exc, MergeAborted)
        return _Ended(
            MergeState.ROLLED_BACK, None, reason, not isinstance(exc, not_ours), bad, stopped
        )
    except Exception as exc:
        # A bug, or an input no check foresaw (two once surfaced as a KeyError and a TypeError
        # in the sort). Nothing is published before `written`, so rolling back is as safe here
        # as above; the partition then backs off, and the service goes on with the others.
        unexpected = Unexpected.of(exc)
        log_event(log, "merge-crashed", logging.ERROR, **unexpected.fields)
        roll_back(journal, folder, merge_id, plan.output, error=unexpected.text, actor=MERGE_ACTOR)
        return _Ended(MergeState.ROLLED_BACK, None, unexpected.text, retry_later=True)
    journal.record_written(
        merge_id,
        rows=result.rows,
        size=result.size,
        checksum=result.checksum,
        companion_checksum=companion_sum,
    )
    record = journal.merge(merge_id)
    state, error = finish(journal, folder, record, actor=MERGE_ACTOR, written=result.identity)
    return _Ended(state, result.size, error)


def _check_sources(folder: Path, plan: MergePlan) -> None:
    """Every source still the file we planned, before anything is published: a source gone or
    replaced now means another process is at work here, and publishing would duplicate rows."""
    for source in plan.sources:
        path = folder / source.name
        now = durable.optional_identity(path)
        if now is None:
            raise SourceChangedError("gone before the output was published", path)
        if now != source.identity:
            raise SourceChangedError(
                f"changed before the output was published ({source.identity} -> {now})", path
            )
        companion = folder / companion_name(source.name)
        if durable.optional_identity(companion) != source.companion:
            # The monitor writes a companion after its file: one that came or changed since
            # planning is not in the output's, and would be left behind, beside no file.
            raise SourceChangedError(
                "companion came, went or changed since planning; the next pass merges it",
                companion,
            )


def _write_companion_tmp(folder: Path, plan: MergePlan) -> str | None:
    """The sources' companions' union as the output's companion temp; its sha256, for the
    journal, as the output's (None: nothing to write)."""
    sidecars = [
        companions.read_companion(folder / companion_name(s.name))
        for s in plan.sources
        if s.companion is not None
    ]
    return write_companion_tmp(folder, plan.output, sidecars)


def write_companion_tmp(
    folder: Path, output: str, sidecars: Sequence[companions.ContainerSidecar]
) -> str | None:
    """The union of `sidecars` as `output`'s companion temp, synced and read back; its sha256
    (None: no container to write)."""
    merged = companions.union(sidecars)
    if merged is None:
        return None
    path = folder / tmp_name(companion_name(output))
    data = companions.encode(merged)
    durable.write_new_file(path, data)
    _check_companion(path, data)
    return hashlib.sha256(data).hexdigest()


def _check_companion(path: Path, data: bytes) -> None:
    """Read the companion back, as the output is (DESIGN step 3): a disk that acknowledged
    bytes it never kept once published an empty companion and deleted every source's, so
    their containers vanished from the viewer. Ours to retry: no source is to blame."""
    try:
        with durable.open_regular(path) as handle:
            back = handle.read(len(data) + 1)
    except OSError as exc:
        raise OutputCheckError(f"companion does not read back: {exc}", path) from exc
    if back != data:
        raise OutputCheckError(
            f"companion reads back other bytes than written ({len(back)} of {len(data)})", path
        )


def report_unreadable(journal: Journal, partition: str, bad: UnreadableFile) -> None:
    """Journal a file we could not read and log it, once per version of the file.

    The one path for a footer the scan cannot read and for corrupt pages behind a good footer,
    which only a merge finds: either must be reported and then left alone (invariant 4).
    """
    if journal.record_unreadable(
        partition, bad.name, bad.identity, bad.reason, ctime_ns=bad.ctime_ns
    ):
        log_event(
            log,
            "file-unreadable",
            logging.WARNING,
            partition=partition,
            file=bad.name,
            reason=bad.reason,
        )


def _remember_unreadable(
    journal: Journal, folder: Path, plan: MergePlan, exc: SourceReadError
) -> tuple[UnreadableFile, ...]:
    """Exclude the culprit from later merges until it changes, so it cannot block its partition.

    A companion that fails is recorded itself, and its parquet file waits for the companion to
    change or go (see scan): recorded under the parquet file's version, replacing or deleting a
    torn companion never brought its file back, and the report named the wrong file."""
    culprit = Path(exc.path or "").name
    found = []
    for source in plan.sources:
        if culprit not in (source.name, companion_name(source.name)):
            continue
        try:
            st = os.lstat(folder / culprit)
        except FileNotFoundError:
            # Gone (removed by someone mid-merge): nothing to hold out, and a journal row
            # "unreadable: No such file" would stay for good. The next pass goes without it.
            continue
        if culprit == source.name:
            bad = UnreadableFile(source.name, source.identity, exc.reason, source.ctime_ns)
        else:
            bad = UnreadableFile(culprit, durable.FileIdentity.of(st), exc.reason, st.st_ctime_ns)
        report_unreadable(journal, plan.partition, bad)
        found.append(bad)
    return tuple(found)


def roll_back(
    journal: Journal,
    folder: Path,
    merge_id: int,
    output: str,
    *,
    error: str,
    actor: str,
    keep: str | None = None,
) -> str:
    """Remove our temp files (never a final name, nor `keep`) and mark the merge rolled back;
    the error recorded, which names the folder if it is gone, is returned for the report.

    A partition folder that is gone (a pod's folder cleaned up during the merge, or before
    the restart after a kill) holds nothing of ours any more: raising there left the merge
    unfinished for good, and every recovery failing on it held back every pass."""
    for name in (tmp_name(output), tmp_name(companion_name(output))):
        if name != keep:
            durable.remove(folder / name)
    try:
        durable.fsync_dir(folder)
    except FileNotFoundError:
        if os.path.lexists(folder):
            raise
        error = f"{error}; the folder {folder} is gone"
    journal.transition(merge_id, MergeState.ROLLED_BACK, actor=actor, error=error)
    return error


def finish(
    journal: Journal,
    folder: Path,
    record: MergeRecord,
    *,
    actor: str,
    written: FileIdentity | None = None,
    copies: Mapping[str, FileIdentity] | None = None,
) -> tuple[MergeState, str | None]:
    """From `written` or `renamed` to `sources-deleted`; the caller vouches for the output.

    `written`: the temp file the merge just wrote, which must still be the one its name
    points at when it is published (recovery vouches by checksum instead). `copies`: sources
    recovery proved under another identity (see `delete_sources`); the merge itself stops at
    any changed source (DESIGN step 7)."""
    if record.last_action_state is MergeState.WRITTEN:
        try:
            publish(folder, record.output, written=written)
        except NameTakenError as exc:
            if exc.path != str(folder / record.output) and (folder / record.output).exists():
                raise  # our output already has its final name: a roll back would keep rows twice
            roll_back(journal, folder, record.id, record.output, error=str(exc), actor=actor)
            return MergeState.ROLLED_BACK, str(exc)
        except TempReplacedError as exc:  # nothing published: the name is another's now
            keep = tmp_name(record.output)
            roll_back(
                journal, folder, record.id, record.output, error=str(exc), actor=actor, keep=keep
            )
            return MergeState.ROLLED_BACK, str(exc)
        journal.transition(record.id, MergeState.RENAMED, actor=actor)
    ours = sources_of(folder, record)
    found = rivals(folder, record, ours)
    if found:
        return _yield_to(journal, folder, record, ours, found, actor=actor)
    try:
        delete_sources(folder, record, ours, copies=copies or {})
    except SourceChangedError as exc:
        if record.state is not MergeState.NEEDS_ATTENTION:
            journal.transition(record.id, MergeState.NEEDS_ATTENTION, actor=actor, error=str(exc))
        return MergeState.NEEDS_ATTENTION, str(exc)
    journal.transition(record.id, MergeState.SOURCES_DELETED, actor=actor)
    return MergeState.SOURCES_DELETED, None


def named_sources(record: MergeRecord) -> tuple[lineage.LineageSource, ...]:
    """Our sources by name alone: all a merge whose output is not ours to read can say."""
    return tuple(lineage.LineageSource(s.name, s.rows) for s in record.sources)


def sources_of(folder: Path, record: MergeRecord) -> tuple[lineage.LineageSource, ...]:
    """Our sources as our output, which the caller vouches for, lists them: each with the
    footer it had. By name alone if its lineage does not read."""
    held = lineage.read(folder / record.output)
    if held is None:
        return named_sources(record)
    names = {s.name for s in record.sources}
    return tuple(s for s in held.sources if s.name in names)


def rivals(
    folder: Path, record: MergeRecord, ours: Sequence[lineage.LineageSource]
) -> dict[str, lineage.Lineage]:
    """Other live outputs whose lineage lists one of our sources (`ours`, from `sources_of`):
    checked after our output is durable and before any source goes, so of two merges of the
    same file (two instances that got past the lock) the later one to look always sees the
    earlier one's output. A file under a name an older output lists is no rival's."""
    found = lineage.lineages(folder, lineage.list_names(folder))
    return {
        name: held
        for name, held in found.items()
        if name != record.output and lineage.held_elsewhere(ours, {name: held})
    }


def _yield_to(
    journal: Journal,
    folder: Path,
    record: MergeRecord,
    ours: Sequence[lineage.LineageSource],
    rivals: dict[str, lineage.Lineage],
    *,
    actor: str,
) -> tuple[MergeState, str | None]:
    """Withdraw our output when a rival holds our sources' rows too, if that provably loses
    nothing: each source is intact, or gone and listed by a rival. Otherwise a person decides."""
    listed = lineage.held_elsewhere(ours, rivals)
    names = ", ".join(sorted(rivals))
    why_not = None
    if record.adopted:
        # It may also hold rows of files deleted before its journal was lost, which no
        # source of this record stands for.
        why_not = f"{record.output} was adopted from its lineage"
    for source in record.sources:
        now = durable.optional_identity(folder / source.name)
        intact = source.name in listed if now is None else now == source.identity
        if why_not is None and not intact:
            why_not = f"{source.name} is changed or gone without a rival holding it"
    if why_not is not None:
        error = f"{names} also hold(s) sources of {record.output}, and {why_not}; nothing deleted"
        if record.state is not MergeState.NEEDS_ATTENTION:
            journal.transition(record.id, MergeState.NEEDS_ATTENTION, actor=actor, error=error)
        return MergeState.NEEDS_ATTENTION, error
    durable.remove(folder / record.output)
    if record.has_companion:
        durable.remove(folder / companion_name(record.output))
    durable.fsync_dir(folder)
    error = f"{names} already hold(s) sources of {record.output}; withdrawn, sources kept"
    journal.transition(record.id, MergeState.ROLLED_BACK, actor=actor, error=error)
    return MergeState.ROLLED_BACK, error


def publish(folder: Path, output: str, *, written: FileIdentity | None = None) -> None:
    """Give the output and its companion their final names, then make the names durable.

    Both names are checked before either is taken, so a collision publishes nothing. With
    `written`, the output's temp name must still point at that file. A second instance past
    the lock could remove it (its start-up sweep, its roll back after a name clash); a temp
    found gone was then taken for one renamed before a crash: the companion was published
    alone, the sources deleted, and their rows lost.
    """
    temp = folder / tmp_name(output)
    if written is not None and durable.optional_identity(temp) != written:
        raise TempReplacedError("removed or replaced since it was written; nothing published", temp)
    moves: list[tuple[Path, Path, bool]] = []
    for final in (output, companion_name(output)):
        tmp = folder / tmp_name(final)
        if not tmp.exists():
            continue  # renamed before a crash, or an output without companion
        target = folder / final
        published = target.exists() and _same_file_or_bytes(tmp, target)
        if target.exists() and not published:
            raise NameTakenError("name already exists, refusing to overwrite", target)
        moves.append((tmp, target, published))
    for tmp, target, published in moves:
        if published:
            durable.remove(tmp)  # a crash fell between link and unlink
        else:
            durable.rename_no_replace(tmp, target)
    durable.fsync_dir(folder)


def _same_file_or_bytes(tmp: Path, target: Path) -> bool:
    """The final name already holds the temp file: the same inode (killed between link and
    unlink), or the same bytes on another inode (that state copied without hard links). Taking
    the second for a foreign file would roll back and keep every row twice."""
    return os.path.samefile(tmp, target) or filecmp.cmp(tmp, target, shallow=False)


def _still_ours(path: Path, footer: str | None) -> bool:
    """For a source whose identity matched. The identity alone can match a new file under a
    reused name (inode reused, same size, an mtime equal at a coarse clock's granularity); the
    footer digest cannot. Where it is unknown the identity keeps its word, as before digests:
    a new file was just written, and reads."""
    return footers.digest_matches(path, footer) is not False


def _new_under_its_name(folder: Path, record: MergeRecord, path: Path) -> bool:
    """A file under the name of a source a cut delete sequence may have removed: the monitor,
    its clock stepped back, writes under names merged before, and the few seconds between a
    kill among the deletes and recovery are enough.

    It is a new file if none of its rows is in our output (`lineage.share_rows`); a source
    changed in place shares them, and stays for a person, as does one that does not read (a
    link, EIO). One without a complete footer is new too: ours had one when it was planned, so
    this was begun since (the monitor writes a file for its whole window), and the rows a torn
    copy of ours had are in our output."""
    try:
        digest = footers.digest_now(path)
    except OSError:
        return False
    return digest is None or not lineage.share_rows(folder / record.output, [path])


def delete_sources(
    folder: Path,
    record: MergeRecord,
    ours: Sequence[lineage.LineageSource],
    *,
    copies: Mapping[str, FileIdentity],
) -> None:
    """Re-stat every remaining source and its companion first: one changed file stops all
    deletes. `ours` are the sources as our output's lineage lists them, each with its footer
    digest. `copies`: sources recovery proved to hold only our output's rows under another
    identity, each with the identity it proved (`recovery.proven_copies`), which they must
    still have.

    Each source's companion goes before the source itself. Cut between the two, the other
    order left a companion whose file was gone: with the journal intact, recovery deletes it
    too, but with the journal lost nothing names it any more (the output's lineage lists the
    file, not its companion), and it stayed for good. This order leaves a file without its
    companion instead, which is still a source that either recovery finishes, and whose
    containers the output's companion lists already. And since ours went first, a companion
    beside a new file under a source's name is that file's, whatever its identity says."""
    present: dict[str, FileIdentity] = {}  # each source still here, as it was checked
    reused: set[str] = set()
    reached = True  # every source before this one is gone: deletes go in order, as a prefix
    recorded = {s.name: s.footer for s in ours}
    for source in record.sources:
        path = folder / source.name
        now = durable.optional_identity(path)
        if now is None:
            continue  # deleted before a crash
        if now != source.identity or not _still_ours(path, recorded.get(source.name)):
            if reached and _new_under_its_name(folder, record, path):
                log_event(log, "source-name-reused", merge_id=record.id, file=str(path))
                reused.add(source.name)
                continue  # ours went before a crash; this one is not ours to delete
            if copies.get(source.name) != now:
                raise SourceChangedError(
                    f"changed after merge {record.id} was planned; kept, output "
                    f"{record.output} may duplicate its rows",
                    path,
                )
        kept = _companion_kept(folder, record, source)
        if kept is not None:
            raise _kept_with_its_file(folder, record, source, kept)
        reached = False
        present[source.name] = now
    for source in record.sources:
        if source.name in reused:
            continue
        companion = folder / companion_name(source.name)
        kept = _companion_kept(folder, record, source)  # again: the others' deletes took time
        if kept is None:
            durable.remove(companion)
        elif source.name in present:
            raise _kept_with_its_file(folder, record, source, kept)
        else:  # its file went before a crash; what it alone says is kept, beside no file
            log_event(log, "companion-kept", logging.WARNING, file=str(companion), reason=kept)
        if source.name in present:
            _remove_if_unchanged(folder / source.name, present[source.name], record)
    durable.fsync_dir(folder)


def _kept_with_its_file(
    folder: Path, record: MergeRecord, source: SourceRecord, kept: str
) -> SourceChangedError:
    return SourceChangedError(
        f"{kept}; kept with its file, output {record.output} may duplicate its rows",
        folder / companion_name(source.name),
    )


def _companion_kept(folder: Path, record: MergeRecord, source: SourceRecord) -> str | None:
    """Why a source's companion must stay; None when it may go: absent, the one planned, or
    one whose every container our output's companion lists (copied to a new inode, or written
    again or late by the monitor). Deleted with its file, a companion listing a container the
    output's lacks took that container out of the viewer (FORMATS: an output's companion is
    the union of its sources'); lineage recovery keeps such a file for a person too."""
    path = folder / companion_name(source.name)
    now = durable.optional_identity(path)
    if now is None or now == source.companion:
        return None
    ours = folder / companion_name(record.output)
    try:
        theirs = companions.read_companion(path)
        missing = companions.missing_from(
            companions.read_companion(ours) if record.has_companion else _NO_CONTAINERS, theirs
        )
    except CompanionError as exc:
        return f"companion not the one planned, and it does not read: {exc.reason}"
    if missing:
        return f"companion not the one planned, listing {len(missing)} containers {ours.name} lacks"
    return None


_NO_CONTAINERS = companions.ContainerSidecar(version=1, containers=())


def _remove_if_unchanged(path: Path, identity: FileIdentity, record: MergeRecord) -> None:
    """Unlink `path` unless another file took its name since the check above: checked once for
    all sources, a file put under the last one's name while the first were deleted (a monitor
    whose clock stepped back; a pause) was deleted too, its rows in no output."""
    now = durable.optional_identity(path)
    if now is None:
        return
    if now != identity:
        raise SourceChangedError(
            f"replaced while merge {record.id} deleted its sources; kept, the deletes stopped",
            path,
        )
    durable.remove(path)
