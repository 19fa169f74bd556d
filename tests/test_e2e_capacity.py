"""End-to-end: the process-wide connection cap derived from the open-file limit
(:mod:`l4gw.core.capacity`), with the real daemon started under ``prlimit --nofile=256``."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from l4gw.core.capacity import connection_cap

from .conftest import REPO, DaemonFactory, free_port, open_client, read_line, require_program

pytestmark = pytest.mark.e2e

Backends = Callable[[list[str]], Awaitable[list[int]]]

NOFILE = 256


def _config(node_port: int, port: int) -> str:
    return f"""
[daemon]
admin = "{{admin}}"
log_format = "json"

[upstreams.web]
nodes = [{{ address = "127.0.0.1:{node_port}" }}]

[upstreams.web.health]
check = "tcp"
interval = "0.2s"
timeout = "0.2s"

[[listeners]]
name = "vpc"
listen = "127.0.0.1:{port}"
mode = "tcp"
upstream = "web"
"""


async def _try_connect(port: int) -> trio.SocketStream | None:
    """A proxied connection (the node's greeting read), or None when l4gw refused it at once
    (closed or reset). Waiting in the listen backlog fails the test (TooSlowError)."""
    try:
        stream = await open_client(port)
    except ConnectionResetError:  # reset before the connect call even returned
        return None
    try:
        with trio.fail_after(5):
            line = await read_line(stream)
    except trio.BrokenResourceError:  # reset
        line = b""
    except BaseException:
        await stream.aclose()
        raise
    if line == b"a\n":
        return stream
    assert line == b"", line
    await stream.aclose()
    return None


def _raise_own_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def test_out_of_descriptors_new_connections_are_refused_at_once(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    """With ``ulimit -n 256``, every connection past the cap is reset at once instead of
    waiting in the backlog, counted and logged at most once a second; the admin endpoint
    answers and health checks keep running while the cap is reached; once clients leave,
    new ones are served again."""
    prlimit = require_program("prlimit")
    _raise_own_limit(1024)
    cap = connection_cap(NOFILE)
    attempts = cap + 60  # without the cap, descriptors run out near 120 connections
    with trio.fail_after(120):
        (node_port,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(
            _config(node_port, port), argv=[prlimit, f"--nofile={NOFILE}:{NOFILE}", "--"]
        )
        capacity = (await daemon.status())["capacity"]
        assert capacity["open_file_limit"] == NOFILE
        assert capacity["max_connections"] == cap
        assert await daemon.metric("l4gw_max_connections") == cap

        held: list[trio.SocketStream] = []
        refused = 0
        try:
            for _ in range(attempts):
                stream = await _try_connect(port)
                if stream is None:
                    refused += 1
                else:
                    held.append(stream)
            assert len(held) == cap
            assert refused == attempts - cap

            # Every slot taken: the connections held are still served, and the admin endpoint
            # and the health checks still work.
            for stream in (held[0], held[-1]):
                await stream.send_all(b"still here\n")
                with trio.fail_after(5):
                    assert await read_line(stream) == b"still here\n"
            status = await daemon.status()
            assert status["capacity"]["active_connections"] == cap
            assert status["capacity"]["refused_total"] == refused
            assert await daemon.metric("l4gw_connections_total", outcome="fd_limit") == refused
            checked = status["upstreams"][0]["nodes"][0]["last_check_at"] or 0.0
            with trio.fail_after(10):
                while True:
                    await trio.sleep(0.3)
                    node = (await daemon.status())["upstreams"][0]["nodes"][0]
                    if (node["last_check_at"] or 0.0) > checked:
                        break
            assert node["healthy"]
            code, _ = await daemon.get("/healthz")
            assert code == 200

            lines = daemon.logs("connections_refused")
            assert lines and len(lines) < refused  # summarised, not one line per connection
            assert sum(line["refused"] for line in lines) <= refused
            assert all(line["max_connections"] == cap for line in lines)
            assert not [
                line for line in daemon.logs("connection") if line.get("outcome") == "fd_limit"
            ]
        finally:
            for stream in held:
                await stream.aclose()

        # Clients gone: new connections are served again.
        with trio.fail_after(10):
            while (await daemon.status())["capacity"]["active_connections"]:
                await trio.sleep(0.05)
        again = await _try_connect(port)
        assert again is not None
        await again.aclose()


def test_check_shows_the_connection_cap(tmp_path: Path) -> None:
    """``l4gw check`` says what cap a daemon started from the same shell would get."""
    prlimit = require_program("prlimit")
    conf = tmp_path / "conf.toml"
    conf.write_text(_config(free_port(), free_port()).replace('"{admin}"', '""'))
    done = subprocess.run(
        [
            prlimit,
            f"--nofile={NOFILE}:{NOFILE}",
            "--",
            sys.executable,
            "-m",
            "l4gw",
            "check",
            "-c",
            str(conf),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"connection cap: {connection_cap(NOFILE)} client connections per process "
        f"(open-file limit {NOFILE} here" in done.stdout
    )
