"""The metrics endpoint writes to stderr only structured events, one per line."""

from __future__ import annotations

import socket
import struct
import threading
import urllib.request
from pathlib import Path

import pytest

from fgm_consolidator import logs
from fgm_consolidator.metrics import MetricsObserver, serving


def _reset(port: int, payload: bytes) -> None:
    """Connect, maybe send a little, and close with a TCP reset (SO_LINGER 0), as port
    scanners and many load balancers' TCP health checks do."""
    sock = socket.create_connection(("127.0.0.1", port))
    if payload:
        sock.sendall(payload)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_reset_connection_on_the_metrics_port_logs_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The metrics endpoint was prometheus_client's wsgiref server, whose
    `socketserver.BaseServer.handle_error` prints `Exception occurred during processing of
    request from (...)` and a 15-line traceback (ConnectionResetError) to stderr for every
    client that resets its connection: unstructured lines, in `--log-format json` too, and
    two such clients at once interleave their tracebacks line by line."""
    logs.configure("info", "json")
    with serving(MetricsObserver(tmp_path), 0, "127.0.0.1"):
        port = _port_served(capsys)
        _reset(port, b"")
        _reset(port, b"GET /metr")
        # accepted in order: once this scrape is answered, both handler threads have started
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        for thread in threading.enumerate():
            if "process_request_thread" in thread.name:
                thread.join(timeout=30)
    err = capsys.readouterr().err
    unstructured = [line for line in err.splitlines() if line and not line.startswith("{")]
    assert unstructured == [], "\n".join(unstructured)


def _port_served(capsys: pytest.CaptureFixture[str]) -> int:
    import json

    captured = capsys.readouterr().err
    for line in captured.splitlines():
        fields = json.loads(line)
        if fields["event"] == "metrics-serving":
            return int(fields["port"])
    raise AssertionError(captured)
