"""Header rewriting between clients and nodes (l4gw.http.headers): pure functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from l4gw.http.headers import (
    connection_tokens,
    is_upgrade_request,
    request_headers,
    response_headers,
)

H = list[tuple[bytes, bytes]]


def names(headers: H) -> list[bytes]:
    return [name for name, _ in headers]


def get(headers: H, name: bytes) -> list[bytes]:
    return [value for n, value in headers if n == name]


def test_hop_by_hop_removed_from_requests() -> None:
    client: H = [
        (b"host", b"api.example.com"),
        (b"connection", b"keep-alive, X-Secret"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"trailer", b"x"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"proxy-connection", b"keep-alive"),
        (b"proxy", b"http://evil"),
        (b"x-secret", b"1"),
        (b"proxyish", b"kept"),
        (b"accept", b"*/*"),
    ]
    out, client_host = request_headers(client, client_ip="10.0.0.1", tls=False)
    assert client_host == b"api.example.com"
    assert names(out) == [
        b"host",
        b"proxyish",
        b"accept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    ]


def test_connection_cannot_remove_protected_headers() -> None:
    client: H = [
        (b"host", b"h"),
        (b"content-length", b"3"),
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"connection", b"host, content-length, x-forwarded-for, x-forwarded-proto"),
    ]
    out, _ = request_headers(client, client_ip="10.0.0.1", tls=True)
    assert get(out, b"host") == [b"h"]
    assert get(out, b"content-length") == [b"3"]
    assert get(out, b"x-forwarded-for") == [b"1.1.1.1, 10.0.0.1"]
    assert get(out, b"x-forwarded-proto") == [b"https"]


def test_forwarded_headers() -> None:
    client: H = [
        (b"host", b"a.example:8080"),
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"spoofed"),
    ]
    out, _ = request_headers(client, client_ip="::1", tls=False)
    assert get(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, ::1"]
    assert get(out, b"x-forwarded-proto") == [b"http"]
    assert get(out, b"x-forwarded-host") == [b"a.example:8080"]


def test_host_precedence() -> None:
    client: H = [(b"host", b"public.example")]
    out, _ = request_headers(client, client_ip="1.2.3.4", tls=False, host=b"internal.svc")
    assert out[0] == (b"host", b"internal.svc")
    assert get(out, b"x-forwarded-host") == [b"public.example"]
    out, _ = request_headers(client, client_ip="1.2.3.4", tls=False)
    assert out[0] == (b"host", b"public.example")
    out, host = request_headers([], client_ip="1.2.3.4", tls=False)
    assert host is None
    assert out[0] == (b"host", b"")  # filled in with the node's address by the proxy
    assert get(out, b"x-forwarded-host") == []


def test_chunked_framing_and_upgrade() -> None:
    client: H = [
        (b"host", b"h"),
        (b"transfer-encoding", b"chunked"),
    ]
    out, _ = request_headers(client, client_ip="1.2.3.4", tls=False, chunked=True)
    assert get(out, b"transfer-encoding") == [b"chunked"]
    ws: H = [
        (b"host", b"h"),
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-key", b"k"),
    ]
    assert is_upgrade_request(ws)
    assert not is_upgrade_request([(b"upgrade", b"websocket")])
    assert not is_upgrade_request([(b"connection", b"upgrade")])
    out, _ = request_headers(ws, client_ip="1.2.3.4", tls=False, upgrade=True)
    assert get(out, b"connection") == [b"upgrade"]
    assert get(out, b"upgrade") == [b"websocket"]
    assert get(out, b"sec-websocket-key") == [b"k"]
    out, _ = request_headers(ws, client_ip="1.2.3.4", tls=False, upgrade=False)
    assert get(out, b"upgrade") == []


def test_response_headers() -> None:
    node: H = [
        (b"content-type", b"text/plain"),
        (b"content-length", b"10"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"close, X-Internal"),
        (b"keep-alive", b"timeout=5"),
        (b"x-internal", b"1"),
        (b"proxy-authenticate", b"Basic"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"upgrade", b"h2c"),
    ]
    assert response_headers(node) == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    switched = response_headers(
        [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", b"x")],
        upgrade=True,
    )
    assert switched == [
        (b"upgrade", b"websocket"),
        (b"sec-websocket-accept", b"x"),
        (b"connection", b"upgrade"),
    ]


def test_connection_tokens() -> None:
    assert connection_tokens([(b"connection", b" Close ,, X-A"), (b"connection", b"b")]) == {
        b"close",
        b"x-a",
        b"b",
    }


HEADER_NAMES = st.sampled_from(
    [
        b"host",
        b"connection",
        b"keep-alive",
        b"x-a",
        b"x-b",
        b"te",
        b"upgrade",
        b"proxy-x",
        b"x-forwarded-for",
        b"content-length",
        b"accept",
    ]
)
HEADER_VALUES = st.sampled_from([b"x-a", b"close", b"x-b, keep-alive", b"1", b"host"])


@given(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=10))
def test_request_headers_invariants(client: H) -> None:
    out, _ = request_headers(client, client_ip="10.1.2.3", tls=False)
    tokens = connection_tokens(client)
    assert sum(1 for n in names(out) if n == b"host") == 1
    assert names(out)[0] == b"host"
    for name in names(out):
        assert name not in (b"connection", b"keep-alive", b"te", b"upgrade")
        assert not name.startswith(b"proxy-")
        if name not in (b"host", b"content-length") and not name.startswith(b"x-forwarded"):
            assert name not in tokens
    assert get(out, b"x-forwarded-for")[0].endswith(b"10.1.2.3")
    assert len(get(out, b"x-forwarded-for")) == 1
