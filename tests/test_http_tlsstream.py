"""TLSStream: server-side TLS over a socket with an SSLObject (l4gw.http.tlsstream).

Its use by the http data path (task and reactor) is tested through the gateway in
``tests/test_http_proxy.py`` (every test also runs over TLS) and
``tests/test_http_fastpath.py``; here: the stream on its own, against trio's client side.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
import trio.lowlevel

from l4gw.http.tlsstream import TLSStream, accept_tls

from .test_http_proxy import TLSCerts, gateway_certs, pattern

__all__ = ["gateway_certs"]  # the fixture


class Pair:
    """A connected loopback pair: ``client`` (trio.SSLStream once ``tls()`` ran) and the
    server socket ``server_sock``."""

    def __init__(self, client: trio.SocketStream, server_sock: trio.socket.SocketType) -> None:
        self.tcp = client
        self.server_sock = server_sock


async def tcp_pair() -> Pair:
    """A fresh loopback TCP connection, both ends."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
    server_sock, _ = await listener.accept()
    listener.close()
    return Pair(client, server_sock)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    made = await tcp_pair()
    try:
        yield made
    finally:
        made.server_sock.close()
        await trio.aclose_forcefully(made.tcp)


async def connect(
    pair: Pair, certs: TLSCerts, *, early: bytes = b""
) -> tuple[trio.SSLStream[trio.SocketStream], TLSStream]:
    client = trio.SSLStream(pair.tcp, certs.client, server_hostname="gw.test")
    server: TLSStream | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        server = await accept_tls(pair.server_sock, certs.server, 5, early)
    assert server is not None
    return client, server


async def test_both_ways_and_close_notify(pair: Pair, gateway_certs: TLSCerts) -> None:
    with trio.fail_after(10):
        client, server = await connect(pair, gateway_certs)
        assert server.ssl.selected_alpn_protocol() is None  # the client offered none
        await client.send_all(b"hello")
        assert await server.receive() == b"hello"
        await server.send_all(b"world")
        assert await client.receive_some(100) == b"world"
        # receive_some honours max_bytes; the rest comes next.
        await client.send_all(b"0123456789")
        assert await server.receive_some(4) == b"0123"
        assert server.buffered()
        assert await server.receive_some(100) == b"456789"
        # The client's close_notify is EOF; aclose answers with the server's.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.unwrap)
            assert await server.receive() == b""
            assert server.eof
            await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")
        assert server.socket.fileno() == -1


async def test_tcp_eof_without_close_notify_reads_as_eof(
    pair: Pair, gateway_certs: TLSCerts
) -> None:
    with trio.fail_after(10):
        client, server = await connect(pair, gateway_certs)
        await client.send_all(b"last")
        await pair.tcp.send_eof()
        assert await server.receive() == b"last"
        assert await server.receive() == b""
        await server.aclose()


async def test_early_bytes_start_the_handshake(pair: Pair, gateway_certs: TLSCerts) -> None:
    """Bytes read before the TLS stream (after a PROXY header) are its beginning."""
    with trio.fail_after(10):
        client = trio.SSLStream(pair.tcp, gateway_certs.client, server_hostname="gw.test")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await trio.lowlevel.wait_readable(pair.server_sock)
            await trio.sleep(0.05)
            hello = await pair.server_sock.recv(3)  # the first bytes of the ClientHello
            assert hello[:1] == b"\x16"
            server = await accept_tls(pair.server_sock, gateway_certs.server, 5, hello)
        await client.send_all(b"ok")
        assert await server.receive() == b"ok"


async def test_concurrent_send_and_receive_with_a_slow_reader(
    pair: Pair, gateway_certs: TLSCerts
) -> None:
    """One task sends 4 MiB to a client that reads slowly while another receives: the
    ciphertext stays in order."""
    pair.tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    with trio.fail_after(30):
        client, server = await connect(pair, gateway_certs)
        size = 4 << 20
        got = bytearray()
        received = bytearray()

        async def read_slowly() -> None:
            while len(got) < size:
                got.extend(await client.receive_some(8192))
                await trio.lowlevel.checkpoint()

        async def echo_small() -> None:
            while len(received) < 1000:
                received.extend(await server.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, pattern(size))
            nursery.start_soon(echo_small)
            nursery.start_soon(read_slowly)
            for _ in range(10):
                await client.send_all(b"x" * 100)
        assert hashlib.sha256(got).digest() == hashlib.sha256(pattern(size)).digest()
        assert received == b"x" * 1000


async def test_a_corrupt_record_raises_ssl_error(pair: Pair, gateway_certs: TLSCerts) -> None:
    with trio.fail_after(10):
        _, server = await connect(pair, gateway_certs)
        await pair.tcp.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        with pytest.raises(ssl.SSLError):
            await server.receive()
        await server.aclose()


async def test_handshake_failures_close_the_socket(pair: Pair, gateway_certs: TLSCerts) -> None:
    with trio.fail_after(10):
        # Plain HTTP to a TLS port.
        await pair.tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ssl.SSLError):
            await accept_tls(pair.server_sock, gateway_certs.server, 5)
        assert pair.server_sock.fileno() == -1


async def test_handshake_timeout_and_early_close(gateway_certs: TLSCerts) -> None:
    with trio.fail_after(10):
        for silent in (True, False):
            made = await tcp_pair()
            client, sock = made.tcp, made.server_sock
            if silent:
                with pytest.raises(trio.TooSlowError):
                    await accept_tls(sock, gateway_certs.server, 0.2)
            else:
                await client.aclose()
                with pytest.raises(trio.BrokenResourceError):
                    await accept_tls(sock, gateway_certs.server, 5)
            assert sock.fileno() == -1
            await client.aclose()


async def test_close_notify_then_read_on(pair: Pair, gateway_certs: TLSCerts) -> None:
    """``close_notify`` (lingering after an error) is a clean EOF for the client, even a
    strict one; the server still reads what the client sends after it."""
    with trio.fail_after(10):
        client, server = await connect(pair, gateway_certs)
        await server.send_all(b"bye")
        await server.close_notify()
        assert await client.receive_some(100) == b"bye"
        assert await client.receive_some(100) == b""  # not BrokenResourceError: clean
        await client.send_all(b"late bytes")
        assert await server.receive() == b"late bytes"
        with pytest.raises(ssl.SSLError):  # nothing can be written after close_notify
            await server.send_all(b"x")
        await server.aclose()
