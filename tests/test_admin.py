"""The admin endpoint (l4gw.admin): the handler table shared by the daemon and the control
plane, and the h11 server around it, over in-memory streams."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from l4gw.serve.admin import AdminTable, admin_table, respond, serve_admin_connection


class Source:
    """An ``AdminSource`` with fixed answers."""

    def __init__(self) -> None:
        self.ok = True
        self.reason = "ok"
        self.broken = False

    def health(self) -> tuple[bool, str]:
        return self.ok, self.reason

    async def status(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise RuntimeError("a bug")
        return {"pid": 1, "draining": not self.ok}

    async def metrics_text(self) -> str:
        await trio.lowlevel.checkpoint()
        return "# HELP l4gw_draining 1 while the daemon drains before stopping.\n"

    def config_dict(self) -> dict[str, Any]:
        return {"daemon": {"workers": 2}}


@pytest.fixture
def source() -> Source:
    return Source()


async def test_every_path_of_the_table(source: Source) -> None:
    table = admin_table(source)
    assert sorted(table) == ["/config", "/healthz", "/metrics", "/status"]
    assert await respond(table, "GET", "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
    source.ok, source.reason = False, "starting"
    assert await respond(table, "HEAD", "/healthz?verbose=1") == (
        503,
        "text/plain; charset=utf-8",
        b"starting\n",
    )
    status, ctype, body = await respond(table, "GET", "/status")
    assert (status, ctype, json.loads(body)) == (
        200,
        "application/json",
        {"pid": 1, "draining": True},
    )
    assert body.endswith(b"}\n")
    status, ctype, body = await respond(table, "GET", "/metrics")
    assert (status, ctype) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert body.startswith(b"# HELP l4gw_draining")
    status, _, body = await respond(table, "GET", "/config")
    assert json.loads(body) == {"daemon": {"workers": 2}}


@pytest.mark.parametrize(
    ("method", "target", "status", "message"),
    [
        ("GET", "/nope", 404, "not found"),
        ("GET", "/", 404, "not found"),
        ("POST", "/healthz", 405, "method not allowed"),
        ("DELETE", "/nope", 405, "method not allowed"),
    ],
)
async def test_refusals(
    source: Source, method: str, target: str, status: int, message: str
) -> None:
    code, ctype, body = await respond(admin_table(source), method, target)
    assert (code, ctype) == (status, "application/json")
    assert json.loads(body) == {"error": message, "status": status}


async def exchange(table: AdminTable, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` byte by byte to one admin connection; the answer's head and body."""
    client, server = trio.testing.memory_stream_pair()
    answer = bytearray()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_admin_connection, server, table)
            for i in range(len(request)):
                await client.send_all(request[i : i + 1])
            while chunk := await client.receive_some(4096):
                answer += chunk
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    return head, body


async def test_one_request_per_connection(source: Source) -> None:
    head, body = await exchange(admin_table(source), b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 "
    assert b"connection: close" in lines
    assert f"content-length: {len(body)}".encode() in lines
    assert json.loads(body) == {"pid": 1, "draining": False}
    head, body = await exchange(admin_table(source), b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 3" in head
    assert body == b""


async def test_a_failing_handler_answers_500_and_is_logged(source: Source) -> None:
    source.broken = True
    with structlog.testing.capture_logs() as logs:
        head, body = await exchange(admin_table(source), b"GET /status HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert json.loads(body) == {"error": "internal error", "status": 500}
    assert [(e["event"], e["target"]) for e in logs] == [("admin_error", "/status")]


async def test_a_malformed_request_gets_the_status_hint(source: Source) -> None:
    head, body = await exchange(admin_table(source), b"GET /status HTTP/1.1\r\nbad header\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body) == {"error": "bad request", "status": 400}
