"""The command line: parse options, call one library function, print. No logic lives here.

Every option can also be set from an environment variable named `FGM_<OPTION>` (the same name
for every command), which is how a container is configured.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import click

from . import config, identity, logs, progress
from .backoff import DEFAULT_INTERVAL_S
from .errors import ConfigError, ConsolidatorError, JournalError, described
from .exit_codes import EXIT_NEEDS_PERSON
from .isolation import PartitionFailure, isolated
from .journal import Journal, errors_explained
from .layout import MONITOR_ROTATION_S, default_journal_path, parse_partition, walk_partitions
from .logs import log_event
from .observe import Observer, Observers
from .plan import MB, Policy, plan_one
from .recovery import recover
from .reports import (
    backlog_fields,
    found_unreadable_fields,
    lineage_fields,
    merge_fields,
    partition_error_fields,
    pass_fields,
    plan_fields,
    problem_fields,
    recovery_fields,
    skipped_fields,
    skipped_merge_fields,
    source_fields,
    status_fields,
    unreadable_fields,
)
from .service import Settings, StopFlag, run_service
from .states import MergeState
from .status import compute_status

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)


def _option(name: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """`--name` with its `FGM_NAME` environment variable shown in --help."""
    envvar = "FGM_" + name.lstrip("-").replace("-", "_").upper()
    return click.option(name, *decls, envvar=envvar, show_envvar=True, show_default=True, **kwargs)


def _data_dir(writable: bool) -> Callable[[F], F]:
    return _option(
        "--data-dir",
        type=click.Path(path_type=Path, exists=True, file_okay=False, writable=writable),
        default="/data",
        callback=_checked_data_dir,
        help="The monitor's data directory (the shared volume).",
    )


def _checked_data_dir(_ctx: click.Context, _param: click.Parameter, value: Path) -> Path:
    try:
        config.check_data_dir(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.reason) from exc
    return value


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
_log_format = _option(
    "--log-format",
    type=click.Choice(logs.FORMATS, case_sensitive=False),
    default="text",
    help="Log lines as key=value text or as one JSON object each.",
)


def _echo(fields: dict[str, Any], as_json: bool) -> None:
    _print(logs.to_json(fields) if as_json else logs.format_fields(fields))


def _print(text: str) -> None:
    """Standard output that cannot be written (`history > file` on a full disk) is one
    `Error:` line, not a traceback; a reader that went away (`history | head`) is click's to
    end quietly, as it does."""
    try:
        click.echo(text)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        raise _unwritable_output(exc) from exc


def _unwritable_output(exc: OSError) -> click.ClickException:
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - what is buffered can never be written
    return click.ClickException(f"cannot write to standard output: {exc.strerror or exc}")


class _Program(click.Group):
    """click prints `--help` and `--version` itself, before any command of ours runs, so
    their output into a full disk is caught here, around click: one `Error:` line, as for
    every command's output (`_print`), instead of a traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:
            if not _raised_by_click_echo(exc):
                raise
            failure = _unwritable_output(exc)
            failure.show()
            sys.exit(failure.exit_code)


def _raised_by_click_echo(exc: OSError) -> bool:
    """Any other OSError reaching this far is a fault of ours and keeps its traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    innermost = frames[-1] if frames else None
    return innermost is not None and (innermost.filename, innermost.name) == (
        click.utils.__file__,
        "echo",
    )


def _error(message: str) -> click.ClickException:
    """Exit 1 with `Error: <message>` on one line, whatever the path it names holds."""
    return click.ClickException(logs.one_line(message))


def _fail(exc: ConsolidatorError | OSError, where: Path | None = None) -> click.ClickException:
    """One line naming the path and the reason, exit 1. An OSError's text carries its path,
    except pyarrow's (a full disk under a parquet writer): `where` then says where it was."""
    return _error(str(exc) if where is None else described(exc, where))


def _check_config(check: Callable[[], None]) -> None:
    """A value `config` refuses is a usage error of its option, like click's own: exit 2. What
    keeps the check from answering (a journal another process keeps locked) is the command's
    error, one line and exit 1, as it would be a moment later."""
    try:
        check()
    except ConfigError as exc:
        ctx = click.get_current_context()
        param = next(p for p in ctx.command.params if exc.option in p.opts)
        raise click.BadParameter(exc.reason, ctx=ctx, param=param) from exc
    except ConsolidatorError as exc:
        raise _fail(exc) from exc


@click.group(cls=_Program)
@click.version_option(package_name="fgm-consolidator", prog_name="fgm-consolidator")
def main() -> None:
    """Merge fine-grained-monitor's small parquet files into few large ones, crash-safely."""
    _fill_standard_streams()


STANDARD_STREAMS = (("stdin", "r"), ("stdout", "w"), ("stderr", "w"))


