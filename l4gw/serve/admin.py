"""The admin endpoint: ``/healthz``, ``/status``, ``/metrics`` and ``/config``, over h11.

One server for every process that has an admin endpoint: a single daemon, each worker of
``workers = N`` (on a private Unix socket) and the control plane. Each of them is an
``AdminSource``; ``admin_table`` turns it into the handler table (path -> async handler) that
``serve_admin`` serves.

One request per connection (``Connection: close``): the endpoint is for probes, scrapers and
``l4gw status``, not for traffic.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import h11
import structlog
import trio

__all__ = [
    "ADMIN_TIMEOUT",
    "MAX_REQUEST_HEAD",
    "AdminSource",
    "AdminTable",
    "Reply",
    "admin_table",
    "respond",
    "serve_admin",
]

log = structlog.get_logger("l4gw.admin")

#: A client has this long to send its request and read the answer.
ADMIN_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 8192

_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_METRICS = "text/plain; version=0.0.4; charset=utf-8"

#: (status, content type, body) of one answer.
Reply = tuple[int, str, bytes]
#: Path -> what answers a GET (or HEAD) of it.
AdminTable = Mapping[str, Callable[[], Awaitable[Reply]]]


class AdminSource(Protocol):
    """What a process serves at its admin endpoint."""

    def health(self) -> tuple[bool, str]:
        """``/healthz``: (ok, reason); the reason is the body (``ok``, ``draining``, ...)."""
        ...

    async def status(self) -> dict[str, Any]:
        """``/status``: the status document."""
        ...

    async def metrics_text(self) -> str:
        """``/metrics``: the Prometheus page."""
        ...

    def config_dict(self) -> dict[str, Any]:
        """``/config``: the running configuration as JSON-able data."""
        ...


def _json_body(document: object) -> bytes:
    return json.dumps(document, indent=1).encode() + b"\n"


def _error(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode() + b"\n"


def admin_table(source: AdminSource) -> dict[str, Callable[[], Awaitable[Reply]]]:
    """The handler table of ``source``: one async handler per admin path."""

    async def healthz() -> Reply:
        ok, reason = source.health()
        return 200 if ok else 503, _TEXT, reason.encode() + b"\n"

    async def status() -> Reply:
        return 200, _JSON, _json_body(await source.status())

    async def metrics() -> Reply:
        return 200, _METRICS, (await source.metrics_text()).encode()

    async def config() -> Reply:
        return 200, _JSON, _json_body(source.config_dict())

    return {"/healthz": healthz, "/status": status, "/metrics": metrics, "/config": config}


async def respond(table: AdminTable, method: str, target: str) -> Reply:
    """The answer to ``method target``: 405 for a method other than GET and HEAD, 404 for a
    path not in ``table``; a handler's exceptions propagate."""
    if method not in ("GET", "HEAD"):
        return 405, _JSON, _error(405, "method not allowed")
    handler = table.get(target.split("?", 1)[0])
    if handler is None:
        return 404, _JSON, _error(404, "not found")
    return await handler()


async def serve_admin_connection(stream: trio.abc.Stream, table: AdminTable) -> None:
    """Answer one request on ``stream``, then close it (this function owns ``stream``).

    A malformed request gets h11's status hint; a handler that raises gets a 500 and is
    logged (``admin_error``): a bug there must not stop the process. A client that does not
    finish within ``ADMIN_TIMEOUT`` is dropped."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        with trio.move_on_after(ADMIN_TIMEOUT):
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(4096)))
            if isinstance(event, h11.Request):
                target = event.target.decode("ascii", "replace")
                try:
                    status, ctype, body = await respond(
                        table, event.method.decode("ascii", "replace"), target
                    )
                except Exception:
                    log.exception("admin_error", target=target)
                    status, ctype, body = 500, _JSON, _error(500, "internal error")
                headers = [
                    ("content-type", ctype),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ]
                data = conn.send(h11.Response(status_code=status, headers=headers))
                if event.method != b"HEAD":
                    data += conn.send(h11.Data(data=body))
                await stream.send_all(data + conn.send(h11.EndOfMessage()))
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
    table: AdminTable,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on an already bound, listening ``sock`` forever (the caller
    keeps owning ``sock`` and closes it after this task ends)."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handler(stream: trio.SocketStream) -> None:
        await serve_admin_connection(stream, table)

    await trio.serve_listeners(handler, [listener], task_status=task_status)
