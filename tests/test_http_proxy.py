"""http mode end to end on loopback: real clients -> handle_http_connection -> real nodes.

The nodes are small h11 servers run in the test (they record every byte they receive); the
gateway is ``handle_http_connection`` behind a ``trio.serve_tcp`` listener with a
``ListenerRuntime`` built by hand. Clients are raw sockets, an h11 client, and curl.

Every test runs twice: with the gateway's task serving every request ("task"), and with a
reactor that serves plain keep-alive requests and hands the others back ("reactor", the
daemon's set-up, :mod:`l4gw.http.fastpath`). Both must behave the same.
"""

from __future__ import annotations

import gc
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import h11._readers
import pytest
import structlog
import trio

from l4gw.core.acl import BackendAuthorization, SourceACL
from l4gw.core.config import (
    HealthConfig,
    ListenerConfig,
    NodeConfig,
    RouteConfig,
    UpstreamConfig,
    UpstreamTLSConfig,
)
from l4gw.core.netaddr import SocketAddress
from l4gw.core.ratelimit import RateLimiter
from l4gw.core.runtime import ListenerRuntime, ListenerStats
from l4gw.core.upstream import UpstreamRuntime
from l4gw.http import proxy
from l4gw.http.conn import HttpConn
from l4gw.http.pool import NodePool
from l4gw.http.proxy import handle_http_connection
from l4gw.http.tlsstream import accept_tls
from l4gw.http.wire import ResponseHead, ResponseReader
from l4gw.l4.deadlines import Deadlines
from l4gw.l4.reactor import Reactor

from .conftest import free_port

# --------------------------------------------------------------------------------------------
# A node: an h11 server with behaviours chosen by path, recording what it receives.


def pattern(size: int) -> bytes:
    """``size`` bytes of a recognisable, non-repeating-per-line pattern."""
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


@attrs.define
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: int

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        return b", ".join(values) if values else None


