"""The L4 data path: move bytes both ways between a client and a node until both are done.

Two implementations behind one bookkeeping class:

* ``SocketRelay``: zero-copy ``os.splice`` (socket → pipe → socket) between two plain
  non-blocking TCP sockets on Linux. Two tasks per connection (one per direction), no
  per-connection nursery, and pipes lent from a ``PipePool`` only while bytes are in flight, so an
  idle connection holds no pipe at all.
* ``StreamRelay``: a copy loop over ``trio.abc.Stream`` objects, for TLS, platforms without
  ``splice`` and in-memory tests.

Half-close: when one side sends EOF, the other side's write half is shut down and the opposite
direction keeps running; the connection is closed once both directions are done. A reset (or
any other error) on one side aborts the connection: the other side is closed at once, with a
reset (``SO_LINGER`` 0) when the first side was reset.

Idle timeout: no per-connection timers. ``IdleSweeper`` looks at every live relay's byte
counters a few times per timeout period and aborts those that did not move for
``idle_timeout`` seconds; the hot path only adds to counters it keeps anyway.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger("l4gw.relay")

HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_LINGER_RESET = struct.pack("ii", 1, 0)
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})

#: After this many back-to-back transfers that never had to wait, a pump yields to the
#: scheduler so one fast flow cannot starve the others.
_BURST = 8
#: Bytes a copy-loop pump asks for at once.
COPY_CHUNK = 256 * 1024


class Pipe:
    """A kernel pipe used as the splice buffer; ``size`` is its capacity in bytes."""

    __slots__ = ("r", "size", "w")

    def __init__(self, r: int, w: int, size: int) -> None:
        self.r = r
        self.w = w
        self.size = size

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Empty pipes lent to pumps while they carry data, and kept for reuse.

    Pipes start at the kernel default (64 KiB) and a pipe that a transfer filled completely is
    grown to ``big_size`` (1 MiB roughly doubles bulk throughput). An unprivileged user may only
    hold ``fs.pipe-user-pages-soft`` worth of pipe buffers: when growing fails with EPERM the
    pool stops growing pipes for ``grow_backoff`` transfers and everything keeps working with
    small pipes. At most ``max_free`` idle pipes are kept; the rest are closed.

    Resource handling: a pipe handed back with ``release`` must be empty; a pump that stops with
    bytes still in its pipe hands it to ``discard`` instead, which closes it.
    """

    def __init__(self, *, max_free: int = 128, big_size: int = 1 << 20) -> None:
        self.max_free = max_free
        self.big_size = big_size
        self._free: list[Pipe] = []
        self._grow_denied = 0
        self.grow_backoff = 10_000
        self.pipes_open = 0

    def acquire(self) -> Pipe:
        """An empty pipe (from the pool, or new). Raises ``OSError`` (EMFILE...) if none."""
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipes_open += 1
        try:
            size = fcntl.fcntl(w, _F_GETPIPE_SZ)
        except OSError:
            size = 65536
        return Pipe(r, w, size)

    def release(self, pipe: Pipe) -> None:
        if len(self._free) < self.max_free:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: Pipe) -> None:
        self.pipes_open -= 1
        pipe.close()

    def grow(self, pipe: Pipe) -> None:
        """Try to enlarge ``pipe`` to ``big_size``; failure only means it stays small."""
        if pipe.size >= self.big_size:
            return
        if self._grow_denied:
            self._grow_denied -= 1
            return
        try:
            pipe.size = fcntl.fcntl(pipe.w, _F_SETPIPE_SZ, self.big_size)
        except OSError:
            self._grow_denied = self.grow_backoff

    def close(self) -> None:
        while self._free:
            self.discard(self._free.pop())


