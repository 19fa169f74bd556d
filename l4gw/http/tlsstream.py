"""Server-side TLS over a plain socket, with an ``ssl.SSLObject`` and memory BIOs.

:class:`TLSStream` is what an http listener with ``[listeners.tls]`` serves its clients
through. It is a ``trio.abc.Stream`` (and has the :class:`l4gw.http.io.ByteIO` methods), so
the connection's task reads and writes it like any stream (and as its
:class:`l4gw.http.io.ByteIO`); and because the TLS state is an
``SSLObject`` fed from and drained to the socket in plain system calls, the reactor's fast
path (:mod:`l4gw.http.fastpath`) can drive the same connection with callbacks between the
task's turns: :meth:`TLSStream.decrypt` and :meth:`TLSStream.encrypt` are synchronous.

Compared with ``trio.SSLStream`` (which the tcp-mode TLS relay still uses), there is no
scheduler trip per record and no lock per call: a read is one ``recv`` plus ``SSLObject.read``
calls, a write one ``SSLObject.write`` plus one ``send`` when the kernel takes it all.

Semantics, as trio's with ``https_compatible=True``: the peer's close_notify and a TCP EOF
without it both read as EOF (HTTP framing tells a truncated message apart); :meth:`aclose`
sends close_notify without waiting for the peer's. A corrupt record or a TLS alert raises
``ssl.SSLError`` (an ``OSError``) from the read; a write after a fatal error raises it too.
Renegotiation is refused by the context (``OP_NO_RENEGOTIATION``), so after the handshake
reads need no writes and writes no reads; TLS 1.3 post-handshake messages that do need an
answer (KeyUpdate) have it queued and sent with the next write or read.

Concurrency: one task may receive while another sends (an upgraded connection relays both
ways); ciphertext goes out in the order it was made, whichever task made it.
"""

from __future__ import annotations

import os
import ssl

import trio

from .io import RECEIVE_SIZE, ByteIO

__all__ = ["TLSStream", "accept_tls"]

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


