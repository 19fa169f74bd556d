"""The HTTP exchange played without sockets or a clock: events in, commands and bytes out.

Each test drives :class:`l4gw.http.exchange.Exchange` the way both drivers do (the reactor's
fast path and the task) and asserts the command bits it answers, the bytes it asks to send
to the node and to the client, its phase and deadline, and the access record. Time is the
``now`` argument of each event; a timeout is an ``expired`` event.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.acl import BackendAuthorization, SourceACL
from l4gw.core.config import HealthConfig, ListenerConfig, NodeConfig, RouteConfig, UpstreamConfig
from l4gw.core.netaddr import SocketAddress, parse_network
from l4gw.core.ratelimit import RateLimiter
from l4gw.core.runtime import ListenerRuntime, ListenerStats
from l4gw.core.upstream import UpstreamRuntime
from l4gw.http import exchange as ex
from l4gw.http import timeouts
from l4gw.http.exchange import Exchange
from l4gw.http.responses import DEFAULT_KEEPALIVE
from l4gw.http.routes import RouteTable, route_table
from l4gw.http.wire import ResponseReader

NODE = SocketAddress("192.0.2.10", 8080)
HEADER_TIMEOUT = 10.0
RESPONSE_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0


@attrs.define
class Conn:
    """The client connection as the exchange sees it."""

    listener: ListenerRuntime
    client_ip: str = "198.51.100.7"
    tls: bool = False
    body_done: bool = True
    table: RouteTable | None = None

    def route_table(self) -> RouteTable:
        if self.table is None:
            self.table = route_table(self.listener.config)
        return self.table

    def request_body_done(self) -> bool:
        return self.body_done


@attrs.define
class Node:
    """A node connection: its response parser, address and request count."""

    key: str = str(NODE)
    requests: int = 0
    reader: ResponseReader = attrs.field(factory=ResponseReader)

    def receive(self, data: bytes) -> None:
        if data:
            self.reader.feed(data)
        else:
            self.reader.feed_eof()


def make_conn(
    *,
    routes: Sequence[RouteConfig] = (),
    upstream: dict[str, Any] | None = None,
    deny: str | None = None,
    rate: float = 0.0,
    running: bool = True,
    fallback: str | None = "web",
    **listener: Any,
) -> Conn:
    up_config = UpstreamConfig(
        name="web",
        nodes=(NodeConfig(NODE),),
        health=HealthConfig(fail_open=False),
        response_timeout=RESPONSE_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
        **(upstream or {}),
    )
    config = ListenerConfig(
        name="gw",
        listen=SocketAddress("127.0.0.1", 8080),
        mode="http",
        upstream=fallback,
        routes=tuple(routes),
        header_timeout=HEADER_TIMEOUT,
        rate_limit=rate,
        rate_limit_burst=1 if rate else 0,
        **listener,
    )
    upstreams = {"web": UpstreamRuntime(up_config, BackendAuthorization())} if running else {}
    runtime = ListenerRuntime(
        config=config,
        stats=ListenerStats(),
        acl=SourceACL((), (parse_network(deny),) if deny else ()),
        rate_limiter=RateLimiter(rate, 1 if rate else 0),
        upstreams=upstreams,
    )
    return Conn(runtime)


def begin(
    exchange: Exchange,
    method: bytes = b"GET",
    target: bytes = b"/x",
    *,
    now: float = 1.0,
    host: bytes | None = b"example.test",
    headers: Sequence[tuple[bytes, bytes]] = (),
    http11: bool = True,
    close: bool = False,
    **kwargs: Any,
) -> int:
    all_headers = [(b"host", host)] if host is not None else []
    all_headers += list(headers)
    return exchange.begin(
        now, method, target, host, all_headers, http11=http11, close=close, **kwargs
    )


def sent_to_client(exchange: Exchange) -> bytes:
    data = b"".join(exchange.out)
    exchange.out.clear()
    return data


def started(conn: Conn | None = None, **kwargs: Any) -> tuple[Exchange, Node]:
    """An exchange whose GET went to a fresh node connection."""
    exchange = Exchange(conn or make_conn(), 0.0)
    assert begin(exchange, **kwargs) == ex.CONNECT
    node = Node()
    assert exchange.node_ready(node, 2.0) == ex.SEND_NODE | ex.READ_NODE
    return exchange, node


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


# -- the ordinary exchange ---------------------------------------------------------------------


def test_get_is_forwarded_and_answered() -> None:
    exchange, node = started()
    head = exchange.node_data
    assert head.startswith(b"GET /x HTTP/1.1\r\nhost: example.test\r\n")
    assert b"x-forwarded-for: 198.51.100.7\r\n" in head
    assert b"x-forwarded-proto: http\r\n" in head
    assert exchange.phase == timeouts.RESPONSE
    assert exchange.deadline == 2.0 + RESPONSE_TIMEOUT
    assert node.requests == 1

    node.receive(OK)
    cmd = exchange.node_bytes(3.0)
    assert cmd == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert exchange.reuse_node and exchange.keep
    out = sent_to_client(exchange)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.endswith(b"\r\n\r\nhi")
    assert exchange.record.status == 200
    assert exchange.record.node == str(NODE)
    assert exchange.record.method == "GET" and exchange.record.path == "/x"
    assert exchange.phase == timeouts.BUSY and exchange.deadline == math.inf


def test_response_in_pieces_moves_the_body_deadline() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert exchange.node_bytes(3.0) == ex.SEND_CLIENT | ex.READ_NODE
    assert exchange.phase == timeouts.BODY
    assert exchange.deadline == 3.0 + IDLE_TIMEOUT
    assert exchange.responded
    sent_to_client(exchange)
    node.receive(b"c")
    assert exchange.node_bytes(5.0) == ex.SEND_CLIENT | ex.READ_NODE
    assert exchange.deadline == 5.0 + IDLE_TIMEOUT
    assert sent_to_client(exchange) == b"c"
    node.receive(b"d")
    assert exchange.node_bytes(6.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert sent_to_client(exchange) == b"d"


def test_a_large_body_is_written_in_parts() -> None:
    exchange, node = started()
    size = 3 * ex.FLUSH_AT
    node.receive(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size)
    cmd = exchange.node_bytes(3.0)
    written = 0
    while cmd == ex.SEND_CLIENT | ex.PUMP:
        written += len(sent_to_client(exchange))
        cmd = exchange.pump(3.0)
    assert cmd == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    written += len(sent_to_client(exchange))
    assert written > size


def test_chunked_response_to_an_http10_client_closes() -> None:
    exchange, node = started(http11=False, host=None)
    # No Host from the HTTP/1.0 client: the node's address.
    assert b"\r\nhost: 192.0.2.10:8080\r\n" in exchange.node_data
    node.receive(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    out = sent_to_client(exchange)
    assert b"connection: close" in out.lower() and out.endswith(b"\r\n\r\nhi")
    assert not exchange.keep
    assert exchange.reuse_node  # the node's connection is fine


def test_interim_responses_go_out_before_the_final_one() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.SEND_CLIENT | ex.READ_NODE
    assert sent_to_client(exchange).startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert exchange.phase == timeouts.RESPONSE  # still waiting for the response
    node.receive(OK)
    assert exchange.node_bytes(4.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert sent_to_client(exchange).startswith(b"HTTP/1.1 200 OK\r\n")


def test_interim_responses_are_not_sent_to_http10_clients() -> None:
    exchange, node = started(http11=False)
    node.receive(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.READ_NODE
    assert exchange.out == []


def test_head_request_ends_with_the_head() -> None:
    exchange, node = started(method=b"HEAD")
    node.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert b"content-length: 10" in sent_to_client(exchange).lower()
    assert exchange.keep and exchange.reuse_node


def test_connection_close_from_the_client() -> None:
    exchange, node = started(close=True)
    node.receive(OK)
    assert exchange.node_bytes(3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert b"connection: close" in sent_to_client(exchange).lower()
    assert not exchange.keep and exchange.reuse_node


def test_connection_close_from_the_node() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
    assert exchange.node_bytes(3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert exchange.keep and not exchange.reuse_node


def test_draining_listener_closes_after_the_response() -> None:
    conn = make_conn()
    exchange, node = started(conn)
    conn.listener.draining = True
    node.receive(OK)
    exchange.node_bytes(3.0)
    assert b"connection: close" in sent_to_client(exchange).lower()
    assert not exchange.keep


def test_route_rewrites_path_and_host() -> None:
    conn = make_conn(
        routes=[
            RouteConfig(
                path="/foo/{proxy+}", upstream="web", rewrite="/bar/{proxy}", host_header="in.test"
            )
        ]
    )
    exchange, _ = started(conn, target=b"/foo/a/b?q=1")
    assert exchange.node_data.startswith(b"GET /bar/a/b?q=1 HTTP/1.1\r\nhost: in.test\r\n")
    assert exchange.record.route == "/foo/{proxy+}"  # the template names the route
    assert exchange.record.upstream_path == "/bar/a/b?q=1"


def test_next_request_phase() -> None:
    exchange, node = started()
    node.receive(OK)
    exchange.node_bytes(3.0)
    exchange.next_request(4.0, pipelined=False)
    assert exchange.phase == timeouts.IDLE
    exchange.head_started(5.0)
    assert (exchange.phase, exchange.deadline) == (timeouts.HEAD, 5.0 + HEADER_TIMEOUT)
    assert begin(exchange, now=6.0) == ex.CONNECT
    assert exchange.record.started == 5.0  # the request's time counts from its first byte
    exchange.next_request(7.0, pipelined=True)
    assert (exchange.phase, exchange.deadline) == (timeouts.HEAD, 7.0 + HEADER_TIMEOUT)


# -- answers made by the gateway ------------------------------------------------------------


def error_of(exchange: Exchange) -> tuple[int, bool]:
    out = sent_to_client(exchange)
    status = int(out.split(b" ", 2)[1])
    return status, b"connection: close" not in out.lower()


def test_no_route_is_404_and_keeps_the_connection() -> None:
    exchange = Exchange(make_conn(fallback=None), 0.0)
    assert begin(exchange) == ex.SEND_CLIENT | ex.DONE
    assert error_of(exchange) == (404, True)
    assert exchange.keep and exchange.record.route == "none"
    assert exchange.phase == timeouts.SEND


def test_denied_source_is_403_and_closes() -> None:
    exchange = Exchange(make_conn(deny="198.51.100.0/24"), 0.0)
    assert begin(exchange) == ex.SEND_CLIENT | ex.DONE
    assert error_of(exchange) == (403, False)
    assert exchange.denied and not exchange.keep


def test_rate_limit_is_429() -> None:
    exchange = Exchange(make_conn(rate=0.001), 0.0)
    assert begin(exchange, now=1.0) == ex.CONNECT
    assert begin(exchange, now=1.5) == ex.SEND_CLIENT | ex.DONE
    assert error_of(exchange) == (429, True)


def test_upstream_not_running_is_503() -> None:
    exchange = Exchange(make_conn(running=False), 0.0)
    assert begin(exchange) == ex.SEND_CLIENT | ex.DONE
    assert error_of(exchange) == (503, True)


def test_the_drivers_protocol_refusal_comes_after_acl_and_rate() -> None:
    exchange = Exchange(make_conn(), 0.0)
    cmd = begin(exchange, method=b"CONNECT", protocol=(405, "CONNECT is not supported", True))
    assert cmd == ex.SEND_CLIENT | ex.DONE
    assert error_of(exchange) == (405, False)
    denied = Exchange(make_conn(deny="0.0.0.0/0"), 0.0)
    begin(denied, protocol=(405, "CONNECT is not supported", True))
    assert error_of(denied)[0] == 403


def test_unread_body_closes_after_an_answer() -> None:
    conn = make_conn(running=False)
    conn.body_done = False
    exchange = Exchange(conn, 0.0)
    begin(exchange)
    assert error_of(exchange) == (503, False)
    assert not exchange.keep


def test_connect_failures_are_answered() -> None:
    exchange = Exchange(make_conn(), 0.0)
    assert begin(exchange) == ex.CONNECT
    assert exchange.connect_failed(503, "upstream web: no node available", 2.0) == (
        ex.SEND_CLIENT | ex.DONE
    )
    assert error_of(exchange) == (503, True)
    assert exchange.record.status == 503


def test_malformed_and_oversized_heads() -> None:
    exchange = Exchange(make_conn(), 0.0)
    assert exchange.refuse_head(400, "malformed request: x", 1.0) == ex.SEND_CLIENT | ex.DONE
    assert error_of(exchange) == (400, False)
    assert exchange.record.method is None and exchange.record.status == 400
    cmd = exchange.refuse_head(431, "too large", 1.0, method=b"GET", target=b"/big")
    assert cmd == ex.SEND_CLIENT | ex.DONE
    assert exchange.record.method == "GET" and exchange.record.path == "/big"


def test_handoff_for_proxy_protocol_upstreams_has_no_effect() -> None:
    conn = make_conn(upstream={"proxy_protocol": "v1"}, rate=0.001)
    exchange = Exchange(conn, 0.0)
    assert begin(exchange, reactor=True) == ex.HANDOFF
    # No rate-limit token was taken: the task makes the same request.
    assert begin(exchange) == ex.CONNECT


# -- failures toward the node ---------------------------------------------------------------


def test_dead_reused_connection_is_retried_once_on_a_fresh_one() -> None:
    exchange = Exchange(make_conn(), 0.0)
    begin(exchange)
    reused = Node(requests=3)
    exchange.node_ready(reused, 2.0)
    reused.receive(b"")
    cmd = exchange.node_eof(3.0)
    assert cmd == ex.RELEASE | ex.RETRY | ex.CONNECT
    assert exchange.fresh and not exchange.reuse_node
    assert exchange.phase == timeouts.BUSY
    assert "node 192.0.2.10:8080" in exchange.retry_reason
    exchange.released()
    fresh = Node()
    assert exchange.node_ready(fresh, 4.0) == ex.SEND_NODE | ex.READ_NODE
    fresh.receive(OK)
    assert exchange.node_bytes(5.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE


def test_a_fresh_connection_that_fails_is_502() -> None:
    exchange, _ = started()
    cmd = exchange.node_read_failed("Connection reset by peer", 3.0)
    assert cmd == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    out = sent_to_client(exchange)
    assert out.startswith(b"HTTP/1.1 502 ")
    assert b"node 192.0.2.10:8080: Connection reset by peer" in out
    assert not exchange.reuse_node
    # The client has the listener's idle timeout to take the answer.
    keepalive = exchange.conn.listener.config.idle_timeout or DEFAULT_KEEPALIVE
    assert (exchange.phase, exchange.deadline) == (timeouts.SEND, 3.0 + keepalive)


@pytest.mark.parametrize("method", [b"POST", b"PATCH"])
def test_non_idempotent_requests_are_not_retried(method: bytes) -> None:
    exchange = Exchange(make_conn(), 0.0)
    begin(exchange, method=method)
    node = Node(requests=1)
    exchange.node_ready(node, 2.0)
    assert exchange.node_send_failed("Broken pipe", 3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert b"sending failed (Broken pipe)" in sent_to_client(exchange)


def test_no_retry_once_the_node_sent_bytes() -> None:
    exchange = Exchange(make_conn(), 0.0)
    begin(exchange)
    node = Node(requests=1)
    exchange.node_ready(node, 2.0)
    node.receive(b"HTTP/1.1 200 O")
    assert exchange.node_bytes(3.0) == ex.READ_NODE
    node.receive(b"")
    assert exchange.node_eof(4.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert sent_to_client(exchange).startswith(b"HTTP/1.1 502 ")


def test_broken_response_head_is_502() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 abc\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert sent_to_client(exchange).startswith(b"HTTP/1.1 502 ")


def test_body_cut_short_closes_the_client_connection() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert exchange.node_bytes(3.0) == ex.SEND_CLIENT | ex.READ_NODE
    sent_to_client(exchange)
    node.receive(b"")
    assert exchange.node_eof(4.0) == ex.RELEASE | ex.DONE
    assert not exchange.keep and not exchange.reuse_node
    assert exchange.record.status == 200
    assert "response cut short" in exchange.record.reason


def test_unasked_switching_protocols_is_502() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    out = sent_to_client(exchange)
    assert out.startswith(b"HTTP/1.1 502 ") and b"node switched protocols unasked" in out


def test_asked_upgrade_switches() -> None:
    exchange = Exchange(make_conn(), 0.0)
    begin(
        exchange,
        headers=[(b"connection", b"upgrade"), (b"upgrade", b"websocket")],
        upgrade=True,
    )
    node = Node()
    exchange.node_ready(node, 2.0)
    assert b"upgrade: websocket" in exchange.node_data.lower()
    node.receive(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.SWITCH
    assert exchange.switch_head is not None and exchange.switch_head.status == 101
    assert exchange.record.status == 101 and exchange.phase == timeouts.BODY


# -- uploads --------------------------------------------------------------------------------


def test_streamed_upload_deadlines() -> None:
    exchange = Exchange(make_conn(), 0.0)
    begin(exchange, method=b"PUT", headers=[(b"content-length", b"100")])
    exchange.set_body([b"part"], False)
    assert not exchange.retryable
    node = Node(requests=2)
    assert exchange.node_ready(node, 2.0) == ex.SEND_NODE | ex.UPLOAD | ex.READ_NODE
    assert exchange.node_data.endswith(b"\r\n\r\npart")
    assert (exchange.phase, exchange.deadline) == (timeouts.UPLOAD, 2.0 + IDLE_TIMEOUT)
    exchange.upload_progress(5.0)
    assert exchange.deadline == 5.0 + IDLE_TIMEOUT
    exchange.upload_done(6.0)
    assert (exchange.phase, exchange.deadline) == (timeouts.RESPONSE, 6.0 + RESPONSE_TIMEOUT)
    node.receive(OK)
    assert exchange.node_bytes(7.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert exchange.keep and exchange.reuse_node


def test_early_answer_during_an_upload_closes_both() -> None:
    exchange = Exchange(make_conn(), 0.0)
    begin(exchange, method=b"POST", headers=[(b"content-length", b"100000")])
    exchange.set_body([], False)
    node = Node()
    exchange.node_ready(node, 2.0)
    node.receive(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert exchange.node_bytes(3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    assert b"connection: close" in sent_to_client(exchange).lower()
    assert not exchange.keep and not exchange.reuse_node
    assert exchange.record.status == 413


def test_a_failed_upload_is_never_retried() -> None:
    exchange = Exchange(make_conn(), 0.0)
    begin(exchange, method=b"PUT")
    exchange.set_body([], False)
    exchange.node_ready(Node(requests=5), 2.0)
    assert exchange.node_send_failed("Broken pipe", 3.0) == ex.RELEASE | ex.SEND_CLIENT | ex.DONE


# -- timeouts -------------------------------------------------------------------------------


def test_late_response_head_is_504() -> None:
    exchange, _ = started()
    cmd = exchange.expired(40.0)
    assert cmd == ex.RELEASE | ex.SEND_CLIENT | ex.DONE
    out = sent_to_client(exchange)
    assert out.startswith(b"HTTP/1.1 504 ") and b"node 192.0.2.10:8080 did not answer" in out
    assert not exchange.keep and not exchange.reuse_node


def test_late_body_closes_without_an_answer() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    exchange.node_bytes(3.0)
    sent_to_client(exchange)
    assert exchange.expired(100.0) == ex.RELEASE | ex.DONE
    assert exchange.out == [] and not exchange.keep


def test_idle_and_head_timeouts() -> None:
    exchange = Exchange(make_conn(), 0.0)
    exchange.idle(1.0)
    assert exchange.expired(100.0) == ex.DONE
    assert exchange.record.method is None  # nothing to log
    exchange = Exchange(make_conn(), 0.0)
    assert exchange.expired(11.0, head_started=True) == ex.SEND_CLIENT | ex.DONE
    assert error_of(exchange) == (408, False)
    assert exchange.record.status == 408
    exchange = Exchange(make_conn(), 0.0)
    assert exchange.expired(11.0) == ex.DONE  # a connection that sent nothing: closed


def test_client_gone_mid_response() -> None:
    exchange, node = started()
    node.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    exchange.node_bytes(3.0)
    assert exchange.client_gone() == ex.RELEASE | ex.DONE
    assert not exchange.keep and not exchange.reuse_node and exchange.out == []


# -- however the node's bytes are split ------------------------------------------------------


RESPONSES = [
    OK,
    b"HTTP/1.1 103 Early Hints\r\nLink: <x>\r\n\r\n" + OK,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
]


def play_response(response: bytes, cuts: list[int]) -> tuple[list[int], bytes, bool]:
    exchange, node = started()
    commands: list[int] = []
    out = b""
    bounds = sorted({0, *(c % (len(response) + 1) for c in cuts), len(response)})
    pieces = [response[a:b] for a, b in itertools.pairwise(bounds)] + [b""]
    for piece in pieces:
        node.receive(piece)
        cmd = exchange.node_bytes(3.0) if piece else exchange.node_eof(3.0)
        while cmd & ex.PUMP:
            out += sent_to_client(exchange)
            cmd = exchange.pump(3.0)
        commands.append(cmd)
        out += sent_to_client(exchange)
        if cmd & ex.DONE:
            break
    return commands, out, exchange.keep


def as_client_reads_it(out: bytes) -> tuple[list[tuple[int, list[Any]]], bytes]:
    """The responses' heads and the final body, as a client parses ``out`` (re-chunked bodies
    are chunked as the node's bytes came, so only the content can be compared)."""
    reader = ResponseReader()
    reader.feed(out)
    reader.feed_eof()
    heads = []
    while True:
        head = reader.read_head()
        assert head is not None
        heads.append((head.status, sorted(head.headers)))
        if head.status >= 200:
            break
    body = b""
    while not reader.done:
        data = reader.read_body()
        assert data is not None
        body += data
    return heads, body


@given(st.sampled_from(RESPONSES), st.lists(st.integers(min_value=0), max_size=8))
def test_any_split_of_the_response_gives_the_same_response(
    response: bytes, cuts: list[int]
) -> None:
    whole_commands, whole, keep = play_response(response, [])
    commands, out, split_keep = play_response(response, cuts)
    assert as_client_reads_it(out) == as_client_reads_it(whole)
    assert split_keep == keep
    assert commands[-1] == whole_commands[-1]
    assert all(cmd & ex.READ_NODE for cmd in commands[:-1])
