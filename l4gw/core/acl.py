"""Source-address allow/deny lists and the backend authorization list. No I/O.

``SourceACL`` decides, per accepted connection, whether the peer may use a listener.
``BackendAuthorization`` decides whether a node address+port may ever be reached (the
``[[authorize]]`` entries, deny by default once any entry exists).

Addresses are compared as integers. Each list is merged into sorted, disjoint, inclusive
integer ranges per address family, and the listener's decision ("allowed and not denied") is
precomputed into one such range list per family, so a lookup is one ``bisect`` whatever the
length of the lists: 10,000 CIDRs cost about what 10 do (see ``bench/acl_lookup.py``).

IPv4-mapped IPv6 addresses (``::ffff:1.2.3.4``, what a dual-stack socket reports for an IPv4
peer) are treated as the IPv4 address, so a decision never depends on whether the listener
socket is dual-stack. For the same reason a configured IPv6 network that lies entirely inside
``::ffff:0:0/96`` (e.g. ``::ffff:10.0.0.0/104``) stands for the IPv4 addresses it maps; a wider
IPv6 network that merely contains that block (``::/0``) matches IPv6 peers only.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Protocol

from .netaddr import IPNetwork, SocketAddress

__all__ = [
    "AuthorizeRuleLike",
    "BackendAuthorization",
    "SourceACL",
]

_V4_MAX = (1 << 32) - 1
_V6_MAX = (1 << 128) - 1
_MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96
_MAPPED_NETWORK = ipaddress.IPv6Network("::ffff:0:0/96")

#: Decisions cached per SourceACL, keyed by the peer's IP text. The cache is cleared when it
#: reaches this size, so a flood of distinct sources costs one ``socket.inet_pton`` parse and
#: one bisect per lookup (under a microsecond; ``ipaddress.ip_address`` alone is several) and
#: never more memory than this many entries.
_DECISION_CACHE_SIZE = 4096

Range = tuple[int, int]  # inclusive (first, last)

_inet_pton = socket.inet_pton
_from_bytes = int.from_bytes
_bisect_right = bisect.bisect_right
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


def parse_ip_int(text: str) -> tuple[int, int] | None:
    """``(version, integer)`` of an IP literal as ``accept()`` reports it, or None if invalid.

    IPv4-mapped IPv6 addresses come back as version 4. A ``%scope`` suffix is ignored.
    Strict: ``socket.inet_pton`` rejects the shorthand forms ``inet_aton`` allows ("127.1").
    """
    try:
        if ":" in text:
            if "%" in text:
                text = text.partition("%")[0]
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
            if value >> 32 == 0xFFFF:
                return (4, value & _V4_MAX)
            return (6, value)
        return (4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
    except (OSError, ValueError):  # OSError: malformed; ValueError: embedded NUL
        return None


def network_ranges(networks: Iterable[IPNetwork]) -> tuple[list[Range], list[Range]]:
    """The networks as sorted, disjoint, non-adjacent inclusive ranges: ``(ipv4, ipv6)``.

    IPv6 networks inside ``::ffff:0:0/96`` are translated to the IPv4 range they map.
    """
    v4: list[Range] = []
    v6: list[Range] = []
    for net in networks:
        first, last = int(net.network_address), int(net.broadcast_address)
        if net.version == 4:
            v4.append((first, last))
        elif isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED_NETWORK):
            v4.append((first - _MAPPED_PREFIX, last - _MAPPED_PREFIX))
        else:
            v6.append((first, last))
    return _merge(v4), _merge(v6)


def _merge(ranges: list[Range]) -> list[Range]:
    """Sort and coalesce overlapping or adjacent ranges (``collapse_addresses`` on integers)."""
    merged: list[Range] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def _subtract(ranges: list[Range], holes: list[Range]) -> list[Range]:
    """``ranges`` minus ``holes``; both sorted and disjoint, so is the result."""
    out: list[Range] = []
    j = 0
    for first, last in ranges:
        start = first
        # Skip holes entirely before this range.
        while j < len(holes) and holes[j][1] < start:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] <= last:
            hole_first, hole_last = holes[k]
            if hole_first > start:
                out.append((start, hole_first - 1))
            start = max(start, hole_last + 1)
            if hole_last >= last:
                break
            k += 1
        if start <= last:
            out.append((start, last))
    return out


class SourceACL:
    """A listener's ``allow``/``deny`` source lists.

    ``deny`` is checked first; an empty ``allow`` means any source. Once ``allow`` has any
    entry, sources of the other family are refused too (``allow = ["10.0.0.0/8"]`` refuses
    every IPv6 peer).

    Both lists are folded at construction into one set of allowed ranges per family, so
    ``allows`` is a dict lookup (recent sources are cached) or one parse and one bisect. With
    both lists empty, ``is_open`` is true and ``allows`` returns True without parsing.

    Instances are immutable; a reload builds a new one.
    """

    __slots__ = (
        "_cache",
        "_v4_firsts",
        "_v4_lasts",
        "_v6_firsts",
        "_v6_lasts",
        "allow",
        "deny",
        "is_open",
    )

    def __init__(self, allow: Sequence[IPNetwork] = (), deny: Sequence[IPNetwork] = ()) -> None:
        self.allow: tuple[IPNetwork, ...] = tuple(allow)
        self.deny: tuple[IPNetwork, ...] = tuple(deny)
        #: No lists at all: every source is allowed and ``allows`` does no work.
        self.is_open: bool = not self.allow and not self.deny
        allow4, allow6 = network_ranges(self.allow)
        deny4, deny6 = network_ranges(self.deny)
        if not self.allow:
            allow4, allow6 = [(0, _V4_MAX)], [(0, _V6_MAX)]
        # The allowed addresses, as sorted disjoint ranges split into two parallel lists
        # (first addresses for ``bisect``, last addresses to confirm the hit).
        v4, v6 = _subtract(allow4, deny4), _subtract(allow6, deny6)
        self._v4_firsts = [first for first, _ in v4]
        self._v4_lasts = [last for _, last in v4]
        self._v6_firsts = [first for first, _ in v6]
        self._v6_lasts = [last for _, last in v6]
        self._cache: dict[str, bool] = {}

    def allows(self, ip: str) -> bool:
        """Whether a peer with this IP text (from ``accept()``) may connect.

        Text that is not an IP literal is refused (fail closed) unless the ACL is open.
        """
        if self.is_open:
            return True
        cache = self._cache
        decision = cache.get(ip)
        if decision is None:
            decision = self._decide(ip)
            if len(cache) >= _DECISION_CACHE_SIZE:
                cache.clear()
            cache[ip] = decision
        return decision

    def _decide(self, ip: str) -> bool:
        # parse_ip_int and a bisect, inlined: this is the per-connection cost under a flood
        # of new sources, and the helper calls would double it.
        try:
            if ":" in ip:
                if "%" in ip:
                    ip = ip.partition("%")[0]
                value = _from_bytes(_inet_pton(_AF_INET6, ip), "big")
                if value >> 32 == 0xFFFF:
                    value &= _V4_MAX
                    firsts, lasts = self._v4_firsts, self._v4_lasts
                else:
                    firsts, lasts = self._v6_firsts, self._v6_lasts
            else:
                value = _from_bytes(_inet_pton(_AF_INET, ip), "big")
                firsts, lasts = self._v4_firsts, self._v4_lasts
        except (OSError, ValueError):
            return False
        i = _bisect_right(firsts, value) - 1
        return i >= 0 and value <= lasts[i]

    def __repr__(self) -> str:
        allow = ", ".join(map(str, self.allow))
        deny = ", ".join(map(str, self.deny))
        return f"SourceACL(allow=[{allow}], deny=[{deny}])"


class AuthorizeRuleLike(Protocol):
    """What ``BackendAuthorization`` needs of a rule (e.g. ``config.AuthorizeRule``)."""

    @property
    def name(self) -> str: ...

    @property
    def network(self) -> IPNetwork: ...

    @property
    def ports(self) -> Sequence[tuple[int, int]]: ...


class BackendAuthorization:
    """The ``[[authorize]]`` list: which node address+port pairs may be reached at all.

    With no rules, ``enabled`` is False and everything is permitted. Once any rule exists,
    an address is permitted only if some rule's network contains its IP and one of that
    rule's inclusive port ranges contains its port (deny by default). A rule with no port
    ranges permits no port. IPv4-mapped node addresses are matched as IPv4.
    """

    __slots__ = ("_entries", "enabled", "rules")

    def __init__(self, rules: Iterable[AuthorizeRuleLike] = ()) -> None:
        self.rules: tuple[AuthorizeRuleLike, ...] = tuple(rules)
        self.enabled: bool = bool(self.rules)
        # (version, first, last, port ranges) per rule; the list is short (a handful of
        # entries) and consulted per connect attempt or DNS answer, so a scan is enough.
        self._entries: list[tuple[int, int, int, tuple[tuple[int, int], ...]]] = []
        for rule in self.rules:
            v4, v6 = network_ranges([rule.network])
            version, ((first, last),) = (4, v4) if v4 else (6, v6)
            self._entries.append((version, first, last, tuple(rule.ports)))

    def permits(self, address: SocketAddress) -> bool:
        """Whether a connection to this node address may be made."""
        if not self.enabled:
            return True
        parsed = parse_ip_int(address.host)
        if parsed is None:
            return False
        version, value = parsed
        port = address.port
        for rule_version, first, last, ports in self._entries:
            if rule_version == version and first <= value <= last:
                for low, high in ports:
                    if low <= port <= high:
                        return True
        return False

    def explain(self) -> str:
        """The authorized entries on one line, for error messages and log fields, e.g.
        ``"private-web: 10.0.1.0/24 ports 80, 8000-8099; db: fd00::5/128 ports 5432"``."""
        if not self.enabled:
            return "no [[authorize]] entries: every node address is permitted"
        entries = []
        for rule in self.rules:
            ports = ", ".join(
                str(low) if low == high else f"{low}-{high}" for low, high in rule.ports
            )
            entries.append(f"{rule.name}: {rule.network} ports {ports or '(none)'}")
        return "; ".join(entries)

    def __repr__(self) -> str:
        return f"BackendAuthorization({len(self.rules)} rules)"