class Relay:
    """Bookkeeping shared by both data paths: byte counts, idle tracking, completion.

    ``bytes_in`` counts bytes from the client, ``bytes_out`` bytes to the client. The
    ``on_finish`` callback runs exactly once, after both directions have stopped and both
    sides are closed.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closed",
        "idle_checked_total",
        "idle_since",
        "idle_timeout",
        "on_finish",
        "pumps",
        "reason",
    )

    def __init__(self, idle_timeout: float, on_finish: Callable[[Relay], None]) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.pumps = 2
        self.idle_timeout = idle_timeout
        self.idle_since = trio.current_time()
        self.idle_checked_total = 0
        self.on_finish = on_finish
        #: Why the connection ended abnormally ("" for a clean close on both sides).
        self.reason = ""

    def abort(self, reason: str, *, reset: bool = False) -> None:
        """Close both sides now; running pumps wake up and stop."""
        raise NotImplementedError

    def _close_both(self) -> None:
        raise NotImplementedError

    def pump_done(self) -> None:
        self.pumps -= 1
        if self.pumps == 0:
            if not self.closed:
                self.closed = True
                self._close_both()
            self.on_finish(self)


class SocketRelay(Relay):
    """Relay between two plain non-blocking TCP sockets with ``os.splice``.

    Resource handling: owns both sockets from construction and closes them when both pumps
    are done (or at once on ``abort``).
    """

    __slots__ = ("client", "node")

    def __init__(
        self,
        client: socket.socket,
        node: socket.socket,
        idle_timeout: float,
        on_finish: Callable[[Relay], None],
    ) -> None:
        super().__init__(idle_timeout, on_finish)
        self.client = client
        self.node = node

    def abort(self, reason: str, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        if reset:
            for sock in (self.client, self.node):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
        self._close_both()

    def _close_both(self) -> None:
        for sock in (self.client, self.node):
            if sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)
                sock.close()

    async def run(self, nursery: trio.Nursery, pool: PipePool) -> None:
        """Run both directions: node→client in a new task of ``nursery``, client→node here."""
        nursery.start_soon(splice_pump, self, self.node, self.client, pool, True)
        await splice_pump(self, self.client, self.node, pool, False)


#: Reads up to this size go through one buffer shared by every pump (the event loop is single
#: threaded and a pump sends what it read before it awaits anything, so the buffer is free again
#: at every await). A read that fills it marks a bulk flow, which switches to splice.
SMALL_READ = 64 * 1024
_shared_buffer = bytearray(SMALL_READ)
_shared_view = memoryview(_shared_buffer)


async def splice_pump(
    relay: SocketRelay,
    src: socket.socket,
    dst: socket.socket,
    pool: PipePool,
    to_client: bool,
) -> None:
    """Move bytes from ``src`` to ``dst`` until EOF, error or abort; then ``pump_done``.

    Adaptive, like HAProxy's ``splice-auto``: small messages are copied through the shared
    buffer (``recv_into`` + ``send``: no pipe, fewer and cheaper syscalls), and once a read fills
    the whole buffer the direction switches to zero-copy ``splice`` for the rest of its life.

    A short read means the socket is (almost surely) drained, so the pump waits for readable
    at once instead of probing for EAGAIN. In splice mode the pipe is always drained before the
    next read, so EAGAIN from splice(socket → pipe) means the socket is empty; EAGAIN while
    draining means ``dst`` is full. The pipe is returned to the pool before any wait for
    readable, so idle connections hold no pipe. Unsent bytes of a partial ``send`` are copied
    out of the shared buffer before waiting for writable.
    """
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    recv_into = src.recv_into
    send = dst.send
    view = _shared_view
    try:
        # Copy mode.
        while True:
            try:
                n = recv_into(_shared_buffer)
            except BlockingIOError:
                await wait_readable(src)
                if relay.closed:
                    return
                continue
            if n == 0:
                dst.shutdown(socket.SHUT_WR)
                return
            if to_client:
                relay.bytes_out += n
            else:
                relay.bytes_in += n
            try:
                sent = send(view[:n])
            except BlockingIOError:
                sent = 0
            if sent < n:
                pending = bytes(view[sent:n])
                while pending:
                    await wait_writable(dst)
                    if relay.closed:
                        return
                    try:
                        pending = pending[send(pending) :]
                    except BlockingIOError:
                        pass
            if n == SMALL_READ and HAVE_SPLICE:
                break
            await wait_readable(src)
            if relay.closed:
                return
        await _splice_loop(relay, src, dst, pool, to_client)
    except trio.ClosedResourceError:
        pass  # aborted while waiting (notify_closing)
    except OSError as exc:
        if not relay.closed:
            side = "client" if src is relay.client else "node"
            relay.abort(
                f"{side} {errno.errorcode.get(exc.errno or 0, str(exc))}",
                reset=exc.errno in _RESET_ERRNOS,
            )
    finally:
        relay.pump_done()


async def _splice_loop(
    relay: SocketRelay,
    src: socket.socket,
    dst: socket.socket,
    pool: PipePool,
    to_client: bool,
) -> None:
    """The bulk half of ``splice_pump``: zero-copy until EOF or abort. Raises ``OSError``."""
    splice = os.splice
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    flags = _SPLICE_FLAGS
    src_fd = src.fileno()
    dst_fd = dst.fileno()
    pipe: Pipe | None = None
    left = 0
    burst = 0
    try:
        while True:
            if pipe is None:
                pipe = pool.acquire()
            try:
                n = splice(src_fd, pipe.w, pipe.size, flags=flags)
            except BlockingIOError:
                pool.release(pipe)
                pipe = None
                burst = 0
                await wait_readable(src)
                if relay.closed:
                    return
                continue
            if n == 0:
                dst.shutdown(socket.SHUT_WR)
                return
            if to_client:
                relay.bytes_out += n
            else:
                relay.bytes_in += n
            left = n
            while left:
                try:
                    left -= splice(pipe.r, dst_fd, left, flags=flags)
                except BlockingIOError:
                    await wait_writable(dst)
                    if relay.closed:
                        return
            if n == pipe.size:
                pool.grow(pipe)
            burst += 1
            if burst >= _BURST:
                burst = 0
                await trio.lowlevel.checkpoint()
                if relay.closed:
                    return
    finally:
        if pipe is not None:
            if left:
                pool.discard(pipe)
            else:
                pool.release(pipe)


class StreamRelay(Relay):
    """Relay between two ``trio.abc.Stream`` objects with a copy loop.

    Resource handling: owns both streams and closes them (``aclose_forcefully`` on abort).
    """

    __slots__ = ("client", "node", "scopes")

    def __init__(
        self,
        client: trio.abc.Stream,
        node: trio.abc.Stream,
        idle_timeout: float,
        on_finish: Callable[[Relay], None],
    ) -> None:
        super().__init__(idle_timeout, on_finish)
        self.client = client
        self.node = node
        self.scopes = (trio.CancelScope(), trio.CancelScope())

    def abort(self, reason: str, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.reason = reason
        for scope in self.scopes:
            scope.cancel()

    def _close_both(self) -> None:
        pass  # the last pump closes the streams (an async operation) in ``copy_pump``

    async def run(self, nursery: trio.Nursery) -> None:
        """Run both directions: node→client in a new task of ``nursery``, client→node here."""
        nursery.start_soon(copy_pump, self, self.node, self.client, True, self.scopes[1])
        await copy_pump(self, self.client, self.node, False, self.scopes[0])


async def copy_pump(
    relay: StreamRelay,
    src: trio.abc.ReceiveStream,
    dst: trio.abc.SendStream,
    to_client: bool,
    scope: trio.CancelScope,
) -> None:
    """Copy ``src`` to ``dst`` until EOF, error or abort; the last pump closes both streams."""
    try:
        with scope:
            while True:
                data = await src.receive_some(COPY_CHUNK)
                if not data:
                    if isinstance(dst, trio.abc.HalfCloseableStream):
                        await dst.send_eof()
                    break
                if to_client:
                    relay.bytes_out += len(data)
                else:
                    relay.bytes_in += len(data)
                await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        relay.abort(("node" if to_client else "client") + f" {type(exc).__name__}")
        for other in relay.scopes:
            other.cancel()
    finally:
        if relay.pumps == 1:
            relay.closed = True
            await trio.aclose_forcefully(relay.client)
            await trio.aclose_forcefully(relay.node)
        relay.pump_done()


class IdleSweeper:
    """Aborts relays that moved no byte either way for their ``idle_timeout``.

    Precision: a relay is closed between ``idle_timeout`` and ``idle_timeout + tick`` seconds
    after its last byte; ``tick`` is a quarter of the smallest timeout seen, within
    [50 ms, 1 s].
    """

    def __init__(self) -> None:
        self.relays: set[Relay] = set()
        self.tick = 1.0
        self.closed_idle = 0

    def add(self, relay: Relay) -> None:
        self.relays.add(relay)
        if relay.idle_timeout / 4 < self.tick:
            self.tick = max(0.05, relay.idle_timeout / 4)

    def discard(self, relay: Relay) -> None:
        self.relays.discard(relay)

    def sweep(self, now: float) -> None:
        """Check every relay once; abort those idle for their whole timeout."""
        for relay in list(self.relays):
            total = relay.bytes_in + relay.bytes_out
            if total != relay.idle_checked_total:
                relay.idle_checked_total = total
                relay.idle_since = now
            elif now - relay.idle_since >= relay.idle_timeout and not relay.closed:
                self.closed_idle += 1
                relay.abort("idle timeout")

    async def run(self) -> None:
        """Sweep forever (run it in the daemon's nursery)."""
        while True:
            await trio.sleep(self.tick)
            self.sweep(trio.current_time())
