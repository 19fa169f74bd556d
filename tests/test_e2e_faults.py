"""End-to-end fault injection: the real ``l4gw run`` on loopback against nodes that fail the way
real ones do (reset mid-response, silence, garbage, killed processes), a worker process killed
under load, and a log destination that fails.

What each test proves is in its docstring. The figures that depend on timing (errors before an
ejection, a worker's respawn time) are measured and printed, not asserted: only their bounds
are (at most one failure per connection in flight when the fault hit).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from l4gw.serve.metrics import parse_metrics

from .conftest import (
    REPO,
    DaemonFactory,
    RunningDaemon,
    free_port,
    http_get,
    open_client,
    read_line,
    wait_until,
)

pytestmark = pytest.mark.e2e

_LINGER_RESET = struct.pack("ii", 1, 0)


# -- nodes the tests run --------------------------------------------------------------------


def reset_close(stream: trio.SocketStream) -> None:
    """Close the node's side with a reset (``SO_LINGER`` 0), as a crashing process or a
    middlebox does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    stream.socket.close()


async def read_request(stream: trio.SocketStream) -> bytes:
    """One whole HTTP/1.1 request as a node sees it (Content-Length or chunked body); b""
    on EOF before a head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            body += chunk
    else:
        length = 0
        for line in lower.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            body += chunk
    return head + b"\r\n\r\n" + body


Behaviour = Callable[["FaultNode", trio.SocketStream], Awaitable[None]]


class FaultNode:
    """A loopback node served by this process: each connection is given to ``behaviour``.
    Counts connections and requests; ``closed_by_peer`` counts connections on which the
    gateway closed its side (seen as EOF or a reset by ``wait_closed``)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.closed_by_peer = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self.behaviour(self, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def start(self, nursery: trio.Nursery) -> FaultNode:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def wait_closed(self, stream: trio.SocketStream) -> None:
        """Wait (bounded) for the gateway to close this connection; count it if it did."""
        with trio.move_on_after(10):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            self.closed_by_peer += 1


# -- an HTTP/1.1 client that tells a complete response from a cut one -----------------------


@dataclass
class Reply:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    #: The response ended properly (h11 saw its EndOfMessage).
    complete: bool = False
    #: Why it did not: "reset" (ECONNRESET), "eof" (closed before the end), "" if complete.
    cut: str = ""


class HttpClient:
    """One keep-alive client connection to the gateway, parsed with h11 (strict)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> HttpClient:
        return cls(await open_client(port))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def request(
        self, method: str, path: str, body: bytes = b"", *, chunked: bool = False
    ) -> Reply:
        headers = [("Host", "gw.test")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif body or method == "POST":
            headers.append(("Content-Length", str(len(body))))
        out = self.h11.send(h11.Request(method=method, target=path, headers=headers))
        if body:
            out += self.h11.send(h11.Data(data=body))
        out += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(out)
        reply = Reply()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                reply.cut = reply.cut or "eof"
                return reply
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError as exc:
                    cause = exc.__cause__
                    assert isinstance(cause, ConnectionResetError), repr(cause)
                    reply.cut = "reset"
                    return reply
                self.h11.receive_data(data)
            elif isinstance(event, h11.Response):
                reply.status = event.status_code
                reply.headers = dict(event.headers)
            elif isinstance(event, h11.Data):
                reply.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                reply.complete = True
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                return reply
            elif isinstance(event, h11.ConnectionClosed):
                reply.cut = "eof"
                return reply


# -- configs ----------------------------------------------------------------------------------


def config(
    port: int,
    nodes: list[str],
    *,
    mode: str = "http",
    upstream: str = "",
    daemon: str = "",
    health: str = "",
) -> str:
    node_list = ", ".join(f'{{ address = "{a}", weight = 1 }}' for a in nodes)
    return f"""
[daemon]
admin = "{{admin}}"
log_format = "json"
drain_timeout = "2s"
{daemon}

[upstreams.web]
connect_timeout = "1s"
nodes = [{node_list}]
{upstream}

[upstreams.web.health]
{health}

[[listeners]]
name = "gw"
listen = "127.0.0.1:{port}"
mode = "{mode}"
upstream = "web"
"""


async def recv_until_end(sock: trio.socket.SocketType) -> tuple[bytes, str]:
    """Read a raw client socket until it ends: (bytes, "eof" | "reset")."""
    data = b""
    while True:
        try:
            chunk = await sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        if not chunk:
            return data, "eof"
        data += chunk


# -- 1. a node that resets mid-response ------------------------------------------------------

PARTIAL = b"first part of the answer\n"


async def test_tcp_node_reset_reaches_the_client_as_a_reset(l4gw_daemon: DaemonFactory) -> None:
    """L4: a node that sends part of its answer and then resets must not look like a node
    that finished: the client reads the part, then gets ECONNRESET (not a clean EOF), and the
    access line says why the connection ended."""

    async def part_then_reset(node: FaultNode, stream: trio.SocketStream) -> None:
        await stream.send_all(PARTIAL)
        await trio.sleep(0.1)  # the part goes out first (ordering, not timing)
        reset_close(stream)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            node = await FaultNode(part_then_reset).start(nursery)
            port = free_port()
            daemon = await l4gw_daemon(config(port, [node.address], mode="tcp"))
            for _ in range(3):
                sock = trio.socket.socket()
                with sock:
                    await sock.connect(("127.0.0.1", port))
                    data, end = await recv_until_end(sock)
                assert data == PARTIAL
                assert end == "reset"
            lines = await daemon.wait_log("connection", count=3)
            assert all("ECONNRESET" in line.get("reason", "") for line in lines), lines
            nursery.cancel_scope.cancel()


def _http_reset_node(*, head_sent: bool, chunked_response: bool) -> Behaviour:
    async def behave(node: FaultNode, stream: trio.SocketStream) -> None:
        if not await read_request(stream):
            return
        node.requests += 1
        if head_sent:
            framing = (
                b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(PARTIAL) + PARTIAL + b"\r\n"
                if chunked_response
                else b"Content-Length: 100000\r\n\r\n" + PARTIAL
            )
            await stream.send_all(b"HTTP/1.1 200 OK\r\n" + framing)
            await trio.sleep(0.2)  # the head and the part reach the client first
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-")
        reset_close(stream)

    return behave


@pytest.mark.parametrize("driver", ["fast", "task"])
async def test_http_node_reset_before_the_head_is_a_502_and_not_retried(
    l4gw_daemon: DaemonFactory, driver: str
) -> None:
    """L7: a node that resets before its response head is complete gives the client a 502
    (counted in ``l4gw_http_requests_total``), the POST is not sent again (not to this node,
    not to the other), and the client's connection stays usable. ``fast``: a plain POST the
    reactor serves; ``task``: a chunked upload, served by the connection's task."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nodes = [
                await FaultNode(_http_reset_node(head_sent=False, chunked_response=False)).start(
                    nursery
                )
                for _ in range(2)
            ]
            port = free_port()
            daemon = await l4gw_daemon(config(port, [n.address for n in nodes]))
            client = await HttpClient.open(port)
            reply = await client.request("POST", "/order", b"pay 10", chunked=driver == "task")
            assert (reply.status, reply.complete) == (502, True)
            assert json.loads(reply.body)["status"] == 502
            assert sum(n.requests for n in nodes) == 1  # no second attempt of the POST
            reply = await client.request("GET", "/again")  # the same client connection
            assert reply.status == 502 and reply.complete
            await client.aclose()
            assert await daemon.metric("l4gw_http_requests_total", status="502") == 2
            lines = await daemon.wait_log("request", count=2)
            assert [line["status"] for line in lines] == [502, 502]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("driver", ["fast", "task"])
