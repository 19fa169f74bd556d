"""The lean request-head parser against h11: whatever it takes, h11 takes the same way."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4gw.http.request import parse_request
from l4gw.http.responses import MAX_HEAD


def h11_parse(data: bytes) -> tuple[h11.Request, bytes, bytes] | None:
    """(request, body, bytes after the request) as h11 sees them, None if h11 refuses or
    needs more bytes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data)
    try:
        event = conn.next_event()
        if not isinstance(event, h11.Request):
            return None
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None
    except h11.RemoteProtocolError:
        return None
    return event_request(conn, data), body, conn.trailing_data[0]


def event_request(conn: h11.Connection, data: bytes) -> h11.Request:
    fresh = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    fresh.receive_data(data)
    event = fresh.next_event()
    assert isinstance(event, h11.Request)
    return event


def check_agrees(data: bytes) -> bool:
    """If the lean parser takes ``data``, h11 takes it with the same result. Returns whether
    the lean parser took it."""
    ours = parse_request(data, MAX_HEAD)
    if ours is None:
        return False
    theirs = h11_parse(data)
    assert theirs is not None, data
    request, body, rest = theirs
    assert ours.method == request.method
    assert ours.target == request.target
    assert ours.http11 == (request.http_version == b"1.1")
    assert ours.headers == list(request.headers)
    assert data[ours.body_start : ours.end] == body
    assert data[ours.end :] == rest
    hosts = [v for n, v in request.headers if n == b"host"]
    assert ours.host == (hosts[0] if hosts else None)
    tokens = {
        t.strip().lower() for n, v in request.headers if n == b"connection" for t in v.split(b",")
    }
    assert ours.close == (request.http_version != b"1.1" or b"close" in tokens)
    return True


COMMON = [
    # curl
    b"GET /foo/bar?x=1 HTTP/1.1\r\nHost: gw.example\r\nUser-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n\r\n",
    # wrk
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    # a browser-like GET
    b"GET /index.html HTTP/1.1\r\nHost: www.example.com\r\nConnection: keep-alive\r\n"
    b"Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.5\r\nCookie: a=b; c=d\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n\r\n",
    # a JSON POST with its body
    b"POST /api/items HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
    b'Content-Length: 13\r\n\r\n{"name": "x"}',
    # HTTP/1.0 without Host
    b"GET / HTTP/1.0\r\n\r\n",
    # Connection: close, odd spacing that is still valid
    b"DELETE /x HTTP/1.1\r\nhost:h\r\nConnection:\tKeep-Alive, close \r\n\r\n",
    # pipelined: the second request stays in the buffer
    b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n",
    # obs-text in a value
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xc3\xa9\r\n\r\n",
    # empty value
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\n\r\n",
]


@pytest.mark.parametrize("data", COMMON)
def test_common_requests_are_taken(data: bytes) -> None:
    assert check_agrees(data)


LEFT_TO_H11 = [
    b"GET / HTTP/1.1\r\nHost: h\r\n",  # incomplete
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12345",  # body not all here
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\nx",
    b"GET / HTTP/1.1\nHost: h\n\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",  # bare CR
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",  # obs-fold
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n",  # control character
    b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n: x\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",  # leading empty line: h11 copes
    b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n",  # too big
]


@pytest.mark.parametrize("data", LEFT_TO_H11)
def test_anything_unusual_is_left_to_h11(data: bytes) -> None:
    assert parse_request(data, MAX_HEAD) is None


# -- generated heads ---------------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
# Mostly valid value bytes, with a few hostile ones mixed in.
value_bytes = st.lists(
    st.one_of(
        st.integers(0x21, 0x7E),
        st.sampled_from([0x20, 0x09, 0x80, 0xC3, 0xFF]),
        st.sampled_from([0x00, 0x01, 0x0D, 0x0A, 0x7F]),
    ),
    max_size=20,
).map(bytes)
names = st.one_of(
    tokens,
    st.sampled_from(
        [
            b"Host",
            b"host",
            b"HOST",
            b"Content-Length",
            b"content-length",
            b"Connection",
            b"Transfer-Encoding",
            b"Expect",
            b"Upgrade",
            b"X-Forwarded-For",
        ]
    ),
    st.sampled_from([b"Bad Name", b"", b"N\x00", b"\x80"]),
)
header_lines = st.tuples(
    names,
    st.sampled_from([b":", b": ", b":\t", b" :", b":  "]),
    st.one_of(value_bytes, st.sampled_from([b"0", b"5", b"close", b"keep-alive", b"chunked"])),
    st.sampled_from([b"", b" ", b"\t"]),
).map(lambda t: t[0] + t[1] + t[2] + t[3])
targets = st.one_of(
    st.sampled_from([b"/", b"/a/b?c=d", b"*", b"http://h/x", b"/%2F..%2f"]),
    st.lists(st.integers(0x20, 0x80), min_size=1, max_size=12).map(bytes),
)
methods = st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"get"]), tokens)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1"])
VALID_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0"]
line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


clean_values = st.lists(
    st.one_of(st.integers(0x21, 0x7E), st.sampled_from([0x20, 0x09, 0x80, 0xFF])), max_size=20
).map(bytes)
clean_lines = st.tuples(
    st.one_of(tokens, st.sampled_from([b"Host", b"Content-Length", b"Connection", b"X-A"])),
    st.sampled_from([b":", b": ", b":\t"]),
    st.one_of(clean_values, st.sampled_from([b"0", b"3", b"close", b"keep-alive", b"h"])),
    st.sampled_from([b"", b" ", b"\t"]),
).map(lambda t: t[0] + t[1] + t[2] + t[3])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Request heads, most of them plausible, each with a few defects at most (a fully random
    head is almost never a request)."""
    hostile = draw(st.integers(0, 9)) < 3
    if hostile:
        end = draw(line_ends)
        line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
        lines = [line, *draw(st.lists(header_lines, max_size=8))]
    else:
        end = b"\r\n"
        method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]))
        line = method + b" " + draw(targets) + b" " + draw(st.sampled_from(VALID_VERSIONS))
        lines = [line, b"Host: h", *draw(st.lists(clean_lines, max_size=8))]
        lines = draw(st.permutations(lines[1:])) if draw(st.booleans()) else lines[1:]
        lines = [line, *lines]
    head = b"".join(item + (end if draw(st.booleans()) else b"\r\n") for item in lines)
    head += draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b""])) if hostile else b"\r\n"
    return head + draw(st.binary(max_size=12))


@settings(max_examples=3000, deadline=None)
@given(requests())
def test_generated_heads_agree_with_h11(data: bytes) -> None:
    check_agrees(data)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(tokens, value_bytes.filter(lambda v: v.strip(b" \t") == v)), max_size=6),
    st.binary(max_size=40),
)
def test_well_formed_requests_are_taken(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Plain requests are taken (not left to h11) whatever their extra headers."""
    deferred = {b"host", b"content-length", b"transfer-encoding", b"expect", b"upgrade"}
    headers = [(n, v) for n, v in headers if n.lower() not in deferred]
    if any(not all(0x21 <= c <= 0x7E or c >= 0x80 or c in b" \t" for c in v) for _, v in headers):
        return
    data = b"POST /p HTTP/1.1\r\nHost: h\r\n"
    data += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    data += b"Content-Length: %d\r\n\r\n" % len(body) + body
    assert check_agrees(data)
