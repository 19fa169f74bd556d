"""The node-side HTTP/1.1 codec (l4gw.http.wire), checked against h11 byte by byte."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4gw.http.wire import (
    CHUNKED,
    LAST_CHUNK,
    LENGTH,
    NONE,
    UNTIL_CLOSE,
    NodeProtocolError,
    ResponseHead,
    ResponseReader,
    chunk,
    request_head,
    response_head,
)


def read_all(
    data: bytes, *, sizes: list[int] | None = None, head_request: bool = False, eof: bool = True
) -> tuple[list[ResponseHead], bytes, ResponseReader]:
    """Feed ``data`` in pieces (one byte at a time by default); the heads and body seen."""
    reader = ResponseReader()
    heads: list[ResponseHead] = []
    body = bytearray()
    position = 0
    pieces = iter(sizes or [])
    in_body = False
    while True:
        if not in_body:
            head = reader.read_head(head_request=head_request)
            if head is not None:
                heads.append(head)
                if head.status >= 200:
                    in_body = True
                continue
        else:
            out = reader.read_body()
            if out:
                body += out
            if reader.done:
                return heads, bytes(body), reader
            if out is not None:
                continue
        if position >= len(data):
            if not eof:
                return heads, bytes(body), reader
            if reader.eof:
                raise AssertionError("reader wants data after EOF")
            reader.feed_eof()
            continue
        size = next(pieces, 1)
        reader.feed(data[position : position + size])
        position += size


def h11_read(data: bytes, *, method: bytes = b"GET") -> tuple[list[h11.Event], bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    events: list[h11.Event] = []
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif event is h11.NEED_DATA or event is h11.PAUSED:
            break
        else:
            events.append(event)  # type: ignore[arg-type]
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    return events, body


# --- fixed cases ----------------------------------------------------------------------------


def test_content_length_body() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b c \r\n\r\nhello"
    heads, body, reader = read_all(data)
    (head,) = heads
    assert (head.status, head.reason, head.framing, head.content_length) == (200, b"OK", LENGTH, 5)
    assert head.headers == [(b"content-length", b"5"), (b"x-a", b"b c")]
    assert head.keep_alive
    assert body == b"hello"
    assert not reader.buffer


def test_chunked_body_with_extensions_and_trailers() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    heads, body, reader = read_all(data)
    assert heads[0].framing == CHUNKED
    assert heads[0].chunked
    assert body == b"hello world"
    assert reader.done


def test_until_close_and_http10() -> None:
    heads, body, _ = read_all(b"HTTP/1.0 200 OK\r\n\r\nabc")
    assert heads[0].framing == UNTIL_CLOSE
    assert not heads[0].keep_alive
    assert body == b"abc"
    heads, _, _ = read_all(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    )
    assert heads[0].keep_alive


def test_no_body_statuses_and_head() -> None:
    for status in (204, 304):
        heads, body, _ = read_all(
            b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status, eof=False
        )
        assert heads[0].framing == NONE
        assert body == b""
    heads, body, reader = read_all(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", head_request=True, eof=False
    )
    assert heads[0].framing == NONE
    assert heads[0].content_length == 10
    assert reader.done


def test_informational_then_final() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n"
    data += b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    heads, body, _ = read_all(data)
    assert [h.status for h in heads] == [100, 103, 201]
    assert body == b"ok"


def test_switching_protocols_leaves_the_rest_in_the_buffer() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00")
    head = reader.read_head()
    assert head is not None
    assert head.status == 101
    assert bytes(reader.buffer) == b"\x81\x00"


def test_connection_close_and_te_with_cl_are_not_reusable() -> None:
    heads, _, _ = read_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert not heads[0].keep_alive
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    heads, body, _ = read_all(data + b"2\r\nok\r\n0\r\n\r\n")
    assert heads[0].framing == CHUNKED
    assert heads[0].content_length is None
    assert not heads[0].keep_alive
    assert body == b"ok"


def test_bare_lf_heads() -> None:
    heads, body, _ = read_all(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
    assert heads[0].status == 200
    assert body == b"ok"


def test_two_responses_and_reset() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    assert reader.read_head() is not None
    assert reader.read_body() == b"a"
    assert reader.done
    reader.reset()
    assert reader.read_head() is None
    reader.feed(b"HTTP/1.1 404 No\r\nContent-Length: 0\r\n\r\n")
    head = reader.read_head()
    assert head is not None
    assert head.status == 404
    assert reader.done


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
)
def test_malformed_responses_raise(data: bytes) -> None:
    with pytest.raises(NodeProtocolError):
        read_all(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS record, no CRLF anywhere
        b"SSH-2.0-OpenSSH_9.6",
        b"http/1.1 200 OK",
        b"HTTP/2",
        b"\r\nHTTP/1.1 200 OK",
    ],
)
def test_not_http_is_refused_at_the_first_wrong_byte(data: bytes) -> None:
    """Bytes that cannot start a status line are an error as soon as they arrive (fed one
    byte at a time), not after the head's CRLF CRLF, which such a node may never send."""
    reader = ResponseReader()
    good = b"HTTP/1."
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        if data[: i + 1] == good[: i + 1]:
            assert reader.read_head() is None
        else:
            with pytest.raises(NodeProtocolError, match="malformed status line"):
                reader.read_head()
            return
    pytest.fail("never refused")