def _fill_standard_streams() -> None:
    """A process started with a standard stream closed (`2>&-`) had no stderr to log to, so
    `run` failed without a word, and the first file it opened took the free number: the lock
    file would have received the log. /dev/null stands in for each one closed."""
    for fd, (name, mode) in enumerate(STANDARD_STREAMS):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # Python found it closed at start-up
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - for the process


@main.command()
@_data_dir(writable=False)  # unless --dry-run: checked in `run`
@_journal
@_option(
    "--check-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_INTERVAL_S,
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
    help="Seconds since a file's mtime before it is eligible. Below one rotation of the"
    f" monitor ({MONITOR_ROTATION_S} s) a file it still writes may be taken: allowed (tests"
    " use 0), but `run` logs a warning at start-up.",
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
    help="Seconds of source timestamps one output may cover (aligned windows). Below two"
    f" rotations of the monitor ({2 * MONITOR_ROTATION_S} s) few files or none share a window:"
    " `run` logs a warning at start-up.",
)
@_option(
    "--compression-level", type=click.IntRange(1, 22), default=3, help="ZSTD level of outputs."
)
@_option(
    "--row-group-size",
    type=click.IntRange(min=1),
    default=4,
    help="Largest output row group, in MB of buffered rows; it is also the write buffer.",
)
@_option(
    "--grace-period",
    type=click.FloatRange(min=0),
    default=20.0,
    help="Seconds a merge in progress may run on after SIGTERM before it is rolled back.",
)
@_option(
    "--history-retention-days",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    help="Days the journal keeps finished merges and rolled-back ones whose sources a later"
    " merge took; unfinished merges and any ever flagged for a person stay.",
)
@_option("--once", is_flag=True, help="Recover, run one pass, exit.")
@_option(
    "--dry-run",
    is_flag=True,
    help="Print the plan; change nothing, not even the journal. Exit 1 if a partition could"
    " not be planned (it is printed with its error; the others are planned).",
)
@_option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (0: any free port, logged). [default: off]",
)
@_option("--metrics-addr", default="0.0.0.0", help="Address the metrics port listens on.")
@_log_level
@_log_format
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
    history_retention_days: float,
    once: bool,
    dry_run: bool,
    metrics_port: int | None,
    metrics_addr: str,
    log_level: str,
    log_format: str,
) -> None:
    """Run the sidecar: lock, recover, then consolidate every --check-interval seconds."""
    journal_path = journal or default_journal_path(data_dir)
    numbers = {
        "--check-interval": check_interval,
        "--min-age": min_age,
        "--grace-period": grace_period,
        "--history-retention-days": history_retention_days,
    }
    _check_config(lambda: config.check_finite(numbers))
    if not dry_run:
        _check_config(lambda: config.check_writable(data_dir))
        _check_config(lambda: config.check_journal(journal_path, data_dir))
    elif journal is not None:
        _check_config(lambda: config.check_journal_to_read(journal_path, data_dir))
    _check_config(lambda: identity.check(journal_path, data_dir))
    with ExitStack() as stack:
        shown = _configure_logs(stack, log_level, log_format, progress_bar=once and not dry_run)
        config.warn_min_age(min_age)
        config.warn_max_span(max_span)
        policy = Policy(
            min_files=min_files,
            min_age_s=min_age,
            max_output_bytes=max_output_size * MB,
            max_span_s=max_span,
            compression_level=compression_level,
            row_group_bytes=row_group_size * MB,
        )
        try:
            if dry_run:
                with errors_explained(journal_path):
                    failed = _print_plan(data_dir, journal_path, policy)
                raise SystemExit(1 if failed else 0)  # as `--once` with a partition failed
            metrics, serve = _metrics(data_dir, metrics_port, metrics_addr)
            observer = Observers(shown, *metrics)
            settings = Settings(
                data_dir,
                journal_path,
                policy,
                check_interval,
                grace_period,
                retention_days=history_retention_days,
                observer=observer,
            )
            stop = StopFlag(grace_period)
            with stop.installed(), errors_explained(journal_path):
                code = run_service(settings, stop, once=once, serve=serve)
        except (ConsolidatorError, OSError) as exc:
            if log_format == "json":
                # The `Error:` line alone was the only word of why the sidecar died, and a
                # collector parsing JSON lines dropped it. (In text it is that word already.)
                log_event(log, "stopped", logging.ERROR, reason="error", error=exc)
            raise _fail(exc) from exc
    raise SystemExit(code)


def _configure_logs(stack: ExitStack, level: str, fmt: str, *, progress_bar: bool) -> Observer:
    """Logs go to stderr; with progress shown, through the progress display (a bar on a tty)."""
    if not progress_bar:
        logs.configure(level, fmt)
        return Observer()
    shown, stream = stack.enter_context(progress.shown(sys.stderr))
    logs.configure(level, fmt, stream)
    return shown


