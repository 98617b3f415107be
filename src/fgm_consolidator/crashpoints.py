"""Named points where a test can make the process SIGKILL itself.

`FGM_CRASH_AT=<point>` or `<point>#<n>` (the n-th time the point is reached, from 1) arms one
point. The kill is a real SIGKILL: no finally block, no atexit, no flush runs, exactly as an
OOM kill or `kill -9` would leave things. Unarmed, a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "FGM_CRASH_AT"

_counts: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return None
    name, _, nth = spec.partition("#")
    return name, int(nth or 1)


def reach(point: str) -> None:
    armed = _armed()
    if armed is None or armed[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
