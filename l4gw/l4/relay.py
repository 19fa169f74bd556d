"""The L4 data path: move bytes both ways between a client and a node until both are done.

Two implementations behind one bookkeeping class:

* ``SocketRelay``: a per-connection state machine driven by the ``Reactor``
  (``l4gw.l4.reactor``): both plain non-blocking TCP sockets sit in one level-triggered epoll set
  that a single trio task polls, so a connection costs no task and a message costs no trio
  call. Small messages are copied through one shared buffer (``recv_into`` + ``send``); a
  direction whose read fills that buffer switches to zero-copy ``os.splice`` (socket → pipe →
  socket), with pipes lent from a ``PipePool`` only while bytes are in flight, so an idle
  connection holds no pipe at all.
* ``StreamRelay``: a copy loop over ``trio.abc.Stream`` objects, for TLS, platforms without
  epoll and in-memory tests.

Half-close: when one side sends EOF, the other side's write half is shut down and the opposite
direction keeps running; the connection is closed once both directions are done. A reset (or
any other error) on one side aborts the connection: the other side is closed at once, with a
reset (``SO_LINGER`` 0) when the first side was reset.

Idle timeout: no per-connection timers. ``IdleSweeper`` (one entry of the daemon's
``l4gw.l4.deadlines.Deadlines``) looks at every live relay's byte counters a few times per
timeout period and aborts those that did not move for ``idle_timeout`` seconds; the hot path
only adds to counters it keeps anyway.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
import trio

from ..core.nodes import NodeState
from .deadlines import Deadlines

if TYPE_CHECKING:
    from .reactor import Reactor

log = structlog.get_logger("l4gw.relay")

HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_LINGER_RESET = struct.pack("ii", 1, 0)
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})

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
        "drain_deadline",
        "idle_checked_total",
        "idle_since",
        "idle_timeout",
        "listener",
        "node_state",
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
        #: The listener name and node it belongs to (set by ``IdleSweeper.add``), and when it
        #: must end because a reload removed either (``drain_timeout`` after the reload).
        self.listener = ""
        self.node_state: NodeState | None = None
        self.drain_deadline: float | None = None

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


#: Reads up to this size go through one buffer shared by every relay (the reactor is single
#: threaded and a relay sends what it read before it returns, so the buffer is free again
#: after every event). A read that fills it marks a bulk flow, which switches to splice.
SMALL_READ = 64 * 1024
_shared_buffer = bytearray(SMALL_READ)
_shared_view = memoryview(_shared_buffer)

_EPOLLIN = getattr(select, "EPOLLIN", 0x001)
_EPOLLOUT = getattr(select, "EPOLLOUT", 0x004)
#: Event bits on which a read (or a write) is attempted: the attempt reports the real error.
_READ_EVENTS = _EPOLLIN | getattr(select, "EPOLLERR", 0x008) | getattr(select, "EPOLLHUP", 0x010)
_WRITE_EVENTS = _EPOLLOUT | getattr(select, "EPOLLERR", 0x008) | getattr(select, "EPOLLHUP", 0x010)
#: Splice rounds (one pipe-full each) a bulk flow may do per event before the others get a turn.
SPLICE_ROUNDS = 4


class _Flow:
    """One direction of a ``SocketRelay``: ``src`` → ``dst``.

    ``pending`` (copy mode) or ``pipe``/``left`` (splice mode) hold the bytes ``dst`` did not
    take yet; while they exist the flow is ``blocked`` and ``src`` is not read.
    """

    __slots__ = (
        "blocked",
        "done",
        "dst",
        "dst_fd",
        "left",
        "pending",
        "pipe",
        "splice",
        "src",
        "src_fd",
        "to_client",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.to_client = to_client
        self.splice = False
        self.blocked = False
        self.done = False
        self.pending: memoryview | None = None
        self.pipe: Pipe | None = None
        self.left = 0


class SocketRelay(Relay):
    """Relay between two plain non-blocking TCP sockets, driven by a ``Reactor``'s events.

    No task and no trio call per connection: both sockets are registered once (level
    triggered) in the reactor's epoll and stay registered while they are wanted. Per direction,
    in copy mode a readable event costs ``recv_into`` (shared buffer) + ``send``; a read that
    fills the shared buffer switches the direction to ``splice`` (socket → pipe → socket) for
    the rest of its life. When ``dst`` does not take everything, the rest is kept (copied out
    of the shared buffer, or left in the pipe), ``src`` is no longer read and ``dst`` is
    watched for writable: memory per direction never exceeds one buffer or one pipe. The epoll
    interest only changes on such backpressure transitions and at EOF; a socket with no
    interest left is taken out of the epoll set (so hang-ups cannot spin).

    Resource handling: owns both sockets from construction; ``start`` hands them to the
    reactor; they are unregistered, then closed, when both directions are done or on
    ``abort``, after which ``on_finish`` runs once. Splice pipes are borrowed from ``pipes``
    (owned by whoever created it, the daemon) only while bytes are in flight.
    """

    __slots__ = (
        "cfd",
        "client",
        "cmask",
        "down",
        "nfd",
        "nmask",
        "node",
        "pipes",
        "reactor",
        "up",
    )

    def __init__(
        self,
        reactor: Reactor,
        client: socket.socket,
        node: socket.socket,
        idle_timeout: float,
        on_finish: Callable[[Relay], None],
        *,
        pipes: PipePool,
    ) -> None:
        super().__init__(idle_timeout, on_finish)
        self.reactor = reactor
        self.pipes = pipes
        self.client = client
        self.node = node
        self.cfd = client.fileno()
        self.nfd = node.fileno()
        self.cmask = 0
        self.nmask = 0
        self.up = _Flow(client, node, False)
        self.down = _Flow(node, client, True)

    def start(self, *, node_mask: int = 0, read_now: bool = False) -> None:
        """Register both sockets with the reactor (``node_mask``: the node socket is already
        in the epoll set with that mask). ``read_now`` tries the client at once (bytes that
        arrived while the node was being connected save one event round)."""
        reactor = self.reactor
        self.nmask = node_mask
        if reactor.stopped:
            self.abort("shutdown")
            return
        reactor.attach(self.cfd, self)
        reactor.attach(self.nfd, self)
        self._sync()
        if read_now and not self.closed:
            self._pump(self.up)

    def on_event(self, fd: int, mask: int) -> None:
        """An epoll event on one of the two sockets (called by the reactor)."""
        if fd == self.cfd:
            if self.cmask & _EPOLLIN and mask & _READ_EVENTS:
                self._pump(self.up)
                if self.closed:
                    return
            if self.cmask & _EPOLLOUT and mask & _WRITE_EVENTS:
                self._flush(self.down)
        else:
            if self.nmask & _EPOLLIN and mask & _READ_EVENTS:
                self._pump(self.down)
                if self.closed:
                    return
            if self.nmask & _EPOLLOUT and mask & _WRITE_EVENTS:
                self._flush(self.up)

    # -- the state machine --------------------------------------------------------------

    def _pump(self, flow: _Flow) -> None:
        """Move what ``flow.src`` has to ``flow.dst`` (bounded work); block the flow if
        ``dst`` does not take it all."""
        if flow.splice:
            self._splice_in(flow)
            return
        # The copy path: a small message costs recv_into + send and nothing else.
        try:
            n = flow.src.recv_into(_shared_buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(flow.src, exc)
            return
        if n == 0:
            self._eof(flow)
            return
        if flow.to_client:
            self.bytes_out += n
        else:
            self.bytes_in += n
        try:
            sent = flow.dst.send(_shared_view[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(flow.dst, exc)
            return
        if n == SMALL_READ and HAVE_SPLICE:
            flow.splice = True
        if sent < n:
            flow.pending = memoryview(bytes(_shared_view[sent:n]))
            flow.blocked = True
            self._sync()

    def _splice_in(self, flow: _Flow) -> None:
        pool = self.pipes
        splice = os.splice
        try:
            pipe = pool.acquire()
        except OSError:
            # No descriptors for a pipe (EMFILE, ENFILE): this read is copied instead; the
            # flow tries splice again once a read fills the copy buffer.
            flow.splice = False
            self._pump(flow)
            return
        for _ in range(SPLICE_ROUNDS):
            try:
                n = splice(flow.src_fd, pipe.w, pipe.size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                pool.release(pipe)
                self._fail(flow.src, exc)
                return
            if n == 0:
                pool.release(pipe)
                self._eof(flow)
                return
            if flow.to_client:
                self.bytes_out += n
            else:
                self.bytes_in += n
            try:
                sent = splice(pipe.r, flow.dst_fd, n, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                flow.pipe = pipe  # bytes in it: ``abort`` discards it
                flow.left = n
                self._fail(flow.dst, exc)
                return
            if sent < n:
                flow.pipe = pipe
                flow.left = n - sent
                flow.blocked = True
                self._sync()
                return
            if n < pipe.size:
                break  # the socket is (almost surely) drained
            pool.grow(pipe)
        pool.release(pipe)

    def _flush(self, flow: _Flow) -> None:
        """``flow.dst`` is writable again: send what it did not take, then go on reading."""
        pipe = flow.pipe
        if pipe is not None:
            try:
                flow.left -= os.splice(pipe.r, flow.dst_fd, flow.left, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(flow.dst, exc)
                return
            if flow.left:
                return
            flow.pipe = None
            self.pipes.release(pipe)
        else:
            pending = flow.pending
            if pending is None:
                return
            try:
                sent = flow.dst.send(pending)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(flow.dst, exc)
                return
            if sent < len(pending):
                flow.pending = pending[sent:]
                return
            flow.pending = None
        flow.blocked = False
        # ``src`` most likely has more by now: read it at once. If ``dst`` fills up again the
        # flow simply stays blocked and no epoll interest changes at all.
        self._pump(flow)
        if not self.closed:
            self._sync()

    def _eof(self, flow: _Flow) -> None:
        """EOF from ``flow.src``: pass it on as a half-close; close all once both are done."""
        flow.done = True
        try:
            flow.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(flow.dst, exc)
            return
        other = self.down if flow is self.up else self.up
        if other.done:
            self._close("", reset=False)
        else:
            self._sync()

    def _sync(self) -> None:
        """Bring both sockets' epoll interest in line with the flows' states."""
        up, down = self.up, self.down
        cmask = (0 if up.done or up.blocked else _EPOLLIN) | (_EPOLLOUT if down.blocked else 0)
        nmask = (0 if down.done or down.blocked else _EPOLLIN) | (_EPOLLOUT if up.blocked else 0)
        interest = self.reactor.interest
        try:
            if cmask != self.cmask:
                interest(self.cfd, self.cmask, cmask)
                self.cmask = cmask
            if nmask != self.nmask:
                interest(self.nfd, self.nmask, nmask)
                self.nmask = nmask
        except OSError as exc:  # ENOMEM, ENOSPC (max_user_watches)
            self.abort(f"epoll {errno.errorcode.get(exc.errno or 0, str(exc))}")

    def _fail(self, sock: socket.socket, exc: OSError) -> None:
        side = "client" if sock is self.client else "node"
        self.abort(
            f"{side} {errno.errorcode.get(exc.errno or 0, str(exc))}",
            reset=exc.errno in _RESET_ERRNOS,
        )

    # -- ending -------------------------------------------------------------------------

    def abort(self, reason: str, *, reset: bool = False) -> None:
        """Close both sides now (with a reset when ``reset``); ``on_finish`` runs at once."""
        if not self.closed:
            self._close(reason, reset=reset)

    def _close_both(self) -> None:
        self._close("", reset=False)

    def _close(self, reason: str, *, reset: bool) -> None:
        self.closed = True
        self.reason = reason
        reactor = self.reactor
        # Out of the epoll set and the handler table before the descriptors are closed: their
        # numbers are reused by the next socket or pipe.
        for fd, mask in ((self.cfd, self.cmask), (self.nfd, self.nmask)):
            reactor.forget(fd, mask)
        self.cmask = self.nmask = 0
        pool = self.pipes
        for flow in (self.up, self.down):
            pipe = flow.pipe
            if pipe is not None:
                flow.pipe = None
                if flow.left:
                    pool.discard(pipe)
                else:
                    pool.release(pipe)
            flow.pending = None
        for sock in (self.client, self.node):
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
            sock.close()
        self.pumps = 0
        self.on_finish(self)


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
    """The L4 part of the daemon's one deadline sweeper (``l4gw.l4.deadlines.Deadlines``, of
    which it is an entry): aborts relays that moved no byte either way for their
    ``idle_timeout``, and relays whose node or listener a reload removed once their
    ``drain_timeout`` has passed.

    Relays have no deadline of their own (that would cost a clock read per message): this
    entry's deadline comes back every ``tick``, and each time it compares every relay's byte
    counters with what it saw last time.

    Precision: a relay is closed between ``idle_timeout`` and ``idle_timeout + tick`` seconds
    after its last byte (likewise after its drain deadline); ``tick`` is a quarter of the
    smallest timeout seen, within [50 ms, 1 s].
    """

    def __init__(self, deadlines: Deadlines) -> None:
        self.relays: set[Relay] = set()
        self.tick = 1.0
        self.closed_idle = 0
        self.closed_drained = 0
        #: When ``deadlines`` calls ``expire`` next (the first sweep: at its first tick).
        self.deadline = -math.inf
        self.deadlines = deadlines
        deadlines.add(self)

    def add(self, relay: Relay, *, listener: str = "", node: NodeState | None = None) -> None:
        relay.listener = listener
        relay.node_state = node
        self.relays.add(relay)
        if relay.idle_timeout / 4 < self.tick:
            self.tick = max(0.05, relay.idle_timeout / 4)
            self.deadlines.need(relay.idle_timeout)

    def discard(self, relay: Relay) -> None:
        self.relays.discard(relay)

    def drain_removed(self, removed: Callable[[Relay], bool], deadline: float) -> int:
        """After a reload: relays for which ``removed`` is true end at ``deadline`` (unless
        they end before); a relay whose node or listener came back loses its deadline.
        Returns how many relays now have a deadline."""
        draining = 0
        for relay in self.relays:
            if removed(relay):
                if relay.drain_deadline is None:
                    relay.drain_deadline = deadline
                draining += 1
            else:
                relay.drain_deadline = None
        return draining

    def expire(self) -> None:
        """Sweep now, and come back within one ``tick`` (the deadline sweeper looks every
        ``deadlines.tick`` seconds, which is at most ours)."""
        now = trio.current_time()
        self.deadline = now + self.tick - self.deadlines.tick
        self.sweep(now)

    def sweep(self, now: float) -> None:
        """Check every relay once; abort those idle for their whole timeout and those past
        their drain deadline."""
        for relay in list(self.relays):
            if relay.closed:
                continue
            deadline = relay.drain_deadline
            if deadline is not None and now >= deadline:
                self.closed_drained += 1
                relay.abort("drained after reload")
                continue
            total = relay.bytes_in + relay.bytes_out
            if total != relay.idle_checked_total:
                relay.idle_checked_total = total
                relay.idle_since = now
            elif now - relay.idle_since >= relay.idle_timeout:
                self.closed_idle += 1
                relay.abort("idle timeout")
