"""The process-wide connection cap (:mod:`l4gw.core.capacity`)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.capacity import (
    FDS_PER_CONNECTION,
    LOG_INTERVAL,
    RESERVE_MIN,
    ConnectionBudget,
    connection_cap,
    fd_reserve,
)


def test_cap_of_known_limits() -> None:
    assert connection_cap(None) == 0  # unlimited: no cap
    assert connection_cap(256) == 80  # (256 - 64 - 32) / 2
    assert connection_cap(1024) == 416
    assert connection_cap(1 << 20) == 458720
    assert connection_cap(10) == 1  # never 0: 0 means "no cap"


@given(st.integers(min_value=RESERVE_MIN * 2, max_value=1 << 24))
def test_cap_leaves_the_reserve(nofile: int) -> None:
    cap = connection_cap(nofile)
    assert cap >= 1
    assert cap * FDS_PER_CONNECTION + fd_reserve(nofile) <= nofile
    assert (cap + 1) * FDS_PER_CONNECTION + fd_reserve(nofile) > nofile  # nothing wasted


@given(st.integers(min_value=1, max_value=1 << 24), st.integers(min_value=1, max_value=1 << 20))
def test_cap_grows_with_the_limit(nofile: int, more: int) -> None:
    assert connection_cap(nofile + more) >= connection_cap(nofile)


def test_budget_full_and_document() -> None:
    budget = ConnectionBudget(256)
    assert budget.limit == 80 and budget.reserve == 96
    budget.active = 79
    assert not budget.full()
    budget.active = 80
    assert budget.full()
    assert budget.document() == {
        "max_connections": 80,
        "open_file_limit": 256,
        "fd_reserve": 96,
        "active_connections": 80,
        "refused_total": 0,
    }
    unlimited = ConnectionBudget()
    unlimited.active = 10**9
    assert not unlimited.full()
    assert unlimited.document()["max_connections"] is None


@given(st.lists(st.floats(min_value=0, max_value=0.5, allow_nan=False), max_size=200))
def test_refusals_are_logged_at_most_once_per_interval_and_all_counted(gaps: list[float]) -> None:
    budget = ConnectionBudget(256)
    now = 1000.0
    logged_at: list[float] = []
    reported = 0
    for gap in gaps:
        now += gap
        count = budget.refused_now(now)
        if count:
            logged_at.append(now)
            reported += count
    assert budget.refused == len(gaps)
    assert reported + budget.unlogged == len(gaps)  # every refusal in exactly one line
    assert all(b - a >= LOG_INTERVAL for a, b in itertools.pairwise(logged_at))
    if gaps:
        assert logged_at[0] == 1000.0 + gaps[0]  # the first refusal is logged at once
