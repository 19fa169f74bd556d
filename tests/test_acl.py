from __future__ import annotations

import ipaddress
import itertools
import random
import time

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from l4gw.core.acl import (
    BackendAuthorization,
    SourceACL,
    network_ranges,
    parse_ip_int,
)
from l4gw.core.netaddr import IPAddress, IPNetwork, SocketAddress, parse_network

MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def nets(*texts: str) -> list[IPNetwork]:
    return [parse_network(t) for t in texts]


# --- a naive reference: the documented semantics, written with ipaddress -----------------


def _unmap_address(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _unmap_network(net: IPNetwork) -> IPNetwork:
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(MAPPED):
        first = int(net.network_address) - int(MAPPED.network_address)
        return ipaddress.IPv4Network((first, net.prefixlen - 96))
    return net


def naive_allows(allow: list[IPNetwork], deny: list[IPNetwork], text: str) -> bool:
    ip = _unmap_address(ipaddress.ip_address(text.partition("%")[0]))
    if any(ip in _unmap_network(n) for n in deny if _unmap_network(n).version == ip.version):
        return False
    if not allow:
        return True
    return any(ip in _unmap_network(n) for n in allow if _unmap_network(n).version == ip.version)


# --- strategies ---------------------------------------------------------------------------


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    kind = draw(st.sampled_from(["v4", "v6", "mapped"]))
    if kind == "v4":
        prefix = draw(st.integers(0, 32))
        value = draw(st.integers(0, 2**32 - 1))
        return ipaddress.IPv4Network((value, prefix), strict=False)
    if kind == "mapped":
        prefix = draw(st.integers(96, 128))
        value = int(MAPPED.network_address) | draw(st.integers(0, 2**32 - 1))
        return ipaddress.IPv6Network((value, prefix), strict=False)
    prefix = draw(st.integers(0, 128))
    value = draw(st.integers(0, 2**128 - 1))
    return ipaddress.IPv6Network((value, prefix), strict=False)


@st.composite
def address_texts(draw: st.DrawFn, pool: list[IPNetwork]) -> str:
    """Addresses, often on or next to the edges of the networks in play."""
    near_an_edge = draw(st.booleans())
    if pool and near_an_edge:
        net = draw(st.sampled_from(pool))
        edge = draw(st.sampled_from([net.network_address, net.broadcast_address]))
        offset = draw(st.integers(-1, 1))
        top = 2**32 - 1 if net.version == 4 else 2**128 - 1
        value = min(max(int(edge) + offset, 0), top)
        ip: IPAddress = (
            ipaddress.IPv4Address(value) if net.version == 4 else ipaddress.IPv6Address(value)
        )
    else:
        kind = draw(st.sampled_from(["v4", "v6"]))
        if kind == "v4":
            ip = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
        else:
            ip = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
    form = draw(st.sampled_from(["plain", "mapped", "mapped-dotted"]))
    if isinstance(ip, ipaddress.IPv4Address) and form == "mapped":
        return str(ipaddress.IPv6Address(int(MAPPED.network_address) | int(ip)))
    if isinstance(ip, ipaddress.IPv4Address) and form == "mapped-dotted":
        return f"::ffff:{ip}"
    return str(ip)


@settings(max_examples=300)
@given(data=st.data())
def test_allows_matches_naive_reference(data: st.DataObject) -> None:
    allow = data.draw(st.lists(networks(), max_size=6))
    deny = data.draw(st.lists(networks(), max_size=6))
    acl = SourceACL(allow, deny)
    for text in data.draw(st.lists(address_texts(allow + deny), min_size=1, max_size=10)):
        assert acl.allows(text) == naive_allows(allow, deny, text), (text, allow, deny)
        assert acl.allows(text) == naive_allows(allow, deny, text)  # cached answer too


@given(st.lists(networks(), max_size=20))
def test_network_ranges_are_sorted_disjoint_and_cover_the_same_addresses(
    pool: list[IPNetwork],
) -> None:
    v4, v6 = network_ranges(pool)
    for ranges in (v4, v6):
        for (a_first, a_last), (b_first, _) in itertools.pairwise(ranges):
            assert a_first <= a_last < b_first - 1
    unmapped = [_unmap_network(n) for n in pool]
    expected4 = list(ipaddress.collapse_addresses(n for n in unmapped if n.version == 4))
    expected6 = list(ipaddress.collapse_addresses(n for n in unmapped if n.version == 6))
    covered4 = sum(last - first + 1 for first, last in v4)
    covered6 = sum(last - first + 1 for first, last in v6)
    assert covered4 == sum(n.num_addresses for n in expected4)
    assert covered6 == sum(n.num_addresses for n in expected6)


def test_open_acl_allows_everything_without_parsing() -> None:
    acl = SourceACL([], [])
    assert acl.is_open
    assert acl.allows("10.0.0.1")
    assert acl.allows("not an address")
    assert not SourceACL(nets("10.0.0.0/8"), []).is_open
    assert not SourceACL([], nets("10.0.0.0/8")).is_open


def test_deny_before_allow() -> None:
    acl = SourceACL(nets("10.0.0.0/8"), nets("10.0.9.0/24"))
    assert acl.allows("10.0.8.255")
    assert not acl.allows("10.0.9.0")
    assert not acl.allows("10.0.9.255")
    assert acl.allows("10.0.10.0")
    assert not acl.allows("11.0.0.0")
    assert not acl.allows("9.255.255.255")


def test_allow_of_one_family_refuses_the_other() -> None:
    acl = SourceACL(nets("10.0.0.0/8"), [])
    assert not acl.allows("2001:db8::1")
    acl6 = SourceACL(nets("2001:db8::/32"), [])
    assert acl6.allows("2001:db8::1")
    assert not acl6.allows("10.0.0.1")


def test_empty_allow_with_deny_allows_everything_else() -> None:
    acl = SourceACL([], nets("192.0.2.0/24", "2001:db8::/32"))
    assert acl.allows("192.0.3.1")
    assert acl.allows("::1")
    assert not acl.allows("192.0.2.7")
    assert not acl.allows("2001:db8::7")


def test_ipv4_mapped_sources_are_ipv4() -> None:
    acl = SourceACL(nets("10.0.0.0/8"), nets("10.9.0.0/16"))
    assert acl.allows("::ffff:10.1.2.3")
    assert acl.allows("::ffff:a01:203")  # the same, as Python < 3.13 prints it
    assert acl.allows("::FFFF:10.1.2.3")
    assert not acl.allows("::ffff:10.9.0.1")
    assert not acl.allows("::ffff:11.0.0.1")
    # A configured network inside ::ffff:0:0/96 stands for the IPv4 addresses.
    mapped = SourceACL(nets("::ffff:10.0.0.0/104"), [])
    assert mapped.allows("10.200.0.1")
    assert mapped.allows("::ffff:10.200.0.1")
    assert not mapped.allows("11.0.0.1")
    # ::/0 contains the mapped block but means IPv6 peers only.
    no_v6 = SourceACL([], nets("::/0"))
    assert no_v6.allows("10.0.0.1")
    assert no_v6.allows("::ffff:10.0.0.1")
    assert not no_v6.allows("::1")


def test_scope_ids_and_invalid_text() -> None:
    acl = SourceACL(nets("fe80::/10"), [])
    assert acl.allows("fe80::1%eth0")
    for bad in ["", "localhost", "127.1", "1.2.3.4.5", "::g", "1.2.3.256", "\x00"]:
        assert parse_ip_int(bad) is None, bad
        assert not acl.allows(bad)
        assert not SourceACL([], nets("10.0.0.0/8")).allows(bad)  # fail closed


def test_decision_cache_stays_bounded() -> None:
    acl = SourceACL(nets("10.0.0.0/8"), [])
    for i in range(20_000):
        assert acl.allows(str(ipaddress.IPv4Address(0x0A000000 + i)))
        assert len(acl._cache) <= 4096


def _random_networks(rng: random.Random, count: int) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for _ in range(count):
        if rng.random() < 0.7:
            out.append(ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(16, 32)), False))
        else:
            out.append(ipaddress.IPv6Network((rng.getrandbits(128), rng.randint(32, 128)), False))
    return out


