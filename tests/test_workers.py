"""``workers = N``: the control plane (l4gw.workers) and its worker processes.

End-to-end tests run the real ``l4gw run`` (a control plane and its workers) on loopback with
backends in this process that count health probes and data connections; unit tests cover the
node state messages and the merging of the workers' metrics.
"""

from __future__ import annotations

import os
import signal
import tomllib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from l4gw.core.config import parse_config
from l4gw.core.netaddr import SocketAddress
from l4gw.core.upstream import UpstreamRuntime
from l4gw.serve.metrics import CONTROL_FAMILIES, merge_metrics, parse_metrics
from l4gw.workers.channel import apply_node_states, node_state_message
from l4gw.workers.supervisor import worker_count

from .conftest import DaemonFactory, RunningDaemon, free_port, open_client, read_line

# -- backends ------------------------------------------------------------------------------


class Backend:
    """A loopback node: answers an HTTP health check (200, or 503 while ``healthy`` is
    False) and counts it; answers anything else with its name and counts it as data."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.probes = 0
        self.data = 0
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            line = await read_line(stream)
            if line.startswith(b"GET "):
                self.probes += 1
                head = line
                while not head.endswith(b"\r\n\r\n"):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    head += chunk
                status = b"200 OK" if self.healthy else b"503 Service Unavailable"
                await stream.send_all(
                    b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            else:
                self.data += 1
                await stream.send_all(self.name.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def start_backends(nursery: trio.Nursery, *names: str) -> list[Backend]:
    result = []
    for name in names:
        backend = Backend(name)
        listeners = await nursery.start(
            partial(trio.serve_tcp, backend.handle, 0, host="127.0.0.1")
        )
        backend.port = listeners[0].socket.getsockname()[1]
        result.append(backend)
    return result


async def ask(port: int) -> str:
    """One connection through the gateway: the name of the backend that answered."""
    stream = await open_client(port)
    async with stream:
        await stream.send_all(b"hi\n")
        return (await read_line(stream)).decode().strip()


def config_text(
    port: int,
    nodes: list[Backend],
    *,
    workers: int = 2,
    health: str = "",
    daemon: str = "",
) -> str:
    node_list = ", ".join(f'{{ address = "127.0.0.1:{b.port}", weight = 1 }}' for b in nodes)
    return f"""
[daemon]
admin = "{{admin}}"
log_format = "json"
drain_timeout = "10s"
workers = {workers}
{daemon}

[upstreams.web]
connect_timeout = "1s"
nodes = [{node_list}]

[upstreams.web.health]
{health}

[[listeners]]
name = "gw"
listen = "127.0.0.1:{port}"
upstream = "web"
"""


HTTP_CHECK = """check = "http"
path = "/healthz"
interval = "100ms"
timeout = "100ms"
healthy_threshold = 1
unhealthy_threshold = 2
"""

# -- helpers on the running daemon -----------------------------------------------------------


def is_our_worker(pid: int, config_path: Path) -> bool:
    """Whether ``pid`` is still a worker process of the daemon using ``config_path``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--worker-index" in cmdline and str(config_path).encode() in cmdline


@pytest.fixture
def worker_pids() -> Iterator[list[tuple[int, Path]]]:
    """Worker PIDs seen by a test: any still running at the end is killed (the fixture
    kills only the control plane, and its workers would then drain for drain_timeout)."""
    seen: list[tuple[int, Path]] = []
    yield seen
    for pid, config_path in seen:
        if is_our_worker(pid, config_path):
            os.kill(pid, signal.SIGKILL)


async def workers_of(daemon: RunningDaemon, seen: list[tuple[int, Path]]) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = (await daemon.status())["workers"]
    for worker in workers:
        if worker["pid"] is not None and (worker["pid"], daemon.config_path) not in seen:
            seen.append((worker["pid"], daemon.config_path))
    return workers


