"""The L7 data path: HTTP/1.1 from clients (parsed by h11) to nodes (l4gw.http.wire).

:func:`handle_http_connection` serves one accepted client connection (plain or TLS) until it
closes. It is one of the two drivers of the connection's
:class:`~l4gw.http.exchange.Exchange`, which decides everything about a request (routing,
admission, what goes to the node and to the client, retries, timeouts); this task reads
heads with h11, carries out the exchange's commands with awaits, and logs and counts.

Given the daemon's reactor, a client connection over plain TCP, or over TLS terminated by a
:class:`l4gw.http.tlsstream.TLSStream`, is served by :mod:`l4gw.http.fastpath` between the
requests that need this task; the task parks meanwhile, still owning the socket. What
follows is the task's own path (streamed or chunked uploads, upgrades, PROXY headers or TLS
toward nodes, heads the lean parser leaves to h11, the first request after a handshake).

Keeping the per-request path lean:

* h11 parses what clients send (one ``h11.Connection`` per request; bytes that arrived after
  a request, e.g. pipelined requests, are carried over with ``trailing_data``). Everything
  the gateway writes, and the node's responses, go through :mod:`l4gw.http.wire`, which does
  a fraction of h11's work per message.
* Plain sockets are driven by file descriptor (:mod:`l4gw.http.io`), so a successful system
  call does not cost a trip through trio's scheduler.
* No task is started for a request whose body is already buffered in full (every GET, most
  small POSTs); the response head and a small body go out in one ``send``; node connections
  are reused from :mod:`l4gw.http.pool`.

A request whose body is still arriving is uploaded by a second task while the first one waits
for the response, so a node may answer early (``413``, or ``401`` after ``Expect:
100-continue``) and a slow upload never blocks the response.

What a client gets is in ``docs/http.md``; in short: 400 malformed request (h11 errors,
conflicting ``Content-Length``/``Transfer-Encoding``, obsolete line folding, refused paths),
404 no route, 405 ``CONNECT``, 408 head not complete within ``header_timeout``, 429 rate
limited, 431 head over 16 KiB, 501 a transfer coding other than chunked, 502 connect failed or
a broken response, 503 no healthy node, 504 no response head within ``response_timeout``.
Gateway errors have a JSON body ``{"error": "...", "status": N}``.
"""

from __future__ import annotations

import contextlib

import h11
import structlog
import trio

from ..core.errors import GatewayError
from ..core.proxyproto import encode_v1, encode_v2
from ..core.runtime import ListenerRuntime
from ..core.upstream import UpstreamRuntime
from ..l4.deadlines import Deadlines
from ..l4.reactor import Reactor
from .admission import Refusal
from .conn import HttpConn
from .exchange import (
    CONNECT,
    DONE,
    PUMP,
    READ_NODE,
    RELEASE,
    RETRY,
    SEND_CLIENT,
    SEND_NODE,
    SWITCH,
    UPLOAD,
)
from .fastpath import HANDOFF, FastConnection
from .headers import connection_tokens, is_upgrade_request, response_headers
from .io import IO_ERRORS, ByteIO, FdIO, io_for_stream
from .pool import NodeConnection, NodePool
from .responses import DEFAULT_KEEPALIVE, MAX_HEAD, NO_ROUTE
from .strict import (
    CONTROL_MESSAGE,
    FOLD_MESSAGE,
    REFUSE,
    START,
    bad_field_value,
    head_refusal,
    scan_head,
)
from .tlsstream import TLSStream
from .wire import LAST_CHUNK, chunk, response_head

__all__ = ["MAX_HEAD", "NO_ROUTE", "handle_http_connection"]

log = structlog.get_logger("l4gw.http")

