"""Running state of listeners: counters kept on the hot path and read by /metrics and /status.

No I/O. Counters are plain integers on slotted objects: the data path adds to them, the admin
endpoint renders them. ``ListenerStats`` objects are kept by listener name across reloads so
that Prometheus counters never go backwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from .capacity import ConnectionBudget

if TYPE_CHECKING:
    from .acl import SourceACL
    from .config import ListenerConfig
    from .ratelimit import RateLimiter
    from .upstream import UpstreamRuntime

#: ``l4gw_connections_total`` outcomes (SPEC), and the refusals of the listener's and the
#: process's connection caps (``l4gw.core.capacity``).
OUTCOMES = (
    "proxied",
    "denied",
    "rate_limited",
    "no_healthy_node",
    "connect_failed",
    "error",
    "max_connections",
    "fd_limit",
)

#: Bucket upper bounds of ``l4gw_request_duration_seconds``.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A Prometheus-style histogram with fixed buckets (counts are not cumulative here)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.count += 1
        self.total += value


class ListenerStats:
    """Counters of one listener name, kept across reloads.

    ``active`` counts the connections under way: raised by hand when one is admitted (with
    ``budget.active``), lowered only by :meth:`connection_ended`, which lowers the budget's
    too and calls ``on_idle`` (set by the daemon), synchronously and without awaiting, each
    time it drops to 0: the drain waits on that instead of polling the counters. (Plain
    attributes, not properties: they are written twice per connection.)
    """

    __slots__ = (
        "active",
        "budget",
        "bytes_in",
        "bytes_out",
        "durations",
        "on_idle",
        "outcomes",
        "requests",
    )

    def __init__(self, budget: ConnectionBudget | None = None) -> None:
        #: Connections of this listener under way (accepted and not yet ended).
        self.active = 0
        #: The process-wide count and cap every listener of the process shares (a budget of
        #: its own, without a cap, when none is given).
        self.budget = budget if budget is not None else ConnectionBudget()
        self.on_idle: Callable[[], None] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        #: (route name, status) -> count, http mode.
        self.requests: dict[tuple[str, int], int] = {}
        self.durations = Histogram()

    def connection_ended(self) -> None:
        """One connection fewer under way (``on_idle`` runs if none is left)."""
        self.budget.active -= 1
        self.active -= 1
        if not self.active:
            on_idle = self.on_idle
            if on_idle is not None:
                on_idle()


@attrs.define(eq=False)
class ListenerRuntime:
    """What the accept loop and connection handlers of one listener read for each connection.

    A reload replaces ``config``, ``acl``, ``rate_limiter`` and ``upstreams`` on this object
    (connections look them up per connection, never cache them across connections).
    """

    config: ListenerConfig
    stats: ListenerStats
    acl: SourceACL
    rate_limiter: RateLimiter
    upstreams: Mapping[str, UpstreamRuntime]
    #: Peers allowed to send a PROXY header (``proxy_protocol_from``); None = any peer.
    proxy_from: SourceACL | None = None
    access_log: bool = True
    #: Set by the daemon while draining: handlers stop keep-alive and close after the response.
    draining: bool = False

    @property
    def name(self) -> str:
        return self.config.name
