"""A reactor inside trio: one epoll set and one task drive every plain-TCP connection.

trio re-arms an ``EPOLLONESHOT`` registration and parks/unparks a task for every
``wait_readable``: per message that is one ``epoll_ctl`` and one task switch on top of the
``recv``/``send`` that move the bytes, and per connection it means two long-lived tasks. The
``Reactor`` instead keeps the relay sockets in its own level-triggered epoll set, registered
once; its single task waits for that epoll descriptor to become readable (an epoll fd is itself
pollable, so trio watches it like any socket), then collects up to ``MAX_EVENTS`` ready
descriptors with ``epoll.poll(0)`` and hands each to the object that owns it (``on_event``).
A message costs its two syscalls, an ``epoll_ctl`` happens only on backpressure transitions,
and a connection costs no task.

:class:`l4gw.l4.connect.NodeConnector` connects to a node the same way (non-blocking
``connect``, ``EPOLLOUT``, ``SO_ERROR``), with ``connect_timeout`` kept on the reactor's timer
heap, so an accepted plain TCP connection spawns no trio task at all.

Fairness: every handler does bounded work per event (level triggering reports a socket again
if it still has data). After a batch the reactor polls again at once (under load more events
are ready by then, and this saves trio's wake-up round), and after ``MAX_ROUNDS`` batches in a
row it yields to the other trio tasks.

The reactor is only an event loop: it knows ``EventHandler`` objects (``on_event``, ``abort``)
registered per descriptor through ``register``/``attach``/``interest``/``forget``, never what
they are (relays, connects, http sessions, idle pooled node connections).

Shutdown: when ``run`` is cancelled (the daemon cancels the connections nursery at the end of
the drain) ``close_all`` aborts every handler still registered, then the epoll set is closed.
"""

from __future__ import annotations

import heapq
import math
import select
from collections.abc import Callable
from typing import Protocol

import structlog
import trio

log = structlog.get_logger("l4gw.reactor")

HAVE_REACTOR = hasattr(select, "epoll")
#: Ready descriptors taken per ``epoll.poll``.
MAX_EVENTS = 1024
#: Batches dispatched back to back (polling again at once while events keep coming, which
#: saves trio's wake-up round under load) before the other trio tasks get a turn.
MAX_ROUNDS = 4


class EventHandler(Protocol):
    """What the reactor dispatches a ready descriptor to."""

    def on_event(self, fd: int, mask: int) -> None: ...

    def abort(self, reason: str, *, reset: bool = False) -> None: ...


class ReactorStopped(Exception):
    """A connect that was still under way when the reactor stopped (daemon shutdown)."""


