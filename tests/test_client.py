"""l4gw.l4.client: one owner of an accepted socket, and one place where a connection ends."""

from __future__ import annotations

import socket

import structlog
import trio

from l4gw.core.acl import BackendAuthorization, SourceACL
from l4gw.core.config import HealthConfig, ListenerConfig, NodeConfig, UpstreamConfig
from l4gw.core.netaddr import SocketAddress
from l4gw.core.ratelimit import RateLimiter
from l4gw.core.runtime import ListenerRuntime, ListenerStats
from l4gw.core.upstream import NodeLease, UpstreamRuntime
from l4gw.l4.client import ClientConnection, refuse_connection

NODE = SocketAddress("192.0.2.10", 80)


def listener() -> ListenerRuntime:
    config = ListenerConfig(name="l", listen=SocketAddress("127.0.0.1", 0), upstream="web")
    up = UpstreamRuntime(
        UpstreamConfig(name="web", nodes=(NodeConfig(NODE),), health=HealthConfig()),
        BackendAuthorization(),
    )
    return ListenerRuntime(
        config=config,
        stats=ListenerStats(),
        acl=SourceACL(),
        rate_limiter=RateLimiter(0, 0),
        upstreams={"web": up},
    )


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


async def test_finish_counts_once_releases_the_lease_and_logs() -> None:
    runtime = listener()
    up = runtime.upstreams["web"]
    ours, theirs = pair()
    with theirs, structlog.testing.capture_logs() as logs:
        conn = ClientConnection(runtime, ours, ("198.51.100.1", 5000), trio.current_time())
        conn.early = b"abc"
        conn.lease = NodeLease(up, up.nodes[0])
        assert runtime.stats.active == 1 and up.nodes[0].active == 1
        conn.finish("proxied", bytes_in=10, bytes_out=20, reason="client closed")
        conn.finish("error")  # a second end does nothing
        conn.close()
    stats = runtime.stats
    assert stats.active == 0 and up.nodes[0].active == 0
    assert stats.outcomes["proxied"] == 1 and stats.outcomes["error"] == 0
    assert (stats.bytes_in, stats.bytes_out) == (10, 20)
    (line,) = logs
    assert line["event"] == "connection" and line["node"] == str(NODE)
    assert line["bytes_in"] == 13  # what was read ahead counts on the line
    assert line["client"] == "198.51.100.1:5000" and line["reason"] == "client closed"
    assert ours.fileno() == -1


async def test_hand_over_passes_the_socket_and_maybe_the_finish() -> None:
    runtime = listener()
    ours, theirs = pair()
    with theirs:
        conn = ClientConnection(runtime, ours, ("198.51.100.1", 5000), trio.current_time())
        sock = conn.hand_over(finishes=True)
        conn.close()  # no longer ours: not closed here
        assert sock.fileno() >= 0 and conn.finish_handed
        sock.close()
        conn.finish("proxied", log=False)
    assert runtime.stats.active == 0


async def test_refused_connections_are_never_active() -> None:
    runtime = listener()
    ours, theirs = pair()
    with theirs, structlog.testing.capture_logs() as logs:
        refuse_connection(runtime, ours, ("198.51.100.1", 5000), trio.current_time(), "denied")
    assert ours.fileno() == -1
    assert runtime.stats.active == 0 and runtime.stats.outcomes["denied"] == 1
    assert logs[0]["outcome"] == "denied" and logs[0]["node"] is None
