"""Health checking: the state machine under a virtual clock, then probes against real servers.

State machine tests run ``serve_health`` (or a bare ``HealthMonitor``) under
``MockClock(autojump_threshold=0)`` with a scripted check function, and assert states at exact
virtual times. ``FixedRandom(0.5)`` puts the first probe at ``interval / 2`` and every later one
exactly ``interval`` after the previous.
"""

from __future__ import annotations

import functools
import itertools
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
from structlog.testing import capture_logs

from l4gw.core import proxyproto
from l4gw.core.acl import BackendAuthorization
from l4gw.core.config import AuthorizeRule, HealthConfig, NodeConfig, UpstreamConfig
from l4gw.core.health import (
    CheckResult,
    HealthMonitor,
    health_state,
    max_ejectable,
    node_status,
    nodes_changed,
)
from l4gw.core.netaddr import SocketAddress, parse_network
from l4gw.core.nodes import NodeState
from l4gw.core.upstream import UpstreamRuntime
from l4gw.serve.healthchecks import run_check, serve_health

from .conftest import free_port

#: Bound of every async test: real seconds for the loopback tests; under the autojump
#: clock ``fail_after`` counts virtual time, hence the larger ``VIRTUAL_TIMEOUT``.
TIMEOUT = 10
VIRTUAL_TIMEOUT = 3600


async def wait_until(predicate: Callable[[], bool], step: float = 0.02) -> None:
    """Poll ``predicate`` (for state changed by background tasks)."""
    while True:
        if predicate():
            return
        await trio.sleep(step)


class FixedRandom(random.Random):
    """``random()`` always returns ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def addr(i: int, port: int = 80) -> SocketAddress:
    return SocketAddress(f"10.0.0.{i}", port)


def make_upstream(
    count: int = 2,
    *,
    authorization: BackendAuthorization | None = None,
    **health: Any,
) -> UpstreamRuntime:
    config = UpstreamConfig(
        name="web",
        nodes=tuple(NodeConfig(addr(i + 1)) for i in range(count)),
        health=HealthConfig(**health),
    )
    return UpstreamRuntime(config, authorization or BackendAuthorization())


def with_health(upstream: UpstreamRuntime, **changes: Any) -> None:
    """Reload ``upstream`` with its health section changed (as the daemon does)."""
    config = upstream.config
    health = attrs.evolve(config.health, **changes)
    upstream.apply(attrs.evolve(config, health=health), upstream.authorization)


class Script:
    """A check function answering from per-address scripts (the last answer repeats)."""

    def __init__(self) -> None:
        self.answers: dict[SocketAddress, list[bool]] = {}
        self.calls: list[tuple[float, SocketAddress]] = []

    def set(self, address: SocketAddress, *answers: bool) -> None:
        self.answers[address] = list(answers)

    async def __call__(
        self, address: SocketAddress, upstream: UpstreamConfig, auth: BackendAuthorization
    ) -> CheckResult:
        self.calls.append((trio.current_time(), address))
        answers = self.answers.get(address, [True])
        ok = answers.pop(0) if len(answers) > 1 else answers[0]
        await trio.lowlevel.checkpoint()
        return CheckResult(ok, "status 200" if ok else "status 500")

    def times(self, address: SocketAddress) -> list[float]:
        return [t for t, a in self.calls if a == address]


async def start_health(
    nursery: trio.Nursery, upstream: UpstreamRuntime, check: Script | None = None, rng: float = 0.5
) -> HealthMonitor:
    monitor: HealthMonitor = await nursery.start(
        lambda task_status: serve_health(
            upstream, task_status=task_status, check=check, rng=FixedRandom(rng)
        )
    )
    return monitor


def at(t0: float, offset: float) -> Awaitable[None]:
    return trio.sleep_until(t0 + offset)


# --------------------------------------------------------------------------------------
# Active checks: rise and fall


async def test_rise_and_fall_after_exact_counts(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(
            1, check="http", interval=5.0, unhealthy_threshold=3, healthy_threshold=2
        )
        node = upstream.nodes[0]
        script = Script()
        # t=2.5 pass, 7.5 12.5 17.5 fail, 22.5 27.5 pass
        script.set(node.address, True, False, False, False, True, True)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream, script)
            assert node.healthy and node.health_reason == "up until the first check"
            await at(t0, 17.4)
            assert node.healthy and node.check_failures == 2
            await at(t0, 17.6)
            assert not node.healthy and health_state(node) == "down"
            assert node.health_reason == "3 consecutive checks failed: status 500"
            await at(t0, 27.4)
            assert not node.healthy and node.check_passes == 1
            await at(t0, 27.6)
            assert node.healthy and node.health_reason == "2 consecutive checks passed: status 200"
            nursery.cancel_scope.cancel()
        assert [t - t0 for t in script.times(node.address)][:6] == [
            2.5,
            7.5,
            12.5,
            17.5,
            22.5,
            27.5,
        ]
        assert upstream.observers == []


async def test_static_node_starts_up_and_first_failure_takes_it_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """HAProxy's default init-state: up, but the first failed check brings it down."""
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(1, check="tcp", interval=4.0, unhealthy_threshold=3)
        node = upstream.nodes[0]
        script = Script()
        script.set(node.address, False)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream, script)
            assert node.healthy
            await at(t0, 1.9)
            assert node.healthy
            await at(t0, 2.1)
            assert not node.healthy
            assert node.health_reason == "first check failed: status 500"
            assert node.last_check == "status 500" and node.last_check_at > 0
            nursery.cancel_scope.cancel()


