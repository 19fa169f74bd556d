"""Header rewriting between the client and the node. No I/O.

Header lists are h11's form: ``(name, value)`` pairs of bytes, names lower case (as h11 hands
them out of its parser).

Requests to the node (:func:`request_headers`):

* Hop-by-hop headers are removed: ``Connection`` and every header it names, ``Keep-Alive``,
  ``TE``, ``Trailer``, ``Transfer-Encoding`` (framing is redone by h11: ``chunked`` when the
  client's body was chunked, ``Content-Length`` otherwise), ``Upgrade`` (kept, with
  ``Connection: upgrade``, when the request asks for a protocol upgrade) and every ``Proxy-*``
  header (``Proxy-Authorization``, ``Proxy-Connection``, and ``Proxy`` itself: httpoxy).
  ``Connection`` cannot remove ``Host``, ``Content-Length`` or the ``X-Forwarded-*`` headers
  the gateway sets.
* ``X-Forwarded-For``: the client's address is appended to any value the client sent.
* ``X-Forwarded-Proto`` (``http``/``https``) and ``X-Forwarded-Host`` (the client's Host) are
  set, replacing the client's.
* ``Host``: the route's ``host_header``, else the upstream's ``host_header``, else the client's
  Host (absent only for an HTTP/1.0 client that sent none, in which case the node's address is
  sent, as HTTP/1.1 requires a Host).

Responses to the client (:func:`response_headers`): the same hop-by-hop removal; framing
(``Content-Length`` or ``Transfer-Encoding: chunked``) is set by the proxy for the client's
HTTP version.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "HOP_BY_HOP",
    "connection_tokens",
    "is_upgrade_request",
    "request_headers",
    "response_headers",
]

Header = tuple[bytes, bytes]

#: Always removed (RFC 9110 §7.6.1 plus the legacy ``Proxy-Connection``).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_RESPONSE_DROPPED = HOP_BY_HOP | {b"content-length"}

#: Headers a ``Connection`` token may never remove from a request.
_PROTECTED = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)

#: Set by the gateway: the client's values are dropped (X-Forwarded-For is merged separately).
_REPLACED = frozenset({b"host", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for"})


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """The lower-cased tokens of every ``Connection`` header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for item in value.split(b","):
                token = item.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def is_upgrade_request(headers: Iterable[Header]) -> bool:
    """True if the request asks for a protocol upgrade (``Connection: upgrade`` + ``Upgrade``)."""
    has_upgrade = False
    for name, _value in headers:
        if name == b"upgrade":
            has_upgrade = True
            break
    return has_upgrade and b"upgrade" in connection_tokens(headers)


def request_headers(
    headers: Iterable[Header],
    *,
    client_ip: str,
    tls: bool,
    host: bytes | None = None,
    chunked: bool = False,
    upgrade: bool = False,
    default_host: bytes = b"",
) -> tuple[list[Header], bytes | None]:
    """The headers to send to the node, and the client's Host value (None if it sent none).

    ``host`` overrides the Host sent to the node (the route's or upstream's ``host_header``).
    ``chunked`` says the client's body was chunked (the node's request is framed the same
    way); ``upgrade`` keeps ``Upgrade`` and sends ``Connection: upgrade``.
    """
    headers = list(headers)
    named: set[bytes] = set()
    has_connection = False
    for name, _ in headers:
        if name == b"connection":
            has_connection = True
            break
    if has_connection:
        named = connection_tokens(headers) - _PROTECTED
    out: list[Header] = []
    client_host: bytes | None = None
    forwarded_for: list[bytes] = []
    upgrade_value: bytes | None = None
    for name, value in headers:
        if name in HOP_BY_HOP or name == b"proxy" or name.startswith(b"proxy-"):
            if name == b"upgrade" and upgrade_value is None:
                upgrade_value = value
            continue
        if name in _REPLACED:
            if name == b"host":
                client_host = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
            continue
        if named and name in named:
            continue
        out.append((name, value))
    node_host = host or client_host or default_host
    out.insert(0, (b"host", node_host))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if upgrade and upgrade_value is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade_value))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", b"https" if tls else b"http"))
    if client_host is not None:
        out.append((b"x-forwarded-host", client_host))
    return out, client_host


def response_headers(headers: Iterable[Header], *, upgrade: bool = False) -> list[Header]:
    """The node's response headers without hop-by-hop ones and without framing headers
    (``Content-Length``, ``Transfer-Encoding``: the caller adds the framing it uses toward
    the client). ``upgrade``: a 101 being relayed (``Upgrade`` kept, ``Connection: upgrade``).
    """
    headers = list(headers)
    named: frozenset[bytes] | set[bytes] = frozenset()
    for name, _ in headers:
        if name == b"connection":
            named = connection_tokens(headers)
            break
    out: list[Header] = []
    for name, value in headers:
        if name in _RESPONSE_DROPPED or name.startswith(b"proxy-"):
            if upgrade and name == b"upgrade":
                out.append((name, value))
            continue
        if named and name in named:
            continue
        out.append((name, value))
    if upgrade:
        out.append((b"connection", b"upgrade"))
    return out
