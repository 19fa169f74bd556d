"""Routing and admission of one request, shared by both http paths (the task in
:mod:`l4gw.http.proxy` and the reactor's :mod:`l4gw.http.fastpath`), so that they route the
same way and refuse in the same order. No I/O.
"""

from __future__ import annotations

from ..core.runtime import ListenerRuntime
from ..core.upstream import UpstreamRuntime
from .responses import Record
from .routes import BadRequestPath, RouteMatch, RouteTable

__all__ = ["Refusal", "refusal", "route_request"]

#: A gateway answer instead of the node's: (status, message, close the connection after it).
Refusal = tuple[int, str, bool]


def route_request(
    listener: ListenerRuntime,
    table: RouteTable,
    record: Record,
    method: str,
    host: str | None,
    target: str,
) -> tuple[RouteMatch | None, str | None, UpstreamRuntime | None]:
    """``(match, bad_path, upstream)``: the route (None: no route), why the target was
    refused (None: it was not) and the route's running upstream (None: not running). Fills
    the record's route fields."""
    try:
        match = table.match(method, host, target)
    except BadRequestPath as exc:
        return None, str(exc), None
    if match is None:
        return None, None, None
    record.route = match.route.name
    record.upstream_path = match.target
    return match, None, listener.upstreams.get(match.route.upstream)


def refusal(
    listener: ListenerRuntime,
    client_ip: str,
    now: float,
    match: RouteMatch | None,
    bad_path: str | None,
    upstream: UpstreamRuntime | None,
    protocol: Refusal | None = None,
) -> Refusal | None:
    """How a routed request is refused, None if it may go to a node. In this order: the
    source ACL (403, close), the rate limit (429: takes a token when it admits), then
    ``protocol`` (the task's own refusals of what h11 parsed: CL+TE, CONNECT), a refused path
    (400), no route (404), an upstream that is not running (503)."""
    acl = listener.acl
    if not acl.is_open and not acl.allows(client_ip):
        return 403, "source address not allowed", True
    limiter = listener.rate_limiter
    if limiter.enabled and not limiter.allow(client_ip, now):
        return 429, "rate limit exceeded", False
    if protocol is not None:
        return protocol
    if bad_path is not None:
        return 400, bad_path, False
    if match is None:
        return 404, "no route", False
    if upstream is None:
        return 503, f"upstream {match.route.upstream} is not running", False
    return None
