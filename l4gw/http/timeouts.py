"""Deadlines of the HTTP connections of one ``trio.run``, checked by one sweeper task.

A connection sets ``deadline`` (a float, trio time) and ``phase`` as it goes; nothing is
armed or disarmed per request (a cancel scope with a deadline per wait costs more than
parsing the request). The sweeper calls the connection's ``expire()`` once its deadline has
passed; the connection then answers according to the phase (408, 504, or just closes) and
closes. It also ends idle keep-alive connections of a draining listener.

Precision: a timeout fires between its deadline and one ``tick`` later; ``tick`` is a
quarter of the shortest timeout seen, within [``MIN_TICK``, ``MAX_TICK``].
"""

from __future__ import annotations

from typing import Protocol

import trio

from ..runtime import ListenerRuntime

__all__ = [
    "BODY",
    "BUSY",
    "HEAD",
    "IDLE",
    "MAX_TICK",
    "MIN_TICK",
    "RESPONSE",
    "SEND",
    "UPLOAD",
    "Timed",
    "Timeouts",
    "timeouts",
]

#: Bounds of the sweeper's period (a quarter of the shortest timeout in use).
MIN_TICK = 0.02
MAX_TICK = 1.0

# What a connection is waiting for; decides what happens when its deadline passes.
IDLE = 0  # the next request (keep-alive): close silently
HEAD = 1  # the rest of a request head: 408, close
BUSY = 2  # no deadline of its own (connecting: connect_timeout applies)
UPLOAD = 3  # request body bytes from the client: close
RESPONSE = 4  # the node's response head: 504, close
BODY = 5  # response body bytes from the node, or the client taking them: close
SEND = 6  # the client taking a response made here: close


class Timed(Protocol):
    """What the sweeper reads and calls on a connection."""

    @property
    def deadline(self) -> float: ...

    @property
    def phase(self) -> int: ...

    @property
    def listener(self) -> ListenerRuntime: ...

    def expire(self) -> None: ...


class Timeouts:
    """The registered connections and the sweeper task (started on the first ``add``)."""

    __slots__ = ("handlers", "started", "tick")

    def __init__(self) -> None:
        self.handlers: set[Timed] = set()
        self.tick = MAX_TICK
        self.started = False

    def add(self, handler: Timed) -> None:
        self.handlers.add(handler)
        if not self.started:
            self.started = True
            trio.lowlevel.spawn_system_task(self._run, name="l4gw.http.timeouts")

    def need(self, seconds: float) -> None:
        """Make sure timeouts of ``seconds`` are checked often enough."""
        tick = seconds / 4
        if tick < self.tick:
            self.tick = max(MIN_TICK, tick)

    def sweep(self, now: float) -> None:
        for handler in list(self.handlers):
            if handler.deadline <= now or (handler.phase == IDLE and handler.listener.draining):
                handler.expire()

    async def _run(self) -> None:
        while True:
            await trio.sleep(self.tick)
            self.sweep(trio.current_time())


_TIMEOUTS: trio.lowlevel.RunVar[Timeouts] = trio.lowlevel.RunVar("l4gw_http_timeouts")


def timeouts() -> Timeouts:
    """The sweeper of the current ``trio.run`` (created on first use)."""
    try:
        return _TIMEOUTS.get()
    except LookupError:
        sweeper = Timeouts()
        _TIMEOUTS.set(sweeper)
        return sweeper