async def test_http_node_reset_after_the_head_cuts_the_client(
    l4gw_daemon: DaemonFactory, driver: str, framing: str
) -> None:
    """L7: once the head and part of the body went out, a node reset cannot become a 502; the
    client's connection is cut so that it can tell: its parser never sees the end of the
    message (no final chunk, fewer bytes than Content-Length). The POST is not retried, and
    the access line says the response was cut short."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            behaviour = _http_reset_node(head_sent=True, chunked_response=framing == "chunked")
            nodes = [await FaultNode(behaviour).start(nursery) for _ in range(2)]
            port = free_port()
            daemon = await l4gw_daemon(config(port, [n.address for n in nodes]))
            client = await HttpClient.open(port)
            reply = await client.request("POST", "/order", b"pay 10", chunked=driver == "task")
            await client.aclose()
            assert reply.status == 200
            assert reply.body == PARTIAL
            assert not reply.complete
            assert reply.cut in ("reset", "eof")
            assert sum(n.requests for n in nodes) == 1
            # The access line keeps the node's status and says the response was cut.
            (line,) = await daemon.wait_log("request")
            assert line["status"] == 200
            assert "response cut short" in line.get("reason", ""), line
            print(f"\nnode reset after the head ({driver}, {framing}): client saw {reply.cut}")
            nursery.cancel_scope.cancel()


# -- 2. a node that accepts and never answers ----------------------------------------------


async def _silent(node: FaultNode, stream: trio.SocketStream) -> None:
    node.requests += 1
    await trio.sleep_forever()  # holds the connection open and reads nothing


async def test_http_silent_node_gives_504_after_response_timeout(
    l4gw_daemon: DaemonFactory,
) -> None:
    """http: a node that accepts and never answers costs the client ``response_timeout``, then
    a 504 (counted), not a hang."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            node = await FaultNode(_silent).start(nursery)
            port = free_port()
            daemon = await l4gw_daemon(
                config(port, [node.address], upstream='response_timeout = "500ms"')
            )
            client = await HttpClient.open(port)
            started = trio.current_time()
            reply = await client.request("GET", "/slow")
            waited = trio.current_time() - started
            await client.aclose()
            assert reply.status == 504 and reply.complete
            assert waited >= 0.5
            assert await daemon.metric("l4gw_http_requests_total", status="504") == 1
            print(f"\n504 after {waited:.2f}s (response_timeout 0.5s)")
            nursery.cancel_scope.cancel()


