"""l4gw.statuscmd: the status tables from /status JSON (lenient with missing keys) and the stdlib
HTTP client against a real loopback server, including every way it can fail."""

from __future__ import annotations

import http.server
import io
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4gw.ops.statuscmd import (
    StatusError,
    fetch_status,
    format_duration,
    format_status,
    run_status,
)

from .conftest import free_port

NOW = 1_700_000_000.0

STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "pid": 4242,
    "draining": False,
    "uptime_seconds": 3 * 3600 + 7 * 60 + 5.5,
    "listeners": [
        {
            "name": "vpc-link",
            "address": "0.0.0.0:8080",
            "mode": "tcp",
            "upstream": "web",
            "active_connections": 12,
            "connections_total": 3456,
        },
        {
            "name": "api",
            "address": "[::]:8443",
            "mode": "http",
            "upstream": "web",
            "active_connections": 0,
            "connections_total": 7,
        },
    ],
    "upstreams": [
        {
            "name": "web",
            "balance": "round_robin",
            "nodes": [
                {
                    "address": "10.0.1.10:80",
                    "weight": 10,
                    "healthy": True,
                    "state": "healthy",
                    "active_connections": 7,
                    "source": "static",
                    "last_check": "ok: 200 in 1.2 ms",
                    "since": NOW - 125,
                },
                {
                    "address": "10.0.1.11:80",
                    "weight": 0,
                    "healthy": False,
                    "active_connections": 0,
                    "source": "dns",
                    "last_check": None,
                    "since": None,
                },
            ],
        }
    ],
}


def test_format_status_tables() -> None:
    text = format_status(STATUS, now=NOW)
    lines = text.splitlines()
    assert lines[0] == "l4gw 0.1.0  pid 4242  up 3h07m  serving"
    assert lines[2] == "Listeners (2)"
    assert lines[3].split() == ["NAME", "ADDRESS", "MODE", "UPSTREAM", "ACTIVE", "TOTAL"]
    assert lines[4].split() == ["vpc-link", "0.0.0.0:8080", "tcp", "web", "12", "3456"]
    assert lines[5].split() == ["api", "[::]:8443", "http", "web", "0", "7"]
    # Columns line up: each header starts where its values start.
    assert lines[3].index("ADDRESS") == lines[4].index("0.0.0.0:8080")
    assert "Upstream web  balance round_robin  1/2 nodes healthy" in lines
    header = next(line for line in lines if line.lstrip().startswith("NODE"))
    assert header.split() == ["NODE", "STATE", "FOR", "WEIGHT", "ACTIVE", "SOURCE", "LAST", "CHECK"]
    first = lines[lines.index(header) + 1]
    second = lines[lines.index(header) + 2]
    assert first.split()[:6] == ["10.0.1.10:80", "healthy", "2m05s", "10", "7", "static"]
    assert first.endswith("ok: 200 in 1.2 ms")
    # "state" missing: derived from "healthy"; null values shown as "-".
    assert second.split() == ["10.0.1.11:80", "unhealthy", "-", "0", "0", "dns", "-"]
    assert text.endswith("\n")
    assert all(line == line.rstrip() for line in lines)


def test_format_status_draining_and_empty() -> None:
    text = format_status({"version": "0.2", "pid": 1, "draining": True}, now=NOW)
    assert text.splitlines()[0] == "l4gw 0.2  pid 1  DRAINING (not accepting)"
    assert "Listeners (0)\n  (none)" in text
    assert "Upstreams (none)" in text


def test_format_status_with_odd_numbers() -> None:
    document = {
        "uptime_seconds": float("inf"),
        "upstreams": [{"nodes": [{"since": float("nan")}, {"since": NOW + 10}]}],
    }
    text = format_status(document, now=NOW)
    assert "up" not in text.splitlines()[0]
    rows = [line.split() for line in text.splitlines()[-2:]]
    assert rows == [["-"] * 7, ["-", "-", "0s", "-", "-", "-", "-"]]


