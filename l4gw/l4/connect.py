"""Opening connections to nodes: the two drivers of a :class:`l4gw.core.upstream.ConnectPlan`.

* :func:`connect_socket`: one non-blocking TCP connect with a timeout, in a task;
* :func:`open_node_connection`: a whole plan in a task (retries over distinct nodes, backend
  authorization on every attempt);
* :class:`NodeConnector`: the same plan driven by the reactor's callbacks (``EPOLLOUT``,
  ``SO_ERROR``, ``connect_timeout`` on the reactor's timer heap), so an accepted plain TCP
  connection spawns no trio task at all.

Both drivers hand over the connected socket with the :class:`l4gw.core.upstream.NodeLease` that
counts it on its node; whoever ends the connection releases the lease.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable

import structlog
import trio

from ..core.errors import NoHealthyNode, UpstreamConnectError
from ..core.netaddr import SocketAddress
from ..core.nodes import NodeState
from ..core.upstream import ConnectPlan, NodeLease, UpstreamRuntime
from .reactor import Reactor, ReactorStopped, Timer

log = structlog.get_logger("l4gw.connect")

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_EPOLLOUT = getattr(select, "EPOLLOUT", 0x004)


async def connect_socket(address: SocketAddress, timeout: float) -> socket.socket:
    """Open a non-blocking TCP socket connected to ``address`` (TCP_NODELAY set).

    Raises ``OSError`` (``ETIMEDOUT`` after ``timeout`` seconds). The caller owns and closes
    the returned socket; on any error or cancellation the socket is closed here.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(*_NODELAY)
        err = sock.connect_ex(address.sockaddr())
        if err == errno.EINPROGRESS:
            with trio.move_on_after(timeout):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                return sock
            raise OSError(errno.ETIMEDOUT, f"connect timed out after {timeout:g}s")
        if err:
            raise OSError(err, os.strerror(err))
        return sock
    except BaseException:
        sock.close()
        raise


async def open_node_connection(
    upstream: UpstreamRuntime,
    client_key: bytes,
) -> tuple[socket.socket, NodeLease]:
    """Connect to a node of ``upstream`` by a :class:`ConnectPlan` (up to ``retries``
    distinct, authorized nodes).

    Resource handling: on success the caller owns the socket and the lease that counts it on
    its node, and releases the lease when the connection ends; on any error or cancellation
    nothing is left open or counted. Raises ``NoHealthyNode`` when no node could be tried at
    all and ``UpstreamConnectError`` when every attempt failed.
    """
    plan = ConnectPlan(upstream, client_key)
    timeout = upstream.config.connect_timeout
    while True:
        lease = plan.next()
        if not isinstance(lease, NodeLease):
            raise lease
        try:
            sock = await connect_socket(lease.node.address, timeout)
        except OSError as exc:
            plan.failed(lease, exc)
            continue
        except BaseException:
            lease.release()
            raise
        plan.succeeded(lease)
        return sock, lease


ConnectedCallback = Callable[[socket.socket, NodeLease, int], None]
FailedCallback = Callable[[Exception], None]


