"""End-to-end: the real ``l4gw run`` on loopback in tcp mode, with real sockets as clients."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trustme

from l4gw import __version__

from .conftest import (
    REPO,
    DaemonFactory,
    free_port,
    open_client,
    read_all,
    read_line,
)

pytestmark = pytest.mark.e2e

Backends = Callable[[list[str]], Awaitable[list[int]]]


def tcp_config(
    nodes: list[tuple[int, int]],
    port: int,
    *,
    upstream: str = "",
    listener: str = "",
    daemon: str = "",
    host: str = "127.0.0.1",
) -> str:
    node_list = ", ".join(f'{{ address = "127.0.0.1:{p}", weight = {w} }}' for p, w in nodes)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"""
[daemon]
admin = "{{admin}}"
log_level = "info"
log_format = "json"
drain_timeout = "10s"
{daemon}

[upstreams.web]
connect_timeout = "1s"
nodes = [{node_list}]
{upstream}

[[listeners]]
name = "vpc-link"
listen = "{listen}"
upstream = "web"
{listener}
"""


async def greeting(port: int, host: str = "127.0.0.1") -> bytes:
    """Connect through the gateway and return the backend's name line."""
    stream = await open_client(port, host)
    async with stream:
        return (await read_line(stream)).strip()


async def test_exact_smooth_weighted_distribution(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(30):
        a, b, c = await backends(["a", "b", "c"])
        port = free_port()
        await l4gw_daemon(tcp_config([(a, 5), (b, 1), (c, 1)], port))
        seen = [(await greeting(port)).decode() for _ in range(14)]
        assert "".join(seen) == "aabacaa" * 2


async def test_weight_zero_gets_no_connections(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(30):
        a, b = await backends(["a", "b"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 0), (b, 3)], port))
        assert {await greeting(port) for _ in range(6)} == {b"b"}
        status = await daemon.status()
        nodes = {n["address"]: n for n in status["upstreams"][0]["nodes"]}
        assert nodes[f"127.0.0.1:{a}"]["state"] == "draining"
        assert nodes[f"127.0.0.1:{a}"]["connections_total"] == 0


async def test_half_close_client_still_gets_the_whole_reply(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        await l4gw_daemon(tcp_config([(a, 1)], port))
        stream = await open_client(port)
        payload = os.urandom(300_000)
        await stream.send_all(payload)
        await stream.send_eof()  # shut down our write side
        data = await read_all(stream)
        await stream.aclose()
        assert data == b"a\n" + payload


async def test_32_mib_integrity_both_ways(l4gw_daemon: DaemonFactory, backends: Backends) -> None:
    size = 32 * 1024 * 1024
    with trio.fail_after(90):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port))
        stream = await open_client(port)
        assert await read_line(stream) == b"a\n"
        sent = hashlib.sha256()
        received = hashlib.sha256()
        got = 0

        async def sender() -> None:
            chunk = os.urandom(1 << 20)
            for i in range(size // len(chunk)):
                piece = chunk[i:] + chunk[:i]
                sent.update(piece)
                await stream.send_all(piece)
            await stream.send_eof()

        async def receiver() -> None:
            nonlocal got
            while data := await stream.receive_some(1 << 20):
                received.update(data)
                got += len(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
        await stream.aclose()
        assert got == size
        assert received.hexdigest() == sent.hexdigest()
        lines = await daemon.wait_log("connection")
        assert lines[-1]["bytes_in"] == size
        assert lines[-1]["bytes_out"] == size + 2


async def test_300_concurrent_connections(l4gw_daemon: DaemonFactory, backends: Backends) -> None:
    with trio.fail_after(60):
        a, b = await backends(["a", "b"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1), (b, 1)], port))
        streams = [await open_client(port) for _ in range(300)]
        await daemon.wait_log("started")
        results: dict[int, bytes] = {}

        async def talk(i: int, stream: trio.SocketStream) -> None:
            name = await read_line(stream)
            message = f"client {i}\n".encode()
            await stream.send_all(message)
            echoed = await read_line(stream)
            results[i] = name + echoed

        async with trio.open_nursery() as nursery:
            for i, stream in enumerate(streams):
                nursery.start_soon(talk, i, stream)
        assert await daemon.metric("l4gw_active_connections", listener="vpc-link") == 300
        for stream in streams:
            await stream.aclose()
        assert sorted(results) == list(range(300))
        names = [r.split(b"\n")[0] for r in results.values()]
        assert names.count(b"a") == names.count(b"b") == 150
        assert all(r.endswith(f"client {i}\n".encode()) for i, r in results.items())