async def test_dns_node_waits_for_its_first_check(autojump_clock: trio.testing.MockClock) -> None:
    """A node found by DNS while checks are configured takes no traffic until one check
    passes; one that fails its first check then needs healthy_threshold passes."""
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(1, check="http", interval=10.0, healthy_threshold=3)
        script = Script()
        good, bad = addr(50), addr(51)
        script.set(bad, False, True, True, True)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream, script)
            upstream.set_discovered([(good, 1), (bad, 1)])
            nodes_changed(upstream)  # what serve_discovery does, in the same trio step
            new = {n.address: n for n in upstream.nodes if n.source == "dns"}
            assert not new[good].healthy and not new[bad].healthy
            assert new[good].health_reason == "pending first check"
            # Pending nodes are probed within min(interval, 1s): FixedRandom(0.5) -> 0.5 s.
            await at(t0, 0.6)
            assert new[good].healthy
            assert new[good].health_reason == "first check passed: status 200"
            assert not new[bad].healthy
            await at(t0, 20.6)  # two more passes (10.5, 20.5): 2 < 3
            assert not new[bad].healthy
            await at(t0, 30.6)
            assert new[bad].healthy
            nursery.cancel_scope.cancel()


async def test_node_set_changes_are_picked_up_without_a_poke(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(1, check="tcp", interval=10.0)
        script = Script()
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream, script)
            upstream.set_discovered([(addr(9), 1)])  # no nodes_changed(): found by polling
            await at(t0, 1.01)
            new = upstream.nodes[1]
            assert new.health_reason == "pending first check"
            await at(t0, 1.6)
            assert new.healthy
            # Removed nodes are forgotten: no more probes.
            upstream.set_discovered([])
            await at(t0, 2.1)
            count = len(script.times(addr(9)))
            await at(t0, 60)
            assert len(script.times(addr(9))) == count
            nursery.cancel_scope.cancel()


async def test_reload_turning_checks_off_brings_nodes_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(2, check="tcp", interval=2.0)
        script = Script()
        script.set(addr(1), False)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream, script)
            await at(t0, 1.1)
            first = upstream.nodes[0]
            assert not first.healthy
            with_health(upstream, check="none")
            await at(t0, 2.2)
            assert first.healthy and first.health_reason == "active checks turned off"
            calls = len(script.calls)
            await at(t0, 30)
            assert len(script.calls) == calls
            # ... and on again: the next check decides at once (no history).
            with_health(upstream, check="http")
            await at(t0, 32.5)
            assert not first.healthy
            assert first.health_reason == "first check failed: status 500"
            nursery.cancel_scope.cancel()


async def test_jitter_spreads_200_nodes(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        config = UpstreamConfig(
            name="big",
            nodes=tuple(
                NodeConfig(SocketAddress(f"10.1.{i // 200}.{i % 200 + 1}", 80)) for i in range(200)
            ),
            health=HealthConfig(check="tcp", interval=5.0),
        )
        upstream = UpstreamRuntime(config, BackendAuthorization())
        script = Script()
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_health(
                    upstream, task_status=task_status, check=script, rng=random.Random(7)
                )
            )
            await at(t0, 40)
            nursery.cancel_scope.cancel()
        firsts = sorted(script.times(n.address)[0] - t0 for n in upstream.nodes)
        assert firsts[0] >= 0 and firsts[-1] < 5.0
        assert firsts[-1] - firsts[0] > 4.5
        # No more than 10 % of the nodes start within any 0.25 s.
        assert max(sum(1 for f in firsts if s <= f < s + 0.25) for s in firsts) <= 20
        for n in upstream.nodes:
            times = script.times(n.address)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert len(gaps) >= 6
            assert all(4.5 - 1e-9 <= g <= 5.5 + 1e-9 for g in gaps), gaps