async def wait_status(daemon: RunningDaemon, condition: Any, timeout: float = 10.0) -> Any:
    """Poll ``/status`` until ``condition(doc)`` is true; returns the document."""
    with trio.fail_after(timeout):
        while True:
            doc = await daemon.status()
            if condition(doc):
                return doc
            await trio.sleep(0.05)


def node_entry(doc: dict[str, Any], backend: Backend) -> dict[str, Any]:
    nodes = {n["address"]: n for n in doc["upstreams"][0]["nodes"]}
    entry: dict[str, Any] = nodes[f"127.0.0.1:{backend.port}"]
    return entry


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


e2e = pytest.mark.e2e

# -- end to end ------------------------------------------------------------------------------


@e2e
async def test_both_workers_accept_and_metrics_sum_them(
    l4gw_daemon: DaemonFactory, worker_pids: list[tuple[int, Path]]
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a, b = await start_backends(nursery, "a", "b")
            port = free_port()
            daemon = await l4gw_daemon(config_text(port, [a, b]))
            workers = await workers_of(daemon, worker_pids)
            assert len(workers) == 2
            pids = {w["pid"] for w in workers}
            assert len(pids) == 2 and os.getpid() not in pids
            assert all(is_our_worker(pid, daemon.config_path) for pid in pids)
            assert all(w["state"] == "ready" for w in workers)
            answers = [await ask(port) for _ in range(40)]
            assert set(answers) == {"a", "b"}
            doc = await wait_status(daemon, lambda d: d["listeners"][0]["connections_total"] == 40)
            per_worker = [w["connections_total"] for w in doc["workers"]]
            assert sum(per_worker) == 40
            assert all(count > 0 for count in per_worker), per_worker  # both accept
            assert node_entry(doc, a)["connections_total"] == a.data
            assert node_entry(doc, b)["connections_total"] == b.data
            proxied = await daemon.metric(
                "l4gw_connections_total", listener="gw", outcome="proxied"
            )
            assert proxied == 40
            assert await daemon.metric("l4gw_workers") == 2
            assert await daemon.metric("l4gw_node_healthy", upstream="web") == 1
            nursery.cancel_scope.cancel()


@e2e
async def test_health_checks_run_once_not_once_per_worker(
    l4gw_daemon: DaemonFactory, worker_pids: list[tuple[int, Path]]
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (a,) = await start_backends(nursery, "a")
            port = free_port()
            daemon = await l4gw_daemon(config_text(port, [a], health=HTTP_CHECK))
            await workers_of(daemon, worker_pids)
            start = a.probes
            await trio.sleep(2.0)
            probes = a.probes - start
            # One prober at interval 100 ms (±10 % jitter): about 20 in 2 s. Each worker
            # probing too would make 60. (The low bound leaves room for a loaded machine.)
            assert 5 <= probes <= 30, probes
            checks = await daemon.metric("l4gw_health_checks_total", upstream="web")
            assert checks <= a.probes + 1
            nursery.cancel_scope.cancel()


@e2e
async def test_a_node_marked_down_gets_nothing_from_any_worker(
    l4gw_daemon: DaemonFactory, worker_pids: list[tuple[int, Path]]
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a, b = await start_backends(nursery, "a", "b")
            port = free_port()
            daemon = await l4gw_daemon(config_text(port, [a, b], health=HTTP_CHECK))
            await workers_of(daemon, worker_pids)
            b.healthy = False  # b still accepts: only the push can keep the workers off it
            await wait_status(daemon, lambda d: node_entry(d, b)["health"] == "down")
            await trio.sleep(1.0)  # the control plane pushes within 200 ms (PUSH_POLL)
            before = b.data
            answers = [await ask(port) for _ in range(40)]
            assert answers == ["a"] * 40
            assert b.data == before
            doc = await daemon.status()
            assert all(w["connections_total"] > 0 for w in doc["workers"])
            assert (
                await daemon.metric("l4gw_node_healthy", upstream="web", node=f"127.0.0.1:{b.port}")
                == 0
            )
            b.healthy = True
            await wait_status(daemon, lambda d: node_entry(d, b)["health"] == "up")
            await trio.sleep(1.0)
            answers = [await ask(port) for _ in range(20)]
            assert "b" in answers
            nursery.cancel_scope.cancel()


@e2e
async def test_a_killed_worker_is_replaced_and_gets_the_node_state_at_once(
    l4gw_daemon: DaemonFactory, worker_pids: list[tuple[int, Path]]
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a, b = await start_backends(nursery, "a", "b")
            port = free_port()
            daemon = await l4gw_daemon(config_text(port, [a, b], health=HTTP_CHECK))
            workers = await workers_of(daemon, worker_pids)
            b.healthy = False
            await wait_status(daemon, lambda d: node_entry(d, b)["health"] == "down")
            victim = workers[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            doc = await wait_status(
                daemon,
                lambda d: (
                    d["workers"][0]["pid"] not in (None, victim)
                    and d["workers"][0]["state"] == "ready"
                    and d["workers"][0]["reachable"]
                ),
            )
            await workers_of(daemon, worker_pids)
            assert not alive(victim) or not is_our_worker(victim, daemon.config_path)
            assert doc["worker_restarts"] == 1
            assert doc["workers"][0]["starts"] == 2
            assert doc["workers"][1]["pid"] == workers[1]["pid"]
            # The new worker never saw b as up: it got the state before accepting.
            before = b.data
            answers = [await ask(port) for _ in range(40)]
            assert answers == ["a"] * 40
            assert b.data == before
            doc = await daemon.status()
            assert doc["workers"][0]["connections_total"] > 0
            assert await daemon.metric("l4gw_worker_restarts_total") == 1
            nursery.cancel_scope.cancel()


@e2e
async def test_sighup_reloads_the_control_plane_and_every_worker(
    l4gw_daemon: DaemonFactory, worker_pids: list[tuple[int, Path]]
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a, b = await start_backends(nursery, "a", "b")
            port = free_port()
            daemon = await l4gw_daemon(config_text(port, [a]))
            await workers_of(daemon, worker_pids)
            assert {await ask(port) for _ in range(10)} == {"a"}
            admin = daemon.admin
            text = config_text(port, [b]).replace("{admin}", admin)
            daemon.write_config(text)
            daemon.send_signal(signal.SIGHUP)
            doc = await wait_status(
                daemon,
                lambda d: d["reloads"] == 1 and all(w["reloads"] == 1 for w in d["workers"]),
            )
            assert [n["address"] for n in doc["upstreams"][0]["nodes"]] == [f"127.0.0.1:{b.port}"]
            totals = [w["connections_total"] for w in doc["workers"]]
            answers = [await ask(port) for _ in range(40)]
            assert answers == ["b"] * 40
            doc = await wait_status(
                daemon, lambda d: sum(w["connections_total"] for w in d["workers"]) == 50
            )
            assert all(
                w["connections_total"] > before
                for w, before in zip(doc["workers"], totals, strict=True)
            )
            # A bad file is rejected everywhere and the running config stays.
            daemon.write_config(text.replace('upstream = "web"', 'upstream = "nope"'))
            daemon.send_signal(signal.SIGHUP)
            await wait_status(
                daemon,
                lambda d: (
                    d["reload_failures"] == 1
                    and all(w["reload_failures"] == 1 for w in d["workers"])
                ),
            )
            assert {await ask(port) for _ in range(10)} == {"b"}
            nursery.cancel_scope.cancel()


@e2e
async def test_sigterm_drains_every_worker_and_exits_0(
    l4gw_daemon: DaemonFactory, worker_pids: list[tuple[int, Path]]
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (a,) = await start_backends(nursery, "a")
            port = free_port()
            # workers = 0: one per CPU.
            daemon = await l4gw_daemon(config_text(port, [a], workers=0))
            workers = await workers_of(daemon, worker_pids)
            assert len(workers) == worker_count(0)
            held = await open_client(port)
            daemon.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                while (await daemon.get("/healthz"))[0] != 503:
                    await trio.sleep(0.05)
            # The held connection is still served while the workers drain.
            await held.send_all(b"hi\n")
            assert await read_line(held) == b"a\n"
            await held.aclose()
            assert await daemon.wait_exit(timeout=20) == 0
            assert not any(is_our_worker(w["pid"], daemon.config_path) for w in workers)
            events = [e["event"] for e in daemon.logs()]
            assert events.count("stopped") == len(workers)
            assert "supervisor_exit" in events
            nursery.cancel_scope.cancel()


@e2e
async def test_workers_stop_when_the_control_plane_is_killed(
    l4gw_daemon: DaemonFactory, worker_pids: list[tuple[int, Path]]
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (a,) = await start_backends(nursery, "a")
            port = free_port()
            daemon = await l4gw_daemon(config_text(port, [a]))
            workers = await workers_of(daemon, worker_pids)
            daemon.send_signal(signal.SIGKILL)
            await daemon.wait_exit()
            with trio.fail_after(15):
                while any(is_our_worker(w["pid"], daemon.config_path) for w in workers):
                    await trio.sleep(0.05)
            closed = daemon.logs("control_channel_closed")
            # Each worker's lines carry its index.
            assert sorted(line["worker"] for line in closed) == list(range(len(workers)))
            nursery.cancel_scope.cancel()


# -- units -------------------------------------------------------------------------------------

UPSTREAM_TOML = """
[upstreams.web]
nodes = [{ address = "10.0.0.1:80", weight = 5 }, { address = "10.0.0.2:80", weight = 1 }]
[upstreams.web.discovery]
name = "web.internal"
port = 80

[[listeners]]
name = "l"
listen = "127.0.0.1:8080"
upstream = "web"
"""


def runtimes(text: str = UPSTREAM_TOML) -> dict[str, UpstreamRuntime]:
    config = parse_config(tomllib.loads(text))
    from l4gw.core.acl import BackendAuthorization

    auth = BackendAuthorization(config.authorize)
    return {name: UpstreamRuntime(up, auth) for name, up in config.upstreams.items()}


def test_node_state_message_and_apply_in_a_worker() -> None:
    control = runtimes()
    up = control["web"]
    up.set_discovered([(SocketAddress("10.0.0.9", 80), 1)])
    up.nodes[1].check_up = False
    message = node_state_message(control)
    assert message == {
        "upstreams": {
            "web": [
                {"address": "10.0.0.1:80", "weight": 5, "source": "static", "check_up": True},
                {"address": "10.0.0.2:80", "weight": 1, "source": "static", "check_up": False},
                {"address": "10.0.0.9:80", "weight": 1, "source": "dns", "check_up": True},
            ]
        }
    }
    worker = runtimes()
    wup = worker["web"]
    wup.nodes[0].ejected_until = 123.0  # ejected here by passive checks: stays out
    apply_node_states(worker, {**message, "upstreams": {**message["upstreams"], "gone": []}})
    assert [(n.key, n.source, n.check_up, n.healthy) for n in wup.nodes] == [
        ("10.0.0.1:80", "static", True, False),
        ("10.0.0.2:80", "static", False, False),
        ("10.0.0.9:80", "dns", True, True),
    ]
    kept = wup.nodes[2]
    up.nodes[1].check_up = True
    up.set_discovered([(SocketAddress("10.0.0.9", 80), 1), (SocketAddress("10.0.0.8", 80), 2)])
    apply_node_states(worker, node_state_message(control))
    assert wup.nodes[1].healthy
    assert wup.nodes[2] is kept  # same NodeState: counters and passive state survive
    assert [(n.key, n.weight) for n in wup.nodes[2:]] == [("10.0.0.9:80", 1), ("10.0.0.8:80", 2)]
    up.set_discovered([])
    apply_node_states(worker, node_state_message(control))
    assert [n.key for n in wup.nodes] == ["10.0.0.1:80", "10.0.0.2:80"]
    with pytest.raises(ValueError):
        apply_node_states(worker, {"nope": 1})


def test_dns_nodes_are_not_taken_where_the_worker_has_no_discovery() -> None:
    control = runtimes()
    control["web"].set_discovered([(SocketAddress("10.0.0.9", 80), 1)])
    worker = runtimes(
        UPSTREAM_TOML.replace('[upstreams.web.discovery]\nname = "web.internal"\nport = 80\n', "")
    )
    apply_node_states(worker, node_state_message(control))
    assert [n.key for n in worker["web"].nodes] == ["10.0.0.1:80", "10.0.0.2:80"]


WORKER_PAGE = """# HELP l4gw_connections_total Connections accepted, by outcome.
# TYPE l4gw_connections_total counter
l4gw_connections_total{{listener="l",outcome="proxied"}} {proxied}
# HELP l4gw_active_connections Connections open now.
# TYPE l4gw_active_connections gauge
l4gw_active_connections{{listener="l"}} {active}
# HELP l4gw_node_healthy 1 if the node may take new connections by health.
# TYPE l4gw_node_healthy gauge
l4gw_node_healthy{{upstream="web",node="10.0.0.1:80"}} 0
# HELP l4gw_request_duration_seconds HTTP request duration.
# TYPE l4gw_request_duration_seconds histogram
l4gw_request_duration_seconds_bucket{{listener="h",le="0.1"}} {fast}
l4gw_request_duration_seconds_bucket{{listener="h",le="+Inf"}} 3
l4gw_request_duration_seconds_sum{{listener="h"}} 0.25
l4gw_request_duration_seconds_count{{listener="h"}} 3
# HELP l4gw_idle_timeouts_total Connections closed by idle_timeout.
# TYPE l4gw_idle_timeouts_total counter
l4gw_idle_timeouts_total 1
"""

CONTROL_PAGE = """# HELP l4gw_connections_total Connections accepted, by outcome.
# TYPE l4gw_connections_total counter
l4gw_connections_total{listener="l",outcome="proxied"} 0
# HELP l4gw_active_connections Connections open now.
# TYPE l4gw_active_connections gauge
l4gw_active_connections{listener="l"} 0
# HELP l4gw_node_healthy 1 if the node may take new connections by health.
# TYPE l4gw_node_healthy gauge
l4gw_node_healthy{upstream="web",node="10.0.0.1:80"} 1
# HELP l4gw_workers Worker processes running.
# TYPE l4gw_workers gauge
l4gw_workers 2
"""


def test_metrics_are_summed_over_workers_except_the_control_plane_families() -> None:
    pages = [
        parse_metrics(WORKER_PAGE.format(proxied=10, active=2, fast=1)),
        parse_metrics(WORKER_PAGE.format(proxied=5, active=1, fast=2)),
    ]
    retired = {
        name: family
        for name, family in parse_metrics(WORKER_PAGE.format(proxied=7, active=9, fast=0)).items()
        if family.kind in ("counter", "histogram")
    }
    merged = merge_metrics(parse_metrics(CONTROL_PAGE), pages, retired)
    samples = {
        key: value
        for family in parse_metrics(merged).values()
        for key, value in family.samples.items()
    }
    assert samples == {
        'l4gw_connections_total{listener="l",outcome="proxied"}': 22,
        'l4gw_active_connections{listener="l"}': 3,  # gauges of exited workers are gone
        'l4gw_node_healthy{upstream="web",node="10.0.0.1:80"}': 1,  # the control plane's
        "l4gw_workers": 2,
        'l4gw_request_duration_seconds_bucket{listener="h",le="0.1"}': 3,
        'l4gw_request_duration_seconds_bucket{listener="h",le="+Inf"}': 9,
        'l4gw_request_duration_seconds_sum{listener="h"}': 0.75,
        'l4gw_request_duration_seconds_count{listener="h"}': 9,
        "l4gw_idle_timeouts_total": 3,
    }
    assert "# TYPE l4gw_request_duration_seconds histogram" in merged
    assert merged.index("l4gw_workers") < merged.index("l4gw_request_duration_seconds")
    assert "l4gw_node_healthy" in CONTROL_FAMILIES