class Node:
    """A loopback HTTP/1.1 node. ``raw`` has every byte received, on any connection."""

    def __init__(self, *, proxy_protocol: bool = False) -> None:
        self.requests: list[Seen] = []
        self.raw = bytearray()
        self.connections = 0
        self.proxy_lines: list[bytes] = []
        self.proxy_protocol = proxy_protocol
        self.port = 0
        self.ssl_context: ssl.SSLContext | None = None

    @property
    def address(self) -> SocketAddress:
        return SocketAddress("127.0.0.1", self.port)

    async def start(self, nursery: trio.Nursery) -> Node:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _serve(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        index = self.connections
        self.connections += 1
        h = h11.Connection(h11.SERVER)
        try:
            if self.ssl_context is not None:
                stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
                await stream.do_handshake()
            if self.proxy_protocol:
                data = b""
                while b"\r\n" not in data:
                    more = await stream.receive_some(1)
                    if not more:
                        return
                    data += more
                self.proxy_lines.append(data)
            count = 0
            while True:
                event = await self._next(stream, h)
                if not isinstance(event, h11.Request):
                    return
                count += 1
                if not await self._respond(stream, h, event, index, count):
                    return
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return
                h.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _next(self, stream: trio.abc.Stream, h: h11.Connection) -> Any:
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await stream.receive_some(65536)
            self.raw += data
            h.receive_data(bytes(data))

    async def _body(self, stream: trio.abc.Stream, h: h11.Connection) -> bytes:
        body = bytearray()
        while True:
            event = await self._next(stream, h)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise trio.BrokenResourceError("client went away mid-body")

    async def _send(self, stream: trio.abc.Stream, h: h11.Connection, *events: Any) -> None:
        data = b"".join(h.send(e) or b"" for e in events)
        await stream.send_all(data)

    async def _respond(
        self, stream: trio.abc.Stream, h: h11.Connection, req: h11.Request, index: int, count: int
    ) -> bool:
        """Answer one request; False to close the connection afterwards."""
        path = req.target.split(b"?")[0]
        parts = path.split(b"/")
        kind = parts[1] if len(parts) > 1 else b""
        arg = parts[2] if len(parts) > 2 else b""

        def record(body: bytes) -> None:
            self.requests.append(Seen(req.method, req.target, list(req.headers), body, index))

        if kind == b"echo":  # stream the body back as it arrives
            record(b"")
            await self._send(stream, h, h11.Response(status_code=200, headers=[]))
            while True:
                event = await self._next(stream, h)
                if isinstance(event, h11.Data):
                    await self._send(stream, h, h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    await self._send(stream, h, h11.EndOfMessage())
                    return True
                else:
                    return False
        if kind == b"continue" and h.they_are_waiting_for_100_continue:
            await self._send(stream, h, h11.InformationalResponse(status_code=100, headers=[]))
        if kind == b"reject":  # answer without reading the body
            record(b"")
            await self._send(
                stream,
                h,
                h11.Response(
                    status_code=413, headers=[(b"content-length", b"0"), (b"connection", b"close")]
                ),
                h11.EndOfMessage(),
            )
            return False
        if kind == b"drop":
            record(b"")
            return False
        if kind == b"garbage":
            record(b"")
            await stream.send_all(b"HTTP/1.1 abc\r\n\r\n")
            return False
        if kind == b"flaky" and count > 1:
            record(b"")
            return False  # a dead keep-alive connection: closed without an answer
        if kind == b"ws":
            record(b"")
            await self._send(
                stream,
                h,
                h11.InformationalResponse(
                    status_code=101,
                    headers=[(b"upgrade", b"websocket"), (b"connection", b"Upgrade")],
                ),
            )
            early, _ = h.trailing_data
            if early:
                await stream.send_all(early.upper())
            while data := await stream.receive_some(65536):
                self.raw += data
                await stream.send_all(bytes(data).upper())
            return False
        body = await self._body(stream, h)
        record(body)
        if kind == b"slow":
            await trio.sleep(float(arg))
        if kind == b"big":
            size = int(arg)
            await self._send(
                stream, h, h11.Response(status_code=200, headers=[(b"content-length", arg)])
            )
            data = pattern(size)
            for i in range(0, size, 65536):
                await self._send(stream, h, h11.Data(data=data[i : i + 65536]))
            await self._send(stream, h, h11.EndOfMessage())
            return True
        if kind == b"chunked":
            size = int(arg)
            await self._send(stream, h, h11.Response(status_code=200, headers=[]))
            data = pattern(size)
            for i in range(0, size, 10000):
                await self._send(stream, h, h11.Data(data=data[i : i + 10000]))
            await self._send(stream, h, h11.EndOfMessage())
            return True
        if kind == b"cut":
            await self._send(
                stream, h, h11.Response(status_code=200, headers=[(b"content-length", b"1000")])
            )
            await stream.send_all(b"0123456789")
            return False
        status = int(arg) if kind == b"status" else 200
        headers = [(b"content-type", b"application/json")]
        if kind == b"close":
            headers.append((b"connection", b"close"))
        info = {
            "method": req.method.decode(),
            "target": req.target.decode(),
            "headers": [[n.decode(), v.decode()] for n, v in req.headers],
            "body_len": len(body),
            "body_sha": hashlib.sha256(body).hexdigest(),
            "connection": index,
        }
        payload = json.dumps(info).encode() if status not in (204, 304) else b""
        if req.method != b"HEAD" and status not in (204, 304):
            headers.append((b"content-length", b"%d" % len(payload)))
        elif req.method == b"HEAD":
            headers.append((b"content-length", b"%d" % len(payload)))
            payload = b""
        await self._send(
            stream,
            h,
            h11.Response(status_code=status, headers=headers),
            h11.Data(data=payload),
            h11.EndOfMessage(),
        )
        return True


# --------------------------------------------------------------------------------------------
# The gateway under test.


def upstream_runtime(name: str, nodes: Sequence[SocketAddress], **config: Any) -> UpstreamRuntime:
    health = config.pop("health", HealthConfig(fail_open=False))
    cfg = UpstreamConfig(
        name=name,
        nodes=tuple(NodeConfig(address) for address in nodes),
        health=health,
        **config,
    )
    return UpstreamRuntime(cfg, BackendAuthorization())


@attrs.define
class Gateway:
    listener: ListenerRuntime
    port: int
    tls_context: ssl.SSLContext | None = None
    #: The node pool and the deadline sweeper it serves with (the daemon's, in a daemon).
    pool: NodePool = attrs.field(factory=NodePool)
    deadlines: Deadlines = attrs.field(factory=Deadlines)
    #: Connections being served (``handle_http_connection`` has not returned yet).
    serving: list[int] = attrs.field(factory=lambda: [0])

    @property
    def base(self) -> str:
        """The gateway's URL for curl (see ``curl_args``)."""
        return f"{'https' if self.tls_context else 'http'}://127.0.0.1:{self.port}"

    def plain_only(self, why: str) -> None:
        """Skip the test in the TLS variants."""
        if self.tls_context is not None:
            pytest.skip(f"plain TCP only: {why}")

    @property
    def stats(self) -> ListenerStats:
        return self.listener.stats

    def upstream(self, name: str = "web") -> UpstreamRuntime:
        return self.listener.upstreams[name]


async def start_gateway(
    nursery: trio.Nursery,
    upstreams: dict[str, UpstreamRuntime],
    *,
    routes: Sequence[RouteConfig] = (),
    fallback: str | None = "web",
    rate_limit: float = 0.0,
    rate_limit_burst: int = 0,
    access_log: bool = False,
    tls_context: ssl.SSLContext | None = None,
    reactor: Reactor | None = None,
    pool: NodePool | None = None,
    deadlines: Deadlines | None = None,
    **config: Any,
) -> Gateway:
    """An http listener served by ``handle_http_connection`` in ``nursery``; the node pool and
    the deadline sweeper (new ones, run in ``nursery``, unless given) are the gateway's."""
    if pool is None:
        pool = NodePool()
        await nursery.start(pool.run)
    if deadlines is None:
        deadlines = Deadlines()
        await nursery.start(deadlines.run)
    listener_config = ListenerConfig(
        name="gw",
        listen=SocketAddress("127.0.0.1", 0),
        mode="http",
        upstream=fallback,
        routes=tuple(routes),
        rate_limit=rate_limit,
        rate_limit_burst=rate_limit_burst,
        **config,
    )
    runtime = ListenerRuntime(
        config=listener_config,
        stats=ListenerStats(),
        acl=SourceACL(),
        rate_limiter=RateLimiter(rate_limit, rate_limit_burst),
        upstreams=upstreams,
        access_log=access_log,
    )

    serving = [0]

    async def handler(tcp: trio.SocketStream) -> None:
        serving[0] += 1
        try:
            await serve(tcp)
        finally:
            serving[0] -= 1

    async def serve(tcp: trio.SocketStream) -> None:
        peer = tcp.socket.getpeername()
        stream: trio.abc.Stream = tcp
        if tls_context is not None:  # as an http listener does it
            try:
                stream = await accept_tls(tcp.socket, tls_context, 5)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                return
        await handle_http_connection(
            runtime,
            stream,
            (peer[0], peer[1]),
            tls=tls_context is not None,
            pool=pool,
            deadlines=deadlines,
            reactor=reactor,
        )

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return Gateway(runtime, port, tls_context, pool, deadlines, serving)


class TLSCerts:
    """A CA and a server certificate for ``gw.test`` and 127.0.0.1; ``ca_file`` is the CA in
    PEM (for curl)."""

    def __init__(self, directory: Path) -> None:
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        cert = ca.issue_cert("gw.test", "127.0.0.1")
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.options |= ssl.OP_NO_RENEGOTIATION
        self.server.set_alpn_protocols(["http/1.1"])
        cert.configure_cert(self.server)
        self.client = ssl.create_default_context()
        ca.configure_trust(self.client)
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))