async def test_tcp_silent_node_ends_at_idle_timeout(l4gw_daemon: DaemonFactory) -> None:
    """tcp: a node that accepts and never sends a byte is cut at the upstream's
    ``idle_timeout``: the client's connection ends, and the access line says why."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            node = await FaultNode(_silent).start(nursery)
            port = free_port()
            daemon = await l4gw_daemon(
                config(port, [node.address], mode="tcp", upstream='idle_timeout = "500ms"')
            )
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                started = trio.current_time()
                data, end = await recv_until_end(sock)
                waited = trio.current_time() - started
            assert data == b""
            assert waited >= 0.5
            (line,) = await daemon.wait_log("connection")
            assert line["reason"] == "idle timeout"
            assert await daemon.metric("l4gw_idle_timeouts_total") == 1
            print(f"\ntcp idle cut after {waited:.2f}s (idle_timeout 0.5s), client saw {end}")
            nursery.cancel_scope.cancel()


# -- 3. a node that answers garbage -------------------------------------------------------

GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe garbage\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS record
    ],
    ids=["ssh-banner", "bad-status", "tls"],
)
@pytest.mark.parametrize("driver", ["fast", "task"])
async def test_http_garbage_from_a_node_is_502_and_the_connection_is_dropped(
    l4gw_daemon: DaemonFactory, driver: str, garbage: bytes
) -> None:
    """A node connection that answers something that is not HTTP: 502 for the client at once
    (even when no CRLF ever comes, as from a TLS node), the gateway closes that node
    connection (it is never reused), and the next request on the same client connection is
    served on a fresh node connection."""

    async def garbage_once(node: FaultNode, stream: trio.SocketStream) -> None:
        while await read_request(stream):
            node.requests += 1
            if node.requests == 1:
                await stream.send_all(garbage)
                await node.wait_closed(stream)
                return
            await stream.send_all(GOOD)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            node = await FaultNode(garbage_once).start(nursery)
            port = free_port()
            daemon = await l4gw_daemon(
                config(port, [node.address], upstream='response_timeout = "30s"')
            )
            client = await HttpClient.open(port)
            chunked = driver == "task"
            with trio.fail_after(8):  # a 502 now, not a 504 after response_timeout
                first = await client.request("POST", "/a", b"x", chunked=chunked)
            assert (first.status, first.complete) == (502, True)
            await wait_until(lambda: node.closed_by_peer == 1)
            second = await client.request("POST", "/b", b"y", chunked=chunked)
            third = await client.request("GET", "/c")
            await client.aclose()
            assert (second.status, second.body, second.complete) == (200, b"ok", True)
            assert (third.status, third.body) == (200, b"ok")
            assert node.requests == 3
            assert node.connections == 2  # the garbage connection was not reused
            assert await daemon.metric("l4gw_http_requests_total", status="502") == 1
            nursery.cancel_scope.cancel()


# -- 4. a node killed under load -------------------------------------------------------------

#: A node in its own process, so that it can be SIGKILLed: HTTP/1.1 keep-alive, answers every
#: request with its name after 10 ms. Prints its port when it listens.
NODE_SCRIPT = r"""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1].encode()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        time.sleep(0.01)  # some work: requests are in flight when the node dies
        self.send_response(200)
        self.send_header("Content-Length", str(len(NAME)))
        self.end_headers()
        self.wfile.write(NAME)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture
