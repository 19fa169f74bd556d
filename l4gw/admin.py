"""The admin endpoint: ``/healthz``, ``/status``, ``/metrics`` (and ``/config``), over h11.

One request per connection (``Connection: close``): the endpoint is for probes, scrapers and
``l4gw status``, not for traffic.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import h11
import structlog
import trio

log = structlog.get_logger("l4gw.admin")

#: A client has this long to send its request and read the answer.
ADMIN_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 8192


class AdminHandlers:
    """What the endpoint serves; the daemon supplies the callables."""

    def __init__(
        self,
        healthy: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], str],
        config: Callable[[], dict[str, Any]],
    ) -> None:
        self.healthy = healthy
        self.status = status
        self.metrics = metrics
        self.config = config

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request."""
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "application/json", _error(405, "method not allowed")
        if path == "/healthz":
            if self.healthy():
                return 200, "text/plain; charset=utf-8", b"ok\n"
            return 503, "text/plain; charset=utf-8", b"draining\n"
        if path == "/status":
            return 200, "application/json", json.dumps(self.status(), indent=1).encode() + b"\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics().encode()
        if path == "/config":
            return 200, "application/json", json.dumps(self.config(), indent=1).encode() + b"\n"
        return 404, "application/json", _error(404, "not found")


def _error(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode() + b"\n"


async def _serve_one(stream: trio.SocketStream, handlers: AdminHandlers) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        with trio.move_on_after(ADMIN_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    conn.receive_data(data)
                    continue
                break
            if isinstance(event, h11.Request):
                status, ctype, body = handlers.respond(
                    event.method.decode("ascii", "replace"),
                    event.target.decode("ascii", "replace"),
                )
                headers = [
                    ("content-type", ctype),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                if event.method != b"HEAD":
                    await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            elif isinstance(event, h11.ConnectionClosed):
                pass
    except h11.RemoteProtocolError as exc:
        body = _error(exc.error_status_hint, "bad request")
        response = h11.Response(
            status_code=exc.error_status_hint,
            headers=[("content-length", str(len(body))), ("connection", "close")],
        )
        try:
            await stream.send_all(conn.send(response) + body)
        except (trio.BrokenResourceError, h11.LocalProtocolError):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_admin(
    sock: socket.socket,
    handlers: AdminHandlers,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on an already bound, listening ``sock`` forever."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, handlers)

    await trio.serve_listeners(handler, [listener], task_status=task_status)
