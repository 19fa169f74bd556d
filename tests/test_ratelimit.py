from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.ratelimit import RateLimiter


class ReferenceLimiter:
    """Unbounded token buckets in exact arithmetic: what RateLimiter must agree with."""

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate = Fraction(rate)
        self.capacity = Fraction(capacity)
        self.buckets: dict[str, tuple[Fraction, Fraction]] = {}

    def allow(self, key: str, now: float) -> bool:
        t = Fraction(now)
        tokens, last = self.buckets.get(key, (self.capacity, t))
        t = max(t, last)
        tokens = min(self.capacity, tokens + (t - last) * self.rate)
        allowed = tokens >= 1
        self.buckets[key] = (tokens - 1 if allowed else tokens, t)
        return allowed


def test_burst_then_refill() -> None:
    limiter = RateLimiter(rate=10)
    assert limiter.enabled
    assert limiter.capacity == 10
    assert all(limiter.allow("a", 0.0) for _ in range(10))
    assert not limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.05)
    assert limiter.allow("a", 0.1)  # one token per 0.1 s
    assert not limiter.allow("a", 0.1)
    assert limiter.allow("b", 0.1)  # keys are independent


def test_explicit_burst() -> None:
    limiter = RateLimiter(rate=1, burst=5)
    assert limiter.capacity == 5
    assert [limiter.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not limiter.allow("a", 0.5)
    assert limiter.allow("a", 1.0)
    # A long pause refills to the capacity, no further.
    assert [limiter.allow("a", 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_fractional_rate() -> None:
    limiter = RateLimiter(rate=0.5)
    assert limiter.capacity == 1
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert not limiter.allow("a", 1.0)
    assert not limiter.allow("a", 1.999)
    assert limiter.allow("a", 2.0)
    assert not limiter.allow("a", 3.0)
    assert limiter.allow("a", 4.0)


def test_denied_requests_do_not_consume() -> None:
    limiter = RateLimiter(rate=1)
    assert limiter.allow("a", 0.0)
    for t in (0.2, 0.4, 0.6, 0.8):
        assert not limiter.allow("a", t)
    assert limiter.allow("a", 1.0)


def test_float_rounding_at_the_boundary() -> None:
    limiter = RateLimiter(rate=0.1)
    assert limiter.allow("a", 0.0)
    # Whatever rounding the float arithmetic does, 10 s at 0.1/s is one whole token.
    now = 0.0
    for _ in range(10):
        now += 1.0
        if now < 10.0:
            assert not limiter.allow("a", now)
    assert limiter.allow("a", now)


def test_clock_going_backwards_refills_nothing() -> None:
    limiter = RateLimiter(rate=1)
    assert limiter.allow("a", 10.0)
    assert not limiter.allow("a", 5.0)
    assert not limiter.allow("a", 10.5)
    assert limiter.allow("a", 11.0)


def test_rate_zero_disables() -> None:
    limiter = RateLimiter(rate=0)
    assert not limiter.enabled
    assert all(limiter.allow("a", 0.0) for _ in range(1000))
    assert limiter.tracked == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": -1},
        {"rate": float("nan")},
        {"rate": float("inf")},
        {"rate": 1, "burst": -1},
        {"rate": 1, "max_tracked": 0},
    ],
)
def test_invalid_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_full_buckets_are_forgotten() -> None:
    limiter = RateLimiter(rate=2, burst=4)
    for i in range(100):
        limiter.allow(f"k{i}", 0.0)
    assert limiter.tracked == 100
    # After capacity / rate = 2 s every bucket is full again; each call forgets two.
    for _ in range(60):
        limiter.allow("live", 2.0)
    assert limiter.tracked == 1
    # Not yet full buckets stay.
    limiter.allow("x", 2.0)  # 3 tokens left, full again at 2.5
    limiter.allow("live", 2.25)
    assert limiter.tracked == 2


def test_memory_bound_under_a_flood_of_distinct_sources() -> None:
    bound = 1000
    limiter = RateLimiter(rate=5, burst=5, max_tracked=bound)
    reference = ReferenceLimiter(rate=5, capacity=5)
    now = 0.0
    for i in range(100_000):
        now += 0.0001  # 10,000 new sources per second
        assert limiter.allow(f"flood-{i}", now)  # each is new, so admitted
        assert limiter.tracked <= bound
        if i % 97 == 0:
            # A busy client, active more often than every `bound` distinct keys: its
            # decisions are exactly those of an unbounded limiter.
            for key in ("busy-1", "busy-2"):
                assert limiter.allow(key, now) == reference.allow(key, now)
    assert limiter.tracked == bound


def test_eviction_at_the_bound_resets_only_the_evicted_key() -> None:
    limiter = RateLimiter(rate=1, max_tracked=3)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    # Three other keys push "a" (not full) out of the table: it starts again full.
    for key in ("b", "c", "d"):
        assert limiter.allow(key, 0.0)
    assert limiter.tracked == 3
    assert limiter.allow("a", 0.0)  # the documented cost of the bound
    assert not limiter.allow("a", 0.0)


@given(
    rate=st.sampled_from([0.5, 1.0, 2.0, 3.0, 10.0]),
    burst=st.integers(0, 4),
    events=st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(0, 40)), min_size=1, max_size=200
    ),
)
def test_agrees_with_exact_reference_within_the_bound(
    rate: float, burst: int, events: list[tuple[str, int]]
) -> None:
    # max_tracked covers every key, so forgetting only ever drops full buckets and must
    # never change a decision. Times are multiples of 1/16 s: exact in binary floating point.
    limiter = RateLimiter(rate=rate, burst=burst, max_tracked=5)
    reference = ReferenceLimiter(rate=rate, capacity=limiter.capacity)
    now = 0.0
    for key, step in events:
        now += step / 16
        assert limiter.allow(key, now) == reference.allow(key, now), (key, now)
        assert limiter.tracked <= 5
