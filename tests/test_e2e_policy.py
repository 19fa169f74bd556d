"""End-to-end traffic policy with the real ``l4gw run``: source allow/deny, backend
authorization, the balancing algorithms and the connection limits.

Clients bind distinct loopback sources (127.0.0.2, 127.0.0.3, ...) so that per-source policy
can be exercised on one machine. Backends count the connections they accept, so "nothing was
sent to any node" is checked, not assumed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import (
    REPO,
    DaemonFactory,
    RunningDaemon,
    free_port,
    open_client,
    read_line,
)

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------------------------------------
# Helpers


class Backend:
    """A loopback TCP node that greets with its name, echoes, and counts accepted connections."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.accepted = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            await stream.send_all(self.name.encode() + b"\n")
            while data := await stream.receive_some(1 << 16):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def start_backends(nursery: trio.Nursery, *names: str) -> list[Backend]:
    result = []
    for name in names:
        backend = Backend(name)
        listeners = await nursery.start(
            partial(trio.serve_tcp, backend.handle, 0, host="127.0.0.1")
        )
        backend.port = listeners[0].socket.getsockname()[1]
        result.append(backend)
    return result


def node_list(nodes: list[tuple[Backend, int]]) -> str:
    items = ", ".join(f'{{ address = "127.0.0.1:{b.port}", weight = {w} }}' for b, w in nodes)
    return f"nodes = [{items}]"


def listener_block(name: str, port: int, host: str = "127.0.0.1", extra: str = "") -> str:
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"""
[[listeners]]
name = "{name}"
listen = "{listen}"
upstream = "web"
{extra}
"""


def gateway_config(
    nodes: list[tuple[Backend, int]],
    listeners: str,
    *,
    upstream: str = "",
    top: str = "",
    admin: str = "{admin}",
) -> str:
    """A tcp-mode config: ``top`` goes before the upstream (``[[authorize]]`` entries)."""
    return f"""
[daemon]
admin = "{admin}"
log_level = "info"
log_format = "json"
drain_timeout = "5s"

{top}

[upstreams.web]
connect_timeout = "1s"
{node_list(nodes)}
{upstream}

{listeners}
"""


async def greeting(port: int, source: str | None = None, host: str = "127.0.0.1") -> str:
    """Connect through the gateway, check the echo, return the node's name."""
    stream = await open_client(port, host, source=source)
    async with stream:
        name = (await read_line(stream)).strip().decode()
        await stream.send_all(b"ping\n")
        assert await read_line(stream) == b"ping\n"
        return name


async def assert_refused(stream: trio.SocketStream) -> None:
    """The gateway closed the connection (EOF or reset) without a byte from any node."""
    try:
        data = await stream.receive_some(4096)
    except trio.BrokenResourceError:
        data = b""
    await stream.aclose()
    assert data == b""


async def refused(port: int, source: str | None = None, host: str = "127.0.0.1") -> None:
    """Connect and expect the gateway to close at once. The reset may beat the end of our
    own ``connect`` (then the connect itself fails with ECONNRESET)."""
    try:
        stream = await open_client(port, host, source=source)
    except ConnectionResetError:
        return
    await assert_refused(stream)


async def outcome_count(daemon: RunningDaemon, listener: str, outcome: str) -> float:
    return await daemon.metric("l4gw_connections_total", listener=listener, outcome=outcome)


async def node_active(daemon: RunningDaemon) -> dict[int, int]:
    """Active connections per node port, from ``/status``."""
    status = await daemon.status()
    return {
        int(node["address"].rpartition(":")[2]): node["active_connections"]
        for node in status["upstreams"][0]["nodes"]
    }


async def wait_idle(daemon: RunningDaemon, listener: str = "gw") -> None:
    """Until the daemon has accounted every closed connection (no active one left)."""
    while await daemon.metric("l4gw_active_connections", listener=listener) != 0:
        await trio.sleep(0.01)


def client_ip(line: dict[str, Any]) -> str:
    return str(line["client"]).rpartition(":")[0]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4gw", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "L4GW_CONFIG"},
    )


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# 1. Source allow/deny


async def test_allow_and_deny_by_source(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        a, b = await start_backends(nursery, "a", "b")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 1), (b, 1)],
                listener_block(
                    "gw",
                    port,
                    extra='allow = ["127.0.0.0/29"]\ndeny = ["127.0.0.3/32", "127.0.0.6/31"]',
                ),
            )
        )
        # .0-.7 allowed by the /29, minus .3 and .6-.7 denied; .8 and .9 are outside allow.
        allowed = ["127.0.0.2", "127.0.0.4", "127.0.0.5"]
        denied = ["127.0.0.3", "127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"]
        for i in range(2, 10):
            source = f"127.0.0.{i}"
            if source in allowed:
                assert await greeting(port, source) in ("a", "b")
            else:
                await refused(port, source)
        lines = await daemon.wait_log("connection", count=8)
        assert sorted(client_ip(line) for line in lines if line["outcome"] == "denied") == denied
        assert sorted(client_ip(line) for line in lines if line["outcome"] == "proxied") == allowed
        for line in lines:
            if line["outcome"] == "denied":
                assert line["node"] is None
                assert (line["bytes_in"], line["bytes_out"]) == (0, 0)
        assert await outcome_count(daemon, "gw", "denied") == 5
        assert await outcome_count(daemon, "gw", "proxied") == 3
        # Nothing reached any node for the denied clients.
        assert a.accepted + b.accepted == 3