class Timer:
    """A callback the reactor runs at ``deadline`` (trio time); ``callback`` None: cancelled."""

    __slots__ = ("callback", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback: Callable[[], None] | None = callback


class Reactor:
    """One epoll set, one trio task (``run``), and a table descriptor → handler.

    Resource handling: owns the epoll descriptor (closed when ``run`` ends, or by ``close``);
    the handlers registered with it own their descriptors, and ``close_all`` (at the end of
    ``run``) aborts each of them once, which closes them.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        #: Descriptor → the handler its events go to (registered or not in the epoll set).
        self.handlers: dict[int, EventHandler] = {}
        #: True once ``run`` has ended: nothing may register any more.
        self.stopped = False
        #: Descriptors closed during the current batch: their remaining events are stale.
        self._closed_fds: set[int] = set()
        #: Heap of (deadline, sequence, timer), cancelled timers included until they reach
        #: the top (tuples: the heap compares them in C).
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = 0
        self._timers_cancelled = 0
        #: The scope the timer task sleeps in; its deadline is the earliest live timer.
        self._timer_scope: trio.CancelScope | None = None

    @property
    def active(self) -> int:
        """Handlers currently registered (each counted once, whatever its descriptors)."""
        return len({id(handler) for handler in self.handlers.values()})

    # -- registration -------------------------------------------------------------------

    def register(self, fd: int, mask: int, handler: EventHandler) -> None:
        """Put ``fd`` in the epoll set with ``mask`` (none if 0) and send its events to
        ``handler``, which owns it from now on (``close_all`` aborts it). Raises ``OSError``
        (the handler table is then unchanged)."""
        if mask:
            self.epoll.register(fd, mask)
        self.handlers[fd] = handler

    def attach(self, fd: int, handler: EventHandler) -> None:
        """Send the events of ``fd`` (already in the epoll set, or not yet) to ``handler``
        from now on: the descriptor changes owner, its epoll mask stays."""
        self.handlers[fd] = handler

    def interest(self, fd: int, old: int, new: int) -> None:
        """Change ``fd``'s epoll mask from ``old`` to ``new``; mask 0 means not in the set
        (so a hung-up socket nobody waits on cannot report ``EPOLLHUP`` over and over).
        Raises ``OSError``."""
        if old == new:
            return
        if not old:
            self.epoll.register(fd, new)
        elif not new:
            self.epoll.unregister(fd)
        else:
            self.epoll.modify(fd, new)

    def forget(self, fd: int, mask: int) -> None:
        """Take ``fd`` out of the epoll set (if ``mask``) and the handler table; call this
        before closing it: the number is reused by the next descriptor opened."""
        if mask:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already gone, or the epoll set is closed (shutdown)
        self.handlers.pop(fd, None)
        self._closed_fds.add(fd)

    # -- timers -------------------------------------------------------------------------

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` (from the reactor's timer task) at trio time ``deadline``."""
        self._timer_seq += 1
        timer = Timer(deadline, callback)
        heapq.heappush(self._timers, (deadline, self._timer_seq, timer))
        scope = self._timer_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline
        return timer

    def cancel_timer(self, timer: Timer) -> None:
        if timer.callback is None:
            return
        timer.callback = None
        self._timers_cancelled += 1
        timers = self._timers
        if len(timers) > 256 and self._timers_cancelled * 2 > len(timers):
            self._timers = [t for t in timers if t[2].callback is not None]
            heapq.heapify(self._timers)
            self._timers_cancelled = 0

    def _run_timers(self, now: float) -> float:
        """Fire the due timers; drop cancelled ones from the top of the heap. Returns the
        deadline of the next live timer (``inf`` if none)."""
        timers = self._timers
        while timers:
            deadline, _, head = timers[0]
            callback = head.callback
            if callback is None:
                heapq.heappop(timers)
                self._timers_cancelled -= 1
                continue
            if deadline > now:
                return deadline
            heapq.heappop(timers)
            head.callback = None
            try:
                callback()
            except Exception:
                log.exception("reactor_timer_failed")
            timers = self._timers  # a callback may have compacted the heap
        return math.inf

    async def _timer_loop(self) -> None:
        """Sleep until the earliest timer (``call_at`` moves the deadline earlier), fire the
        due ones. Timers are rare (connect timeouts): this task seldom wakes up."""
        while True:
            deadline = self._run_timers(trio.current_time())
            with trio.CancelScope(deadline=deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None

    # -- the loop -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch events until cancelled; then abort everything still registered."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timer_loop)
                task_status.started()
                await self._dispatch_loop()
        finally:
            self.stopped = True
            self._timer_scope = None
            self.close_all()
            self.close()

    async def _dispatch_loop(self) -> None:
        epfd = self.epoll.fileno()
        poll = self.epoll.poll
        handlers = self.handlers
        closed = self._closed_fds
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        while True:
            await wait_readable(epfd)
            rounds = 0
            while True:
                closed.clear()
                events = poll(0, MAX_EVENTS)
                if not events:
                    break
                for fd, mask in events:
                    if closed and fd in closed:
                        continue
                    handler = handlers.get(fd)
                    if handler is None:
                        continue
                    try:
                        handler.on_event(fd, mask)
                    except Exception:
                        self._handler_failed(handler)
                handler = None  # a finished connection is not kept until the next event
                rounds += 1
                if rounds >= MAX_ROUNDS:
                    # Fairness: the other trio tasks (accept loops, health checks) run now.
                    await checkpoint()
                    rounds = 0

    def _handler_failed(self, handler: EventHandler) -> None:
        """A bug in a handler must not take every other connection down with it."""
        log.exception("reactor_handler_failed")
        try:
            handler.abort("internal error")
        except Exception:
            log.exception("reactor_abort_failed")

    def close_all(self) -> None:
        """Abort every registered handler once (shutdown): relays, connects under way, http
        sessions and idle pooled node connections alike. A failing ``abort`` is logged and
        does not keep the others open."""
        aborted: set[int] = set()
        while True:
            # Snapshot per round: an abort may register something else (which the next round
            # aborts too); a handler that stays registered after its abort is not called again.
            pending = {id(h): h for h in self.handlers.values() if id(h) not in aborted}
            if not pending:
                return
            aborted.update(pending)
            for handler in pending.values():
                try:
                    handler.abort("shutdown")
                except Exception:  # a failing callback must not leave the others open
                    log.exception("reactor_abort_failed")

    def close(self) -> None:
        """Close the epoll descriptor (idempotent). Handlers must be gone (``close_all``)."""
        self.stopped = True
        self.epoll.close()
