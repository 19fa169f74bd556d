"""End-to-end PROXY protocol with the real ``l4gw run``: sending v1/v2 to nodes, accepting
v1/v2 from a peer in front (the ACL and limits then apply to the address in the header), and
interoperation with HAProxy on both sides.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from l4gw.core.proxyproto import (
    ProxyHeaderParser,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    encode_v2_local,
)

from .conftest import (
    DaemonFactory,
    RunningDaemon,
    free_port,
    open_client,
    read_all,
    read_line,
    require_program,
)

pytestmark = pytest.mark.e2e

#: The listener's wait for a whole PROXY header (l4gw.listeners.PROXY_HEADER_TIMEOUT).
HEADER_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------
# Helpers


async def _header_reporter(stream: trio.SocketStream) -> None:
    """Node behaviour: parse the PROXY header l4gw sends, reply with what it says, then echo.

    Reply line: ``v<version> <command> <src ip> <src port> <dst ip> <dst port>``.
    """
    parser = ProxyHeaderParser()
    try:
        info = None
        while info is None:
            data = await stream.receive_some(4096)
            if not data:
                return
            try:
                info = parser.feed(data)
            except ProxyProtocolError as exc:
                await stream.send_all(f"bad header: {exc}\n".encode())
                return
        src = info.source or ("-", 0)
        dst = info.destination or ("-", 0)
        line = f"v{info.version} {info.command} {src[0]} {src[1]} {dst[0]} {dst[1]}\n"
        await stream.send_all(line.encode() + parser.remainder)
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _echo(stream: trio.SocketStream) -> None:
    """Node behaviour: greet with ``node``, then echo."""
    try:
        await stream.send_all(b"node\n")
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Any]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def config(
    node_port: int,
    port: int,
    *,
    host: str = "127.0.0.1",
    upstream: str = "",
    listener: str = "",
) -> str:
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"""
[daemon]
admin = "{{admin}}"
log_level = "info"
log_format = "json"
drain_timeout = "5s"

[upstreams.web]
connect_timeout = "1s"
nodes = [{{ address = "127.0.0.1:{node_port}", weight = 1 }}]
{upstream}

