"""Serving one tcp-mode connection: connect a node of the listener's upstream, then relay.

Three ways, one accounting (:class:`l4gw.l4.client.ClientConnection`):

* :func:`serve_tcp_in_reactor`: plain TCP and nothing to send first. The reactor connects
  (:class:`l4gw.l4.connect.NodeConnector`) and runs a :class:`l4gw.l4.relay.SocketRelay`; no
  trio task exists for the connection.
* :func:`serve_tcp`: plain TCP from a task, when something must reach the node first (a PROXY
  header, bytes read after an accepted PROXY header) or there is no reactor; the relay then
  runs in the reactor (or as a ``StreamRelay`` without one).
* :func:`serve_tcp_stream`: TLS terminated here: a ``StreamRelay`` between the TLS stream and
  the node.

Every relay finishes the connection from its ``on_finish`` (outcome ``proxied``); a
connection whose node could not be connected is closed and finished here with the outcome of
the error (``no_healthy_node``, ``connect_failed``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from ..core.errors import GatewayError
from ..core.proxyproto import encode_v1, encode_v2
from ..core.upstream import NodeLease, UpstreamRuntime
from .client import ClientConnection
from .connect import NodeConnector, open_node_connection
from .reactor import Reactor
from .relay import IdleSweeper, PipePool, Relay, SocketRelay, StreamRelay

__all__ = ["TcpContext", "plain_upstream", "serve_tcp", "serve_tcp_in_reactor", "serve_tcp_stream"]


class TcpContext:
    """What tcp relays share, all owned by the daemon: the nursery connection tasks run in,
    the splice pipe pool, the L4 idle sweeper, and the reactor that runs plain-TCP relays
    (None where there is no epoll: every relay is then a ``StreamRelay``)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        pool: PipePool,
        sweeper: IdleSweeper,
        reactor: Reactor | None = None,
    ) -> None:
        self.nursery = nursery
        self.pool = pool
        self.sweeper = sweeper
        self.reactor = reactor


def _upstream(conn: ClientConnection) -> UpstreamRuntime:
    name = conn.listener.config.upstream
    assert name is not None
    return conn.listener.upstreams[name]


def plain_upstream(conn: ClientConnection) -> UpstreamRuntime | None:
    """The connection's upstream when nothing must be sent to its nodes before the relay
    (no PROXY header), else None."""
    upstream = _upstream(conn)
    return upstream if upstream.config.proxy_protocol == "off" else None


def _relay_finisher(conn: ClientConnection, sweeper: IdleSweeper) -> Callable[[Relay], None]:
    """The ``on_finish`` of a relay: out of the sweeper, then the connection's one finish."""

    def finish(relay: Relay) -> None:
        sweeper.discard(relay)
        conn.finish(
            "proxied", bytes_in=relay.bytes_in, bytes_out=relay.bytes_out, reason=relay.reason
        )

    return finish


def _connect_failed(conn: ClientConnection, exc: BaseException) -> None:
    """No node could be connected: close the client connection and finish it."""
    conn.close()
    outcome = exc.outcome if isinstance(exc, GatewayError) else "error"
    conn.finish(outcome, reason=str(exc))


def serve_tcp_in_reactor(
    conn: ClientConnection, upstream: UpstreamRuntime, ctx: TcpContext, reactor: Reactor
) -> None:
    """Connect a node of ``upstream`` (the connection's, from :func:`plain_upstream`) and
    relay, from the reactor's callbacks (no task). Returns at once; the relay (or the failed
    connect) finishes the connection."""

    def connected(node_sock: socket.socket, lease: NodeLease, mask: int) -> None:
        conn.lease = lease
        sweeper = ctx.sweeper
        relay = SocketRelay(
            reactor,
            conn.hand_over(finishes=True),
            node_sock,
            upstream.config.idle_timeout,
            _relay_finisher(conn, sweeper),
            pipes=ctx.pool,
        )
        sweeper.add(relay, listener=conn.listener.name, node=lease.node)
        relay.start(node_mask=mask, read_now=True)

    def failed(exc: Exception) -> None:
        _connect_failed(conn, exc)

    NodeConnector(reactor, upstream, conn.client[0].encode(), connected, failed).start()


