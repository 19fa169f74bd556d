"""End-to-end: SIGHUP reload with the real daemon — nothing established is cut, nothing new is
refused, a bad file changes nothing."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio

from .conftest import (
    DaemonFactory,
    RunningDaemon,
    free_port,
    open_client,
    read_all,
    read_line,
    require_program,
)
from .test_e2e_tcp import Backends, greeting, tcp_config

pytestmark = pytest.mark.e2e


def two_listener_config(nodes: list[tuple[int, int]], port: int, port2: int | None) -> str:
    text = tcp_config(nodes, port)
    if port2 is not None:
        text += f"""
[[listeners]]
name = "second"
listen = "127.0.0.1:{port2}"
upstream = "web"
"""
    return text


def reload(daemon: RunningDaemon, text: str) -> None:
    """Write a new config file and send SIGHUP."""
    daemon.write_config(text.replace("{admin}", daemon.admin))
    daemon.send_signal(signal.SIGHUP)


async def test_reload_keeps_connections_while_everything_changes(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(40):
        a, b, c = await backends(["a", "b", "c"])
        port, port2 = free_port(), free_port()
        daemon = await l4gw_daemon(two_listener_config([(a, 1), (b, 1)], port, port2))
        # One established connection on each listener, one to each node.
        first = await open_client(port)
        assert await read_line(first) == b"a\n"
        second = await open_client(port2)
        assert await read_line(second) == b"b\n"

        # New file: node a removed, b re-weighted, c added; listener "second" removed,
        # listener "third" added.
        port3 = free_port()
        text = (
            tcp_config([(b, 2), (c, 1)], port)
            + f"""
[[listeners]]
name = "third"
listen = "127.0.0.1:{port3}"
upstream = "web"
"""
        )
        reload(daemon, text)
        await daemon.wait_log("reloaded")

        # Both established connections still carry bytes both ways.
        for stream in (first, second):
            await stream.send_all(b"still here\n")
            assert await read_line(stream) == b"still here\n"
        # New connections follow the new weights (b, b, c per cycle) on kept and new listeners.
        seen = [await greeting(port) for _ in range(3)] + [await greeting(port3) for _ in range(3)]
        assert sorted(seen) == sorted([b"b", b"b", b"c"] * 2)
        # The removed listener no longer accepts.
        with pytest.raises(OSError):
            await open_client(port2)
        status = await daemon.status()
        nodes = {n["address"]: n for n in status["upstreams"][0]["nodes"]}
        # Node a left the config but still carries one connection: shown as draining.
        assert nodes[f"127.0.0.1:{a}"]["state"] == "draining"
        assert nodes[f"127.0.0.1:{a}"]["active_connections"] == 1
        for stream in (first, second):
            await stream.send_eof()
            assert await read_all(stream) == b""
            await stream.aclose()
        assert await daemon.metric("l4gw_reloads_total") == 1


async def test_bad_file_on_reload_changes_nothing(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port))
        stream = await open_client(port)
        assert await read_line(stream) == b"a\n"
        reload(daemon, "[upstreams.web]\nnodes = 7\n")
        (line,) = await daemon.wait_log("reload_rejected")
        assert any("upstreams.web.nodes" in p for p in line["problems"])
        # A listener that cannot be bound is a rejected reload too.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            bad = (
                tcp_config([(a, 1)], port)
                + f"""
