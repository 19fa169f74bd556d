"""How long ``SourceACL.allows`` takes for 10, 1,000 and 10,000 random CIDR entries.

Run: ``python bench/acl_lookup.py``. Prints nanoseconds per lookup for
- ``distinct``: every lookup a new source address (the decision cache never helps: a flood),
- ``repeat``: 1,000 sources looked up over and over (cache hits, the usual case),
- ``linear``: a naive scan of the ``ipaddress`` networks, for comparison,
plus the cost of building the ACL and of the two ways to parse an address.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable

from l4gw.core.acl import SourceACL
from l4gw.core.netaddr import IPNetwork

SIZES = (10, 1_000, 10_000)
PROBES = 200_000


def random_networks(rng: random.Random, count: int) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for _ in range(count):
        if rng.random() < 0.7:
            out.append(ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(8, 32)), False))
        else:
            out.append(ipaddress.IPv6Network((rng.getrandbits(128), rng.randint(24, 128)), False))
    return out


def random_sources(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.6:
            out.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        elif roll < 0.8:
            out.append("::ffff:" + str(ipaddress.IPv4Address(rng.getrandbits(32))))
        else:
            out.append(str(ipaddress.IPv6Address(rng.getrandbits(128))))
    return out


def ns_per_call(func: Callable[[str], object], probes: list[str], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for text in probes:
            func(text)
        best = min(best, time.perf_counter_ns() - start)
    return best / len(probes)


def linear(allow: list[IPNetwork], deny: list[IPNetwork]) -> Callable[[str], bool]:
    def allows(text: str) -> bool:
        ip = ipaddress.ip_address(text)
        if any(ip in n for n in deny):
            return False
        return not allow or any(ip in n for n in allow)

    return allows


def main() -> None:
    rng = random.Random(2024)
    distinct = random_sources(rng, PROBES)
    hot = random_sources(rng, 1_000) * (PROBES // 1_000)
    print(
        f"{'entries':>8} {'build ms':>9} {'distinct':>9} {'repeat':>7} {'linear':>9}  (ns/lookup)"
    )
    for size in SIZES:
        allow = random_networks(rng, size)
        deny = random_networks(rng, size // 10 or 1)
        start = time.perf_counter()
        acl = SourceACL(allow, deny)
        build_ms = (time.perf_counter() - start) * 1e3
        cold = ns_per_call(acl.allows, distinct)
        warm = ns_per_call(acl.allows, hot)
        scan = ns_per_call(linear(allow, deny), distinct[: max(200, 20_000 // size)], repeat=1)
        print(f"{size:>8} {build_ms:>9.1f} {cold:>9.0f} {warm:>7.0f} {scan:>9.0f}")
    open_acl = SourceACL([], [])
    print(f"{'open':>8} {'':>9} {ns_per_call(open_acl.allows, distinct):>9.0f}")

    def by_inet_pton(text: str) -> int:
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        return int.from_bytes(socket.inet_pton(family, text), "big")

    def by_ipaddress(text: str) -> int:
        return int(ipaddress.ip_address(text))

    print(f"parse: inet_pton {ns_per_call(by_inet_pton, distinct):.0f} ns, ", end="")
    print(f"ipaddress {ns_per_call(by_ipaddress, distinct):.0f} ns")


if __name__ == "__main__":
    main()
