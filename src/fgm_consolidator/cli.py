"""The command line: parse options, call one library function, print. No logic lives here.

Every option can also be set from an environment variable named `FGM_<OPTION>` (the same name
for every command), which is how a container is configured.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import logs
from .errors import ConsolidatorError
from .journal import Journal
from .layout import default_journal_path, iter_partitions, parse_partition
from .plan import MB, Policy
from .recovery import recover
from .reports import (
    lineage_fields,
    merge_fields,
    plan_fields,
    recovery_fields,
    unreadable_fields,
)
from .service import PARTITION_ERRORS, Settings, StopFlag, plan_one, run_service
from .states import MergeState

F = TypeVar("F", bound=Callable[..., Any])

EXIT_NEEDS_PERSON = 3


def _option(name: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """`--name` with its `FGM_NAME` environment variable shown in --help."""
    envvar = "FGM_" + name.lstrip("-").replace("-", "_").upper()
    return click.option(name, *decls, envvar=envvar, show_envvar=True, show_default=True, **kwargs)


def _data_dir(writable: bool) -> Callable[[F], F]:
    return _option(
        "--data-dir",
        type=click.Path(path_type=Path, exists=True, file_okay=False, writable=writable),
        default="/data",
        help="The monitor's data directory (the shared volume).",
    )


_journal = _option(
    "--journal",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Journal database. [default: <data-dir>/.fgm-consolidator/journal.db]",
)
_json = _option("--json", "as_json", is_flag=True, help="One JSON object per line.")
_log_level = _option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    help="Least severe log event printed (to stderr).",
)


def _echo(fields: dict[str, Any], as_json: bool) -> None:
    click.echo(json.dumps(fields, default=str) if as_json else logs.format_fields(fields))


def _fail(exc: ConsolidatorError | OSError) -> click.ClickException:
    """One line naming the path and the reason, exit 1; an OSError's text carries its path."""
    return click.ClickException(str(exc))


@click.group()
@click.version_option(package_name="fgm-consolidator", prog_name="fgm-consolidator")
def main() -> None:
    """Merge fine-grained-monitor's small parquet files into few large ones, crash-safely."""


@main.command()
@_data_dir(writable=True)
@_journal
@_option(
    "--check-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    help="Seconds between consolidation passes.",
)
@_option(
    "--min-files",
    type=click.IntRange(min=2),
    default=10,
    help="Eligible metrics files a partition needs before it is consolidated.",
)
@_option(
    "--min-age",
    type=click.FloatRange(min=0),
    default=300.0,
    help="Seconds since a file's mtime before it is eligible.",
)
@_option(
    "--max-output-size",
    type=click.IntRange(min=1),
    default=500,
    help="Upper bound of an output's size, in MB (sum of its sources).",
)
@_option(
    "--max-span",
    type=click.IntRange(min=1),
    default=3600,
    help="Seconds of source timestamps one output may cover (aligned windows).",
)
@_option(
    "--compression-level", type=click.IntRange(1, 22), default=3, help="ZSTD level of outputs."
)
@_option(
    "--row-group-size",
    type=click.IntRange(min=1),
    default=64,
    help="Output row group target in MB of memory; bounds the write buffer.",
)
@_option(
    "--grace-period",
    type=click.FloatRange(min=0),
    default=20.0,
    help="Seconds a merge in progress may run on after SIGTERM before it is rolled back.",
)
@_option("--once", is_flag=True, help="Recover, run one pass, exit.")
@_option("--dry-run", is_flag=True, help="Print the plan; change nothing, not even the journal.")
@_log_level
def run(
    data_dir: Path,
    journal: Path | None,
    check_interval: float,
    min_files: int,
    min_age: float,
    max_output_size: int,
    max_span: int,
    compression_level: int,
    row_group_size: int,
    grace_period: float,
    once: bool,
    dry_run: bool,
    log_level: str,
) -> None:
    """Run the sidecar: lock, recover, then consolidate every --check-interval seconds."""
    logs.configure(log_level)
    policy = Policy(
        min_files=min_files,
        min_age_s=min_age,
        max_output_bytes=max_output_size * MB,
        max_span_s=max_span,
        compression_level=compression_level,
        row_group_bytes=row_group_size * MB,
    )
    journal_path = journal or default_journal_path(data_dir)
    try:
        if dry_run:
            _print_plan(data_dir, journal_path, policy)
            return
        settings = Settings(data_dir, journal_path, policy, check_interval, grace_period)
        stop = StopFlag(grace_period)
        stop.install()
        code = run_service(settings, stop, once=once)
    except (ConsolidatorError, OSError) as exc:
        raise _fail(exc) from exc
    raise SystemExit(code)


