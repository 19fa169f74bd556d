"""The one deadline sweeper (l4gw.deadlines): plain entries, keep-alive entries (HTTP phases)
and the L4 idle sweeper as one of its entries; under the autojump clock, at exact times."""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from l4gw.http.timeouts import HEAD, RESPONSE
from l4gw.l4.deadlines import IDLE, MAX_TICK, MIN_TICK, Deadlines
from l4gw.l4.relay import IdleSweeper

#: Under the autojump clock ``fail_after`` counts virtual seconds.
VIRTUAL_TIMEOUT = 100


class Entry:
    """A plain entry: records when it expired (relative to ``start``), then has no deadline."""

    def __init__(self, name: str, log: list[tuple[str, float]], deadline: float) -> None:
        self.name = name
        self.log = log
        self.deadline = deadline
        self.start = 0.0

    def expire(self) -> None:
        self.log.append((self.name, round(trio.current_time() - self.start, 6)))
        self.deadline = math.inf


class Listener:
    def __init__(self) -> None:
        self.draining = False


class Conn(Entry):
    """A keep-alive entry shaped like an http connection: a phase and a listener; once it
    expired it closes, and leaves the sweeper as a connection does when it ends."""

    def __init__(
        self,
        name: str,
        log: list[tuple[str, float]],
        deadline: float,
        listener: Listener,
        deadlines: Deadlines,
    ) -> None:
        super().__init__(name, log, deadline)
        self.phase = HEAD
        self.listener = listener
        self.deadlines = deadlines

    def expire(self) -> None:
        super().expire()
        self.deadlines.discard_keepalive(self)


class FakeRelay:
    """What ``IdleSweeper`` reads and calls on a relay."""

    def __init__(self, idle_timeout: float, now: float) -> None:
        self.bytes_in = self.bytes_out = 0
        self.idle_timeout = idle_timeout
        self.idle_since = now
        self.idle_checked_total = 0
        self.closed = False
        self.aborted: list[tuple[str, float]] = []
        self.listener = "l"
        self.node_state: object = None
        self.drain_deadline: float | None = None

    def abort(self, reason: str, *, reset: bool = False) -> None:
        self.closed = True
        self.aborted.append((reason, trio.current_time()))


# -- plain entries ----------------------------------------------------------------------------


async def test_deadlines_set_moved_cleared_expire_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[tuple[str, float]] = []
    deadlines = Deadlines()
    assert deadlines.tick == MAX_TICK
    deadlines.need(0.4)  # a quarter: sweeps every 0.1 s
    assert deadlines.tick == pytest.approx(0.1)
    deadlines.need(10.0)  # a longer timeout never slows the sweeps down
    assert deadlines.tick == pytest.approx(0.1)
    with trio.fail_after(VIRTUAL_TIMEOUT):
        start = trio.current_time()
        late = Entry("late", log, start + 0.35)
        early = Entry("early", log, start + 0.15)
        cleared = Entry("cleared", log, start + 0.25)
        never = Entry("never", log, math.inf)
        for entry in (late, early, cleared, never):
            entry.start = start
            deadlines.add(entry)
        async with trio.open_nursery() as nursery:
            await nursery.start(deadlines.run)
            await trio.sleep(0.22)
            late.deadline = start + 0.55  # moved later before it was due
            cleared.deadline = math.inf  # cleared before it was due
            await trio.sleep(0.5)
            early.deadline = trio.current_time() + 0.05  # set again after it expired
            await trio.sleep(0.3)
            deadlines.discard(late)
            late.deadline = start  # no longer registered: never looked at again
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    # Each at the first sweep at or after its deadline (sweeps at 0.1, 0.2, ...).
    assert log == [("early", 0.2), ("late", 0.6), ("early", 0.8)]
    assert len(deadlines) == 3


async def test_need_wakes_a_sleeping_sweeper_sooner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[tuple[str, float]] = []
    deadlines = Deadlines()
    with trio.fail_after(VIRTUAL_TIMEOUT):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(deadlines.run)  # sleeps for MAX_TICK
            await trio.sleep(0.05)
            entry = Entry("short", log, trio.current_time() + 0.08)
            entry.start = start
            deadlines.add(entry)
            deadlines.need(0.2)  # tick 0.05: the sweep comes at 0.1, not at 1.0
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    assert log == [("short", 0.15)]
    deadlines.need(0.001)
    assert deadlines.tick == MIN_TICK