def test_monitor_first_probe_bounds() -> None:
    """Bounds of the first probe time without trio: [now, now + interval) for nodes that
    start up, [now, now + min(interval, 1s)) for pending DNS nodes."""
    now = 100.0
    for value in (0.0, 0.999999):
        monitor = HealthMonitor(
            "web",
            HealthConfig(check="tcp", interval=5.0),
            clock=lambda: now,
            rng=FixedRandom(value),
        )
        static = NodeState(addr(1), 1)
        dns = NodeState(addr(2), 1, source="dns")
        monitor.track([static, dns])
        assert monitor.next_deadline() == pytest.approx(now + min(value * 5.0, value * 1.0))
        assert monitor.due() == ([static, dns] if value == 0.0 else [])


# --------------------------------------------------------------------------------------
# Passive ejection


async def test_ejection_times_grow_and_are_capped(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(2, passive_failures=3, ejection_time=30.0, max_ejection_time=100.0)
        node = upstream.nodes[0]
        durations: list[float] = []
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream)
            for _ in range(5):
                upstream.connect_failed(node)
                upstream.connect_failed(node)
                assert node.healthy
                upstream.connect_failed(node)
                assert not node.healthy and health_state(node) == "ejected"
                until = node.ejected_until
                assert until is not None
                durations.append(until - trio.current_time())
                await trio.sleep_until(until - 0.001)
                assert not node.healthy
                await trio.sleep_until(until + 0.001)
                assert node.healthy
            nursery.cancel_scope.cancel()
        assert durations == pytest.approx([30.0, 60.0, 90.0, 100.0, 100.0])


async def test_ejection_ends_exactly_on_time(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(2, passive_failures=2, ejection_time=7.0)
        node = upstream.nodes[1]
        t0 = trio.current_time()
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await start_health(nursery, upstream)
                upstream.connect_failed(node)
                upstream.connect_failed(node)
                assert not node.healthy
                assert node.health_reason == "2 consecutive connect failures: ejected for 7s"
                await at(t0, 6.999)
                assert not node.healthy
                await at(t0, 7.001)
                assert node.healthy and node.health_reason == "ejection over after 7s"
                nursery.cancel_scope.cancel()
        events = [e for e in logs if e["event"] == "node_health"]
        assert [(e["healthy"], e["state"]) for e in events] == [(False, "ejected"), (True, "up")]
        assert all(e["upstream"] == "web" and e["node"] == "10.0.0.2:80" for e in events)
        assert events[0]["reason"] == "2 consecutive connect failures: ejected for 7s"


def test_ejection_multiplier_decays_while_back_in_service() -> None:
    now = [0.0]
    monitor = HealthMonitor(
        "web", HealthConfig(ejection_time=10.0, max_ejection_time=300.0), clock=lambda: now[0]
    )
    node = NodeState(addr(1), 1)
    node.ejections, node.rejoined_at = 4, 100.0
    now[0] = 105.0  # back for half an ejection_time: no decay
    assert monitor.ejection_multiplier(node, now[0]) == 5
    now[0] = 125.0  # two full ejection_times: 4 - 2 + 1
    assert monitor.ejection_multiplier(node, now[0]) == 3
    now[0] = 1000.0  # long healthy: starts over
    assert monitor.ejection_multiplier(node, now[0]) == 1
    node.ejections, node.rejoined_at = 40, 1000.0  # capped at ceil(300 / 10)
    assert monitor.ejection_multiplier(node, 1000.0) == 30


async def test_success_resets_the_failure_count(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(2, passive_failures=3)
        node = upstream.nodes[0]
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream)
            for _ in range(10):
                upstream.connect_failed(node)
                upstream.connect_failed(node)
                upstream.connect_succeeded(node)
            assert node.healthy and node.passive_failures == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("nodes", "percent", "expected"),
    [
        (1, 50, 1),
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (10, 50, 5),
        (10, 10, 1),
        (3, 100, 3),
        (10, 0, 0),
        (0, 50, 0),
        (7, 30, 2),
    ],
)
def test_max_ejectable(nodes: int, percent: int, expected: int) -> None:
    assert max_ejectable(nodes, percent) == expected


