"""Log lines: `--log-format text|json`, one event per line, merge fields on every merge line.

Every line of a real `run --once` is parsed in both formats; the two runs see the same data
in the same folder, so they must tell the same story field for field.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import MIN_AGE_WARNING, PAST, metrics_name, run_cli, small_spec
from test_cli import invoke, parse_kv
from test_faults import failing

from fgm_consolidator import logs
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.service import Settings, StopFlag, consolidation_pass
from fgm_consolidator.simulate import PodSpec, SimulationSpec, generate

POD = "dt=2025-12-30/identifier={}"
MERGE_FIELDS = ("merge_id", "partition", "output")
LEVELS = {"debug", "info", "warning", "error"}


def parse(line: str, fmt: str) -> dict[str, Any]:
    """One log line back into its fields; JSON values as text, as the text format prints them."""
    if fmt == "text":
        return parse_kv(line)
    fields = json.loads(line)
    assert isinstance(fields, dict), line
    return {k: str(v) for k, v in fields.items() if v is not None}


def check_line(fields: dict[str, Any]) -> None:
    assert list(fields)[:3] == ["ts", "level", "event"], fields
    assert datetime.fromisoformat(fields["ts"]).utcoffset() is not None
    assert fields["level"] in LEVELS
    if "merge_id" in fields or "output" in fields:
        assert all(fields.get(k) for k in MERGE_FIELDS), f"a merge line without {MERGE_FIELDS}"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """In-process commands and passes reconfigure the package's logger."""
    logger = logging.getLogger("fgm_consolidator")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def pristine(tmp_path: Path) -> Path:
    """pod-a: a small merge; pod-b: 172,800 rows written as many 1 MB row groups; pod-d: three
    files of a closed day, the middle one corrupt."""
    root = tmp_path / "pristine"
    generate(root, small_spec((PodSpec("pod-a"),)))
    generate(root, SimulationSpec(pods=(PodSpec("pod-b"),), start=PAST, rotations=24, seed=3))
    generate(root, small_spec((PodSpec("pod-d"),), rotations=3))
    (root / POD.format("pod-d") / metrics_name(1)).write_bytes(b"PAR1 not really")
    return root


def run_in(data_dir: Path, pristine: Path, fmt: str) -> list[dict[str, Any]]:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    shutil.copytree(pristine, data_dir)  # copy2: mtimes kept, so the same files are eligible
    result = run_cli(
        "run", "--once", "--data-dir", str(data_dir), "--min-age", "0", "--row-group-size", "1",
        "--log-format", fmt,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    return [parse(line, fmt) for line in result.stderr.splitlines()]


def test_every_line_of_a_run_parses_in_both_formats_and_they_agree(
    data_dir: Path, pristine: Path
) -> None:
    text = run_in(data_dir, pristine, "text")
    row_groups = sum(
        pq.read_metadata(path).num_row_groups
        for path in (data_dir / POD.format("pod-b")).glob("consolidated-*.parquet")
    )
    as_json = run_in(data_dir, pristine, "json")
    for fields in text + as_json:
        check_line(fields)

    assert row_groups >= 5  # and yet no line per row group:
    assert Counter(f["event"] for f in as_json) == {
        MIN_AGE_WARNING: 1,
        "started": 1,
        "merge-finished": 2,
        "file-unreadable": 1,
        "progress": 3,
        "pass-finished": 1,
        "stopped": 1,
    }
    unreadable = next(f for f in as_json if f["event"] == "file-unreadable")
    assert (unreadable["partition"], unreadable["file"]) == (POD.format("pod-d"), metrics_name(1))
    finished = [f for f in as_json if f["event"] == "merge-finished"]
    assert [(f["merge_id"], f["partition"]) for f in finished] == [
        ("1", POD.format("pod-a")),
        ("2", POD.format("pod-b")),
    ]
    # the same events with the same fields, whatever the format; only the clock differs
    without_time = [[{k: v for k, v in f.items() if k not in ("ts", "duration_s")} for f in run]
                    for run in (text, as_json)]  # fmt: skip
    assert without_time[0] == without_time[1]


def test_json_lines_keep_types_and_null(data_dir: Path, pristine: Path) -> None:
    shutil.copytree(pristine, data_dir, dirs_exist_ok=True)
    result = invoke(
        "run", "--once", "--data-dir", data_dir, "--min-age", "0",
        env={"FGM_LOG_FORMAT": "json"},
    )  # fmt: skip
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    finished = next(f for f in lines if f["event"] == "merge-finished")
    assert finished["merge_id"] == 1 and finished["error"] is None
    assert isinstance(finished["rows"], int) and finished["state"] == "sources-deleted"


@pytest.mark.parametrize("command", ["run", "recover"])
def test_a_bad_log_format_exits_2_naming_the_option(data_dir: Path, command: str) -> None:
    result = invoke(command, "--data-dir", data_dir, "--log-format", "xml")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--log-format' (env var: 'FGM_LOG_FORMAT'):"
        " 'xml' is not one of 'text', 'json'."
    )
    assert os.listdir(data_dir) == []


