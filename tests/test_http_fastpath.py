"""The reactor's fast path for plain HTTP/1.1 keep-alive (:mod:`l4gw.http.fastpath`).

``tests/test_http_proxy.py`` runs every behaviour on both data paths; the tests here are
about the fast path itself: that ordinary requests are really served from the reactor (a spy
counts ``FastConnection._start`` calls and the ``_end`` results), that anything unusual goes
to the task and comes back, that pooled node connections stay watched in the reactor's epoll
set, backpressure, timeouts, draining and shutdown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest
import trio

from l4gw.core.config import RouteConfig
from l4gw.core.netaddr import SocketAddress
from l4gw.core.upstream import UpstreamRuntime
from l4gw.http import fastpath
from l4gw.http.fastpath import CLOSE, HANDOFF, FastConnection
from l4gw.http.pool import NodeConnection
from l4gw.http.request import PlainRequest
from l4gw.http.wire import ResponseHead, ResponseReader
from l4gw.l4.connect import NodeConnector
from l4gw.l4.reactor import Reactor
from tests.test_http_proxy import (
    Gateway,
    Node,
    TLSCerts,
    assert_no_active,
    error_of,
    gateway_certs,
    pattern,
    start_gateway,
    upstream_runtime,
)

from .conftest import free_port

# --------------------------------------------------------------------------------------------
# Harness: a reactor-only gateway, a spy on the fast path, a raw keep-alive client.


class Env:
    """A running reactor in a nursery that is cancelled after the test."""

    def __init__(self, nursery: trio.Nursery, reactor: Reactor) -> None:
        self.nursery = nursery
        self.reactor = reactor
        self.conns: list[Conn] = []

    async def connect(
        self, port: int, *, rcvbuf: int = 0, tls: ssl.SSLContext | None = None
    ) -> Conn:
        """A client connection (TLS with ``tls``), closed after the test whatever happens."""
        conn = await Conn.open(port, rcvbuf=rcvbuf)
        self.conns.append(conn)
        if tls is not None:
            stream = trio.SSLStream(
                conn.stream, tls, server_hostname="gw.test", https_compatible=True
            )
            await stream.do_handshake()
            conn.stream = stream
        return conn

    async def start_tls(self, certs: TLSCerts, **options: Any) -> tuple[Gateway, Node, Conn]:
        """A gateway with TLS and one node, and a client connection to it."""
        gateway, (node,) = await self.start(tls_context=certs.server, **options)
        conn = await self.connect(gateway.port, tls=certs.client)
        return gateway, node, conn

    async def start(
        self,
        nodes: int = 1,
        *,
        upstream_options: dict[str, Any] | None = None,
        upstreams: dict[str, UpstreamRuntime] | None = None,
        **options: Any,
    ) -> tuple[Gateway, list[Node]]:
        started = [await Node().start(self.nursery) for _ in range(nodes)]
        if upstreams is None:
            upstreams = {
                "web": upstream_runtime(
                    "web", [n.address for n in started], **(upstream_options or {})
                )
            }
        gateway = await start_gateway(self.nursery, upstreams, reactor=self.reactor, **options)
        return gateway, started


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        reactor = Reactor()
        await nursery.start(reactor.run)
        env = Env(nursery, reactor)
        try:
            yield env
        finally:
            for conn in env.conns:
                await trio.aclose_forcefully(conn.stream)
            nursery.cancel_scope.cancel()


class Spy:
    """What the fast path did: targets it took (``_start``), how its sessions ended
    (``_end``: HANDOFF or CLOSE), and how often it wrote a pending rest (backpressure)."""

    def __init__(self) -> None:
        self.starts: list[bytes] = []
        self.ends: list[int] = []
        self.pending_writes = 0

    @property
    def handoffs(self) -> int:
        return self.ends.count(HANDOFF)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy()
    start = FastConnection._start
    end = FastConnection._end
    write_pending = FastConnection._write_pending

    def spy_start(self: FastConnection, request: PlainRequest) -> None:
        spy.starts.append(request.target)
        start(self, request)

    def spy_end(self: FastConnection, result: int) -> None:
        if self.state != fastpath._DONE:  # _end does nothing once done
            spy.ends.append(result)
        end(self, result)

    def spy_write_pending(self: FastConnection) -> None:
        spy.pending_writes += 1
        write_pending(self)

    monkeypatch.setattr(FastConnection, "_start", spy_start)
    monkeypatch.setattr(FastConnection, "_end", spy_end)
    monkeypatch.setattr(FastConnection, "_write_pending", spy_write_pending)
    return spy


def header(head: ResponseHead, name: bytes) -> bytes | None:
    values = [v for n, v in head.headers if n == name]
    return b", ".join(values) if values else None


class Conn:
    """A raw client connection that reads responses one after the other (keep-alive)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = ResponseReader()
        self.received = 0

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int = 0) -> Conn:
        if not rcvbuf:
            return cls(await trio.open_tcp_stream("127.0.0.1", port))
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self, size: int = 65536) -> None:
        data = await self.stream.receive_some(size)
        self.received += len(data)
        if data:
            self.reader.feed(data)
        else:
            self.reader.feed_eof()

    async def head(self) -> ResponseHead:
        """The next head (interim or final)."""
        while True:
            head = self.reader.read_head()
            if head is not None:
                return head
            await self.receive()

    async def body(self, size: int = 65536) -> bytes:
        out = bytearray()
        reader = self.reader
        while not reader.done:
            piece = reader.read_body()
            if piece is None:
                await self.receive(size)
            else:
                out += piece
        reader.reset()
        return bytes(out)

    async def response(self) -> tuple[list[ResponseHead], ResponseHead, bytes]:
        """Interim heads, the final head and the body of the next response."""
        interim: list[ResponseHead] = []
        while (head := await self.head()).status < 200:
            interim.append(head)
        return interim, head, await self.body()

    async def request(self, data: bytes) -> tuple[ResponseHead, bytes]:
        await self.send(data)
        interim, head, body = await self.response()
        assert interim == []
        return head, body

    async def get(self, target: str, extra: bytes = b"") -> tuple[ResponseHead, bytes]:
        return await self.request(
            b"GET %s HTTP/1.1\r\nHost: gw.test\r\n%s\r\n" % (target.encode(), extra)
        )

    async def at_eof(self) -> bool:
        """True if the gateway closed the connection with nothing more sent."""
        data = await self.stream.receive_some(65536)
        return data == b"" and not self.reader.buffer

    async def aclose(self) -> None:
        await self.stream.aclose()