def test_head_size_limit() -> None:
    reader = ResponseReader(max_head=100)
    reader.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200)
    with pytest.raises(NodeProtocolError):
        reader.read_head()


def test_writers_round_trip_through_h11() -> None:
    data = request_head(b"POST", b"/a?b", [(b"host", b"h"), (b"content-length", b"2")]) + b"hi"
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"POST", b"/a?b")
    assert list(request.headers) == [(b"host", b"h"), (b"content-length", b"2")]
    head = response_head(200, b"OK", [(b"transfer-encoding", b"chunked")])
    events, body = h11_read(head + chunk(b"abc") + chunk(b"d") + LAST_CHUNK)
    assert body == b"abcd"
    assert isinstance(events[-1], h11.EndOfMessage)


# --- properties: the same answers as h11 -----------------------------------------------------

TOKENS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8).filter(
    lambda t: t not in ("content-length", "transfer-encoding", "connection")
)
VALUES = st.text(alphabet="abc XYZ012;=/,\t", max_size=12).map(lambda v: v.strip(" \t"))
BODIES = st.binary(max_size=300)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    status = draw(st.sampled_from([200, 201, 204, 301, 404, 500]))
    headers = draw(st.lists(st.tuples(TOKENS, VALUES), max_size=5))
    body = draw(BODIES) if status != 204 else b""
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    lines = [f"HTTP/1.1 {status} Reason Phrase".encode()]
    lines += [f"{name}: {value}".encode() for name, value in headers]
    if status == 204:  # no body, whatever the framing headers would say
        payload = b""
    elif framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        payload = b"".join(chunk(p) for p in pieces if p) + LAST_CHUNK
    else:
        lines.append(b"Connection: close")
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload, body, status


@settings(max_examples=200, deadline=None)
@given(case=responses(), sizes=st.lists(st.integers(1, 40), max_size=30))
def test_same_as_h11_in_any_pieces(case: tuple[bytes, bytes, int], sizes: list[int]) -> None:
    data, body, status = case
    heads, got_body, reader = read_all(data, sizes=sizes)
    events, h11_body = h11_read(data)
    response = events[0]
    assert isinstance(response, h11.Response)
    assert heads[-1].status == response.status_code == status
    assert heads[-1].reason == response.reason
    assert heads[-1].headers == list(response.headers)
    assert got_body == h11_body == body
    assert not reader.buffer


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), prefix=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]))
def test_garbage_never_crashes(data: bytes, prefix: bytes) -> None:
    try:
        read_all(prefix + data, sizes=[7] * 100)
    except NodeProtocolError:
        pass