def test_ten_thousand_entries_agree_with_reference() -> None:
    rng = random.Random(4)
    allow = _random_networks(rng, 10_000)
    deny = _random_networks(rng, 10_000)
    acl = SourceACL(allow, deny)
    deny4 = [n for n in deny if n.version == 4]
    allow4 = [n for n in allow if n.version == 4]
    probes = [str(rng.choice(allow4).network_address) for _ in range(200)]
    probes += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(200)]
    for text in probes:
        ip = ipaddress.IPv4Address(text)
        expected = not any(ip in n for n in deny4) and any(ip in n for n in allow4)
        assert acl.allows(text) == expected


def _time_lookups(acl: SourceACL, probes: list[str]) -> float:
    best = float("inf")
    for _ in range(5):
        acl._cache.clear()
        start = time.perf_counter()
        for text in probes:
            acl._decide(text)
        best = min(best, time.perf_counter() - start)
    return best


def test_lookup_cost_does_not_grow_with_list_length() -> None:
    rng = random.Random(5)
    probes = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(20_000)]
    small = _time_lookups(SourceACL(_random_networks(rng, 10), []), probes)
    large = _time_lookups(SourceACL(_random_networks(rng, 10_000), []), probes)
    # A linear scan would be ~1000x slower; bisect adds about a dozen comparisons.
    assert large < small * 4


