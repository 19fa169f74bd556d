"""End-to-end: active health checks, passive ejection, fail_open and DNS discovery with the real
``l4gw run`` on loopback, real backends (stopped and restarted on the same port) and a real
dnsmasq. Behaviour under test: ``docs/health.md``."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import (
    DaemonFactory,
    RunningDaemon,
    free_port,
    open_client,
    read_line,
    require_program,
)
from .test_discovery import Dnsmasq

pytestmark = pytest.mark.e2e

#: Generous bounds (real seconds): correctness, not speed, is under test.
TIMEOUT = 40
DNS_TIMEOUT = 60


# --------------------------------------------------------------------------------------
# Backends that can be stopped and restarted on the same port


Behaviour = Callable[["Backend", trio.SocketStream], Awaitable[None]]


async def greet_and_echo(backend: Backend, stream: trio.SocketStream) -> None:
    """Greet with the backend's name at once, then echo until EOF."""
    backend.served += 1
    await stream.send_all(backend.name.encode() + b"\n")
    while data := await stream.receive_some(1 << 16):
        await stream.send_all(data)


async def http_or_echo(backend: Backend, stream: trio.SocketStream) -> None:
    """Look at the first bytes: an HTTP ``GET`` (a health check) gets ``backend.http_status``;
    anything else gets the name line, then everything echoed (the first bytes included)."""
    data = await stream.receive_some(1 << 16)
    if data.startswith(b"GET "):
        while b"\r\n\r\n" not in data and len(data) < 16384:
            more = await stream.receive_some(1 << 16)
            if not more:
                return
            data += more
        backend.requests.append(data.split(b"\r\n\r\n")[0].decode())
        status = backend.http_status
        await stream.send_all(
            f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        return
    backend.served += 1
    await stream.send_all(backend.name.encode() + b"\n" + data)
    while data := await stream.receive_some(1 << 16):
        await stream.send_all(data)


class Backend:
    """A loopback TCP backend whose listener can be closed and opened again on the same port.
    Counts the connections it accepted."""

    def __init__(
        self, nursery: trio.Nursery, name: str, behaviour: Behaviour, host: str = "127.0.0.1"
    ) -> None:
        self.nursery = nursery
        self.name = name
        self.behaviour = behaviour
        self.host = host
        self.port = 0
        self.accepted = 0
        #: Connections served as traffic (not health checks).
        self.served = 0
        self.http_status = 200
        self.requests: list[str] = []
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            await self.behaviour(self, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def start(self) -> None:
        """Listen (on ``port``, or a fresh one the first time)."""
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[Any]) -> None:
            try:
                with scope:
                    await trio.serve_tcp(
                        self._handle, self.port, host=self.host, task_status=task_status
                    )
            finally:
                stopped.set()

        listeners = await self.nursery.start(run)
        self.port = listeners[0].socket.getsockname()[1]
        self._scope, self._stopped = scope, stopped

    async def stop(self) -> None:
        """Close the listener (and the connections it accepted); the port refuses from now."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def start_backend(
    nursery: trio.Nursery, name: str, behaviour: Behaviour = greet_and_echo, **kw: Any
) -> Backend:
    backend = Backend(nursery, name, behaviour, **kw)
    await backend.start()
    return backend


# --------------------------------------------------------------------------------------
# Config and clients


def config(
    port: int,
    nodes: list[str],
    *,
    upstream: str = "",
    health: str = "",
    extra: str = "",
) -> str:
    node_list = ", ".join(f'{{ address = "{a}", weight = 1 }}' for a in nodes)
    return f"""
[daemon]
admin = "{{admin}}"
log_level = "info"
log_format = "json"
drain_timeout = "2s"

{extra}

[upstreams.web]
connect_timeout = "1s"
nodes = [{node_list}]
{upstream}

[upstreams.web.health]
{health}

[[listeners]]
name = "vpc-link"
listen = "127.0.0.1:{port}"
upstream = "web"
"""


async def greeting(port: int) -> str:
    """Connect through the gateway; the backend's name, or "" if the gateway closed."""
    stream = await open_client(port)
    async with stream:
        try:
            return (await read_line(stream)).decode().strip()
        except trio.BrokenResourceError:
            return ""


async def hello(port: int) -> str:
    """Send first (for ``http_or_echo`` backends); the name, or "" if the gateway closed."""
    stream = await open_client(port)
    async with stream:
        try:
            await stream.send_all(b"ping\n")
            name = (await read_line(stream)).decode().strip()
            if name:
                assert await read_line(stream) == b"ping\n"
            return name
        except trio.BrokenResourceError:
            return ""


async def node_entry(daemon: RunningDaemon, address: str) -> dict[str, Any]:
    status = await daemon.status()
    (upstream,) = status["upstreams"]
    nodes = {n["address"]: n for n in upstream["nodes"]}
    entry: dict[str, Any] = nodes[address]
    return entry


async def wait_metric(daemon: RunningDaemon, name: str, value: float, **labels: str) -> None:
    """Wait until a sample reaches ``value`` (counters of a connection are updated when it
    ends, a moment after the client saw its end)."""
    while await daemon.metric(name, **labels) != value:
        await trio.sleep(0.05)


async def wait_status(daemon: RunningDaemon, address: str, **fields: Any) -> dict[str, Any]:
    while True:
        entry = await node_entry(daemon, address)
        if all(entry.get(k) == v for k, v in fields.items()):
            return entry
        await trio.sleep(0.05)


FAST_TCP = """
check = "tcp"
interval = "200ms"
timeout = "150ms"
healthy_threshold = 2
unhealthy_threshold = 2
"""


# --------------------------------------------------------------------------------------
# 1. Active tcp check: a node stopped and restarted


async def test_tcp_check_node_stopped_and_restarted(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        a = await start_backend(nursery, "a")
        b = await start_backend(nursery, "b")
        port = free_port()
        daemon = await l4gw_daemon(config(port, [a.address, b.address], health=FAST_TCP))
        assert Counter([await greeting(port) for _ in range(4)]) == {"a": 2, "b": 2}
        # Both nodes have passed a check: from here on the thresholds apply.
        await wait_status(daemon, a.address, last_check="connected")
        await wait_status(daemon, b.address, last_check="connected")

        await a.stop()
        (event,) = await daemon.wait_log("node_health", node=a.address, healthy=False)
        assert event["upstream"] == "web"
        assert event["state"] == "down"
        assert event["reason"] == "2 consecutive checks failed: connect refused"
        entry = await node_entry(daemon, a.address)
        assert entry["state"] == "down"
        assert entry["healthy"] is False
        assert entry["last_check"] == "connect refused"
        assert entry["reason"] == "2 consecutive checks failed: connect refused"
        assert await daemon.metric("l4gw_node_healthy", upstream="web", node=a.address) == 0
        assert await daemon.metric("l4gw_node_healthy", upstream="web", node=b.address) == 1
        # Every new connection goes to the node that is up; none fails.
        assert [await greeting(port) for _ in range(6)] == ["b"] * 6

        await a.start()  # the same port again
        (event,) = await daemon.wait_log("node_health", node=a.address, healthy=True)
        assert event["state"] == "up"
        assert event["reason"] == "2 consecutive checks passed: connected"
        entry = await node_entry(daemon, a.address)
        assert (entry["state"], entry["healthy"], entry["last_check"]) == ("up", True, "connected")
        assert await daemon.metric("l4gw_node_healthy", upstream="web", node=a.address) == 1
        assert Counter([await greeting(port) for _ in range(4)]) == {"a": 2, "b": 2}
        await wait_metric(
            daemon, "l4gw_connections_total", 14, listener="vpc-link", outcome="proxied"
        )
        assert await daemon.metric("l4gw_ejections_total", upstream="web") == 0


# --------------------------------------------------------------------------------------
# 2. Active http check: 500, then 200 again


async def test_http_check_status_500_then_200(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        a = await start_backend(nursery, "a", http_or_echo)
        b = await start_backend(nursery, "b", http_or_echo)
        port = free_port()
        health = FAST_TCP.replace('"tcp"', '"http"') + 'path = "/healthz"\n'
        daemon = await l4gw_daemon(config(port, [a.address, b.address], health=health))
        await wait_status(daemon, a.address, last_check="status 200")
        request = a.requests[0].split("\r\n")
        assert request[0] == "GET /healthz HTTP/1.1"
        assert f"host: {a.address}" in [line.lower() for line in request[1:]]
        assert "user-agent: l4gw-health-check" in [line.lower() for line in request[1:]]

        a.http_status = 500
        (event,) = await daemon.wait_log("node_health", node=a.address, healthy=False)
        assert event["reason"] == "2 consecutive checks failed: status 500"
        entry = await node_entry(daemon, a.address)
        assert (entry["state"], entry["healthy"]) == ("down", False)
        assert entry["last_check"] == "status 500"
        assert await daemon.metric("l4gw_node_healthy", upstream="web", node=a.address) == 0
        assert [await hello(port) for _ in range(4)] == ["b"] * 4

        a.http_status = 200
        (event,) = await daemon.wait_log("node_health", node=a.address, healthy=True)
        assert event["reason"] == "2 consecutive checks passed: status 200"
        entry = await node_entry(daemon, a.address)
        assert (entry["state"], entry["healthy"], entry["last_check"]) == ("up", True, "status 200")
        assert await daemon.metric("l4gw_node_healthy", upstream="web", node=a.address) == 1
        assert Counter([await hello(port) for _ in range(4)]) == {"a": 2, "b": 2}
        assert await daemon.metric("l4gw_health_checks_failed_total", upstream="web") >= 2


# --------------------------------------------------------------------------------------
# 3. Passive ejection of a dead port (no active checks)


@pytest.mark.parametrize(
    ("retries", "expected"),
    [
        # Round robin 1:1 from a fresh start picks dead, alive, dead, alive, dead (the dead
        # node is first in the list and wins the tie). With retries = 1 each pick of the dead
        # node is a failed client connection; the third consecutive connect failure
        # (passive_failures = 3) ejects it, so exactly connections 1, 3 and 5 fail.
        (1, ["", "b", "", "b", ""] + ["b"] * 7),
        # With retries = 2 each failed attempt on the dead node is retried on the live one in
        # the same client connection: no client sees a failure, the node is still ejected
        # after 3 failed attempts (during client connection 5).
        (2, ["b"] * 12),
    ],
)
async def test_passive_ejection_of_a_dead_port(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, retries: int, expected: list[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        b = await start_backend(nursery, "b")
        port = free_port()
        daemon = await l4gw_daemon(
            config(port, [dead, b.address], upstream=f"retries = {retries}", health="")
        )
        seen = [await greeting(port) for _ in range(12)]
        assert seen == expected
        failed = seen.count("")
        assert failed == (3 if retries == 1 else 0)
        await wait_metric(
            daemon, "l4gw_connections_total", 12 - failed, listener="vpc-link", outcome="proxied"
        )
        assert (
            await daemon.metric(
                "l4gw_connections_total", listener="vpc-link", outcome="connect_failed"
            )
            == failed
        )
        # The dead node was tried exactly 3 times, then never again.
        assert len(daemon.logs("connect_failed")) == 3
        (event,) = daemon.logs("node_health")
        assert (event["node"], event["healthy"], event["state"]) == (dead, False, "ejected")
        assert event["reason"] == "3 consecutive connect failures: ejected for 30s"
        entry = await node_entry(daemon, dead)
        assert (entry["state"], entry["healthy"], entry["ejections"]) == ("ejected", False, 1)
        assert entry["connect_failures"] == 3
        assert await daemon.metric("l4gw_ejections_total", upstream="web") == 1
        assert await daemon.metric("l4gw_node_healthy", upstream="web", node=dead) == 0
        assert b.served == 12 - failed


# --------------------------------------------------------------------------------------
# 4. Every node failing its checks: fail_open


@pytest.mark.parametrize("fail_open", [True, False])
async def test_all_nodes_failing_checks_fail_open(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, fail_open: bool
) -> None:
    with trio.fail_after(TIMEOUT):
        a = await start_backend(nursery, "a", http_or_echo)
        b = await start_backend(nursery, "b", http_or_echo)
        a.http_status = b.http_status = 500  # /healthz fails, traffic would be served
        port = free_port()
        health = f"""
check = "http"
path = "/healthz"
interval = "200ms"
timeout = "150ms"
fail_open = {str(fail_open).lower()}
"""
        daemon = await l4gw_daemon(config(port, [a.address, b.address], health=health))
        # A static node's first failed check takes it down at once.
        events = await daemon.wait_log("node_health", count=2, healthy=False)
        assert {e["node"] for e in events} == {a.address, b.address}
        assert {e["reason"] for e in events} == {"first check failed: status 500"}
        for node in (a, b):
            assert await daemon.metric("l4gw_node_healthy", upstream="web", node=node.address) == 0
        seen = [await hello(port) for _ in range(6)]
        traffic = a.served + b.served
        outcomes = Counter(e["outcome"] for e in await daemon.wait_log("connection", count=6))
        if fail_open:
            # Health is ignored: spread over every node, as round robin would anyway.
            assert Counter(seen) == {"a": 3, "b": 3}
            assert traffic == 6
            assert outcomes == {"proxied": 6}
            assert (
                await daemon.metric(
                    "l4gw_connections_total", listener="vpc-link", outcome="proxied"
                )
                == 6
            )
        else:
            assert seen == [""] * 6  # closed at once
            assert traffic == 0  # no node was even connected to
            assert outcomes == {"no_healthy_node": 6}
            assert (
                await daemon.metric(
                    "l4gw_connections_total", listener="vpc-link", outcome="no_healthy_node"
                )
                == 6
            )
        assert await daemon.metric("l4gw_ejections_total", upstream="web") == 0


# --------------------------------------------------------------------------------------
# 5. DNS discovery against a real dnsmasq


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[Dnsmasq]:
    """A real dnsmasq on a loopback port (the helper of tests/test_discovery.py)."""
    require_program("dnsmasq")
    directory = tmp_path / "dnsmasq"
    directory.mkdir()
    server = Dnsmasq(directory)
    server.write_hosts()
    server.start()
    try:
        yield server
    finally:
        server.stop()  # by its PID


async def start_pair(nursery: trio.Nursery) -> tuple[Backend, Backend]:
    """Backends "n2" on 127.0.0.2 and "n3" on 127.0.0.3, on the same port."""
    for _ in range(20):
        n2 = await start_backend(nursery, "n2", host="127.0.0.2")
        n3 = Backend(nursery, "n3", greet_and_echo, host="127.0.0.3")
        n3.port = n2.port
        try:
            await n3.start()
        except OSError:
            await n2.stop()
            continue
        return n2, n3
    raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")


def discovery_config(port: int, section: str, extra: str = "") -> str:
    return f"""
[daemon]
admin = "{{admin}}"
log_level = "info"
log_format = "json"
drain_timeout = "2s"

{extra}

[upstreams.web]
connect_timeout = "1s"

[upstreams.web.discovery]
{section}

[[listeners]]
name = "vpc-link"
listen = "127.0.0.1:{port}"
upstream = "web"
"""


async def test_dns_a_records_change_and_resolver_down(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, dns_server: Dnsmasq
) -> None:
    with trio.fail_after(DNS_TIMEOUT):
        n2, n3 = await start_pair(nursery)
        dns_server.write_hosts("127.0.0.2 web.test")
        dns_server.reload()
        port = free_port()
        section = f"""
name = "web.test"
type = "A"
port = {n2.port}
resolver = "{dns_server.resolver}"
interval = "300ms"
"""
        daemon = await l4gw_daemon(discovery_config(port, section))
        # The first lookup is done before the daemon is ready.
        assert [await greeting(port) for _ in range(3)] == ["n2"] * 3
        entry = await node_entry(daemon, n2.address)
        assert (entry["source"], entry["state"]) == ("dns", "up")

        held = await open_client(port)
        async with held:
            assert await read_line(held) == b"n2\n"
            dns_server.write_hosts("127.0.0.3 web.test")
            dns_server.reload()
            await daemon.wait_log("discovery_changed", added=[n3.address], removed=[n2.address])
            assert [await greeting(port) for _ in range(4)] == ["n3"] * 4
            # The established connection to the node that left is untouched.
            await held.send_all(b"still here\n")
            assert await read_line(held) == b"still here\n"
            left = await node_entry(daemon, n2.address)
            assert (left["state"], left["active_connections"]) == ("draining", 1)
            entry = await node_entry(daemon, n3.address)
            assert (entry["source"], entry["state"]) == ("dns", "up")

        # Resolver down: the last good set stays.
        failures = await daemon.metric("l4gw_discovery_failures_total", upstream="web")
        dns_server.stop()
        while await daemon.metric("l4gw_discovery_failures_total", upstream="web") <= failures:
            await trio.sleep(0.1)
        await daemon.wait_log("discovery_failed", upstream="web")
        assert [await greeting(port) for _ in range(3)] == ["n3"] * 3
        status = await daemon.status()
        (upstream,) = status["upstreams"]
        assert [(n["address"], n["source"]) for n in upstream["nodes"]] == [(n3.address, "dns")]
        assert (n2.served, n3.served) == (4, 7)


async def test_dns_srv_ports_and_weights(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, dns_server: Dnsmasq
) -> None:
    with trio.fail_after(DNS_TIMEOUT):
        n2 = await start_backend(nursery, "n2", host="127.0.0.2")
        n3 = await start_backend(nursery, "n3", host="127.0.0.3")
        dns_server.write_hosts("127.0.0.2 n2.test", "127.0.0.3 n3.test")
        dns_server.restart(
            f"srv-host=_web._tcp.svc.test,n2.test,{n2.port},10,30",
            f"srv-host=_web._tcp.svc.test,n3.test,{n3.port},10,10",
            "srv-host=_web._tcp.svc.test,n3.test,1,20,100",  # lower priority group: unused
        )
        port = free_port()
        section = f"""
name = "_web._tcp.svc.test"
type = "SRV"
resolver = "{dns_server.resolver}"
interval = "300ms"
"""
        daemon = await l4gw_daemon(discovery_config(port, section))
        status = await daemon.status()
        (upstream,) = status["upstreams"]
        assert [(n["address"], n["weight"], n["source"]) for n in upstream["nodes"]] == [
            (n2.address, 1000, "dns"),  # SRV weight 30 -> 1000
            (n3.address, 333, "dns"),  # SRV weight 10 -> 333 (ratio kept)
        ]
        # Smooth weighted round robin of 1000:333 from a fresh start, exactly.
        seen = [await greeting(port) for _ in range(8)]
        assert seen == ["n2", "n2", "n3", "n2", "n2", "n2", "n3", "n2"]
        assert (n2.served, n3.served) == (6, 2)


async def test_dns_unauthorized_address_never_gets_a_connection(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, dns_server: Dnsmasq
) -> None:
    with trio.fail_after(DNS_TIMEOUT):
        n2, n3 = await start_pair(nursery)
        dns_server.write_hosts("127.0.0.2 web.test", "127.0.0.3 web.test")
        dns_server.reload()
        port = free_port()
        section = f"""
name = "web.test"
type = "A"
port = {n2.port}
resolver = "{dns_server.resolver}"
interval = "300ms"
"""
        authorize = f"""
[[authorize]]
name = "only-two"
address = "127.0.0.2"
ports = [{n2.port}]
"""
        daemon = await l4gw_daemon(discovery_config(port, section, authorize))
        assert [await greeting(port) for _ in range(8)] == ["n2"] * 8
        assert n3.accepted == 0
        assert n2.accepted == 8
        assert await daemon.metric("l4gw_unauthorized_nodes_dropped_total", upstream="web") > 0
        events = daemon.logs("node_unauthorized")
        assert events
        assert {e["node"] for e in events} == {n3.address}
        status = await daemon.status()
        (upstream,) = status["upstreams"]
        assert [n["address"] for n in upstream["nodes"]] == [n2.address]
        assert upstream["unauthorized_dropped"] > 0
