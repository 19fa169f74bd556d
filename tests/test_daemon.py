"""The daemon in this process: what it owns (reactor, deadline sweeper, node pool) ends with
its drain; the drain waits for the last connection without polling."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from l4gw.core.config import parse_config
from l4gw.serve import daemon as daemon_mod
from l4gw.serve.daemon import Daemon

from .conftest import free_port


class Node:
    """An HTTP/1.1 keep-alive node: answers ``ok`` (``/slow`` once ``release`` is set) and
    records every connection the gateway closes (EOF)."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.closed = 0
        self.closed_event = trio.Event()
        self.release = trio.Event()
        self.slow_started = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Node:
        listeners = await nursery.start(trio.serve_tcp, self.serve, 0)
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    if b" /slow " in head:
                        self.slow_started.set()
                        await self.release.wait()
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except trio.BrokenResourceError:
            pass
        self.closed += 1
        self.closed_event.set()


@pytest.fixture(params=["reactor", "task"])
async def node_and_mode(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Node]:
    """A node; in the "task" variant the daemon runs without the reactor (every http
    connection in a task, pooled node connections not watched by any epoll set)."""
    if request.param == "task":
        monkeypatch.setattr(daemon_mod, "HAVE_REACTOR", False)
    async with trio.open_nursery() as nursery:
        yield await Node().start(nursery)
        nursery.cancel_scope.cancel()


def http_daemon(node: Node) -> tuple[Daemon, int]:
    port = free_port()
    config = parse_config(
        {
            "daemon": {"admin": "", "drain_timeout": 30, "access_log": False},
            "upstreams": {"app": {"nodes": [f"127.0.0.1:{node.port}"]}},
            "listeners": [
                {"name": "web", "listen": f"127.0.0.1:{port}", "mode": "http", "upstream": "app"}
            ],
        }
    )
    return Daemon(config), port


async def get(stream: trio.SocketStream, path: str) -> bytes:
    """One keep-alive request; the whole response (the node's body is ``ok``)."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    response = b""
    while not response.endswith(b"ok"):
        data = await stream.receive_some(65536)
        assert data, response
        response += data
    return response


async def test_drain_closes_idle_pooled_node_connections(node_and_mode: Node) -> None:
    node = node_and_mode
    daemon, port = http_daemon(node)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            assert (await get(client, "/a")).startswith(b"HTTP/1.1 200 ")
            await client.aclose()
            while daemon.active_connections() or daemon.node_pool.idle_count() != 1:
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert (node.connections, node.closed) == (1, 0)  # idle in the pool, open
            daemon.stop()
        # The drain is over and the daemon's run has returned: its pool is closed, and the
        # node saw the idle connection close (in this trio.run, not at its end).
        assert daemon.node_pool.idle_count() == 0
        await node.closed_event.wait()
        assert node.closed == 1


async def test_drain_waits_for_the_last_connection(node_and_mode: Node) -> None:
    node = node_and_mode
    daemon, port = http_daemon(node)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
            await node.slow_started.wait()
            daemon.stop()
            await trio.sleep(0.2)
            assert daemon.draining and daemon.active_connections() == 1
            node.release.set()  # the response goes out with Connection: close
            response = b""
            while True:
                data = await client.receive_some(65536)
                if not data:
                    break
                response += data
            assert response.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" in response.lower()
            await client.aclose()
        # ``run`` returned once the connection ended, well before drain_timeout (30 s).
        assert daemon.active_connections() == 0
