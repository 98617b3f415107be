"""Bounded exponential backoff for whatever keeps failing: a partition, or the whole pass.

A full disk, a failing device or a folder we may not write does not go away between two passes;
retrying at every interval would rewrite (and delete) a whole output each time and fill the log
with the same error. After `n` consecutive failures a key waits `interval * 2**(n-1)`, capped,
before it is tried again; the first success resets it and is logged, so an operator sees both
the start and the end of an outage. Times are monotonic: a wall-clock jump changes nothing.
The one wait that outlives a process (`Hold`) is counted in the journal's wall-clock time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .logs import log_event

log = logging.getLogger(__name__)

# The longest wait is this many intervals, but never more than MAX_WAIT_S (nor less than one
# interval): with the default 300 s interval a failing partition is retried at least hourly.
MAX_DOUBLINGS = 5
MAX_WAIT_S = 3600.0
DEATHS_BEFORE_HOLD = 2
DEFAULT_INTERVAL_S = 300.0  # `run --check-interval`'s default; the interval of a hold outside it


def cap_for(interval_s: float) -> float:
    return max(interval_s, min(interval_s * float(2**MAX_DOUBLINGS), MAX_WAIT_S))


def wait_after(failures: int, interval_s: float) -> float:
    return min(interval_s * float(2 ** max(failures - 1, 0)), cap_for(interval_s))


@dataclass(frozen=True)
class Hold:
    """A partition whose latest merges died with their process, and when it may be tried again.

    A merge that kills its process (out of memory on an input, a crash in a decoder) leaves no
    failure for the process to count: the next one starts afresh, plans the same merge first
    and dies again, and the partitions after it are never reached. The journal does remember
    (`Journal.deaths`): from the second death in a row the partition waits as a failing one
    would, counted from the latest death. One death is what a deploy's SIGKILL or a power cut
    leaves, and costs no wait.
    """

    deaths: int
    last_death: datetime
    until: datetime

    def active(self, now: datetime) -> bool:
        """A clock set back before the latest death ends the wait rather than stretch it."""
        return self.last_death <= now < self.until


def hold_for(deaths: int, last_death: str | None, interval_s: float) -> Hold | None:
    """The hold for `deaths` in a row, the latest at `last_death` (ISO 8601), if any."""
    if deaths < DEATHS_BEFORE_HOLD or last_death is None:
        return None
    at = datetime.fromisoformat(last_death)
    wait = wait_after(deaths - DEATHS_BEFORE_HOLD + 1, interval_s)
    return Hold(deaths, at, at + timedelta(seconds=wait))


@dataclass
class Backoff:
    interval_s: float
    failures: dict[str, int] = field(default_factory=dict)
    due_at: dict[str, float] = field(default_factory=dict)

    def delay(self, key: str) -> float:
        """The wait after the failures recorded so far (one interval when there are none)."""
        return wait_after(self.failures.get(key, 0), self.interval_s)

    def due(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now >= self.due_at.get(key, float("-inf"))

    def failed(self, key: str, error: object, now: float | None = None) -> float:
        """Record one more failure; returns the seconds to wait before `key` is tried again."""
        now = time.monotonic() if now is None else now
        self.failures[key] = self.failures.get(key, 0) + 1
        wait = self.delay(key)
        self.due_at[key] = now + wait
        log_event(
            log,
            "backing-off",
            logging.WARNING,
            key=key,
            failures=self.failures[key],
            retry_in_s=round(wait, 3),
            error=error,
        )
        return wait

    def succeeded(self, key: str) -> None:
        count = self.failures.pop(key, 0)
        self.due_at.pop(key, None)
        if count:
            log_event(log, "recovered", key=key, failures=count)