[[listeners]]
name = "gw"
listen = "{listen}"
upstream = "web"
{listener}
"""


async def expect_closed(stream: trio.SocketStream) -> None:
    """The gateway closed the connection (EOF or reset) without sending anything."""
    try:
        data = await stream.receive_some(4096)
    except trio.BrokenResourceError:
        data = b""
    await stream.aclose()
    assert data == b""


async def send_header(
    port: int, header: bytes, source: str | None = None
) -> trio.SocketStream | None:
    """Connect and send ``header``; None if the gateway reset the connection already."""
    try:
        stream = await open_client(port, source=source)
    except ConnectionResetError:
        return None
    try:
        await stream.send_all(header)
    except trio.BrokenResourceError:
        pass
    return stream


def local_port(stream: trio.SocketStream) -> int:
    port: int = stream.socket.getsockname()[1]
    return port


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def outcome_count(daemon: RunningDaemon, outcome: str) -> float:
    return await daemon.metric("l4gw_connections_total", listener="gw", outcome=outcome)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


HaproxyFactory = Callable[[str], Awaitable[subprocess.Popen[bytes]]]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HaproxyFactory]:
    """Start ``haproxy -db -f <cfg>`` (foreground, its own temp config, output in
    ``haproxy<N>.log``); every process started is killed by its PID after the test."""
    program = require_program("haproxy")
    started: list[subprocess.Popen[bytes]] = []

    async def start(text: str) -> subprocess.Popen[bytes]:
        path = tmp_path / f"haproxy{len(started)}.cfg"
        path.write_text(text)
        log_path = tmp_path / f"haproxy{len(started)}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [program, "-db", "-f", str(path)], stdout=log_file, stderr=subprocess.STDOUT
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


async def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until something accepts on 127.0.0.1:port (fails early if ``proc`` exited)."""
    while True:
        if proc.poll() is not None:
            output = await trio.Path(log).read_text()
            raise AssertionError(f"haproxy exited {proc.returncode}:\n{output}")
        try:
            probe = await open_client(port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await probe.aclose()
        return


HAPROXY_GLOBAL = """
global
    maxconn 200

defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


# --------------------------------------------------------------------------------------------
# Sending a PROXY header to the nodes


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_sends_client_address_to_node(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, version: str
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _header_reporter)
        port = free_port()
        daemon = await l4gw_daemon(config(node, port, upstream=f'proxy_protocol = "{version}"'))
        for source in ("127.0.0.5", "127.0.0.6"):
            stream = await open_client(port, source=source)
            line = (await read_line(stream)).decode().split()
            assert line == [
                version,
                "proxy",
                source,
                str(local_port(stream)),
                "127.0.0.1",
                str(port),
            ]
            # The header is followed by the client's bytes, untouched.
            await stream.send_all(b"hello\n")
            assert await read_line(stream) == b"hello\n"
            await stream.send_eof()
            assert await read_all(stream) == b""
            await stream.aclose()
        lines = await daemon.wait_log("connection", count=2, outcome="proxied")
        # bytes_in counts what the client sent, not the header the gateway added.
        assert [line["bytes_in"] for line in lines] == [6, 6]


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_sends_ipv6_client_address_to_node(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, version: str
) -> None:
    if not have_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    with trio.fail_after(30):
        node = await serve(nursery, _header_reporter)
        port = free_port("::1")
        await l4gw_daemon(config(node, port, host="::1", upstream=f'proxy_protocol = "{version}"'))
        stream = await open_client(port, host="::1")
        line = (await read_line(stream)).decode().split()
        assert line == [version, "proxy", "::1", str(local_port(stream)), "::1", str(port)]
        await stream.send_all(b"six\n")
        assert await read_line(stream) == b"six\n"
        await stream.aclose()


# --------------------------------------------------------------------------------------------
# Accepting a PROXY header from a peer in front


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_accepts_header_and_logs_its_client(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, version: str
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _header_reporter)
        port = free_port()
        daemon = await l4gw_daemon(
            config(
                node,
                port,
                listener="accept_proxy_protocol = true",
                upstream='proxy_protocol = "v1"',
            )
        )
        encode = encode_v1 if version == "v1" else encode_v2
        header = encode(("10.9.8.7", 40000), ("192.0.2.1", 443))
        # Application bytes in the same segment as the header are forwarded after it.
        stream = await send_header(port, header + b"early\n")
        assert stream is not None
        # The node is told the client and the original destination of the header (passed
        # through as HAProxy does, not this listener's own address).
        assert (await read_line(stream)).split() == [
            b"v1",
            b"proxy",
            b"10.9.8.7",
            b"40000",
            b"192.0.2.1",
            b"443",
        ]
        assert await read_line(stream) == b"early\n"
        await stream.send_all(b"late\n")
        assert await read_line(stream) == b"late\n"
        await stream.aclose()
        (line,) = await daemon.wait_log("connection")
        assert line["client"] == "10.9.8.7:40000"
        assert line["outcome"] == "proxied"
        assert line["bytes_in"] == len(b"early\nlate\n")


async def test_local_header_uses_the_peer_address(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _echo)
        port = free_port()
        daemon = await l4gw_daemon(config(node, port, listener="accept_proxy_protocol = true"))
        stream = await send_header(port, encode_v2_local(), source="127.0.0.4")
        assert stream is not None
        client_port = local_port(stream)
        assert await read_line(stream) == b"node\n"
        await stream.aclose()
        (line,) = await daemon.wait_log("connection")
        assert line["client"] == f"127.0.0.4:{client_port}"


async def test_acl_applies_to_the_header_address(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _echo)
        port = free_port()
        # The peer (127.0.0.1) is not in `allow`: only the header's address is checked.
        listener = 'accept_proxy_protocol = true\nallow = ["10.0.0.0/8"]\ndeny = ["10.9.8.0/24"]'
        daemon = await l4gw_daemon(config(node, port, listener=listener))
        allowed = await send_header(port, encode_v2(("10.1.2.3", 1000), ("127.0.0.1", port)))
        assert allowed is not None
        assert await read_line(allowed) == b"node\n"
        await allowed.aclose()
        for encode in (encode_v1, encode_v2):
            stream = await send_header(port, encode(("10.9.8.7", 2000), ("127.0.0.1", port)))
            if stream is not None:
                await expect_closed(stream)
        denied = await daemon.wait_log("connection", count=2, outcome="denied")
        assert {line["client"] for line in denied} == {"10.9.8.7:2000"}
        assert await outcome_count(daemon, "denied") == 2
        # Outside `allow` altogether.
        stream = await send_header(port, encode_v1(("192.0.2.9", 3000), ("127.0.0.1", port)))
        if stream is not None:
            await expect_closed(stream)
        await daemon.wait_log("connection", client="192.0.2.9:3000", outcome="denied")
        assert await outcome_count(daemon, "proxied") == 1


async def test_rate_limit_applies_to_the_header_address(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _echo)
        port = free_port()
        # One connection per 5 s per client: the refill cannot hide the second one.
        listener = "accept_proxy_protocol = true\nrate_limit = 0.2\nrate_limit_burst = 1"
        daemon = await l4gw_daemon(config(node, port, listener=listener))
        # All from the peer 127.0.0.1, but from two clients according to their headers. One
        # at a time: headers are read concurrently, so their order is only known this way.
        first = await send_header(port, encode_v1(("10.0.0.1", 1), ("127.0.0.1", port)))
        assert first is not None
        assert await read_line(first) == b"node\n"
        second = await send_header(port, encode_v1(("10.0.0.1", 2), ("127.0.0.1", port)))
        if second is not None:
            await expect_closed(second)
        other = await send_header(port, encode_v1(("10.0.0.2", 3), ("127.0.0.1", port)))
        assert other is not None
        assert await read_line(other) == b"node\n"
        (line,) = await daemon.wait_log("connection", outcome="rate_limited")
        assert line["client"] == "10.0.0.1:2"
        await first.aclose()
        await other.aclose()


async def test_max_connections_with_proxy_headers(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _echo)
        port = free_port()
        listener = "accept_proxy_protocol = true\nmax_connections = 2"
        daemon = await l4gw_daemon(config(node, port, listener=listener))
        held = []
        for i in (1, 2):
            stream = await send_header(port, encode_v2((f"10.0.0.{i}", i), ("127.0.0.1", port)))
            assert stream is not None
            assert await read_line(stream) == b"node\n"
            held.append(stream)
        third = await send_header(port, encode_v2(("10.0.0.3", 3), ("127.0.0.1", port)))
        if third is not None:
            await expect_closed(third)
        # Refused at accept (a connection waiting for its header counts too), so the log
        # shows the peer, not the address the header would have carried.
        (line,) = await daemon.wait_log("connection", outcome="max_connections")
        assert line["client"].startswith("127.0.0.1:")
        assert await outcome_count(daemon, "max_connections") == 1
        # Once one closes, a new one is admitted.
        await held.pop().aclose()
        while await daemon.metric("l4gw_active_connections", listener="gw") != 1:
            await trio.sleep(0.01)
        stream = await send_header(port, encode_v1(("10.0.0.4", 4), ("127.0.0.1", port)))
        assert stream is not None
        assert await read_line(stream) == b"node\n"
        held.append(stream)
        for stream in held:
            await stream.aclose()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 10.9.8.7 127.0.0.1 99999 80\r\n",
        b"PROXY TCP4 10.9.8.7 127.0.0.1 1 80\n",
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12),
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\x0c" + bytes(12),
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),
    ],
    ids=["http", "v1-bad-port", "v1-bare-lf", "v2-bad-signature", "v2-short", "v2-version-3"],
)
async def test_malformed_header_is_closed(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery, garbage: bytes
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _echo)
        port = free_port()
        daemon = await l4gw_daemon(config(node, port, listener="accept_proxy_protocol = true"))
        stream = await send_header(port, garbage)
        if stream is not None:
            await expect_closed(stream)
        (rejected,) = await daemon.wait_log("proxy_header_rejected")
        assert rejected["peer"] == "127.0.0.1"
        assert await outcome_count(daemon, "error") == 1
        assert await outcome_count(daemon, "proxied") == 0


async def test_partial_header_times_out(l4gw_daemon: DaemonFactory, nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        node = await serve(nursery, _echo)
        port = free_port()
        daemon = await l4gw_daemon(config(node, port, listener="accept_proxy_protocol = true"))
        stream = await open_client(port)
        started = trio.current_time()
        await stream.send_all(b"PROXY TCP4 10.9")
        await expect_closed(stream)
        # Not before the header timeout (an upper bound would be a timing assertion).
        assert trio.current_time() - started >= HEADER_TIMEOUT - 0.5
        (rejected,) = await daemon.wait_log("proxy_header_rejected")
        assert rejected["peer"] == "127.0.0.1"
        assert await outcome_count(daemon, "error") == 1


async def test_proxy_protocol_from_restricts_the_peers(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _echo)
        port = free_port()
        listener = 'accept_proxy_protocol = true\nproxy_protocol_from = ["127.0.0.2/32"]'
        daemon = await l4gw_daemon(config(node, port, listener=listener))
        header = encode_v1(("10.9.8.7", 4444), ("127.0.0.1", port))
        trusted = await send_header(port, header, source="127.0.0.2")
        assert trusted is not None
        assert await read_line(trusted) == b"node\n"
        await trusted.aclose()
        untrusted = await send_header(port, header, source="127.0.0.3")
        if untrusted is not None:
            await expect_closed(untrusted)
        (denied,) = await daemon.wait_log("connection", outcome="denied")
        # Refused on the peer's own address, before any header is read.
        assert denied["client"].startswith("127.0.0.3:")
        (proxied,) = await daemon.wait_log("connection", outcome="proxied")
        assert proxied["client"] == "10.9.8.7:4444"


# --------------------------------------------------------------------------------------------
# HAProxy interop


async def test_haproxy_in_front_sends_v2(
    l4gw_daemon: DaemonFactory,
    nursery: trio.Nursery,
    haproxy: HaproxyFactory,
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        node = await serve(nursery, _header_reporter)
        port, front = free_port(), free_port()
        daemon = await l4gw_daemon(
            config(
                node,
                port,
                listener='accept_proxy_protocol = true\nproxy_protocol_from = ["127.0.0.1/32"]',
                upstream='proxy_protocol = "v1"',
            )
        )
        proc = await haproxy(
            HAPROXY_GLOBAL
            + f"""
frontend front
    mode tcp
    bind 127.0.0.1:{front}
    default_backend gateway

backend gateway
    mode tcp
    server l4gw 127.0.0.1:{port} send-proxy-v2
"""
        )
        await wait_listening(proc, front, tmp_path / "haproxy0.log")
        stream = await open_client(front, source="127.0.0.6")
        client_port = local_port(stream)
        # HAProxy -> l4gw (v2) -> node (v1): the node sees the real client.
        line = (await read_line(stream)).decode().split()
        assert line[:4] == ["v1", "proxy", "127.0.0.6", str(client_port)]
        await stream.send_all(b"through haproxy\n")
        assert await read_line(stream) == b"through haproxy\n"
        await stream.aclose()
        lines = await daemon.wait_log("connection", client=f"127.0.0.6:{client_port}")
        assert lines[0]["outcome"] == "proxied"


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_haproxy_behind_accepts_our_header(
    l4gw_daemon: DaemonFactory,
    haproxy: HaproxyFactory,
    tmp_path: Path,
    version: str,
) -> None:
    with trio.fail_after(30):
        port, back = free_port(), free_port()
        proc = await haproxy(
            HAPROXY_GLOBAL
            + f"""
frontend report
    mode http
    bind 127.0.0.1:{back} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port]"
"""
        )
        await wait_listening(proc, back, tmp_path / "haproxy0.log")
        await l4gw_daemon(config(back, port, upstream=f'proxy_protocol = "{version}"'))
        stream = await open_client(port, source="127.0.0.7")
        client_port = local_port(stream)
        await stream.send_all(b"GET / HTTP/1.0\r\nHost: gw\r\n\r\n")
        response = await read_all(stream)
        await stream.aclose()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), response
        assert body.decode() == f"127.0.0.7:{client_port}"
