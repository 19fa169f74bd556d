"""Connections to nodes for http mode: connect with retries, TLS toward nodes, keep-alive pool.

``node.active`` counts connections *in use* (a request on them). Every connection has one
:class:`l4gw.core.upstream.NodeLease` for its life: held when it is handed out by
:meth:`NodePool.acquire` (or :meth:`NodePool.take`, :meth:`NodePool.adopt`), released by
:meth:`NodePool.release` whether the connection goes back to the pool or is closed, and
acquired again when an idle one is taken. Idle pooled connections do not count, so
``least_conn`` and ``max_connections_per_node`` see the load, not the pool. New connections
follow the upstream's :class:`l4gw.core.upstream.ConnectPlan`, as every other connect does.

The pool:

* keeps at most ``max_idle_per_node`` idle connections per node (newest reused first, the
  oldest closed when full) and closes a connection idle for ``idle_timeout`` seconds (or the
  upstream's ``idle_timeout`` if shorter). Its maintenance task (:meth:`NodePool.run`) runs
  in the daemon's connections nursery, which owns the pool; when it ends (the drain is over,
  or shutdown) every idle connection is closed and nothing is pooled any more;
* never takes back a connection after an error, a response with ``Connection: close``, an
  unfinished exchange, a node that left the configuration, or a change of the upstream's TLS
  settings;
* checks a connection before reusing it (a non-blocking ``MSG_PEEK``): one the node closed,
  or one with unexpected bytes waiting, is dropped and the next one (or a new one) is used.
  Connections given back by the reactor's fast path (:mod:`l4gw.http.fastpath`) stay in the
  reactor's epoll set while idle instead: the node closing one, or sending bytes nobody asked
  for, closes it at once, and the fast path takes it again without a system call (it still
  checks with ``MSG_PEEK`` before sending a request that may not be repeated).

Connections to upstreams with ``proxy_protocol`` on are never pooled (the PROXY header names
one client); :mod:`l4gw.http.proxy` keeps them private to the client connection.
"""

from __future__ import annotations

import socket
from collections.abc import Collection

import structlog
import trio

from ..core.config import UpstreamTLSConfig
from ..core.errors import GatewayError
from ..core.nodes import NodeState
from ..core.tls import client_context_for
from ..core.upstream import ConnectPlan, NodeLease, UpstreamRuntime
from ..l4.connect import connect_socket
from ..l4.reactor import Reactor
from .io import ByteIO, FdIO, StreamIO
from .wire import ResponseReader

__all__ = ["NodeConnection", "NodePool"]

log = structlog.get_logger("l4gw.http")

#: The largest response head accepted from a node (h11's default; nodes are trusted more
#: than clients but big Set-Cookie heads exist).
MAX_RESPONSE_HEAD = 64 * 1024
#: Default idle time after which a pooled connection is closed (HAProxy's pool-purge-delay is
#: 5 s; common node keep-alive timeouts are 5 s (Node.js) to 75 s (nginx)).
POOL_IDLE_TIMEOUT = 15.0
POOL_MAX_IDLE_PER_NODE = 64

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_EPOLLIN = 0x001


class NodeConnection:
    """One connection to a node: its byte I/O, the parser of its responses, and the lease
    that counts it on its node while it is in use (``lease.held``).

    Resource handling: :meth:`close` closes it at once (no TLS close_notify: the node sees a
    TCP close, as with an idle timeout); it does not release the lease.
    """

    __slots__ = (
        "idle_since",
        "io",
        "lease",
        "node",
        "private",
        "raw",
        "reader",
        "requests",
        "sock",
        "stream",
        "tls_config",
        "upstream",
        "watch_pool",
        "watcher",
    )

    def __init__(
        self,
        lease: NodeLease,
        *,
        raw: socket.socket,
        sock: trio.socket.SocketType,
        stream: trio.abc.Stream | None,
        tls_config: UpstreamTLSConfig | None,
    ) -> None:
        self.lease = lease
        self.upstream = lease.upstream
        self.node = lease.node
        self.raw = raw
        self.sock = sock
        #: The TLS stream, or None for plain TCP (driven by file descriptor).
        self.stream = stream
        self.io: ByteIO = StreamIO(stream) if stream is not None else FdIO(raw)
        self.tls_config = tls_config
        self.reader = ResponseReader(max_head=MAX_RESPONSE_HEAD)
        self.idle_since = 0.0
        #: Requests sent on this connection so far (> 0 means it was reused).
        self.requests = 0
        #: Opened with a PROXY header for one client: never goes back to the pool.
        self.private = False
        #: The reactor whose epoll set holds the socket (EPOLLIN) while it is idle in
        #: ``watch_pool``; this object is then its handler there.
        self.watcher: Reactor | None = None
        self.watch_pool: NodePool | None = None

    @property
    def key(self) -> str:
        """The node's ``address:port`` (as on access lines)."""
        return self.node.key

    def close(self) -> None:
        self.unwatch()
        if self.raw.fileno() >= 0:
            trio.lowlevel.notify_closing(self.raw)
        self.sock.close()

    def unwatch(self) -> None:
        """Take the socket out of the watching reactor's epoll set (if it is in one)."""
        reactor = self.watcher
        if reactor is not None:
            self.watcher = None
            self.watch_pool = None
            reactor.forget(self.raw.fileno(), _EPOLLIN)

    def on_event(self, fd: int, mask: int) -> None:
        """Idle in the pool and readable: the node closed it or sent bytes nobody asked for."""
        pool = self.watch_pool
        if pool is not None:
            pool.drop_idle(self)
        else:
            self.close()

    def abort(self, reason: str, *, reset: bool = False) -> None:
        self.on_event(-1, 0)

    def usable(self) -> bool:
        """False if the node closed the connection or sent bytes nobody asked for."""
        if self.raw.fileno() < 0:
            return False
        try:
            self.raw.recv(1, _PEEK_FLAGS)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF, or bytes before any request


