"""Prometheus metrics on `--metrics-port`: what the service did and what is left to do.

Counters move as each merge ends, so a scrape during a long pass already sees it; gauges about
the whole data directory (backlog, unreadable files, merges waiting for a person) are refreshed
at the end of every pass from the pass and the journal. Everything lives in a registry of its
own, so nothing else in the process (or a test) can add to or collide with it.

Cardinality is fixed: no metric has a partition or file label.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from . import __version__
from .errors import ConsolidatorError
from .journal import Journal
from .logs import log_event
from .observe import Observer
from .scan import still_on_disk
from .states import MergeState

if TYPE_CHECKING:
    from .merge import MergeOutcome
    from .service import PassReport

log = logging.getLogger(__name__)

PREFIX = "fgm_consolidator_"
OUTCOMES = (MergeState.SOURCES_DELETED, MergeState.ROLLED_BACK, MergeState.NEEDS_ATTENTION)
PASS_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


class MetricsObserver(Observer):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info(PREFIX + "build", "The running version.", registry=r).info({"version": __version__})
        self.merges = Counter(
            PREFIX + "merges",
            "Merges this process ran, by outcome: the journal state each ended in.",
            ["outcome"],
            registry=r,
        )
        for state in OUTCOMES:
            self.merges.labels(str(state))  # every outcome is scraped, 0 until it happens
        self.files = Counter(
            PREFIX + "files_consolidated", "Source files merged and then deleted.", registry=r
        )
        self.rows = Counter(PREFIX + "rows_consolidated", "Rows of those files.", registry=r)
        self.bytes_in = Counter(
            PREFIX + "bytes_consolidated", "Bytes of those files (sources).", registry=r
        )
        self.bytes_out = Counter(
            PREFIX + "output_bytes_written", "Bytes of the outputs that replaced them.", registry=r
        )
        self.passes = Counter(
            PREFIX + "passes",
            "Passes by result: ok, or failed (the pass or one of its partitions failed).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "failed"):
            self.passes.labels(result)
        self.pass_duration = Histogram(
            PREFIX + "pass_duration_seconds",
            "Wall time of each pass.",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.pass_running = Gauge(
            PREFIX + "pass_in_progress", "1 while a pass runs, else 0.", registry=r
        )
        self.backlog_files = Gauge(
            PREFIX + "backlog_files",
            "Eligible metrics files left unconsolidated by the last pass, in all partitions.",
            registry=r,
        )
        self.backlog_partitions = Gauge(
            PREFIX + "backlog_partitions",
            "Partitions with at least one such file.",
            registry=r,
        )
        self.unreadable = Gauge(
            PREFIX + "unreadable_files",
            "Files the journal reports unreadable that are still on disk, unchanged.",
            registry=r,
        )
        self.held = Gauge(
            PREFIX + "held_files",
            "Data files the last pass held out of merges (see `status`): copies an output's"
            " lineage lists, that output, or the files of a merge waiting for a person.",
            registry=r,
        )
        self.needs_person = Gauge(
            PREFIX + "merges_needing_person",
            "Merges left untouched until a person decides (see `history --state needs-attention`).",
            registry=r,
        )
        self.last_success = Gauge(
            PREFIX + "last_success_timestamp_seconds",
            "Unix time the last pass without any failure ended; 0 before the first.",
            registry=r,
        )

    def pass_started(self, partitions: Sequence[str]) -> None:
        self.pass_running.set(1)

    def observe_merge(self, outcome: MergeOutcome) -> None:
        """The merge is counted last: a scrape that sees it also sees its files and rows."""
        if outcome.state is MergeState.SOURCES_DELETED:
            self.files.inc(outcome.sources)
            self.rows.inc(outcome.rows)
            self.bytes_in.inc(outcome.bytes_in)
            self.bytes_out.inc(outcome.bytes_out or 0)
        self.merges.labels(str(outcome.state)).inc()

    def observe_pass(self, report: PassReport | None, duration_s: float, journal: Journal) -> None:
        ok = report is not None and not report.errors
        self.pass_running.set(0)
        self.pass_duration.observe(duration_s)
        self.passes.labels("ok" if ok else "failed").inc()
        if ok:
            self.last_success.set(time.time())
        if report is not None:
            waiting = [n for n in report.backlog.values() if n > 0]
            self.backlog_files.set(sum(waiting))
            self.backlog_partitions.set(len(waiting))
            self.held.set(sum(report.held.values()))
        try:
            self.unreadable.set(sum(still_on_disk(self.data_dir, r) for r in journal.unreadable()))
            self.needs_person.set(
                sum(1 for r in journal.unfinished() if r.state is MergeState.NEEDS_ATTENTION)
            )
        except (sqlite3.Error, ConsolidatorError) as exc:  # metrics never stop the service
            log_event(log, "metrics-refresh-failed", logging.WARNING, error=exc)


@contextmanager
def serving(observer: MetricsObserver, port: int, addr: str) -> Iterator[None]:
    """`/metrics` on addr:port in a background thread for as long as the block runs."""
    try:
        server = _listen(port, addr, observer.registry)
    except OSError as exc:
        raise ConsolidatorError(
            f"--metrics-port {port}: cannot listen on {addr}: {exc.strerror or exc}"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log_event(log, "metrics-serving", addr=addr, port=server.server_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _listen(port: int, addr: str, registry: CollectorRegistry) -> WSGIServer:
    """prometheus_client's server, bound as its `start_http_server` binds it (IPv6 where
    `addr` is one), but quiet: see `_QuietServer`."""
    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("MetricsServer", (_QuietServer,), {"address_family": family})
    app = make_wsgi_app(registry)
    return make_server(str(sockaddr[0]), port, app, server_class, handler_class=_QuietHandler)


class _QuietServer(ThreadingWSGIServer):
    """A request that fails (a client resetting its connection, as port scanners and TCP
    health checks do) is one log event: socketserver printed a 15-line traceback to stderr,
    unstructured, in the middle of the service's log."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(error, ConnectionError) else logging.WARNING
        log_event(log, "metrics-request-failed", level, client=client_address[0], error=error)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
