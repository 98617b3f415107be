"""Progress of `run --once` and `recover`: click's bar on a terminal, plain log lines elsewhere.

Part of the command line (it draws with click), kept out of `cli.py` so the commands stay thin.
On a terminal the bar is drawn on stderr and log lines are printed above it: `TerminalBar` is
also the log stream, and clears the bar's line before each log line and redraws it after.
Anywhere else (a pipe, a file, a container log) each step is one `progress` log event, so a
machine reading the log never sees a carriage return.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

import click

from .logs import Stream, log_event
from .observe import Observer

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from .journal import Journal
    from .recovery import RecoveryAction
    from .service import PassReport

log = logging.getLogger(__name__)

CLEAR_LINE = "\r\033[K"


class ProgressLog(Observer):
    """One `progress` event per partition visited or merge recovered, with done and total."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0

    def _step(self, task: str, **fields: Any) -> None:
        self.done += 1
        log_event(log, "progress", task=task, done=self.done, total=self.total, **fields)

    def pass_started(self, partitions: Sequence[str]) -> None:
        self.done, self.total = 0, len(partitions)

    def partition_done(self, partition: str) -> None:
        self._step("consolidate", partition=partition)

    def recovery_started(self, merges: int) -> None:
        self.done, self.total = 0, merges

    def observe_recovery(self, action: RecoveryAction) -> None:
        self._step(
            "recover",
            merge_id=action.merge_id,
            partition=action.partition,
            output=action.output,
            result=action.result,
        )


class TerminalBar(Observer):
    """click's progress bar; as the log stream, it keeps log lines from tearing it."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self._bar: ProgressBar[int] | None = None
        self._item = ""

    # -- the bar --------------------------------------------------------------------------

    def _open(self, total: int, label: str) -> None:
        self.close()
        if total == 0:
            return
        self._item = ""
        self._bar = click.progressbar(
            length=total,
            label=label,
            file=self.file,
            show_pos=True,
            item_show_func=lambda _: self._item,
        )
        self._bar.__enter__()

    def _advance(self, item: str) -> None:
        if self._bar is None:
            return
        self._item = item
        self._bar.update(1)
        if self._bar.pos >= (self._bar.length or 0):
            self.close()

    def close(self) -> None:
        """Finish the bar (a newline after it); idempotent, so the CLI can call it on exit."""
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.__exit__(None, None, None)

    # -- observer hooks -------------------------------------------------------------------

    def pass_started(self, partitions: Sequence[str]) -> None:
        self._open(len(partitions), "consolidating")

    def partition_done(self, partition: str) -> None:
        self._advance(partition)

    def observe_pass(self, report: PassReport | None, duration_s: float, journal: Journal) -> None:
        self.close()

    def recovery_started(self, merges: int) -> None:
        self._open(merges, "recovering")

    def observe_recovery(self, action: RecoveryAction) -> None:
        self._advance(f"merge {action.merge_id} {action.result}")

    # -- the log stream -------------------------------------------------------------------

    def write(self, text: str) -> int:
        if self._bar is None:
            return self.file.write(text)
        written = self.file.write(CLEAR_LINE + text)
        self.file.write("\r" + self._bar.format_progress_line())
        self.file.flush()
        return written

    def flush(self) -> None:
        self.file.flush()


@contextmanager
def shown(file: TextIO) -> Iterator[tuple[Observer, Stream]]:
    """The progress observer for `file` and the stream log lines must go to while it is used."""
    if not file.isatty():
        yield ProgressLog(), file
        return
    bar = TerminalBar(file)
    try:
        yield bar, bar
    finally:
        bar.close()
