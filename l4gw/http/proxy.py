"""The L7 data path: HTTP/1.1 from clients (parsed by h11) to nodes (l4gw.http.wire).

:func:`serve_http_connection` serves one accepted client connection (plain or TLS) until it
closes. Per request: read the head within ``header_timeout``, rate limit, route, take a node
connection from the pool (or open one, with retries over distinct nodes), forward the request
with rewritten headers and path, stream the body both ways, log and count.

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
import math
from typing import Any

import h11
import h11._readers
import structlog
import trio

from .. import logs
from ..deadlines import Deadlines
from ..errors import GatewayError
from ..proxyproto import encode_v1, encode_v2
from ..reactor import Reactor
from ..runtime import ListenerRuntime
from ..upstream import UpstreamRuntime
from .admission import Refusal, refusal, route_request
from .fastpath import HANDOFF, FastConnection
from .headers import connection_tokens, is_upgrade_request, request_headers, response_headers
from .io import IO_ERRORS, ByteIO, FdIO, io_for_stream
from .pool import NodeConnection, NodePool
from .responses import (
    DEFAULT_KEEPALIVE,
    IDEMPOTENT,
    MAX_HEAD,
    NO_ROUTE,
    Record,
    client_response_head,
    error_response,
)
from .routes import RouteTable, route_table
from .timeouts import BODY, BUSY, HEAD, IDLE, RESPONSE, SEND, UPLOAD
from .tlsstream import TLSStream
from .wire import (
    DONE,
    FULL,
    LAST_CHUNK,
    NodeProtocolError,
    ResponseHead,
    chunk,
    frame_body,
    request_head,
    response_head,
)

__all__ = ["MAX_HEAD", "NO_ROUTE", "serve_http_connection"]

log = structlog.get_logger("l4gw.http")

#: After an error response with request bytes left unread, how long the gateway keeps
#: reading (and discarding) before closing, so the client sees the response rather than a
#: reset (nginx's lingering close).
LINGER_TIME = 2.0
LINGER_BYTES = 256 * 1024
#: How long closing a TLS connection (close_notify) may take.
CLOSE_TIMEOUT = 1.0
#: Body chunks relayed back to back before yielding to other tasks.
_BURST = 16
#: Response bytes gathered before they are written to the client.
_FLUSH_AT = 256 * 1024

# -- strict parsing: obsolete line folding is refused ---------------------------------------
#
# h11 unfolds obs-fold (RFC 9112 §5.2 allows that or a 400). A gateway in front of other
# parsers refuses it instead, as nginx and HAProxy do, so no two parsers can disagree about
# where a header ends. h11 has no switch for it; its line-folding helper is replaced here
# (tests/test_http_proxy.py checks that this takes effect).


def _refuse_obs_fold(lines: Any) -> Any:
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise h11.LocalProtocolError("obsolete header line folding is not accepted")
        yield line


if hasattr(h11._readers, "_obsolete_line_fold"):
    h11._readers._obsolete_line_fold = _refuse_obs_fold


# -- errors and records ---------------------------------------------------------------------


class _ExchangeFailed(Exception):
    """The exchange with the node failed before a response head was relayed."""

    def __init__(self, status: int, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        #: The request may be sent again on a new connection (a reused one was dead).
        self.retry = retry


class _ClientGone(Exception):
    """The client closed or broke its connection mid-exchange."""


class _Upload:
    """State shared between the response task and a body upload task."""

    __slots__ = ("client_error", "done", "head_received", "response_timeout", "scope", "wake")

    def __init__(self, response_timeout: float) -> None:
        self.scope = trio.CancelScope()
        self.done = False
        self.head_received = False
        self.response_timeout = response_timeout
        self.client_error: BaseException | None = None
        #: Cancelled by the upload task on a client error, to stop the wait for the response.
        self.wake = trio.CancelScope()


# -- entry point ----------------------------------------------------------------------------


async def serve_http_connection(
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
    return "denied" if handler.denied else "proxied"


class _Handler:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "client_ip",
        "client_key",
        "client_text",
        "config",
        "counted_in",
        "counted_out",
        "deadline",
        "deadlines",
        "denied",
        "expired",
        "fast",
        "h",
        "io",
        "linger",
        "listener",
        "phase",
        "pool",
        "private",
        "reactor",
        "record",
        "request_close",
        "request_head",
        "request_http11",
        "responded",
        "scope",
        "stream",
        "table",
        "tls",
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
        self.listener = listener
        self.stream = stream
        self.io = io_for_stream(stream)
        self.client = client
        self.client_ip = client[0]
        self.client_key = client[0].encode()
        self.client_text = f"{client[0]}:{client[1]}"  # as on the tcp access lines
        self.tls = tls
        #: Set when a request was refused because of the source address (403).
        self.denied = False
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.bytes_in = 0
        self.bytes_out = 0
        self.counted_in = 0
        self.counted_out = 0
        self.linger = False
        self.config: object = None
        self.table: RouteTable | None = None
        self.pool = pool
        self.deadlines = deadlines
        #: A connection to an upstream with proxy_protocol on, kept for this client only.
        self.private: NodeConnection | None = None
        # Per request:
        self.request_close = False  # the client asked to close (or speaks HTTP/1.0)
        self.request_head = False  # a HEAD request
        self.request_http11 = True
        self.responded = False  # a response head went out
        self.record = Record(0.0)
        # Timeouts (see l4gw.http.timeouts):
        self.scope = trio.CancelScope()
        self.phase = HEAD
        self.deadline = trio.current_time() + listener.config.header_timeout
        self.expired: int | None = None
        #: Where plain-TCP keep-alive is served between requests (None: always here).
        self.reactor: Reactor | None = None
        #: The reactor's state while it serves this connection.
        self.fast: FastConnection | None = None

    def expire(self) -> None:
        """Called by the sweeper: the deadline of the current phase has passed."""
        fast = self.fast
        if fast is not None:
            fast.expire(self.phase)
            return
        if self.expired is None:
            self.expired = self.phase
            self.scope.cancel()

    async def timed_out(self, phase: int) -> None:
        """Answer for a timeout (outside the cancelled scope), before the connection closes."""
        record = self.record
        with trio.move_on_after(CLOSE_TIMEOUT):
            if phase == HEAD:
                if self.h.their_state is not h11.IDLE or self.h.trailing_data[0]:
                    await self._refuse(record, 408, "request head not received in time", close=True)
            elif phase == RESPONSE and not self.responded:
                await self._refuse(
                    record, 504, f"node {record.node} did not answer in time", close=True
                )
        if not record.logged and record.method is not None:
            self.log_request(record)

    # -- connection loop ---------------------------------------------------------------

    async def run(self) -> None:
        in_head = True  # a head has started (a new connection counts as one)
        fed = False  # self.h holds bytes of the next request (or the client's EOF)
        while True:
            if not fed and self.reactor is not None:
                handed = await self._serve_fast(in_head)
                if handed is None:
                    return
                data, eof = handed
                self.h.receive_data(data)
                if eof:
                    self.h.receive_data(b"")
                in_head = True
            fed = False
            record = self.record = Record(trio.current_time())
            self.responded = False
            self.request_close = False
            try:
                request = await self._read_head(in_head, record)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._refuse(record, status, _protocol_message(status, exc), close=True)
                return
            if request is None:
                return
            self.phase = BUSY
            self.deadline = math.inf
            if not await self._handle(request, record) or self.listener.draining:
                return
            h = self.h
            if h.their_state is not h11.DONE:
                return
            leftover, closed = h.trailing_data
            h = self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            in_head = bool(leftover)
            if leftover:  # pipelined bytes: the next head has started
                h.receive_data(leftover)
                self.phase = HEAD
                self.deadline = trio.current_time() + self.listener.config.header_timeout
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
            config = self.listener.config
            self.phase = IDLE
            self.deadline = trio.current_time() + (config.idle_timeout or DEFAULT_KEEPALIVE)
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

    async def _read_head(self, in_head: bool, record: Record) -> h11.Request | None:
        event: object = self.h.next_event()
        if event is h11.NEED_DATA:
            event = await self._receive_head(in_head, record)
        if type(event) is h11.Request:
            return event
        return None  # ConnectionClosed (or EOF between requests)

    async def _receive_head(self, in_head: bool, record: Record) -> object:
        h = self.h
        receive = self.io.receive
        config = self.listener.config
        idle = not in_head
        if idle:
            self.phase = IDLE
            self.deadline = trio.current_time() + (config.idle_timeout or DEFAULT_KEEPALIVE)
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
                    record.started = trio.current_time()
                    self.phase = HEAD
                    self.deadline = record.started + config.header_timeout
            h.receive_data(data)
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event

    # -- one request -------------------------------------------------------------------

    def route_table(self) -> RouteTable:
        """The compiled routes of the listener's current configuration (after a reload, the
        next request uses the new ones)."""
        config = self.listener.config
        if config is not self.config or self.table is None:
            self.table = route_table(config)
            self.config = config
        return self.table

    async def _handle(self, request: h11.Request, record: Record) -> bool:
        """Serve one request; True if the connection may carry another one."""
        listener = self.listener
        h = self.h
        table = self.route_table()
        method = request.method
        method_text = method.decode("ascii")
        target = request.target.decode("ascii")
        record.method = method_text
        record.path = target
        self.request_head = method == b"HEAD"
        http11 = self.request_http11 = request.http_version == b"1.1"
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
        self.request_close = close
        if size > MAX_HEAD:  # h11 only limits heads that arrive in several reads
            return await self._refuse(record, 431, _protocol_message(431, None), close=True)
        host_text = host.decode("latin-1") if host is not None else None
        record.host = host_text

        match, bad_path, upstream = route_request(
            listener, table, record, method_text, host_text, target
        )
        protocol: Refusal | None = None
        if content_length is not None and chunked:
            protocol = (400, "both Content-Length and Transfer-Encoding", True)
        elif method == b"CONNECT":
            protocol = (405, "CONNECT is not supported", True)
        refused = refusal(
            listener, self.client_ip, trio.current_time(), match, bad_path, upstream, protocol
        )
        if refused is not None:
            status, message, close = refused
            self.denied = self.denied or status == 403
            return await self._refuse(record, status, message, close=close)
        assert match is not None and upstream is not None

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
            return await self._refuse(record, status, _protocol_message(status, exc), close=True)

        upgrade = wants_upgrade and is_upgrade_request(request.headers)
        host_header = match.route.host_header or upstream.config.host_header or None
        node_headers, _ = request_headers(
            request.headers,
            client_ip=self.client_ip,
            tls=self.tls,
            host=host_header.encode("latin-1") if host_header else None,
            chunked=chunked,
            upgrade=upgrade,
        )
        node_target = match.target.encode("ascii")
        retryable = body_complete and method in IDEMPOTENT
        fresh = False
        while True:
            try:
                nc = await self._acquire(upstream, fresh=fresh)
            except GatewayError as exc:
                return await self._refuse(record, exc.status_hint, str(exc))
            record.node = nc.node.key
            if not node_headers[0][1]:  # an HTTP/1.0 client sent no Host: the node's address
                node_headers[0] = (b"host", nc.node.key.encode("ascii"))
            head = request_head(method, node_target, node_headers)
            try:
                return await self._exchange(
                    nc,
                    upstream=upstream,
                    head=head,
                    body=body,
                    body_complete=body_complete,
                    chunked=chunked,
                    upgrade=upgrade,
                    record=record,
                )
            except _ExchangeFailed as exc:
                self._release(nc, reuse=False)
                if exc.retry and retryable and not fresh:
                    fresh = True
                    log.info("retry_fresh", node=record.node, reason=str(exc))
                    continue
                if not self.responded:
                    return await self._refuse(record, exc.status, str(exc))
                record.status = record.status or exc.status
                self.log_request(record)
                return False
            finally:
                self._release(nc, reuse=False)  # no-op unless an error left it held

    async def _acquire(self, upstream: UpstreamRuntime, *, fresh: bool) -> NodeConnection:
        version = upstream.config.proxy_protocol
        if version == "off":
            return await self.pool.acquire(upstream, self.client_key, fresh=fresh)
        private = self.private
        if private is not None:
            self.private = None
            if not fresh and private.upstream is upstream and private.usable():
                private.node.active += 1
                private.held = True
                return private
            private.close()
        local = _local_address(self.stream) or self.listener.config.listen.sockaddr()
        header = (encode_v1 if version == "v1" else encode_v2)(self.client, local)
        return await self.pool.acquire(upstream, self.client_key, prefix=header)

    def _release(self, nc: NodeConnection, *, reuse: bool) -> None:
        if not nc.private:
            self.pool.release(nc, reuse=reuse)
            return
        if not nc.held:
            return
        nc.held = False
        nc.node.active -= 1
        if reuse and nc.node.in_service and not nc.reader.buffer:
            nc.reader.reset()
            if self.private is not None:
                self.private.close()
            self.private = nc
        else:
            nc.close()

    async def _exchange(
        self,
        nc: NodeConnection,
        *,
        upstream: UpstreamRuntime,
        head: bytes,
        body: list[bytes],
        body_complete: bool,
        chunked: bool,
        upgrade: bool,
        record: Record,
    ) -> bool:
        """Forward one request on ``nc`` and relay the response; True to keep the client
        connection. Raises ``_ExchangeFailed`` when no response head was relayed (the caller
        answers the client and releases ``nc``)."""
        reused = nc.requests > 0
        nc.requests += 1
        config = upstream.config
        sweeper = self.deadlines
        sweeper.need(config.response_timeout)
        sweeper.need(config.idle_timeout)
        self.phase = RESPONSE
        self.deadline = trio.current_time() + config.response_timeout
        try:
            await nc.io.send_all(b"".join((head, *body)) if body else head)
        except IO_ERRORS as exc:
            raise _ExchangeFailed(
                502, f"node {nc.node.key}: sending failed ({_why(exc)})", retry=reused
            ) from None
        if body_complete:
            return await self._respond(
                nc, upstream=upstream, record=record, upload=None, reused=reused, upgrade=upgrade
            )
        self.phase = UPLOAD
        self.deadline = trio.current_time() + config.idle_timeout
        upload = _Upload(config.response_timeout)
        result = False
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upload, nc, upload, chunked)
            try:
                result = await self._respond(
                    nc,
                    upstream=upstream,
                    record=record,
                    upload=upload,
                    reused=False,
                    upgrade=upgrade,
                )
            except (_ExchangeFailed, _ClientGone) as exc:
                error = exc  # raised outside the nursery, not wrapped in an ExceptionGroup
            finally:
                upload.scope.cancel()
        if error is not None:
            raise error
        return result

    async def _upload(self, nc: NodeConnection, upload: _Upload, chunked: bool) -> None:
        """Copy the rest of the request body from the client to the node, then start the
        response timeout."""
        h = self.h
        receive = self.io.receive
        send = nc.io.send_all
        idle = nc.upstream.config.idle_timeout
        with upload.scope:
            while True:
                try:
                    event = h.next_event()
                    if event is h11.NEED_DATA:
                        data = await receive()
                        self.bytes_in += len(data)
                        if not upload.head_received:
                            self.deadline = trio.current_time() + idle
                        h.receive_data(data)
                        continue
                except (h11.RemoteProtocolError, *IO_ERRORS) as exc:
                    upload.client_error = exc
                    upload.wake.cancel()
                    return
                if type(event) is h11.Data:
                    data = chunk(event.data) if chunked else event.data
                elif type(event) is h11.EndOfMessage:
                    data = LAST_CHUNK if chunked else b""
                else:  # ConnectionClosed mid-body
                    upload.client_error = _ClientGone("client closed during the request body")
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
                    upload.done = True
                    if not upload.head_received:
                        self.phase = RESPONSE
                        self.deadline = trio.current_time() + upload.response_timeout
                    return

    async def _respond(
        self,
        nc: NodeConnection,
        *,
        upstream: UpstreamRuntime,
        record: Record,
        upload: _Upload | None,
        reused: bool,
        upgrade: bool,
    ) -> bool:
        """Read the response from ``nc`` and relay it to the client."""
        reader = nc.reader
        receive = nc.io.receive
        is_head = self.request_head
        out: list[bytes] = []
        got_bytes = False
        response: ResponseHead | None = None
        switch: ResponseHead | None = None
        wake = upload.wake if upload is not None else contextlib.nullcontext()
        try:
            with wake:  # cancelled by the upload task if the client fails
                # The response cannot be there yet: wait for it before the first read.
                data = await receive(wait_first=True)
                if data:
                    got_bytes = True
                    reader.feed(data)
                else:
                    reader.feed_eof()
                while True:
                    head = reader.read_head(head_request=is_head)
                    if head is None:
                        if out:
                            await self._send(b"".join(out))
                            out.clear()
                        data = await receive()
                        if data:
                            got_bytes = True
                            reader.feed(data)
                        else:
                            reader.feed_eof()
                        continue
                    if head.status >= 200:
                        response = head
                        break
                    if head.status == 101:
                        if not upgrade:
                            raise _ExchangeFailed(502, "node switched protocols unasked")
                        switch = head
                        break
                    if self.request_http11:
                        out.append(
                            response_head(head.status, head.reason, response_headers(head.headers))
                        )
        except NodeProtocolError as exc:
            raise _ExchangeFailed(
                502, f"node {nc.node.key}: {exc}", retry=reused and not got_bytes
            ) from None
        except IO_ERRORS as exc:
            raise _ExchangeFailed(
                502, f"node {nc.node.key}: {_why(exc)}", retry=reused and not got_bytes
            ) from None
        if switch is not None:
            return await self._switch(nc, switch, record)
        if response is None:  # the upload failed on the client's side
            self._release(nc, reuse=False)
            assert upload is not None
            error = upload.client_error
            if isinstance(error, h11.RemoteProtocolError):
                status = error.error_status_hint
                await self._refuse(record, status, _protocol_message(status, error), close=True)
                return False
            raise _ClientGone(str(error))
        if upload is not None:
            upload.head_received = True

        # The response head, with the framing this client understands.
        record.status = response.status
        close = (
            self.request_close or self.listener.draining or (upload is not None and not upload.done)
        )
        head_bytes, chunk_out, close = client_response_head(
            response,
            body_done=reader.done,
            is_head=is_head,
            http11=self.request_http11,
            close=close,
        )
        out.append(head_bytes)
        self.responded = True

        # The body: the deadline moves with every read from the node, so a node that stops
        # sending, or a client that stops reading, ends the connection after idle_timeout.
        idle = upstream.config.idle_timeout
        self.phase = BODY
        self.deadline = trio.current_time() + idle
        complete = False
        try:
            burst = 0
            while (step := frame_body(reader, out, chunk_out, _FLUSH_AT)) != DONE:
                if out:
                    await self._send(b"".join(out))
                    out.clear()
                if step == FULL:
                    continue
                data = await receive()
                if data:
                    reader.feed(data)
                else:
                    reader.feed_eof()
                self.deadline = trio.current_time() + idle
                burst += 1
                if burst >= _BURST:
                    burst = 0
                    await trio.lowlevel.checkpoint()
            complete = True
            if out:
                await self._send(b"".join(out))
        except (NodeProtocolError, *IO_ERRORS):
            complete = False
        except _ClientGone:
            self._release(nc, reuse=False)
            self.log_request(record)
            raise
        self.phase = BUSY
        self.deadline = math.inf
        if not complete:
            # Cut short: the client sees the connection close before the announced length
            # or the last chunk.
            self._release(nc, reuse=False)
            self.log_request(record)
            return False
        uploaded = upload is None or upload.done
        self._release(nc, reuse=uploaded and response.keep_alive)
        self.log_request(record)
        if not uploaded:
            self.linger = True
            return False
        return not close

    async def _switch(self, nc: NodeConnection, head: ResponseHead, record: Record) -> bool:
        """The node accepted a protocol upgrade: relay the 101, then bytes both ways until
        both sides are done (half-close passed on), an error, or ``idle_timeout`` without a
        byte either way."""
        record.status = 101
        self.responded = True
        out = response_head(101, head.reason, response_headers(head.headers, upgrade=True))
        node_early = bytes(nc.reader.buffer)
        nc.reader.buffer.clear()
        client_early, client_eof = self.h.trailing_data
        idle = nc.upstream.config.idle_timeout
        self.phase = BODY
        self.deadline = trio.current_time() + idle
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
            self.log_request(record)
        return False

    async def _pump(
        self, src: ByteIO, dst: ByteIO, to_client: bool, idle: float, scope: trio.CancelScope
    ) -> None:
        """Copy ``src`` to ``dst`` until EOF (then half-close ``dst``); an error ends both
        directions (``scope``)."""
        try:
            while data := await src.receive():
                await dst.send_all(data)
                if to_client:
                    self.bytes_out += len(data)
                else:
                    self.bytes_in += len(data)
                self.deadline = trio.current_time() + idle
            await dst.send_eof()
        except IO_ERRORS:
            scope.cancel()

    # -- responses made here -----------------------------------------------------------

    async def _refuse(
        self, record: Record, status: int, message: str, *, close: bool = False
    ) -> bool:
        """Answer with a gateway error; True if the connection may carry another request."""
        h = self.h
        record.status = status
        if h.their_state is h11.SEND_BODY:
            # Discard what is already here of the request body (often all of it: an empty
            # body), so the connection can stay open.
            with contextlib.suppress(h11.RemoteProtocolError):
                while type(h.next_event()) is h11.Data:
                    pass
        keep = (
            not close
            and not self.request_close
            and h.their_state is h11.DONE
            and not self.listener.draining
        )
        if not self.responded:
            self.responded = True
            self.phase = SEND
            config = self.listener.config
            self.deadline = trio.current_time() + (config.idle_timeout or DEFAULT_KEEPALIVE)
            try:
                await self._send(error_response(status, message, keep=keep))
            except _ClientGone:
                keep = False
        else:
            keep = False
        if not keep and h.their_state is not h11.DONE:
            self.linger = True
        self.log_request(record)
        return keep

    async def _send(self, data: bytes) -> None:
        try:
            await self.io.send_all(data)
        except IO_ERRORS as exc:
            raise _ClientGone(_why(exc)) from None
        self.bytes_out += len(data)

    # -- accounting --------------------------------------------------------------------

    def log_request(self, record: Record) -> None:
        record.logged = True
        listener = self.listener
        stats = listener.stats
        key = (record.route, record.status)
        requests = stats.requests
        requests[key] = requests.get(key, 0) + 1
        elapsed = trio.current_time() - record.started
        stats.durations.observe(elapsed)
        bytes_in = self.bytes_in - self.counted_in
        bytes_out = self.bytes_out - self.counted_out
        self.counted_in = self.bytes_in
        self.counted_out = self.bytes_out
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        if listener.access_log:
            logs.access.info(
                "request",
                listener=listener.config.name,
                client=self.client_text,
                node=record.node,
                method=record.method,
                path=record.path,
                upstream_path=record.upstream_path,
                host=record.host,
                route=record.route,
                status=record.status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                duration_ms=round(elapsed * 1000, 3),
            )

    def finish(self) -> None:
        stats = self.listener.stats
        stats.bytes_in += self.bytes_in - self.counted_in
        stats.bytes_out += self.bytes_out - self.counted_out
        self.counted_in = self.bytes_in
        self.counted_out = self.bytes_out
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
