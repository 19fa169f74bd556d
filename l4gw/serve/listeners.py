"""Listening sockets: bind (or take over a systemd-passed socket), accept in batches, admit or
refuse each connection, and hand it to the L4 relay or the L7 handler.

Admission (source allow/deny, rate limit, ``max_connections``) is decided synchronously in the
accept loop, before any task is spawned, any byte is read or any node is contacted, so a flood
of refused connections costs one ``accept`` and one ``close`` each.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..core import logs
from ..core.errors import BindError, GatewayError
from ..core.netaddr import SocketAddress
from ..core.nodes import NodeState
from ..core.proxyproto import ProxyHeaderParser, ProxyProtocolError, encode_v1, encode_v2
from ..core.runtime import ListenerRuntime
from ..core.upstream import NodeLease
from ..l4.connect import NodeConnector, open_node_connection
from ..l4.deadlines import Deadlines
from ..l4.reactor import Reactor
from ..l4.relay import IdleSweeper, PipePool, Relay, SocketRelay, StreamRelay

if TYPE_CHECKING:
    from ..http.pool import NodePool

log = structlog.get_logger("l4gw.listener")

#: Connections accepted per wake-up before yielding to the other tasks.
ACCEPT_BATCH = 64
#: The kernel caps this at net.core.somaxconn.
BACKLOG = 65535
#: accept() errors that mean "out of a resource": log, back off, keep the listener.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about one connection that died in the queue: skip it.
_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
_LINGER_RESET = struct.pack("ii", 1, 0)
#: How long a peer in front may take to send its whole PROXY header.
PROXY_HEADER_TIMEOUT = 5.0
#: One constant task name: trio would otherwise format a new name string for every task.
_TASK_NAME = "l4gw.connection"
#: How long a TLS client may take to finish its handshake.
TLS_HANDSHAKE_TIMEOUT = 10.0


def bind_listener(
    name: str,
    address: SocketAddress,
    *,
    reuse_port: bool = False,
) -> socket.socket:
    """Open a non-blocking listening socket on ``address``.

    SO_REUSEADDR always; SO_REUSEPORT when several worker processes share the port; IPv6
    sockets are v6-only so ``[::]:P`` and ``0.0.0.0:P`` can be separate listeners. Raises
    ``BindError``. The caller owns the socket.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address.sockaddr())
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise BindError(f"listener {name}: cannot listen on {address}: {reason}") from exc
    return sock


def bind_unix_listener(name: str, path: str) -> socket.socket:
    """Open a non-blocking listening Unix stream socket at ``path`` (a stale socket file there
    is replaced). Raises ``BindError``. The caller owns the socket (and the file)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise BindError(f"listener {name}: cannot listen on {path}: {reason}") from exc
    return sock


def _refuse(sock: socket.socket) -> None:
    """Close an accepted connection at once (a reset, so no TIME_WAIT is left here)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


class ConnectionContext:
    """What every connection handler shares, all owned by the daemon: the nursery its tasks
    run in, the pipe pool, the L4 idle sweeper, the reactor that runs plain-TCP relays (None
    where there is no epoll: every relay is then a ``StreamRelay``), the deadline sweeper of
    http connections and the http node pool."""

    def __init__(
        self,
        nursery: trio.Nursery,
        pool: PipePool,
        sweeper: IdleSweeper,
        reactor: Reactor | None = None,
        *,
        deadlines: Deadlines,
        node_pool: NodePool,
    ) -> None:
        self.nursery = nursery
        self.pool = pool
        self.sweeper = sweeper
        self.reactor = reactor
        self.deadlines = deadlines
        self.node_pool = node_pool


def log_connection(
    listener: ListenerRuntime,
    client: tuple[str, int],
    node: NodeState | None,
    bytes_in: int,
    bytes_out: int,
    started: float,
    outcome: str,
    reason: str = "",
) -> None:
    """The access line of one TCP connection (SPEC fields), if access logging is on."""
    if not listener.access_log:
        return
    logs.access.info(
        "connection",
        listener=listener.config.name,
        client=f"{client[0]}:{client[1]}",
        node=node.key if node is not None else None,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        duration_ms=round((trio.current_time() - started) * 1000, 3),
        outcome=outcome,
        **({"reason": reason} if reason else {}),
    )


