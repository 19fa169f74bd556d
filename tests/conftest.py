"""Shared fixtures: the real daemon as a subprocess, loopback backends, free ports."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent

# Property tests check behaviour, not speed: on a loaded 2-core CI machine a slow example is
# not a failure (hypothesis's default is a 200 ms deadline per example).
settings.register_profile(
    "l4gw", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("l4gw")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on loopback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for sock in (a, b):
        sock.setblocking(False)
    return a, b


async def sock_send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking socket."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it is true (bounded by ``timeout``)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def sock_read_to_eof(sock: socket.socket) -> bytes:
    """Everything a non-blocking socket delivers until EOF (a reset raises)."""
    out = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not data:
            return bytes(out)
        out += data


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.Random()
_issued_ports: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, below the kernel's ephemeral range,
    and never handed out before in this test run.

    Below that range, no outgoing connection takes the port as its source port meanwhile;
    and a connection to a port that must stay dead cannot connect to itself (on loopback, a
    connect whose source port happens to equal the destination port succeeds, by TCP
    simultaneous open). Never handing a port out twice keeps two calls in one test (two
    dead nodes, a node and a listener) from getting the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    high = min(_ephemeral_low(), 65536) - 1
    low = min(20000, high - 1000)
    for _ in range(1000):
        port = _PORTS.randint(low, high)
        if port in _issued_ports:
            continue
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _issued_ports.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


async def http_get(address: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.0 GET (status, body) to ``host:port``."""
    host, _, port = address.rpartition(":")
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class RunningDaemon:
    """``l4gw run`` started as a subprocess with a real config file on loopback ports."""

    def __init__(
        self, proc: subprocess.Popen[bytes], config_path: Path, log_path: Path, admin: str
    ) -> None:
        self.proc = proc
        self.config_path = config_path
        self.log_path = log_path
        self.admin = admin

    async def get(self, path: str) -> tuple[int, bytes]:
        return await http_get(self.admin, path)

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/status")
        assert code == 200
        result: dict[str, Any] = json.loads(body)
        return result

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``/metrics`` (0 if absent)."""
        _, body = await self.get("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in body.decode().splitlines():
            if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
                sample, _, value = line.rpartition(" ")
                inner = sample[len(name) :].strip("{}")
                if all(part in inner.split(",") for part in want.split(",") if part):
                    return float(value)
        return 0.0

    def stderr_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far (optionally only one event)."""
        lines = []
        for line in self.stderr_text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if event is None or item.get("event") == event:
                lines.append(item)
        return lines

    async def wait_log(
        self, event: str, count: int = 1, timeout: float = 10.0, **fields: Any
    ) -> list[dict[str, Any]]:
        with trio.fail_after(timeout):
            while True:
                found = [
                    e for e in self.logs(event) if all(e.get(k) == v for k, v in fields.items())
                ]
                if len(found) >= count:
                    return found
                await trio.sleep(0.02)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.02)
        code = self.proc.returncode
        assert code is not None
        return code

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text)


DaemonFactory = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
def l4gw_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start ``l4gw run`` with a config; it is stopped (by its PID) after the test.

    The config text may use ``{admin}``: it is replaced by a free admin address, which the
    fixture polls (``/healthz``) before returning.
    """
    started: list[subprocess.Popen[bytes]] = []

    async def start(
        config_text: str,
        *,
        wait: bool = True,
        name: str = "conf",
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
    ) -> RunningDaemon:
        admin = f"127.0.0.1:{free_port()}"
        config_path = tmp_path / f"{name}.toml"
        config_path.write_text(config_text.replace("{admin}", admin))
        log_path = tmp_path / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("L4GW_CONFIG", None)
        command = [sys.executable, "-m", "l4gw", "run", "-c", str(config_path)]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [*(argv or []), *command],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=REPO,
            )
        started.append(proc)
        daemon = RunningDaemon(proc, config_path, log_path, admin)
        if wait:
            with trio.fail_after(20):
                while True:
                    if proc.poll() is not None:
                        raise AssertionError(
                            f"l4gw exited {proc.returncode}:\n" + daemon.stderr_text()
                        )
                    try:
                        code, _ = await http_get(admin, "/healthz", timeout=1)
                        if code == 200:
                            break
                    except OSError:
                        pass
                    await trio.sleep(0.05)
        return daemon

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


async def _named_echo(name: bytes, stream: trio.SocketStream) -> None:
    """Backend behaviour: greet with the backend's name, then echo until EOF, then close."""
    try:
        await stream.send_all(name + b"\n")
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def start_named_backends(nursery: trio.Nursery, names: list[str]) -> list[int]:
    """Start loopback TCP backends that greet with their name and echo; returns their ports."""
    ports = []
    for name in names:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_named_echo, name.encode()), 0, host="127.0.0.1")
        )
        ports.append(listeners[0].socket.getsockname()[1])
    return ports


async def open_client(
    port: int, host: str = "127.0.0.1", source: str | None = None
) -> trio.SocketStream:
    """A plain TCP client stream (optionally bound to a source address such as 127.0.0.7)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_line(stream: trio.abc.ReceiveStream, limit: int = 4096) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
        assert len(data) <= limit
    return data


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(1 << 16):
        data += chunk
    return bytes(data)


@pytest.fixture
async def backends() -> AsyncIterator[Callable[[list[str]], Awaitable[list[int]]]]:
    """Start named echo backends for the duration of the test."""
    async with trio.open_nursery() as nursery:

        async def start(names: list[str]) -> list[int]:
            return await start_named_backends(nursery, names)

        yield start
        nursery.cancel_scope.cancel()


def require_program(name: str) -> str:
    """The path of a real peer program; skips the test when it is missing, except under
    ``L4GW_REQUIRE_PEERS=1`` (set by ``.ci/run``), where a missing peer is a failure."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("L4GW_REQUIRE_PEERS") == "1":
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path
