"""Node selection: which backend node gets the next new connection.

Pure: no trio, no I/O, no clock. ``pick`` runs once per new connection (and once per retry), so
the algorithms avoid per-call allocations and call the caller's filter as few times as they can.

Contract shared by every algorithm (the ``Balancer`` protocol):

- ``nodes`` is the upstream's current node list. It may change between calls (reload, DNS);
  the same ``NodeState`` objects persist for nodes that stay, and per-node state lives on them.
- ``eligible(node)`` is the caller's filter (healthy or fail-open, not tried yet by this
  connection, not full). It must be a pure predicate: it may be called on any subset of the
  nodes, in any order, and more than once on the same node.
- A node with ``weight <= 0`` (drained) or ``in_service == False`` (left the configuration) is
  never picked, whatever ``eligible`` says.
- ``None`` means no node qualifies; the caller turns that into ``NoHealthyNode``.
- ``client_key`` is the client's IP as bytes; only ``source_hash`` looks at it.

Retries: the caller adds each tried node to the set ``eligible`` rejects and calls ``pick``
again, so one connection visits distinct nodes until none is left and ``pick`` returns ``None``.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate, chain
from typing import ClassVar, Final, Protocol

from .nodes import NodeState

__all__ = [
    "BALANCERS",
    "MAGLEV_TABLE_SIZE",
    "Balancer",
    "LeastConnBalancer",
    "RandomTwoBalancer",
    "RoundRobinBalancer",
    "SourceHashBalancer",
    "maglev_table",
    "make_balancer",
]

Eligible = Callable[[NodeState], bool]


class Balancer(Protocol):
    """Chooses a node for a new connection; see the module docstring for the contract."""

    def pick(
        self, nodes: Sequence[NodeState], eligible: Callable[[NodeState], bool], client_key: bytes
    ) -> NodeState | None: ...


class RoundRobinBalancer:
    """Smooth weighted round robin with nginx's semantics (``ngx_http_upstream_get_peer``).

    Every eligible node gains its weight in ``current_weight``; the node with the largest
    ``current_weight`` wins (the first one in list order on ties) and loses the sum of the
    weights of the eligible nodes. Weights 5, 1, 1 give ``a a b a c a a``. From a fresh start
    (every ``current_weight`` 0) the sequence repeats every ``sum(weights)`` picks, so any run
    of that many picks takes each node exactly ``weight`` times, spread out rather than in
    bursts. Unlike nginx there is no ``effective_weight`` decay: passive health checks eject a
    node through ``eligible`` instead.

    The state is ``NodeState.current_weight``, so it survives reloads that keep the node.
    """

    __slots__ = ()
    name: ClassVar[str] = "round_robin"

    def pick(
        self, nodes: Sequence[NodeState], eligible: Eligible, client_key: bytes
    ) -> NodeState | None:
        best: NodeState | None = None
        best_current = 0
        total = 0
        for node in nodes:
            weight = node.weight
            if weight <= 0 or not node.in_service or not eligible(node):
                continue
            current = node.current_weight + weight
            node.current_weight = current
            total += weight
            if best is None or current > best_current:
                best = node
                best_current = current
        if best is not None:
            best.current_weight = best_current - total
        return best


class LeastConnBalancer:
    """Weighted least connections: the node with the lowest ``(active + 1) / weight``.

    ``active + 1`` is the node's load once it takes this connection (HAProxy's ``leastconn``
    does the same). Comparing ``active / weight`` instead would ignore the weights whenever the
    nodes are idle, which is the usual state of a pool of short connections: weights 5 and 1
    would then alternate 1:1. With ``+ 1`` an idle pool fills in proportion to the weights.
    Products of integers, no floats. Ties go round robin: the scan starts just after the
    previous winner, and the first node of a tie wins.
    """

    __slots__ = ("_start",)
    name: ClassVar[str] = "least_conn"

    def __init__(self) -> None:
        self._start = 0

    def pick(
        self, nodes: Sequence[NodeState], eligible: Eligible, client_key: bytes
    ) -> NodeState | None:
        count = len(nodes)
        start = self._start
        if start >= count:
            start = 0
        best: NodeState | None = None
        best_index = 0
        # Start from load 1 / weight 0, worse than any node of weight > 0 (and no better than
        # a drained one, which therefore never wins). Only a strictly better node is shown to
        # the caller's filter, the slow part of the loop.
        best_load = 1
        best_weight = 0
        # Negative indices: ``start - count`` is ``start``, and the scan wraps around to it.
        for index in range(start - count, start):
            node = nodes[index]
            weight = node.weight
            load = node.active + 1
            if load * best_weight < best_load * weight and node.in_service and eligible(node):
                best = node
                best_index = index
                best_load = load
                best_weight = weight
        if best is not None:
            self._start = (best_index + 1) % count
        return best


class _Snapshot:
    """The node list and weights that a derived structure (table, weight sums) was built from.

    ``matches`` is O(n) but cheap: list equality compares ``NodeState`` objects by identity
    (they are ``eq=False``, one object per node), with a C-level fast path for ``is``.
    """

    __slots__ = ("nodes", "weights")

    def __init__(self) -> None:
        self.nodes: list[NodeState] = []
        self.weights: list[int] = []

    def matches(self, nodes: Sequence[NodeState]) -> bool:
        current = nodes if type(nodes) is list else list(nodes)
        return current == self.nodes and [node.weight for node in current] == self.weights

    def take(self, nodes: Sequence[NodeState]) -> list[NodeState]:
        self.nodes = list(nodes)
        self.weights = [node.weight for node in self.nodes]
        return self.nodes


#: ``random_two`` draws from all nodes and rejects ineligible ones; after this many rejections
#: in a row it scans the eligible nodes instead (most of the pool is down or tried).
_DRAWS: Final = 4


class RandomTwoBalancer:
    """Power of two choices, weighted.

    Draws two distinct eligible nodes, each with probability proportional to its weight (the
    second from the rest), and keeps the one with the lower ``active / weight``; on a tie the
    first draw wins, so an idle pool is used in proportion to the weights. One eligible node is
    returned as is. ``rng`` makes it reproducible in tests.

    Cost: the draws bisect cumulative weights (rebuilt when the nodes or weights change) and
    show only the drawn nodes to ``eligible``; when most draws are rejected, one scan of the
    pool collects the eligible nodes and draws from them. Both ways give exactly the
    distribution above.
    """

    __slots__ = ("_candidates", "_cumulative", "_pool", "_rng", "_snapshot", "_total")
    name: ClassVar[str] = "random_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._snapshot = _Snapshot()
        #: Nodes with weight > 0, and the running sums of their weights.
        self._pool: list[NodeState] = []
        self._cumulative: list[int] = []
        self._total = 0
        # Scratch list of the slow path; always left empty so it holds no node alive.
        self._candidates: list[NodeState] = []

    def pick(
        self, nodes: Sequence[NodeState], eligible: Eligible, client_key: bytes
    ) -> NodeState | None:
        if not self._snapshot.matches(nodes):
            self._refresh(nodes)
        pool = self._pool
        if not pool:
            return None
        random_float = self._rng.random
        cumulative = self._cumulative
        total = self._total
        last = len(pool) - 1
        first: NodeState | None = None
        for _ in range(_DRAWS):
            # ``random() * total`` can round up to ``total``: clamp to the last node.
            index = bisect_right(cumulative, random_float() * total)
            node = pool[index if index < last else last]
            if node.in_service and eligible(node):
                first = node
                break
        else:
            return self._scan(eligible, None)
        for _ in range(_DRAWS):
            index = bisect_right(cumulative, random_float() * total)
            second = pool[index if index < last else last]
            if second is not first and second.in_service and eligible(second):
                break
        else:
            return self._scan(eligible, first)
        if second.active * first.weight < first.active * second.weight:
            return second
        return first

    def _refresh(self, nodes: Sequence[NodeState]) -> None:
        self._pool = [node for node in self._snapshot.take(nodes) if node.weight > 0]
        self._cumulative = list(accumulate(node.weight for node in self._pool))
        self._total = self._cumulative[-1] if self._cumulative else 0

    def _scan(self, eligible: Eligible, first: NodeState | None) -> NodeState | None:
        """Draw from a full scan of the eligible nodes: both nodes, or the second if ``first``."""
        candidates = self._candidates
        total = 0
        for node in self._pool:
            if node is not first and node.in_service and eligible(node):
                candidates.append(node)
                total += node.weight
        if not candidates:
            return first
        random_float = self._rng.random
        if first is None:
            first = _draw(candidates, random_float() * total, None)
            if len(candidates) == 1:
                candidates.clear()
                return first
            total -= first.weight
        second = _draw(candidates, random_float() * total, first)
        candidates.clear()
        if second.active * first.weight < first.active * second.weight:
            return second
        return first


def _draw(candidates: list[NodeState], r: float, exclude: NodeState | None) -> NodeState:
    """The node where ``r`` (in ``[0, total weight)``) falls, ``exclude`` left out."""
    chosen = candidates[-1] if candidates[-1] is not exclude else candidates[-2]
    for node in candidates:
        if node is exclude:
            continue
        r -= node.weight
        if r < 0:
            return node
    # Floating-point rounding left ``r`` just above zero after the last node.
    return chosen


#: The Maglev lookup table size: a prime, fixed so that adding or removing a node never
#: re-maps keys through a new modulus. 65537 is Google's and Envoy's default; it keeps
#: slot shares within 1% for up to ~650 nodes. A rebuild costs tens of milliseconds.
MAGLEV_TABLE_SIZE: Final = 65537


def _client_hash(client_key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(client_key, digest_size=8).digest(), "little")


def _node_hash(key: bytes, salt: bytes) -> int:
    return int.from_bytes(
        hashlib.blake2b(key, digest_size=8, person=b"l4gw-maglev", salt=salt).digest(), "little"
    )


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    divisor = 3
    while divisor * divisor <= n:
        if n % divisor == 0:
            return False
        divisor += 2
    return True


def maglev_table(members: Sequence[tuple[str, int]], size: int = MAGLEV_TABLE_SIZE) -> list[int]:
    """Weighted Maglev lookup table (Eisenbud et al., NSDI 2016) with Envoy's weighting.

    ``members`` are ``(node key, weight > 0)``; the result maps each of ``size`` slots to an
    index into ``members``. Each member walks its own permutation of the slots (offset and
    skip from a stable hash of its key) and claims the next free slot on each of its turns.
    Turns come in rounds: the heaviest members take one every round, a member of weight ``w``
    one in ``max_weight / w`` rounds, so slot shares follow the weights. Every member takes a
    turn in the first round, so each one holds at least one slot (given
    ``len(members) <= size``). Deterministic: the same members in the same order give the
    same table in any process. An empty ``members`` gives an empty table.
    """
    if not _is_prime(size):
        raise ValueError(f"Maglev table size {size} is not a prime")
    if not members:
        return []
    position: list[int] = []
    skip: list[int] = []
    groups: dict[int, list[int]] = {}
    for i, (key, weight) in enumerate(members):
        if weight <= 0:
            raise ValueError(f"node {key} has weight {weight}; drained nodes have no slots")
        data = key.encode()
        position.append(_node_hash(data, b"offset") % size)
        skip.append(_node_hash(data, b"skip") % (size - 1) + 1)
        groups.setdefault(weight, []).append(i)
    max_weight = max(groups)
    table = [-1] * size
    filled = 0
    # Members of equal weight share their turns: schedule the weight groups, not the members.
    # The k-th turn of weight w falls in round max(1, ceil(k * max_weight / w)); within a
    # round the heavier group goes first, and a group's members go in ``members`` order.
    turns = [(1, -weight, 0) for weight in groups]
    heapq.heapify(turns)
    while True:
        _, negative_weight, taken = turns[0]
        weight = -negative_weight
        for i in groups[weight]:
            slot = position[i]
            step = skip[i]
            while table[slot] >= 0:
                slot += step
                if slot >= size:
                    slot -= size
            table[slot] = i
            filled += 1
            if filled == size:
                return table
            slot += step
            if slot >= size:
                slot -= size
            position[i] = slot
        taken += 1
        next_round = max(1, -(-taken * max_weight // weight))
        heapq.heapreplace(turns, (next_round, negative_weight, taken))


class SourceHashBalancer:
    """Consistent hashing of the client IP over a weighted Maglev table.

    The same client IP goes to the same node as long as the set of nodes and their weights
    stay the same. Adding or removing one of N equal nodes re-maps about 1/N of the clients
    (those of the node itself, plus a fraction of a percent). The table is rebuilt lazily, in
    the first ``pick`` after the set of ``(node key, weight)`` changed; health does not rebuild
    it. When the client's node is not eligible (unhealthy, already tried, full), the following
    table slots are walked until an eligible node turns up: the fallback is deterministic per
    client, and clients of eligible nodes do not move.
    """

    __slots__ = ("_members", "_size", "_slot_nodes", "_snapshot", "_table")
    name: ClassVar[str] = "source_hash"

    def __init__(self, *, table_size: int = MAGLEV_TABLE_SIZE) -> None:
        if not _is_prime(table_size):
            raise ValueError(f"Maglev table size {table_size} is not a prime")
        self._size = table_size
        self._snapshot = _Snapshot()
        # What the table was built from: sorted ``(key, weight)`` of the pickable nodes.
        self._members: tuple[tuple[str, int], ...] = ()
        self._table: list[int] = []
        # ``_slot_nodes[table[slot]]`` is the node of a slot.
        self._slot_nodes: list[NodeState] = []

    def pick(
        self, nodes: Sequence[NodeState], eligible: Eligible, client_key: bytes
    ) -> NodeState | None:
        if not self._snapshot.matches(nodes):
            self._refresh(nodes)
        table = self._table
        if not table:
            return None
        slot = _client_hash(client_key) % self._size
        member = table[slot]
        node = self._slot_nodes[member]
        if node.in_service and eligible(node):
            return node
        return self._fallback(slot, member, eligible)

    def _refresh(self, nodes: Sequence[NodeState]) -> None:
        pickable = sorted(
            (
                (node.key, node.weight, node)
                for node in self._snapshot.take(nodes)
                if node.weight > 0
            ),
            key=lambda entry: (entry[0], entry[1]),
        )
        members = tuple((key, weight) for key, weight, _ in pickable)
        if members != self._members:
            self._table = maglev_table(members, self._size)
            self._members = members
        self._slot_nodes = [node for _, _, node in pickable]

    def _fallback(self, slot: int, member: int, eligible: Eligible) -> NodeState | None:
        table = self._table
        slot_nodes = self._slot_nodes
        remaining = len(slot_nodes) - 1
        seen = {member}
        for index in chain(range(slot + 1, len(table)), range(slot)):
            if remaining == 0:
                break
            member = table[index]
            if member in seen:
                continue
            seen.add(member)
            remaining -= 1
            node = slot_nodes[member]
            if node.in_service and eligible(node):
                return node
        return None


BALANCERS: Final[frozenset[str]] = frozenset(
    {"round_robin", "least_conn", "random_two", "source_hash"}
)


def make_balancer(name: str, *, rng: random.Random | None = None) -> Balancer:
    """A new balancer for the ``balance`` setting ``name`` (one of ``BALANCERS``).

    ``rng`` seeds ``random_two``; the others ignore it. Raises ``ValueError`` on an unknown
    name.
    """
    if name == "round_robin":
        return RoundRobinBalancer()
    if name == "least_conn":
        return LeastConnBalancer()
    if name == "random_two":
        return RandomTwoBalancer(rng)
    if name == "source_hash":
        return SourceHashBalancer()
    raise ValueError(f"unknown balance {name!r}; expected one of {', '.join(sorted(BALANCERS))}")