async def test_denied_client_sending_data_reaches_no_node(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        (a,) = await start_backends(nursery, "a")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config([(a, 1)], listener_block("gw", port, extra='deny = ["127.0.0.2/32"]'))
        )
        for _ in range(5):
            try:
                stream = await open_client(port, source="127.0.0.2")
            except ConnectionResetError:
                continue
            try:
                await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            except trio.BrokenResourceError:
                pass
            await assert_refused(stream)
        await daemon.wait_log("connection", count=5, outcome="denied")
        assert await greeting(port, "127.0.0.3") == "a"
        assert a.accepted == 1
        assert await outcome_count(daemon, "gw", "denied") == 5


async def test_ipv6_allow_and_deny(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    with trio.fail_after(30):
        (a,) = await start_backends(nursery, "a")
        open_port, closed_port, v4_only = (free_port("::1") for _ in range(3))
        listeners = (
            listener_block("v6-allow", open_port, "::1", 'allow = ["::1/128"]')
            + listener_block("v6-deny", closed_port, "::1", 'deny = ["::1/128"]')
            # An allow list of IPv4 networks refuses every IPv6 peer.
            + listener_block("v4-only", v4_only, "::1", 'allow = ["127.0.0.0/8"]')
        )
        daemon = await l4gw_daemon(gateway_config([(a, 1)], listeners))
        assert await greeting(open_port, host="::1") == "a"
        await refused(closed_port, host="::1")
        await refused(v4_only, host="::1")
        await daemon.wait_log("connection", count=2, outcome="denied")
        (line,) = await daemon.wait_log("connection", listener="v6-deny")
        assert line["outcome"] == "denied" and client_ip(line) == "::1"
        assert await outcome_count(daemon, "v6-allow", "proxied") == 1
        assert await outcome_count(daemon, "v6-deny", "denied") == 1
        assert await outcome_count(daemon, "v4-only", "denied") == 1
        assert a.accepted == 1


async def test_thousand_entry_allow_list(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        (a,) = await start_backends(nursery, "a")
        port = free_port()
        networks = [f'"10.{i // 250}.{i % 250}.0/24"' for i in range(999)]
        networks.insert(500, '"127.0.0.4/32"')
        assert len(networks) == 1000
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 1)], listener_block("gw", port, extra=f"allow = [{', '.join(networks)}]")
            )
        )
        assert await greeting(port, "127.0.0.4") == "a"
        await refused(port, "127.0.0.5")
        await refused(port, "127.0.0.1")
        assert await greeting(port, "127.0.0.4") == "a"
        await daemon.wait_log("connection", count=2, outcome="proxied")
        assert await outcome_count(daemon, "gw", "denied") == 2
        assert a.accepted == 2


# --------------------------------------------------------------------------------------------
# 2. Backend authorization


def authorize(name: str, address: str, ports: str) -> str:
    return f'[[authorize]]\nname = "{name}"\naddress = "{address}"\nports = {ports}\n'


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "conf.toml"
    path.write_text(text.replace("{admin}", f"127.0.0.1:{free_port()}"))
    return str(path)


def test_unauthorized_static_node_fails_check_and_run(tmp_path: Path) -> None:
    node = Backend("a")
    node.port = free_port()
    text = gateway_config(
        [(node, 1)],
        listener_block("gw", free_port()),
        top=authorize("private-web", "10.0.1.0/24", '[80, "8000-8099"]'),
    )
    path = write_config(tmp_path, text)
    for command in ("check", "run"):
        result = run_cli(command, "-c", path)
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr
        assert "upstreams.web.nodes[0]" in result.stderr
        assert f"127.0.0.1:{node.port}" in result.stderr
        assert "private-web" in result.stderr
        assert "10.0.1.0/24" in result.stderr
        assert "8000-8099" in result.stderr