class TLSStream(trio.abc.Stream, ByteIO):
    """TLS, server side, over ``sock`` (a connected non-blocking trio socket, owned: closed
    by :meth:`aclose`). ``early`` are bytes already read from the socket (after a PROXY
    header): they are the start of the TLS stream.

    ``eof`` is set once the peer closed (close_notify or TCP EOF); ``plain`` holds decrypted
    bytes not handed out yet (``receive_some`` with a small ``max_bytes``)."""

    __slots__ = (
        "_unsent",
        "_write_done",
        "_writing",
        "closed",
        "eof",
        "fd",
        "handshaken",
        "incoming",
        "outgoing",
        "plain",
        "socket",
        "ssl",
    )

    def __init__(
        self, sock: trio.socket.SocketType, context: ssl.SSLContext, early: bytes = b""
    ) -> None:
        self.socket = sock
        self.fd = sock.fileno()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        if early:
            self.incoming.write(early)
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.eof = False
        self.closed = False
        self.handshaken = False
        self.plain = b""
        #: Ciphertext taken from ``outgoing`` that the kernel has not taken yet.
        self._unsent = bytearray()
        self._writing = False
        self._write_done = trio.lowlevel.ParkingLot()

    # -- synchronous core (also the fast path's) ----------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes read from the socket (``b""``: the peer closed the TCP connection)."""
        if data:
            self.incoming.write(data)
        else:
            self.eof = True

    def decrypt(self) -> bytes:
        """Everything that can be decrypted from what was fed so far (``b""`` if nothing
        yet, or at EOF: see ``eof``). Raises ``ssl.SSLError`` for a corrupt stream or an
        alert from the peer."""
        plain = self.plain
        if plain:
            self.plain = b""
        read = self.ssl.read
        incoming = self.incoming
        chunks = [plain] if plain else []
        try:
            while True:
                data = read(RECEIVE_SIZE)
                if not data:  # close_notify (CPython returns b"" for it, or raises below)
                    self.eof = True
                    break
                chunks.append(data)
                if not incoming.pending and not self.ssl.pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify
            self.eof = True
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        """``data`` as TLS records, plus anything queued before it (ciphertext that was
        given back with :meth:`unsend`, answers to post-handshake messages): the bytes to
        write to the socket next, in this order. Raises ``ssl.SSLError`` after a fatal
        error."""
        if data:
            self.ssl.write(data)
        out = self.outgoing.read()
        if self._unsent:
            out = bytes(self._unsent) + out
            self._unsent.clear()
        return out

    def unsend(self, data: bytes | memoryview) -> None:
        """Ciphertext that was taken with :meth:`encrypt` but not written: it goes out
        first, before anything encrypted later."""
        self._unsent[:0] = data

    def buffered(self) -> bool:
        """True if input is waiting here (decrypted, or ciphertext not yet decrypted), which
        the socket will not signal again."""
        return bool(self.plain) or self.incoming.pending > 0 or self.ssl.pending() > 0

    # -- trio side -------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """The server side of the handshake. Raises ``ssl.SSLError`` (refused, or a bad
        client hello), ``trio.BrokenResourceError`` (the client closed first), or
        ``OSError``; the caller closes the stream."""
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            await self._flush()
            if not await self._read_socket():
                raise trio.BrokenResourceError("the client closed during the TLS handshake")
        self.handshaken = True
        await self._flush()

    async def receive(self, *, wait_first: bool = False) -> bytes:
        """Some decrypted bytes, or ``b""`` at EOF (:class:`l4gw.http.io.ByteIO`)."""
        while True:
            data = self.decrypt()
            if self.outgoing.pending:  # an answer to a post-handshake message
                self._try_write()
            if data or self.eof:
                return data
            await self._read_socket()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        data = await self.receive()
        if max_bytes is not None and len(data) > max_bytes:
            data, self.plain = data[:max_bytes], data[max_bytes:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if data:
            self.ssl.write(data)
        await self._flush()

    async def send_eof(self) -> None:
        """TLS cannot half-close: nothing happens (:class:`l4gw.http.io.ByteIO`)."""
        await trio.lowlevel.checkpoint()

    async def close_notify(self) -> None:
        """Send close_notify now, and go on reading: what a client sends after it may be
        discarded (for lingering after an error response, where it is anyway). Writing
        after it fails."""
        if self.closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        try:
            self.ssl.unwrap()
        except ssl.SSLError:  # SSLWantReadError: sent; the peer's is not awaited
            pass
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await _wait_writable(self.fd)

    async def aclose(self) -> None:
        """Send close_notify (if the kernel takes it at once) and close the socket."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        try:
            if self.handshaken and not self._writing:
                try:
                    self.ssl.unwrap()
                except ssl.SSLError:  # SSLWantReadError: sent; the peer's is not awaited
                    pass
                self._try_write()
        except OSError:
            pass
        finally:
            self.socket.close()
        await trio.lowlevel.checkpoint()

    # -- internals -------------------------------------------------------------------------

    def _write_now(self) -> bool:
        """Write the queued ciphertext (``_unsent``, then what ``outgoing`` holds) as far as
        the kernel takes it now; True if nothing is left. Other ``OSError`` raise."""
        unsent = self._unsent
        unsent += self.outgoing.read()
        while unsent:
            try:
                sent = os.write(self.fd, unsent)
            except BlockingIOError:
                return False
            del unsent[:sent]
        return True

    def _try_write(self) -> None:
        """:meth:`_write_now` unless another task is writing; the rest stays queued (for
        the next write)."""
        if not self._writing:
            self._write_now()

    async def _read_socket(self) -> bool:
        """Read from the socket into the TLS state; False at EOF."""
        fd = self.fd
        while True:
            try:
                data = os.read(fd, RECEIVE_SIZE)
                break
            except BlockingIOError:
                await _wait_readable(fd)
        self.feed(data)
        return bool(data)

    async def _flush(self) -> None:
        """Write the queued ciphertext, waiting for the kernel as needed; one task writes at
        a time, the others wait for it (and then find their bytes sent)."""
        while self._writing:
            await self._write_done.park()
        if self._write_now():
            return
        self._writing = True
        try:
            while not self._write_now():
                await _wait_writable(self.fd)
        finally:
            self._writing = False
            self._write_done.unpark_all()


async def accept_tls(
    sock: trio.socket.SocketType,
    context: ssl.SSLContext,
    handshake_timeout: float,
    early: bytes = b"",
) -> TLSStream:
    """The server side of a TLS handshake on ``sock`` within ``handshake_timeout``.

    Resource handling: on any error (``ssl.SSLError``, ``trio.BrokenResourceError``,
    ``OSError``, ``trio.TooSlowError`` for a timeout, ``trio.Cancelled``) the socket is
    closed before the error propagates; on success the returned stream owns it."""
    stream = TLSStream(sock, context, early)
    try:
        with trio.fail_after(handshake_timeout):
            await stream.do_handshake()
    except BaseException:
        stream.closed = True
        sock.close()
        raise
    return stream