# --- backend authorization ------------------------------------------------------------------


@attrs.frozen
class Rule:
    name: str
    network: IPNetwork
    ports: tuple[tuple[int, int], ...]


def test_authorization_disabled_permits_everything() -> None:
    auth = BackendAuthorization([])
    assert not auth.enabled
    assert auth.permits(SocketAddress("192.0.2.1", 1))
    assert "every node address is permitted" in auth.explain()


def test_authorization_port_ranges_and_deny_by_default() -> None:
    auth = BackendAuthorization(
        [
            Rule("private-web", parse_network("10.0.1.0/24"), ((80, 80), (8000, 8099))),
            Rule("db", parse_network("fd00::5"), ((5432, 5432),)),
            Rule("nothing", parse_network("10.9.0.0/16"), ()),
        ]
    )
    assert auth.enabled
    assert auth.permits(SocketAddress("10.0.1.10", 80))
    assert auth.permits(SocketAddress("10.0.1.255", 8000))
    assert auth.permits(SocketAddress("10.0.1.0", 8099))
    assert not auth.permits(SocketAddress("10.0.1.10", 81))
    assert not auth.permits(SocketAddress("10.0.1.10", 8100))
    assert not auth.permits(SocketAddress("10.0.1.10", 7999))
    assert not auth.permits(SocketAddress("10.0.2.10", 80))
    assert auth.permits(SocketAddress("fd00::5", 5432))
    assert not auth.permits(SocketAddress("fd00::6", 5432))
    assert not auth.permits(SocketAddress("10.9.0.1", 80))  # a rule without ports
    assert auth.permits(SocketAddress("::ffff:10.0.1.10", 80))  # mapped = IPv4
    text = auth.explain()
    assert "private-web: 10.0.1.0/24 ports 80, 8000-8099" in text
    assert "db: fd00::5/128 ports 5432" in text
    assert "nothing: 10.9.0.0/16 ports (none)" in text


@given(
    st.lists(
        st.tuples(networks(), st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 200)))),
        min_size=1,
        max_size=5,
    ),
    st.data(),
)
def test_authorization_matches_naive_reference(
    spec: list[tuple[IPNetwork, list[tuple[int, int]]]], data: st.DataObject
) -> None:
    rules = [
        Rule(f"r{i}", net, tuple((low, min(low + width, 65535)) for low, width in ports))
        for i, (net, ports) in enumerate(spec)
    ]
    auth = BackendAuthorization(rules)
    for text in data.draw(st.lists(address_texts([r.network for r in rules]), max_size=5)):
        port = data.draw(st.integers(0, 65535))
        ip = _unmap_address(ipaddress.ip_address(text))
        expected = any(
            ip.version == _unmap_network(r.network).version
            and ip in _unmap_network(r.network)
            and any(low <= port <= high for low, high in r.ports)
            for r in rules
        )
        assert auth.permits(SocketAddress(text, port)) == expected
