"""Plain HTTP/1.1 keep-alive served from the reactor: no task switch, no epoll re-arm per request.

The task that serves an http connection (:func:`l4gw.http.proxy.handle_http_connection`)
hands a plain-TCP client connection to a :class:`FastConnection` whenever it waits for the
next request, and parks. The reactor (:mod:`l4gw.l4.reactor`) then drives the connection with
callbacks, request after request, as long as each one is ordinary:

* the request is taken by :func:`l4gw.http.request.parse_request` (a complete, plain head,
  its whole body already read);
* its upstream is plain TCP without PROXY headers.

Such a request is played through the connection's :class:`l4gw.http.exchange.Exchange`,
the same state machine the task drives: this module only carries out its commands with
non-blocking system calls and epoll interest (node connections from the pool, or opened by
a :class:`l4gw.l4.connect.NodeConnector`).

Anything else, and any head that is incomplete after a read, is handed back to the task
before it has had any effect (nothing sent to a node, no rate-limit token taken): the task
wakes up with the bytes read so far and serves the request with h11. When the connection
is to close, the task wakes up and closes it; so the task stays the owner of the client
socket, and cancelling it (daemon shutdown) tears the fast state down through the abort
callback of its wait.

Timeouts: the sweeper calls :meth:`FastConnection.expire` (through the connection) once the
exchange's deadline has passed; the exchange decides what happens (504, or closing).
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import TYPE_CHECKING

import structlog
import trio

from ..core.errors import GatewayError
from ..core.nodes import NodeState
from ..core.upstream import ConnectPlan, NodeLease
from ..l4.connect import NodeConnector
from ..l4.reactor import Reactor, ReactorStopped
from .conn import HttpConn
from .exchange import CONNECT, DONE, PUMP, READ_NODE, RELEASE, RETRY, SEND_CLIENT, SEND_NODE
from .exchange import HANDOFF as HANDOFF_TASK
from .pool import NodeConnection
from .request import PlainRequest, parse_request
from .responses import MAX_HEAD
from .timeouts import IDLE

if TYPE_CHECKING:
    from .tlsstream import TLSStream

__all__ = ["CLOSE", "HANDOFF", "FastConnection"]

log = structlog.get_logger("l4gw.http")

#: How a :class:`FastConnection` ends (``result``): the connection is to be closed, or the
#: task takes it over with ``leftover`` (and ``eof``).
CLOSE, HANDOFF = 1, 2

_IN = 0x001  # EPOLLIN
_OUT = 0x004  # EPOLLOUT
_RECEIVE_SIZE = 64 * 1024
#: Requests served from one read (pipelined) before the rest goes to the task, so that one
#: client cannot keep the reactor to itself.
_PIPELINE_BURST = 32

# States.
_WAIT = 0  # for the next request
_CONNECT = 1  # a NodeConnector is opening a node connection
_EXCHANGE = 2  # request sent (or being sent), waiting for the response head
_RELAY = 3  # relaying the response body
_FLUSH = 4  # writing the end of a response (or a gateway error) to the client
_DONE = 5


class FastConnection:
    """One client connection while the reactor serves it (see the module docstring).

    Resource handling: registers the client socket in the reactor while it runs and takes it
    out before the task wakes up; never closes it (the task does). Node connections are
    taken from and given back to the connection's pool, or closed.
    """

    __slots__ = (
        "after",
        "buffer",
        "client_fd",
        "client_mask",
        "conn",
        "connector",
        "eof",
        "exchange",
        "nc",
        "node_fd",
        "node_mask",
        "node_out",
        "pending",
        "reactor",
        "result",
        "served",
        "state",
        "task",
        "tls",
    )

    def __init__(
        self, conn: HttpConn, reactor: Reactor, client_fd: int, tls: TLSStream | None = None
    ) -> None:
        self.conn = conn
        self.exchange = conn.exchange
        self.reactor = reactor
        self.client_fd = client_fd
        #: The client's TLS state (None: plain TCP): bytes read are fed to it and decrypted,
        #: bytes written are encrypted first.
        self.tls = tls
        self.client_mask = 0
        self.buffer = bytearray()
        self.eof = False
        self.state = _WAIT
        self.result = CLOSE
        self.task: trio.lowlevel.Task | None = None
        self.served = 0
        self.connector: NodeConnector | None = None
        self.nc: NodeConnection | None = None
        self.node_fd = -1
        self.node_mask = 0
        self.node_out: memoryview | None = None
        #: Bytes not yet taken by the client (backpressure: the node is not read meanwhile).
        self.pending: memoryview | None = None
        #: The exchange's commands left to carry out once ``pending`` is written.
        self.after = 0

    # -- the task's side ------------------------------------------------------------------

    async def serve(self) -> int:
        """Serve requests until the connection is to close (``CLOSE``) or the task must take
        over (``HANDOFF``: ``buffer`` holds the bytes read, ``eof`` says the client closed).

        Cancellation (daemon shutdown) ends everything under way at once: the client socket
        leaves the reactor, a node connection in use is closed, and ``trio.Cancelled`` is
        raised to the task.
        """
        reactor = self.reactor
        if reactor.stopped:
            return CLOSE
        tls = self.tls
        if tls is not None and tls.buffered():
            # Input the socket will not signal again (read with the handshake, or by the
            # task): the task serves it. Part of a record stays in the stream until the rest
            # arrives (the socket signals that).
            try:
                data = tls.decrypt()
            except ssl.SSLError:
                return CLOSE
            if tls.eof and not data:
                return CLOSE
            if data:
                self.conn.bytes_in += len(data)
                self.buffer += data
                self.eof = tls.eof
                return HANDOFF
        try:
            reactor.interest(self.client_fd, 0, _IN)
        except (OSError, ValueError):
            return CLOSE
        self.client_mask = _IN
        reactor.attach(self.client_fd, self)
        self.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.task = None
            self._teardown()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return self.result

    def _end(self, result: int) -> None:
        """Stop serving and wake the task up with ``result``."""
        if self.state == _DONE:
            return
        self.result = result
        pending = self.pending
        if pending is not None and self.tls is not None:
            # Ciphertext not written yet: the stream sends it before anything else.
            self.pending = None
            self.tls.unsend(pending)
        self._teardown()
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def _teardown(self) -> None:
        """Take everything out of the reactor; a node connection still held is closed."""
        self.state = _DONE
        reactor = self.reactor
        reactor.forget(self.client_fd, self.client_mask)
        self.client_mask = 0
        connector = self.connector
        if connector is not None:
            self.connector = None
            connector.abort("connection closed")
        self._drop_node(reuse=False)

    def abort(self, reason: str, *, reset: bool = False) -> None:
        """Reactor shutdown, or a bug in a callback: close the connection."""
        self._end(CLOSE)

    # -- epoll ----------------------------------------------------------------------------

    def _set_client(self, mask: int) -> None:
        if mask == self.client_mask:
            return
        try:
            self.reactor.interest(self.client_fd, self.client_mask, mask)
        except (OSError, ValueError):
            self._end(CLOSE)
            return
        self.client_mask = mask

    def _set_node(self, mask: int) -> None:
        if mask == self.node_mask:
            return
        self.reactor.interest(self.node_fd, self.node_mask, mask)
        self.node_mask = mask

    def on_event(self, fd: int, mask: int) -> None:
        if fd == self.client_fd:
            if self.pending is not None:
                self._write_pending()
            elif self.state == _WAIT:
                self._read_client()
            else:
                # Bytes (or EOF) from the client while a request is under way: they wait in
                # the kernel until the response is done (level-triggered: stop listening).
                self._set_client(0)
        elif fd == self.node_fd:
            if self.node_out is not None:
                self._write_node()
            elif self.state in (_EXCHANGE, _RELAY):
                self._read_node()

    # -- requests -------------------------------------------------------------------------

    def _read_client(self) -> None:
        try:
            data = os.read(self.client_fd, _RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._end(CLOSE)
            return
        conn = self.conn
        tls = self.tls
        if tls is not None:
            tls.feed(data)
            try:
                data = tls.decrypt()
            except ssl.SSLError:
                self._end(CLOSE)
                return
            if tls.eof:
                conn.bytes_in += len(data)
                self.buffer += data
                data = b""
            elif not data:  # part of a record, or a TLS message with no application data
                if tls.outgoing.pending:
                    self._flush()
                return
        if not data:
            self.eof = True
            self._end(HANDOFF if self.buffer else CLOSE)
            return
        conn.bytes_in += len(data)
        if self.exchange.phase == IDLE:
            self.exchange.head_started(trio.current_time())
        self.buffer += data
        self.served = 0
        self._next_requests()

    def _next_requests(self) -> None:
        """Serve the requests in the buffer, one after the other, while they complete here
        at once (gateway errors); stop when one waits for a node, or hand over."""
        while self.state == _WAIT and self.buffer:
            if self.served >= _PIPELINE_BURST:
                self._end(HANDOFF)
                return
            request = parse_request(self.buffer, MAX_HEAD)
            if request is None:
                self._end(HANDOFF)  # incomplete, unusual or malformed: h11 decides
                return
            self.served += 1
            self._start(request)

    def _start(self, request: PlainRequest) -> None:
        """Route and check one request, then send it to a node (or answer it here)."""
        buffer = self.buffer
        start, end = request.body_start, request.end
        body = bytes(buffer[start:end]) if end > start else b""
        cmd = self.exchange.begin(
            trio.current_time(),
            request.method,
            request.target,
            request.host,
            request.headers,
            http11=request.http11,
            close=request.close,
            body=(body,) if body else (),
            reactor=True,
        )
        if cmd == HANDOFF_TASK:  # before the request had any effect: the task makes it again
            self._end(HANDOFF)
            return
        del buffer[:end]
        self.state = _EXCHANGE
        self._run(cmd)

    def _run(self, cmd: int) -> None:
        """Carry out the exchange's commands (in the order its module docstring gives)."""
        exchange = self.exchange
        while cmd:
            if cmd & RELEASE:
                self._drop_node(reuse=exchange.reuse_node)
            if cmd & SEND_CLIENT and not self._flush():
                if self.state == _DONE:  # the client is gone
                    return
                # Backpressure: the node is not read until the client has taken the rest.
                self.after = cmd & ~(RELEASE | SEND_CLIENT)
                if self.nc is not None:
                    self._set_node(0)
                if cmd & DONE:
                    self.state = _FLUSH
                return
            if cmd & RETRY:
                log.info("retry_fresh", node=exchange.record.node, reason=exchange.retry_reason)
            if cmd & CONNECT:
                self._acquire()
                return
            if cmd & SEND_NODE:
                cmd = self._send_node(cmd)
                continue
            if cmd & READ_NODE:
                self.state = _RELAY if exchange.responded else _EXCHANGE
                if self.node_out is None:
                    self._set_node(_IN)
                return
            if cmd & PUMP:
                cmd = exchange.pump(trio.current_time())
                continue
            if cmd & DONE:
                self._response_done()
            return

    def _acquire(self) -> None:
        """A node connection: the upstream's connect plan picks the node; a pooled
        connection to it if there is one (unless the exchange wants a fresh one), else the
        reactor's connector opens one (and goes on with the plan's next nodes)."""
        conn = self.conn
        exchange = self.exchange
        upstream = exchange.upstream
        assert upstream is not None
        conn.watch_upstream(upstream)
        plan = ConnectPlan(upstream, conn.client_key)
        node = plan.next_node()
        if not isinstance(node, NodeState):
            self._run(exchange.connect_failed(node.status_hint, str(node), trio.current_time()))
            return
        if not exchange.fresh:
            nc = conn.pool.take(node, upstream, reactor=self.reactor, check=not exchange.retryable)
            if nc is not None:
                self._node_ready(nc)
                return
        self.state = _CONNECT
        connector = NodeConnector(
            self.reactor,
            upstream,
            conn.client_key,
            self._connected,
            self._connect_failed,
            plan=plan,
        )
        self.connector = connector
        connector.start(NodeLease(upstream, node))

    def _connected(self, sock: socket.socket, lease: NodeLease, mask: int) -> None:
        self.connector = None
        nc = self.conn.pool.adopt(lease, sock)
        if self.state != _CONNECT:  # torn down meanwhile
            self.reactor.forget(sock.fileno(), mask)
            self.conn.pool.release(nc, reuse=False)
            return
        self.reactor.attach(sock.fileno(), self)
        self.node_mask = mask
        self._node_ready(nc)

    def _connect_failed(self, exc: Exception) -> None:
        self.connector = None
        if self.state != _CONNECT:
            return
        if isinstance(exc, ReactorStopped):
            self._end(CLOSE)
            return
        status = exc.status_hint if isinstance(exc, GatewayError) else 502
        self._run(self.exchange.connect_failed(status, str(exc), trio.current_time()))

    def _node_ready(self, nc: NodeConnection) -> None:
        self.nc = nc
        fd = nc.raw.fileno()
        self.node_fd = fd
        reactor = self.reactor
        reactor.attach(fd, self)
        if nc.watcher is reactor:  # pooled by this reactor: still in its epoll set
            nc.watcher = None
            self.node_mask = _IN
        self.state = _EXCHANGE
        self._run(self.exchange.node_ready(nc, trio.current_time()))

    def _send_node(self, cmd: int) -> int:
        """Write the request to the node; returns the commands left (or the exchange's
        answer to a failed write)."""
        data = self.exchange.node_data
        try:
            sent = os.write(self.node_fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return self.exchange.node_send_failed(_why(exc), trio.current_time())
        if sent < len(data):
            self.node_out = memoryview(data)[sent:]
            self._set_node(_OUT)
        return cmd & ~SEND_NODE

    def _write_node(self) -> None:
        view = self.node_out
        assert view is not None
        try:
            sent = os.write(self.node_fd, view)
        except BlockingIOError:
            return
        except OSError as exc:
            self.node_out = None
            self._run(self.exchange.node_send_failed(_why(exc), trio.current_time()))
            return
        if sent < len(view):
            self.node_out = view[sent:]
            return
        self.node_out = None
        self._set_node(_IN)

    # -- responses ------------------------------------------------------------------------

    def _read_node(self) -> None:
        nc = self.nc
        assert nc is not None
        exchange = self.exchange
        try:
            data = os.read(self.node_fd, _RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._run(exchange.node_read_failed(_why(exc), trio.current_time()))
            return
        if data:
            nc.reader.feed(data)
            self._run(exchange.node_bytes(trio.current_time()))
        else:
            nc.reader.feed_eof()
            self._run(exchange.node_eof(trio.current_time()))

    def _response_done(self) -> None:
        """The exchange is over: log it, then the next request or the end."""
        conn = self.conn
        exchange = self.exchange
        conn.log_unlogged(exchange.record)
        if not exchange.keep or conn.listener.draining or self.eof:
            self._end(CLOSE)
            return
        self.state = _WAIT
        exchange.next_request(trio.current_time(), pipelined=bool(self.buffer))
        self._set_client(_IN)
        if self.buffer and self.state == _WAIT:
            self._next_requests()

    def _drop_node(self, *, reuse: bool) -> None:
        """Take the node connection out of the reactor and give it back to the pool."""
        self.exchange.released()
        nc = self.nc
        if nc is None:
            return
        self.nc = None
        mask = self.node_mask
        self.node_fd = -1
        self.node_mask = 0
        self.node_out = None
        self.conn.pool.release(nc, reuse=reuse, watch=self.reactor, mask=mask)

    # -- writing to the client ------------------------------------------------------------

    def _flush(self) -> bool:
        """Write what ``out`` holds; True if the client took all of it (else the rest is
        ``pending`` and the client socket waits for EPOLLOUT). While bytes are pending,
        ``out`` waits behind them."""
        out = self.exchange.out
        if self.pending is not None:
            return False
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        tls = self.tls
        if tls is not None:
            self.conn.bytes_out += len(data)
            try:
                data = tls.encrypt(data)
            except ssl.SSLError:
                self._client_gone()
                return False
        try:
            sent = os.write(self.client_fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._client_gone()
            return False
        if tls is None:
            self.conn.bytes_out += sent
        if sent == len(data):
            return True
        self.pending = memoryview(data)[sent:]
        self._set_client(_OUT)
        return False

    def _write_pending(self) -> None:
        view = self.pending
        assert view is not None
        try:
            sent = os.write(self.client_fd, view)
        except BlockingIOError:
            return
        except OSError:
            self._client_gone()
            return
        if self.tls is None:
            self.conn.bytes_out += sent
        if sent < len(view):
            self.pending = view[sent:]
            return
        self.pending = None
        self._set_client(0)
        if self.state == _WAIT:  # TLS: an answer to a post-handshake message went out
            self._set_client(_IN)
            if self.buffer:
                self._next_requests()
            return
        after = self.after
        self.after = 0
        self._run(after)

    def _client_gone(self) -> None:
        self.pending = None
        self.after = 0
        self._run(self.exchange.client_gone())

    # -- timeouts -------------------------------------------------------------------------

    def expire(self) -> None:
        """The deadline of the exchange's phase passed (called by the sweeper through the
        connection): 504 to a request whose node is late, else the connection closes."""
        if self.state == _DONE:
            return
        self._run(self.exchange.expired(trio.current_time()))


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
