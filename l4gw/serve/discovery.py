"""DNS discovery: nodes of an upstream found in A, AAAA or SRV records, re-resolved over time.

``serve_discovery`` resolves ``upstream.config.discovery`` (through its ``resolver`` or the
system's ``/etc/resolv.conf`` servers, with dnspython on trio), hands the node set to
``UpstreamRuntime.set_discovered`` (which keeps the ``NodeState`` of nodes that stay, retires
nodes that left, and drops and counts addresses backend authorization does not permit), and
refreshes it when the records' TTL runs out, within ``[MIN_REFRESH, interval]``.

A failed lookup, an empty answer or an answer with no authorized address keeps the last good
node set: DNS trouble never empties an upstream. The turning of records into nodes
(``srv_nodes``, ``refresh_delay``) is pure and tested without DNS. Operator documentation:
``docs/health.md``.
"""

from __future__ import annotations

import ipaddress
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import attrs
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import structlog
import trio

from ..core.config import DiscoveryConfig
from ..core.health import nodes_changed
from ..core.netaddr import SocketAddress
from ..core.upstream import UpstreamRuntime

__all__ = [
    "Answer",
    "DiscoveryError",
    "DiscoveryStats",
    "discovery_stats",
    "refresh_delay",
    "resolve",
    "serve_discovery",
    "srv_nodes",
    "srv_weights",
]

log = structlog.get_logger("l4gw.discovery")

#: Shortest time between two lookups, whatever the TTL (dnsmasq and Consul answer with TTL 0).
MIN_REFRESH = 1.0
#: After a failed or empty lookup the next one comes after this (or ``interval`` if shorter).
FAILURE_RETRY = 5.0
#: Time limit of one lookup, all servers and retries included (dnspython's ``lifetime``).
LOOKUP_TIMEOUT = 5.0
#: How often a sleeping ``serve_discovery`` looks for a reload of its discovery section.
CONFIG_POLL = 1.0
#: Node weights are 0..1000; SRV weights (0..65535) are scaled into 1..MAX_WEIGHT.
MAX_WEIGHT = 1000

Node = tuple[SocketAddress, int]


class DiscoveryError(Exception):
    """A lookup failed (timeout, SERVFAIL, REFUSED, no resolver configuration, ...)."""


@attrs.frozen
class Answer:
    """The nodes a lookup found, sorted, and the smallest TTL of the records used."""

    nodes: tuple[Node, ...]
    ttl: float | None = None


@attrs.define(eq=False)
class DiscoveryStats:
    """Counters and last result of the discovery of one upstream (for metrics and /status).

    Unauthorized addresses are counted by ``UpstreamRuntime.unauthorized_dropped``.
    """

    #: Lookups that got an answer (including empty ones).
    lookups_total: int = 0
    #: Lookups that failed (timeout, SERVFAIL, REFUSED, ...): the last good set was kept.
    failures_total: int = 0
    #: Answers with no usable node (NXDOMAIN, no records, none authorized): set kept.
    empty_total: int = 0
    #: Times the discovered node set changed.
    changes_total: int = 0
    #: What went wrong last ("" once a lookup succeeds again).
    last_error: str = ""
    #: Wall clock (epoch seconds) of the last lookup that gave usable nodes.
    last_success: float = 0.0
    #: The last good node set (authorized nodes handed to the upstream).
    nodes: tuple[Node, ...] = ()
    #: The last answer handed to ``set_discovered`` (unauthorized addresses included).
    answer: tuple[Node, ...] = ()
    #: Seconds until the next lookup, as last chosen.
    next_refresh: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "lookups_total": self.lookups_total,
            "failures_total": self.failures_total,
            "empty_total": self.empty_total,
            "changes_total": self.changes_total,
            "last_error": self.last_error or None,
            "last_success": self.last_success or None,
            "nodes": len(self.nodes),
            "next_refresh": self.next_refresh,
        }


_STATS: weakref.WeakKeyDictionary[UpstreamRuntime, DiscoveryStats] = weakref.WeakKeyDictionary()


def discovery_stats(upstream: UpstreamRuntime) -> DiscoveryStats | None:
    """The discovery counters of ``upstream`` (None if discovery never ran for it). They are
    kept per ``UpstreamRuntime``, across restarts of ``serve_discovery``."""
    return _STATS.get(upstream)


# -- pure parts -------------------------------------------------------------------------


def refresh_delay(ttl: float | None, interval: float) -> float:
    """Seconds until the next lookup: the TTL clamped to ``[MIN_REFRESH, interval]``
    (``interval`` when the TTL is unknown, or when ``interval`` is below ``MIN_REFRESH``)."""
    if ttl is None:
        return interval
    return min(interval, max(float(ttl), MIN_REFRESH))


