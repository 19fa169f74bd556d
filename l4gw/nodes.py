"""Per-node runtime state shared by the balancer, health checks, metrics and status.

No I/O. One ``NodeState`` exists per (upstream, node address) for the life of the node in the
running daemon; a reload or a DNS refresh that keeps a node keeps its ``NodeState``, so health
and counters survive.
"""

from __future__ import annotations

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

    @property
    def key(self) -> str:
        return str(self.address)
