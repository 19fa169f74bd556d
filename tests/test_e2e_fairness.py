"""End-to-end with the real ``l4gw run`` on loopback: what one busy http connection, or one
client's odd request, must not do to the rest of the daemon.

* A client pushing bytes as fast as it can through a protocol upgrade or a chunked upload
  does not hold the daemon's trio thread: another client's keep-alive requests are answered
  and health checks keep running meanwhile (``docs/http.md``, "Fairness").
* Serving clients does not change how the health checker parses a node's response: a node
  whose health response uses obsolete line folding stays up after client traffic (the
  refusal of folding applies to clients only; ``docs/http.md``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio

from .conftest import DaemonFactory, RunningDaemon, free_port, open_client

pytestmark = pytest.mark.e2e

#: Bytes pushed per send by the busy client.
BLOCK = 1 << 20
#: The most the busy client pushes (256 MiB).
PUSH_LIMIT = 16384 * BLOCK
#: The longest the busy client pushes (real seconds) before the test gives up waiting for
#: the other client and the health checks.
PUSH_TIME = 6.0
#: What the other client and the health checker must see while the push runs.
ANSWERS = 10
CHECKS = 4
#: Each keep-alive answer within this (real seconds; generous).
ANSWER_TIME = 2.0

HEALTH_INTERVAL = 0.25


class Node:
    """An HTTP node on loopback: ``GET /health`` (counted, with the time) and any other
    request (keep-alive, ``ok``). ``fold`` adds an obs-folded header to the health
    response."""

    def __init__(self) -> None:
        self.port = 0
        self.checks: list[float] = []
        self.fold = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        buffer = b""
        for _ in range(100_000):
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data or len(buffer) > 65536:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            if head.startswith(b"GET /health "):
                self.checks.append(trio.current_time())
                fold = b"X-Folded: a\r\n b\r\n" if self.fold else b""
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\n"
                    + fold
                    + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with trio.open_nursery() as nursery:
        node = Node()
        await node.start(nursery)
        yield node
        nursery.cancel_scope.cancel()


def config(port: int, node: Node, sink: int = 0) -> str:
    """An http listener: ``/push`` to the upstream ``sink`` (port ``sink``, no checks),
    everything else to ``node`` (checked every ``HEALTH_INTERVAL``)."""
    return f"""
[daemon]
admin = "{{admin}}"
log_level = "info"
log_format = "json"
drain_timeout = "1s"

[upstreams.web]
nodes = [{{ address = "{node.address}", weight = 1 }}]
idle_timeout = "30s"

[upstreams.web.health]
check = "http"
path = "/health"
interval = "{int(HEALTH_INTERVAL * 1000)}ms"
timeout = "240ms"
healthy_threshold = 1
unhealthy_threshold = 1

[upstreams.sink]
nodes = [{{ address = "127.0.0.1:{sink or 9}", weight = 1 }}]
idle_timeout = "30s"

[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"
mode = "http"
idle_timeout = "30s"

[[listeners.routes]]
path = "/push"
upstream = "sink"

[[listeners.routes]]
path = "/{{proxy+}}"
upstream = "web"
"""


async def read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """The next response head (without the blank line); its bytes leave ``buffer``."""
    for _ in range(10_000):
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return head
        data = await stream.receive_some(65536)
        assert data, "the gateway closed"
        buffer += data
    raise AssertionError("no response head")


async def ping(stream: trio.SocketStream, buffer: bytearray) -> None:
    """One keep-alive ``GET /ping``, answered ``200 ok``."""
    await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = await read_head(stream, buffer)
    assert head.startswith(b"HTTP/1.1 200 "), head
    while len(buffer) < 2:
        data = await stream.receive_some(65536)
        assert data, "the gateway closed"
        buffer += data
    assert buffer[:2] == b"ok"
    del buffer[:2]


async def node_state(daemon: RunningDaemon, address: str) -> dict[str, Any]:
    status = await daemon.status()
    nodes = {n["address"]: n for u in status["upstreams"] for n in u["nodes"]}
    entry: dict[str, Any] = nodes[address]
    return entry


# --------------------------------------------------------------------------------------
# Fairness: a busy connection does not hold the trio thread
#
# The busy client and the node it pushes to are processes of their own with blocking sockets,
# so they keep up with the daemon: its reads always find bytes and its writes always find
# room, which is when a relay loop never has to wait for the kernel.

#: The node the push goes to: listens, prints its port, takes one connection, answers an
#: upgrade with 101, then reads and discards everything until EOF.
SINK = """
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
server.settimeout(30)
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.settimeout(30)
head = b""
while b"\\r\\n\\r\\n" not in head:
    data = conn.recv(65536)
    if not data:
        sys.exit()
    head += data
if b"upgrade: x-push" in head.lower():
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\\r\\n"
        b"Connection: Upgrade\\r\\nUpgrade: x-push\\r\\n\\r\\n"
    )
buffer = bytearray(1 << 24)
try:  # MSG_TRUNC: TCP discards the bytes without copying them
    while conn.recv_into(buffer, len(buffer), socket.MSG_TRUNC):
        pass
except OSError:
    pass
"""

#: The busy client: ``argv``: port, kind (upgrade or upload), limit (bytes), time limit (s).
#: Sends the head (and reads the 101), prints "started", pushes 1 MiB blocks (one chunk
#: each for an upload) until the limits or SIGTERM, then prints "pushed <bytes> <seconds>".
PUSHER = """
import signal, socket, sys, time
CHUNK = 1024
port, kind, limit, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
sock = socket.create_connection(("127.0.0.1", port), timeout=30)
block = b"x" * (1 << 20)
if kind == "upgrade":
    sock.sendall(
        b"GET /push HTTP/1.1\\r\\nHost: gw\\r\\n"
        b"Connection: Upgrade\\r\\nUpgrade: x-push\\r\\n\\r\\n"
    )
    response = b""
    while b"\\r\\n\\r\\n" not in response:
        data = sock.recv(65536)
        assert data, "the gateway closed"
        response += data
    assert response.startswith(b"HTTP/1.1 101 "), response