def srv_weights(weights: Sequence[int]) -> list[int]:
    """SRV weights (0..65535) as node weights (1..1000), ratios kept.

    The largest becomes ``MAX_WEIGHT`` and the others are scaled by the same factor, rounded,
    never below 1: SRV weight 0 means "a very small chance" (RFC 2782), not "drained". When
    every weight is 0, every node gets weight 1 (equal shares).
    """
    top = max(weights, default=0)
    if top <= 0:
        return [1] * len(weights)
    return [max(1, round(weight * MAX_WEIGHT / top)) for weight in weights]


def srv_nodes(
    records: Iterable[tuple[int, int, int, str]], addresses: Mapping[str, Sequence[str]]
) -> list[Node]:
    """Nodes from SRV records ``(priority, weight, port, target)``.

    Only the records with the lowest priority are used. Each target stands for its
    addresses (``addresses[target]``); a target without addresses, or ``"."`` ("no
    service"), contributes nothing. The SRV weight of a record goes to each address of its
    target, scaled by ``srv_weights``; an address+port listed more than once gets the sum
    (at most ``MAX_WEIGHT``). Sorted by address.
    """
    records = list(records)
    if not records:
        return []
    lowest = min(priority for priority, _, _, _ in records)
    group = [r for r in records if r[0] == lowest]
    weights = srv_weights([weight for _, weight, _, _ in group])
    found: dict[SocketAddress, int] = {}
    for (_, _, port, target), weight in zip(group, weights, strict=True):
        for ip in addresses.get(target, ()):
            address = SocketAddress(str(ipaddress.ip_address(ip)), port)
            found[address] = min(MAX_WEIGHT, found.get(address, 0) + weight)
    return sorted(found.items())


# -- lookups ----------------------------------------------------------------------------


def _resolver(config: DiscoveryConfig) -> dns.asyncresolver.Resolver:
    if config.resolver is None:
        # Re-read per lookup, so a changed /etc/resolv.conf is followed.
        resolver = dns.asyncresolver.Resolver(configure=True)
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(config.resolver.host, config.resolver.port)
        ]
    resolver.lifetime = LOOKUP_TIMEOUT
    resolver.timeout = min(2.0, LOOKUP_TIMEOUT)
    return resolver


