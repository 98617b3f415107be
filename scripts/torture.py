#!/usr/bin/env python3
"""Black-box kill -9 torture: a live monitor keeps rotating files while `fgm-consolidator run`
is killed at random moments and restarted, again and again; at the end the monitor stops, one
quiescent pass settles everything, and the oracle (tests/oracle.py) checks every promise.

    torture.py --kills 1000                 # a long run, seed chosen and printed
    torture.py --kills 50 --seed 7          # reproduce the delays of seed 7

The monitor runs in this process (a thread writing 1 s rotations for each pod): it learns each
file's rows before it finishes the file, so the expected multiset lives here, outside the data
directory. Every `--check-every` kills, while the consolidator is dead, the rows of every
finished file must all be in some live file (invariant 1 at that instant; a row may be there
twice until recovery). Exit status 1 on any violation; the work folder is then kept.

    torture.py --kills 300 --lose-journal-every 3   # and lose the journal now and then

With `--lose-journal-every N`, every Nth kill that leaves a merge unfinished is followed by the
loss of the journal (and its WAL), deleted while the consolidator is dead. Start-up must then
settle every output left beside its sources from the outputs' lineage alone (adopting it into
the new journal) and sweep the temp files no journal knows. The oracle still checks every row
(none lost, none twice); only "every output is accounted for by a finished merge" is waived,
since the merges of a lost journal are gone with it.

    torture.py --kills 300 --step-back-every 90    # and step the monitor's clock back

With `--step-back-every N`, every N rotations the monitor's clock steps back (a minute, or
`--step-back-s`) and it restarts: its new files (other rows) take the names of files merged
since, which outputs' lineages list. Each is merged as a new file; none may be taken for a
copy of the one that had its name (with the journal lost, nothing shows which it is: held for
a person). A name still on disk is skipped, since the real monitor would overwrite that file.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the one copy of the oracle

from oracle import (  # noqa: E402
    RAN_THROUGH,
    ContainerIds,
    RowKey,
    check,
    data_file_paths,
    journal_records,
    row_keys,
)

from fgm_consolidator import companions, simulate  # noqa: E402
from fgm_consolidator.errors import JournalError  # noqa: E402
from fgm_consolidator.journal import MergeRecord  # noqa: E402
from fgm_consolidator.layout import default_journal_path  # noqa: E402
from fgm_consolidator.states import TERMINAL, MergeState  # noqa: E402

ROTATION_S = 1
# The consolidator as the torture runs it: short passes, files eligible three rotations after
# their window closed (the monitor's open file is never old enough), small windows so outputs
# are themselves merged again while new files keep arriving.
RUN_ARGS = (
    "--check-interval", "0.2", "--min-age", "3", "--min-files", "2",
    "--max-span", "120", "--row-group-size", "1", "--log-level", "info",
)  # fmt: skip
SETTLE_ARGS = ("--min-age", "0", "--min-files", "2", "--max-span", "120", "--row-group-size", "1")


class Monitor(threading.Thread):
    """fine-grained-monitor in `live` mode, one rotation a second per pod, rows recorded first."""

    def __init__(
        self,
        data_dir: Path,
        pods: int,
        seed: int,
        map_pods: int = 0,
        step_back: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__(name="monitor", daemon=True)
        self.spec = simulate.SimulationSpec(
            pods=tuple(
                simulate.PodSpec(
                    f"fine-grained-monitor-{i}", era="map" if i >= pods - map_pods else "flat"
                )
                for i in range(pods)
            ),
            start=datetime.now(UTC).replace(microsecond=0),
            rotations=0,
            rotation_seconds=ROTATION_S,
            metrics=10,
            containers=3,
            seed=seed,
        )
        self.data_dir = data_dir
        self.lock = threading.Lock()
        self.expected: Counter[RowKey] = Counter()
        self.finished: set[Path] = set()
        # how many times each name was opened for writing: a name reused while a mid-run check
        # read it is a new file in progress, not a finished one gone bad
        self.writes: Counter[Path] = Counter()
        # partition -> every container id a companion of the monitor listed: the viewer must
        # still list each at the end (FORMATS: an output's companion is its sources' union)
        self.containers: ContainerIds = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.step_back_every, self.step_back_s = step_back
        self.behind_s = 0  # how far the monitor's clock was stepped back, in all
        self.reused = 0  # files written under a name a finished file had before

    def run(self) -> None:
        try:
            rotation = 0
            while not self.stop.is_set():
                self._rotate(rotation)
                rotation += 1
                if self.step_back_every and rotation % self.step_back_every == 0:
                    self._step_back(rotation)
                    rotation = 0
        except BaseException as exc:  # reported as a violation by the harness
            self.error = exc

    def _step_back(self, rotation: int) -> None:
        """The clock steps back by whole rotations and the monitor restarts (new run, other
        rows): its next files take the names of files written `step_back_s` before."""
        start = simulate.rotation_start(self.spec, rotation) - timedelta(seconds=self.step_back_s)
        self.spec = replace(self.spec, start=start, seed=self.spec.seed + 1)
        self.behind_s += self.step_back_s

    def _rotate(self, rotation: int) -> None:
        start = simulate.rotation_start(self.spec, rotation)
        handles = []
        for pod in self.spec.pods:
            path = simulate.rotation_path(self.data_dir, pod.identifier, start)
            if path.exists() or path.with_suffix(".containers").exists():
                continue  # not merged yet: the real monitor would overwrite it, losing rows
            with self.lock:  # written again: unfinished until its new `finish`
                self.reused += path in self.finished
                self.finished.discard(path)
                self.writes[path] += 1
            handles.append(simulate.open_rotation(self.data_dir, self.spec, pod, rotation))
        self.stop.wait(max(0.0, start.timestamp() + self.behind_s + ROTATION_S - time.time()))
        for handle in handles:
            partition = str(handle.path.parent.relative_to(self.data_dir))
            keys = row_keys(handle.table(ROTATION_S), partition)
            with self.lock:  # recorded and finished as one step, for the mid-run check
                self.expected.update(keys)
                written = handle.finish(ROTATION_S)
                self.finished.add(handle.path)
                if written.companion is not None:  # not merged yet: it is younger than min-age
                    listed = companions.read_companion(written.companion).containers
                    ids = self.containers.setdefault(partition, set())
                    ids.update(c.container_id for c in listed)

    def snapshot(self) -> tuple[Counter[RowKey], dict[Path, int]]:
        """The rows of every finished file, and which write of each finished name is done."""
        with self.lock:
            return Counter(self.expected), {path: self.writes[path] for path in self.finished}

    def files_written(self) -> int:
        with self.lock:
            return sum(self.writes.values())

    def rewritten_since(self, path: Path, write: int) -> bool:
        with self.lock:
            return self.writes[path] != write


@dataclass
class Figures:
    seed: int
    kills: int = 0
    kills_in_a_merge: int = 0  # kills that left a merge unfinished in the journal
    mid_run_checks: int = 0
    journals_lost: int = 0
    violations: list[str] = field(default_factory=list)


def rows_now(data_dir: Path, monitor: Monitor, figures: Figures) -> Counter[RowKey]:
    """Rows of the live files; a file the monitor is still writing is skipped, and so is one
    it began to write again under a reused name after the snapshot was taken."""
    _, finished = monitor.snapshot()
    found: Counter[RowKey] = Counter()
    for partition, path in data_file_paths(data_dir):
        try:
            found.update(row_keys(pq.read_table(path), partition))
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as exc:
            done = path in finished and not monitor.rewritten_since(path, finished[path])
            if done or path.name.startswith("consolidated-"):
                figures.violations.append(f"kill {figures.kills}: {path} unreadable: {exc}")
    return found


def check_nothing_lost(data_dir: Path, monitor: Monitor, figures: Figures) -> None:
    expected, _ = monitor.snapshot()
    lost = expected - rows_now(data_dir, monitor, figures)
    figures.mid_run_checks += 1
    if lost:
        figures.violations.append(
            f"after kill {figures.kills}: {sum(lost.values())} rows of finished files in no "
            "live file"
        )


def unfinished_merges(data_dir: Path) -> int:
    try:
        records = journal_records(data_dir)
    except JournalError:
        if journal_is_empty(default_journal_path(data_dir)):
            return 0  # a start killed while it created the journal (after a lost one)
        raise
    return sum(r.state not in TERMINAL for r in records)


def journal_is_empty(path: Path) -> bool:
    """A journal file with no tables yet, which `run` takes for a lost one (and the journal's
    read-only open refuses)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables: int = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    finally:
        connection.close()
    return tables == 0


