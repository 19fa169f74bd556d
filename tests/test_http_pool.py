"""NodePool's node accounting on loopback: a connection keeps one lease for its life, counted
only while in use; fresh connects follow the upstream's ConnectPlan."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from l4gw.core.acl import BackendAuthorization
from l4gw.core.config import NodeConfig, UpstreamConfig
from l4gw.core.errors import NoHealthyNode, UpstreamConnectError
from l4gw.core.netaddr import SocketAddress
from l4gw.core.upstream import UpstreamRuntime
from l4gw.http.pool import NodePool

from .conftest import free_port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def make_upstream(ports: list[int], *, retries: int = 3) -> UpstreamRuntime:
    config = UpstreamConfig(
        name="web",
        retries=retries,
        nodes=tuple(NodeConfig(SocketAddress("127.0.0.1", port)) for port in ports),
    )
    return UpstreamRuntime(config, BackendAuthorization())


async def test_a_pooled_connection_keeps_its_lease_and_counts_only_in_use(
    listener: socket.socket,
) -> None:
    up = make_upstream([listener.getsockname()[1]])
    node = up.nodes[0]
    pool = NodePool()
    with trio.fail_after(10):
        conn = await pool.acquire(up, b"client")
        lease = conn.lease
        assert lease.held and node.active == 1 and node.connections_total == 1
        pool.release(conn, reuse=True)
        pool.release(conn, reuse=True)  # again: nothing
        assert not lease.held and node.active == 0 and pool.idle_count(node) == 1
        again = await pool.acquire(up, b"client")
        assert again is conn and again.lease is lease and node.active == 1
        assert (pool.opened, pool.reused) == (1, 1)
        pool.release(again, reuse=False)
        assert node.active == 0 and pool.idle_count() == 0
        pool.close_idle()


async def test_fresh_connects_retry_distinct_nodes_and_give_every_count_back(
    listener: socket.socket,
) -> None:
    dead = [free_port(), free_port()]
    up = make_upstream([*dead, listener.getsockname()[1]], retries=3)
    pool = NodePool()
    with trio.fail_after(10):
        conn = await pool.acquire(up, b"client", fresh=True)
        assert conn.node is up.nodes[2]
        assert [n.active for n in up.nodes] == [0, 0, 1]
        assert [n.connect_failures for n in up.nodes] == [1, 1, 0]
        pool.release(conn, reuse=False)
        up.apply(UpstreamConfig(name="web", retries=2, nodes=up.config.nodes[:2]), up.authorization)
        with pytest.raises(UpstreamConnectError, match="2 connect attempt"):
            await pool.acquire(up, b"client")
        assert all(n.active == 0 for n in up.all_nodes())
        up.apply(UpstreamConfig(name="web"), up.authorization)
        with pytest.raises(NoHealthyNode, match="no node available"):
            await pool.acquire(up, b"client")
        pool.close_idle()