async def _query(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> dns.resolver.Answer | None:
    """One query; None for NXDOMAIN. Raises ``DiscoveryError`` on failure."""
    try:
        return await resolver.resolve(
            name,
            rdtype,
            raise_on_no_answer=False,
            search=False,
            backend=dns.asyncbackend.get_backend("trio"),
        )
    except dns.resolver.NXDOMAIN:
        return None
    except dns.exception.DNSException as exc:
        raise DiscoveryError(f"{rdtype} {name}: {exc}") from exc
    except OSError as exc:
        raise DiscoveryError(f"{rdtype} {name}: {exc.strerror or exc}") from exc


def _records(answer: dns.resolver.Answer | None) -> tuple[list[object], float | None]:
    if answer is None or answer.rrset is None:
        return [], None
    return list(answer.rrset), float(answer.rrset.ttl)


def _ip(record: object) -> str:
    """The normalised IP text of an A or AAAA rdata."""
    return str(ipaddress.ip_address(record.address))  # type: ignore[attr-defined]


def _min_ttl(*ttls: float | None) -> float | None:
    known = [ttl for ttl in ttls if ttl is not None]
    return min(known) if known else None


async def resolve(config: DiscoveryConfig) -> Answer:
    """Look ``config.name`` up once. NXDOMAIN and "no records" give an empty ``Answer``;
    failures raise ``DiscoveryError``.

    The name is absolute (no search list). SRV targets are resolved to their A records, or
    to their AAAA records when they have no A record; addresses the server sent along in
    the additional section are used without asking again.
    """
    resolver = _resolver(config)
    if config.type in ("A", "AAAA"):
        if config.port is None:
            raise DiscoveryError(f'discovery type "{config.type}" needs a port')
        records, ttl = _records(await _query(resolver, config.name, config.type))
        found = {SocketAddress(_ip(record), config.port) for record in records}
        return Answer(tuple(sorted((address, config.weight) for address in found)), ttl)

    response = await _query(resolver, config.name, "SRV")
    records, ttl = _records(response)
    srv: list[tuple[int, int, int, str]] = [
        (r.priority, r.weight, r.port, r.target.to_text())  # type: ignore[attr-defined]
        for r in records
    ]
    targets = {target for _, _, _, target in srv if target != "."}
    addresses: dict[str, list[str]] = {}
    ttls: list[float | None] = [ttl]
    if response is not None:
        for rrset in response.response.additional:
            target = rrset.name.to_text()
            if target in targets and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses.setdefault(target, []).extend(_ip(record) for record in rrset)
                ttls.append(float(rrset.ttl))
    missing = sorted(targets - addresses.keys())
    errors: list[DiscoveryError] = []

    async def lookup_target(target: str) -> None:
        try:
            for rdtype in ("A", "AAAA"):
                found, target_ttl = _records(await _query(resolver, target, rdtype))
                if found:
                    addresses[target] = [_ip(record) for record in found]
                    ttls.append(target_ttl)
                    return
        except DiscoveryError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for target in missing:
            nursery.start_soon(lookup_target, target)
    nodes = srv_nodes(srv, addresses)
    if not nodes and errors:
        raise errors[0]
    for exc in errors:
        log.warning("discovery_target_failed", name=config.name, error=str(exc))
    return Answer(tuple(nodes), _min_ttl(*ttls))


# -- the driver -------------------------------------------------------------------------


def _current(upstream: UpstreamRuntime) -> tuple[Node, ...]:
    """The DNS-discovered nodes the upstream holds now (the last good set)."""
    return tuple(sorted((n.address, n.weight) for n in upstream.nodes if n.source == "dns"))


LookupFn = Callable[[DiscoveryConfig], Awaitable[Answer]]


async def refresh(
    upstream: UpstreamRuntime, config: DiscoveryConfig, stats: DiscoveryStats, lookup: LookupFn
) -> float:
    """One lookup applied to ``upstream``; returns the seconds until the next one."""
    retry = min(config.interval, FAILURE_RETRY)
    try:
        # dnspython's lifetime ends a lookup first; this also bounds an injected lookup.
        with trio.fail_after(LOOKUP_TIMEOUT * 2):
            answer = await lookup(config)
    except (DiscoveryError, trio.TooSlowError) as exc:
        stats.failures_total += 1
        stats.last_error = str(exc) or "lookup timed out"
        stats.next_refresh = retry
        log.warning(
            "discovery_failed",
            upstream=upstream.name,
            name=config.name,
            type=config.type,
            error=stats.last_error,
            kept=len(stats.nodes),
            retry_in=retry,
        )
        return retry
    stats.lookups_total += 1
    permitted = tuple(node for node in answer.nodes if upstream.authorization.permits(node[0]))
    if not permitted:
        stats.empty_total += 1
        stats.last_error = "no authorized address in the answer" if answer.nodes else "no records"
        stats.next_refresh = retry
        log.warning(
            "discovery_empty",
            upstream=upstream.name,
            name=config.name,
            type=config.type,
            reason=stats.last_error,
            kept=len(stats.nodes),
            retry_in=retry,
        )
        if answer.nodes and answer.nodes != stats.answer:
            # Hand the unauthorized addresses over with the last good set: set_discovered
            # logs and counts them (in one place for every caller) and keeps the good set.
            upstream.set_discovered([*answer.nodes, *_current(upstream)])
            stats.answer = answer.nodes
        return retry
    stats.last_success = time.time()
    stats.last_error = ""
    if answer.nodes != stats.answer:
        before = {address for address, _ in stats.nodes}
        after = {address for address, _ in permitted}
        upstream.set_discovered(answer.nodes)
        nodes_changed(upstream)
        if before != after or stats.nodes != permitted:
            stats.changes_total += 1
            log.info(
                "discovery_changed",
                upstream=upstream.name,
                name=config.name,
                added=[str(a) for a in sorted(after - before)],
                removed=[str(a) for a in sorted(before - after)],
                nodes=len(permitted),
            )
        stats.answer = answer.nodes
        stats.nodes = permitted
    stats.next_refresh = refresh_delay(answer.ttl, config.interval)
    return stats.next_refresh


async def serve_discovery(
    upstream: UpstreamRuntime,
    *,
    task_status: trio.TaskStatus[DiscoveryStats] = trio.TASK_STATUS_IGNORED,
    lookup: LookupFn | None = None,
) -> None:
    """Keep the DNS-discovered nodes of ``upstream`` current while
    ``upstream.config.discovery`` is set; returns once a reload removed it.

    ``task_status.started`` reports the ``DiscoveryStats`` after the first lookup has ended
    (within ``LOOKUP_TIMEOUT``, whatever its outcome), so nodes found at daemon start are in
    place before the listeners open. A reload that changes the discovery section is noticed
    within ``CONFIG_POLL`` and looked up at once; until the new lookup succeeds, the nodes
    found before stay. ``lookup`` replaces ``resolve`` (tests).
    """
    do_lookup = lookup if lookup is not None else resolve
    stats = _STATS.setdefault(upstream, DiscoveryStats())
    # Start from what the upstream holds now (it may have dropped its discovered nodes
    # while this task was not running).
    stats.nodes = _current(upstream)
    stats.answer = ()
    started = False
    while (config := upstream.config.discovery) is not None:
        delay = await refresh(upstream, config, stats, do_lookup)
        if not started:
            task_status.started(stats)
            started = True
        deadline = trio.current_time() + delay
        while upstream.config.discovery == config:
            now = trio.current_time()
            if now >= deadline:
                break
            await trio.sleep(min(CONFIG_POLL, deadline - now))
    if not started:
        task_status.started(stats)
