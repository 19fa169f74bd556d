"""Listening sockets: bind (or take over a systemd-passed socket), accept in batches, admit or
refuse each connection, and dispatch it, once, to where it is served: the reactor (plain L4,
no task) or a connection task (PROXY header, TLS, L7), whose one ``finally`` closes it.
Every connection is a :class:`l4gw.l4.client.ClientConnection`, finished in one place.

Admission (the process's connection cap, source allow/deny, rate limit, ``max_connections``)
is decided synchronously in the accept loop, before any task is spawned, any byte is read or
any node is contacted, so a flood of refused connections costs one ``accept`` and one ``close``
each. The process's cap (:mod:`l4gw.core.capacity`) keeps descriptors in reserve; should they
run out all the same, a :class:`SpareDescriptor` still lets the loop take a connection off the
backlog to refuse it, so clients never wait there for descriptors that are not coming.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

import structlog
import trio

from ..core.errors import BindError
from ..core.netaddr import SocketAddress
from ..core.proxyproto import ProxyHeaderParser, ProxyProtocolError
from ..core.runtime import ListenerRuntime
from ..http.pool import NodePool
from ..l4.client import ClientConnection, refuse_connection, reset
from ..l4.deadlines import Deadlines
from ..l4.reactor import Reactor
from ..l4.relay import IdleSweeper, PipePool
from ..l4.tcp import TcpContext, plain_upstream, serve_tcp, serve_tcp_in_reactor, serve_tcp_stream

__all__ = [
    "BindError",
    "ConnectionContext",
    "SpareDescriptor",
    "admit",
    "bind_listener",
    "bind_unix_listener",
    "serve_listener",
]

log = structlog.get_logger("l4gw.listener")

#: Connections accepted per wake-up before yielding to the other tasks.
ACCEPT_BATCH = 64
#: The kernel caps this at net.core.somaxconn.
BACKLOG = 65535
#: accept() errors that mean "out of a resource": log, back off, keep the listener.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that mean "out of descriptors" (the process's, the system's).
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
#: accept() errors about one connection that died in the queue: skip it.
_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
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


class SpareDescriptor:
    """One descriptor held back (``/dev/null``) for an accept loop that runs out of them:
    :meth:`refuse_one` closes it, takes one connection off the backlog, resets it and opens the
    spare again (the nginx/libuv answer to ``EMFILE``).

    Resource handling: owns its descriptor; :meth:`close` (by the daemon, at the end) closes it.
    """

    def __init__(self) -> None:
        self.fd = self._open()

    @staticmethod
    def _open() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def refuse_one(self, sock: socket.socket) -> tuple[str, int] | None:
        """Accept one connection from ``sock`` and reset it; returns its peer, or None when
        there was none or no descriptor could be freed for it."""
        if self.fd < 0:
            self.fd = self._open()
            if self.fd < 0:
                return None
        os.close(self.fd)
        self.fd = -1
        try:
            accepted, addr = sock.accept()
        except OSError:  # BlockingIOError (nothing waiting) included
            self.fd = self._open()
            return None
        reset(accepted)  # first: the spare takes the descriptor it frees
        self.fd = self._open()
        return (addr[0], addr[1])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ConnectionContext(TcpContext):
    """What every connection handler shares, all owned by the daemon: the tcp relays'
    context (nursery, pipe pool, L4 idle sweeper, reactor), the deadline sweeper of http
    connections, the http node pool, and the spare descriptor of the accept loops."""

    def __init__(
        self,
        nursery: trio.Nursery,
        pool: PipePool,
        sweeper: IdleSweeper,
        reactor: Reactor | None = None,
        *,
        deadlines: Deadlines,
        node_pool: NodePool,
        spare: SpareDescriptor | None = None,
    ) -> None:
        super().__init__(nursery, pool, sweeper, reactor)
        self.deadlines = deadlines
        self.node_pool = node_pool
        self.spare = spare


def refuse_over_capacity(listener: ListenerRuntime, sock: socket.socket | None, now: float) -> None:
    """A connection refused because the process's connection cap is reached or it is out of
    descriptors (``sock``: still to reset; None: reset already). Counted with the outcome
    ``fd_limit``; no access line per connection, a warning at most once a second instead."""
    if sock is not None:
        reset(sock)
    stats = listener.stats
    stats.outcomes["fd_limit"] = stats.outcomes.get("fd_limit", 0) + 1
    budget = stats.budget
    count = budget.refused_now(now)
    if count:
        log.warning(
            "connections_refused",
            reason="fd_limit",
            listener=listener.name,
            refused=count,
            active=budget.active,
            max_connections=budget.limit or None,
            open_file_limit=budget.nofile,
        )


def admit(listener: ListenerRuntime, ip: str, now: float, *, counted: bool = False) -> str | None:
    """The refusal outcome for a connection from ``ip``, or None to admit it (``counted``:
    the connection is already in the listener's ``active`` count).

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
    maximum = config.max_connections
    if maximum and listener.stats.active - counted >= maximum:
        return "max_connections"
    return None


async def serve_listener(
    listener: ListenerRuntime,
    sock: socket.socket,
    ctx: ConnectionContext,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``sock`` forever; each admitted one is served by
    :func:`_dispatch`.

    Runs until cancelled or until ``sock`` is closed (with ``notify_closing``). Past the
    process's connection cap, connections are reset at once (``fd_limit``). Out of
    descriptors all the same (EMFILE, ENFILE), the context's spare descriptor refuses them;
    other resource errors (ENOBUFS, ENOMEM), or no spare, are logged and the loop backs off,
    up to 1 s, instead of dying. Does not close ``sock``.
    """
    task_status.started()
    wait_readable = trio.lowlevel.wait_readable
    backoff = 0.0
    stats = listener.stats
    budget = stats.budget
    spare = ctx.spare
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            await wait_readable(sock)
            now = trio.current_time()
            for _ in range(ACCEPT_BATCH):
                try:
                    accepted, addr = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT_ERRNOS:
                        continue
                    if (
                        exc.errno in _FD_ERRNOS
                        and spare is not None
                        and spare.refuse_one(sock) is not None
                    ):
                        refuse_over_capacity(listener, None, now)
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
                if budget.full():
                    refuse_over_capacity(listener, accepted, now)
                    continue
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
                    refuse_connection(listener, accepted, addr, now, refusal)
                    continue
                accepted.setblocking(False)
                accepted.setsockopt(*nodelay)
                _dispatch(ClientConnection(listener, accepted, addr, now), ctx)
            else:
                await trio.lowlevel.checkpoint()
    except trio.ClosedResourceError:
        return


def _dispatch(conn: ClientConnection, ctx: ConnectionContext) -> None:
    """Where a connection is served, decided once: a plain tcp connection whose node needs
    nothing first is connected and relayed by the reactor, with no task; every other one
    (a PROXY header to read, TLS to terminate, http, or no reactor) gets a task."""
    config = conn.listener.config
    reactor = ctx.reactor
    if (
        reactor is not None
        and config.mode == "tcp"
        and config.tls is None
        and not config.accept_proxy_protocol
        and (upstream := plain_upstream(conn)) is not None
    ):
        serve_tcp_in_reactor(conn, upstream, ctx, reactor)
        return
    ctx.nursery.start_soon(_serve_task, conn, ctx, name=_TASK_NAME)


async def _serve_task(conn: ClientConnection, ctx: ConnectionContext) -> None:
    """The one owner of a connection served by a task.

    Whatever happens, when this returns the socket is closed (or owned by a relay that
    closes it) and the connection finished (or its relay will finish it). Nothing raised by
    the serving code reaches the daemon: an exception here is a bug, logged with its
    traceback, and costs only this connection. Cancellation (the daemon closing
    connections) still propagates.
    """
    why = "shutdown"  # cancelled: the daemon is closing connections
    try:
        await _serve(conn, ctx)
        why = "internal error"  # (only if the serving code forgot to finish it)
    except Exception:
        why = "internal error"
        log.exception("connection_failed", listener=conn.listener.name)
    finally:
        conn.close()
        if not conn.finish_handed:
            conn.finish("error", reason=why)


async def _serve(conn: ClientConnection, ctx: ConnectionContext) -> None:
    """An optional PROXY header (then admission for the client it names), optional TLS,
    then L4 or L7."""
    listener = conn.listener
    config = listener.config
    if config.accept_proxy_protocol:
        sock = conn.sock
        assert sock is not None
        try:
            conn.client, conn.destination, conn.early = await _read_proxy_header(sock)
        except (ProxyProtocolError, OSError, trio.TooSlowError) as exc:
            conn.close(reset_it=True)
            conn.finish("error", log=False)
            log.info(
                "proxy_header_rejected", listener=listener.name, peer=conn.client[0], error=str(exc)
            )
            return
        refusal = admit(listener, conn.client[0], trio.current_time(), counted=True)
        if refusal is not None:
            conn.close(reset_it=True)
            conn.finish(refusal)
            return
    if config.tls is None and config.mode == "tcp":
        await serve_tcp(conn, ctx)
        return
    sock = conn.sock
    assert sock is not None
    local = conn.destination or sock.getsockname()
    stream = await _accept_stream(conn)
    if stream is None:
        return
    if config.mode == "tcp":
        await serve_tcp_stream(conn, stream, local, ctx)
        return
    from ..http.proxy import handle_http_connection

    outcome = "error"
    try:
        outcome = await handle_http_connection(
            listener,
            stream,
            conn.client,
            tls=config.tls is not None,
            pool=ctx.node_pool,
            deadlines=ctx.deadlines,
            reactor=ctx.reactor,
        )
    finally:
        conn.finish(outcome, log=False)  # http connections log per request


async def _accept_stream(conn: ClientConnection) -> trio.abc.Stream | None:
    """The connection as a trio stream (which owns the socket from now on): TLS terminated
    if the listener has ``tls``, bytes read after a PROXY header given first. Returns None
    after a failed handshake (the connection is closed and finished).

    An http listener terminates TLS with :class:`l4gw.http.tlsstream.TLSStream` (which the
    reactor's fast path can drive too); a tcp listener with ``trio.SSLStream``."""
    config = conn.listener.config
    early = conn.early
    sock = trio.socket.from_stdlib_socket(conn.hand_over(finishes=False))
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
        await trio.aclose_forcefully(stream)
        conn.finish("error", reason=f"tls: {exc!r}")
        if isinstance(exc, (trio.Cancelled, KeyboardInterrupt)):
            raise
        return None
    return stream


async def _read_proxy_header(
    conn: socket.socket,
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
