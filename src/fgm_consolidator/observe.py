"""What the service tells its listeners while it works: metrics and progress bars.

The service calls these hooks at fixed points and never asks who listens. The base class does
nothing, so the service always holds an observer (a no-op one when metrics and progress are
off) and a listener overrides only the hooks it needs. A hook must not raise: it runs between
the steps of a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the service imports this module, not the other way round
    from .journal import Journal
    from .merge import MergeOutcome
    from .recovery import RecoveryAction
    from .service import PassReport


class Observer:
    def pass_started(self, partitions: Sequence[str]) -> None:
        """A pass is about to visit these partitions, in this order."""

    def partition_done(self, partition: str) -> None:
        """Every merge of `partition` planned by this pass has ended (or the pass is stopping)."""

    def observe_merge(self, outcome: MergeOutcome) -> None:
        """A merge ended: published, rolled back or left for a person."""

    def observe_pass(self, report: PassReport | None, duration_s: float, journal: Journal) -> None:
        """A pass ended; `report` is None when the pass itself failed (a journal error)."""

    def recovery_started(self, merges: int) -> None:
        """Recovery is about to resolve this many unfinished merges."""

    def observe_recovery(self, action: RecoveryAction) -> None:
        """Recovery resolved one merge."""


class Observers(Observer):
    """Several observers behind one, called in the order given."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def pass_started(self, partitions: Sequence[str]) -> None:
        for observer in self.observers:
            observer.pass_started(partitions)

    def partition_done(self, partition: str) -> None:
        for observer in self.observers:
            observer.partition_done(partition)

    def observe_merge(self, outcome: MergeOutcome) -> None:
        for observer in self.observers:
            observer.observe_merge(outcome)

    def observe_pass(self, report: PassReport | None, duration_s: float, journal: Journal) -> None:
        for observer in self.observers:
            observer.observe_pass(report, duration_s, journal)

    def recovery_started(self, merges: int) -> None:
        for observer in self.observers:
            observer.recovery_started(merges)

    def observe_recovery(self, action: RecoveryAction) -> None:
        for observer in self.observers:
            observer.observe_recovery(action)