class NodeConnector:
    """A :class:`ConnectPlan` driven by the reactor (plain TCP, no task).

    The attempts are those of :func:`open_node_connection`; an attempt fails on a socket,
    connect or ``SO_ERROR`` error, or after ``connect_timeout``. At the end exactly one
    callback runs: ``on_connected(sock, lease, mask)`` (the socket is still in the epoll set
    with ``mask``: ``SocketRelay.start`` adopts it; the lease counts it on its node) or
    ``on_failed(exc)`` with ``NoHealthyNode`` (nothing could be tried),
    ``UpstreamConnectError`` (every attempt failed) or ``ReactorStopped`` (shutdown).
    ``first``: a node the caller already picked, tried first (its pick counts as an attempt);
    ``plan``: the caller's plan, if it took attempts from it already (see :meth:`start`).
    Callbacks never await.

    Resource handling: owns the socket and the lease of the attempt under way; hands both
    to ``on_connected``, which then owns them (it closes the socket and releases the lease).
    """

    __slots__ = (
        "connect_timeout",
        "lease",
        "on_connected",
        "on_failed",
        "plan",
        "reactor",
        "running",
        "sock",
        "timer",
    )

    def __init__(
        self,
        reactor: Reactor,
        upstream: UpstreamRuntime,
        client_key: bytes,
        on_connected: ConnectedCallback,
        on_failed: FailedCallback,
        *,
        first: NodeState | None = None,
        plan: ConnectPlan | None = None,
    ) -> None:
        self.reactor = reactor
        self.plan = plan if plan is not None else ConnectPlan(upstream, client_key, first=first)
        self.connect_timeout = upstream.config.connect_timeout
        self.on_connected = on_connected
        self.on_failed = on_failed
        #: The attempt under way (its socket is in the epoll set, waiting for EPOLLOUT).
        self.lease: NodeLease | None = None
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        #: Between ``start`` and the one callback.
        self.running = False

    def start(self, lease: NodeLease | None = None) -> None:
        """Begin connecting (with ``lease``, the attempt of a node the plan gave the caller
        already, if given); a callback may run before this returns."""
        if self.reactor.stopped:
            if lease is not None:
                lease.release()
            self.on_failed(ReactorStopped("shutdown"))
            return
        self.running = True
        self._next(lease)

    def _next(self, first: NodeLease | None = None) -> None:
        """Start the next attempt (``first``, then the plan's), or report the outcome when
        there is none left."""
        plan = self.plan
        reactor = self.reactor
        while True:
            lease: NodeLease | NoHealthyNode | UpstreamConnectError
            if first is not None:
                lease, first = first, None
            else:
                lease = plan.next()
            if not isinstance(lease, NodeLease):
                self.running = False
                self.on_failed(lease)
                return
            address = lease.node.address
            try:
                sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:
                plan.failed(lease, exc)
                continue
            try:
                sock.setsockopt(*_NODELAY)
                err = sock.connect_ex(address.sockaddr())
                if err == errno.EINPROGRESS:
                    fd = sock.fileno()
                    reactor.register(fd, _EPOLLOUT, self)
                    self.lease = lease
                    self.sock = sock
                    self.timer = reactor.call_at(
                        trio.current_time() + self.connect_timeout, self._timed_out
                    )
                    return
                if err:
                    raise OSError(err, os.strerror(err))
            except OSError as exc:
                sock.close()
                plan.failed(lease, exc)
                continue
            self._connected(sock, lease, 0)
            return

    def on_event(self, fd: int, mask: int) -> None:
        """The socket being connected is writable (connected) or in error."""
        sock = self.sock
        lease = self.lease
        if sock is None or lease is None or fd != sock.fileno():
            return
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            self._drop_socket()
            self.plan.failed(lease, OSError(err, os.strerror(err)))
            self._next()
            return
        self.sock = None
        self.lease = None
        if self.timer is not None:
            self.reactor.cancel_timer(self.timer)
            self.timer = None
        self._connected(sock, lease, _EPOLLOUT)

    def _timed_out(self) -> None:
        lease = self.lease
        if self.sock is None or lease is None:
            return
        self.timer = None
        self._drop_socket()
        timeout = self.connect_timeout
        self.plan.failed(lease, OSError(errno.ETIMEDOUT, f"connect timed out after {timeout:g}s"))
        self._next()

    def _drop_socket(self) -> None:
        """Unregister and close the socket of the attempt under way (its lease is the
        caller's to release)."""
        sock = self.sock
        if sock is not None:
            self.reactor.forget(sock.fileno(), _EPOLLOUT)
            sock.close()
        self.sock = None
        self.lease = None
        if self.timer is not None:
            self.reactor.cancel_timer(self.timer)
            self.timer = None

    def _connected(self, sock: socket.socket, lease: NodeLease, mask: int) -> None:
        reactor = self.reactor
        self.running = False
        self.plan.succeeded(lease)
        fd = sock.fileno()
        try:
            self.on_connected(sock, lease, mask)
        finally:
            if reactor.handlers.get(fd) is self:  # not adopted: never leave it registered
                reactor.forget(fd, mask)

    def abort(self, reason: str, *, reset: bool = False) -> None:
        """Give up (shutdown): close the attempt under way and report ``ReactorStopped``."""
        if not self.running:
            return
        self.running = False
        lease = self.lease
        self._drop_socket()
        if lease is not None:
            lease.release()
        self.on_failed(ReactorStopped(reason))