def test_format_status_is_lenient() -> None:
    weird: dict[str, Any] = {
        "pid": "x",
        "uptime_seconds": "soon",
        "listeners": [{"name": "a"}, "garbage", None, {"address": {"nested": 1}}],
        "upstreams": [{"name": "u", "nodes": "none"}, {"nodes": [{"healthy": "yes"}]}, 7],
    }
    text = format_status(weird, now=NOW)
    assert text.splitlines()[0] == "l4gw -  pid x"
    assert "Listeners (2)" in text
    assert "Upstream u  balance -  0/0 nodes healthy\n  (no nodes)" in text
    assert "Upstream -  balance -  0/1 nodes healthy" in text
    assert format_status({}, now=NOW).startswith("l4gw -  pid -\n")


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
nodes = st.dictionaries(
    st.sampled_from(
        ["address", "weight", "healthy", "state", "active_connections", "source", "last_check",
         "since"]
    ),
    scalars,
)  # fmt: skip
upstreams = st.dictionaries(
    st.sampled_from(["name", "balance", "nodes"]), scalars | st.lists(nodes | scalars, max_size=3)
)
listeners = st.dictionaries(
    st.sampled_from(["name", "address", "mode", "upstream", "active_connections"]), scalars
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "version": scalars,
            "pid": scalars,
            "draining": scalars,
            "uptime_seconds": scalars,
            "listeners": scalars | st.lists(listeners | scalars, max_size=3),
            "upstreams": scalars | st.lists(upstreams | scalars, max_size=3),
        },
    )
)
def test_format_status_never_fails(document: dict[str, Any]) -> None:
    assert format_status(document, now=NOW).endswith("\n")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"),
     (86400 * 2 + 3600 * 4, "2d04h"), (-5, "0s")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# -- fetch_status against a real server --------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    #: path -> (status, content type, body)
    routes: dict[str, tuple[int, str, bytes]] = {}

    def do_GET(self) -> None:
        status, ctype, body = self.routes.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def admin_server() -> Iterator[tuple[str, dict[str, tuple[int, str, bytes]]]]:
    routes: dict[str, tuple[int, str, bytes]] = {}
    handler = type("RouteHandler", (Handler,), {"routes": routes})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_fetch_status(admin_server: tuple[str, dict[str, tuple[int, str, bytes]]]) -> None:
    admin, routes = admin_server
    routes["/status"] = (200, "application/json", json.dumps(STATUS).encode())
    assert fetch_status(admin, timeout=5) == STATUS
    assert fetch_status(f"http://{admin}/", timeout=5) == STATUS
    out, err = io.StringIO(), io.StringIO()
    assert run_status(admin, 5, out=out, err=err) == 0
    assert out.getvalue().startswith("l4gw 0.1.0  pid 4242")
    assert err.getvalue() == ""


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ((500, "text/plain", b"boom"), "HTTP 500"),
        ((404, "text/plain", b""), "HTTP 404"),
        ((200, "text/html", b"<html>"), "not JSON"),
        ((200, "application/json", b"[1, 2]"), "not a JSON object"),
    ],
)
def test_fetch_status_bad_answers(
    admin_server: tuple[str, dict[str, tuple[int, str, bytes]]],
    route: tuple[int, str, bytes],
    message: str,
) -> None:
    admin, routes = admin_server
    routes["/status"] = route
    with pytest.raises(StatusError, match=message) as info:
        fetch_status(admin, timeout=5)
    assert f"http://{admin}/status" in str(info.value)


def test_fetch_status_refused() -> None:
    port = free_port()
    with pytest.raises(StatusError, match=r"connection refused \(is l4gw running"):
        fetch_status(f"127.0.0.1:{port}", timeout=5)
    err = io.StringIO()
    assert run_status(f"127.0.0.1:{port}", 5, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith(f"l4gw status: http://127.0.0.1:{port}/status: connection")


def test_fetch_status_timeout() -> None:
    with socket.socket() as silent:  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        with pytest.raises(StatusError, match=r"no answer within 0.2s"):
            fetch_status(f"127.0.0.1:{port}", timeout=0.2)


@pytest.mark.parametrize("admin", ["", "localhost", "127.0.0.1:x", "[::1]", "1.2.3.4:70000"])
def test_fetch_status_bad_address(admin: str) -> None:
    with pytest.raises(StatusError, match="is not"):
        fetch_status(admin, timeout=1)


def test_status_error_is_an_oserror() -> None:
    """The CLI may catch OSError for 'cannot reach the daemon'."""
    assert issubclass(StatusError, OSError)


def test_workers_table() -> None:
    """With workers, the control plane's /status lists each worker process."""
    text = format_status(
        {
            "version": "0.1.0",
            "pid": 10,
            "listeners": [],
            "upstreams": [],
            "worker_restarts": 1,
            "workers": [
                {
                    "index": 0,
                    "pid": 11,
                    "state": "ready",
                    "starts": 1,
                    "active_connections": 3,
                    "connections_total": 40,
                },
                {
                    "index": 1,
                    "pid": 12,
                    "state": "ready",
                    "starts": 2,
                    "active_connections": 0,
                    "connections_total": 37,
                },
            ],
        },
        now=0.0,
    )
    assert "Workers (2, 1 restarts)" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert rows == [["0", "11", "ready", "1", "3", "40"], ["1", "12", "ready", "2", "0", "37"]]