@given(
    deadlines_at=st.lists(
        st.one_of(st.floats(0, 10), st.just(math.inf), st.just(-math.inf)), max_size=20
    ),
    sweeps=st.lists(st.floats(0, 12), min_size=1, max_size=30),
)
def test_each_entry_expires_once_at_the_first_sweep_after_its_deadline(
    deadlines_at: list[float], sweeps: list[float]
) -> None:
    """Pure: ``sweep`` calls ``expire`` on an entry at the first sweep time >= its deadline."""
    calls: list[tuple[int, float]] = []

    class Recorder:
        def __init__(self, index: int, deadline: float) -> None:
            self.index = index
            self.deadline = deadline
            self.now = 0.0

        def expire(self) -> None:
            calls.append((self.index, self.now))
            self.deadline = math.inf

    deadlines = Deadlines()
    entries = [Recorder(i, at) for i, at in enumerate(deadlines_at)]
    for entry in entries:
        deadlines.add(entry)
    for now in sorted(sweeps):
        for entry in entries:
            entry.now = now
        deadlines.sweep(now)
    expected = []
    for i, at in enumerate(deadlines_at):
        due = [now for now in sorted(sweeps) if at <= now]
        if due:
            expected.append((i, due[0]))
    assert sorted(calls) == sorted(expected)


# -- the HTTP phase case: keep-alive entries ----------------------------------------------------


async def test_http_phases_and_idle_connections_of_a_draining_listener(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[tuple[str, float]] = []
    listener = Listener()
    deadlines = Deadlines()
    deadlines.need(0.4)  # tick 0.1
    with trio.fail_after(VIRTUAL_TIMEOUT):
        start = trio.current_time()
        waiting = Conn("waiting", log, start + 5.0, listener, deadlines)  # a head under way
        idle = Conn("idle", log, start + 5.0, listener, deadlines)  # between requests
        idle.phase = IDLE
        answer = Conn("answer", log, math.inf, listener, deadlines)
        for conn in (waiting, idle, answer):
            conn.start = start
            deadlines.add_keepalive(conn)
        async with trio.open_nursery() as nursery:
            await nursery.start(deadlines.run)
            await trio.sleep(0.25)
            # A request goes to a node: the deadline of its phase, changed per request.
            answer.phase = RESPONSE
            answer.deadline = trio.current_time() + 0.3
            listener.draining = True  # idle connections end now, busy ones do not
            await trio.sleep(0.5)
            deadlines.discard_keepalive(waiting)
            await trio.sleep(6.0)
            nursery.cancel_scope.cancel()
    assert log == [("idle", 0.3), ("answer", 0.6)]
    assert len(deadlines) == 0


# -- the L4 idle case: IdleSweeper, one entry of the same sweeper ------------------------------


async def test_l4_idle_timeout_between_timeout_and_timeout_plus_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    deadlines = Deadlines()
    sweeper = IdleSweeper(deadlines)
    with trio.fail_after(VIRTUAL_TIMEOUT):
        start = trio.current_time()
        quiet = FakeRelay(1.0, start)
        chatty = FakeRelay(1.0, start)
        for relay in (quiet, chatty):
            sweeper.add(relay)  # type: ignore[arg-type]
        assert sweeper.tick == pytest.approx(0.25)
        async with trio.open_nursery() as nursery:
            await nursery.start(deadlines.run)
            await trio.sleep(0.6)
            chatty.bytes_in += 10  # its last byte, at 0.6
            await trio.sleep(3.0)
            nursery.cancel_scope.cancel()
    ((reason, at),) = quiet.aborted
    assert reason == "idle timeout"
    assert 1.0 <= at - start <= 1.0 + sweeper.tick + 1e-9
    ((reason, at),) = chatty.aborted
    assert reason == "idle timeout"
    assert 1.6 <= at - start <= 1.6 + sweeper.tick + 1e-9
    assert sweeper.closed_idle == 2


async def test_l4_sweeps_keep_their_own_pace_next_to_short_http_timeouts(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP timeouts make the sweeper tick every 25 ms; the relays are still looked at about
    every 250 ms (their own tick), never less often."""
    deadlines = Deadlines()
    sweeper = IdleSweeper(deadlines)
    sweep_times: list[float] = []
    sweep = sweeper.sweep

    def counting_sweep(now: float) -> None:
        sweep_times.append(now)
        sweep(now)

    monkeypatch.setattr(sweeper, "sweep", counting_sweep)
    with trio.fail_after(VIRTUAL_TIMEOUT):
        sweeper.add(FakeRelay(1.0, trio.current_time()))  # type: ignore[arg-type]
        deadlines.need(0.1)  # an http header_timeout of 100 ms
        assert deadlines.tick == pytest.approx(0.025)
        async with trio.open_nursery() as nursery:
            await nursery.start(deadlines.run)
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(sweep_times)]
    assert gaps
    assert all(sweeper.tick - deadlines.tick - 1e-9 <= gap <= sweeper.tick + 1e-9 for gap in gaps)
