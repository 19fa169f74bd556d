"""Listener runtime state: the active-connection counter tells whoever waits for it (the
daemon's drain) when it drops to 0."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.runtime import ListenerStats


@given(st.lists(st.booleans(), max_size=60))
def test_on_idle_runs_each_time_active_drops_to_zero(steps: list[bool]) -> None:
    stats = ListenerStats()
    calls: list[int] = []
    stats.on_idle = lambda: calls.append(stats.active)
    expected = 0
    for opened in steps:
        if opened:
            stats.active += 1
        elif stats.active:
            stats.connection_ended()
            expected += stats.active == 0
    assert calls == [0] * expected


def test_without_on_idle_it_is_a_plain_counter() -> None:
    stats = ListenerStats()
    stats.active += 2
    stats.connection_ended()
    stats.connection_ended()
    assert stats.active == 0
