"""Order audit: one real merge under `strace -f -y`, read back as a list of system calls.

What the kernel was asked to do, in order, must show DESIGN.md's durable sequence: the output
is fsynced, and the journal commits `written`, before it gets its final name; the final name
(and the companion's) is followed by an fsync of the partition folder, and then by a journal
commit (an fsync of the SQLite WAL), before the first source is unlinked; and the unlinks are
followed by one more folder fsync.
File descriptors are matched to paths by `-y`, so no guess is made about which fd is which.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import small_spec

from fgm_consolidator.simulate import generate

STRACE = "/usr/bin/strace"
SYSCALLS = "link,linkat,rename,renameat,renameat2,unlink,unlinkat,fsync,fdatasync"
POD_A = "dt=2025-12-30/identifier=pod-a"
SOURCES = 4

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)")
_FD_PATH = re.compile(r"^-?\d+<(?P<path>[^>]*)>")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Call:
    """One successful call: `fsync` of `path`, `unlink` of `path`, `link` to `path`."""

    kind: str  # "sync", "unlink" or "name" (link or rename: `path` is the new name)
    path: str
    raw: str


def _joined(lines: list[str]) -> list[str]:
    """Stitch `<unfinished ...>` / `<... resumed>` halves (other threads interleave) together."""
    pending: dict[str, str] = {}
    whole = []
    for line in lines:
        pid = line.split(maxsplit=1)[0] if line.strip() else ""
        if line.endswith("<unfinished ...>"):
            pending[pid] = line.removesuffix("<unfinished ...>")
        elif "resumed>" in line and pid in pending:
            whole.append(pending.pop(pid) + line.split("resumed>", 1)[1])
        else:
            whole.append(line)
    return whole


def parse_trace(text: str, cwd: Path) -> list[Call]:
    calls = []
    for line in _joined(text.splitlines()):
        match = _LINE.match(line)
        if match is None or int(match["ret"]) < 0:
            continue
        call, args = match["call"], match["args"]
        if call in ("fsync", "fdatasync"):
            fd = _FD_PATH.match(args)
            assert fd is not None, f"strace -y did not name the fd: {line}"
            calls.append(Call("sync", fd["path"], line))
            continue
        names = [os.path.normpath(cwd / s) for s in _STRING.findall(args)]
        if call.startswith("unlink"):
            calls.append(Call("unlink", names[0], line))
        elif call.startswith(("link", "rename")):
            calls.append(Call("name", names[-1], line))
    return calls


def audit(calls: list[Call], folder: str) -> list[str]:
    """Every way the trace breaks the durable sequence of the merge in `folder`."""
    problems = []
    names = [i for i, c in enumerate(calls) if c.kind == "name" and c.path.startswith(folder)]
    sources = [
        i
        for i, c in enumerate(calls)
        if c.kind == "unlink" and Path(c.path).name.startswith("metrics-")
    ]
    if not names or len(sources) != 2 * SOURCES:
        return [f"no merge in the trace: {len(names)} names given, {len(sources)} source unlinks"]
    first_unlink, last_name = sources[0], names[-1]
    output = next(calls[i].path for i in names if calls[i].path.endswith(".parquet"))
    before_naming = calls[: names[0]]
    if not any(c.kind == "sync" and c.path == output + ".tmp" for c in before_naming):
        problems.append(f"{output}: named before its data was fsynced")
    if not any(c.kind == "sync" and c.path.endswith("-wal") for c in before_naming[-2:]):
        problems.append(f"{output}: named without a journal commit (`written`) just before")
    if last_name > first_unlink:
        problems.append(f"a source was unlinked before {calls[last_name].path} was named")
    between = calls[last_name:first_unlink]
    folder_sync = next(
        (i for i, c in enumerate(between) if c.kind == "sync" and c.path == folder), None
    )
    if folder_sync is None:
        problems.append(f"{calls[first_unlink].path} unlinked before {folder} was fsynced")
    elif not any(c.kind == "sync" and c.path.endswith("-wal") for c in between[folder_sync:]):
        problems.append("sources unlinked before the journal committed `renamed`")
    if not any(c.kind == "sync" and c.path == folder for c in calls[sources[-1] :]):
        problems.append(f"{folder} not fsynced after the sources were unlinked")
    return problems


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Call], str]:
    if not os.access(STRACE, os.X_OK):
        pytest.skip(f"{STRACE} is not installed")
    probe = subprocess.run(
        [STRACE, "-f", "-o", os.devnull, "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        reason = f"ptrace is not permitted here: {probe.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("audit")
    data_dir = root / "data"
    data_dir.mkdir()
    generate(data_dir, small_spec(rotations=SOURCES))
    out = root / "trace.txt"
    result = subprocess.run(
        [STRACE, "-f", "-y", "-qq", "-o", str(out), "-e", f"trace={SYSCALLS}",
         sys.executable, "-m", "fgm_consolidator", "run", "--once", "--data-dir", "data",
         "--min-age", "0", "--min-files", "2"],
        cwd=root, capture_output=True, text=True, env={**os.environ, "FGM_CRASH_AT": ""},
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(data_dir / POD_A))[0].startswith("consolidated-")
    folder = str((data_dir / POD_A).resolve())
    return parse_trace(out.read_text(), root.resolve()), folder


def test_no_source_is_unlinked_before_the_output_name_is_durable(
    trace: tuple[list[Call], str],
) -> None:
    calls, folder = trace
    assert audit(calls, folder) == []


def test_the_audit_can_fail(trace: tuple[list[Call], str]) -> None:
    """The same trace with the folder fsync after the renames taken out, as if publish had
    skipped it; and with the sources unlinked first."""
    calls, folder = trace
    last_name = max(i for i, c in enumerate(calls) if c.kind == "name")
    folder_sync = next(
        i for i, c in enumerate(calls) if i > last_name and c.kind == "sync" and c.path == folder
    )
    without_sync = calls[:folder_sync] + calls[folder_sync + 1 :]
    assert any("unlinked before" in p and "fsynced" in p for p in audit(without_sync, folder))
    unlinks = [c for c in calls if c.kind == "unlink" and "metrics-" in c.path]
    reordered = unlinks + [c for c in calls if c not in unlinks]
    assert any("before" in p and "was named" in p for p in audit(reordered, folder))
