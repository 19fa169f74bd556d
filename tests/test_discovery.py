"""DNS discovery: record handling (pure), the refresh loop under a virtual clock with a fake
resolver, and end to end against a real dnsmasq on a loopback port."""

from __future__ import annotations

import functools
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import dns.nameserver
import dns.resolver
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.acl import BackendAuthorization
from l4gw.core.config import (
    AuthorizeRule,
    DiscoveryConfig,
    HealthConfig,
    NodeConfig,
    UpstreamConfig,
)
from l4gw.core.health import CheckResult
from l4gw.core.netaddr import SocketAddress, parse_network
from l4gw.core.upstream import UpstreamRuntime
from l4gw.serve import discovery
from l4gw.serve.discovery import (
    MAX_WEIGHT,
    Answer,
    DiscoveryError,
    DiscoveryStats,
    discovery_stats,
    refresh_delay,
    resolve,
    serve_discovery,
    srv_nodes,
    srv_weights,
)
from l4gw.serve.healthchecks import serve_health

#: Real seconds for the dnsmasq tests; virtual seconds under the autojump clock.
TIMEOUT = 15
VIRTUAL_TIMEOUT = 3600


def addr(text: str) -> SocketAddress:
    host, _, port = text.rpartition(":")
    return SocketAddress(host.strip("[]"), int(port))


def nodes_of(upstream: UpstreamRuntime, source: str = "dns") -> dict[str, int]:
    return {n.key: n.weight for n in upstream.nodes if n.source == source}


def make_upstream(
    discovery_config: DiscoveryConfig | None,
    *,
    static: Sequence[str] = (),
    authorize: Sequence[tuple[str, tuple[int, int]]] = (),
    health: HealthConfig | None = None,
) -> UpstreamRuntime:
    config = UpstreamConfig(
        name="web",
        nodes=tuple(NodeConfig(addr(a)) for a in static),
        discovery=discovery_config,
        health=health or HealthConfig(),
    )
    rules = [
        AuthorizeRule(f"r{i}", parse_network(net), (ports,))
        for i, (net, ports) in enumerate(authorize)
    ]
    return UpstreamRuntime(config, BackendAuthorization(rules))


async def wait_until(predicate: Callable[[], bool], step: float = 0.02) -> None:
    while True:
        if predicate():
            return
        await trio.sleep(step)


# --------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize(
    ("ttl", "interval", "expected"),
    [
        (None, 30.0, 30.0),
        (0, 30.0, 1.0),
        (10, 30.0, 10.0),
        (3600, 30.0, 30.0),
        (0.2, 30.0, 1.0),
        (10, 0.5, 0.5),
        (None, 0.5, 0.5),
    ],
)
def test_refresh_delay_clamps_the_ttl(ttl: float | None, interval: float, expected: float) -> None:
    assert refresh_delay(ttl, interval) == expected


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([10, 5, 0], [1000, 500, 1]),
        ([0, 0], [1, 1]),
        ([65535, 1], [1000, 1]),
        ([1], [1000]),
        ([3, 3, 3], [1000, 1000, 1000]),
        ([], []),
    ],
)
def test_srv_weights(weights: list[int], expected: list[int]) -> None:
    assert srv_weights(weights) == expected


@given(st.lists(st.integers(0, 65535), min_size=1, max_size=30))
def test_srv_weights_keep_order_and_range(weights: list[int]) -> None:
    scaled = srv_weights(weights)
    assert all(1 <= w <= MAX_WEIGHT for w in scaled)
    if max(weights) > 0:
        assert max(scaled) == MAX_WEIGHT
    pairs = sorted(zip(weights, scaled, strict=True))
    assert [w for _, w in pairs] == sorted(scaled)  # a larger SRV weight never scales smaller


def test_srv_nodes_lowest_priority_group_only() -> None:
    records = [
        (10, 60, 8080, "a.test."),
        (10, 30, 8081, "b.test."),
        (10, 0, 8082, "c.test."),
        (20, 100, 9000, "backup.test."),
        (10, 50, 8083, "."),  # "no service": contributes nothing
        (10, 50, 8084, "unresolved.test."),
    ]
    addresses = {
        "a.test.": ["10.0.0.1", "10.0.0.2"],
        "b.test.": ["10.0.0.3"],
        "c.test.": ["fd00::0001"],
        "backup.test.": ["10.0.0.9"],
    }
    assert srv_nodes(records, addresses) == [
        (SocketAddress("10.0.0.1", 8080), 1000),
        (SocketAddress("10.0.0.2", 8080), 1000),
        (SocketAddress("10.0.0.3", 8081), 500),
        (SocketAddress("fd00::1", 8082), 1),
    ]