def test_authorized_ip_on_unauthorized_port_fails_at_load(tmp_path: Path) -> None:
    node = Backend("a")
    node.port = free_port()
    ports = f'["{node.port + 1}-{min(node.port + 100, 65535)}", {node.port - 1}]'
    text = gateway_config(
        [(node, 1)],
        listener_block("gw", free_port()),
        top=authorize("loopback", "127.0.0.1/32", ports),
    )
    path = write_config(tmp_path, text)
    for command in ("check", "run"):
        result = run_cli(command, "-c", path)
        assert result.returncode == 1, result
        assert f"127.0.0.1:{node.port}" in result.stderr
        assert "not permitted" in result.stderr
        assert "loopback" in result.stderr


async def test_authorized_nodes_serve_and_reload_cannot_add_unauthorized(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(40):
        a, b, c = await start_backends(nursery, "a", "b", "c")
        port = free_port()
        rules = authorize("ab", "127.0.0.1/32", f"[{a.port}, {b.port}]")
        listener = listener_block("gw", port)
        daemon = await l4gw_daemon(gateway_config([(a, 1), (b, 1)], listener, top=rules))
        assert [await greeting(port) for _ in range(4)] == ["a", "b", "a", "b"]

        # A reload that adds node c, which no entry covers, is rejected as a whole.
        daemon.write_config(
            gateway_config([(a, 1), (b, 1), (c, 1)], listener, top=rules, admin=daemon.admin)
        )
        daemon.send_signal(signal.SIGHUP)
        (rejected,) = await daemon.wait_log("reload_rejected")
        assert any(f"127.0.0.1:{c.port}" in problem for problem in rejected["problems"])
        assert await daemon.metric("l4gw_reload_failures_total") == 1
        assert {await greeting(port) for _ in range(6)} == {"a", "b"}
        assert c.accepted == 0
        status = await daemon.status()
        assert len(status["upstreams"][0]["nodes"]) == 2

        # Covering c with an entry makes the same node list acceptable.
        wider = rules + authorize("c", "127.0.0.1/32", f"[{c.port}]")
        daemon.write_config(
            gateway_config([(a, 1), (b, 1), (c, 1)], listener, top=wider, admin=daemon.admin)
        )
        daemon.send_signal(signal.SIGHUP)
        await daemon.wait_log("reloaded")
        assert {await greeting(port) for _ in range(6)} == {"a", "b", "c"}
        assert c.accepted == 2


# --------------------------------------------------------------------------------------------
# 3. Balancing algorithms


async def test_round_robin_exact_order(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        a, b, c = await start_backends(nursery, "a", "b", "c")
        port = free_port()
        await l4gw_daemon(
            gateway_config(
                [(a, 3), (b, 2), (c, 1)],
                listener_block("gw", port),
                upstream='balance = "round_robin"',
            )
        )
        seen = "".join([await greeting(port) for _ in range(12)])
        # Smooth weighted round robin (nginx): spread out, each node `weight` times per 6.
        assert seen == "abacba" * 2


async def test_least_conn_sends_new_connections_to_the_idle_node(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        a, b = await start_backends(nursery, "a", "b")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 1), (b, 1)], listener_block("gw", port), upstream='balance = "least_conn"'
            )
        )
        held = await open_client(port)
        busy = (await read_line(held)).strip().decode()
        other = "b" if busy == "a" else "a"
        # While one connection is held on `busy`, every new one goes to the other node
        # (round robin would alternate).
        for _ in range(6):
            assert await greeting(port) == other
            await wait_idle_but(daemon, 1)
        await held.aclose()
        await wait_idle(daemon)

        # Held connections spread evenly over equal weights.
        holders = [await open_client(port) for _ in range(4)]
        names = Counter([(await read_line(s)).strip().decode() for s in holders])
        assert names == Counter({"a": 2, "b": 2})
        for stream in holders:
            await stream.aclose()


async def wait_idle_but(daemon: RunningDaemon, count: int, listener: str = "gw") -> None:
    while await daemon.metric("l4gw_active_connections", listener=listener) != count:
        await trio.sleep(0.01)


async def test_least_conn_weights(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        a, b = await start_backends(nursery, "a", "b")
        port = free_port()
        await l4gw_daemon(
            gateway_config(
                [(a, 3), (b, 1)], listener_block("gw", port), upstream='balance = "least_conn"'
            )
        )
        holders = [await open_client(port) for _ in range(8)]
        names = Counter([(await read_line(s)).strip().decode() for s in holders])
        assert names == Counter({"a": 6, "b": 2})
        for stream in holders:
            await stream.aclose()


async def test_random_two_follows_weights(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(60):
        a, b = await start_backends(nursery, "a", "b")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 3), (b, 1)], listener_block("gw", port), upstream='balance = "random_two"'
            )
        )
        names: Counter[str] = Counter()
        for _ in range(200):
            names[await greeting(port)] += 1
            await wait_idle(daemon)  # an idle pool: the first draw wins, by weight
        # Expected 150:50 (standard deviation ~6); the bounds are loose on purpose.
        assert 120 <= names["a"] <= 180, names
        assert names["a"] + names["b"] == 200