def consolidator(data_dir: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FGM_CRASH_AT": "", "FGM_CRASH_COUNT": ""}
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "fgm_consolidator", "run", "--data-dir", str(data_dir), *args],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=env,
        )


def kill_loop(
    args: argparse.Namespace, data_dir: Path, log: Path, monitor: Monitor, figures: Figures
) -> None:
    delays = random.Random(args.seed)
    for _ in range(args.kills):
        proc = consolidator(data_dir, log, *RUN_ARGS)
        try:
            code = proc.wait(timeout=delays.uniform(args.min_delay, args.max_delay))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
        else:
            figures.violations.append(f"the consolidator exited on its own (rc={code})")
            return
        figures.kills += 1
        in_a_merge = unfinished_merges(data_dir) > 0
        figures.kills_in_a_merge += in_a_merge
        every = args.lose_journal_every
        if in_a_merge and every and figures.kills_in_a_merge % every == 0:
            lose_journal(data_dir)
            figures.journals_lost += 1
            if figures.journals_lost == args.stop_after_journals_lost:
                return
        if args.check_every and figures.kills % args.check_every == 0:
            check_nothing_lost(data_dir, monitor, figures)
        if figures.kills % 100 == 0:
            done = f"{figures.kills} kills, {len(figures.violations)} violations"
            print(f"... {done}", file=sys.stderr, flush=True)


def logged_lines(log: Path, *parts: str) -> int:
    """Lines of the consolidators' logs holding every one of `parts`."""
    with open(log, encoding="utf-8", errors="replace") as lines:
        return sum(all(part in line for part in parts) for line in lines)


