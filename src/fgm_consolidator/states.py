"""The lifecycle of one merge and the transitions the journal accepts between its states."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from .errors import IllegalTransitionError


class MergeState(StrEnum):
    """Frozen once released: journal rows store these strings."""

    # Journaled with all its sources; nothing on disk has changed.
    PLANNED = "planned"
    # Our `<output>.tmp` may exist, possibly partial.
    WRITING = "writing"
    # A complete, fsynced `.tmp` with the recorded checksum sits beside the sources.
    WRITTEN = "written"
    # The output is durable under its final name; some or all sources remain.
    RENAMED = "renamed"
    # Terminal: the output holds every row, no source remains.
    SOURCES_DELETED = "sources-deleted"
    # Terminal: the sources hold every row, nothing of the merge remains.
    ROLLED_BACK = "rolled-back"
    # Recovery could not prove any step safe; files are left untouched for a person.
    NEEDS_ATTENTION = "needs-attention"


TERMINAL = frozenset({MergeState.SOURCES_DELETED, MergeState.ROLLED_BACK})

ALLOWED: dict[MergeState, frozenset[MergeState]] = {
    MergeState.PLANNED: frozenset({MergeState.WRITING, MergeState.ROLLED_BACK}),
    MergeState.WRITING: frozenset({MergeState.WRITTEN, MergeState.ROLLED_BACK}),
    MergeState.WRITTEN: frozenset(
        {MergeState.RENAMED, MergeState.ROLLED_BACK, MergeState.NEEDS_ATTENTION}
    ),
    MergeState.RENAMED: frozenset(
        {MergeState.SOURCES_DELETED, MergeState.ROLLED_BACK, MergeState.NEEDS_ATTENTION}
    ),
    MergeState.NEEDS_ATTENTION: frozenset(
        {MergeState.RENAMED, MergeState.SOURCES_DELETED, MergeState.ROLLED_BACK}
    ),
    MergeState.SOURCES_DELETED: frozenset(),
    MergeState.ROLLED_BACK: frozenset(),
}


# A merge recovery adopts starts here: an output of ours, found without the journal (lost)
# beside files its lineage proves it holds, is durable under its final name, and the journal
# must say so before any of those files is deleted (DESIGN invariant 3).
ADOPTED_START = MergeState.RENAMED


def check_transition(
    merge_id: int,
    current: MergeState | None,
    target: MergeState,
    journal: Path | None = None,
    *,
    adopted: bool = False,
) -> None:
    """Refuse a step the state machine does not have; the error names the journal, whose
    record of the merge is what a person must read. A merge starts as planned, or (`adopted`)
    as `ADOPTED_START`."""
    if current is None:
        start = ADOPTED_START if adopted else MergeState.PLANNED
        if target is not start:
            raise IllegalTransitionError(
                f"merge {merge_id} must start as {start}, not {target}", journal
            )
        return
    if target not in ALLOWED[current]:
        raise IllegalTransitionError(
            f"merge {merge_id} cannot go from {current} to {target}", journal
        )