#: After an error response with request bytes left unread, how long the gateway keeps
#: reading (and discarding) before closing, so the client sees the response rather than a
#: reset (nginx's lingering close).
LINGER_TIME = 2.0
LINGER_BYTES = 256 * 1024
#: How long closing a TLS connection (close_notify) may take.
CLOSE_TIMEOUT = 1.0
#: The largest request Content-Length passed on to a node (h11 takes up to 20 digits). A
#: node parsing it into a signed or unsigned 64-bit integer would overflow or wrap above this
#: (2**64 + 5 read as 5: the rest of the "body" becomes the node's next request); nginx and
#: HAProxy refuse such values with 400 too.
MAX_CONTENT_LENGTH = (1 << 63) - 1

# -- errors and shared state ---------------------------------------------------------------------


class _ClientGone(Exception):
    """The client closed or broke its connection mid-exchange."""


class _Upload:
    """State shared between the response task and a body upload task."""

    __slots__ = ("client_error", "head_received", "scope", "wake")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.head_received = False
        self.client_error: BaseException | None = None
        #: The response side's current wait for the node: cancelled by the upload task on a
        #: client error (before the response head came).
        self.wake = trio.CancelScope()


# -- entry point ----------------------------------------------------------------------------


async def handle_http_connection(
    listener: ListenerRuntime,
    stream: trio.abc.Stream,
    client: tuple[str, int],
    *,
    tls: bool,
    pool: NodePool,
    deadlines: Deadlines,
    reactor: Reactor | None = None,
) -> str:
    """Serve HTTP/1.1 requests from one client connection until it ends; returns the
    connection's outcome for ``l4gw_connections_total``: ``"denied"`` when the source address
    was refused (403), else ``"proxied"``.

    ``client`` is the client's address (from the socket, or from an accepted PROXY header);
    ``tls`` says the listener terminated TLS (``X-Forwarded-Proto: https``). With a
    ``reactor``, a plain-TCP connection is served from it between the requests that need
    this task (see :mod:`l4gw.http.fastpath`). ``pool`` and ``deadlines`` are the daemon's
    node pool and deadline sweeper (the connection is registered there while it lasts).

    Resource handling: owns ``stream`` and closes it before returning (after an error
    response with request bytes unread, it first reads and discards them for up to
    ``LINGER_TIME`` seconds). Node connections are returned to the pool or closed.

    Error handling: nothing a client or a node sends raises out of here; ``trio.Cancelled``
    (the daemon closing connections) does, after the stream and node connections are closed.
    Every request is counted in ``listener.stats.requests`` and ``durations``; the bytes read
    from and written to the client in ``stats.bytes_in``/``bytes_out``.
    """
    handler = _Handler(listener, stream, client, tls, pool, deadlines)
    if reactor is not None and type(handler.io) in (FdIO, TLSStream):
        handler.reactor = reactor
    sweeper = deadlines
    sweeper.need(listener.config.header_timeout)
    sweeper.need(listener.config.idle_timeout or DEFAULT_KEEPALIVE)
    sweeper.add_keepalive(handler)
    try:
        with handler.scope:
            try:
                await handler.run()
            except (*IO_ERRORS, _ClientGone):
                pass
        if handler.expired is not None:
            await handler.timed_out(handler.expired)
    finally:
        sweeper.discard_keepalive(handler)
        handler.finish()
        await handler.close()
    return "denied" if handler.exchange.denied else "proxied"