async def test_max_ejected_percent_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(4, passive_failures=1, max_ejected_percent=50, ejection_time=10.0)
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                monitor = await start_health(nursery, upstream)
                for node in upstream.nodes:
                    upstream.connect_failed(node)
                assert [n.healthy for n in upstream.nodes] == [False, False, True, True]
                assert monitor.ejections_total == 2 and monitor.ejections_refused_total == 2
                # The refused node keeps its count: ejected on its next failure once there
                # is room again.
                await trio.sleep(10.001)
                assert all(n.healthy for n in upstream.nodes)
                upstream.connect_failed(upstream.nodes[2])
                assert not upstream.nodes[2].healthy
                nursery.cancel_scope.cancel()
        refused = [e for e in logs if e["event"] == "ejection_refused"]
        assert len(refused) == 2 and refused[0]["ejected"] == 2


async def test_single_node_may_be_ejected_then_fail_open_decides(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        for fail_open in (True, False):
            upstream = make_upstream(1, passive_failures=1, fail_open=fail_open)
            node = upstream.nodes[0]
            async with trio.open_nursery() as nursery:
                await start_health(nursery, upstream)
                upstream.connect_failed(node)
                assert not node.healthy
                picked = upstream.pick((), b"\x7f\x00\x00\x01")
                assert picked is (node if fail_open else None)
                # Failures during fail-open traffic do not extend the ejection.
                until = node.ejected_until
                upstream.connect_failed(node)
                assert node.ejected_until == until
                nursery.cancel_scope.cancel()


async def test_fail_open_both_ways_with_active_checks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        for fail_open in (True, False):
            upstream = make_upstream(3, check="tcp", interval=2.0, fail_open=fail_open)
            script = Script()
            for n in upstream.nodes:
                script.set(n.address, False)
            async with trio.open_nursery() as nursery:
                await start_health(nursery, upstream, script)
                await trio.sleep(1.5)
                assert not any(n.healthy for n in upstream.nodes)
                picked = {upstream.pick((), bytes([10, 9, 0, i])) for i in range(30)}
                if fail_open:
                    assert picked == set(upstream.nodes)
                else:
                    assert picked == {None}
                # One node back: only it is picked, whatever fail_open says.
                script.set(upstream.nodes[1].address, True)
                await trio.sleep(2.0 * 3)
                assert [n.healthy for n in upstream.nodes] == [False, True, False]
                picked = {upstream.pick((), bytes([10, 9, 0, i])) for i in range(30)}
                assert picked == {upstream.nodes[1]}
                nursery.cancel_scope.cancel()


async def test_probe_ends_ejection_early(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(
            2, check="tcp", interval=5.0, passive_failures=1, ejection_time=60.0
        )
        node = upstream.nodes[0]
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream, Script())
            await at(t0, 3.0)  # after the first probe at 2.5
            upstream.connect_failed(node)
            assert health_state(node) == "ejected"
            await at(t0, 7.4)
            assert not node.healthy
            await at(t0, 7.6)  # the probe at 7.5 passed
            assert node.healthy
            assert node.health_reason == "check passed while ejected: status 200"
            nursery.cancel_scope.cancel()


def test_probe_started_before_the_ejection_does_not_end_it() -> None:
    now = [10.0]
    monitor = HealthMonitor(
        "web",
        HealthConfig(check="tcp", passive_failures=1),
        clock=lambda: now[0],
        rng=FixedRandom(0.0),
    )
    upstream = make_upstream(2, check="tcp", passive_failures=1)
    node = upstream.nodes[0]
    monitor.track(upstream.nodes)
    assert node in monitor.due()  # probe starts at 10.0
    now[0] = 10.5
    monitor.connect_failed(upstream, node)
    assert health_state(node) == "ejected"
    now[0] = 11.0
    monitor.check_done(node, CheckResult(True, "connected"), started=10.0)
    assert health_state(node) == "ejected"


async def test_timer_ends_ejection_but_failing_checks_keep_the_node_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(
            2,
            check="tcp",
            interval=5.0,
            passive_failures=1,
            ejection_time=20.0,
            unhealthy_threshold=2,
        )
        node = upstream.nodes[0]
        script = Script()
        script.set(node.address, True, False)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            await start_health(nursery, upstream, script)
            await at(t0, 3.0)
            upstream.connect_failed(node)
            assert health_state(node) == "ejected"
            await at(t0, 13.0)  # failures at 7.5 and 12.5: down wins over ejected
            assert health_state(node) == "down"
            await at(t0, 23.5)
            assert node.ejected_until is None and health_state(node) == "down"
            assert not node.healthy
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------
# Visibility


def test_node_status_fields_and_draining() -> None:
    node = NodeState(addr(1), 5)
    status = node_status(node)
    assert status["state"] == "up" and status["healthy"] is True
    assert status["last_check"] is None and isinstance(status["since"], float)
    node.weight = 0
    assert node_status(node)["state"] == "draining"
    node.weight = 5
    node.in_service = False
    assert node_status(node)["state"] == "draining"
    node.in_service = True
    node.ejected_until = 50.0
    node.healthy = False
    assert node_status(node)["state"] == "ejected"
    node.check_up = False
    status = node_status(node)
    assert status["state"] == "down" and status["health"] == "down"
    assert set(status) >= {"state", "healthy", "reason", "since", "last_check", "last_check_at"}


async def test_passive_observer_is_registered_while_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(1)
        async with trio.open_nursery() as nursery:
            monitor = await start_health(nursery, upstream)
            assert upstream.observers == [monitor]
            nursery.cancel_scope.cancel()
        assert upstream.observers == []


# --------------------------------------------------------------------------------------
# Probes against real loopback servers (real clock)


def loopback_upstream(
    port: int, *, proxy_protocol: str = "off", host_header: str = "", **health: Any
) -> UpstreamRuntime:
    config = UpstreamConfig(
        name="web",
        nodes=(NodeConfig(SocketAddress("127.0.0.1", port)),),
        proxy_protocol=proxy_protocol,  # type: ignore[arg-type]
        host_header=host_header,
        health=HealthConfig(**{"timeout": 0.5, "interval": 0.5, **health}),
    )
    return UpstreamRuntime(config, BackendAuthorization())


def unused_port() -> int:
    return free_port()


@attrs.define
class HTTPServer:
    """A loopback server answering each connection with ``status`` (and recording what
    it received, up to the end of the head)."""

    status: int = 200
    reply: bytes | None = None
    silent: bool = False
    received: list[bytes] = attrs.Factory(list)
    port: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
            self.received.append(data)
            if self.silent:
                await trio.sleep_forever()
            reply = self.reply or (
                f"HTTP/1.1 {self.status} X\r\nContent-Length: 2\r\n\r\nhi".encode()
            )
            await stream.send_all(reply)


async def run_one(upstream: UpstreamRuntime) -> CheckResult:
    node = upstream.nodes[0]
    return await run_check(node.address, upstream.config, upstream.authorization)


async def test_tcp_check_follows_a_listener_that_closes_and_reopens() -> None:
    with trio.fail_after(TIMEOUT):
        port = unused_port()
        upstream = loopback_upstream(
            port, check="tcp", interval=0.1, timeout=0.1, unhealthy_threshold=2, healthy_threshold=2
        )
        node = upstream.nodes[0]

        async def wait_for(healthy: bool) -> None:
            await wait_until(lambda: node.healthy is healthy)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_health, upstream)
            # Nothing listens: connect refused, down.
            await wait_for(False)
            assert node.last_check == "connect refused"
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind(("127.0.0.1", port))
            sock.listen(16)
            listener = trio.SocketListener(sock)

            async def accept_and_close() -> None:
                while True:
                    stream = await listener.accept()
                    await stream.aclose()

            async with trio.open_nursery() as inner:
                inner.start_soon(accept_and_close)
                await wait_for(True)
                assert node.last_check == "connected"
                inner.cancel_scope.cancel()
            await listener.aclose()
            await wait_for(False)
            assert node.last_check == "connect refused"
            nursery.cancel_scope.cancel()