def _metrics(
    data_dir: Path, port: int | None, addr: str
) -> tuple[list[Observer], Callable[[], AbstractContextManager[None]]]:
    """The metrics observer and its endpoint, or neither when no port is set."""
    if port is None:
        return [], nullcontext
    # Imported only when asked for: prometheus-client is 2 MB of the process's floor.
    from .metrics import MetricsObserver, serving

    metrics = MetricsObserver(data_dir)
    return [metrics], lambda: serving(metrics, port, addr)


def _print_plan(data_dir: Path, journal_path: Path, policy: Policy) -> int:
    """Returns how many partitions, or folders of them, could not be planned; each is printed
    with its error. Folders left alone are printed as `status` prints them; one that could not
    be listed counts as not planned (its partitions were once invisible here, and exit 0)."""
    merges = files = failed = 0
    partitions, left_alone = walk_partitions(data_dir)
    for folder in left_alone:
        _echo(skipped_fields(folder), False)
        failed += folder.unlisted
    journal = Journal.open(journal_path, read_only=True) if journal_path.exists() else None
    now = time.time()
    try:
        for partition in partitions:
            looked = isolated(plan_one, data_dir, partition, policy, journal, now)
            if isinstance(looked, PartitionFailure):
                failed += 1
                _echo(partition_error_fields(partition, looked), False)
                continue
            scan, plans, skipped = looked
            for bad in scan.unreadable:
                _echo(found_unreadable_fields(partition, bad), False)
            for skip in skipped:
                _echo(skipped_merge_fields(partition, skip), False)
            for plan in plans:
                merges += 1
                files += len(plan.sources)
                _echo(plan_fields(plan), False)
                for source in plan.sources:
                    _print(f"  {source.name} rows={source.rows} bytes={source.identity.size}")
    finally:
        if journal is not None:
            journal.close()
    unplanned = f"; {failed} partition(s) could not be planned" if failed else ""
    _print(f"dry run: {merges} merges of {files} files planned{unplanned}; nothing was changed")
    return failed


