"""A lean parser for plain request heads; anything else is left to h11. No I/O.

h11 parses every request that arrives first on a connection it serves, and every request this
module does not take. On a keep-alive connection served from the reactor
(:mod:`l4gw.http.fastpath`) most requests are small and ordinary: a request line, a dozen
headers, no body or a short one with ``Content-Length``. For those, h11's event objects,
state machine and per-header validation cost more than the rest of the proxy. This parser
takes exactly that common case and nothing else:

* the head ends with CRLF CRLF and every line ends with CRLF (no bare LF or CR anywhere);
* request line ``token SP visible-ASCII SP HTTP/1.0|HTTP/1.1``, method not ``CONNECT``;
* header lines ``token ":" OWS value OWS`` where the value has visible ASCII and obs-text
  only, separated by spaces or tabs (no control characters, no obsolete line folding);
* exactly one ``Host`` (at most one for HTTP/1.0), at most one ``Content-Length`` made of
  1 to 18 digits, no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``;
* the whole body, if any, is already in the buffer; the head is at most ``max_head`` bytes.

For anything outside that, :func:`parse_request` returns None and the caller gives the bytes to
h11, which either parses them (with its own rules and error statuses) or refuses them. So this
parser never decides that a request is malformed, and whatever it accepts, h11 accepts with the
same method, target, version and headers: ``tests/test_http_request.py`` checks that
property on generated heads, hostile ones included.
"""

from __future__ import annotations

import re

from .wire import lower_name

__all__ = ["PlainRequest", "parse_request"]

Header = tuple[bytes, bytes]

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_FIELD_LINE = _TOKEN + rb":[ \t]*(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*\r\n"
#: The whole head at once (one C-level match); lines are split afterwards.
_HEAD_RE = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])\r\n(?:" + _FIELD_LINE + rb")*\r\n"
)
_DIGITS_RE = re.compile(rb"[0-9]{1,18}")
#: Headers this parser leaves to h11 (framing it does not do, or requests that change the
#: exchange: 100-continue, protocol upgrades).
_DEFERRED = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


class PlainRequest:
    """One request taken by :func:`parse_request`. ``headers`` are ``(lower-case name,
    value)`` pairs in order, values without surrounding whitespace (as h11 gives them)."""

    __slots__ = ("body_start", "close", "end", "headers", "host", "http11", "method", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        http11: bool,
        headers: list[Header],
        host: bytes | None,
        close: bool,
        body_start: int,
        end: int,
    ) -> None:
        self.method = method
        self.target = target
        self.http11 = http11
        self.headers = headers
        #: The Host value (None: an HTTP/1.0 request without one).
        self.host = host
        #: The connection ends after this request (``Connection: close`` or HTTP/1.0).
        self.close = close
        #: Offset of the body in the buffer (the head's length).
        self.body_start = body_start
        #: Offset just after the body: where the next request starts.
        self.end = end


def parse_request(buffer: bytes | bytearray, max_head: int) -> PlainRequest | None:
    """The request at the start of ``buffer`` if it is a plain one, complete with its body;
    None for anything else (incomplete, unusual, or malformed: h11 decides which)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0 or head_end + 4 > max_head:
        return None
    body_start = head_end + 4
    head = bytes(buffer[:body_start])
    match = _HEAD_RE.fullmatch(head)
    if match is None:
        return None
    method = match[1]
    if method == b"CONNECT":
        return None
    http11 = match[3] == b"1"
    headers: list[Header] = []
    host: bytes | None = None
    length = 0
    seen_length = False
    close = not http11
    lines = head[match.end(3) + 2 : head_end].split(b"\r\n") if head_end > match.end(3) else ()
    for line in lines:
        raw_name, _, value = line.partition(b":")
        name = lower_name(raw_name)
        value = value.strip(b" \t")
        if name == b"host":
            if host is not None:
                return None
            host = value
        elif name == b"content-length":
            if seen_length or _DIGITS_RE.fullmatch(value) is None:
                return None
            seen_length = True
            length = int(value)
        elif name == b"connection":
            if not close:
                for token in value.split(b","):
                    if token.strip(b" \t").lower() == b"close":
                        close = True
        elif name in _DEFERRED:
            return None
        headers.append((name, value))
    if host is None and http11:
        return None
    end = body_start + length
    if end > len(buffer):
        return None
    return PlainRequest(method, match[2], http11, headers, host, close, body_start, end)