def node_processes() -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], int]]]:
    """Start node processes (``NODE_SCRIPT``); each still running is killed by its PID."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> tuple[subprocess.Popen[bytes], int]:
        proc = subprocess.Popen(
            [sys.executable, "-c", NODE_SCRIPT, name], stdout=subprocess.PIPE, cwd=REPO
        )
        started.append(proc)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def node_doc(doc: dict[str, Any], address: str) -> dict[str, Any]:
    nodes = {n["address"]: n for n in doc["upstreams"][0]["nodes"]}
    entry: dict[str, Any] = nodes[address]
    return entry


@dataclass
class Load:
    """What the clients of a load run saw."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)


async def http_load(port: int, load: Load, clients: int, requests: int, method: str) -> None:
    """``clients`` keep-alive clients, ``requests`` requests in all; a client whose
    connection fails opens a new one."""
    left = requests

    async def one() -> None:
        nonlocal left
        client: HttpClient | None = None
        while left > 0:
            left -= 1
            try:
                if client is None:
                    client = await HttpClient.open(port)
                with trio.fail_after(10):
                    reply = await client.request(method, "/load", b"x" if method == "POST" else b"")
            except (OSError, trio.BrokenResourceError, h11.LocalProtocolError) as exc:
                load.failures.append(f"client {type(exc).__name__}")
                reply = Reply(cut="error")
            if reply.status == 200 and reply.complete:
                load.ok += 1
                name = reply.body.decode()
                load.answers[name] = load.answers.get(name, 0) + 1
                continue
            load.failures.append(f"{reply.status} {reply.cut}".strip())
            if client is not None and not (reply.complete and reply.status == 502):
                await client.aclose()
                client = None
        if client is not None:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)