def _proxy_header(version: str, client: tuple[str, int], local: tuple[str, int]) -> bytes:
    # IPv6 socket addresses are 4-tuples (host, port, flowinfo, scope_id): keep (host, port).
    client, local = (client[0], client[1]), (local[0], local[1])
    if version == "v1":
        return encode_v1(client, local)
    return encode_v2(client, local)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` to a non-blocking socket, waiting for room as needed."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def _connect(conn: ClientConnection, local: tuple[str, int] | None) -> socket.socket | None:
    """Connect a node and send what must precede the relay (the PROXY header, carrying
    ``local`` as the destination, and the bytes read ahead). Returns the node socket (its
    lease in ``conn.lease``), or None after the connection was closed and finished because
    no node could be connected. Cancellation propagates with nothing left open."""
    upstream = _upstream(conn)
    try:
        node_sock, lease = await open_node_connection(upstream, conn.client[0].encode())
    except (GatewayError, OSError) as exc:
        _connect_failed(conn, exc)
        return None
    conn.lease = lease
    try:
        prefix = conn.early
        version = upstream.config.proxy_protocol
        if version != "off":
            assert local is not None
            prefix = _proxy_header(version, conn.client, local) + prefix
        if prefix:
            await _send_all(node_sock, prefix)
    except OSError as exc:
        node_sock.close()
        _connect_failed(conn, exc)
        return None
    except BaseException:
        node_sock.close()
        raise
    return node_sock


async def serve_tcp(conn: ClientConnection, ctx: TcpContext) -> None:
    """Connect a node from this task, then relay: in the reactor (this returns at once) or,
    without one, as a ``StreamRelay`` run here. A PROXY header sent on to the node carries
    the original destination from an accepted PROXY header (as HAProxy does), else this
    listener's own address."""
    sock = conn.sock
    assert sock is not None
    local = conn.destination
    if local is None and _upstream(conn).config.proxy_protocol != "off":
        local = sock.getsockname()
    node_sock = await _connect(conn, local)
    if node_sock is None:
        return
    lease = conn.lease
    assert lease is not None
    idle_timeout = _upstream(conn).config.idle_timeout
    sweeper = ctx.sweeper
    finish = _relay_finisher(conn, sweeper)
    if ctx.reactor is not None:
        relay = SocketRelay(
            ctx.reactor,
            conn.hand_over(finishes=True),
            node_sock,
            idle_timeout,
            finish,
            pipes=ctx.pool,
        )
        sweeper.add(relay, listener=conn.listener.name, node=lease.node)
        relay.start(read_now=True)
        return
    client = trio.SocketStream(trio.socket.from_stdlib_socket(conn.hand_over(finishes=True)))
    stream_relay = StreamRelay(
        client, trio.SocketStream(trio.socket.from_stdlib_socket(node_sock)), idle_timeout, finish
    )
    sweeper.add(stream_relay, listener=conn.listener.name, node=lease.node)
    await stream_relay.run(ctx.nursery)


async def serve_tcp_stream(
    conn: ClientConnection, stream: trio.abc.Stream, local: tuple[str, int], ctx: TcpContext
) -> None:
    """L4 with TLS terminated here: connect a node, then a ``StreamRelay`` between ``stream``
    (which this closes) and the node, run in this task."""
    node_sock = await _connect(conn, local)
    if node_sock is None:
        await trio.aclose_forcefully(stream)
        return
    lease = conn.lease
    assert lease is not None
    conn.finish_handed = True
    sweeper = ctx.sweeper
    relay = StreamRelay(
        stream,
        trio.SocketStream(trio.socket.from_stdlib_socket(node_sock)),
        _upstream(conn).config.idle_timeout,
        _relay_finisher(conn, sweeper),
    )
    sweeper.add(relay, listener=conn.listener.name, node=lease.node)
    await relay.run(ctx.nursery)