class _Handler(HttpConn):
    """The connection's task: h11 for what clients send, and the driver of the exchange for
    everything the reactor does not serve."""

    __slots__ = (
        "expired",
        "fast",
        "h",
        "head_scan",
        "io",
        "linger",
        "private",
        "reactor",
        "scope",
        "stream",
    )

    def __init__(
        self,
        listener: ListenerRuntime,
        stream: trio.abc.Stream,
        client: tuple[str, int],
        tls: bool,
        pool: NodePool,
        deadlines: Deadlines,
    ) -> None:
        super().__init__(listener, client, tls, pool, deadlines)
        self.stream = stream
        self.io = io_for_stream(stream)
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        #: l4gw.http.strict's scan of the head h11 is given (obs-fold is refused).
        self.head_scan = START
        self.linger = False
        #: A connection to an upstream with proxy_protocol on, kept for this client only.
        self.private: NodeConnection | None = None
        # Timeouts (see l4gw.http.timeouts):
        self.scope = trio.CancelScope()
        self.expired: int | None = None
        #: Where plain-TCP keep-alive is served between requests (None: always here).
        self.reactor: Reactor | None = None
        #: The reactor's state while it serves this connection.
        self.fast: FastConnection | None = None

    def expire(self) -> None:
        """Called by the sweeper: the deadline of the current phase has passed."""
        fast = self.fast
        if fast is not None:
            fast.expire()
            return
        if self.expired is None:
            self.expired = self.exchange.phase
            self.scope.cancel()

    def request_body_done(self) -> bool:
        """Whether the request body was read in full; what is buffered of it is discarded
        first (an answer made here leaves it unread)."""
        if self.fast is not None:
            return True
        h = self.h
        if h.their_state is h11.SEND_BODY:
            # Discard what is already here of the request body (often all of it: an empty
            # body), so the connection can stay open.
            with contextlib.suppress(h11.RemoteProtocolError):
                while type(h.next_event()) is h11.Data:
                    pass
        return h.their_state in _REQUEST_READ

    async def timed_out(self, phase: int) -> None:
        """Answer for a timeout (outside the cancelled scope), before the connection closes."""
        h = self.h
        exchange = self.exchange
        head_started = h.their_state is not h11.IDLE or bool(h.trailing_data[0])
        cmd = exchange.expired(trio.current_time(), phase=phase, head_started=head_started)
        exchange.released()  # the cancelled exchange released its node connection
        with trio.move_on_after(CLOSE_TIMEOUT):
            if cmd & SEND_CLIENT:
                with contextlib.suppress(_ClientGone):
                    await self._send(self._take_out())
        self._done()

    # -- connection loop ---------------------------------------------------------------

    async def run(self) -> None:
        exchange = self.exchange
        in_head = True  # a head has started (a new connection counts as one)
        fed = False  # self.h holds bytes of the next request (or the client's EOF)
        while True:
            if not fed and self.reactor is not None:
                handed = await self._serve_fast(in_head)
                if handed is None:
                    return
                data, eof = handed
                self.h.receive_data(data)
                self.head_scan = scan_head(START, data)
                if eof:
                    self.h.receive_data(b"")
                in_head = True
            fed = False
            try:
                request = await self._read_head(in_head)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                exchange.refuse_head(status, _protocol_message(status, exc), trio.current_time())
                await self._answer()
                return
            if request is None:
                return
            if not await self._handle(request) or self.listener.draining:
                return
            h = self.h
            if h.their_state is not h11.DONE:
                return
            leftover, closed = h.trailing_data
            h = self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            in_head = bool(leftover)
            self.head_scan = scan_head(START, leftover)
            if leftover:  # pipelined bytes: the next head has started
                h.receive_data(leftover)
                exchange.head_started(trio.current_time())
                fed = True
            if closed:
                h.receive_data(b"")
                fed = True

    async def _serve_fast(self, in_head: bool) -> tuple[bytes, bool] | None:
        """Let the reactor serve requests until one needs this task; returns the bytes read
        so far and whether the client closed, or None when the connection is to close."""
        reactor = self.reactor
        io = self.io
        assert reactor is not None and isinstance(io, (FdIO, TLSStream))
        if not in_head:
            self.exchange.idle(trio.current_time())
        fast = self.fast = FastConnection(
            self, reactor, io.fd, io if isinstance(io, TLSStream) else None
        )
        try:
            result = await fast.serve()
        finally:
            self.fast = None
        if result != HANDOFF:
            return None
        return bytes(fast.buffer), fast.eof

    async def _read_head(self, in_head: bool) -> h11.Request | None:
        if self.head_scan == REFUSE:
            self._refuse_fold()
        event: object = self.h.next_event()
        if event is h11.NEED_DATA:
            event = await self._receive_head(in_head)
        if type(event) is h11.Request:
            return event
        return None  # ConnectionClosed (or EOF between requests)

    async def _receive_head(self, in_head: bool) -> object:
        h = self.h
        receive = self.io.receive
        exchange = self.exchange
        idle = not in_head
        if idle:
            exchange.idle(trio.current_time())
        # else: phase HEAD, deadline set when the connection was accepted or the head began
        while True:
            try:
                data = await receive(wait_first=idle)
            except IO_ERRORS:
                data = b""
            if data:
                self.bytes_in += len(data)
                if idle:
                    idle = False
                    exchange.head_started(trio.current_time())
            h.receive_data(data)
            self.head_scan = scan = scan_head(self.head_scan, data)
            if scan == REFUSE:
                self._refuse_fold()
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event

    def _refuse_fold(self) -> None:
        """Raise ``h11.RemoteProtocolError`` (400) for the complete head with a folded line
        that h11 holds (``head_scan`` is ``REFUSE``), as h11 itself would if it refused
        folding (see :mod:`l4gw.http.strict`)."""
        message = head_refusal(self.h.trailing_data[0])
        raise h11.RemoteProtocolError(message or FOLD_MESSAGE)

    # -- one request -------------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> bool:
        """Serve one request; True if the connection may carry another one."""
        h = self.h
        exchange = self.exchange
        method = request.method
        target = request.target
        http11 = request.http_version == b"1.1"
        close = not http11
        host: bytes | None = None
        content_length: bytes | None = None
        chunked = False
        wants_upgrade = False
        size = len(target)
        for name, value in request.headers:
            size += len(name) + len(value) + 4
            if name == b"host":
                host = value
            elif name == b"content-length":
                content_length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection":
                if b"close" in value.lower() and b"close" in connection_tokens([(name, value)]):
                    close = True
            elif name == b"upgrade":
                wants_upgrade = True
        if size > MAX_HEAD:  # h11 only limits heads that arrive in several reads
            exchange.refuse_head(
                431, _protocol_message(431, None), trio.current_time(), method=method, target=target
            )
            return await self._answer()
        protocol: Refusal | None = None
        if not request.http_version.startswith(b"1."):
            # h11 takes any "HTTP/d.d"; an HTTP/2.0 or 0.9 request line on an HTTP/1 listener
            # is refused (RFC 9110 §15.6.6), as nginx does, not served as HTTP/1.0.
            protocol = (505, "HTTP version not supported", True)
        elif bad_field_value(request.headers):
            protocol = (400, f"malformed request: {CONTROL_MESSAGE}", True)
        elif content_length is not None and chunked:
            protocol = (400, "both Content-Length and Transfer-Encoding", True)
        elif chunked and request.http_version < b"1.1":
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (the
            # sender may not mean chunked at all); as nginx does, refuse it.
            protocol = (400, "Transfer-Encoding in an HTTP/1.0 request", True)
        elif content_length is not None and int(content_length) > MAX_CONTENT_LENGTH:
            protocol = (400, "Content-Length too large", True)
        elif method == b"CONNECT":
            protocol = (405, "CONNECT is not supported", True)
        cmd = exchange.begin(
            trio.current_time(),
            method,
            target,
            host,
            request.headers,
            http11=http11,
            close=close,
            chunked=chunked,
            upgrade=wants_upgrade and is_upgrade_request(request.headers),
            protocol=protocol,
        )
        if cmd & DONE:  # refused
            return await self._answer(cmd)

        # Body events already buffered are parsed before any node is contacted, so a
        # malformed body (bad chunk size...) is refused with nothing sent anywhere.
        body: list[bytes] = []
        body_complete = False
        try:
            while True:
                event = h.next_event()
                if type(event) is h11.Data:
                    body.append(chunk(event.data) if chunked else event.data)
                elif type(event) is h11.EndOfMessage:
                    if chunked:
                        body.append(LAST_CHUNK)
                    body_complete = True
                    break
                elif type(event) is h11.ConnectionClosed:
                    return False
                else:  # NEED_DATA, or PAUSED after an upgrade request
                    break
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            cmd = exchange.refuse(
                status, _protocol_message(status, exc), trio.current_time(), close=True
            )
            return await self._answer(cmd)
        exchange.set_body(body, body_complete)
        return await self._play(cmd, chunked)

    async def _play(self, cmd: int, chunked: bool) -> bool:
        """Carry out the exchange's commands until it is over; True if the connection may
        carry another request. Raises ``_ClientGone`` when the client went away before a
        response could be relayed (nothing is logged then)."""
        exchange = self.exchange
        held: list[NodeConnection] = []  # the node connection in use (at most one)
        try:
            cmd = await self._steps(cmd, held, None)
            if cmd & UPLOAD:
                # The body is still arriving: a second task copies it to the node, so that
                # the node may answer early and a slow upload never blocks the response.
                upload = _Upload()
                error: _ClientGone | None = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._upload, held[0], upload, chunked)
                    try:
                        cmd = await self._steps(cmd & ~UPLOAD, held, upload)
                    except _ClientGone as exc:
                        error = exc  # raised outside the nursery, not in an ExceptionGroup
                    finally:
                        upload.scope.cancel()
                if error is not None:
                    raise error
            if cmd & SWITCH:
                nc = held.pop()
                return await self._switch(nc)
        finally:
            if held:
                self._release(held.pop(), reuse=False)  # an error or a cancellation left it
                exchange.released()
        return self._done()

    async def _steps(self, cmd: int, held: list[NodeConnection], upload: _Upload | None) -> int:
        """Carry out commands until ``DONE``, ``SWITCH`` or ``UPLOAD``, which it returns
        (``held`` holds the node connection in use)."""
        exchange = self.exchange
        while True:
            if cmd & RELEASE:
                if held:
                    self._release(held.pop(), reuse=exchange.reuse_node)
                exchange.released()
            if cmd & SEND_CLIENT:
                try:
                    await self._send(self._take_out())
                except _ClientGone:
                    if not exchange.responded:
                        raise
                    cmd = exchange.client_gone()
                    continue
            if cmd & RETRY:
                log.info("retry_fresh", node=exchange.record.node, reason=exchange.retry_reason)
            if cmd & CONNECT:
                upstream = exchange.upstream
                assert upstream is not None
                self.watch_upstream(upstream)
                try:
                    nc = await self._acquire(upstream, fresh=exchange.fresh)
                except GatewayError as exc:
                    cmd = exchange.connect_failed(exc.status_hint, str(exc), trio.current_time())
                    continue
                held.append(nc)
                cmd = exchange.node_ready(nc, trio.current_time())
                continue
            first_read = False
            if cmd & SEND_NODE:
                try:
                    await held[0].io.send_all(exchange.node_data)
                except IO_ERRORS as exc:
                    cmd = exchange.node_send_failed(_why(exc), trio.current_time())
                    continue
                exchange.node_data = b""
                first_read = True  # the response cannot be there yet
                cmd &= ~SEND_NODE
            if cmd & (UPLOAD | SWITCH | DONE):
                return cmd
            if cmd & READ_NODE:
                cmd = await self._read_node(held[0], upload, first_read)
            elif cmd & PUMP:
                cmd = exchange.pump(trio.current_time())
            else:
                return cmd

    async def _read_node(self, nc: NodeConnection, upload: _Upload | None, first: bool) -> int:
        """Read from the node and tell the exchange; while a body upload runs and no
        response head came yet, a client failure ends the wait (``_ClientGone``, or the
        answer to a malformed body)."""
        exchange = self.exchange
        data = b""
        if upload is not None and not exchange.responded:
            if upload.client_error is None:
                wake = upload.wake = trio.CancelScope()
                with wake:
                    try:
                        data = await nc.io.receive(wait_first=first)
                    except IO_ERRORS as exc:
                        return exchange.node_read_failed(_why(exc), trio.current_time())
            error = upload.client_error
            if error is not None:
                exchange.reuse_node = False
                if isinstance(error, h11.RemoteProtocolError):
                    status = error.error_status_hint
                    return RELEASE | exchange.refuse(
                        status, _protocol_message(status, error), trio.current_time(), close=True
                    )
                raise _ClientGone(str(error))
        else:
            try:
                data = await nc.io.receive(wait_first=first)
            except IO_ERRORS as exc:
                return exchange.node_read_failed(_why(exc), trio.current_time())
        if data:
            nc.reader.feed(data)
            cmd = exchange.node_bytes(trio.current_time())
        else:
            nc.reader.feed_eof()
            cmd = exchange.node_eof(trio.current_time())
        if upload is not None and exchange.responded:
            upload.head_received = True
        return cmd

    async def _answer(self, cmd: int = SEND_CLIENT | DONE) -> bool:
        """Write an answer made here and end the exchange; True if the connection may carry
        another request."""
        if cmd & SEND_CLIENT:
            try:
                await self._send(self._take_out())
            except _ClientGone:
                self.exchange.keep = False
        return self._done()

    def _done(self) -> bool:
        """The exchange is over: log it; linger if the connection closes with request bytes
        unread. Returns whether the connection may carry another request."""
        exchange = self.exchange
        self.log_unlogged(exchange.record)
        keep = exchange.keep
        if not keep and exchange.responded and not self.request_body_done():
            self.linger = True
        return keep

    def _take_out(self) -> bytes:
        out = self.exchange.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    async def _acquire(self, upstream: UpstreamRuntime, *, fresh: bool) -> NodeConnection:
        version = upstream.config.proxy_protocol
        if version == "off":
            return await self.pool.acquire(upstream, self.client_key, fresh=fresh)
        private = self.private
        if private is not None:
            self.private = None
            if not fresh and private.upstream is upstream and private.usable():
                private.lease.acquire()
                return private
            private.close()
        local = _local_address(self.stream) or self.listener.config.listen.sockaddr()
        header = (encode_v1 if version == "v1" else encode_v2)(self.client, local)
        return await self.pool.acquire(upstream, self.client_key, prefix=header)

    def _release(self, nc: NodeConnection, *, reuse: bool) -> None:
        if not nc.private:
            self.pool.release(nc, reuse=reuse)
            return
        if not nc.lease.held:
            return
        nc.lease.release()
        if reuse and nc.node.in_service and not nc.reader.buffer:
            nc.reader.reset()
            if self.private is not None:
                self.private.close()
            self.private = nc
        else:
            nc.close()

    async def _upload(self, nc: NodeConnection, upload: _Upload, chunked: bool) -> None:
        """Copy the rest of the request body from the client to the node, telling the
        exchange (its upload deadline, then the response timeout)."""
        h = self.h
        exchange = self.exchange
        receive = self.io.receive
        send = nc.io.send_all
        with upload.scope:
            while True:
                try:
                    event = h.next_event()
                    if event is h11.NEED_DATA:
                        data = await receive()
                        self.bytes_in += len(data)
                        exchange.upload_progress(trio.current_time())
                        h.receive_data(data)
                        continue
                except (h11.RemoteProtocolError, *IO_ERRORS) as exc:
                    upload.client_error = exc
                    if not upload.head_received:
                        upload.wake.cancel()
                    return
                if type(event) is h11.Data:
                    data = chunk(event.data) if chunked else event.data
                elif type(event) is h11.EndOfMessage:
                    data = LAST_CHUNK if chunked else b""
                else:  # ConnectionClosed mid-body
                    upload.client_error = _ClientGone("client closed during the request body")
                    if not upload.head_received:
                        upload.wake.cancel()
                    return
                try:
                    if data:
                        await send(data)
                except IO_ERRORS:
                    # The node stopped reading (it may have answered already): the response
                    # side finds out what happened.
                    return
                if type(event) is h11.EndOfMessage:
                    exchange.upload_done(trio.current_time())
                    return

    async def _switch(self, nc: NodeConnection) -> bool:
        """The node accepted a protocol upgrade: relay the 101, then bytes both ways until
        both sides are done (half-close passed on), an error, or ``idle_timeout`` without a
        byte either way."""
        exchange = self.exchange
        head = exchange.switch_head
        assert head is not None
        out = response_head(101, head.reason, response_headers(head.headers, upgrade=True))
        node_early = bytes(nc.reader.buffer)
        nc.reader.buffer.clear()
        client_early, client_eof = self.h.trailing_data
        idle = nc.upstream.config.idle_timeout
        try:
            await self._send(out + node_early)
            if client_early:
                await nc.io.send_all(client_early)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, nc.io, self.io, True, idle, nursery.cancel_scope)
                if client_eof:
                    await nc.io.send_eof()
                else:
                    await self._pump(self.io, nc.io, False, idle, nursery.cancel_scope)
        except (*IO_ERRORS, _ClientGone):
            pass
        finally:
            self._release(nc, reuse=False)
            exchange.released()
            self.log_request(exchange.record)
        return False

    async def _pump(
        self, src: ByteIO, dst: ByteIO, to_client: bool, idle: float, scope: trio.CancelScope
    ) -> None:
        """Copy ``src`` to ``dst`` until EOF (then half-close ``dst``); an error ends both
        directions (``scope``)."""
        exchange = self.exchange
        try:
            while data := await src.receive():
                await dst.send_all(data)
                if to_client:
                    self.bytes_out += len(data)
                else:
                    self.bytes_in += len(data)
                exchange.deadline = trio.current_time() + idle
            await dst.send_eof()
        except IO_ERRORS:
            scope.cancel()

    async def _send(self, data: bytes) -> None:
        try:
            await self.io.send_all(data)
        except IO_ERRORS as exc:
            raise _ClientGone(_why(exc)) from None
        self.bytes_out += len(data)

    # -- the end -----------------------------------------------------------------------

    def finish(self) -> None:
        self.count_bytes()
        if self.private is not None:
            self.private.close()
            self.private = None

    async def close(self) -> None:
        stream = self.stream
        with trio.CancelScope(shield=True):
            if self.linger:
                await _linger(stream)
            with (
                trio.move_on_after(CLOSE_TIMEOUT) as scope,
                contextlib.suppress(*IO_ERRORS),
            ):
                await stream.aclose()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(stream)


