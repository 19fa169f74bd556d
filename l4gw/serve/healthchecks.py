"""Active health checks and passive ejection, driven with trio: the probes and the task that
runs one upstream's :class:`l4gw.core.health.HealthMonitor` (the state machine, with no I/O).

- ``run_check`` probes one node (tcp connect, or an HTTP ``GET``) within ``health.timeout``;
- ``serve_health`` drives one monitor: it runs the probes, wakes up for ejection timers, and
  registers the monitor as a passive observer on ``upstream.observers``.

The behaviour is documented for operators in ``docs/health.md``.
"""

from __future__ import annotations

import contextlib
import errno
import random
from collections.abc import Awaitable, Callable

import h11
import structlog
import trio

from ..core import proxyproto
from ..core.acl import BackendAuthorization
from ..core.config import UpstreamConfig
from ..core.health import (
    MAX_RESPONSE_HEAD,
    POLL_INTERVAL,
    USER_AGENT,
    CheckResult,
    HealthMonitor,
)
from ..core.netaddr import SocketAddress
from ..core.nodes import NodeState
from ..core.upstream import UpstreamRuntime
from ..l4.connect import connect_socket

__all__ = ["CheckFn", "run_check", "serve_health"]

log = structlog.get_logger("l4gw.health")

# -- probes -----------------------------------------------------------------------------

CheckFn = Callable[[SocketAddress, UpstreamConfig, BackendAuthorization], Awaitable[CheckResult]]

_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connect refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection reset",
}


def _os_reason(exc: OSError, timeout: float) -> str:
    if exc.errno == errno.ETIMEDOUT:
        return f"timeout after {timeout:g}s"
    if exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _proxy_header(mode: str) -> bytes:
    if mode == "v2":
        return proxyproto.encode_v2_local()
    if mode == "v1":
        return proxyproto.encode_v1_unknown()
    return b""


async def run_check(
    address: SocketAddress, upstream: UpstreamConfig, authorization: BackendAuthorization
) -> CheckResult:
    """Probe ``address`` as ``upstream.health`` says; never raises for a failed check.

    An address that ``authorization`` does not permit is not probed at all (a failure).
    The whole probe (connect, PROXY header, request, response head) runs within
    ``health.timeout``. ``tcp`` passes once the connection is established; ``http`` sends
    ``GET path`` (HTTP/1.1, ``Connection: close``, ``Host`` = ``upstream.host_header`` or
    the node address) and passes when the response status lies in ``expect``; at most
    ``MAX_RESPONSE_HEAD`` bytes of response head are read and the body is never read.
    When the upstream sends PROXY headers, a LOCAL (v2) or ``UNKNOWN`` (v1) header goes first.
    """
    if not authorization.permits(address):
        return CheckResult(False, "not authorized (not probed)")
    timeout = upstream.health.timeout
    with trio.move_on_after(timeout):
        try:
            return await _probe(address, upstream)
        except OSError as exc:
            return CheckResult(False, _os_reason(exc, timeout))
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError):
                return CheckResult(False, _os_reason(cause, timeout))
            return CheckResult(False, "connection reset")
        except h11.ProtocolError as exc:
            return CheckResult(False, f"bad response: {exc}")
    return CheckResult(False, f"timeout after {timeout:g}s")


async def _probe(address: SocketAddress, upstream: UpstreamConfig) -> CheckResult:
    health = upstream.health
    sock = await connect_socket(address, health.timeout)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with stream:
        header = _proxy_header(upstream.proxy_protocol)
        if health.check == "tcp":
            if header:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(header)
            return CheckResult(True, "connected")
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        request = h11.Request(
            method="GET",
            target=health.path,
            headers=[
                ("Host", upstream.host_header or str(address)),
                ("User-Agent", USER_AGENT),
                ("Accept", "*/*"),
                ("Connection", "close"),
            ],
        )
        await stream.send_all(header + conn.send(request) + conn.send(h11.EndOfMessage()))
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if received >= MAX_RESPONSE_HEAD:
                    return CheckResult(False, f"bad response: head larger than {received} bytes")
                data = await stream.receive_some(MAX_RESPONSE_HEAD - received)
                received += len(data)
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                low, high = health.expect
                return CheckResult(low <= event.status_code <= high, f"status {event.status_code}")
            elif isinstance(event, h11.ConnectionClosed):
                return CheckResult(False, "connection closed before a response")
            # InformationalResponse (1xx): keep reading.


# -- the driver -------------------------------------------------------------------------


async def serve_health(
    upstream: UpstreamRuntime,
    *,
    task_status: trio.TaskStatus[HealthMonitor] = trio.TASK_STATUS_IGNORED,
    check: CheckFn | None = None,
    rng: random.Random | None = None,
    probes: bool = True,
) -> None:
    """Run the health checking of ``upstream`` forever: active probes (when ``check`` is not
    "none"), ejection timers, and passive ejection (its monitor is in ``upstream.observers``
    while this runs, and removed when it ends).

    ``upstream.config`` and ``upstream.nodes`` are read afresh every round (at least every
    ``POLL_INTERVAL``), so a reload that mutates ``upstream`` in place is picked up.
    ``task_status.started`` reports the ``HealthMonitor`` once every current node has its
    initial state. ``check`` and ``rng`` replace the probe and the jitter source (tests).
    ``probes=False`` runs passive ejection only: ``check_up`` comes from elsewhere (the
    control plane of a worker process, see ``HealthMonitor``).
    """
    run = check if check is not None else run_check
    monitor = HealthMonitor(
        upstream.name, upstream.config.health, clock=trio.current_time, rng=rng, probes=probes
    )
    wake = trio.Event()

    def wakeup() -> None:
        wake.set()

    monitor.wakeup = wakeup

    async def probe(node: NodeState) -> None:
        started = trio.current_time()
        try:
            result = await run(node.address, upstream.config, upstream.authorization)
        except Exception as exc:  # a bug in a check must not stop health checking
            log.exception("check_error", upstream=upstream.name, node=node.key)
            result = CheckResult(False, f"check error: {exc!r}")
        monitor.check_done(node, result, started)

    upstream.observers.append(monitor)
    try:
        async with trio.open_nursery() as nursery:
            monitor.track(upstream.nodes)
            task_status.started(monitor)
            while True:
                wake = trio.Event()
                monitor.reconfigure(upstream.config.health)
                monitor.track(upstream.nodes)
                monitor.expire_ejections()
                for node in monitor.due():
                    nursery.start_soon(probe, node)
                deadline = min(monitor.next_deadline(), trio.current_time() + POLL_INTERVAL)
                with trio.move_on_at(deadline):
                    await wake.wait()
    finally:
        with contextlib.suppress(ValueError):
            upstream.observers.remove(monitor)