@main.command("recover")
@_data_dir(writable=True)
@_journal
@_json
@_log_level
@_log_format
def recover_command(
    data_dir: Path, journal: Path | None, as_json: bool, log_level: str, log_format: str
) -> None:
    """Resume or roll back every interrupted merge; exit 3 if a person must decide."""
    from . import lock

    journal_path = journal or default_journal_path(data_dir)
    _check_config(lambda: config.check_journal(journal_path, data_dir))
    _check_config(lambda: identity.check(journal_path, data_dir))
    # A signal ends recovery between steps, as it ends `run`'s: killed mid-proof, two Ctrl-Cs
    # counted as two proofs that died with their process, and held the output for a person.
    stop = StopFlag(grace_s=0)
    with ExitStack() as stack:
        stack.enter_context(stop.installed())
        shown = _configure_logs(stack, log_level, log_format, progress_bar=True)
        try:
            with (
                lock.exclusive(data_dir, one_shot=True),
                lock.exclusive_journal(journal_path, data_dir),
            ):
                opened = Journal.open(journal_path)
                try:
                    with errors_explained(journal_path):
                        identity.bind(opened, data_dir)
                        report = recover(
                            opened, data_dir, observer=shown, should_stop=lambda: stop.requested
                        )
                finally:
                    opened.close()
        except (ConsolidatorError, OSError) as exc:
            raise _fail(exc) from exc
    for action in report.actions:
        _echo(recovery_fields(action), as_json)
    for path in report.published:
        _echo({"kind": "orphan-published", "path": str(path)}, as_json)
    for path in report.swept:
        _echo({"kind": "orphan-removed", "path": str(path)}, as_json)
    for found in report.lineage:
        _echo(lineage_fields(found), as_json)
    people = len(report.needs_person) + len(report.uncertain) + len(report.failed)
    summary = {
        "kind": "summary",
        "merges": len(report.actions),
        "needs_person": people,
        "orphans_removed": len(report.swept),
        "consistent": people == 0 and not report.stopped,
        "stopped": report.stopped,
    }
    _echo(summary, as_json)
    if report.stopped:
        # What was settled is journaled; the rest is as it was, for the next `recover`. The
        # code a shell gives a process its signal ended (130 for Ctrl-C, 143 for SIGTERM).
        log_event(log, "stopped", reason="signal")
        raise SystemExit(128 + (stop.signal or signal.SIGTERM))
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
@_option(
    "--sources",
    "with_sources",
    is_flag=True,
    default=False,
    help="After each merge, its sources: name, rows, and whether the file under that name "
    "now is the one merged, changed, or gone.",
)
def history(
    data_dir: Path,
    journal: Path | None,
    as_json: bool,
    limit: int | None,
    partition: str | None,
    state: str | None,
    since: Any,
    with_sources: bool,
) -> None:
    """Print the audit trail, newest first: one merge per line, then unreadable files."""
    path = journal or default_journal_path(data_dir)
    if journal is None and path.parent.exists() and not path.parent.is_dir():
        raise _error(f"{path.parent} is not a directory, so {path} cannot be")
    if journal is not None:
        _check_config(lambda: config.check_journal_to_read(path, data_dir))
    _check_config(lambda: identity.check(path, data_dir))
    if not path.exists():
        raise _error(f"{path}: no journal here; has `run` ever run on {data_dir}?")
    since_text = None if since is None else since.isoformat()
    try:
        opened = Journal.open(path, read_only=True)
    except ConsolidatorError as exc:
        raise _fail(exc) from exc
    try:
        with errors_explained(path):
            records = opened.iter_history(
                limit=limit,
                partition=partition,
                state=MergeState(state) if state else None,
                since=since_text,
            )
            for record in records:
                _echo(merge_fields(record), as_json)
                if with_sources:
                    _emit(source_fields(record, data_dir), as_json)
            unreadable = [] if state else opened.unreadable(partition)
    except JournalError as exc:
        raise _fail(exc) from exc
    finally:
        opened.close()
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
@_data_dir(writable=False)
@_journal
@_json
@_option(
    "--check-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between passes. [default: what the service recorded with its last pass]",
)
@_option(
    "--stale-after",
    type=click.FloatRange(min=1),
    default=3.0,
    help="Unhealthy (exit 4) when no pass succeeded for this many check intervals.",
)
@_option(
    "--liveness",
    is_flag=True,
    help="Only whether the service is stuck (exit 4, 5), from the journal alone: no disk scan,"
    " no exit 3.",
)
def status(
    data_dir: Path,
    journal: Path | None,
    as_json: bool,
    check_interval: float | None,
    stale_after: float,
    liveness: bool,
) -> None:
    """Health for people and probes; read-only. Exit 0 healthy, 3 a person must look (a merge
    that needs one, a held partition, an output's lineage, an unforeseen error in a partition),
    4 no successful pass for --stale-after check intervals, 5 never ran here."""
    numbers = {"--stale-after": stale_after}
    if check_interval is not None:
        numbers["--check-interval"] = check_interval
    _check_config(lambda: config.check_finite(numbers))
    journal_path = journal or default_journal_path(data_dir)
    if journal is not None:  # the default's folder is the data directory's: a problem it names
        _check_config(lambda: config.check_journal_to_read(journal_path, data_dir))
    _check_config(lambda: identity.check(journal_path, data_dir))
    try:
        with errors_explained(journal_path):
            report = compute_status(
                data_dir,
                journal_path,
                check_interval_s=check_interval,
                stale_after=stale_after,
                liveness=liveness,
            )
    except (ConsolidatorError, OSError) as exc:
        raise _fail(exc) from exc
    if report.last_pass is not None:
        _echo(pass_fields(report.last_pass), as_json)
    _emit(map(backlog_fields, report.backlog), as_json)
    _emit(map(unreadable_fields, report.unreadable), as_json)
    _emit(map(merge_fields, report.needs_person + report.unfinished), as_json)
    _emit(map(lineage_fields, report.lineage), as_json)
    _emit(map(skipped_fields, report.skipped), as_json)
    _emit(map(problem_fields, report.problems), as_json)
    _echo(status_fields(report), as_json)
    raise SystemExit(report.exit_code)


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

    _check_config(lambda: config.check_finite({"--hours": hours}))
    logs.configure("warning")
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="fgm-demo-"))
    try:
        if data_dir.exists() and any(data_dir.iterdir()):
            raise _error(f"{data_dir}: not empty; the demo writes a fresh data directory")
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(exc) from exc
    _print(f"simulating {hours:g} h of monitor output for 2 pods in {data_dir} ...")
    try:
        report = run_demo(data_dir, hours=hours)
    except (ConsolidatorError, OSError) as exc:  # pyarrow's I/O errors (a full disk) are OSErrors
        raise _fail(exc, where=data_dir) from exc
    _print("\nparquet files per partition (before -> after):")
    for partition in sorted(report.before.files):
        _print(
            f"  {partition}: {report.before.files[partition]} -> {report.after.files[partition]}"
        )
    same = "identical" if report.before.rows == report.after.rows else "DIFFERENT"
    _print(
        f"total: {sum(report.before.files.values())} -> {sum(report.after.files.values())} files;"
        f" rows {report.before.rows} -> {report.after.rows} ({same})"
    )
    _print(f"\nhistory (fgm-consolidator history --data-dir {data_dir}):")
    for record in report.history:
        _print("  " + logs.format_fields(merge_fields(record)))
    if report.before.rows != report.after.rows:
        raise SystemExit(1)
