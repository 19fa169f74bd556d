"""One HTTP/1.1 request/response exchange as a synchronous state machine, with no I/O.

Both http data paths drive it: the reactor's callbacks (:mod:`l4gw.http.fastpath`) and the
connection's trio task (:mod:`l4gw.http.proxy`). An :class:`Exchange` lives as long as its
client connection and serves its requests one after the other. The driver tells it what
happened (events: a request was parsed, a node connection is ready, bytes or EOF from the
node, a deadline passed...) and carries out what it answers: a set of command bits, always
carried out in this order:

``RELEASE``
    Give the node connection (``node``) back: to the pool if ``reuse_node``, else close it.
``SEND_CLIENT``
    Write ``out`` to the client (join and clear it). When the client cannot take it all at
    once, the driver finishes the write before it goes on with the other bits.
``SEND_NODE``
    Write ``node_data`` to the node.
``UPLOAD``
    (task only) The request body is still arriving: copy it to the node meanwhile, telling
    :meth:`Exchange.upload_progress` and :meth:`Exchange.upload_done`.
``CONNECT``
    Get a node connection of ``upstream``: a pooled one, or a new one (only a new one when
    ``fresh``: the retry of a request whose reused connection turned out dead, after
    ``RETRY``, which the driver logs as ``retry_fresh``). Then :meth:`Exchange.node_ready`
    or :meth:`Exchange.connect_failed`.
``READ_NODE``
    Wait for bytes from the node: :meth:`Exchange.node_data`, :meth:`Exchange.node_eof` or
    :meth:`Exchange.node_failed`.
``PUMP``
    The node's bytes already read fill ``out`` to the flush limit: call
    :meth:`Exchange.pump` after the write, before reading more.
``SWITCH``
    (task only) The node accepted a protocol upgrade (``switch_head``): relay bytes both ways.
``DONE``
    The exchange is over: write the access line for ``record`` (unless it was logged, or no
    request was under way: ``record.method`` is None), then serve the next request if
    ``keep``, else close the client connection.
``HANDOFF``
    (reactor only) The request needs the task; nothing has had an effect yet.

The exchange owns the connection's ``phase`` and ``deadline`` (see
:mod:`l4gw.http.timeouts`): a driver reports time as ``now`` arguments and a passed deadline
as :meth:`Exchange.expired`, so the whole exchange can be played without a clock.

Commands are small integers and the data they carry are attributes, so a request costs no
allocation here beyond its :class:`~l4gw.http.responses.Record` and the bytes it moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..core.runtime import ListenerRuntime
from ..core.upstream import UpstreamRuntime
from . import timeouts
from .admission import Refusal, refusal, route_request
from .headers import request_headers, response_headers
from .responses import DEFAULT_KEEPALIVE, IDEMPOTENT, Record, client_response_head, error_response
from .timeouts import BODY, BUSY, HEAD, IDLE, RESPONSE, SEND
from .wire import DONE as BODY_DONE
from .wire import FULL, NodeProtocolError, ResponseHead, ResponseReader, frame_body, request_head
from .wire import response_head as encode_response_head

if TYPE_CHECKING:
    from .routes import RouteTable

__all__ = [
    "CONNECT",
    "DONE",
    "HANDOFF",
    "PUMP",
    "READ_NODE",
    "RELEASE",
    "RETRY",
    "SEND_CLIENT",
    "SEND_NODE",
    "SWITCH",
    "UPLOAD",
    "Exchange",
    "NodeLink",
]

# Command bits (see the module docstring), in the order a driver carries them out.
RELEASE = 0x001
SEND_CLIENT = 0x002
SEND_NODE = 0x004
UPLOAD = 0x008
RETRY = 0x010
CONNECT = 0x020
READ_NODE = 0x040
PUMP = 0x080
SWITCH = 0x100
DONE = 0x200
HANDOFF = 0x400

#: Response bytes gathered before they are written to the client.
FLUSH_AT = 256 * 1024

Header = tuple[bytes, bytes]

# States of one exchange.
_WAIT = 0  # no request under way
_ROUTED = 1  # admitted, the body may still be parsed by the driver
_CONNECT = 2  # waiting for a node connection
_EXCHANGE = 3  # request sent (or being sent), waiting for the response head
_RELAY = 4  # relaying the response body
_OVER = 5  # DONE was returned


class NodeLink(Protocol):
    """What the exchange reads of a node connection (no I/O)."""

    @property
    def reader(self) -> ResponseReader: ...

    @property
    def key(self) -> str: ...

    requests: int


class ConnectionInfo(Protocol):
    """What the exchange reads of its client connection. ``request_body_done`` answers
    whether the client's request body has been read in full (the task discards what is
    buffered of it first); only then may the connection carry another request after an
    answer made here."""

    @property
    def listener(self) -> ListenerRuntime: ...

    @property
    def client_ip(self) -> str: ...

    @property
    def tls(self) -> bool: ...

    def route_table(self) -> RouteTable: ...

    def request_body_done(self) -> bool: ...


class Exchange:
    """The request/response logic of one client connection (see the module docstring).

    Attributes the driver reads after a command: ``out`` (bytes for the client),
    ``node_data`` (bytes for the node), ``node`` (the node connection in use),
    ``reuse_node``, ``upstream``, ``fresh``, ``retry_reason``, ``switch_head``, ``keep``,
    ``record``; and ``phase``/``deadline`` at any time.
    """

    __slots__ = (
        "body",
        "body_complete",
        "chunk_out",
        "close_after",
        "conn",
        "deadline",
        "denied",
        "fresh",
        "got_bytes",
        "http11",
        "is_head",
        "keep",
        "keep_node",
        "method",
        "node",
        "node_data",
        "node_headers",
        "node_target",
        "out",
        "phase",
        "record",
        "responded",
        "retry_reason",
        "retryable",
        "reuse_node",
        "reused",
        "started",
        "state",
        "switch_head",
        "upgrade",
        "uploading",
        "upstream",
    )

    def __init__(self, conn: ConnectionInfo, now: float) -> None:
        self.conn = conn
        #: What the connection waits for (``l4gw.http.timeouts``) and until when.
        self.phase = HEAD
        self.deadline = now + conn.listener.config.header_timeout
        #: When the current request head began (a new connection: when it was accepted).
        self.started = now
        self.state = _WAIT
        self.record = Record(now)
        #: Bytes for the client (SEND_CLIENT).
        self.out: list[bytes] = []
        #: Set once a request was refused because of the source address (403).
        self.denied = False
        # Per request:
        self.method = b""
        self.is_head = False
        self.http11 = True
        self.close_after = False
        self.responded = False
        self.upstream: UpstreamRuntime | None = None
        self.node_headers: list[Header] = []
        self.node_target = b""
        self.body: Sequence[bytes] = ()
        self.body_complete = True
        self.retryable = False
        self.upgrade = False
        self.fresh = False
        self.retry_reason = ""
        self.node: NodeLink | None = None
        self.node_data = b""
        self.reused = False
        self.got_bytes = False
        self.reuse_node = False
        self.keep_node = False
        self.chunk_out = False
        self.uploading = False
        self.switch_head: ResponseHead | None = None
        self.keep = False

    # -- between requests -------------------------------------------------------------

    def idle(self, now: float) -> None:
        """The connection waits for the next request (keep-alive)."""
        config = self.conn.listener.config
        self.phase = IDLE
        self.deadline = now + (config.idle_timeout or DEFAULT_KEEPALIVE)

    def head_started(self, now: float) -> None:
        """Bytes of a request head arrived: it must be complete within ``header_timeout``."""
        self.started = now
        self.phase = HEAD
        self.deadline = now + self.conn.listener.config.header_timeout

    def next_request(self, now: float, *, pipelined: bool) -> None:
        """After DONE with ``keep``: wait for the next request (``pipelined``: its head has
        begun already)."""
        if pipelined:
            self.head_started(now)
        else:
            self.idle(now)

    # -- a request ----------------------------------------------------------------------

    def begin(
        self,
        now: float,
        method: bytes,
        target: bytes,
        host: bytes | None,
        headers: Sequence[Header],
        *,
        http11: bool,
        close: bool,
        body: Sequence[bytes] = (),
        body_complete: bool = True,
        chunked: bool = False,
        upgrade: bool = False,
        protocol: Refusal | None = None,
        reactor: bool = False,
    ) -> int:
        """A request head was parsed (at ``now``; it began at ``started``). Routes and admits
        it.

        Returns ``HANDOFF`` (only with ``reactor``: the upstream needs the task; nothing has
        had an effect), a refusal (``SEND_CLIENT | DONE``), or ``CONNECT``. ``protocol`` is
        the driver's own refusal of what it parsed (after the ACL and the rate limit).
        ``body``/``body_complete`` may be given later with :meth:`set_body`, before the
        ``CONNECT`` is carried out.
        """
        conn = self.conn
        listener = conn.listener
        record = self.record = Record(self.started)
        self.responded = False
        self.state = _ROUTED
        self.method = method
        self.is_head = method == b"HEAD"
        self.http11 = http11
        self.close_after = close
        method_text = method.decode("ascii")
        target_text = target.decode("ascii")
        host_text = host.decode("latin-1") if host is not None else None
        record.method = method_text
        record.path = target_text
        record.host = host_text
        match, bad_path, upstream = route_request(
            listener, conn.route_table(), record, method_text, host_text, target_text
        )
        if (
            reactor
            and upstream is not None
            and (upstream.config.proxy_protocol != "off" or upstream.config.tls is not None)
        ):
            # PROXY headers and TLS toward nodes are the task's.
            self.state = _WAIT
            return HANDOFF
        self.phase = BUSY
        self.deadline = math.inf
        refused = refusal(listener, conn.client_ip, now, match, bad_path, upstream, protocol)
        if refused is not None:
            status, message, close_now = refused
            if status == 403:
                self.denied = True
            return self.refuse(status, message, now, close=close_now)
        assert match is not None and upstream is not None
        host_header = match.route.host_header or upstream.config.host_header or None
        self.node_headers, _ = request_headers(
            headers,
            client_ip=conn.client_ip,
            tls=conn.tls,
            host=host_header.encode("latin-1") if host_header else None,
            chunked=chunked,
            upgrade=upgrade,
        )
        self.node_target = match.target.encode("ascii")
        self.upstream = upstream
        self.upgrade = upgrade
        self.fresh = False
        self.set_body(body, body_complete)
        self.state = _CONNECT
        return CONNECT

    def set_body(self, body: Sequence[bytes], complete: bool) -> None:
        """The request body read so far (chunks already framed for the node) and whether
        that is all of it; only an idempotent request whose body is complete is retried."""
        self.body = body
        self.body_complete = complete
        self.retryable = complete and self.method in IDEMPOTENT

    # -- the node connection ------------------------------------------------------------

    def connect_failed(self, status: int, message: str, now: float) -> int:
        """No node connection could be had (503 no node, 502 connects failed...)."""
        return self.refuse(status, message, now)

    def node_ready(self, node: NodeLink, now: float) -> int:
        """``node`` (a pooled or a new connection) carries the request: ``SEND_NODE`` with
        ``node_data`` (the head, and the body read so far), then ``READ_NODE`` (or
        ``UPLOAD``, the rest of the body, while the node is read)."""
        upstream = self.upstream
        assert upstream is not None
        self.node = node
        key = node.key
        self.record.node = key
        headers = self.node_headers
        if not headers[0][1]:  # an HTTP/1.0 client sent no Host: the node's address
            headers[0] = (b"host", key.encode("ascii"))
        data = request_head(self.method, self.node_target, headers)
        body = self.body
        if body:
            data = b"".join((data, *body))
        self.node_data = data
        self.reused = node.requests > 0
        node.requests += 1
        self.got_bytes = False
        self.state = _EXCHANGE
        if self.body_complete:
            self.uploading = False
            self.phase = RESPONSE
            self.deadline = now + upstream.config.response_timeout
            return SEND_NODE | READ_NODE
        self.uploading = True
        self.reused = False  # a streamed body cannot be sent again: never a retry
        self.phase = timeouts.UPLOAD
        self.deadline = now + upstream.config.idle_timeout
        return SEND_NODE | UPLOAD | READ_NODE

    def upload_progress(self, now: float) -> None:
        """Body bytes from the client went to the node (the upload's idle timeout moves)."""
        if self.phase == timeouts.UPLOAD:
            assert self.upstream is not None
            self.deadline = now + self.upstream.config.idle_timeout

    def upload_done(self, now: float) -> None:
        """The whole body went to the node: the response timeout starts (unless the
        response has begun)."""
        self.uploading = False
        if self.phase == timeouts.UPLOAD:
            assert self.upstream is not None
            self.phase = RESPONSE
            self.deadline = now + self.upstream.config.response_timeout

    def node_bytes(self, now: float) -> int:
        """Bytes from the node (the driver fed them to ``node.reader`` already)."""
        self.got_bytes = True
        return self._advance(now)

    def node_eof(self, now: float) -> int:
        """The node closed (``node.reader.feed_eof()`` was called by the driver)."""
        return self._advance(now)

    def node_send_failed(self, why: str, now: float) -> int:
        """Writing the request to the node failed."""
        if self.state == _EXCHANGE:
            return self._failed(f"sending failed ({why})", self.reused, now)
        return self._cut_short(f"sending failed ({why})")

    def node_read_failed(self, why: str, now: float) -> int:
        """Reading the response from the node failed."""
        if self.state == _EXCHANGE:
            return self._failed(why, self.reused and not self.got_bytes, now)
        return self._cut_short(why)

    def pump(self, now: float) -> int:
        """Go on after a ``PUMP`` write."""
        return self._advance(now)

    def _advance(self, now: float) -> int:
        if self.state == _RELAY:
            assert self.upstream is not None
            self.deadline = now + self.upstream.config.idle_timeout
            return self._relay()
        if self.state != _EXCHANGE:
            return 0
        node = self.node
        assert node is not None
        reader = node.reader
        out = self.out
        try:
            while True:
                head = reader.read_head(head_request=self.is_head)
                if head is None:  # more to come (interim heads so far go out now)
                    return (SEND_CLIENT | READ_NODE) if out else READ_NODE
                if head.status >= 200:
                    break
                if head.status == 101:
                    if not self.upgrade:
                        return self._failed(
                            "node switched protocols unasked", False, now, named=False
                        )
                    self.switch_head = head
                    self.record.status = 101
                    self.responded = True
                    self.state = _RELAY
                    self.phase = BODY
                    assert self.upstream is not None
                    self.deadline = now + self.upstream.config.idle_timeout
                    return SWITCH
                if self.http11:
                    out.append(
                        encode_response_head(
                            head.status, head.reason, response_headers(head.headers)
                        )
                    )
        except NodeProtocolError as exc:
            return self._failed(str(exc), self.reused and not self.got_bytes, now)
        return self._response(head, now)

    def _response(self, response: ResponseHead, now: float) -> int:
        node = self.node
        upstream = self.upstream
        assert node is not None and upstream is not None
        self.record.status = response.status
        close = self.close_after or self.conn.listener.draining or self.uploading
        head_bytes, self.chunk_out, close = client_response_head(
            response,
            body_done=node.reader.done,
            is_head=self.is_head,
            http11=self.http11,
            close=close,
        )
        self.close_after = close
        self.keep_node = response.keep_alive
        self.out.append(head_bytes)
        self.responded = True
        self.state = _RELAY
        # The deadline moves with every read from the node, so a node that stops sending, or
        # a client that stops reading, ends the connection after idle_timeout.
        self.phase = BODY
        self.deadline = now + upstream.config.idle_timeout
        return self._relay()

    def _relay(self) -> int:
        node = self.node
        assert node is not None
        out = self.out
        try:
            step = frame_body(node.reader, out, self.chunk_out, FLUSH_AT)
        except NodeProtocolError as exc:
            return self._cut_short(str(exc))
        if step == BODY_DONE:
            uploaded = not self.uploading
            self.reuse_node = uploaded and self.keep_node
            self.keep = uploaded and not self.close_after
            self.state = _OVER
            self.phase = BUSY
            self.deadline = math.inf
            return RELEASE | SEND_CLIENT | DONE
        if step == FULL:
            return SEND_CLIENT | PUMP
        return (SEND_CLIENT | READ_NODE) if out else READ_NODE

    def _failed(self, message: str, retry: bool, now: float, *, named: bool = True) -> int:
        """No response head was relayed: retry an idempotent request once on a fresh
        connection if a reused one turned out dead, else answer 502."""
        node = self.node
        assert node is not None
        if named:
            message = f"node {node.key}: {message}"
        self.reuse_node = False
        self.out.clear()
        if retry and self.retryable and not self.fresh:
            self.fresh = True
            self.retry_reason = message
            self.state = _CONNECT
            self.phase = BUSY
            self.deadline = math.inf
            return RELEASE | RETRY | CONNECT
        return RELEASE | self.refuse(502, message, now)

    def _cut_short(self, why: str) -> int:
        """The node failed after the response head went out: the client sees the connection
        close before the announced length or the last chunk. The access line keeps the
        node's status and says why in ``reason``."""
        node = self.node
        self.record.reason = f"node {node.key if node else '?'}: response cut short: {why}"
        self.reuse_node = False
        self.keep = False
        self.out.clear()
        self.state = _OVER
        return RELEASE | DONE

    # -- answers made here --------------------------------------------------------------

    def refuse(self, status: int, message: str, now: float, *, close: bool = False) -> int:
        """Answer the current request with a gateway error (the connection may carry another
        request if the request body was read in full and nothing asks to close); the client
        must take it within the listener's idle timeout."""
        record = self.record
        record.status = status
        self.state = _OVER
        if self.responded:  # the response head went out already: nothing to say any more
            self.keep = False
            return DONE
        keep = (
            not close
            and not self.close_after
            and not self.conn.listener.draining
            and self.conn.request_body_done()
        )
        self.keep = keep
        self.close_after = not keep
        self.responded = True
        self.out.append(error_response(status, message, keep=keep))
        self.phase = SEND
        config = self.conn.listener.config
        self.deadline = now + (config.idle_timeout or DEFAULT_KEEPALIVE)
        return SEND_CLIENT | DONE

    def client_gone(self) -> int:
        """The client's connection failed: the node connection is not reusable."""
        self.reuse_node = False
        self.keep = False
        self.out.clear()
        self.state = _OVER
        return (RELEASE if self.node is not None else 0) | DONE

    # -- timeouts -----------------------------------------------------------------------

    def refuse_head(
        self, status: int, message: str, now: float, *, method: bytes = b"", target: bytes = b""
    ) -> int:
        """A request head could not be taken (400 malformed, 408 late, 431 too large): the
        answer, then the connection closes. ``method``/``target`` go on the access line
        when they were read."""
        record = self.record = Record(self.started)
        if method:
            record.method = method.decode("ascii")
            record.path = target.decode("ascii")
        self.responded = False
        self.close_after = True
        return self.refuse(status, message, now, close=True)

    def expired(self, now: float, *, phase: int | None = None, head_started: bool = False) -> int:
        """The deadline of ``phase`` passed: 504 to a request whose node is late, 408 to a
        head that began (``head_started``) but is not complete, else the connection closes
        (``DONE`` with ``keep`` False; the record is logged if a request was under way)."""
        self.keep = False
        if phase is None:
            phase = self.phase
        if phase == RESPONSE and not self.responded and self.state == _EXCHANGE:
            node = self.node
            name = node.key if node is not None else self.record.node
            self.reuse_node = False
            self.out.clear()
            return RELEASE | self.refuse(
                504, f"node {name} did not answer in time", now, close=True
            )
        if phase == HEAD and head_started:
            return self.refuse_head(408, "request head not received in time", now)
        self.state = _OVER
        self.out.clear()
        return (RELEASE if self.node is not None else 0) | DONE

    def released(self) -> None:
        """The driver carried out ``RELEASE``."""
        self.node = None