#: The client's states once its request was read in full (``MUST_CLOSE``: it asked for
#: ``Connection: close``) or it closed: nothing is left to linger for.
_REQUEST_READ = frozenset({h11.DONE, h11.MUST_CLOSE, h11.CLOSED})


def _protocol_message(status: int, exc: h11.RemoteProtocolError | None) -> str:
    if status == 431:
        return f"request head larger than {MAX_HEAD} bytes"
    return f"malformed request: {exc}"


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


async def _linger(stream: trio.abc.Stream) -> None:
    """Stop sending, then read and discard what the client still sends, for a while."""
    with trio.move_on_after(LINGER_TIME), contextlib.suppress(*IO_ERRORS):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        elif isinstance(stream, TLSStream):
            await stream.close_notify()
        left = LINGER_BYTES
        while left > 0:
            data = await stream.receive_some(64 * 1024)
            if not data:
                break
            left -= len(data)


def _local_address(stream: object) -> tuple[str, int] | None:
    """The local address of the socket under ``stream`` (through TLS and wrappers)."""
    for _ in range(8):
        sock = getattr(stream, "socket", None)
        if sock is not None:
            try:
                address = sock.getsockname()
            except OSError:
                return None
            return (address[0], address[1])
        stream = getattr(stream, "transport_stream", None) or getattr(stream, "inner", None)
        if stream is None:
            return None
    return None