@pytest.fixture(scope="session")
def gateway_certs(tmp_path_factory: pytest.TempPathFactory) -> TLSCerts:
    certs = TLSCerts(tmp_path_factory.mktemp("gateway-certs"))
    _CA_FILES.append(certs.ca_file)
    return certs


#: Gateway ports that speak TLS, with the client context to use; the test CA for curl.
_TLS_PORTS: dict[int, ssl.SSLContext] = {}
_CA_FILES: list[Path] = []


async def open_stream(port: int) -> trio.abc.Stream:
    """A client connection to the gateway on ``port``: TLS (handshake done) when the
    gateway speaks it, else plain TCP."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    context = _TLS_PORTS.get(port)
    if context is None:
        return tcp
    stream = trio.SSLStream(tcp, context, server_hostname="gw.test", https_compatible=True)
    await stream.do_handshake()
    return stream


Setup = Callable[..., Awaitable[tuple[Gateway, list[Node]]]]


@pytest.fixture(params=["task", "reactor", "task+tls", "reactor+tls"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    """``await setup(nodes=1, **gateway_options)`` -> (gateway, nodes); stopped after the test.

    Every test runs four times: with or without the reactor's fast path, each over plain TCP
    and over TLS terminated by the gateway (clients connect with ``open_stream``)."""
    async with trio.open_nursery() as nursery:
        reactor: Reactor | None = None
        certs: TLSCerts | None = None
        if request.param.endswith("+tls"):
            certs = request.getfixturevalue("gateway_certs")
        if request.param.startswith("reactor"):
            reactor = Reactor()
            await nursery.start(reactor.run)

        async def start(
            nodes: int = 1, node_options: dict[str, Any] | None = None, **options: Any
        ) -> tuple[Gateway, list[Node]]:
            started = [await Node(**(node_options or {})).start(nursery) for _ in range(nodes)]
            upstream_options = options.pop("upstream_options", {})
            upstreams = options.pop(
                "upstreams",
                {"web": upstream_runtime("web", [n.address for n in started], **upstream_options)},
            )
            if certs is not None:
                options.setdefault("tls_context", certs.server)
            gateway = await start_gateway(nursery, upstreams, reactor=reactor, **options)
            if certs is not None:
                _TLS_PORTS[gateway.port] = certs.client
                registered.append(gateway.port)
            return gateway, started

        registered: list[int] = []
        try:
            yield start
        finally:
            for port in registered:  # the port may serve plain TCP in a later test
                _TLS_PORTS.pop(port, None)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# Clients.


@attrs.define
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        return b", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """An h11 client on one connection (keep-alive)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await open_stream(port))

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Reply:
        h = self.h
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        all_headers = list(headers)
        if not any(n.lower() == "host" for n, _ in headers):
            all_headers.insert(0, ("host", "gw.test"))
        if body and not any(
            n.lower() in ("content-length", "transfer-encoding") for n, _ in headers
        ):
            all_headers.append(("content-length", str(len(body))))
        data = h.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        if body:
            data += h.send(h11.Data(data=body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        status = 0
        headers_out: list[tuple[bytes, bytes]] = []
        out = bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers_out = list(event.headers)
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, headers_out, bytes(out))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def raw(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Send ``data`` on a new connection and read until the gateway closes it."""
    stream = await open_stream(port)
    async with stream:
        await stream.send_all(data)
        received = bytearray()
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
                if not until_close:
                    break
        except trio.BrokenResourceError:
            pass
        return bytes(received)


def parse_responses(data: bytes, *, head_request: bool = False) -> list[tuple[ResponseHead, bytes]]:
    """Every complete response in ``data`` (final ones; 1xx are returned too)."""
    reader = ResponseReader()
    reader.feed(data)
    reader.feed_eof()
    out: list[tuple[ResponseHead, bytes]] = []
    while reader.buffer:
        head = reader.read_head(head_request=head_request)
        assert head is not None
        body = b""
        if head.status >= 200:
            while not reader.done:
                piece = reader.read_body()
                assert piece is not None
                body += piece
        out.append((head, body))
        reader.reset()
    return out


def one_response(data: bytes, *, head_request: bool = False) -> tuple[ResponseHead, bytes]:
    (response,) = parse_responses(data, head_request=head_request)
    return response


def error_of(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    assert isinstance(value, dict)
    assert set(value) == {"error", "status"}
    return value


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    """curl with ``args``; https URLs are verified against the test CA."""
    tls = ["--cacert", str(_CA_FILES[-1])] if any(a.startswith("https:") for a in args) else []
    proc = await trio.run_process(
        ["curl", "-sS", "--max-time", "20", *tls, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_no_active(gateway: Gateway) -> None:
    for upstream in gateway.listener.upstreams.values():
        for node in upstream.all_nodes():
            assert node.active == 0, node


# --------------------------------------------------------------------------------------------
# Routing, rewriting, headers, logging.


async def test_route_rewrite_and_forwarded_headers(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup(
            routes=[RouteConfig(path="/foo/{proxy+}", upstream="web", rewrite="/bar/{proxy}")],
        )
        client = await Client.connect(gateway.port)
        with structlog.testing.capture_logs() as logs:
            gateway.listener.access_log = True
            reply = await client.request(
                "GET",
                "/foo/a/b%7e?x=1",
                headers=[("Connection", "x-drop"), ("X-Drop", "1"), ("X-Forwarded-For", "9.9.9.9")],
            )
        assert reply.status == 200
        info = reply.json()
        assert info["target"] == "/bar/a/b~?x=1"
        headers = dict(info["headers"])
        assert headers["host"] == "gw.test"
        assert headers["x-forwarded-for"] == "9.9.9.9, 127.0.0.1"
        assert headers["x-forwarded-proto"] == ("https" if gateway.tls_context else "http")
        assert headers["x-forwarded-host"] == "gw.test"
        assert "x-drop" not in headers
        assert "connection" not in headers
        assert gateway.stats.requests == {("/foo/{proxy+}", 200): 1}
        assert gateway.stats.durations.count == 1
        (line,) = [entry for entry in logs if entry["event"] == "request"]
        assert line["listener"] == "gw"
        assert line["method"] == "GET"
        assert line["path"] == "/foo/a/b%7e?x=1"
        assert line["upstream_path"] == "/bar/a/b~?x=1"
        assert line["host"] == "gw.test"
        assert line["status"] == 200
        assert line["node"] == str(node.address)
        assert line["client"].startswith("127.0.0.1:")
        assert line["bytes_in"] > 0
        assert line["bytes_out"] > len(reply.body)
        assert isinstance(line["duration_ms"], float)
        await client.aclose()
        assert gateway.stats.bytes_in > 0
        assert gateway.stats.bytes_out > 0


async def test_host_header_precedence(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup(
            routes=[
                RouteConfig(path="/route", upstream="web", host_header="from-route.internal"),
                RouteConfig(path="/upstream", upstream="web"),
            ],
            upstream_options={"host_header": "from-upstream.internal"},
        )
        client = await Client.connect(gateway.port)
        info = (await client.request("GET", "/route")).json()
        assert dict(info["headers"])["host"] == "from-route.internal"
        info = (await client.request("GET", "/upstream")).json()
        assert dict(info["headers"])["host"] == "from-upstream.internal"
        assert dict(info["headers"])["x-forwarded-host"] == "gw.test"
        await client.aclose()


async def test_http10_client_without_host(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        data = await raw(gateway.port, b"GET /x HTTP/1.0\r\n\r\n")
        head, body = one_response(data)
        assert head.status == 200
        assert dict(json.loads(body)["headers"])["host"] == str(node.address)


async def test_routes_by_host_and_method(setup: Setup) -> None:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            api, admin = await Node().start(nursery), await Node().start(nursery)
            upstreams = {
                "api": upstream_runtime("api", [api.address]),
                "admin": upstream_runtime("admin", [admin.address]),
            }
            gateway = await start_gateway(
                nursery,
                upstreams,
                fallback=None,
                routes=[
                    RouteConfig(
                        host="*.example.com", path="/{p+}", methods=("GET",), upstream="api"
                    ),
                    RouteConfig(host="admin.test", path="/{p+}", upstream="admin"),
                ],
            )
            client = await Client.connect(gateway.port)
            for host, method, expect in [
                ("a.example.com", "GET", "api"),
                ("a.example.com:8080", "HEAD", "api"),
                ("a.example.com", "POST", None),
                ("ADMIN.test", "DELETE", "admin"),
                ("example.com", "GET", None),
            ]:
                reply = await client.request(method, "/x", headers=[("Host", host)])
                if expect is None:
                    assert reply.status == 404
                    assert error_of(reply.body) == {"error": "no route", "status": 404}
                else:
                    assert reply.status == 200
            assert len(api.requests) == 2
            assert len(admin.requests) == 1
            assert gateway.stats.requests[("none", 404)] == 2
            await client.aclose()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# Keep-alive, the node pool, pipelining.


async def test_keepalive_reuses_one_node_connection(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        client = await Client.connect(gateway.port)
        for i in range(5):
            reply = await client.request("GET", f"/n/{i}")
            assert reply.status == 200
            assert reply.json()["connection"] == 0
        await client.aclose()
        client = await Client.connect(gateway.port)  # another client: same pooled connection
        assert (await client.request("GET", "/again")).json()["connection"] == 0
        await client.aclose()
        assert node.connections == 1
        assert_no_active(gateway)
        assert gateway.pool.idle_count(gateway.upstream().nodes[0]) == 1


async def test_connection_close_response_is_not_reused(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        client = await Client.connect(gateway.port)
        assert (await client.request("GET", "/close")).status == 200
        assert (await client.request("GET", "/after")).json()["connection"] == 1
        await client.aclose()
        assert node.connections == 2


@pytest.mark.parametrize("path", ["/", "/missing"])
async def test_connection_close_request_is_closed_at_once(
    setup: Setup, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request read in full with ``Connection: close`` (h11's MUST_CLOSE) is answered and
    its connection closed at once, whether a node or the gateway answered: lingering is only
    for request bytes left unread, and the client need not close first."""
    monkeypatch.setattr(proxy, "LINGER_TIME", 8.0)
    with trio.fail_after(20):
        only = {"fallback": None, "routes": [RouteConfig(path="/only", upstream="web")]}
        gateway, _ = await setup(**(only if path == "/missing" else {}))
        stream = await open_stream(gateway.port)
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode()
        )
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
        head, _ = one_response(bytes(received))
        assert head.status == (404 if path == "/missing" else 200)
        with trio.fail_after(4):  # not LINGER_TIME: the client still holds its end open
            while gateway.serving[0]:
                await trio.sleep(0.01)
        await stream.aclose()


async def test_a_finished_connection_is_freed_without_the_cyclic_collector(setup: Setup) -> None:
    """Nothing a connection holds is kept in a reference cycle: with the cyclic garbage
    collector off, no connection object survives its connection (a cycle would keep its
    sockets, TLS objects and h11 state until a later collection, which under load costs
    more than the requests themselves)."""
    with trio.fail_after(10):
        gateway, _ = await setup()
        gc.collect()
        gc.disable()
        try:
            for close in (False, True):
                client = await Client.connect(gateway.port)
                for _ in range(3):
                    assert (await client.request("GET", "/")).status == 200
                if close:
                    stream = await open_stream(gateway.port)
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                    while await stream.receive_some(65536):
                        pass
                    await stream.aclose()
                await client.aclose()
            while gateway.serving[0]:
                await trio.sleep(0.01)
            left = [o for o in gc.get_objects() if isinstance(o, HttpConn)]
            assert left == []
        finally:
            gc.enable()


async def test_dead_pooled_connection_is_retried_for_idempotent_methods(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        client = await Client.connect(gateway.port)
        assert (await client.request("GET", "/flaky")).status == 200
        # The pooled connection looks alive, but the node closes it on the next request.
        reply = await client.request("GET", "/flaky")
        assert reply.status == 200
        assert node.connections == 2
        # A POST is not retried: the node may have acted on it.
        reply = await client.request("POST", "/flaky", body=b"x")
        assert reply.status == 502
        assert error_of(reply.body)["status"] == 502
        await client.aclose()
        assert_no_active(gateway)


async def test_pipelined_requests_are_answered_in_order(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        data = (
            b"".join(b"GET /p/%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(4))
            + b"POST /p/4 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
        responses = parse_responses(await raw(gateway.port, data))
        assert [json.loads(body)["target"] for _, body in responses] == [
            f"/p/{i}" for i in range(5)
        ]
        assert json.loads(responses[-1][1])["body_len"] == 3


async def test_curl_keepalive_and_head(setup: Setup) -> None:
    with trio.fail_after(20):
        gateway, (node,) = await setup()
        base = gateway.base
        code, out, err = await curl("-v", f"{base}/a", f"{base}/b")
        assert code == 0, err
        assert b"Re-using existing connection" in err
        assert out.count(b'"method": "GET"') == 2
        code, out, err = await curl("-I", f"{base}/big/12345")
        assert code == 0, err
        assert b"content-length: 12345" in out.lower()
        assert node.connections == 1


# --------------------------------------------------------------------------------------------
# Bodies.


async def test_large_bodies_both_ways(setup: Setup) -> None:
    with trio.fail_after(30):
        gateway, _ = await setup()
        client = await Client.connect(gateway.port)
        size = 5 * 1024 * 1024
        reply = await client.request("GET", f"/big/{size}")
        assert reply.status == 200
        assert reply.header(b"content-length") == str(size).encode()
        assert reply.body == pattern(size)
        reply = await client.request("GET", f"/chunked/{size}")
        assert reply.header(b"transfer-encoding") == b"chunked"
        assert reply.body == pattern(size)
        upload = pattern(size)
        reply = await client.request("PUT", "/upload", body=upload)
        assert reply.json()["body_len"] == size
        assert reply.json()["body_sha"] == hashlib.sha256(upload).hexdigest()
        reply = await client.request("POST", "/echo", body=upload)
        assert reply.body == upload
        await client.aclose()


async def test_chunked_request_body(setup: Setup, tmp_path: Any) -> None:
    with trio.fail_after(20):
        gateway, (node,) = await setup()
        path = tmp_path / "up.bin"
        data = pattern(300_000)
        path.write_bytes(data)
        code, out, err = await curl(
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{path}",
            f"{gateway.base}/upload",
        )
        assert code == 0, err
        assert json.loads(out)["body_sha"] == hashlib.sha256(data).hexdigest()
        assert node.requests[-1].header(b"transfer-encoding") == b"chunked"


async def test_chunked_response_to_http10_client(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        data = await raw(gateway.port, b"GET /chunked/25000 HTTP/1.0\r\nHost: h\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        assert body == pattern(25000)


async def test_head_and_204(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        client = await Client.connect(gateway.port)
        reply = await client.request("HEAD", "/big/777")
        assert reply.status == 200
        assert reply.header(b"content-length") == b"777"
        assert reply.body == b""
        reply = await client.request("GET", "/status/204")
        assert reply.status == 204
        assert reply.body == b""
        assert (await client.request("GET", "/still-alive")).status == 200
        await client.aclose()


async def test_expect_100_continue(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        stream = await open_stream(gateway.port)
        async with stream:
            await stream.send_all(
                b"POST /continue HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            got = b""
            while b"\r\n\r\n" not in got:
                got += await stream.receive_some(1000)
            assert got.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"hello")
            rest = got.partition(b"\r\n\r\n")[2]
            reader = ResponseReader()
            reader.feed(rest)
            head = reader.read_head()
            while head is None:
                reader.feed(await stream.receive_some(1000))
                head = reader.read_head()
            assert head.status == 200
            body = b""
            while not reader.done:
                piece = reader.read_body()
                if piece is None:
                    reader.feed(await stream.receive_some(1000))
                else:
                    body += piece
            assert json.loads(body)["body_len"] == 5


async def test_node_answers_before_the_body(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        stream = await open_stream(gateway.port)
        async with stream:
            await stream.send_all(
                b"POST /reject HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                b"Content-Length: 100000000\r\n\r\n"
            )
            got = b""
            while chunk := await stream.receive_some(1000):
                got += chunk
        head, _ = one_response(got)
        assert head.status == 413
        assert (b"connection", b"close") in head.headers
        assert_no_active(gateway)


async def test_response_cut_short_closes_the_client(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        data = await raw(gateway.port, b"GET /cut HTTP/1.1\r\nHost: h\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"content-length: 1000" in head.lower()
        assert body == b"0123456789"  # then the connection closed
        assert_no_active(gateway)


# --------------------------------------------------------------------------------------------
# WebSocket (Upgrade).


async def test_websocket_upgrade_becomes_a_relay(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        stream = await open_stream(gateway.port)
        async with stream:
            await stream.send_all(
                b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\nearly"
            )
            got = b""
            while b"EARLY" not in got:
                got += await stream.receive_some(1000)
            head, _, rest = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"upgrade: websocket" in head.lower()
            assert b"connection: upgrade" in head.lower()
            assert rest == b"EARLY"
            await stream.send_all(b"ping")
            got = b""
            while got != b"PING":
                got += await stream.receive_some(1000)
            if isinstance(stream, trio.SocketStream):  # TLS cannot half-close
                await stream.send_eof()
                assert await stream.receive_some(1000) == b""
        seen = node.requests[-1]
        assert seen.header(b"upgrade") == b"websocket"
        assert seen.header(b"sec-websocket-key") == b"abc"
        with trio.fail_after(5):
            while any(n.active for n in gateway.upstream().all_nodes()):
                await trio.sleep(0.01)
        assert gateway.stats.requests[("default", 101)] == 1  # logged when the relay ends


async def test_idle_upgraded_connection_is_closed(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup(upstream_options={"idle_timeout": 0.3})
        data = await raw(
            gateway.port,
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        assert data.startswith(b"HTTP/1.1 101 ")  # ... and then closed after 0.3 s of silence
        with trio.fail_after(5):
            while any(n.active for n in gateway.upstream().all_nodes()):
                await trio.sleep(0.01)


# --------------------------------------------------------------------------------------------
# Smuggling and malformed requests: refused, and nothing reaches any node.

SMUGGLING = [
    (
        "CL.TE",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nG",
        400,
    ),
    (
        "TE.CL",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        400,
    ),
    (
        "two lengths",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    (
        "list length",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\nabcd",
        400,
    ),
    (
        "TE identity",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "TE obfuscated",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "space before colon",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "obs-fold",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: a\r\n b\r\n\r\n",
        400,
    ),
    (
        "obs-fold TE",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "bad chunk size",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "negative length",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
        400,
    ),
    ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("no host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("bad request line", b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("NUL in header", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    (
        "dot segments",
        b"GET /a/../../etc/passwd HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        400,
    ),
    ("encoded dots", b"GET /a/%2e%2e/b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 400),
    ("encoded slash", b"GET /a%2fb HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 400),
    ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 400),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    ("head too large", b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
]


@pytest.mark.parametrize(("name", "data", "status"), SMUGGLING, ids=[s[0] for s in SMUGGLING])
async def test_malformed_requests_never_reach_a_node(
    setup: Setup, name: str, data: bytes, status: int
) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        got = await raw(gateway.port, data)
        head, body = one_response(got)
        assert head.status == status, (name, got[:300])
        assert error_of(body)["status"] == status
        assert node.raw == b""
        assert node.connections == 0
        assert sum(gateway.stats.requests.values()) == 1


async def test_refusing_obs_fold_leaves_h11_as_it_is(setup: Setup) -> None:
    """Folded client heads get 400 (above), and h11 keeps unfolding for everyone else in the
    process (the health checker, the admin endpoints) after client traffic."""
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        got = await raw(gateway.port, b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n")
        head, _ = one_response(got)
        assert head.status == 400
        assert node.connections == 0
    assert h11._readers._obsolete_line_fold.__module__ == "h11._readers"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert (b"x", b"a b") in list(event.headers)


async def test_bad_chunk_after_the_head_went_out_aborts_the_node_request(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup()
        stream = await open_stream(gateway.port)
        async with stream:
            await stream.send_all(
                b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n"
            )
            while b"abc" not in node.raw:
                await trio.sleep(0.01)
            await stream.send_all(b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n")
            got = b""
            while chunk := await stream.receive_some(1000):
                got += chunk
        head, _ = one_response(got)
        assert head.status == 400
        assert b"/smuggled" not in node.raw
        assert node.requests == []  # the node never saw a complete request
        assert_no_active(gateway)


# --------------------------------------------------------------------------------------------
# Gateway errors: statuses and JSON bodies.


async def test_rate_limit_429(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup(rate_limit=1, rate_limit_burst=2)
        client = await Client.connect(gateway.port)
        statuses = [(await client.request("GET", "/r")).status for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        reply = await client.request("GET", "/r")
        assert error_of(reply.body) == {"error": "rate limit exceeded", "status": 429}
        assert len(node.requests) == 2
        assert gateway.stats.requests[("default", 429)] == 3
        await client.aclose()


async def test_404_without_fallback(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup(fallback=None, routes=[RouteConfig(path="/only", upstream="web")])
        client = await Client.connect(gateway.port)
        assert (await client.request("GET", "/only")).status == 200
        reply = await client.request("GET", "/other")
        assert reply.status == 404
        assert (await client.request("GET", "/only")).status == 200  # still kept alive
        await client.aclose()


async def test_502_when_every_connect_fails(setup: Setup) -> None:
    dead = SocketAddress("127.0.0.1", free_port())
    with trio.fail_after(10):
        upstream = upstream_runtime("web", [dead], retries=2)
        gateway, _ = await setup(nodes=0, upstreams={"web": upstream})
        data = await raw(gateway.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        head, body = one_response(data)
        assert head.status == 502
        assert error_of(body)["status"] == 502
        assert "connect attempt" in error_of(body)["error"]


async def test_502_for_a_broken_response_and_a_dropped_request(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        client = await Client.connect(gateway.port)
        reply = await client.request("GET", "/garbage")
        assert reply.status == 502
        reply = await client.request("GET", "/drop")
        assert reply.status == 502
        assert (await client.request("GET", "/fine")).status == 200
        await client.aclose()
        assert_no_active(gateway)


async def test_503_when_no_node_is_healthy(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup()
        for node in gateway.upstream().nodes:
            node.healthy = False
        client = await Client.connect(gateway.port)
        reply = await client.request("GET", "/")
        assert reply.status == 503
        assert error_of(reply.body)["status"] == 503
        await client.aclose()


async def test_504_when_the_node_is_slow(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup(upstream_options={"response_timeout": 0.3})
        data = await raw(gateway.port, b"GET /slow/30 HTTP/1.1\r\nHost: h\r\n\r\n")
        head, body = one_response(data)
        assert head.status == 504
        assert error_of(body)["status"] == 504
        assert gateway.stats.requests[("default", 504)] == 1
        assert_no_active(gateway)


async def test_408_for_a_slow_head(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup(header_timeout=0.3)
        stream = await open_stream(gateway.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: h\r\n")  # never finished
            got = b""
            while chunk := await stream.receive_some(1000):
                got += chunk
        head, body = one_response(got)
        assert head.status == 408
        assert error_of(body)["status"] == 408
        assert node.raw == b""
        # A connection that sends nothing at all is closed without an answer.
        assert await raw(gateway.port, b"") == b""


async def test_408_for_a_pipelined_head_left_unfinished(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup(header_timeout=0.3)
        got = await raw(
            gateway.port, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n"
        )
        assert [head.status for head, _ in parse_responses(got)] == [200, 408]
        assert [seen.target for seen in node.requests] == [b"/a"]


async def test_keepalive_idle_timeout_and_draining(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup(idle_timeout=0.3)
        client = await Client.connect(gateway.port)
        assert (await client.request("GET", "/")).status == 200
        assert await client.stream.receive_some(100) == b""  # closed after 0.3 s idle
        await client.aclose()
        client = await Client.connect(gateway.port)
        assert (await client.request("GET", "/")).status == 200
        gateway.listener.draining = True
        assert await client.stream.receive_some(100) == b""  # idle: closed while draining
        await client.aclose()
        client = await Client.connect(gateway.port)
        reply = await client.request("GET", "/")
        assert reply.header(b"connection") == b"close"  # busy: answered, then closed
        await client.aclose()


async def test_proxy_protocol_toward_nodes(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, (node,) = await setup(
            node_options={"proxy_protocol": True}, upstream_options={"proxy_protocol": "v1"}
        )
        client = await Client.connect(gateway.port)
        tcp = client.stream
        if isinstance(tcp, trio.SSLStream):
            tcp = tcp.transport_stream
        assert isinstance(tcp, trio.SocketStream)
        local_port = tcp.socket.getsockname()[1]
        assert (await client.request("GET", "/a")).status == 200
        assert (await client.request("GET", "/b")).status == 200  # same private connection
        await client.aclose()
        client = await Client.connect(gateway.port)
        assert (await client.request("GET", "/c")).status == 200  # not pooled: a new one
        await client.aclose()
        assert node.connections == 2
        assert node.proxy_lines[0] == (
            f"PROXY TCP4 127.0.0.1 127.0.0.1 {local_port} {gateway.port}\r\n".encode()
        )


async def test_node_active_counts_only_requests_in_flight(setup: Setup) -> None:
    with trio.fail_after(10):
        gateway, _ = await setup(nodes=2)
        clients = [await Client.connect(gateway.port) for _ in range(4)]
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.request, "GET", "/slow/0.3")
            with trio.fail_after(5):
                while sum(n.active for n in gateway.upstream().nodes) < 4:
                    await trio.sleep(0.01)
            assert [n.active for n in gateway.upstream().nodes] == [2, 2]
        assert_no_active(gateway)
        for client in clients:
            await client.aclose()


async def test_tls_toward_nodes(setup: Setup, tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("node.internal")
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            node = Node()
            node.ssl_context = server_context
            await node.start(nursery)
            good = upstream_runtime(
                "good",
                [node.address],
                tls=UpstreamTLSConfig(ca=str(ca_path), server_name="node.internal"),
            )
            wrong_name = upstream_runtime(
                "bad",
                [node.address],
                tls=UpstreamTLSConfig(ca=str(ca_path), server_name="other.internal"),
                retries=1,
            )
            unverified = upstream_runtime(
                "insecure", [node.address], tls=UpstreamTLSConfig(verify=False)
            )
            gateway = await start_gateway(
                nursery,
                {"good": good, "bad": wrong_name, "insecure": unverified},
                fallback=None,
                routes=[
                    RouteConfig(path="/good/{p+}", upstream="good"),
                    RouteConfig(path="/bad/{p+}", upstream="bad"),
                    RouteConfig(path="/insecure/{p+}", upstream="insecure"),
                ],
            )
            client = await Client.connect(gateway.port)
            assert (await client.request("GET", "/good/x")).status == 200
            assert (await client.request("GET", "/good/y")).json()["connection"] == 0
            reply = await client.request("GET", "/bad/x")
            assert reply.status == 502
            assert "TLS" in error_of(reply.body)["error"]
            assert (await client.request("GET", "/insecure/x")).status == 200
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_many_concurrent_clients(setup: Setup) -> None:
    with trio.fail_after(20):
        gateway, nodes = await setup(nodes=2)
        results: list[int] = []

        async def one(i: int) -> None:
            client = await Client.connect(gateway.port)
            for j in range(5):
                reply = await client.request("POST", f"/c/{i}/{j}", body=pattern(1000 + i))
                assert reply.json()["target"] == f"/c/{i}/{j}"
                results.append(reply.status)
            await client.aclose()

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(one, i)
        assert results == [200] * 150
        assert all(n.requests for n in nodes)
        assert_no_active(gateway)
