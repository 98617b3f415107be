"""The container image, checked without a container engine (none runs here or in CI).

hadolint lints the Dockerfile; the facts an operator relies on (non-root fixed UID, exec-form
entrypoint, what goes into the build context) are read from it; and the entrypoint command the
image runs is started as PID 1 of a fresh PID namespace (`unshare`) and stopped with SIGTERM,
as the kubelet stops a container.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_cli, small_spec

from fgm_consolidator.simulate import PodSpec, generate

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
UID = 10001


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def final_stage() -> list[tuple[str, str]]:
    found = instructions()
    last_from = max(i for i, (word, _) in enumerate(found) if word == "FROM")
    return found[last_from:]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_image_runs_as_a_fixed_non_root_uid_from_a_slim_base() -> None:
    stage = final_stage()
    assert stage[0][1].startswith("python:3.11-slim")
    assert ("USER", f"{UID}:{UID}") in stage
    useradd = next(args for word, args in stage if word == "RUN" and "useradd" in args)
    assert f"--uid {UID}" in useradd and f"--gid {UID}" in useradd
    # nothing is built or installed in the final stage: it copies the built virtualenv
    assert not any(w == "RUN" and re.search(r"apt-get|pip |gcc|make", a) for w, a in stage)
    assert any(w == "COPY" and a.startswith("--from=build ") for w, a in stage)


def entrypoint() -> list[str]:
    stage = dict(final_stage())
    return [*json.loads(stage["ENTRYPOINT"]), *json.loads(stage["CMD"])]


def test_the_entrypoint_is_exec_form_and_the_package_script() -> None:
    assert entrypoint() == ["fgm-consolidator", "run"]  # no shell between the kubelet and us


def test_the_build_context_holds_only_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        part.rstrip("/")
        for word, args in instructions()
        if word == "COPY" and not args.startswith("--from")
        for part in args.split()[:-1]
    }
    assert patterns[0] == "**"  # everything is excluded, then only these are let back in
    assert allowed == copied == {"pyproject.toml", "README.md", "journal", "src"}


# -- PID 1 ----------------------------------------------------------------------------------


def _unshare_works() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        return False
    return probe.returncode == 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _signals_as_a_container_runtime_leaves_them() -> None:
    """A suite started in the background passes SIGINT on ignored, and the entrypoint rightly
    keeps an ignored SIGINT ignored; a container's PID 1 starts with every signal default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged PID namespaces (unshare)")
def test_as_pid_1_the_entrypoint_stops_cleanly_on_sigterm(data_dir: Path) -> None:
    """A PID 1 gets only the signals it has a handler for; the kubelet sends SIGTERM."""
    generate(data_dir, small_spec((PodSpec("pod-a"),)))
    command = entrypoint()
    env = {**os.environ, "FGM_DATA_DIR": str(data_dir), "FGM_MIN_AGE": "0", "FGM_CRASH_AT": ""}
    proc = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
         str(BIN / command[0]), *command[1:]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env, preexec_fn=_signals_as_a_container_runtime_leaves_them,
    )  # fmt: skip
    try:
        lines: list[str] = []
        passed = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "event=pass-finished" in line:
                    passed.set()
            passed.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert passed.wait(timeout=60) and proc.poll() is None, "".join(lines)
        (pid,) = _children(proc.pid)
        status = _status(pid)
        assert status["NSpid"].split()[-1] == "1"  # PID 1 in its namespace
        caught = int(status["SigCgt"], 16)
        assert caught & (1 << (signal.SIGTERM - 1)) and caught & (1 << (signal.SIGINT - 1))

        os.kill(pid, signal.SIGTERM)  # from outside the namespace, like the container runtime
        assert proc.wait(timeout=30) == 0, "".join(lines)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert "event=stopped reason=signal" in lines[-1]
    assert sorted(p.name for p in (data_dir / "dt=2025-12-30" / "identifier=pod-a").iterdir()) == [
        "consolidated-20251230T080000Z-20251230T083430Z.containers",
        "consolidated-20251230T080000Z-20251230T083430Z.parquet",
    ]


def test_the_image_environment_configures_the_command(data_dir: Path) -> None:
    """The image sets FGM_DATA_DIR; every other option comes from FGM_* variables too."""
    stage = final_stage()
    env = " ".join(args for word, args in stage if word == "ENV")
    assert "FGM_DATA_DIR=/data" in env
    result = run_cli("run", "--dry-run", env={"FGM_DATA_DIR": str(data_dir)})
    assert (result.returncode, result.stdout) == (
        0,
        "dry run: 0 merges of 0 files planned; nothing was changed\n",
    ), result.stderr