else:
    sock.sendall(b"POST /push HTTP/1.1\\r\\nHost: gw\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
    piece = b"x" * CHUNK
    block = (b"%x\\r\\n" % CHUNK + piece + b"\\r\\n") * ((1 << 20) // CHUNK)
print("started", flush=True)
pushed = 0
began = time.monotonic()
if kind == "upgrade":  # from the page cache, without copying in this process
    import tempfile
    with tempfile.TemporaryFile() as source:
        source.write(block * 64)
        source.flush()
        while pushed < limit and not stop and time.monotonic() - began < seconds:
            source.seek(0)
            pushed += sock.sendfile(source)
else:
    while pushed < limit and not stop and time.monotonic() - began < seconds:
        sock.sendall(block)
        pushed += 1 << 20
print("pushed", pushed, time.monotonic() - began, flush=True)
sock.close()
"""


async def read_stdout_line(proc: trio.Process) -> str:
    assert proc.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        assert chunk, "the helper process ended early"
        data += chunk
    return data.decode().strip()


@pytest.mark.parametrize("kind", ["upgrade", "upload"])
async def test_a_busy_connection_does_not_starve_the_daemon(
    l4gw_daemon: DaemonFactory, node: Node, kind: str
) -> None:
    with trio.fail_after(40):
        sink = await trio.lowlevel.open_process(
            [sys.executable, "-c", SINK], stdout=subprocess.PIPE
        )
        pusher: trio.Process | None = None
        try:
            sink_port = int(await read_stdout_line(sink))
            port = free_port()
            daemon = await l4gw_daemon(config(port, node, sink=sink_port))
            with trio.fail_after(10):
                while not node.checks or (await node_state(daemon, node.address))["state"] != "up":
                    await trio.sleep(0.05)
            other = await open_client(port)
            other_buffer = bytearray()
            await ping(other, other_buffer)  # the keep-alive connection is open and served

            pusher = await trio.lowlevel.open_process(
                [sys.executable, "-c", PUSHER, str(port), kind, str(PUSH_LIMIT), str(PUSH_TIME)],
                stdout=subprocess.PIPE,
            )
            assert await read_stdout_line(pusher) == "started"
            checks_before = len(node.checks)
            answers: list[float] = []  # how long each answer took, while the push ran
            slow: list[float] = []  # answers not there within ANSWER_TIME
            outcome: list[str] = []

            async def wait_push() -> None:
                assert pusher is not None
                outcome.append(await read_stdout_line(pusher))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_push)
                for _ in range(100_000):
                    started = trio.current_time()
                    with trio.move_on_after(ANSWER_TIME) as scope:
                        await ping(other, other_buffer)
                    took = trio.current_time() - started
                    if scope.cancelled_caught:
                        slow.append(took)
                        break
                    if outcome:
                        break  # the push had ended
                    answers.append(took)
                    if len(answers) >= ANSWERS and len(node.checks) - checks_before >= CHECKS:
                        break  # enough seen
                if not outcome:
                    pusher.terminate()
            checks = len(node.checks) - checks_before
            await other.aclose()
        finally:
            for proc in (pusher, sink):
                if proc is not None:
                    proc.kill()
                    await proc.wait()

        _, pushed, seconds = outcome[0].split()
        report = (
            f"{kind}: pushed {int(pushed) >> 20} MiB in {float(seconds):.2f}s; "
            f"{len(answers)} answers (slowest {max(answers, default=0):.3f}s), "
            f"{len(slow)} not within {ANSWER_TIME}s; {checks} health checks"
        )
        print(report)
        assert not slow, report
        assert len(answers) >= ANSWERS, report
        assert checks >= CHECKS, report


# --------------------------------------------------------------------------------------
# Obsolete line folding: refused from clients only


async def test_health_verdict_on_a_folded_response_does_not_change_after_client_traffic(
    l4gw_daemon: DaemonFactory, node: Node
) -> None:
    """h11 accepts a node's obs-folded health response (it unfolds it). Serving clients,
    whose folded heads the gateway refuses, must not change that."""
    node.fold = True
    with trio.fail_after(30):
        port = free_port()
        daemon = await l4gw_daemon(config(port, node))
        with trio.fail_after(10):
            while (await node_state(daemon, node.address)).get("last_check") != "status 200":
                await trio.sleep(0.05)
        # Client traffic through the http listener: a folded request (refused, 400) and a
        # plain one.
        stream = await open_client(port)
        async with stream:
            buffer = bytearray()
            await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n b\r\n\r\n")
            head = await read_head(stream, buffer)
            assert head.startswith(b"HTTP/1.1 400 "), head
        stream = await open_client(port)
        async with stream:
            await ping(stream, bytearray())
        # Checks after the traffic: the verdict is the same.
        seen = len(node.checks)
        with trio.fail_after(10):
            while len(node.checks) < seen + 4:
                await trio.sleep(0.05)
        await trio.sleep(0.1)  # the last check's result is recorded
        entry = await node_state(daemon, node.address)
        assert entry["last_check"] == "status 200", entry
        assert entry["state"] == "up", entry
        assert not daemon.logs("node_health") or all(
            e.get("healthy") is not False for e in daemon.logs("node_health")
        )
