"""l4gw.http.strict: obs-fold in client request heads, decided on the bytes before h11.

The reference is h11 itself with folding refused inside it (its line-folding helper replaced,
within each test only): the check plus an untouched h11 must give the same outcome, whatever
the pieces the bytes arrive in."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import h11
import h11._readers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4gw.http.responses import MAX_HEAD
from l4gw.http.strict import (
    CLEAN,
    FOLD_MESSAGE,
    REFUSE,
    START,
    bad_field_value,
    head_refusal,
    scan_head,
)


def _refuse_obs_fold(lines: Iterable[bytes]) -> Iterator[bytes]:
    """What the gateway used to install in h11 (the reference behaviour)."""
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise h11.LocalProtocolError(FOLD_MESSAGE)
        yield line


def reference(pieces: list[bytes]) -> tuple[str, str]:
    """h11 with folding refused inside it, fed ``pieces`` one after the other."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(h11._readers, "_obsolete_line_fold", _refuse_obs_fold)
        return parse(pieces, check=False)


def parse(pieces: list[bytes], *, check: bool = True) -> tuple[str, str]:
    """("request", target) | ("error", message) | ("need", "") as the client side sees
    ``pieces``: with ``check``, the strict scan first, then an untouched h11."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    state = START
    try:
        for piece in pieces:
            conn.receive_data(piece)
            if check:
                state = scan_head(state, piece)
                if state == REFUSE:
                    raise h11.RemoteProtocolError(
                        head_refusal(conn.trailing_data[0]) or FOLD_MESSAGE
                    )
            event = conn.next_event()
            if isinstance(event, h11.Request):
                return "request", event.target.decode("latin-1")
            if event is not h11.NEED_DATA:
                return "other", type(event).__name__
    except h11.RemoteProtocolError as exc:
        return "error", f"{exc.error_status_hint} {exc}"
    return "need", ""


def one_by_one(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


FOLDED = [
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: a\r\n b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\n\tX: a\r\nHost: h\r\n\r\n",  # the first header line
    b"GET / HTTP/1.1\nHost: h\nX: a\n b\n\n",  # bare LF
    b"GET  / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",  # bad request line first
    b"GET / HTTP/1.1\r\nBad Name: x\r\n b\r\n\r\n",  # bad header line first
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\nBad Name: x\r\n\r\n",  # fold first
]
NOT_FOLDED = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n\r\n abc",  # fold-like body
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\r ",  # LF CR SP: not a folded line
    b"\r\n GET / HTTP/1.1\r\n\r\n",  # an empty first line: h11's own refusal
    b"\n\tGET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b",  # incomplete: not refused yet
]


@pytest.mark.parametrize("data", FOLDED + NOT_FOLDED)
def test_same_outcome_as_h11_refusing_folds_whole_and_byte_by_byte(data: bytes) -> None:
    assert parse([data]) == reference([data])
    assert parse(one_by_one(data)) == reference(one_by_one(data))


@pytest.mark.parametrize("data", FOLDED)
def test_folded_heads_are_refused_with_400(data: bytes) -> None:
    kind, message = parse(one_by_one(data))
    assert kind == "error"
    assert message.startswith("400 ")


def test_an_incomplete_folded_head_waits_for_its_end() -> None:
    state = scan_head(START, b"GET / HTTP/1.1\r\nX: a\r\n b\r\n")
    assert state not in (REFUSE, CLEAN)
    assert scan_head(state, b"\r") not in (REFUSE, CLEAN)
    assert scan_head(scan_head(state, b"\r"), b"\nbody \n more") == REFUSE


def test_bytes_after_the_head_are_not_looked_at() -> None:
    state = scan_head(START, b"POST / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert state == CLEAN
    assert scan_head(state, b"\n \n\t") == CLEAN
    assert scan_head(START, b"") == START


def test_h11_itself_is_untouched() -> None:
    assert h11._readers._obsolete_line_fold.__module__ == "h11._readers"
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    conn.receive_data(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, h11.Response)
    assert (b"x", b"a b") in list(event.headers)


# -- generated heads, in generated pieces ------------------------------------------------

line_bytes = st.lists(
    st.one_of(
        st.sampled_from(list(b"Host: h")),
        st.sampled_from([0x20, 0x09, 0x0D, 0x0A, 0x3A, 0x00, 0x80]),
        st.integers(0x21, 0x7E),
    ),
    max_size=12,
).map(bytes)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """Request heads with folded lines, odd line ends and stray bytes now and then."""
    request_line = draw(
        st.sampled_from([b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"GET  / HTTP/1.1", b"", b" GET"])
    )
    lines = [request_line]
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.sampled_from([b"", b"", b"X-A: ", b" ", b"\t", b"Host: "]))
        lines.append(start + draw(line_bytes))
    ends = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"])
    head = b"".join(line + draw(ends) for line in lines)
    head += draw(st.sampled_from([b"\r\n", b"\n", b""]))
    return head + draw(st.binary(max_size=8))


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=2000, deadline=None)
@given(st.data())
def test_generated_heads_in_pieces_agree_with_h11_refusing_folds(data: st.DataObject) -> None:
    head = data.draw(heads())
    pieces = data.draw(split(head))
    assert parse(pieces) == reference(pieces), pieces


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        (b"plain value", False),
        (b"tab\tinside", False),
        (b"caf\xe9", False),  # obs-text is allowed
        (b"a\x01b", True),
        (b"a\x08", True),
        (b"\x1bb", True),
        (b"\x1f", True),
        (b"del\x7f", True),
    ],
)
def test_control_characters_in_field_values(value: bytes, bad: bool) -> None:
    """h11 takes these values (it refuses only NUL and whitespace but SP/HTAB); the check
    refuses every control character but HTAB, as RFC 9110 §5.5 has it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: " + value + b"\r\n\r\n")
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert bad_field_value(request.headers) is bad
    assert bad_field_value([(b"host", b"h")]) is False