def test_srv_nodes_duplicates_add_up_to_the_cap() -> None:
    records = [(0, 10, 80, "a."), (0, 10, 80, "b."), (0, 20, 81, "a.")]
    addresses = {"a.": ["10.0.0.1"], "b.": ["10.0.0.1"]}
    assert srv_nodes(records, addresses) == [
        (SocketAddress("10.0.0.1", 80), 1000),  # 500 + 500
        (SocketAddress("10.0.0.1", 81), 1000),
    ]
    assert srv_nodes([], addresses) == []


# --------------------------------------------------------------------------------------
# The refresh loop with a fake resolver, virtual clock


class FakeDNS:
    """Answers lookups from a queue (the last answer repeats); records when it was asked."""

    def __init__(self, *answers: Answer | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[float] = []
        self.names: list[str] = []

    def then(self, *answers: Answer | Exception) -> None:
        self.answers = list(answers)

    async def __call__(self, config: DiscoveryConfig) -> Answer:
        self.calls.append(trio.current_time())
        self.names.append(config.name)
        await trio.lowlevel.checkpoint()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def answer(*nodes: str, ttl: float | None = 60.0, weight: int = 1) -> Answer:
    return Answer(tuple(sorted((addr(n), weight) for n in nodes)), ttl)


DISCOVERY = DiscoveryConfig(name="web.test", type="A", port=80, interval=30.0)


async def start_discovery(
    nursery: trio.Nursery, upstream: UpstreamRuntime, fake: FakeDNS
) -> DiscoveryStats:
    stats: DiscoveryStats = await nursery.start(
        functools.partial(serve_discovery, upstream, lookup=fake)
    )
    return stats


async def test_lookups_follow_the_ttl_within_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(DISCOVERY)
        fake = FakeDNS(
            answer("10.0.0.1:80", ttl=10),
            answer("10.0.0.1:80", ttl=0),
            answer("10.0.0.1:80", ttl=3600),
            answer("10.0.0.1:80", ttl=None),
        )
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            stats = await start_discovery(nursery, upstream, fake)
            assert nodes_of(upstream) == {"10.0.0.1:80": 1}
            assert stats.lookups_total == 1
            await trio.sleep_until(t0 + 100)
            nursery.cancel_scope.cancel()
        assert [t - t0 for t in fake.calls] == [0, 10, 11, 41, 71]


async def test_failures_and_empty_answers_keep_the_last_good_set(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(DISCOVERY, static=["10.0.0.100:80"])
        fake = FakeDNS(answer("10.0.0.1:80", "10.0.0.2:80", ttl=20))
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            stats = await start_discovery(nursery, upstream, fake)
            kept = {n.key: n for n in upstream.nodes}
            assert nodes_of(upstream) == {"10.0.0.1:80": 1, "10.0.0.2:80": 1}
            assert nodes_of(upstream, "static") == {"10.0.0.100:80": 1}
            fake.then(DiscoveryError("A web.test: timed out"))
            await trio.sleep_until(t0 + 21)  # lookup at 20 failed
            assert {n.key: n for n in upstream.nodes} == kept
            assert stats.failures_total == 1 and stats.last_error == "A web.test: timed out"
            fake.then(Answer((), None))
            await trio.sleep_until(t0 + 26)  # failure retry after 5 s: empty answer
            assert {n.key: n for n in upstream.nodes} == kept
            assert stats.empty_total == 1 and stats.last_error == "no records"
            fake.then(answer("10.0.0.2:80", "10.0.0.3:80"))
            await trio.sleep_until(t0 + 31)
            assert nodes_of(upstream) == {"10.0.0.2:80": 1, "10.0.0.3:80": 1}
            assert kept["10.0.0.2:80"] in upstream.nodes  # unchanged: same NodeState
            assert not kept["10.0.0.1:80"].in_service  # left
            assert stats.last_error == "" and stats.changes_total == 2
            nursery.cancel_scope.cancel()
        assert [t - t0 for t in fake.calls] == [0, 20, 25, 30]


async def test_unauthorized_addresses_are_never_added(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(DISCOVERY, authorize=[("10.0.0.0/24", (80, 80))])
        fake = FakeDNS(answer("10.0.0.1:80", "10.9.9.9:80", ttl=10))
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            stats = await start_discovery(nursery, upstream, fake)
            assert nodes_of(upstream) == {"10.0.0.1:80": 1}
            assert upstream.unauthorized_dropped == 1
            # Same answer again: nothing re-applied, nothing counted twice.
            await trio.sleep_until(t0 + 10.5)
            assert upstream.unauthorized_dropped == 1
            # Only unauthorized addresses: logged and counted, the last good set stays.
            fake.then(answer("10.9.9.9:80", "10.0.0.1:81"))
            await trio.sleep_until(t0 + 20.5)
            assert nodes_of(upstream) == {"10.0.0.1:80": 1}
            assert upstream.unauthorized_dropped == 3
            assert stats.empty_total == 1
            assert stats.last_error == "no authorized address in the answer"
            nursery.cancel_scope.cancel()


async def test_discovered_and_static_nodes_mix(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(DISCOVERY, static=["10.0.0.1:80", "10.0.0.5:80"])
        fake = FakeDNS(answer("10.0.0.1:80", "10.0.0.2:80", weight=7))
        async with trio.open_nursery() as nursery:
            await start_discovery(nursery, upstream, fake)
            # A static node found in DNS too stays static (config weight).
            assert [(n.key, n.source, n.weight) for n in upstream.nodes] == [
                ("10.0.0.1:80", "static", 1),
                ("10.0.0.5:80", "static", 1),
                ("10.0.0.2:80", "dns", 7),
            ]
            nursery.cancel_scope.cancel()


async def test_reload_changing_or_removing_discovery(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(DISCOVERY)
        fake = FakeDNS(answer("10.0.0.1:80"))
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            stats = await start_discovery(nursery, upstream, fake)
            assert discovery_stats(upstream) is stats
            other = attrs.evolve(DISCOVERY, name="other.test")
            fake.then(answer("10.0.0.7:80"))
            upstream.apply(attrs.evolve(upstream.config, discovery=other), upstream.authorization)
            await trio.sleep_until(t0 + 1.5)  # noticed within CONFIG_POLL
            assert fake.names == ["web.test", "other.test"]
            assert nodes_of(upstream) == {"10.0.0.7:80": 1}
            nursery.cancel_scope.cancel()
        # Removing the section from the configuration ends the task (within CONFIG_POLL).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(serve_discovery, upstream, lookup=fake))
            await trio.sleep(0.1)
            upstream.apply(attrs.evolve(upstream.config, discovery=None), upstream.authorization)
            assert nodes_of(upstream) == {}
        assert trio.current_time() - t0 < 3.0


async def test_new_dns_nodes_wait_for_a_check_when_checks_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        upstream = make_upstream(
            DISCOVERY, static=["10.0.0.100:80"], health=HealthConfig(check="tcp", interval=5.0)
        )
        fake = FakeDNS(answer("10.0.0.1:80", ttl=10))
        checked: list[SocketAddress] = []

        async def check(address: SocketAddress, *_: Any) -> CheckResult:
            checked.append(address)
            await trio.lowlevel.checkpoint()
            return CheckResult(True, "connected")

        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_health, upstream, check=check))
            await start_discovery(nursery, upstream, fake)
            node = upstream.nodes[1]
            assert node.source == "dns" and not node.healthy
            assert node.health_reason == "pending first check"
            await trio.sleep(1.0)
            assert node.healthy and SocketAddress("10.0.0.1", 80) in checked
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------
# Against a real dnsmasq

DNSMASQ = shutil.which("dnsmasq") or next(
    (p for p in ("/usr/sbin/dnsmasq", "/usr/local/sbin/dnsmasq") if os.path.exists(p)), None
)
needs_dnsmasq = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed")


def free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


class Dnsmasq:
    """A dnsmasq serving ``hosts`` (re-read on SIGHUP) and ``conf`` (srv-host lines: read at
    start only, so SRV changes need ``restart``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_udp_tcp_port()
        self.hosts = directory / "hosts"
        self.conf = directory / "dnsmasq.conf"
        self.hosts.write_text("")
        self.conf.write_text("")
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def resolver(self) -> SocketAddress:
        return SocketAddress("127.0.0.1", self.port)

    def start(self) -> None:
        args = [
            str(DNSMASQ),
            "--no-daemon",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={self.hosts}",
            f"--conf-file={self.conf}",
            f"--pid-file={self.directory / 'dnsmasq.pid'}",
            "--local-ttl=0",
            "--local=/test/",  # answer *.test locally, never forward
        ]
        if os.geteuid() == 0:
            # Stay root: dropping to "nobody" would leave the hosts file unreadable on SIGHUP.
            args += [f"--user={pwd.getpwuid(0).pw_name}", f"--group={grp.getgrgid(0).gr_name}"]
        log = (self.directory / "dnsmasq.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        self.wait_ready()

    def _resolver(self) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        resolver.lifetime = 0.2
        return resolver

    def wait_ready(self) -> None:
        resolver = self._resolver()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "dnsmasq exited"
            try:
                resolver.resolve("ready.test.", "A", raise_on_no_answer=False)
                return
            except dns.resolver.NXDOMAIN:
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("dnsmasq did not come up")

    def write_hosts(self, *lines: str) -> None:
        """Replace the hosts file; it carries a marker name, ``gen<N>.test``, that ``reload``
        waits for."""
        self.generation += 1
        marker = f"127.0.0.254 gen{self.generation}.test"
        self.hosts.write_text(
            "".join(f"{line}\n" for line in ("127.0.0.254 ready.test", marker, *lines))
        )

    def reload(self) -> None:
        """SIGHUP, then wait (up to 10 s) until dnsmasq answers from the hosts file last
        written: the signal is handled asynchronously."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        resolver = self._resolver()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                resolver.resolve(f"gen{self.generation}.test.", "A")
                return
            except Exception:
                time.sleep(0.02)
        raise RuntimeError(f"dnsmasq did not re-read {self.hosts} after SIGHUP")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # by PID: only the process this test started
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, *conf_lines: str) -> None:
        self.stop()
        self.conf.write_text("".join(f"{line}\n" for line in conf_lines))
        self.start()


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed")
    server = Dnsmasq(tmp_path)
    server.write_hosts()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fast_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "MIN_REFRESH", 0.05)
    monkeypatch.setattr(discovery, "FAILURE_RETRY", 0.1)
    monkeypatch.setattr(discovery, "CONFIG_POLL", 0.05)
    monkeypatch.setattr(discovery, "LOOKUP_TIMEOUT", 0.5)


@needs_dnsmasq
async def test_dnsmasq_a_records_follow_the_hosts_file(
    dnsmasq: Dnsmasq, fast_refresh: None
) -> None:
    with trio.fail_after(TIMEOUT):
        dnsmasq.write_hosts("127.0.0.11 web.test", "127.0.0.12 web.test", "fd00::1 web.test")
        dnsmasq.reload()
        config = DiscoveryConfig(
            name="web.test", type="A", port=8080, interval=0.2, resolver=dnsmasq.resolver, weight=3
        )
        upstream = make_upstream(config)
        async with trio.open_nursery() as nursery:
            stats = await nursery.start(serve_discovery, upstream)
            await wait_until(lambda: len(nodes_of(upstream)) == 2)
            assert nodes_of(upstream) == {"127.0.0.11:8080": 3, "127.0.0.12:8080": 3}
            dnsmasq.write_hosts("127.0.0.12 web.test", "127.0.0.13 web.test")
            dnsmasq.reload()
            await wait_until(lambda: "127.0.0.13:8080" in nodes_of(upstream))
            assert nodes_of(upstream) == {"127.0.0.12:8080": 3, "127.0.0.13:8080": 3}
            assert stats.failures_total == 0
            nursery.cancel_scope.cancel()


@needs_dnsmasq
async def test_dnsmasq_aaaa(dnsmasq: Dnsmasq) -> None:
    with trio.fail_after(TIMEOUT):
        dnsmasq.write_hosts("127.0.0.11 web.test", "fd00::1 web.test", "fd00:0::02 web.test")
        dnsmasq.reload()
        config = DiscoveryConfig(name="web.test", type="AAAA", port=443, resolver=dnsmasq.resolver)
        found = await resolve(config)
        assert found.nodes == ((addr("[fd00::1]:443"), 1), (addr("[fd00::2]:443"), 1))
        assert found.ttl == 0
        # A name with no AAAA record, and NXDOMAIN: empty answers, not errors.
        for name in ("ready.test", "unknown.test"):
            assert (await resolve(attrs.evolve(config, name=name))).nodes == ()


@needs_dnsmasq
async def test_dnsmasq_srv_ports_weights_and_priority(dnsmasq: Dnsmasq, fast_refresh: None) -> None:
    with trio.fail_after(TIMEOUT):
        dnsmasq.write_hosts("127.0.0.21 n1.test", "127.0.0.22 n2.test", "127.0.0.23 n3.test")
        dnsmasq.restart(
            "srv-host=_web._tcp.svc.test,n1.test,8081,10,30",
            "srv-host=_web._tcp.svc.test,n2.test,8082,10,10",
            "srv-host=_web._tcp.svc.test,n3.test,8083,10,0",
            "srv-host=_web._tcp.svc.test,n3.test,9999,20,100",
        )
        config = DiscoveryConfig(
            name="_web._tcp.svc.test", type="SRV", interval=0.2, resolver=dnsmasq.resolver
        )
        upstream = make_upstream(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_discovery, upstream)
            assert nodes_of(upstream) == {
                "127.0.0.21:8081": 1000,
                "127.0.0.22:8082": 333,
                "127.0.0.23:8083": 1,
            }
            # SRV records come from the configuration file: dnsmasq reads them at start only.
            dnsmasq.restart("srv-host=_web._tcp.svc.test,n2.test,7000,5,1")
            await wait_until(lambda: "127.0.0.22:7000" in nodes_of(upstream))
            assert nodes_of(upstream) == {"127.0.0.22:7000": 1000}
            nursery.cancel_scope.cancel()


@needs_dnsmasq
async def test_dnsmasq_srv_target_without_additional_records(dnsmasq: Dnsmasq) -> None:
    """A target whose address the server does not send along is looked up (A, then AAAA)."""
    with trio.fail_after(TIMEOUT):
        dnsmasq.write_hosts("fd00::5 v6only.test")
        dnsmasq.restart("srv-host=_x._tcp.svc.test,v6only.test,81,0,0")
        found = await resolve(
            DiscoveryConfig(name="_x._tcp.svc.test", type="SRV", resolver=dnsmasq.resolver)
        )
        assert found.nodes == ((addr("[fd00::5]:81"), 1),)


@needs_dnsmasq
async def test_dnsmasq_down_keeps_the_last_good_set(dnsmasq: Dnsmasq, fast_refresh: None) -> None:
    with trio.fail_after(TIMEOUT):
        dnsmasq.write_hosts("127.0.0.11 web.test")
        dnsmasq.reload()
        config = DiscoveryConfig(
            name="web.test", type="A", port=80, interval=0.2, resolver=dnsmasq.resolver
        )
        upstream = make_upstream(config)
        async with trio.open_nursery() as nursery:
            stats = await nursery.start(serve_discovery, upstream)
            assert nodes_of(upstream) == {"127.0.0.11:80": 1}
            dnsmasq.stop()
            await wait_until(lambda: stats.failures_total >= 2)
            assert nodes_of(upstream) == {"127.0.0.11:80": 1}
            assert "web.test" in stats.last_error
            nursery.cancel_scope.cancel()
        with pytest.raises(DiscoveryError):
            await resolve(config)


@needs_dnsmasq
async def test_dnsmasq_unauthorized_address_never_added(
    dnsmasq: Dnsmasq, fast_refresh: None
) -> None:
    with trio.fail_after(TIMEOUT):
        dnsmasq.write_hosts("127.0.0.11 web.test", "192.0.2.66 web.test")
        dnsmasq.reload()
        config = DiscoveryConfig(
            name="web.test", type="A", port=80, interval=0.2, resolver=dnsmasq.resolver
        )
        upstream = make_upstream(config, authorize=[("127.0.0.0/8", (80, 80))])
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_discovery, upstream)
            await trio.sleep(0.5)
            assert nodes_of(upstream) == {"127.0.0.11:80": 1}
            assert upstream.unauthorized_dropped == 1
            nursery.cancel_scope.cancel()
