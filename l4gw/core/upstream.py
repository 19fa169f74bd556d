"""The running state of one upstream: its nodes, balancer and node observers, and the two
objects every connect goes through. No I/O.

One ``UpstreamRuntime`` exists per upstream name for the life of the daemon. A reload calls
``apply`` with the new configuration; DNS discovery calls ``set_discovered``. Both keep the
``NodeState`` of every node that stays (health and counters survive) and take nodes that leave
out of service: they get no new connections, while their live connections run on.

``NodeLease`` is the only thing that changes ``NodeState.active`` (what ``least_conn``,
``random_two`` and ``max_connections_per_node`` read): one lease per node connection, held
while the connection is in use. ``ConnectPlan`` is the attempt-by-attempt logic of one
client's connect (retries over distinct nodes, backend authorization, the counters, logs and
final errors); :mod:`l4gw.l4.connect` drives it from a task and from the reactor's callbacks, and
:class:`l4gw.http.pool.NodePool` with keep-alive reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

import structlog

from .acl import BackendAuthorization
from .balance import Balancer, make_balancer
from .config import UpstreamConfig
from .errors import NoHealthyNode, UpstreamConnectError
from .netaddr import SocketAddress
from .nodes import NodeSource, NodeState

log = structlog.get_logger("l4gw.upstream")
#: Connect attempts log under the name they always had.
connect_log = structlog.get_logger("l4gw.connect")


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
        # A retired node whose address is in service again under a newer NodeState (it was
        # forgotten at 0, then a pooled connection to it was taken again) stays retired.
        shadowed: list[NodeState] = []
        for old in self.retired:
            if old.address in current:
                shadowed.append(old)
            else:
                current[old.address] = old
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
        self.retired = [node for node in (*current.values(), *shadowed) if node.active > 0]

    def forget_retired(self) -> None:
        """Drop retired nodes whose last connection has closed (``NodeLease.release`` calls
        this when a retired node's count reaches 0)."""
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


class NodeLease:
    """One connection counted on one node: the only writer of ``NodeState.active``.

    Creating a lease raises the node's count at once (from the pick on, before the connect:
    concurrent picks must see it). :meth:`release` lowers it; releasing a lease that is not
    held does nothing, so error paths may release unconditionally. :meth:`acquire` counts it
    again: a keep-alive connection keeps its one lease for its whole life, released while it
    is idle in a pool and acquired again when it is taken for a request (no allocation per
    request). When a node that left the upstream drops to 0, the upstream forgets it.
    """

    __slots__ = ("held", "node", "upstream")

    def __init__(self, upstream: UpstreamRuntime, node: NodeState) -> None:
        self.upstream = upstream
        self.node = node
        #: True while the connection is counted on ``node``.
        self.held = True
        node.active += 1

    def acquire(self) -> None:
        """Count the connection on the node again (no-op while held)."""
        if self.held:
            return
        self.held = True
        node = self.node
        node.active += 1
        if not node.in_service and node not in self.upstream.retired:
            self.upstream.retired.append(node)  # forgotten at 0, live again: show it

    def release(self) -> None:
        """Stop counting the connection on the node (no-op unless held)."""
        if not self.held:
            return
        self.held = False
        node = self.node
        node.active -= 1
        if not node.active and not node.in_service:
            self.upstream.forget_retired()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<NodeLease {self.upstream.name}/{self.node.key} {state}>"


class ConnectPlan:
    """The connect attempts of one client's connection to one upstream (no I/O).

    A driver loops: :meth:`next` gives the lease of the next attempt (or the final error),
    the driver connects to ``lease.node`` and reports :meth:`succeeded` (the driver then owns
    the lease) or :meth:`failed` (the plan releases it). The rules, the same for every
    driver:

    * at most ``retries`` attempts (the upstream's setting when the plan was made), each to
      a node not tried before, picked by :meth:`UpstreamRuntime.pick` (balancer, health,
      ``fail_open``, ``max_connections_per_node``); ``first``, if given, is the node of the
      first attempt (the caller picked it already);
    * a node that backend authorization does not permit is never connected to: it uses up an
      attempt and is logged ``node_unauthorized``;
    * a failed attempt counts ``connect_failures``, tells the observers (passive health) and
      logs ``connect_failed``; a successful one counts ``connections_total`` and tells the
      observers;
    * the final error is ``NoHealthyNode`` when no attempt reached a connect, else
      ``UpstreamConnectError`` naming the attempts and the last error.
    """

    __slots__ = ("client_key", "first", "last_error", "retries", "tried", "upstream")

    def __init__(
        self, upstream: UpstreamRuntime, client_key: bytes, *, first: NodeState | None = None
    ) -> None:
        self.upstream = upstream
        self.client_key = client_key
        self.first = first
        self.retries = upstream.config.retries
        #: Nodes picked so far (authorized or not), in order.
        self.tried: list[NodeState] = []
        #: The error of the last failed connect, None if none failed.
        self.last_error: str | None = None

    def next_node(self) -> NodeState | NoHealthyNode | UpstreamConnectError:
        """The authorized node of the next attempt, or the final error when none is left.

        Does not count the node: the caller counts it with a lease (``NodeLease`` or a
        pooled connection's ``acquire``) before it awaits anything.
        """
        upstream = self.upstream
        tried = self.tried
        while len(tried) < self.retries:
            node = self.first
            if node is not None:
                self.first = None
            else:
                node = upstream.pick(tried, self.client_key)
            if node is None:
                break
            tried.append(node)
            if not upstream.authorization.permits(node.address):
                connect_log.error("node_unauthorized", upstream=upstream.name, node=node.key)
                continue
            return node
        return self.error()

    def next(self) -> NodeLease | NoHealthyNode | UpstreamConnectError:
        """The next attempt, its node already counted; or the final error."""
        node = self.next_node()
        if isinstance(node, NodeState):
            return NodeLease(self.upstream, node)
        return node

    def failed(self, lease: NodeLease, error: OSError | str) -> None:
        """The attempt of ``lease`` failed with ``error``: release the lease, count, log."""
        lease.release()
        node = lease.node
        text = error if isinstance(error, str) else error.strerror or str(error)
        self.last_error = text
        self.upstream.connect_failed(node)
        connect_log.info("connect_failed", upstream=self.upstream.name, node=node.key, error=text)

    def succeeded(self, lease: NodeLease) -> None:
        """The attempt of ``lease`` connected; the caller keeps the lease and releases it
        when the connection ends."""
        node = lease.node
        node.connections_total += 1
        self.upstream.connect_succeeded(node)

    def error(self) -> NoHealthyNode | UpstreamConnectError:
        """The error that ends the plan (messages as users have always seen them)."""
        name = self.upstream.name
        if self.last_error is None:
            return NoHealthyNode(f"upstream {name}: no node available")
        return UpstreamConnectError(
            f"upstream {name}: {len(self.tried)} connect attempt(s) failed, last: {self.last_error}"
        )