async def test_retries_go_past_a_dead_node(l4gw_daemon: DaemonFactory, backends: Backends) -> None:
    with trio.fail_after(30):
        (alive,) = await backends(["alive"])
        dead = free_port()  # nothing listens there: connection refused
        port = free_port()
        daemon = await l4gw_daemon(
            tcp_config([(dead, 5), (alive, 1)], port, upstream="retries = 2")
        )
        assert [await greeting(port) for _ in range(6)] == [b"alive"] * 6
        failures = await daemon.metric(
            "l4gw_node_connect_failures_total", upstream="web", node=f"127.0.0.1:{dead}"
        )
        assert failures >= 1
        assert (
            await daemon.metric(
                "l4gw_connections_total", listener="vpc-link", outcome="connect_failed"
            )
            == 0
        )


async def test_all_nodes_dead_closes_and_counts(l4gw_daemon: DaemonFactory) -> None:
    with trio.fail_after(30):
        dead1, dead2, port = free_port(), free_port(), free_port()
        daemon = await l4gw_daemon(tcp_config([(dead1, 1), (dead2, 1)], port))
        stream = await open_client(port)
        assert await read_all(stream) == b""
        await stream.aclose()
        lines = await daemon.wait_log("connection", outcome="connect_failed")
        assert lines[0]["node"] is None
        assert (
            await daemon.metric(
                "l4gw_connections_total", listener="vpc-link", outcome="connect_failed"
            )
            == 1
        )


async def test_all_nodes_drained_is_no_healthy_node(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 0)], port))
        stream = await open_client(port)
        assert await read_all(stream) == b""
        await stream.aclose()
        await daemon.wait_log("connection", outcome="no_healthy_node")


async def test_idle_timeout_closes_the_connection(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port, upstream='idle_timeout = "400ms"'))
        stream = await open_client(port)
        assert await read_line(stream) == b"a\n"
        assert await read_all(stream) == b""  # the gateway closes after 400 ms of silence
        await stream.aclose()
        lines = await daemon.wait_log("connection")
        assert lines[-1]["reason"] == "idle timeout"
        assert await daemon.metric("l4gw_idle_timeouts_total") == 1


async def test_sigterm_drains_then_exits_zero(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(40):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port))
        stream = await open_client(port)
        assert await read_line(stream) == b"a\n"
        await stream.send_all(b"before\n")
        assert await read_line(stream) == b"before\n"
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait_log("stopping")
        code, body = await daemon.get("/healthz")
        assert (code, body) == (503, b"draining\n")
        with pytest.raises(OSError):
            await open_client(port)  # no longer accepting
        # The established connection keeps working mid-transfer.
        payload = os.urandom(2_000_000)
        await stream.send_all(payload)
        await stream.send_eof()
        assert await read_all(stream) == payload
        await stream.aclose()
        assert await daemon.wait_exit() == 0


async def test_second_sigterm_closes_at_once(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port, daemon=""))
        stream = await open_client(port)
        assert await read_line(stream) == b"a\n"
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait_log("stopping")
        daemon.send_signal(signal.SIGTERM)
        assert await read_all(stream) == b""
        assert await daemon.wait_exit() == 0
        await daemon_stream_close(stream)
        assert daemon.logs("drain_cut")


async def daemon_stream_close(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def test_admin_endpoints(l4gw_daemon: DaemonFactory, backends: Backends) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port))
        assert await greeting(port) == b"a"
        assert await daemon.get("/healthz") == (200, b"ok\n")
        status = await daemon.status()
        assert status["listeners"] == [
            {
                "name": "vpc-link",
                "address": f"127.0.0.1:{port}",
                "mode": "tcp",
                "upstream": "web",
                "active_connections": status["listeners"][0]["active_connections"],
                "connections_total": status["listeners"][0]["connections_total"],
            }
        ]
        node = status["upstreams"][0]["nodes"][0]
        assert node["address"] == f"127.0.0.1:{a}"
        assert (node["weight"], node["healthy"], node["source"]) == (1, True, "static")
        _, metrics = await daemon.get("/metrics")
        text = metrics.decode()
        for family in (
            "l4gw_connections_total",
            "l4gw_active_connections",
            "l4gw_bytes_total",
            "l4gw_node_healthy",
            "l4gw_node_active_connections",
        ):
            assert f"# TYPE {family} " in text
        await trio.sleep(0.1)
        assert (
            await daemon.metric("l4gw_connections_total", listener="vpc-link", outcome="proxied")
            == 1
        )
        code, body = await daemon.get("/nope")
        assert code == 404 and json.loads(body) == {"error": "not found", "status": 404}


