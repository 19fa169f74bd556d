"""Micro-benchmark of ``Balancer.pick``: nanoseconds per pick, per algorithm and pool size.

    python bench/balance_micro.py [--picks N]

Every node is eligible through a trivial Python filter (the daemon's is a little slower);
``source_hash`` cycles through distinct client IPs, and its table is built before timing
(the build time is printed separately).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l4gw.core.balance import BALANCERS, make_balancer
from l4gw.core.netaddr import SocketAddress
from l4gw.core.nodes import NodeState


def make_nodes(count: int) -> list[NodeState]:
    rng = random.Random(count)
    return [
        NodeState(
            SocketAddress(f"10.0.{i // 250}.{i % 250 + 1}", 80),
            weight=rng.randint(1, 10),
            active=rng.randint(0, 50),
        )
        for i in range(count)
    ]


def eligible(node: NodeState) -> bool:
    return node.healthy


def bench(name: str, count: int, picks: int) -> tuple[float, float]:
    nodes = make_nodes(count)
    balancer = make_balancer(name, rng=random.Random(1))
    keys = [bytes([10, 1, i // 256, i % 256]) for i in range(1024)]
    start = time.perf_counter_ns()
    balancer.pick(nodes, eligible, keys[0])  # builds source_hash's table
    build_ms = (time.perf_counter_ns() - start) / 1e6
    pick = balancer.pick
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for i in range(picks):
            pick(nodes, eligible, keys[i & 1023])
        best = min(best, (time.perf_counter_ns() - start) / picks)
    return best, build_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picks", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{'algorithm':<12} {'nodes':>5} {'ns/pick':>9}  first pick (ms)")
    for name in sorted(BALANCERS):
        for count in (3, 100):
            ns, build_ms = bench(name, count, args.picks)
            print(f"{name:<12} {count:>5} {ns:>9.0f}  {build_ms:.1f}")


if __name__ == "__main__":
    main()