def lose_journal(data_dir: Path) -> None:
    journal = default_journal_path(data_dir)
    for path in journal.parent.glob(journal.name + "*"):  # the database, its WAL and shm
        path.unlink()


def merge_figures(records: list[MergeRecord]) -> dict[str, int]:
    """What the journal says happened to every merge, and who finished it."""

    def by_recovery(record: MergeRecord) -> bool:
        return record.transitions[-1].actor == "recovery"

    return {
        "merges": len(records),
        "finished": sum(r.state is MergeState.SOURCES_DELETED for r in records),
        "resumed_by_recovery": sum(
            r.state is MergeState.SOURCES_DELETED and by_recovery(r) for r in records
        ),
        "rolled_back_by_recovery": sum(
            r.state is MergeState.ROLLED_BACK and by_recovery(r) for r in records
        ),
        "rolled_back_by_merge": sum(
            r.state is MergeState.ROLLED_BACK and not by_recovery(r) for r in records
        ),
        "unfinished": sum(r.state not in TERMINAL for r in records),
        "adopted": sum(r.adopted for r in records),
    }


def torture(args: argparse.Namespace, work: Path) -> Figures:
    data_dir = work / "data"
    data_dir.mkdir()
    log = work / "consolidator.log"
    figures = Figures(args.seed)
    step_back = (args.step_back_every, args.step_back_s)
    monitor = Monitor(data_dir, args.pods, args.seed, args.map_pods, step_back)
    monitor.start()
    try:
        kill_loop(args, data_dir, log, monitor, figures)
    finally:
        monitor.stop.set()
        monitor.join()
    if monitor.error is not None:
        figures.violations.append(f"the monitor failed: {monitor.error!r}")
    settle = consolidator(data_dir, log, "--once", *SETTLE_ARGS)
    # Exit 3 (a merge or files left for a person) is the oracle's to judge by the rows.
    if settle.wait() not in RAN_THROUGH:
        figures.violations.append(f"the quiescent pass exited {settle.returncode}; see {log}")
    expected, _ = monitor.snapshot()
    report = check(
        data_dir,
        expected,
        journal_path=default_journal_path(data_dir),
        journal_lost=figures.journals_lost > 0,
        containers=monitor.containers,
    )
    figures.violations.extend(report.violations)
    records = journal_records(data_dir)
    shown = {
        "seed": figures.seed,
        "kills": figures.kills,
        "kills_in_a_merge": figures.kills_in_a_merge,
        **merge_figures(records),
        "files_written": monitor.files_written(),
        "rows_written": sum(expected.values()),
        "rows_checked": report.rows_checked,
        "live_files": report.files_checked,
        "mid_run_checks": figures.mid_run_checks,
        "journals_lost": figures.journals_lost,
        "names_reused": monitor.reused,
        "reused_among_deletes": logged_lines(log, "event=source-name-reused"),
        "removed_by_lineage": logged_lines(log, "event=lineage-recovery", "action=removed"),
        "kept_by_lineage": logged_lines(log, "event=lineage-recovery", "action=kept"),
        "companions_published": logged_lines(log, "event=orphan-published"),
        "settled_exit": settle.returncode,
        "violations": len(figures.violations),
    }
    print(" ".join(f"{key}={value}" for key, value in shown.items()), flush=True)
    for violation in figures.violations:
        print(f"VIOLATION {violation}", flush=True)
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--pods", type=int, default=12, help="monitor instances (partitions)")
    parser.add_argument(
        "--map-pods", type=int, default=0, help="of those, how many write the lading map era"
    )
    parser.add_argument("--min-delay", type=float, default=0.05, help="seconds before a kill")
    parser.add_argument("--max-delay", type=float, default=2.0)
    parser.add_argument("--check-every", type=int, default=10, help="0: only the final check")
    parser.add_argument(
        "--lose-journal-every",
        type=int,
        default=0,
        help="delete the journal after every Nth kill that leaves a merge unfinished",
    )
    parser.add_argument(
        "--stop-after-journals-lost",
        type=int,
        default=0,
        help="stop killing once this many journals are lost (--kills is then the most): kills"
        " land in a merge at random, and a run meant to lose journals must lose one",
    )
    parser.add_argument(
        "--step-back-every",
        type=int,
        default=0,
        help="every N rotations the monitor's clock steps back (--step-back-s) and it restarts,"
        " writing new files under names used before",
    )
    parser.add_argument(
        "--step-back-s", type=int, default=60, help="whole rotations, so names repeat"
    )
    parser.add_argument("--work-dir", type=Path, help="default: a new temp folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The oracle's in-process recoveries report what they keep; the oracle judges the result.
    logging.getLogger("fgm_consolidator").addHandler(logging.NullHandler())
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fgm-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"seed={args.seed} work={work}", flush=True)
    figures = torture(args, work)
    if figures.violations or args.keep:
        print(f"work folder kept: {work}", flush=True)
    else:
        shutil.rmtree(work)
    return 1 if figures.violations else 0


if __name__ == "__main__":
    sys.exit(main())