# -- lines from deep inside a merge -------------------------------------------------------


@pytest.fixture
def one_merge(data_dir: Path, populate: Any) -> Any:
    populate(PodSpec("pod-a"), rotations=12)
    settings = Settings(data_dir, default_journal_path(data_dir), Policy(min_files=2, min_age_s=0))
    journal = Journal.open(settings.journal_path)
    yield settings, journal
    journal.close()


def logged_pass(settings: Settings, journal: Journal) -> list[dict[str, Any]]:
    """One pass in-process, its log captured as JSON lines."""
    stream = io.StringIO()
    logs.configure("debug", "json", stream)
    consolidation_pass(journal, settings, StopFlag(grace_s=20))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


EXPECTED = {
    "merge_id": 1,
    "partition": POD.format("pod-a"),
    "output": "consolidated-20251230T080000Z-20251230T081630Z.parquet",
}


def test_a_retried_rename_is_logged_with_the_merge_it_belongs_to(
    one_merge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "link", failing(errno.EBUSY, 2, os.link))
    lines = logged_pass(*one_merge)
    retries = [f for f in lines if f["event"] == "transient-error-retry"]
    assert [(f["level"], f["call"], f["attempt"]) for f in retries] == [
        ("warning", "_link", 1),
        ("warning", "_link", 2),
    ]
    for fields in retries:
        assert {k: fields[k] for k in EXPECTED} == EXPECTED
        assert "Device or resource busy" in fields["error"]
    assert [f["event"] for f in lines if f["event"].startswith("merge-")] == ["merge-finished"]


def test_a_failure_escaping_a_merge_is_logged_with_the_merge_it_belongs_to(
    one_merge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "link", failing(errno.EACCES, 99, os.link))
    lines = logged_pass(*one_merge)
    failed = [f for f in lines if f["event"] == "partition-failed"]
    assert len(failed) == 1
    assert {k: failed[0][k] for k in EXPECTED} == EXPECTED
    assert "Permission denied" in failed[0]["error"]


def test_context_fields_stop_at_the_end_of_the_block() -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    log = logging.getLogger("fgm_consolidator.test")
    with logs.context(merge_id=7, partition="p", output="o"):
        logs.log_event(log, "inside", output="explicit wins")
    logs.log_event(log, "outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["merge_id"], inside["partition"], inside["output"]) == (7, "p", "explicit wins")
    assert "merge_id" not in outside


@pytest.mark.parametrize(
    "value",
    ["a\rb", "a\x0bb", "a\x1cb", "a\x85b", "a\u2028b", "a\u2029b", "\x1b[31mred", "x\udcffy"],
)
def test_a_text_line_stays_one_line_whatever_a_value_holds(value: str) -> None:
    """A data dir or partition folder named with a carriage return (or any other character
    `str.splitlines` or a terminal treats as a line break) split one event in two."""
    line = logs.format_fields({"event": "started", "data_dir": value, "next": "x"})
    assert line.splitlines() == [line]
    assert line.isprintable(), repr(line)
    assert parse_kv(line)["next"] == "x"
    line.encode("utf-8")  # a non-UTF-8 name's surrogate is spelled out, not written raw


def test_backslashes_and_quotes_in_a_text_value_read_back() -> None:
    line = logs.format_fields({"path": 'C:\\dir "x"', "tab": "a\tb"})
    assert parse_kv(line) == {"path": 'C:\\dir "x"', "tab": "a\\tb"}