class NodePool:
    """Idle keep-alive connections per node, and the connect path (see the module docstring).

    Resource handling: owns the idle connections; :meth:`run` closes them when it ends, and
    :meth:`close_idle` at any time. An idle connection watched by a reactor is also one of
    its handlers: ``Reactor.close_all`` closes it (through ``NodeConnection.abort``).
    """

    def __init__(
        self,
        *,
        max_idle_per_node: int = POOL_MAX_IDLE_PER_NODE,
        idle_timeout: float = POOL_IDLE_TIMEOUT,
    ) -> None:
        self.max_idle_per_node = max_idle_per_node
        self.idle_timeout = idle_timeout
        self._idle: dict[NodeState, list[NodeConnection]] = {}
        self.reused = 0
        self.opened = 0
        #: Set when :meth:`run` ends: connections given back from then on are closed.
        self.closed = False

    # -- acquiring ---------------------------------------------------------------------

    async def acquire(
        self,
        upstream: UpstreamRuntime,
        client_key: bytes,
        *,
        fresh: bool = False,
        prefix: bytes = b"",
    ) -> NodeConnection:
        """A connection to a node of ``upstream``: an idle pooled one, else a new one.

        Nodes are picked by the upstream's :class:`l4gw.core.upstream.ConnectPlan` (as in
        :func:`l4gw.l4.connect.open_node_connection`: up to ``retries`` distinct, authorized
        nodes); a picked node with an idle connection gets the request on it, otherwise a
        connection is opened to it.
        ``fresh`` skips the pool; ``prefix`` (a PROXY header) is sent first on a new
        connection (and implies ``fresh``). The caller hands the connection to
        :meth:`release` exactly once.

        Raises ``NoHealthyNode`` or ``UpstreamConnectError``.
        """
        plan = ConnectPlan(upstream, client_key)
        use_pool = not fresh and not prefix
        while True:
            node = plan.next_node()
            if isinstance(node, GatewayError):
                raise node
            if use_pool:
                conn = self.take(node, upstream)
                if conn is not None:
                    return conn
            # Counted while connecting, so that concurrent requests see it (least_conn,
            # max_connections_per_node); the plan releases it if the attempt fails.
            lease = NodeLease(upstream, node)
            try:
                conn = await self._open(lease, prefix)
            except OSError as exc:
                plan.failed(lease, exc)
            except trio.BrokenResourceError as exc:
                plan.failed(lease, f"TLS: {exc.__cause__ or exc}")
            except BaseException:
                lease.release()
                raise
            else:
                conn.private = bool(prefix)
                self.opened += 1
                plan.succeeded(lease)
                return conn

    async def _open(self, lease: NodeLease, prefix: bytes) -> NodeConnection:
        config = lease.upstream.config
        node = lease.node
        raw = await connect_socket(node.address, config.connect_timeout)
        sock = trio.socket.from_stdlib_socket(raw)
        stream: trio.abc.Stream | None = None
        try:
            if prefix:
                await FdIO(raw).send_all(prefix)
            tls_config = config.tls
            if tls_config is not None:
                ssl_stream = trio.SSLStream(
                    trio.SocketStream(sock),
                    client_context_for(tls_config),
                    server_hostname=tls_config.server_name or node.address.host,
                    https_compatible=True,
                )
                with trio.move_on_after(config.connect_timeout) as scope:
                    await ssl_stream.do_handshake()
                if scope.cancelled_caught:
                    raise TimeoutError(f"TLS handshake timed out after {config.connect_timeout:g}s")
                stream = ssl_stream
        except BaseException:
            sock.close()
            raise
        return NodeConnection(lease, raw=raw, sock=sock, stream=stream, tls_config=config.tls)

    def take(
        self,
        node: NodeState,
        upstream: UpstreamRuntime,
        *,
        reactor: Reactor | None = None,
        check: bool = True,
    ) -> NodeConnection | None:
        """An idle connection to ``node`` (picked for ``upstream``), handed out as by
        :meth:`acquire`; None if the pool has no usable one.

        A connection that ``reactor`` watches stays in its epoll set (``conn.watcher`` still
        names it; the caller takes over as its handler) and is only checked with
        ``MSG_PEEK`` if ``check``; any other is taken out of the epoll set that watches it
        and always checked.
        """
        idle = self._idle.get(node)
        if not idle:
            return None
        tls_config = upstream.config.tls
        while idle:
            conn = idle.pop()
            if conn.tls_config is tls_config and conn.upstream is upstream:
                if conn.watcher is not None and conn.watcher is reactor:
                    conn.watch_pool = None
                    usable = not check or conn.usable()
                else:
                    conn.unwatch()
                    usable = conn.usable()
                if usable:
                    conn.lease.acquire()
                    self.reused += 1
                    return conn
            conn.close()
        return None

    def adopt(self, lease: NodeLease, raw: socket.socket) -> NodeConnection:
        """A plain-TCP connection to ``lease.node`` opened elsewhere (by a
        :class:`l4gw.l4.connect.NodeConnector`), handed out as by :meth:`acquire`; it keeps
        ``lease`` (held) for its life."""
        conn = NodeConnection(
            lease,
            raw=raw,
            sock=trio.socket.from_stdlib_socket(raw),
            stream=None,
            tls_config=lease.upstream.config.tls,
        )
        self.opened += 1
        return conn

    def drop_idle(self, conn: NodeConnection) -> None:
        """Close an idle connection the node closed (or sent stray bytes on)."""
        idle = self._idle.get(conn.node)
        if idle is not None and conn in idle:
            idle.remove(conn)
        conn.close()

    # -- releasing ---------------------------------------------------------------------

    def release(
        self, conn: NodeConnection, *, reuse: bool, watch: Reactor | None = None, mask: int = 0
    ) -> None:
        """Give back a connection from :meth:`acquire`: pooled if ``reuse`` and clean, else
        closed. ``reuse`` says the last exchange ended cleanly and the node keeps the
        connection open. Releases the connection's lease either way. Releasing again does
        nothing, so error paths may release unconditionally.

        ``watch``: the socket is in this reactor's epoll set with ``mask``; if it is pooled
        it stays there (EPOLLIN, the connection as its handler), else it is taken out.
        """
        lease = conn.lease
        if not lease.held:
            if watch is not None:
                watch.forget(conn.raw.fileno(), mask)
            return
        lease.release()
        node = conn.node
        if not (
            reuse
            and not conn.private
            and node.in_service
            and not conn.reader.buffer
            and conn.tls_config is conn.upstream.config.tls
            and self.max_idle_per_node > 0
            and not self.closed
        ):
            if watch is not None:
                watch.forget(conn.raw.fileno(), mask)
            conn.close()
            return
        if watch is not None:
            fd = conn.raw.fileno()
            try:
                watch.interest(fd, mask, _EPOLLIN)
            except (OSError, ValueError):
                watch.forget(fd, mask)
                conn.close()
                return
            watch.attach(fd, conn)
            conn.watcher = watch
            conn.watch_pool = self
        conn.reader.reset()
        conn.idle_since = trio.current_time()
        idle = self._idle.setdefault(node, [])
        if len(idle) >= self.max_idle_per_node:
            idle.pop(0).close()
        idle.append(conn)

    # -- maintenance -------------------------------------------------------------------

    def idle_count(self, node: NodeState | None = None) -> int:
        if node is not None:
            return len(self._idle.get(node, ()))
        return sum(len(v) for v in self._idle.values())

    def sweep(self, now: float) -> int:
        """Close connections idle for too long, and those of nodes out of service."""
        closed = 0
        for node in list(self._idle):
            idle = self._idle[node]
            keep: list[NodeConnection] = []
            for conn in idle:
                limit = min(self.idle_timeout, conn.upstream.config.idle_timeout)
                if node.in_service and now - conn.idle_since < limit:
                    keep.append(conn)
                else:
                    conn.close()
                    closed += 1
            if keep:
                self._idle[node] = keep
            else:
                del self._idle[node]
        return closed

    def close_idle(self, nodes: Collection[NodeState] | None = None) -> None:
        """Close every idle connection (of ``nodes`` only, if given); e.g. when draining."""
        for node in list(self._idle):
            if nodes is None or node in nodes:
                for conn in self._idle.pop(node):
                    conn.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close stale idle connections every few seconds until cancelled (run it in the
        daemon's connections nursery: it ends with the drain); then close every idle
        connection and pool nothing more."""
        task_status.started()
        try:
            while True:
                await trio.sleep(max(0.5, min(self.idle_timeout / 4, 5.0)))
                self.sweep(trio.current_time())
        finally:
            self.closed = True
            self.close_idle()