async def test_http_node_killed_under_load_is_ejected_and_errors_are_counted(
    l4gw_daemon: DaemonFactory,
    node_processes: Callable[[str], tuple[subprocess.Popen[bytes], int]],
) -> None:
    """Two node processes; 4 keep-alive clients send 400 POSTs; one node is SIGKILLed after
    the first 100 answers. The failures the clients see are bounded by the requests in flight
    on that node when it died (at most one per client), each is a 502 counted in
    ``l4gw_http_requests_total``; passive health ejects the dead node (its refused connects
    are retried on the other node, ``retries`` = 5), and once it is ejected every request
    succeeds."""
    clients = 4
    with trio.fail_after(60):
        proc_a, port_a = node_processes("a")
        proc_b, port_b = node_processes("b")
        a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
        port = free_port()
        daemon = await l4gw_daemon(config(port, [a, b], health="passive_failures = 3"))
        load = Load()

        async def killer() -> None:
            await wait_until(lambda: load.ok >= 100, timeout=30)
            proc_b.kill()  # SIGKILL: the node's sockets close under the gateway's feet
            proc_b.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            await http_load(port, load, clients, 400, "POST")
        counted = await daemon.metric("l4gw_http_requests_total", status="502")
        doc = await daemon.status()
        print(
            f"\nnode killed under load: {len(load.failures)} client failures of 400 "
            f"{sorted(load.failures)}, answers {load.answers}, "
            f"502 counted {counted:.0f}, node b {node_doc(doc, b)['state']}"
        )
        assert len(load.failures) <= clients
        assert all(f == "502" for f in load.failures), load.failures
        assert counted == len(load.failures)
        assert load.ok + len(load.failures) == 400
        assert node_doc(doc, b)["state"] == "ejected"
        assert await daemon.metric("l4gw_node_healthy", upstream="web", node=b) == 0
        after = Load()
        await http_load(port, after, clients, 100, "POST")
        assert (after.ok, after.failures, after.answers) == (100, [], {"a": 100})
        assert proc_a.poll() is None


# -- 5. a worker process SIGKILLed under load ---------------------------------------------


async def _name_line(name: bytes, node: FaultNode, stream: trio.SocketStream) -> None:
    line = await read_line(stream)
    if line:
        node.requests += 1
        await stream.send_all(name + b":" + line)


