"""Listener pieces that need no daemon: binding, admission, the connection-task guard."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import structlog
import trio

from l4gw.core.acl import SourceACL
from l4gw.core.config import parse_config
from l4gw.core.netaddr import SocketAddress, parse_network
from l4gw.core.ratelimit import RateLimiter
from l4gw.core.runtime import ListenerRuntime, ListenerStats
from l4gw.l4.client import ClientConnection
from l4gw.serve import listeners
from l4gw.serve.listeners import BindError, admit, bind_listener


def runtime(mode: str, *, deny: str = "", rate: float = 0, maximum: int = 0) -> ListenerRuntime:
    config = parse_config(
        {
            "upstreams": {"web": {"nodes": ["127.0.0.1:1"]}},
            "listeners": [
                {
                    "name": "l",
                    "listen": "127.0.0.1:0",
                    "mode": mode,
                    "upstream": "web",
                    "max_connections": maximum,
                    "rate_limit": rate,
                }
            ],
        }
    )
    lc = config.listeners[0]
    return ListenerRuntime(
        config=lc,
        stats=ListenerStats(),
        acl=SourceACL((), (parse_network(deny),) if deny else ()),
        rate_limiter=RateLimiter(lc.rate_limit, lc.rate_limit_burst),
        upstreams={},
    )


def test_admit_tcp_refuses_at_accept() -> None:
    listener = runtime("tcp", deny="10.0.0.0/8", rate=1, maximum=1)
    assert admit(listener, "10.1.2.3", 0.0) == "denied"
    assert admit(listener, "192.0.2.1", 0.0) is None
    assert admit(listener, "192.0.2.1", 0.0) == "rate_limited"
    listener.stats.active = 1
    assert admit(listener, "192.0.2.2", 5.0) == "max_connections"


def test_admit_http_leaves_acl_and_rate_to_each_request() -> None:
    """http mode answers 403/429 per request, so the accept loop lets those through."""
    listener = runtime("http", deny="10.0.0.0/8", rate=1, maximum=1)
    assert admit(listener, "10.1.2.3", 0.0) is None
    assert admit(listener, "10.1.2.3", 0.0) is None
    listener.stats.active = 1
    assert admit(listener, "10.1.2.3", 0.0) == "max_connections"


def test_bind_failure_names_listener_and_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=rf"listener web: cannot listen on 127.0.0.1:{port}"):
            bind_listener("web", SocketAddress("127.0.0.1", port))


def accepted_pair() -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of a loopback connection."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return accepted, client


async def test_a_bug_in_a_handler_costs_one_connection_not_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection task is the one owner: the socket is closed and the connection
    finished (counted, logged) whatever the serving code does."""
    listener = runtime("tcp")

    async def broken(_conn: ClientConnection, _ctx: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(listeners, "_serve", broken)
    accepted, client = accepted_pair()
    with client, trio.fail_after(5), structlog.testing.capture_logs() as logs:
        conn = ClientConnection(listener, accepted, ("127.0.0.1", 1), trio.current_time())
        assert listener.stats.active == 1
        await listeners._serve_task(conn, None)  # type: ignore[arg-type]
        assert client.recv(10) == b""  # closed
    assert accepted.fileno() == -1
    assert listener.stats.active == 0 and listener.stats.outcomes["error"] == 1
    assert [entry["event"] for entry in logs] == ["connection_failed", "connection"]
    assert logs[0]["listener"] == "l"
    assert logs[1]["outcome"] == "error" and logs[1]["reason"] == "internal error"


async def test_cancellation_still_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = runtime("tcp")

    async def sleeper(_conn: ClientConnection, _ctx: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(listeners, "_serve", sleeper)
    accepted, client = accepted_pair()
    with client, trio.fail_after(5):
        conn = ClientConnection(listener, accepted, ("127.0.0.1", 1), trio.current_time())
        with trio.move_on_after(0.01) as scope:
            with structlog.testing.capture_logs() as logs:
                await listeners._serve_task(conn, None)  # type: ignore[arg-type]
        assert scope.cancelled_caught
    assert accepted.fileno() == -1 and listener.stats.active == 0
    assert logs[-1]["outcome"] == "error" and logs[-1]["reason"] == "shutdown"


_SPARE_SCRIPT = textwrap.dedent(
    """
    import errno, os, resource, socket
    from l4gw.serve.listeners import SpareDescriptor

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.create_connection(server.getsockname())
    spare = SpareDescriptor()
    filler = []
    try:
        while True:
            filler.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    try:
        server.accept()
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    else:
        raise AssertionError("accept worked with no descriptor left")
    peer = spare.refuse_one(server)
    assert peer == client.getsockname(), peer
    try:
        got = client.recv(1)
    except ConnectionResetError:
        got = b"reset"
    assert got == b"reset", got
    assert spare.fd >= 0  # taken again
    assert spare.refuse_one(server) is None  # nothing waiting
    print("ok")
    """
)


def test_spare_descriptor_refuses_a_connection_when_out_of_descriptors() -> None:
    """Out of descriptors (EMFILE), ``accept`` cannot take a connection off the backlog; the
    spare descriptor frees one for it, resets it, and is held again (run in a child process
    with ``RLIMIT_NOFILE`` 64)."""
    done = subprocess.run(
        [sys.executable, "-c", _SPARE_SCRIPT], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