def admit(listener: ListenerRuntime, ip: str, now: float) -> str | None:
    """The refusal outcome for a new connection from ``ip``, or None to admit it.

    In http mode the source ACL and the rate limit apply per request (403 and 429 answers),
    so only ``max_connections`` is decided here.
    """
    config = listener.config
    if config.mode == "tcp" and not listener.acl.is_open and not listener.acl.allows(ip):
        return "denied"
    if (
        config.mode == "tcp"
        and listener.rate_limiter.enabled
        and not listener.rate_limiter.allow(ip, now)
    ):
        return "rate_limited"
    if config.max_connections and listener.stats.active >= config.max_connections:
        return "max_connections"
    return None


async def serve_listener(
    listener: ListenerRuntime,
    sock: socket.socket,
    ctx: ConnectionContext,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``sock`` forever; each admitted one runs in ``ctx.nursery``.

    Runs until cancelled or until ``sock`` is closed (with ``notify_closing``). Resource
    errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) are logged and the loop backs off, up to 1 s,
    instead of dying. Does not close ``sock``.
    """
    task_status.started()
    wait_readable = trio.lowlevel.wait_readable
    backoff = 0.0
    stats = listener.stats
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            await wait_readable(sock)
            now = trio.current_time()
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, addr = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT_ERRNOS:
                        continue
                    if exc.errno in _RESOURCE_ERRNOS:
                        backoff = min(1.0, backoff * 2 or 0.01)
                        log.error(
                            "accept_failed",
                            listener=listener.name,
                            error=exc.strerror,
                            backoff_s=backoff,
                        )
                        await trio.sleep(backoff)
                        break
                    # Anything else is unexpected: log it and keep the listener serving.
                    log.error("accept_error", listener=listener.name, error=str(exc))
                    await trio.sleep(0.1)
                    break
                backoff = 0.0
                if listener.config.accept_proxy_protocol:
                    # The client's own address comes in the PROXY header: the ACL and the
                    # limits apply to it once it is read; here only the peer is vetted.
                    trusted = listener.proxy_from
                    refusal = None if trusted is None or trusted.allows(addr[0]) else "denied"
                    # Connections waiting for their header count towards max_connections too.
                    maximum = listener.config.max_connections
                    if refusal is None and maximum and stats.active >= maximum:
                        refusal = "max_connections"
                else:
                    refusal = admit(listener, addr[0], now)
                if refusal is not None:
                    _refuse(conn)
                    stats.outcomes[refusal] = stats.outcomes.get(refusal, 0) + 1
                    if listener.access_log:
                        log_connection(listener, addr, None, 0, 0, now, refusal)
                    continue
                conn.setblocking(False)
                conn.setsockopt(*nodelay)
                stats.active += 1
                config = listener.config
                if config.mode == "tcp" and config.tls is None and not config.accept_proxy_protocol:
                    if ctx.reactor is not None and _plain_upstream(listener):
                        # Connect and relay in the reactor: no task for this connection.
                        _start_proxy_tcp(listener, conn, addr, ctx, ctx.reactor, now)
                    else:
                        ctx.nursery.start_soon(
                            _guarded,
                            _proxy_tcp,
                            listener,
                            conn,
                            addr,
                            ctx,
                            now,
                            b"",
                            name=_TASK_NAME,
                        )
                else:
                    ctx.nursery.start_soon(
                        _guarded, _handle, listener, conn, addr, ctx, now, name=_TASK_NAME
                    )
            else:
                await trio.lowlevel.checkpoint()
    except trio.ClosedResourceError:
        return


async def _guarded(
    handler: Callable[..., Awaitable[None]], listener: ListenerRuntime, *args: Any
) -> None:
    """Run one connection's handler so that nothing it raises reaches the daemon.

    Handlers close their sockets and settle their counters before an exception leaves
    them; what is left here is a bug, which is logged with its traceback and costs only this
    connection. Cancellation (the daemon closing connections) still propagates.
    """
    try:
        await handler(listener, *args)
    except Exception:
        log.exception("connection_failed", listener=listener.name)


async def _handle(
    listener: ListenerRuntime,
    conn: socket.socket,
    addr: tuple[str, int],
    ctx: ConnectionContext,
    started: float,
) -> None:
    """One admitted connection: optional PROXY header and TLS, then L4 or L7."""
    config = listener.config
    if not config.accept_proxy_protocol and config.tls is None and config.mode == "tcp":
        await _proxy_tcp(listener, conn, addr, ctx, started, b"")
        return
    client = addr
    destination: tuple[str, int] | None = None
    early = b""
    if config.accept_proxy_protocol:
        try:
            client, destination, early = await _read_proxy_header(listener, conn)
        except (ProxyProtocolError, OSError, trio.TooSlowError) as exc:
            listener.stats.active -= 1
            listener.stats.outcomes["error"] += 1
            _refuse(conn)
            log.info("proxy_header_rejected", listener=listener.name, peer=addr[0], error=str(exc))
            return
        # This connection is already counted in ``active``: admit() compares ``active`` with
        # max_connections as for a connection not yet counted.
        listener.stats.active -= 1
        refusal = admit(listener, client[0], trio.current_time())
        if refusal is not None:
            listener.stats.outcomes[refusal] = listener.stats.outcomes.get(refusal, 0) + 1
            _refuse(conn)
            log_connection(listener, client, None, 0, 0, started, refusal)
            return
        listener.stats.active += 1
    if config.tls is None and config.mode == "tcp":
        await _proxy_tcp(listener, conn, client, ctx, started, early, destination)
        return
    await _handle_stream(listener, conn, client, ctx, started, early)


async def _read_proxy_header(
    listener: ListenerRuntime, conn: socket.socket
) -> tuple[tuple[str, int], tuple[str, int] | None, bytes]:
    """Read the PROXY v1/v2 header the peer in front must send.

    Returns the client address it carries (the peer's own for LOCAL/UNKNOWN), the original
    destination it carries (None for LOCAL/UNKNOWN) and the bytes that followed it. Raises
    ``ProxyProtocolError``, ``OSError`` or ``trio.TooSlowError``.
    """
    parser = ProxyHeaderParser()
    peer = conn.getpeername()
    with trio.fail_after(PROXY_HEADER_TIMEOUT):
        while True:
            await trio.lowlevel.wait_readable(conn)
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            if not data:
                raise ProxyProtocolError("connection closed before a complete PROXY header")
            info = parser.feed(data)
            if info is not None:
                source = info.source if info.source is not None else (peer[0], peer[1])
                target = info.destination
                destination = (target[0], target[1]) if target is not None else None
                return (source[0], source[1]), destination, parser.remainder


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


def _proxy_header(version: str, client: tuple[str, int], local: tuple[str, int]) -> bytes:
    # IPv6 socket addresses are 4-tuples (host, port, flowinfo, scope_id): keep (host, port).
    client, local = (client[0], client[1]), (local[0], local[1])
    if version == "v1":
        return encode_v1(client, local)
    return encode_v2(client, local)


async def _connect(
    listener: ListenerRuntime,
    client: tuple[str, int],
    conn_local: Callable[[], tuple[str, int]],
    early: bytes,
) -> tuple[socket.socket, NodeLease]:
    """Connect to a node of the listener's upstream and send what must precede the relay
    (the PROXY header and bytes read ahead). Raises ``GatewayError`` or ``OSError``.

    The caller owns the socket and the lease that counts it on its node."""
    upstream_name = listener.config.upstream
    assert upstream_name is not None
    upstream = listener.upstreams[upstream_name]
    node_sock, lease = await open_node_connection(upstream, client[0].encode())
    try:
        prefix = early
        if upstream.config.proxy_protocol != "off":
            local = conn_local()
            prefix = _proxy_header(upstream.config.proxy_protocol, client, local) + early
        if prefix:
            await _send_all(node_sock, prefix)
    except BaseException:
        lease.release()
        node_sock.close()
        raise
    return node_sock, lease


def _plain_upstream(listener: ListenerRuntime) -> bool:
    """True when nothing must be sent to the node before the relay (no PROXY header)."""
    upstream_name = listener.config.upstream
    assert upstream_name is not None
    return listener.upstreams[upstream_name].config.proxy_protocol == "off"


def _connect_failed(
    listener: ListenerRuntime,
    conn: socket.socket,
    client: tuple[str, int],
    started: float,
    early: bytes,
    exc: BaseException,
) -> None:
    """A connection whose node could not be connected: close it, count it, log it."""
    stats = listener.stats
    stats.active -= 1
    outcome = exc.outcome if isinstance(exc, GatewayError) else "error"
    stats.outcomes[outcome] += 1
    conn.close()
    log_connection(listener, client, None, len(early), 0, started, outcome, str(exc))


def _finisher(
    listener: ListenerRuntime,
    client: tuple[str, int],
    lease: NodeLease,
    sweeper: IdleSweeper,
    started: float,
    early: bytes,
) -> Callable[[Relay], None]:
    """The ``on_finish`` of a relay: counters, node accounting (releases ``lease``), access
    log."""
    stats = listener.stats
    node = lease.node

    def finish(relay: Relay) -> None:
        sweeper.discard(relay)
        lease.release()
        stats.active -= 1
        stats.bytes_in += relay.bytes_in
        stats.bytes_out += relay.bytes_out
        stats.outcomes["proxied"] += 1
        if listener.access_log:
            log_connection(
                listener,
                client,
                node,
                relay.bytes_in + len(early),
                relay.bytes_out,
                started,
                "proxied",
                relay.reason,
            )

    return finish


def _start_proxy_tcp(
    listener: ListenerRuntime,
    conn: socket.socket,
    client: tuple[str, int],
    ctx: ConnectionContext,
    reactor: Reactor,
    started: float,
) -> None:
    """L4 over plain TCP without a task: the reactor connects a node (``NodeConnector``, the
    same attempts as ``open_node_connection``), then runs the relay."""
    upstream_name = listener.config.upstream
    assert upstream_name is not None
    upstream = listener.upstreams[upstream_name]

    def connected(node_sock: socket.socket, lease: NodeLease, mask: int) -> None:
        sweeper = ctx.sweeper
        relay = SocketRelay(
            reactor,
            conn,
            node_sock,
            upstream.config.idle_timeout,
            _finisher(listener, client, lease, sweeper, started, b""),
            pipes=ctx.pool,
        )
        sweeper.add(relay, listener=listener.name, node=lease.node)
        relay.start(node_mask=mask, read_now=True)

    def failed(exc: Exception) -> None:
        _connect_failed(listener, conn, client, started, b"", exc)

    NodeConnector(reactor, upstream, client[0].encode(), connected, failed).start()


async def _proxy_tcp(
    listener: ListenerRuntime,
    conn: socket.socket,
    client: tuple[str, int],
    ctx: ConnectionContext,
    started: float,
    early: bytes,
    destination: tuple[str, int] | None = None,
) -> None:
    """L4 over plain TCP when something must be sent first (PROXY header, bytes read ahead):
    connect a node in this task, then hand both sockets to the reactor and return.

    ``destination`` is the original destination from an accepted PROXY header: a PROXY header
    sent on to the node carries it (as HAProxy does), else this listener's own address."""
    local = conn.getsockname if destination is None else (lambda: destination)
    try:
        node_sock, lease = await _connect(listener, client, local, early)
    except BaseException as exc:
        _connect_failed(listener, conn, client, started, early, exc)
        if not isinstance(exc, (GatewayError, OSError)):
            raise
        return
    upstream_name = listener.config.upstream
    assert upstream_name is not None
    idle_timeout = listener.upstreams[upstream_name].config.idle_timeout
    sweeper = ctx.sweeper
    finish = _finisher(listener, client, lease, sweeper, started, early)
    if ctx.reactor is not None:
        relay = SocketRelay(ctx.reactor, conn, node_sock, idle_timeout, finish, pipes=ctx.pool)
        sweeper.add(relay, listener=listener.name, node=lease.node)
        relay.start(read_now=True)
    else:
        stream_relay = StreamRelay(
            trio.SocketStream(trio.socket.from_stdlib_socket(conn)),
            trio.SocketStream(trio.socket.from_stdlib_socket(node_sock)),
            idle_timeout,
            finish,
        )
        sweeper.add(stream_relay, listener=listener.name, node=lease.node)
        await stream_relay.run(ctx.nursery)


async def _handle_stream(
    listener: ListenerRuntime,
    conn: socket.socket,
    client: tuple[str, int],
    ctx: ConnectionContext,
    started: float,
    early: bytes,
) -> None:
    """TLS termination and/or L7: wrap the socket in a trio stream and hand it on.

    An http listener terminates TLS with :class:`l4gw.http.tlsstream.TLSStream` (which the
    reactor's fast path can drive too); a tcp listener with ``trio.SSLStream``."""
    stats = listener.stats
    config = listener.config
    sock = trio.socket.from_stdlib_socket(conn)
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if early:
        stream = _PrefixedStream(stream, early)
    try:
        if config.tls is not None:
            from ..core.tls import server_context_for

            context = server_context_for(config.tls, http=config.mode == "http")
            if config.mode == "http":
                from ..http.tlsstream import accept_tls

                stream = await accept_tls(sock, context, TLS_HANDSHAKE_TIMEOUT, early)
            else:
                tls_stream = trio.SSLStream(stream, context, server_side=True)
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await tls_stream.do_handshake()
                stream = tls_stream
    except BaseException as exc:
        stats.active -= 1
        stats.outcomes["error"] += 1
        await trio.aclose_forcefully(stream)
        log_connection(listener, client, None, 0, 0, started, "error", f"tls: {exc!r}")
        if isinstance(exc, (trio.Cancelled, KeyboardInterrupt)):
            raise
        return
    if config.mode == "http":
        from ..http.proxy import serve_http_connection

        outcome = "error"
        try:
            outcome = await serve_http_connection(
                listener,
                stream,
                client,
                tls=config.tls is not None,
                pool=ctx.node_pool,
                deadlines=ctx.deadlines,
                reactor=ctx.reactor,
            )
        finally:
            stats.active -= 1
            stats.outcomes[outcome] += 1  # per request: l4gw_http_requests_total
        return
    await _relay_stream(listener, stream, conn, client, ctx, started)


async def _relay_stream(
    listener: ListenerRuntime,
    stream: trio.abc.Stream,
    conn: socket.socket,
    client: tuple[str, int],
    ctx: ConnectionContext,
    started: float,
) -> None:
    """L4 with TLS terminated here: copy loop between the TLS stream and the node."""
    try:
        node_sock, lease = await _connect(listener, client, conn.getsockname, b"")
    except BaseException as exc:
        _connect_failed(listener, conn, client, started, b"", exc)  # closes the stream's socket
        if not isinstance(exc, (GatewayError, OSError)):
            raise
        return
    upstream_name = listener.config.upstream
    assert upstream_name is not None
    sweeper = ctx.sweeper
    finish = _finisher(listener, client, lease, sweeper, started, b"")
    relay = StreamRelay(
        stream,
        trio.SocketStream(trio.socket.from_stdlib_socket(node_sock)),
        listener.upstreams[upstream_name].config.idle_timeout,
        finish,
    )
    sweeper.add(relay, listener=listener.name, node=lease.node)
    await relay.run(ctx.nursery)


class _PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that first yields bytes already read from it (after a PROXY header)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()
