"""What both http data paths (the task in :mod:`l4gw.http.proxy` and the reactor's
:mod:`l4gw.http.fastpath`) say to clients, so they say it the same way. No I/O.
"""

from __future__ import annotations

import json

from .headers import response_headers
from .wire import LENGTH, ResponseHead, response_head

__all__ = [
    "DEFAULT_KEEPALIVE",
    "IDEMPOTENT",
    "MAX_HEAD",
    "NO_ROUTE",
    "REASONS",
    "Record",
    "client_response_head",
    "error_body",
    "error_response",
]

#: Largest request head (request line and headers) accepted from a client: 16 KiB, like
#: h11's own default (Apache allows 8 KiB per line, nginx 4 x 8 KiB buffers). Larger heads
#: get 431 and the connection is closed.
MAX_HEAD = 16 * 1024
#: Keep-alive idle time between requests when the listener sets no ``idle_timeout``.
DEFAULT_KEEPALIVE = 60.0
#: RFC 9110 §9.2.2: a request with these methods may be sent again on a new connection.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Route label of requests refused before a route was found (400, 404, 408, 431...).
NO_ROUTE = "none"

REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


class Record:
    """What the access log line and the metrics say about one request."""

    __slots__ = (
        "host",
        "logged",
        "method",
        "node",
        "path",
        "reason",
        "route",
        "started",
        "status",
        "upstream_path",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.logged = False
        self.method: str | None = None
        self.path: str | None = None
        self.upstream_path: str | None = None
        self.host: str | None = None
        self.node: str | None = None
        self.route = NO_ROUTE
        self.status = 0
        #: Why a relayed response did not end properly ("" when it did): the access line's
        #: ``reason``, since its ``status`` is the node's.
        self.reason = ""


def error_body(status: int, message: str) -> bytes:
    """The JSON body of a gateway error: ``{"error": message, "status": status}``."""
    return json.dumps({"error": message, "status": status}).encode()


def error_response(status: int, message: str, *, keep: bool) -> bytes:
    """A whole gateway error response; ``keep`` False adds ``Connection: close``."""
    body = error_body(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if not keep:
        headers.append((b"connection", b"close"))
    return response_head(status, REASONS.get(status, b""), headers) + body


def client_response_head(
    response: ResponseHead, *, body_done: bool, is_head: bool, http11: bool, close: bool
) -> tuple[bytes, bool, bool]:
    """The head relayed to the client for the node's final ``response``, with the framing
    this client understands: the node's Content-Length when it framed the body by length (and
    for HEAD and 304), else chunked for an HTTP/1.1 client, else (HTTP/1.0) the body ends with
    the connection. ``body_done``: the response has no body (HEAD, 204, 304...); ``close``:
    the connection ends after this response anyway.

    Returns ``(head, chunk_out, close)``: ``chunk_out`` says the body must be re-chunked,
    ``close`` whether the connection ends after it.
    """
    headers = response_headers(response.headers)
    chunk_out = False
    length = response.content_length
    if length is not None and (response.framing == LENGTH or is_head or response.status == 304):
        headers.append((b"content-length", b"%d" % length))
    elif body_done:  # no body: HEAD, 204, 304
        if is_head and response.chunked and http11:
            headers.append((b"transfer-encoding", b"chunked"))
    elif http11:
        headers.append((b"transfer-encoding", b"chunked"))
        chunk_out = True
    else:
        close = True  # an HTTP/1.0 client: the body ends when the connection closes
    if close:
        headers.append((b"connection", b"close"))
    return response_head(response.status, response.reason, headers), chunk_out, close
