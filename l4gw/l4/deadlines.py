"""The one deadline sweeper of a daemon: L4 idle timeouts and HTTP phase deadlines alike.

Nothing is armed or disarmed per message or per request: an entry is an object with a
``deadline`` attribute (trio time) that its owner rewrites whenever it likes (a float store,
the cheapest thing there is), and an ``expire()`` method. ``Deadlines`` wakes up every
``tick`` seconds, looks at every entry once, and calls ``expire()`` on those whose deadline
has passed. What expiry means is the entry's business:

* an HTTP connection answers or closes according to its phase (408, 504, or just closes); as
  a ``KeepAlive`` entry it also expires while it waits between requests (phase ``IDLE``) once
  its listener drains;
* the L4 relays are one entry, ``l4gw.l4.relay.IdleSweeper``, which re-arms itself every tick and
  then compares every relay's byte counters (so the relays' hot path does no bookkeeping).

Precision: an entry expires between its deadline and one ``tick`` later; ``tick`` is a
quarter of the shortest timeout announced with ``need``, within [``MIN_TICK``, ``MAX_TICK``].

Ownership: the ``Daemon`` creates one ``Deadlines``, runs ``run`` in its connections nursery
(so it stops when the drain ends) and hands it to whoever needs it; there is no per-run global.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["IDLE", "MAX_TICK", "MIN_TICK", "Deadlines", "Draining", "Expiring", "KeepAlive"]

#: Bounds of the sweeper's period (a quarter of the shortest timeout in use).
MIN_TICK = 0.02
MAX_TICK = 1.0

#: The phase of a ``KeepAlive`` entry waiting for its next request: nothing is under way, so
#: it ends as soon as its listener drains.
IDLE = 0


class Expiring(Protocol):
    """An entry of the sweeper.

    ``deadline`` is trio time (``inf``: none, ``-inf``: at the next sweep); ``expire`` is
    called from the sweeper's task at the first sweep at or after it, and must not await. The
    entry stays registered: it moves its deadline, or has itself removed, as it sees fit.
    """

    deadline: float

    def expire(self) -> None: ...


class Draining(Protocol):
    """What a ``KeepAlive`` entry's listener tells the sweeper."""

    @property
    def draining(self) -> bool: ...


class KeepAlive(Protocol):
    """A connection that waits for requests: in phase ``IDLE`` it also expires once its
    listener is draining, whatever its deadline. Its ``deadline`` and ``phase`` are its
    exchange's (read here, never written)."""

    @property
    def deadline(self) -> float: ...

    def expire(self) -> None: ...

    @property
    def phase(self) -> int: ...

    @property
    def listener(self) -> Draining: ...


class Deadlines:
    """The registered entries and the sweep (``run``); see the module docstring.

    Error handling: an exception out of an entry's ``expire`` propagates out of ``sweep`` and
    ``run`` (into the daemon's nursery): it is a bug, and it is not swallowed.
    """

    __slots__ = ("_entries", "_keepalive", "_scope", "tick")

    def __init__(self) -> None:
        self._entries: set[Expiring] = set()
        self._keepalive: set[KeepAlive] = set()
        self.tick = MAX_TICK
        #: The scope ``run`` sleeps in until the next sweep (None when it is not sleeping).
        self._scope: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._entries) + len(self._keepalive)

    # -- registration -------------------------------------------------------------------

    def add(self, entry: Expiring) -> None:
        """Watch ``entry``'s deadline until ``discard``."""
        self._entries.add(entry)

    def discard(self, entry: Expiring) -> None:
        self._entries.discard(entry)

    def add_keepalive(self, conn: KeepAlive) -> None:
        """Watch ``conn``'s deadline, and its phase while its listener drains, until
        ``discard_keepalive``."""
        self._keepalive.add(conn)

    def discard_keepalive(self, conn: KeepAlive) -> None:
        self._keepalive.discard(conn)

    def need(self, seconds: float) -> None:
        """Make sure timeouts of ``seconds`` are checked often enough (tick ≤ a quarter)."""
        tick = seconds / 4
        if tick < self.tick:
            self.tick = tick = max(MIN_TICK, tick)
            scope = self._scope
            if scope is not None:  # sleeping for the old, longer tick: wake up sooner
                scope.deadline = min(scope.deadline, trio.current_time() + tick)

    # -- sweeping -----------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Call ``expire`` on every entry due at ``now`` (each at most once)."""
        for entry in list(self._entries):
            if entry.deadline <= now:
                entry.expire()
        for conn in list(self._keepalive):
            if conn.deadline <= now or (conn.phase == IDLE and conn.listener.draining):
                conn.expire()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``tick`` until cancelled (run it in the daemon's connections nursery:
        it ends with the drain). Entries stay registered when it ends; nothing is closed."""
        task_status.started()
        try:
            while True:
                with trio.CancelScope(deadline=trio.current_time() + self.tick) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
                self.sweep(trio.current_time())
        finally:
            self._scope = None
