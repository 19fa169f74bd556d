"""Byte I/O for the http data path: plain sockets by file descriptor, or any trio stream.

``trio.SocketStream`` makes every successful ``send``/``recv`` a trip through the scheduler
(a checkpoint after the system call). On the per-request path of a keep-alive proxy that is
most of trio's cost, so plain TCP sockets are driven here directly: the system call is made
in the task and the task only parks when the kernel says EAGAIN. ``receive(wait_first=True)``
parks first, for reads where the bytes are known not to be there yet (the response right
after the request was sent), saving a failing system call.

So that a connection whose bytes never stop (a fast upload, a busy upgraded connection, a long
response) cannot hold the trio thread, every :data:`BURST`-th operation of an ``FdIO``
yields once to the other tasks first (a checkpoint: the reactor, accept loops, health checks
run; a cancellation is seen there, before the system call, so no byte is lost). This is the
one place that does it for every loop over ``FdIO`` (node connections are ``FdIO`` or a trio
stream, which checkpoints on its own, so a relay between a client and a node always yields).

TLS terminated by an http listener is a :class:`l4gw.http.tlsstream.TLSStream`, which is a
``ByteIO`` itself. Other streams (``trio.SSLStream``, in-memory test streams, the listener's
PROXY prefix wrapper) go through :class:`StreamIO`.

Errors: ``OSError`` (e.g. ``ConnectionResetError``), ``trio.BrokenResourceError`` and
``trio.ClosedResourceError``; :data:`IO_ERRORS` is that tuple.
"""

from __future__ import annotations

import os
import socket

import trio

__all__ = ["BURST", "IO_ERRORS", "RECEIVE_SIZE", "ByteIO", "FdIO", "StreamIO", "io_for_stream"]

#: Bytes asked for per read.
RECEIVE_SIZE = 64 * 1024
#: Operations of one ``FdIO`` back to back before it yields to other tasks (at most
#: ``BURST * RECEIVE_SIZE`` bytes read without a checkpoint).
BURST = 16

IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_checkpoint = trio.lowlevel.checkpoint


class ByteIO:
    """Receive and send bytes (the interface of :class:`FdIO` and :class:`StreamIO`)."""

    __slots__ = ()

    async def receive(self, *, wait_first: bool = False) -> bytes:
        """Some bytes, or b"" at EOF."""
        raise NotImplementedError

    async def send_all(self, data: bytes) -> None:
        raise NotImplementedError

    async def send_eof(self) -> None:
        """Close the sending half if the transport can (TLS cannot: nothing happens)."""
        raise NotImplementedError


class FdIO(ByteIO):
    """A connected non-blocking stream socket, by file descriptor (not owned: closing the
    socket is the owner's business, after ``trio.lowlevel.notify_closing``). ``sock`` is
    the socket object (stdlib or trio), used for ``shutdown``. Every :data:`BURST`-th
    ``receive`` or ``send_all`` starts with a checkpoint."""

    __slots__ = ("fd", "sock", "turns")

    def __init__(self, sock: socket.socket | trio.socket.SocketType) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        #: Operations left before the next checkpoint.
        self.turns = BURST

    async def receive(self, *, wait_first: bool = False) -> bytes:
        fd = self.fd
        if wait_first:
            await _wait_readable(fd)
        else:
            self.turns -= 1
            if not self.turns:
                self.turns = BURST
                await _checkpoint()
        while True:
            try:
                return os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                await _wait_readable(fd)

    async def send_all(self, data: bytes) -> None:
        fd = self.fd
        self.turns -= 1
        if not self.turns:
            self.turns = BURST
            await _checkpoint()
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            await _wait_writable(fd)
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                continue
            view = view[sent:]

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self.sock.shutdown(socket.SHUT_WR)


class StreamIO(ByteIO):
    """Any ``trio.abc.Stream`` (not owned)."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive(self, *, wait_first: bool = False) -> bytes:
        return bytes(await self.stream.receive_some(RECEIVE_SIZE))

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> None:
        stream = self.stream
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        else:
            await trio.lowlevel.checkpoint()


def io_for_stream(stream: trio.abc.Stream) -> ByteIO:
    """:class:`FdIO` for a plain ``trio.SocketStream``, the stream itself when it is a
    ``ByteIO`` already (:class:`l4gw.http.tlsstream.TLSStream`), else :class:`StreamIO`."""
    if type(stream) is trio.SocketStream:
        return FdIO(stream.socket)
    if isinstance(stream, ByteIO):
        return stream
    return StreamIO(stream)
