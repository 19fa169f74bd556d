"""Plain HTTP/1.1 keep-alive served from the reactor: no task switch, no epoll re-arm per request.

The task that serves an http connection (:func:`l4gw.http.proxy.serve_http_connection`)
hands a plain-TCP client connection to a :class:`FastConnection` whenever it waits for the
next request, and parks. The reactor (:mod:`l4gw.reactor`) then drives the connection with
callbacks, request after request, as long as each one is ordinary:

* the request is taken by :func:`l4gw.http.request.parse_request` (a complete, plain head,
  its whole body already read);
* its upstream is plain TCP without PROXY headers.

Such a request is routed, checked (source ACL, rate limit), sent to a node over a pooled
connection (or one connected by a :class:`l4gw.reactor.NodeConnector`), and the response is
relayed with the same rules as the task's: interim 1xx, re-framing, ``Connection: close``,
every error status with its JSON body, the retry of an idempotent request on a fresh
connection when a reused one turns out dead, access lines and metrics.

Anything else, and any head that is incomplete after a read, is handed back to the task
before it has had any effect (nothing sent to a node, no rate-limit token taken): the task
wakes up with the bytes read so far and serves the request with h11. When the connection
is to close, the task wakes up and closes it; so the task stays the owner of the client
socket, and cancelling it (daemon shutdown) tears the fast state down through the abort
callback of its wait.

Timeouts use the connection's ``deadline``/``phase`` (:mod:`l4gw.http.timeouts`): the
sweeper calls :meth:`FastConnection.expire`, which answers 504 to a request whose node is
late and closes the connection in the other phases, as the task does.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import TYPE_CHECKING

import structlog
import trio

from ..errors import GatewayError
from ..nodes import NodeState
from ..reactor import NodeConnector, Reactor, ReactorStopped
from ..upstream import UpstreamRuntime
from .admission import refusal, route_request
from .headers import request_headers, response_headers
from .pool import NodeConnection
from .request import PlainRequest, parse_request
from .responses import (
    DEFAULT_KEEPALIVE,
    IDEMPOTENT,
    MAX_HEAD,
    Record,
    client_response_head,
    error_response,
)
from .timeouts import BODY, BUSY, HEAD, IDLE, RESPONSE, SEND
from .wire import (
    DONE,
    MORE,
    NodeProtocolError,
    ResponseHead,
    frame_body,
    request_head,
    response_head,
)

if TYPE_CHECKING:
    from .proxy import _Handler
    from .tlsstream import TLSStream

__all__ = ["CLOSE", "HANDOFF", "FastConnection"]

log = structlog.get_logger("l4gw.http")

#: How a :class:`FastConnection` ends (``result``): the connection is to be closed, or the
#: task takes it over with ``leftover`` (and ``eof``).
CLOSE, HANDOFF = 1, 2

_IN = 0x001  # EPOLLIN
_OUT = 0x004  # EPOLLOUT
_RECEIVE_SIZE = 64 * 1024
#: Response bytes gathered before they are written to the client.
_FLUSH_AT = 256 * 1024
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
    taken from and given back to the handler's pool, or closed.
    """

    __slots__ = (
        "body",
        "buffer",
        "chunk_out",
        "client_fd",
        "client_mask",
        "close_after",
        "connector",
        "eof",
        "fresh",
        "got_bytes",
        "handler",
        "is_head",
        "keep_node",
        "nc",
        "node_fd",
        "node_headers",
        "node_mask",
        "node_out",
        "node_target",
        "out",
        "pending",
        "reactor",
        "request",
        "result",
        "retryable",
        "reused",
        "served",
        "state",
        "task",
        "tls",
        "upstream",
    )

    def __init__(
        self, handler: _Handler, reactor: Reactor, client_fd: int, tls: TLSStream | None = None
    ) -> None:
        self.handler = handler
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
        # Per request:
        self.request: PlainRequest | None = None
        self.body = b""
        self.upstream: UpstreamRuntime | None = None
        self.node_headers: list[tuple[bytes, bytes]] = []
        self.node_target = b""
        self.retryable = False
        self.fresh = False
        self.is_head = False
        self.close_after = False
        self.connector: NodeConnector | None = None
        self.nc: NodeConnection | None = None
        self.node_fd = -1
        self.node_mask = 0
        self.node_out: memoryview | None = None
        self.reused = False
        self.got_bytes = False
        self.keep_node = False
        self.chunk_out = False
        self.out: list[bytes] = []
        #: Bytes not yet taken by the client (backpressure: the node is not read meanwhile).
        self.pending: memoryview | None = None

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
                self.handler.bytes_in += len(data)
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
        handler = self.handler
        tls = self.tls
        if tls is not None:
            tls.feed(data)
            try:
                data = tls.decrypt()
            except ssl.SSLError:
                self._end(CLOSE)
                return
            if tls.eof:
                handler.bytes_in += len(data)
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
        handler.bytes_in += len(data)
        if handler.phase == IDLE:
            handler.phase = HEAD
            handler.deadline = trio.current_time() + handler.listener.config.header_timeout
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
        handler = self.handler
        listener = handler.listener
        table = handler.route_table()
        now = trio.current_time()
        record = handler.record = Record(now)
        handler.responded = False
        method = request.method
        method_text = method.decode("ascii")
        target = request.target.decode("ascii")
        host = request.host
        host_text = host.decode("latin-1") if host is not None else None
        record.method = method_text
        record.path = target
        record.host = host_text

        match, bad_path, upstream = route_request(
            listener, table, record, method_text, host_text, target
        )
        if upstream is not None and (
            upstream.config.proxy_protocol != "off" or upstream.config.tls is not None
        ):
            # PROXY headers and TLS toward nodes are the task's (handed over before any check
            # has had an effect: the task makes them again).
            self._end(HANDOFF)
            return
        buffer = self.buffer
        start, end = request.body_start, request.end
        self.body = bytes(buffer[start:end]) if end > start else b""
        del buffer[: request.end]
        self.request = request
        self.close_after = request.close
        self.is_head = method == b"HEAD"
        handler.phase = BUSY
        handler.deadline = float("inf")

        refused = refusal(listener, handler.client_ip, now, match, bad_path, upstream)
        if refused is not None:
            status, message, close = refused
            handler.denied = handler.denied or status == 403
            self._refuse(status, message, close=close)
            return
        assert match is not None and upstream is not None

        host_header = match.route.host_header or upstream.config.host_header or None
        self.node_headers, _ = request_headers(
            request.headers,
            client_ip=handler.client_ip,
            tls=handler.tls,
            host=host_header.encode("latin-1") if host_header else None,
        )
        self.node_target = match.target.encode("ascii")
        self.upstream = upstream
        self.retryable = method in IDEMPOTENT
        self.fresh = False
        sweeper = handler.deadlines
        sweeper.need(upstream.config.response_timeout)
        sweeper.need(upstream.config.idle_timeout)
        self._acquire(upstream)

    def _acquire(self, upstream: UpstreamRuntime) -> None:
        """A node connection: a pooled one for the picked node, else a new one."""
        handler = self.handler
        first: NodeState | None = None
        if not self.fresh:
            node = upstream.pick([], handler.client_key)
            if node is None:
                self._refuse(503, f"upstream {upstream.name}: no node available")
                return
            nc = handler.pool.take(node, upstream, reactor=self.reactor, check=not self.retryable)
            if nc is not None:
                self._send_request(nc)
                return
            first = node
        self.state = _CONNECT
        connector = NodeConnector(
            self.reactor,
            upstream,
            handler.client_key,
            self._connected,
            self._connect_failed,
            first=first,
        )
        self.connector = connector
        connector.start()

    def _connected(self, sock: socket.socket, node: NodeState, mask: int) -> None:
        self.connector = None
        upstream = self.upstream
        assert upstream is not None
        nc = self.handler.pool.adopt(upstream, node, sock)
        if self.state != _CONNECT:  # torn down meanwhile
            self.reactor.forget(sock.fileno(), mask)
            self.handler.pool.release(nc, reuse=False)
            return
        self.reactor.handlers[sock.fileno()] = self
        self.node_mask = mask
        self._send_request(nc)

    def _connect_failed(self, exc: Exception) -> None:
        self.connector = None
        if self.state != _CONNECT:
            return
        if isinstance(exc, ReactorStopped):
            self._end(CLOSE)
        elif isinstance(exc, GatewayError):
            self._refuse(exc.status_hint, str(exc))
        else:
            self._refuse(502, str(exc))

    def _send_request(self, nc: NodeConnection) -> None:
        handler = self.handler
        request = self.request
        upstream = self.upstream
        assert request is not None and upstream is not None
        self.nc = nc
        fd = nc.raw.fileno()
        self.node_fd = fd
        reactor = self.reactor
        reactor.handlers[fd] = self
        if nc.watcher is reactor:  # pooled by this reactor: still in its epoll set
            nc.watcher = None
            self.node_mask = _IN
        handler.record.node = nc.node.key
        headers = self.node_headers
        if not headers[0][1]:  # an HTTP/1.0 client sent no Host: the node's address
            headers[0] = (b"host", nc.node.key.encode("ascii"))
        data = request_head(request.method, self.node_target, headers)
        if self.body:
            data += self.body
        self.reused = nc.requests > 0
        nc.requests += 1
        self.got_bytes = False
        self.state = _EXCHANGE
        handler.phase = RESPONSE
        handler.deadline = trio.current_time() + upstream.config.response_timeout
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._exchange_failed(f"sending failed ({_why(exc)})", retry=self.reused)
            return
        if sent < len(data):
            self.node_out = memoryview(data)[sent:]
            self._set_node(_OUT)
        else:
            self._set_node(_IN)

    def _write_node(self) -> None:
        view = self.node_out
        assert view is not None
        try:
            sent = os.write(self.node_fd, view)
        except BlockingIOError:
            return
        except OSError as exc:
            self._exchange_failed(f"sending failed ({_why(exc)})", retry=self.reused)
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
        try:
            data = os.read(self.node_fd, _RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if self.state == _EXCHANGE:
                self._exchange_failed(_why(exc), retry=self.reused and not self.got_bytes)
            else:
                self._cut_short()
            return
        if data:
            self.got_bytes = True
            nc.reader.feed(data)
        else:
            nc.reader.feed_eof()
        if self.state == _EXCHANGE:
            self._read_head()
        else:
            self.handler.deadline = trio.current_time() + nc.upstream.config.idle_timeout
            self._relay_body()

    def _read_head(self) -> None:
        nc = self.nc
        request = self.request
        assert nc is not None and request is not None
        reader = nc.reader
        out = self.out
        response: ResponseHead | None = None
        try:
            while True:
                head = reader.read_head(head_request=self.is_head)
                if head is None:  # more to come (interim heads so far go out now)
                    if out and not self._flush():
                        self._set_node(0)  # backpressure: the client catches up first
                    return
                if head.status >= 200:
                    response = head
                    break
                if head.status == 101:
                    self._exchange_failed(
                        "node switched protocols unasked", retry=False, name_node=False
                    )
                    return
                if request.http11:
                    out.append(
                        response_head(head.status, head.reason, response_headers(head.headers))
                    )
        except NodeProtocolError as exc:
            self._exchange_failed(str(exc), retry=self.reused and not self.got_bytes)
            return
        handler = self.handler
        record = handler.record
        record.status = response.status
        close = self.close_after or handler.listener.draining
        head_bytes, self.chunk_out, close = client_response_head(
            response,
            body_done=reader.done,
            is_head=self.is_head,
            http11=request.http11,
            close=close,
        )
        self.close_after = close
        self.keep_node = response.keep_alive
        out.append(head_bytes)
        handler.responded = True
        self.state = _RELAY
        handler.phase = BODY
        handler.deadline = trio.current_time() + nc.upstream.config.idle_timeout
        self._relay_body()

    def _relay_body(self) -> None:
        nc = self.nc
        assert nc is not None
        out = self.out
        try:
            while (step := frame_body(nc.reader, out, self.chunk_out, _FLUSH_AT)) != DONE:
                if out and not self._flush():
                    self._set_node(0)  # backpressure: the client catches up first
                    return
                if step == MORE:
                    self._set_node(_IN)
                    return
        except NodeProtocolError:
            self._cut_short()
            return
        self._drop_node(reuse=self.keep_node)
        self.state = _FLUSH
        if self._flush():
            self._response_done()

    def _response_done(self) -> None:
        """The response went out in full: log it, then the next request or the end."""
        handler = self.handler
        handler.log_request(handler.record)
        self.request = None
        if self.close_after or handler.listener.draining or self.eof:
            self._end(CLOSE)
            return
        self.state = _WAIT
        config = handler.listener.config
        if self.buffer:  # the next head has begun (pipelined)
            handler.phase = HEAD
            handler.deadline = trio.current_time() + config.header_timeout
        else:
            handler.phase = IDLE
            handler.deadline = trio.current_time() + (config.idle_timeout or DEFAULT_KEEPALIVE)
        self._set_client(_IN)
        if self.buffer and self.state == _WAIT:
            self._next_requests()

    def _cut_short(self) -> None:
        """The node failed after the response head went out: the client sees the connection
        close before the announced length or the last chunk."""
        self._drop_node(reuse=False)
        self.handler.log_request(self.handler.record)
        self._end(CLOSE)

    def _exchange_failed(self, message: str, *, retry: bool, name_node: bool = True) -> None:
        """No response head was relayed: retry an idempotent request once on a fresh
        connection if a reused one turned out dead, else answer 502."""
        nc = self.nc
        assert nc is not None and self.upstream is not None
        key = nc.node.key
        if name_node:
            message = f"node {key}: {message}"
        self._drop_node(reuse=False)
        self.out.clear()
        if retry and self.retryable and not self.fresh:
            self.fresh = True
            log.info("retry_fresh", node=key, reason=message)
            self._acquire(self.upstream)
            return
        self._refuse(502, message)

    def _drop_node(self, *, reuse: bool) -> None:
        """Take the node connection out of the reactor and give it back to the pool."""
        nc = self.nc
        if nc is None:
            return
        self.nc = None
        mask = self.node_mask
        self.node_fd = -1
        self.node_mask = 0
        self.node_out = None
        self.handler.pool.release(nc, reuse=reuse, watch=self.reactor, mask=mask)

    # -- answers made here ----------------------------------------------------------------

    def _refuse(self, status: int, message: str, *, close: bool = False) -> None:
        """Answer the current request with a gateway error (its body was read in full)."""
        handler = self.handler
        handler.record.status = status
        keep = not close and not self.close_after and not handler.listener.draining
        self.close_after = not keep
        handler.responded = True
        self.out.append(error_response(status, message, keep=keep))
        self.state = _FLUSH
        handler.phase = SEND
        config = handler.listener.config
        handler.deadline = trio.current_time() + (config.idle_timeout or DEFAULT_KEEPALIVE)
        if self._flush():
            self._response_done()

    def _flush(self) -> bool:
        """Write what ``out`` holds; True if the client took all of it (else the rest is
        ``pending`` and the client socket waits for EPOLLOUT). While bytes are pending,
        ``out`` waits behind them."""
        out = self.out
        if self.pending is not None:
            return False
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        tls = self.tls
        if tls is not None:
            self.handler.bytes_out += len(data)
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
            self.handler.bytes_out += sent
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
            self.handler.bytes_out += sent
        if sent < len(view):
            self.pending = view[sent:]
            return
        self.pending = None
        self._set_client(0)
        if self.state == _WAIT:  # TLS: an answer to a post-handshake message went out
            self._set_client(_IN)
            if self.buffer:
                self._next_requests()
        elif self.state == _EXCHANGE:
            self._set_node(_IN)
            self._read_head()
        elif self.state == _RELAY:
            self._relay_body()
        elif self.state == _FLUSH and (not self.out or self._flush()):
            self._response_done()

    def _client_gone(self) -> None:
        self.pending = None
        self._drop_node(reuse=False)
        record = self.handler.record
        if not record.logged and record.method is not None:
            self.handler.log_request(record)
        self._end(CLOSE)

    # -- timeouts -------------------------------------------------------------------------

    def expire(self, phase: int) -> None:
        """The deadline of ``phase`` passed (called by the sweeper through the handler)."""
        if self.state == _DONE:
            return
        handler = self.handler
        if phase == RESPONSE and not handler.responded and self.state == _EXCHANGE:
            nc = self.nc
            node = nc.node.key if nc is not None else handler.record.node
            self._drop_node(reuse=False)
            self.out.clear()
            self._refuse(504, f"node {node} did not answer in time", close=True)
            return
        record = handler.record
        if phase != IDLE and not record.logged and record.method is not None:
            handler.log_request(record)
        self._end(CLOSE)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
