"""Per-node runtime state shared by the balancer, health checks, metrics and status.

No I/O. One ``NodeState`` exists per (upstream, node address) for the life of the node in the
running daemon; a reload or a DNS refresh that keeps a node keeps its ``NodeState``, so health
and counters survive.
"""

from __future__ import annotations

import time
from typing import Literal

import attrs

from .netaddr import SocketAddress

NodeSource = Literal["static", "dns"]


@attrs.define(eq=False, slots=True)
class NodeState:
    """Mutable state of one backend node (identity equality: one object per node)."""

    address: SocketAddress
    weight: int
    source: NodeSource = "static"
    #: Live proxied connections to this node.
    active: int = 0
    #: Result of health checking (active and passive); new nodes start healthy.
    healthy: bool = True
    #: False once the node left the configuration or DNS answer: no new connections,
    #: existing ones finish.
    in_service: bool = True
    #: Scratch value of the smooth weighted round robin (nginx's ``current_weight``).
    current_weight: int = 0
    #: Counters for /status and metrics.
    connections_total: int = 0
    connect_failures: int = 0
    # -- health checking, owned by l4gw.core.health (docs/health.md). ``healthy`` above is
    # ``check_up and ejected_until is None``, kept in step by the health monitor.
    #: Verdict of the active checks (always True while ``check = "none"``).
    check_up: bool = True
    #: Consecutive passing and failing active checks (at most one of them is non-zero;
    #: both zero = no check history, so the next result decides the state at once).
    check_passes: int = 0
    check_failures: int = 0
    #: The last active check's result ("status 200", "connect refused", "timeout after 2s")
    #: and when it finished (wall clock, epoch seconds; 0 = never checked).
    last_check: str = ""
    last_check_at: float = 0.0
    #: Consecutive connect failures on live traffic (reset by a successful connect).
    passive_failures: int = 0
    #: Passive ejection: when the current ejection ends (``trio.current_time()`` clock; None =
    #: not ejected), the ejection multiplier (ejections in a row), and when the last
    #: ejection started and ended (same clock).
    ejected_until: float | None = None
    ejections: int = 0
    ejected_at: float = 0.0
    rejoined_at: float = 0.0
    #: Why the node is in its health state ("" = not seen by a health monitor yet) and since
    #: when (wall clock, epoch seconds).
    health_reason: str = ""
    health_since: float = attrs.field(factory=time.time)

    @property
    def key(self) -> str:
        return str(self.address)
