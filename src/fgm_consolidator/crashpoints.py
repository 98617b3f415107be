"""Named points where a test can make the process SIGKILL itself.

`FGM_CRASH_AT=<point>` or `<point>#<n>` (the n-th time the point is reached, from 1) arms one
point; `*#<n>` arms the n-th point reached, whichever it is, so a harness can kill a run it has
not enumerated (a recovery of an unknown state). The kill is a real SIGKILL: no finally block,
no atexit, no flush runs, exactly as an OOM kill or `kill -9` would leave things.

`FGM_CRASH_COUNT=<file>` appends every point reached to `<file>`, one name a line, written
before the point may kill: a dry run with it tells a harness every point and every occurrence
there is to kill at, without a hard-coded list. Unarmed, a point costs two dict lookups.

The points (each reached just after the step it names has returned):
- `journal:<state>` after each journal commit of a transition, `journal:adopted` after
  recovery adopts an output its lineage proves, `journal:unreadable` after a file is
  recorded unreadable, `journal:migrated` after each schema migration;
- `writer:row-group` after each row group handed to the output;
- `durable:created` after a temp file is created (empty, not synced);
- `durable:fsync-file` after a file's data is synced;
- `durable:linked` between the link to the final name and the unlink of the temp name;
- `durable:renamed` after a rename, before the folder is synced;
- `durable:unlinked` after each unlink (temp name, source, companion, orphan);
- `durable:fsync-dir` after a folder is synced;
- `recovery:<action>` after recovery dealt with one merge (`resumed`, `rolled-back`,
  `needs-a-person`, or `failed` when the disk refused a step and the merge was left as it
  was), `recovery:swept` after the orphans of one folder are gone (or, for the companion of
  a cut publish, published), `recovery:attempt-begun` after a start-up step outside any merge
  (a lineage proof) is journaled as begun.

Inside `unnamed()` no point is reached: the data directory's id, written once by the first
start, uses the durable steps too, and would otherwise shift every number above by one for the
first run of each directory.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV_VAR = "FGM_CRASH_AT"
COUNT_ENV_VAR = "FGM_CRASH_COUNT"
ANY = "*"

_counts: dict[str, int] = {}
_unnamed = 0  # depth of `unnamed()` blocks


@contextmanager
def unnamed() -> Iterator[None]:
    global _unnamed
    _unnamed += 1
    try:
        yield
    finally:
        _unnamed -= 1


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return None
    name, _, nth = spec.partition("#")
    return name, int(nth or 1)


def _record(point: str) -> None:
    """One `write` of one line with O_APPEND: complete even if the process dies right after."""
    path = os.environ.get(COUNT_ENV_VAR)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{point}\n".encode())
    finally:
        os.close(fd)


def reach(point: str) -> None:
    if _unnamed:
        return
    _record(point)
    armed = _armed()
    if armed is None or armed[0] not in (point, ANY):
        return
    _counts[armed[0]] = _counts.get(armed[0], 0) + 1
    if _counts[armed[0]] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def read_reached(path: Path) -> list[str]:
    """The points a run recorded through `FGM_CRASH_COUNT`, in the order it reached them."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def occurrences(reached: list[str]) -> list[str]:
    """Every `<point>#<n>` a run reached, in order: the arm specs that kill at each of them."""
    seen: Counter[str] = Counter()
    specs = []
    for point in reached:
        seen[point] += 1
        specs.append(f"{point}#{seen[point]}")
    return specs
