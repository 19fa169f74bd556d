"""The running state of one upstream: its nodes, balancer and node observers. No I/O.

One ``UpstreamRuntime`` exists per upstream name for the life of the daemon. A reload calls
``apply`` with the new configuration; DNS discovery calls ``set_discovered``. Both keep the
``NodeState`` of every node that stays (health and counters survive) and take nodes that leave
out of service: they get no new connections, while their live connections run on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

import structlog

from .acl import BackendAuthorization
from .balance import Balancer, make_balancer
from .config import UpstreamConfig
from .netaddr import SocketAddress
from .nodes import NodeSource, NodeState

log = structlog.get_logger("l4gw.upstream")


class NodeObserver(Protocol):
    """Told about connect results on live traffic (passive health checking)."""

    def connect_failed(self, upstream: UpstreamRuntime, node: NodeState) -> None: ...

    def connect_succeeded(self, upstream: UpstreamRuntime, node: NodeState) -> None: ...


class UpstreamRuntime:
    """Nodes and node selection for one upstream.

    ``nodes`` holds the in-service nodes, static ones first in config order, then the ones
    DNS discovery found. ``retired`` holds nodes that left but still carry connections.
    """

    def __init__(self, config: UpstreamConfig, authorization: BackendAuthorization) -> None:
        self.name = config.name
        self.config = config
        self.authorization = authorization
        self.balancer: Balancer = make_balancer(config.balance)
        self.nodes: list[NodeState] = []
        self.retired: list[NodeState] = []
        self.observers: list[NodeObserver] = []
        self.unauthorized_dropped = 0
        self._static: list[tuple[SocketAddress, int]] = []
        self._discovered: list[tuple[SocketAddress, int]] = []
        self.apply(config, authorization)

    # -- configuration -----------------------------------------------------------------

    def apply(self, config: UpstreamConfig, authorization: BackendAuthorization) -> None:
        """Take a new configuration of this upstream (at start and on reload)."""
        if config.balance != self.config.balance:
            self.balancer = make_balancer(config.balance)
        self.config = config
        self.authorization = authorization
        self._static = [(node.address, node.weight) for node in config.nodes]
        if config.discovery is None:
            self._discovered = []
        self._rebuild()

    def set_discovered(self, found: Iterable[tuple[SocketAddress, int]]) -> None:
        """Replace the DNS-discovered part of the node set (static nodes stay as they are)."""
        self._discovered = list(found)
        self._rebuild()

    def _rebuild(self) -> None:
        current = {node.address: node for node in self.nodes}
        current.update({node.address: node for node in self.retired if node.address not in current})
        wanted: dict[SocketAddress, tuple[int, NodeSource]] = {}
        for address, weight in self._static:
            wanted[address] = (weight, "static")
        for address, weight in self._discovered:
            if address in wanted:
                continue
            if not self.authorization.permits(address):
                self.unauthorized_dropped += 1
                log.warning(
                    "node_unauthorized",
                    upstream=self.name,
                    node=str(address),
                    authorized=self.authorization.explain(),
                )
                continue
            wanted[address] = (weight, "dns")
        nodes: list[NodeState] = []
        for address, (weight, source) in wanted.items():
            node = current.pop(address, None)
            if node is None:
                node = NodeState(address=address, weight=weight, source=source)
            else:
                node.weight = weight
                node.source = source
                node.in_service = True
            nodes.append(node)
        for node in current.values():
            node.in_service = False
        self.nodes = nodes
        self.retired = [node for node in current.values() if node.active > 0]

    def forget_retired(self) -> None:
        """Drop retired nodes whose last connection has closed."""
        if self.retired:
            self.retired = [node for node in self.retired if node.active > 0]

    def all_nodes(self) -> Sequence[NodeState]:
        return [*self.nodes, *self.retired]

    # -- selection ---------------------------------------------------------------------

    def pick(self, tried: Collection[NodeState], client_key: bytes) -> NodeState | None:
        """The node for the next connect attempt, or None when none may take it.

        Skips nodes in ``tried`` (retries go to distinct nodes), nodes at
        ``max_connections_per_node``, weight 0 nodes, and unhealthy nodes, unless no node is
        healthy and ``health.fail_open`` is set, in which case health is ignored.
        """
        limit = self.config.max_connections_per_node
        eligible: Callable[[NodeState], bool]
        if limit:

            def eligible(node: NodeState) -> bool:
                return node.healthy and node.active < limit and node not in tried
        elif tried:

            def eligible(node: NodeState) -> bool:
                return node.healthy and node not in tried
        else:

            def eligible(node: NodeState) -> bool:
                return node.healthy

        node = self.balancer.pick(self.nodes, eligible, client_key)
        if (
            node is None
            and self.config.health.fail_open
            and not any(n.healthy and n.weight > 0 for n in self.nodes)
        ):

            def eligible_open(node: NodeState) -> bool:
                return node not in tried and (not limit or node.active < limit)

            node = self.balancer.pick(self.nodes, eligible_open, client_key)
        return node

    def connect_failed(self, node: NodeState) -> None:
        node.connect_failures += 1
        for observer in self.observers:
            observer.connect_failed(self, node)

    def connect_succeeded(self, node: NodeState) -> None:
        for observer in self.observers:
            observer.connect_succeeded(self, node)