[[listeners]]
name = "busy"
listen = "127.0.0.1:{busy}"
upstream = "web"
"""
            )
            reload(daemon, bad)
            await daemon.wait_log("reload_rejected", count=2)
        assert await greeting(port) == b"a"
        await stream.send_all(b"ok\n")
        assert await read_line(stream) == b"ok\n"
        await stream.aclose()
        assert await daemon.metric("l4gw_reload_failures_total") == 2
        assert await daemon.metric("l4gw_reloads_total") == 0
        assert daemon.proc.poll() is None


async def test_reload_under_load_refuses_nothing(l4gw_daemon: DaemonFactory) -> None:
    """wrk through the gateway while the file is reloaded 10 times: zero connect errors."""
    wrk = require_program("wrk")
    nginx = require_program("nginx")
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(60):
        backend_port = free_port()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{backend_port}; location / {{ return 200 "ok\\n"; }} }}
}}
"""
        )
        proc = subprocess.Popen([nginx, "-p", tmp, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            port = free_port()
            text = tcp_config([(backend_port, 1)], port, daemon="access_log = false")
            daemon = await l4gw_daemon(text)
            load = subprocess.Popen(
                [
                    wrk,
                    "-t1",
                    "-c20",
                    "-d4s",
                    "-H",
                    "Connection: close",
                    f"http://127.0.0.1:{port}/",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                await trio.sleep(0.5)
                for i in range(10):
                    weight = 1 + i % 3
                    reload(
                        daemon,
                        tcp_config([(backend_port, weight)], port, daemon="access_log = false"),
                    )
                    await daemon.wait_log("reloaded", count=i + 1)
                    await trio.sleep(0.2)
                while load.poll() is None:
                    await trio.sleep(0.05)
                output, _ = load.communicate()
            finally:
                if load.poll() is None:
                    load.kill()
                    load.communicate()
            requests = re.search(r"(\d+) requests in", output)
            assert requests and int(requests.group(1)) > 0, output
            assert "Socket errors" not in output, output  # no connect/read/write errors
            assert "Non-2xx" not in output, output
            assert await daemon.metric("l4gw_reloads_total") == 10
        finally:
            proc.terminate()
            proc.wait()


async def test_connections_of_a_removed_node_get_drain_timeout(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    """A reload that removes a node lets its connections finish for up to drain_timeout,
    then closes them; connections to kept nodes are not touched."""
    with trio.fail_after(40):
        a, b = await backends(["a", "b"])
        port = free_port()
        text = tcp_config([(a, 1), (b, 1)], port).replace(
            'drain_timeout = "10s"', 'drain_timeout = "1s"'
        )
        daemon = await l4gw_daemon(text)
        to_a = await open_client(port)
        assert await read_line(to_a) == b"a\n"
        to_b = await open_client(port)
        assert await read_line(to_b) == b"b\n"
        reload(
            daemon,
            tcp_config([(b, 1)], port).replace('drain_timeout = "10s"', 'drain_timeout = "1s"'),
        )
        (line,) = await daemon.wait_log("reload_draining")
        assert line["connections"] == 1
        await to_a.send_all(b"within the drain time\n")
        assert await read_line(to_a) == b"within the drain time\n"
        assert await read_all(to_a) == b""  # closed once drain_timeout has passed
        await to_a.aclose()
        (closed,) = await daemon.wait_log("connection", node=f"127.0.0.1:{a}")
        assert closed["reason"] == "drained after reload"
        await to_b.send_all(b"untouched\n")
        assert await read_line(to_b) == b"untouched\n"
        await to_b.aclose()
        assert await daemon.metric("l4gw_drained_after_reload_total") == 1


async def _http_ok(stream: trio.SocketStream) -> None:
    """A tiny keep-alive HTTP node: answers every request head with 200 "ok"."""
    buffer = b""
    try:
        while data := await stream.receive_some(65536):
            buffer += data
            while b"\r\n\r\n" in buffer:
                _, _, buffer = buffer.partition(b"\r\n\r\n")
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def test_removed_http_listener_ends_its_keep_alive_connections(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        listeners = await nursery.start(partial(trio.serve_tcp, _http_ok, 0, host="127.0.0.1"))
        node = listeners[0].socket.getsockname()[1]
        port, kept = free_port(), free_port()
        base = tcp_config([(node, 1)], kept)
        http_listener = f"""
[[listeners]]
name = "api"
listen = "127.0.0.1:{port}"
mode = "http"
upstream = "web"
"""
        daemon = await l4gw_daemon(base + http_listener)
        stream = await open_client(port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while not response.endswith(b"ok\n"):
            response += await stream.receive_some(4096)
        assert response.startswith(b"HTTP/1.1 200")
        reload(daemon, base)  # the http listener is gone
        await daemon.wait_log("reloaded")
        assert await read_all(stream) == b""  # the idle keep-alive connection is ended
        await stream.aclose()
        with pytest.raises(OSError):
            await open_client(port)