async def test_http_check_500_then_200() -> None:
    with trio.fail_after(TIMEOUT):
        server = HTTPServer(status=500)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            upstream = loopback_upstream(
                port,
                check="http",
                path="/healthz",
                interval=0.1,
                unhealthy_threshold=1,
                healthy_threshold=2,
            )
            node = upstream.nodes[0]
            await nursery.start(serve_health, upstream)
            await wait_until(lambda: not node.healthy)
            assert node.last_check == "status 500"
            server.status = 200
            await wait_until(lambda: node.healthy)
            assert node.last_check == "status 200"
            assert node.health_reason == "2 consecutive checks passed: status 200"
            nursery.cancel_scope.cancel()
        head = server.received[0]
        assert head.startswith(b"GET /healthz HTTP/1.1\r\n")
        assert b"\r\nhost: 127.0.0.1:%d\r\n" % port in head.lower()
        assert b"\r\nconnection: close\r\n" in head.lower()


@pytest.mark.parametrize(
    ("mode", "prefix"),
    [("v2", proxyproto.encode_v2_local()), ("v1", b"PROXY UNKNOWN\r\n"), ("off", b"")],
)
async def test_http_check_sends_proxy_header_first(mode: str, prefix: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        server = HTTPServer(status=204)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            upstream = loopback_upstream(
                port, check="http", proxy_protocol=mode, host_header="api.internal"
            )
            result = await run_one(upstream)
            nursery.cancel_scope.cancel()
        assert result == CheckResult(True, "status 204")
        head = server.received[0]
        assert head.startswith(prefix + b"GET / HTTP/1.1\r\n")
        assert b"\r\nhost: api.internal\r\n" in head.lower()


async def test_tcp_check_sends_proxy_header() -> None:
    with trio.fail_after(TIMEOUT):
        received: list[bytes] = []

        async def handler(stream: trio.SocketStream) -> None:
            data = b""
            while chunk := await stream.receive_some(100):
                data += chunk
            received.append(data)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            upstream = loopback_upstream(port, check="tcp", proxy_protocol="v2")
            assert await run_one(upstream) == CheckResult(True, "connected")
            await wait_until(lambda: bool(received))
            nursery.cancel_scope.cancel()
        assert received == [proxyproto.encode_v2_local()]


@pytest.mark.parametrize(
    ("server", "expect", "result"),
    [
        (HTTPServer(status=302), (200, 299), CheckResult(False, "status 302")),
        (HTTPServer(status=302), (200, 399), CheckResult(True, "status 302")),
        (
            HTTPServer(reply=b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"),
            (200, 399),
            CheckResult(True, "status 200"),
        ),
        (HTTPServer(reply=b"garbage\r\n\r\n"), (200, 399), None),
        (
            HTTPServer(reply=b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n"),
            (200, 399),
            None,
        ),
        (HTTPServer(reply=b"HTTP/1.1 20"), (200, 399), None),
        (HTTPServer(silent=True), (200, 399), CheckResult(False, "timeout after 0.3s")),
    ],
)
async def test_http_check_results(
    server: HTTPServer, expect: tuple[int, int], result: CheckResult | None
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            upstream = loopback_upstream(port, check="http", expect=expect, timeout=0.3)
            got = await run_one(upstream)
            nursery.cancel_scope.cancel()
        if result is None:
            assert not got.ok
            assert got.reason.startswith(("bad response", "connection closed before")), got
        else:
            assert got == result


async def test_connect_refused_reason() -> None:
    with trio.fail_after(TIMEOUT):
        upstream = loopback_upstream(unused_port(), check="http")
        assert await run_one(upstream) == CheckResult(False, "connect refused")


async def test_unauthorized_node_is_never_probed() -> None:
    with trio.fail_after(TIMEOUT):
        server = HTTPServer()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            rule = AuthorizeRule("other", parse_network("10.0.0.0/8"), ((1, 65535),))
            upstream = loopback_upstream(port, check="http", interval=0.05)
            upstream.authorization = BackendAuthorization([rule])
            node = upstream.nodes[0]
            await nursery.start(serve_health, upstream)
            await wait_until(lambda: not node.healthy)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        assert node.last_check == "not authorized (not probed)"
        assert server.received == []


async def test_a_crashing_check_counts_as_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(1, check="tcp", interval=2.0)
        node = upstream.nodes[0]

        async def broken(*_: Any) -> CheckResult:
            raise RuntimeError("boom")

        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                monitor = await nursery.start(
                    functools.partial(serve_health, upstream, check=broken, rng=FixedRandom(0.5))
                )
                await trio.sleep(2.5)
                assert not node.healthy
                assert node.last_check == "check error: RuntimeError('boom')"
                assert monitor.as_dict()["checks_failed_total"] == 1
                nursery.cancel_scope.cancel()
        assert any(e["event"] == "check_error" for e in logs)


def test_a_new_monitor_without_checks_releases_nodes_held_down() -> None:
    node = NodeState(addr(1), 1)
    node.check_up, node.healthy, node.health_reason = False, False, "3 consecutive checks failed"
    monitor = HealthMonitor("web", HealthConfig(check="none"), clock=lambda: 0.0)
    monitor.track([node])
    assert node.healthy and node.health_reason == "active checks turned off"