async def eventually(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def target_of(body: bytes) -> str:
    value = json.loads(body)["target"]
    assert isinstance(value, str)
    return value


def dead_address() -> SocketAddress:
    """A loopback port nobody listens on."""
    return SocketAddress("127.0.0.1", free_port())


# --------------------------------------------------------------------------------------------
# A node speaking raw bytes, for what the h11 node cannot do (h11 refuses to send a 101
# nobody asked for) and for closing idle connections on its own.

_SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
_HINT = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"


class RawNode:
    """By path: ``/switch`` answers 101 unasked; ``/linger/S`` answers 200, then closes the
    idle connection S seconds later; ``/stray/S`` answers 200, then sends bytes nobody asked
    for S seconds later; ``/hints/N`` sends N ``103`` heads, then 200; anything else 200.
    The 200 bodies are the request target. Request bodies are not supported."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0
        self.targets: list[bytes] = []
        self.port = 0

    @property
    def address(self) -> SocketAddress:
        return SocketAddress("127.0.0.1", self.port)

    async def start(self, nursery: trio.Nursery) -> RawNode:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        try:
            async with stream:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    target = head.split(b" ", 2)[1]
                    self.targets.append(target)
                    kind, _, arg = target[1:].partition(b"/")
                    if kind == b"switch":
                        await stream.send_all(_SWITCH)
                        await _until_eof(stream)
                        return
                    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target)
                    if kind == b"hints":
                        ok = _HINT * int(arg) + ok
                    await stream.send_all(ok)
                    if kind == b"linger":
                        await trio.sleep(float(arg))
                        return
                    if kind == b"stray":
                        await trio.sleep(float(arg))
                        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        await _until_eof(stream)
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed += 1


async def _until_eof(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def start_raw(env: Env) -> tuple[Gateway, RawNode]:
    node = await RawNode().start(env.nursery)
    upstreams = {"web": upstream_runtime("web", [node.address])}
    gateway = await start_gateway(env.nursery, upstreams, reactor=env.reactor)
    return gateway, node


def sessions(reactor: Reactor) -> set[FastConnection]:
    """The http connections the reactor serves now (its registered ``FastConnection``s)."""
    return {h for h in reactor.handlers.values() if isinstance(h, FastConnection)}


def idle_connections(gateway: Gateway) -> list[NodeConnection]:
    pool = gateway.pool
    return [conn for node in gateway.upstream().nodes for conn in pool._idle.get(node, [])]


# --------------------------------------------------------------------------------------------
# 1. Keep-alive from the reactor, pooled connections watched by it.


async def test_keepalive_requests_are_served_by_the_fast_path(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await env.start()
        reactor = env.reactor
        state = gateway.upstream().nodes[0]
        pool = gateway.pool
        conn = await env.connect(gateway.port)
        targets = [f"/k/{i}" for i in range(20)]
        for target in targets:
            head, body = await conn.get(target)
            assert head.status == 200
            assert header(head, b"connection") is None
            assert target_of(body) == target
        assert spy.starts == [t.encode() for t in targets]
        assert spy.ends == []  # never handed to the task, still served from the reactor
        assert len(sessions(reactor)) == 1
        assert node.connections == 1
        assert [seen.target for seen in node.requests] == spy.starts
        assert_no_active(gateway)

        # The node connection is idle in the pool and watched by the reactor's epoll set.
        assert pool.idle_count(state) == 1
        (idle,) = idle_connections(gateway)
        assert idle.watcher is reactor
        assert idle.watch_pool is pool
        assert idle.requests == 20
        fd = idle.raw.fileno()
        assert reactor.handlers[fd] is idle
        reactor.epoll.modify(fd, select.EPOLLIN)  # raises if fd is not in the epoll set

        await conn.aclose()
        await eventually(lambda: not sessions(reactor))
        assert spy.ends == [CLOSE]
        assert pool.idle_count(state) == 1  # the client leaving does not touch the pool
        assert idle.watcher is reactor


# --------------------------------------------------------------------------------------------
# 2. A node closing an idle pooled connection (or sending stray bytes on it) is noticed at once.


@pytest.mark.parametrize("behaviour", ["linger", "stray"])
async def test_idle_pooled_connection_dropped_by_the_node(
    env: Env, spy: Spy, behaviour: str
) -> None:
    with trio.fail_after(10):
        gateway, node = await start_raw(env)
        reactor = env.reactor
        state = gateway.upstream().nodes[0]
        pool = gateway.pool
        conn = await env.connect(gateway.port)
        head, body = await conn.get(f"/{behaviour}/0.2")
        assert head.status == 200
        assert body == f"/{behaviour}/0.2".encode()
        (idle,) = idle_connections(gateway)
        assert idle.watcher is reactor
        fd = idle.raw.fileno()
        # No request is sent: the reactor sees the node's FIN (or the stray bytes) and the
        # pool closes the connection, long before the pool's sweeper would look at it.
        with trio.fail_after(2):
            while pool.idle_count(state):
                await trio.sleep(0.005)
        assert idle.raw.fileno() == -1  # closed
        assert idle.watcher is None
        assert reactor.handlers.get(fd) is not idle
        assert node.targets == [f"/{behaviour}/0.2".encode()]
        await eventually(lambda: node.closed == 1)  # the stray node sees the gateway's FIN

        # The client connection is still served from the reactor, on a new node connection.
        head, body = await conn.get("/after")
        assert head.status == 200
        assert body == b"/after"
        assert node.connections == 2
        assert spy.starts == [f"/{behaviour}/0.2".encode(), b"/after"]
        assert spy.handoffs == 0
        await conn.aclose()


# --------------------------------------------------------------------------------------------
# 3. Requests the fast path does not take go to the task, and the reactor takes over again.


async def test_handoff_to_the_task_and_back(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await env.start()
        conn = await env.connect(gateway.port)

        async def fast_get(target: str) -> None:
            starts = len(spy.starts)
            head, body = await conn.get(target)
            assert head.status == 200
            assert target_of(body) == target
            assert spy.starts[starts:] == [target.encode()]  # taken by the fast path

        await fast_get("/a")

        # A chunked request body: the task serves it (h11), the node gets it intact.
        upload = pattern(100_000)
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(upload[i : i + 7000]), upload[i : i + 7000])
            for i in range(0, len(upload), 7000)
        )
        head, body = await conn.request(
            b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks
            + b"0\r\n\r\n"
        )
        assert head.status == 200
        info = json.loads(body)
        assert info["body_len"] == len(upload)
        assert info["body_sha"] == hashlib.sha256(upload).hexdigest()
        assert node.requests[-1].body == upload
        assert node.requests[-1].header(b"transfer-encoding") == b"chunked"
        assert spy.starts == [b"/a"]
        assert spy.ends == [HANDOFF]

        await fast_get("/b")

        # Expect: 100-continue: the task answers 100 (from the node), then the body goes.
        await conn.send(
            b"POST /continue HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        interim = await conn.head()
        assert interim.status == 100
        await conn.send(b"hello")
        more, head, body = await conn.response()
        assert more == []
        assert head.status == 200
        assert json.loads(body)["body_len"] == 5
        assert node.requests[-1].body == b"hello"
        assert spy.ends == [HANDOFF, HANDOFF]

        await fast_get("/c")

        # A head that arrives in two reads: the fast path hands the first half over.
        await conn.send(b"GET /split HTTP/1.1\r\nHo")
        await trio.sleep(0.05)
        head, body = await conn.request(b"st: gw.test\r\n\r\n")
        assert head.status == 200
        assert target_of(body) == "/split"
        assert spy.ends == [HANDOFF] * 3

        await fast_get("/d")

        # A Content-Length body that arrives after its head: the task again.
        await conn.send(b"POST /late HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 4\r\n\r\n")
        await trio.sleep(0.05)
        head, body = await conn.request(b"body")
        assert head.status == 200
        assert json.loads(body)["body_len"] == 4
        assert spy.ends == [HANDOFF] * 4

        await fast_get("/e")
        assert spy.starts == [b"/a", b"/b", b"/c", b"/d", b"/e"]
        assert node.connections == 1  # the task and the reactor shared the pooled connection
        await conn.aclose()
        assert_no_active(gateway)


# --------------------------------------------------------------------------------------------
# 4. Pipelining beyond the burst the reactor serves from one read.


async def test_pipelined_requests_beyond_the_burst_limit(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await env.start()
        conn = await env.connect(gateway.port)
        targets = [f"/p/{i}" for i in range(100)]
        await conn.send(
            b"".join(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % t.encode() for t in targets)
        )
        got = []
        for _ in targets:
            interim, head, body = await conn.response()
            assert interim == []
            assert head.status == 200
            got.append(target_of(body))
        assert got == targets
        assert [seen.target.decode() for seen in node.requests] == targets
        # The reactor served the first burst from the one read, the task the rest.
        assert spy.starts == [t.encode() for t in targets[: fastpath._PIPELINE_BURST]]
        assert spy.ends == [HANDOFF]
        # ... and the reactor serves the connection again once nothing is left over.
        head, body = await conn.get("/after")
        assert target_of(body) == "/after"
        assert spy.starts[-1] == b"/after"
        assert node.connections == 1
        await conn.aclose()


# --------------------------------------------------------------------------------------------
# 5. Backpressure: a slow client holds the node back; nothing is lost or reordered.


async def test_slow_client_backpressure(env: Env, spy: Spy) -> None:
    size = 8 * 1024 * 1024
    with trio.fail_after(15):
        gateway, (node,) = await env.start()
        reactor = env.reactor
        conn = await env.connect(gateway.port, rcvbuf=32 * 1024)
        await conn.send(b"GET /big/%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)

        # The client reads nothing: the gateway stops reading the node (node_mask 0) and
        # keeps the rest it could not write (pending, bounded) until the client catches up.
        def stalled() -> bool:
            fast = [s for s in sessions(reactor) if isinstance(s, FastConnection)]
            return len(fast) == 1 and fast[0].pending is not None

        await eventually(stalled)
        await trio.sleep(0.1)
        (session,) = [s for s in sessions(reactor) if isinstance(s, FastConnection)]
        assert session.pending is not None
        assert session.state == fastpath._RELAY  # the node is not drained meanwhile ...
        assert session.nc is not None
        assert session.node_mask == 0
        assert session.client_mask == select.EPOLLOUT
        held = (  # ... and what the gateway holds itself stays bounded
            len(session.pending)
            + sum(map(len, session.exchange.out))
            + len(session.nc.reader.buffer)
        )
        assert held <= 1024 * 1024

        head = await conn.head()
        assert head.status == 200
        assert header(head, b"content-length") == str(size).encode()
        reader = conn.reader
        body = bytearray()
        # Slowly at first (small reads with pauses), then as fast as it comes.
        while len(body) < 512 * 1024:
            piece = reader.read_body()
            if piece is None:
                await conn.receive(4096)
                await trio.sleep(0.0005)
            else:
                body += piece
        body += await conn.body()
        assert len(body) == size
        assert body == pattern(size)
        assert spy.pending_writes > 0

        head, reply = await conn.get("/next")  # the connection is reusable
        assert head.status == 200
        assert target_of(reply) == "/next"
        assert spy.starts == [b"/big/%d" % size, b"/next"]
        assert spy.handoffs == 0
        assert node.connections == 1
        await conn.aclose()
        assert_no_active(gateway)


# --------------------------------------------------------------------------------------------
# 6. The client disappears mid-response.


async def test_client_gone_mid_response(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await env.start()
        reactor = env.reactor
        state = gateway.upstream().nodes[0]
        pool = gateway.pool
        conn = await env.connect(gateway.port)
        await conn.send(b"GET /big/33554432 HTTP/1.1\r\nHost: h\r\n\r\n")
        while conn.received < 100 * 1024:
            await conn.receive()
        assert spy.starts == [b"/big/33554432"]
        await conn.aclose()

        def gone() -> bool:
            return not sessions(reactor) and all(
                n.active == 0 for n in gateway.upstream().all_nodes()
            )

        await eventually(gone)
        assert_no_active(gateway)
        assert spy.ends == [CLOSE]
        # The node connection was mid-response: closed, never pooled.
        assert pool.idle_count(state) == 0
        assert not [h for h in reactor.handlers.values() if isinstance(h, NodeConnection)]

        conn = await env.connect(gateway.port)
        head, body = await conn.get("/after")
        assert head.status == 200
        assert json.loads(body)["connection"] == 1  # a new node connection
        assert node.connections == 2
        await conn.aclose()


# --------------------------------------------------------------------------------------------
# 7. Gateway errors answered from the reactor; the connection stays open when it may.


async def test_gateway_errors_keep_the_connection(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        web, sick = await Node().start(env.nursery), await Node().start(env.nursery)
        upstreams = {
            "web": upstream_runtime("web", [web.address]),
            "sick": upstream_runtime("sick", [sick.address]),
            "dead": upstream_runtime("dead", [dead_address()], retries=2),
        }
        gateway, _ = await env.start(
            nodes=0,
            upstreams=upstreams,
            fallback=None,
            routes=[
                RouteConfig(path="/ok/{p+}", upstream="web"),
                RouteConfig(path="/sick/{p+}", upstream="sick"),
                RouteConfig(path="/dead/{p+}", upstream="dead"),
                RouteConfig(path="/gone/{p+}", upstream="gone"),  # not running
            ],
        )
        for node in gateway.upstream("sick").nodes:
            node.healthy = False
        conn = await env.connect(gateway.port)
        expected = [
            ("/nowhere", 404, "no route"),
            ("/ok/a", 200, None),
            ("/sick/a", 503, "no node available"),
            ("/ok/b", 200, None),
            ("/dead/a", 502, "connect attempt"),
            ("/dead/b", 502, "connect attempt"),
            ("/ok/c", 200, None),
            ("/gone/a", 503, "not running"),
            ("/ok/../d", 400, None),
            ("/ok/e", 200, None),
        ]
        for target, status, message in expected:
            head, body = await conn.get(target)
            assert head.status == status, (target, body)
            assert header(head, b"connection") is None, target  # kept open
            if status != 200:
                error = error_of(body)
                assert error["status"] == status
                if message is not None:
                    assert message in error["error"], (target, error)
        assert spy.starts == [t.encode() for t, _, _ in expected]
        assert spy.ends == []
        assert sick.connections == 0
        for node in gateway.upstream("sick").nodes:
            node.healthy = True
        head, _ = await conn.get("/sick/again")
        assert head.status == 200
        assert spy.ends == []
        stats = gateway.stats.requests
        assert stats[("none", 404)] == 1
        assert stats[("/dead/{p+}", 502)] == 2
        assert stats[("/sick/{p+}", 503)] == 1
        await conn.aclose()
        assert_no_active(gateway)


async def test_rate_limited_requests_keep_the_connection(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        # One token per 500 ms: /r/2 comes well within that of /r/1 even on a loaded machine.
        gateway, (node,) = await env.start(rate_limit=2, rate_limit_burst=1)
        conn = await env.connect(gateway.port)
        head, _ = await conn.get("/r/1")
        assert head.status == 200
        head, body = await conn.get("/r/2")
        assert head.status == 429
        assert header(head, b"connection") is None
        assert error_of(body) == {"error": "rate limit exceeded", "status": 429}
        await trio.sleep(0.6)  # a token again
        head, body = await conn.get("/r/3")
        assert head.status == 200
        assert target_of(body) == "/r/3"
        assert [seen.target for seen in node.requests] == [b"/r/1", b"/r/3"]
        assert spy.starts == [b"/r/1", b"/r/2", b"/r/3"]
        assert spy.ends == []
        await conn.aclose()


async def test_504_closes_the_connection(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await env.start(upstream_options={"response_timeout": 0.3})
        state = gateway.upstream().nodes[0]
        conn = await env.connect(gateway.port)
        head, _ = await conn.get("/quick")
        assert head.status == 200
        started = trio.current_time()
        head, body = await conn.get("/slow/30")
        assert 0.25 < trio.current_time() - started < 3
        assert head.status == 504
        assert header(head, b"connection") == b"close"
        assert error_of(body)["status"] == 504
        assert await conn.at_eof()
        assert spy.starts == [b"/quick", b"/slow/30"]
        assert [seen.target for seen in node.requests] == spy.starts
        assert spy.ends == [CLOSE]
        assert gateway.stats.requests[("default", 504)] == 1
        assert_no_active(gateway)
        assert gateway.pool.idle_count(state) == 0  # the late node's connection is closed
        await conn.aclose()


# --------------------------------------------------------------------------------------------
# 8. A node switching protocols unasked.


async def test_unasked_101_is_a_502(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, node = await start_raw(env)
        conn = await env.connect(gateway.port)
        head, body = await conn.get("/switch")
        assert head.status == 502
        assert error_of(body) == {"error": "node switched protocols unasked", "status": 502}
        assert header(head, b"connection") is None
        await eventually(lambda: node.closed == 1)  # that node connection is closed
        head, body = await conn.get("/fine")
        assert head.status == 200
        assert body == b"/fine"
        assert node.connections == 2
        assert spy.starts == [b"/switch", b"/fine"]
        assert spy.ends == []
        assert gateway.stats.requests[("default", 502)] == 1
        assert_no_active(gateway)
        await conn.aclose()


# --------------------------------------------------------------------------------------------
# Interim responses from the node, relayed by the reactor.


async def test_interim_responses_are_relayed(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, node = await start_raw(env)
        conn = await env.connect(gateway.port)
        await conn.send(b"GET /hints/3 HTTP/1.1\r\nHost: h\r\n\r\n")
        interim, head, body = await conn.response()
        assert [h.status for h in interim] == [103, 103, 103]
        assert header(interim[0], b"link") == b"</style.css>; rel=preload; as=style"
        assert head.status == 200
        assert body == b"/hints/3"
        head, body = await conn.get("/next")
        assert body == b"/next"
        assert spy.starts == [b"/hints/3", b"/next"]
        assert node.targets == spy.starts
        assert node.connections == 1
        await conn.aclose()


async def test_interim_responses_to_a_client_that_does_not_read(env: Env, spy: Spy) -> None:
    hints = 20_000  # ~1.3 MB of 103 heads, more than the socket buffers hold
    with trio.fail_after(15):
        gateway, _ = await start_raw(env)
        conn = await env.connect(gateway.port, rcvbuf=8 * 1024)
        await conn.send(b"GET /hints/%d HTTP/1.1\r\nHost: h\r\n\r\n" % hints)
        await trio.sleep(0.5)  # the client reads nothing for a while
        interim, head, body = await conn.response()
        assert len(interim) == hints
        assert all(h.status == 103 for h in interim)
        assert head.status == 200
        assert body == b"/hints/%d" % hints
        assert spy.starts == [b"/hints/%d" % hints]
        await conn.aclose()


# --------------------------------------------------------------------------------------------
# 9. Shutdown: cancelling the gateway ends the connections served from the reactor.


async def test_shutdown_closes_fast_connections(spy: Spy) -> None:
    conns: list[Conn] = []
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as outer:
                node = await Node().start(outer)
                reactor = Reactor()
                async with trio.open_nursery() as inner:
                    await inner.start(reactor.run)
                    upstreams = {"web": upstream_runtime("web", [node.address])}
                    gateway = await start_gateway(inner, upstreams, reactor=reactor)
                    conns.append(idle := await Conn.open(gateway.port))
                    head, _ = await idle.get("/idle")
                    assert head.status == 200
                    conns.append(busy := await Conn.open(gateway.port))
                    await busy.send(b"GET /slow/30 HTTP/1.1\r\nHost: h\r\n\r\n")
                    await eventually(lambda: any(s.target == b"/slow/30" for s in node.requests))
                    assert len(sessions(reactor)) == 2
                    assert gateway.upstream().nodes[0].active == 1
                    inner.cancel_scope.cancel()
                assert inner.cancel_scope.cancelled_caught  # and nothing else came out
                assert reactor.stopped
                assert not sessions(reactor)
                assert not any(isinstance(h, NodeConnector) for h in reactor.handlers.values())
                assert_no_active(gateway)
                assert await idle.at_eof()
                assert await busy.at_eof()
                assert spy.starts == [b"/idle", b"/slow/30"]
                assert spy.handoffs == 0
                outer.cancel_scope.cancel()
    finally:
        for conn in conns:
            await trio.aclose_forcefully(conn.stream)


# --------------------------------------------------------------------------------------------
# 10. Draining.


async def test_draining_closes_idle_and_answers_busy(env: Env, spy: Spy) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await env.start(header_timeout=1.0)  # sweeper tick 0.25 s
        idle = await env.connect(gateway.port)
        head, _ = await idle.get("/idle")
        assert head.status == 200
        busy = await env.connect(gateway.port)
        await busy.send(b"GET /slow/0.3 HTTP/1.1\r\nHost: h\r\n\r\n")
        await eventually(lambda: any(s.target == b"/slow/0.3" for s in node.requests))
        gateway.listener.draining = True
        with trio.fail_after(3):
            assert await idle.at_eof()  # closed by the sweeper, without a request
        interim, head, body = await busy.response()
        assert interim == []
        assert head.status == 200
        assert target_of(body) == "/slow/0.3"
        assert header(head, b"connection") == b"close"
        assert await busy.at_eof()
        await eventually(lambda: not sessions(env.reactor))
        assert spy.starts == [b"/idle", b"/slow/0.3"]
        assert spy.ends == [CLOSE, CLOSE]
        await idle.aclose()
        await busy.aclose()
        assert_no_active(gateway)


# --------------------------------------------------------------------------------------------
# TLS: the reactor decrypts and encrypts (l4gw.http.tlsstream.TLSStream) between the task's turns.

__all__ = ["gateway_certs"]  # the fixture, imported for the tests below


async def test_tls_keepalive_is_served_by_the_reactor(
    env: Env, spy: Spy, gateway_certs: TLSCerts
) -> None:
    with trio.fail_after(10):
        gateway, node, conn = await env.start_tls(gateway_certs)
        for i in range(20):
            head, body = await conn.get(f"/r/{i}")
            assert head.status == 200
            info = json.loads(body)
            assert info["target"] == f"/r/{i}"
            assert dict(info["headers"])["x-forwarded-proto"] == "https"
        # The first request may have come with the handshake's last bytes (then the task
        # serves it); every other one is the reactor's.
        assert spy.starts[-19:] == [f"/r/{i}".encode() for i in range(1, 20)]
        assert spy.handoffs <= 1
        assert node.connections == 1
        # The client's close_notify reads as EOF: the reactor gives the connection back to
        # be closed.
        stream = conn.stream
        assert isinstance(stream, trio.SSLStream)
        transport, _ = await stream.unwrap()  # and the gateway's close_notify came back
        await transport.aclose()
        assert spy.ends == [CLOSE]
        assert spy.ends[-1] == CLOSE
        assert_no_active(gateway)


async def test_tls_pipelined_requests_in_one_record(
    env: Env, spy: Spy, gateway_certs: TLSCerts
) -> None:
    with trio.fail_after(10):
        _, _, conn = await env.start_tls(gateway_certs)
        assert (await conn.get("/warm"))[0].status == 200
        await conn.send(b"".join(b"GET /p/%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(10)))
        targets = []
        for _ in range(10):
            _, head, body = await conn.response()
            assert head.status == 200
            targets.append(json.loads(body)["target"])
        assert targets == [f"/p/{i}" for i in range(10)]
        assert spy.starts[-10:] == [b"/p/%d" % i for i in range(10)]


async def test_tls_large_response_to_a_slow_reader(
    env: Env, spy: Spy, gateway_certs: TLSCerts
) -> None:
    with trio.fail_after(30):
        gateway, _ = await env.start(tls_context=gateway_certs.server)
        conn = await env.connect(gateway.port, rcvbuf=32 * 1024, tls=gateway_certs.client)
        size = 8 << 20
        assert (await conn.get("/warm"))[0].status == 200
        await conn.send(b"GET /big/%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)
        head = await conn.head()
        assert head.status == 200
        await trio.sleep(0.3)  # the client reads nothing for a while: ciphertext waits
        body = await conn.body(size=4096)
        assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(size)).digest()
        assert spy.pending_writes > 0
        assert b"/big/%d" % size in spy.starts
        head, _ = await conn.get("/after")  # the connection is still good
        assert head.status == 200


async def test_tls_handoff_to_the_task_and_back(
    env: Env, spy: Spy, gateway_certs: TLSCerts
) -> None:
    with trio.fail_after(10):
        _, node, conn = await env.start_tls(gateway_certs)
        assert (await conn.get("/one"))[0].status == 200
        handoffs = spy.handoffs
        upload = pattern(200_000)
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(upload), upload)
        head, body = await conn.request(
            b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        assert head.status == 200
        assert json.loads(body)["body_sha"] == hashlib.sha256(upload).hexdigest()
        assert spy.handoffs == handoffs + 1  # the task served the chunked upload
        assert (await conn.get("/two"))[0].status == 200
        assert spy.starts[-1] == b"/two"  # ... and the reactor the next request
        assert node.connections == 1


async def test_tls_garbage_after_the_handshake_closes(
    env: Env, spy: Spy, gateway_certs: TLSCerts
) -> None:
    with trio.fail_after(10):
        gateway, _, conn = await env.start_tls(gateway_certs)
        assert (await conn.get("/one"))[0].status == 200
        stream = conn.stream
        assert isinstance(stream, trio.SSLStream)
        await stream.transport_stream.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        with pytest.raises(trio.BrokenResourceError):
            while await stream.receive_some(1000):
                pass
        assert spy.ends[-1] == CLOSE
        # The gateway goes on serving.
        other = await env.connect(gateway.port, tls=gateway_certs.client)
        assert (await other.get("/two"))[0].status == 200


async def test_tls_key_update_from_openssl_s_client(env: Env, gateway_certs: TLSCerts) -> None:
    """openssl s_client's ``K`` command sends a TLS 1.3 KeyUpdate that asks for one back;
    the requests before and after it are both answered. (Neither ``-quiet`` nor ``-ign_eof``:
    each turns the commands off.)"""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    with trio.fail_after(30):
        gateway, (node,) = await env.start(tls_context=gateway_certs.server)
        script = (
            "GET /before HTTP/1.1\nHost: gw.test\n\n"
            "K\n"
            "GET /after HTTP/1.1\nHost: gw.test\nConnection: close\n\n"
        )

        def run() -> subprocess.CompletedProcess[str]:
            proc = subprocess.Popen(
                [
                    openssl,
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{gateway.port}",
                    "-tls1_3",
                    "-servername",
                    "gw.test",
                    "-CAfile",
                    str(gateway_certs.ca_file),
                    "-crlf",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # s_client exited: its output tells
                for line in script.split("\n"):
                    proc.stdin.write(line + "\n")
                    proc.stdin.flush()
                    time.sleep(0.05)  # one line per read, as typed
                time.sleep(1)  # s_client quits at the end of its input (commands need that)
                proc.stdin.close()
            out, err = proc.communicate(timeout=20)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

        result = await trio.to_thread.run_sync(run)
        assert "KEYUPDATE" in result.stderr, result.stderr
        assert [seen.target for seen in node.requests] == [b"/before", b"/after"]
        assert result.stdout.count("HTTP/1.1 200 ") == 2, result.stdout


async def test_tls_request_split_across_the_end_of_the_handshake(
    env: Env, spy: Spy, gateway_certs: TLSCerts
) -> None:
    """The client's Finished and the first half of its request record arrive in one read
    (the handshake reads both); the rest comes later: the reactor waits for it with the half
    record kept, then serves the request."""
    with trio.fail_after(10):
        gateway, (node,) = await env.start(tls_context=gateway_certs.server)
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", gateway.port))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = gateway_certs.client.wrap_bio(incoming, outgoing, server_hostname="gw.test")
        with sock:
            while True:
                try:
                    client.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await sock.send(outgoing.read())
                    incoming.write(await sock.recv(65536))
            finished = outgoing.read()  # the client's Finished, not sent yet
            client.write(b"GET /split HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            record = outgoing.read()
            await sock.send(finished + record[:10])
            await trio.sleep(0.2)  # the gateway has done the handshake and is waiting
            assert node.requests == []
            await sock.send(record[10:])
            response = b""
            while b"/split" not in response:
                data = await sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):
                    while piece := client.read(65536):  # b"": close_notify
                        response += piece
        assert response.startswith(b"HTTP/1.1 200 ")
        assert spy.starts == [b"/split"]  # the reactor served it
        assert [seen.target for seen in node.requests] == [b"/split"]