async def test_access_log_fields(l4gw_daemon: DaemonFactory, backends: Backends) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port))
        stream = await open_client(port)
        await stream.send_all(b"12345\n")
        await stream.send_eof()
        assert await read_all(stream) == b"a\n12345\n"
        await stream.aclose()
        (line,) = await daemon.wait_log("connection")
        assert line["listener"] == "vpc-link"
        assert line["client"].startswith("127.0.0.1:")
        assert line["node"] == f"127.0.0.1:{a}"
        assert (line["bytes_in"], line["bytes_out"]) == (6, 8)
        assert isinstance(line["duration_ms"], float)
        assert line["outcome"] == "proxied"
        assert line["level"] == "info" and "timestamp" in line


async def test_ipv6_listener(l4gw_daemon: DaemonFactory, backends: Backends) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port("::1")
        await l4gw_daemon(tcp_config([(a, 1)], port, host="::1"))
        assert await greeting(port, "::1") == b"a"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4gw", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_bad_config_exits_1_with_key_paths(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.toml")
    with open(path, "w") as f:
        f.write(
            """
[upstreams.web]
nodes = [{ address = "127.0.0.1:80", weight = 5000 }]
colour = "blue"

[[listeners]]
name = "x"
listen = "127.0.0.1:99999"
upstream = "nope"
"""
        )
    for command in ("check", "run"):
        result = run_cli(command, "-c", path)
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr
        assert "upstreams.web.nodes[0].weight" in result.stderr
        assert "upstreams.web.colour" in result.stderr
        assert "listeners[0].listen" in result.stderr
        assert "listeners[0].upstream" in result.stderr


def test_config_path_from_environment(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "missing.toml")
    result = run_cli("check", env={"L4GW_CONFIG": missing})
    assert result.returncode == 1
    assert missing in result.stderr
    assert "Traceback" not in result.stderr


def test_check_accepts_the_example_with_its_certificates(tmp_path: Path) -> None:
    """conf.toml.example is valid as shipped once its certificate files exist."""
    ca = trustme.CA()
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, host in (("api", "api.example.com"), ("www", "www.example.com")):
        cert = ca.issue_cert(host)
        cert.cert_chain_pems[0].write_to_path(str(tls / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(tls / f"{name}.key"))
    ca.cert_pem.write_to_path(str(tls / "internal-ca.pem"))
    example = (REPO / "conf.toml.example").read_text()
    path = tmp_path / "conf.toml"
    path.write_text(example.replace("/etc/l4gw/tls/", f"{tls}/"))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert "Traceback" not in result.stderr
    # Without the files, every missing one is named with its key path.
    missing = run_cli("check", "-c", str(REPO / "conf.toml.example"))
    assert missing.returncode == 1
    assert "listeners[1].tls: /etc/l4gw/tls/api.pem: cannot read the certificate" in missing.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"l4gw {__version__}"


def test_bind_failure_names_listener_and_address(tmp_path: os.PathLike[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = os.path.join(tmp_path, "c.toml")
        with open(path, "w") as f:
            f.write(tcp_config([(1, 1)], port).replace("{admin}", f"127.0.0.1:{free_port()}"))
        result = run_cli("run", "-c", path)
    assert result.returncode == 1
    assert f"listener vpc-link: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("access_log", [True, False])
async def test_access_log_does_not_depend_on_log_level(
    l4gw_daemon: DaemonFactory, backends: Backends, access_log: bool
) -> None:
    """As with nginx's and HAProxy's access logs: log_level = "warning" keeps access lines,
    access_log = false removes them."""
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        text = tcp_config([(a, 1)], port, daemon=f"access_log = {str(access_log).lower()}")
        daemon = await l4gw_daemon(text.replace('log_level = "info"', 'log_level = "warning"'))
        assert await greeting(port) == b"a"
        while not await daemon.metric(
            "l4gw_connections_total", listener="vpc-link", outcome="proxied"
        ):
            await trio.sleep(0.02)  # the connection has ended and been accounted for
        assert daemon.logs("started") == []  # info-level events are filtered...
        assert len(daemon.logs("connection")) == int(access_log)  # ...access lines are not