async def test_source_hash_is_sticky_per_source(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(60):
        backends = await start_backends(nursery, "a", "b", "c")
        port = free_port()
        await l4gw_daemon(
            gateway_config(
                [(node, 1) for node in backends],
                listener_block("gw", port),
                upstream='balance = "source_hash"',
            )
        )
        chosen: dict[str, str] = {}
        for i in range(2, 22):
            source = f"127.0.0.{i}"
            seen = {await greeting(port, source) for _ in range(3)}
            assert len(seen) == 1, (source, seen)
            chosen[source] = seen.pop()
        # The same sources again, in another order: still the same nodes.
        for source in reversed(list(chosen)):
            assert await greeting(port, source) == chosen[source]
        # 20 sources over 3 equal nodes: all on one node has probability ~3**-19.
        assert len(set(chosen.values())) >= 2


# --------------------------------------------------------------------------------------------
# 4. Limits


async def test_listener_max_connections(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        a, b = await start_backends(nursery, "a", "b")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 1), (b, 1)], listener_block("gw", port, extra="max_connections = 3")
            )
        )
        held = [await open_client(port) for _ in range(3)]
        for stream in held:
            assert (await read_line(stream)).strip() in (b"a", b"b")
        await refused(port)
        (line,) = await daemon.wait_log("connection", outcome="max_connections")
        assert line["node"] is None
        assert await outcome_count(daemon, "gw", "max_connections") == 1
        assert a.accepted + b.accepted == 3
        # Once one closes, a new connection is admitted.
        await held.pop().aclose()
        await wait_idle_but(daemon, 2)
        assert await greeting(port) in ("a", "b")
        for stream in held:
            await stream.aclose()
        await wait_idle(daemon)
        assert await outcome_count(daemon, "gw", "proxied") == 4
        assert await outcome_count(daemon, "gw", "max_connections") == 1


async def test_max_connections_per_node(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        a, b = await start_backends(nursery, "a", "b")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 1), (b, 1)],
                listener_block("gw", port),
                upstream="max_connections_per_node = 1",
            )
        )
        first, second = await open_client(port), await open_client(port)
        names = {(await read_line(first)).strip(), (await read_line(second)).strip()}
        assert names == {b"a", b"b"}
        await refused(port)
        (line,) = await daemon.wait_log("connection", outcome="no_healthy_node")
        assert line["node"] is None
        assert await outcome_count(daemon, "gw", "no_healthy_node") == 1
        assert a.accepted + b.accepted == 2
        assert set((await node_active(daemon)).values()) == {1}
        # A freed node takes the next connection.
        await first.aclose()
        await wait_idle_but(daemon, 1)
        assert await greeting(port) in ("a", "b")
        await second.aclose()


async def test_max_connections_per_node_holds_under_a_burst(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        a, b = await start_backends(nursery, "a", "b")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 1), (b, 1)],
                listener_block("gw", port),
                upstream='balance = "least_conn"\nmax_connections_per_node = 1',
            )
        )
        # Six connections queued at once: the gateway accepts them in one batch, so their
        # node picks overlap with each other's connects. Still at most one per node.
        streams: list[trio.SocketStream] = []
        for _ in range(6):
            try:
                streams.append(await open_client(port))
            except ConnectionResetError:
                pass
        names: list[bytes] = []
        for stream in streams:
            try:
                names.append((await read_line(stream)).strip())
            except trio.BrokenResourceError:
                names.append(b"")
        assert sorted(name for name in names if name) == [b"a", b"b"]
        assert a.accepted == b.accepted == 1
        await daemon.wait_log("connection", count=4, outcome="no_healthy_node")
        for stream in streams:
            await stream.aclose()


async def test_rate_limit_per_source(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        (a,) = await start_backends(nursery, "a")
        port = free_port()
        daemon = await l4gw_daemon(
            gateway_config(
                [(a, 1)],
                listener_block("gw", port, extra="rate_limit = 2\nrate_limit_burst = 2"),
            )
        )
        # Three connections opened back to back from one source: the kernel queues all three
        # before the gateway accepts them, so the bucket has no time to refill.
        streams = [await open_client(port, source="127.0.0.2") for _ in range(2)]
        await refused(port, source="127.0.0.2")
        assert (await read_line(streams[0])).strip() == b"a"
        assert (await read_line(streams[1])).strip() == b"a"
        # Another source has its own bucket.
        assert await greeting(port, "127.0.0.3") == "a"
        (line,) = await daemon.wait_log("connection", outcome="rate_limited")
        assert client_ip(line) == "127.0.0.2" and line["node"] is None
        assert await outcome_count(daemon, "gw", "rate_limited") == 1
        assert a.accepted == 3
        for stream in streams:
            await stream.aclose()