def is_worker_of(pid: int, config_path: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--worker-index" in cmdline and str(config_path).encode() in cmdline


async def test_a_worker_killed_under_load_costs_only_its_connections(
    l4gw_daemon: DaemonFactory,
) -> None:
    """``workers = 2`` in tcp mode, 4 clients opening connection after connection; worker 0
    is SIGKILLed mid-way. Clients lose at most the connections the killed worker held (one
    per client at most), the other worker serves new connections throughout, and the control
    plane starts a new worker 0 that serves again. Measured: client errors, time from the kill
    until the new worker is ready and until it has served a connection."""
    clients = 4
    seen_pids: list[int] = []
    daemon: RunningDaemon | None = None
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                node = await FaultNode(partial(_name_line, b"n")).start(nursery)
                port = free_port()
                daemon = await l4gw_daemon(
                    config(port, [node.address], mode="tcp", daemon="workers = 2")
                )
                workers = (await daemon.status())["workers"]
                seen_pids += [w["pid"] for w in workers]
                victim = workers[0]["pid"]
                ok = 0
                errors: list[str] = []
                after_kill_ok = 0
                killed_at: float | None = None
                stop = trio.Event()

                async def client(index: int) -> None:
                    nonlocal ok, after_kill_ok
                    count = 0
                    # Until the watcher is done (bounded: 3000 connections a client, paced).
                    while not stop.is_set() and count < 3000:
                        count += 1
                        await trio.sleep(0.005)
                        try:
                            with trio.fail_after(10):
                                stream = await open_client(port)
                                async with stream:
                                    await stream.send_all(b"%d\n" % index)
                                    answer = await read_line(stream)
                        except (OSError, trio.BrokenResourceError) as exc:
                            errors.append(type(exc).__name__)
                            continue
                        if answer != b"n:%d\n" % index:
                            errors.append(f"answer {answer!r}")
                            continue
                        ok += 1
                        if killed_at is not None:
                            after_kill_ok += 1

                ready_after = served_after = -1.0

                async def kill_and_watch() -> None:
                    nonlocal killed_at, ready_after, served_after
                    assert daemon is not None
                    await wait_until(lambda: ok >= 100, timeout=30)
                    os.kill(victim, signal.SIGKILL)
                    killed_at = trio.current_time()
                    with trio.fail_after(30):
                        while served_after < 0:
                            doc = await daemon.status()
                            w0 = doc["workers"][0]
                            if w0["pid"] not in (None, victim) and w0["pid"] not in seen_pids:
                                seen_pids.append(w0["pid"])
                            fresh = w0["pid"] not in (None, victim)
                            elapsed = trio.current_time() - killed_at
                            if fresh and w0["state"] == "ready" and ready_after < 0:
                                ready_after = elapsed
                            if fresh and w0["reachable"] and w0["connections_total"] > 0:
                                served_after = elapsed
                            await trio.sleep(0.02)
                    await trio.sleep(0.5)  # some more load on both workers
                    stop.set()

                async with trio.open_nursery() as load:
                    load.start_soon(kill_and_watch)
                    for i in range(clients):
                        load.start_soon(client, i)
                doc = await daemon.status()
                print(
                    f"\nworker killed under load: {len(errors)} client errors {errors}, "
                    f"{ok} ok ({after_kill_ok} after the kill); new worker ready after "
                    f"{ready_after:.2f}s, serving after {served_after:.2f}s; "
                    f"worker_restarts {doc['worker_restarts']}"
                )
                assert len(errors) <= clients
                assert after_kill_ok > 0
                assert doc["worker_restarts"] == 1
                assert doc["workers"][1]["pid"] == workers[1]["pid"]
                # Every connection the node answered reached its client, but for those cut
                # by the kill after the node had answered.
                assert ok <= node.requests <= ok + len(errors)
                nursery.cancel_scope.cancel()
    finally:
        if daemon is not None:
            for pid in seen_pids:
                if is_worker_of(pid, daemon.config_path):
                    os.kill(pid, signal.SIGKILL)


# -- 6. a log destination that fails -----------------------------------------------------------


class OwnDaemon:
    """``l4gw run`` started here (its stdout and stderr go where the test says), stopped by
    its PID."""

    def __init__(self, tmp_path: Path, text: str, stderr: int) -> None:
        self.admin = f"127.0.0.1:{free_port()}"
        path = tmp_path / "faults.toml"
        path.write_text(text.replace("{admin}", self.admin))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("L4GW_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "l4gw", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=env,
            cwd=REPO,
        )

    async def wait_ready(self) -> None:
        with trio.fail_after(20):
            while True:
                assert self.proc.poll() is None, f"l4gw exited {self.proc.returncode}"
                try:
                    if (await http_get(self.admin, "/healthz", timeout=1))[0] == 200:
                        return
                except OSError:
                    pass
                await trio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def two_listeners(tcp_port: int, http_port: int, node: str) -> str:
    return f"""
[daemon]
admin = "{{admin}}"
log_format = "json"
drain_timeout = "2s"

[upstreams.web]
connect_timeout = "1s"
nodes = [{{ address = "{node}", weight = 1 }}]

[[listeners]]
name = "tcp"
listen = "127.0.0.1:{tcp_port}"
upstream = "web"

[[listeners]]
name = "http"
listen = "127.0.0.1:{http_port}"
mode = "http"
upstream = "web"
"""


async def _mixed(node: FaultNode, stream: trio.SocketStream) -> None:
    """tcp clients send a line and get it back; http clients get ``GOOD`` per request."""
    first = await stream.receive_some(65536)
    if first.startswith(b"GET "):
        data = first
        while True:
            while b"\r\n\r\n" in data:
                _, _, data = data.partition(b"\r\n\r\n")
                node.requests += 1
                await stream.send_all(GOOD)
            more = await stream.receive_some(65536)
            if not more:
                return
            data += more
    await stream.send_all(first)


async def traffic(tcp_port: int, http_port: int, rounds: int) -> tuple[int, int]:
    """``rounds`` tcp connections and ``rounds`` http requests (one keep-alive client);
    the number of each that got their full answer. Bounded: 5 s per exchange."""
    tcp_ok = http_ok = 0
    client = await HttpClient.open(http_port)
    try:
        for i in range(rounds):
            with trio.fail_after(5):
                stream = await open_client(tcp_port)
                async with stream:
                    await stream.send_all(b"line %d\n" % i)
                    if await read_line(stream) == b"line %d\n" % i:
                        tcp_ok += 1
                reply = await client.request("GET", f"/r{i}")
                if (reply.status, reply.body) == (200, b"ok"):
                    http_ok += 1
    finally:
        await client.aclose()
    return tcp_ok, http_ok


async def test_logs_to_a_full_disk_do_not_stop_traffic(tmp_path: Path) -> None:
    """stdout and stderr on /dev/full (every write fails with ENOSPC): access lines and every
    other log line fail, and traffic in both modes still flows, the admin endpoint answers
    and the daemon stays up."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            node = await FaultNode(_mixed).start(nursery)
            tcp_port, http_port = free_port(), free_port()
            full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
            try:
                daemon = OwnDaemon(tmp_path, two_listeners(tcp_port, http_port, node.address), full)
            finally:
                os.close(full)
            try:
                await daemon.wait_ready()
                tcp_ok, http_ok = await traffic(tcp_port, http_port, 300)
                assert (tcp_ok, http_ok) == (300, 300)
                assert daemon.proc.poll() is None
                code, body = await http_get(daemon.admin, "/metrics")
                assert code == 200
                assert b'l4gw_connections_total{listener="tcp",outcome="proxied"} 300' in body
                dropped = parse_metrics(body.decode())["l4gw_log_lines_dropped_total"]
                assert dropped.samples["l4gw_log_lines_dropped_total"] >= 600  # access lines
            finally:
                daemon.stop()
            nursery.cancel_scope.cancel()


async def test_a_log_pipe_nobody_reads_does_not_stop_traffic(tmp_path: Path) -> None:
    """stderr is a pipe whose reader stopped reading (a stuck log shipper): once the pipe is
    full, a blocking write would stop the whole event loop. Traffic must keep flowing (log
    lines are dropped instead), in both modes, well past the pipe's capacity."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            node = await FaultNode(_mixed).start(nursery)
            tcp_port, http_port = free_port(), free_port()
            read_end, write_end = os.pipe()
            try:
                daemon = OwnDaemon(
                    tmp_path, two_listeners(tcp_port, http_port, node.address), write_end
                )
                os.close(write_end)
                write_end = -1
                try:
                    await daemon.wait_ready()
                    # 2 x 600 access lines of ~250 bytes: about 300 KB, the pipe holds 64 KiB.
                    started = time.monotonic()
                    tcp_ok, http_ok = await traffic(tcp_port, http_port, 600)
                    took = time.monotonic() - started
                    print(f"\n1200 exchanges past a full log pipe in {took:.1f}s")
                    assert (tcp_ok, http_ok) == (600, 600)
                    assert daemon.proc.poll() is None
                    os.set_blocking(read_end, False)
                    backlog = b""
                    try:
                        while chunk := os.read(read_end, 1 << 16):
                            backlog += chunk
                    except BlockingIOError:
                        pass
                    lines = backlog.decode().splitlines()
                    assert len(lines) > 100
                    assert all(json.loads(line) for line in lines)  # whole lines only
                    _, body = await http_get(daemon.admin, "/metrics")
                    dropped = parse_metrics(body.decode())["l4gw_log_lines_dropped_total"]
                    print(f"log lines in the pipe {len(lines)}, dropped {dropped.samples}")
                    assert dropped.samples["l4gw_log_lines_dropped_total"] > 0
                finally:
                    daemon.stop()
            finally:
                os.close(read_end)
                if write_end >= 0:
                    os.close(write_end)
            nursery.cancel_scope.cancel()