def _print_plan(data_dir: Path, journal_path: Path, policy: Policy) -> None:
    journal = Journal.open(journal_path, read_only=True) if journal_path.exists() else None
    merges = files = 0
    now = time.time()
    try:
        for partition in iter_partitions(data_dir):
            try:
                scan, plans, skipped = plan_one(data_dir, partition, policy, journal, now)
            except PARTITION_ERRORS as exc:
                _echo({"kind": "error", "partition": partition, "error": str(exc)}, False)
                continue
            for bad in scan.unreadable:
                _echo(
                    {"kind": "unreadable", "partition": partition, "file": bad.name,
                     "reason": bad.reason},
                    False,
                )  # fmt: skip
            for skip in skipped:
                _echo(
                    {"kind": "skipped", "partition": partition, "output": skip.output,
                     "reason": skip.reason},
                    False,
                )  # fmt: skip
            for plan in plans:
                merges += 1
                files += len(plan.sources)
                _echo(plan_fields(plan), False)
                for source in plan.sources:
                    click.echo(f"  {source.name} rows={source.rows} bytes={source.identity.size}")
    finally:
        if journal is not None:
            journal.close()
    click.echo(f"dry run: {merges} merges of {files} files planned; nothing was changed")


@main.command("recover")
@_data_dir(writable=True)
@_journal
@_json
@_log_level
def recover_command(data_dir: Path, journal: Path | None, as_json: bool, log_level: str) -> None:
    """Resume or roll back every interrupted merge; exit 3 if a person must decide."""
    from . import lock

    logs.configure(log_level)
    try:
        with lock.exclusive(data_dir):
            opened = Journal.open(journal or default_journal_path(data_dir))
            try:
                report = recover(opened, data_dir)
            finally:
                opened.close()
    except (ConsolidatorError, OSError) as exc:
        raise _fail(exc) from exc
    for action in report.actions:
        _echo(recovery_fields(action), as_json)
    for path in report.swept:
        _echo({"kind": "orphan-removed", "path": str(path)}, as_json)
    for found in report.lineage:
        _echo(lineage_fields(found), as_json)
    people = len(report.needs_person) + len(report.uncertain)
    summary = {
        "kind": "summary",
        "merges": len(report.actions),
        "needs_person": people,
        "orphans_removed": len(report.swept),
        "consistent": people == 0,
    }
    _echo(summary, as_json)
    if people:
        raise SystemExit(EXIT_NEEDS_PERSON)


def _partition(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_partition(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@_data_dir(writable=False)
@_journal
@_json
@_option("--limit", type=click.IntRange(min=1), default=None, help="Newest N merges only.")
@_option(
    "--partition",
    callback=_partition,
    default=None,
    help="Only this partition, dt=YYYY-MM-DD/identifier=NAME.",
)
@_option(
    "--state",
    type=click.Choice([s.value for s in MergeState]),
    default=None,
    help="Only merges whose current state is this.",
)
@_option(
    "--since",
    type=click.DateTime(),
    default=None,
    help="Only merges planned at or after this time (UTC).",
)
def history(
    data_dir: Path,
    journal: Path | None,
    as_json: bool,
    limit: int | None,
    partition: str | None,
    state: str | None,
    since: Any,
) -> None:
    """Print the audit trail, newest first: one merge per line, then unreadable files."""
    path = journal or default_journal_path(data_dir)
    if not path.exists():
        raise click.ClickException(f"{path}: no journal here; has `run` ever run on {data_dir}?")
    since_text = None if since is None else since.isoformat()
    try:
        opened = Journal.open(path, read_only=True)
    except ConsolidatorError as exc:
        raise _fail(exc) from exc
    try:
        records = opened.history(
            limit=limit,
            partition=partition,
            state=MergeState(state) if state else None,
            since=since_text,
        )
        unreadable = [] if state else opened.unreadable(partition)
    finally:
        opened.close()
    _emit(map(merge_fields, records), as_json)
    _emit(
        (
            unreadable_fields(u)
            for u in unreadable
            if since_text is None or u.first_seen >= since_text
        ),
        as_json,
    )


def _emit(rows: Iterable[dict[str, Any]], as_json: bool) -> None:
    for fields in rows:
        _echo(fields, as_json)


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where to simulate the monitor (must be empty). [default: a new temp dir]",
)
@click.option(
    "--hours",
    type=click.FloatRange(min=0.5, max=24),
    default=3.0,
    show_default=True,
    help="Hours of 90 s files to simulate for each of two pods.",
)
def demo(data_dir: Path | None, hours: float) -> None:
    """Simulate a monitor's data, consolidate it with the real engine, show before and after."""
    from .demo import run_demo

    logs.configure("warning")
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="fgm-demo-"))
    elif data_dir.exists() and any(data_dir.iterdir()):
        raise click.ClickException(f"{data_dir}: not empty; the demo writes a fresh data directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"simulating {hours:g} h of monitor output for 2 pods in {data_dir} ...")
    try:
        report = run_demo(data_dir, hours=hours)
    except ConsolidatorError as exc:
        raise _fail(exc) from exc
    click.echo("\nparquet files per partition (before -> after):")
    for partition in sorted(report.before.files):
        click.echo(
            f"  {partition}: {report.before.files[partition]} -> {report.after.files[partition]}"
        )
    same = "identical" if report.before.rows == report.after.rows else "DIFFERENT"
    click.echo(
        f"total: {sum(report.before.files.values())} -> {sum(report.after.files.values())} files;"
        f" rows {report.before.rows} -> {report.after.rows} ({same})"
    )
    click.echo(f"\nhistory (fgm-consolidator history --data-dir {data_dir}):")
    for record in report.history:
        click.echo("  " + logs.format_fields(merge_fields(record)))
    if report.before.rows != report.after.rows:
        raise SystemExit(1)
