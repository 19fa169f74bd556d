"""``l4gw demo``: three demo backends with weights 5, 3 and 1 behind a gateway on loopback.

Each backend answers an HTTP request with a line naming itself (so a ``curl`` loop shows the
weighted spread) and echoes anything else line by line (so ``nc`` shows the relay).
"""

from __future__ import annotations

import errno
import socket
import sys
from functools import partial

import trio

from ..core.config import parse_config
from ..core.logs import configure_logging
from ..serve.daemon import Daemon

DEMO_BACKENDS = (("backend-a", 5), ("backend-b", 3), ("backend-c", 1))
_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")


async def _serve_demo_client(name: str, stream: trio.SocketStream) -> None:
    """HTTP/1.1 answers (keep-alive) for HTTP requests; line echo for anything else."""
    buffer = b""
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            if buffer.startswith(_HTTP_METHODS):
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                    body = f"hello from {name} ({request_line})\n".encode()
                    closing = b"connection: close" in head.lower()
                    response = (
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                        + f"x-backend: {name}\r\ncontent-length: {len(body)}\r\n".encode()
                        + (b"connection: close\r\n" if closing else b"")
                        + b"\r\n"
                        + (b"" if request_line.startswith("HEAD") else body)
                    )
                    await stream.send_all(response)
                    if closing:
                        return
            else:
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    await stream.send_all(f"{name}: ".encode() + line + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


def _free_or(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1 now, else a free ephemeral port."""
    for candidate in (port, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            bound: int = probe.getsockname()[1]
            return bound
    raise OSError("no free port")


async def _demo_main(port: int, admin_port: int) -> None:
    async with trio.open_nursery() as nursery:
        backends: list[tuple[str, int, int]] = []
        for name, weight in DEMO_BACKENDS:
            listeners = await nursery.start(
                partial(trio.serve_tcp, partial(_serve_demo_client, name), 0, host="127.0.0.1")
            )
            backend_port = listeners[0].socket.getsockname()[1]
            backends.append((name, weight, backend_port))
        port = _free_or(port)
        admin_port = _free_or(admin_port)
        config = parse_config(
            {
                "daemon": {
                    "admin": f"127.0.0.1:{admin_port}",
                    "log_format": "console",
                    "drain_timeout": "2s",
                },
                "authorize": [{"name": "loopback", "address": "127.0.0.0/8", "ports": ["1-65535"]}],
                "upstreams": {
                    "demo": {
                        "balance": "round_robin",
                        "retries": 3,
                        "connect_timeout": "1s",
                        "nodes": [
                            {"address": f"127.0.0.1:{p}", "weight": w} for _, w, p in backends
                        ],
                    }
                },
                "listeners": [
                    {
                        "name": "demo",
                        "listen": f"127.0.0.1:{port}",
                        "mode": "tcp",
                        "upstream": "demo",
                        "allow": ["127.0.0.0/8", "::1"],
                    }
                ],
            },
            source="<demo>",
        )

        def ready(daemon: Daemon) -> None:
            lines = [
                "",
                "l4gw demo: a TCP gateway on loopback in front of three backends",
                "",
            ]
            for name, weight, backend_port in backends:
                lines.append(f"  {name}  127.0.0.1:{backend_port}  weight {weight}")
            lines += [
                "",
                f"  gateway  127.0.0.1:{port}  (mode tcp, smooth weighted round robin)",
                f"  admin    http://127.0.0.1:{admin_port}/status  /metrics  /healthz",
                "",
                "Try:",
                f"  for i in $(seq 9); do curl -s http://127.0.0.1:{port}/; done",
                f"  echo hello | nc -q1 127.0.0.1 {port}",
                f"  curl -s http://127.0.0.1:{admin_port}/metrics | grep l4gw_",
                f"  l4gw status --admin 127.0.0.1:{admin_port}",
                "",
                "Ctrl-C stops the demo.",
                "",
            ]
            print("\n".join(lines), flush=True)

        daemon = Daemon(config, on_ready=ready)
        await daemon.run()
        nursery.cancel_scope.cancel()


def run_demo(port: int = 8080, admin_port: int = 9901) -> int:
    """Run the demo until Ctrl-C (or SIGTERM); returns the exit status."""
    configure_logging("info", "console", sys.stderr)
    trio.run(_demo_main, port, admin_port)
    return 0
