"""Per-source-IP rate limiting of new connections (tcp) or requests (http). No I/O.

Time is passed in (``now``, seconds, from a monotonic clock such as ``trio.current_time()``),
so tests run on exact virtual times.
"""

from __future__ import annotations

import math
from collections import OrderedDict

__all__ = ["RateLimiter"]

# Token counts are floats; refilling 0.1 token/s for 10 s may give 0.9999999999999999.
# A token this close to whole counts as whole, which admits at most one request a few
# femtoseconds early.
_EPSILON = 1e-9

#: Full buckets forgotten per ``allow`` call, from the least recently used end. Bounded so
#: a call never does a long sweep after a flood subsides; at two per call, forgetting
#: outpaces the one bucket a call can add.
_SWEEP_PER_CALL = 2


class RateLimiter:
    """Token buckets keyed by client IP.

    Each key's bucket holds up to ``capacity`` tokens (``burst``, or ``ceil(rate)`` when
    ``burst`` is 0) and gains ``rate`` tokens per second; ``allow`` takes one. A new key
    starts with a full bucket. ``rate == 0`` disables limiting (``enabled`` is False and
    ``allow`` is always True, tracking nothing).

    Memory is bounded: at most ``max_tracked`` buckets exist at once. Buckets are kept in
    least-recently-used order. A bucket unused for ``capacity / rate`` seconds is full again
    and carries no information (forgetting it and starting a new full one on the next request
    gives the same decisions), so each call forgets up to two such buckets from the
    old end. When a new key would exceed ``max_tracked``, the least recently used bucket is
    dropped whether or not it is full.

    What happens at the bound, precisely:

    * A key is dropped while not full only if it is the least recently used of
      ``max_tracked + 1`` keys, i.e. ``max_tracked`` other distinct keys were seen since its
      last request. So if no more than ``max_tracked`` distinct sources are seen within any
      ``capacity / rate`` seconds, every decision is exactly that of an unbounded limiter.
    * A dropped key starts again with a full bucket, exactly as a source that had been idle:
      it may be admitted up to ``capacity`` requests early (never more than one extra burst
      per eviction), and from then on it is limited as configured. The error is always
      towards admitting: a legitimate client under a flood of new addresses is never held
      below the configured rate and burst.
    * The limit of this: a sender that cycles through more than ``max_tracked`` source
      addresses within one refill period finds each of them evicted before it returns, and
      is not limited at all (an unbounded limiter would admit ``rate`` per second per address,
      which for that many addresses is rarely a meaningful limit either; per-IP keys cannot
      stop a sender with a whole IPv6 prefix in any case).
    * Memory never exceeds ``max_tracked`` buckets (about 150 bytes each: the default
      100,000 is about 15 MB).
    """

    __slots__ = ("_buckets", "burst", "capacity", "enabled", "max_tracked", "rate")

    def __init__(self, rate: float, burst: int = 0, max_tracked: int = 100_000) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number >= 0, not {rate!r}")
        if burst < 0:
            raise ValueError(f"burst must be >= 0, not {burst!r}")
        if max_tracked < 1:
            raise ValueError(f"max_tracked must be >= 1, not {max_tracked!r}")
        self.rate = float(rate)
        self.burst = burst
        self.max_tracked = max_tracked
        self.enabled: bool = rate > 0
        #: Tokens a full bucket holds: requests admitted at once from an idle source.
        self.capacity: int = burst or math.ceil(rate)
        # key -> (tokens at ``last``, ``last``), least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        """Take a token from ``key``'s bucket at time ``now``; False if it is empty."""
        if not self.enabled:
            return True
        buckets = self._buckets
        state = buckets.get(key)
        if state is None:
            tokens = float(self.capacity)
        else:
            previous, last = state
            # A clock that went backwards refills nothing, now or later.
            now = max(now, last)
            tokens = min(self.capacity, previous + (now - last) * self.rate)
            buckets.move_to_end(key)
        allowed = tokens >= 1.0 - _EPSILON
        if allowed:
            tokens = max(0.0, tokens - 1.0)
        buckets[key] = (tokens, now)
        self._forget(now)
        return allowed

    def _forget(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(_SWEEP_PER_CALL):
            oldest = next(iter(buckets))
            tokens, last = buckets[oldest]
            if len(buckets) > self.max_tracked or (
                tokens + (now - last) * self.rate >= self.capacity
            ):
                del buckets[oldest]
                if not buckets:
                    return
            else:
                return

    @property
    def tracked(self) -> int:
        """Buckets currently held (never more than ``max_tracked``)."""
        return len(self._buckets)

    def __repr__(self) -> str:
        return (
            f"RateLimiter(rate={self.rate:g}, capacity={self.capacity}, "
            f"tracked={len(self._buckets)}/{self.max_tracked})"
        )
