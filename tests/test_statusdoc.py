"""The parts of ``/status`` (l4gw.statusdoc) shared by the daemon and the control plane."""

from __future__ import annotations

import os
import time
import tomllib

from l4gw import __version__
from l4gw.core.acl import BackendAuthorization, SourceACL
from l4gw.core.config import parse_config
from l4gw.core.ratelimit import RateLimiter
from l4gw.core.runtime import ListenerRuntime, ListenerStats
from l4gw.core.upstream import UpstreamRuntime
from l4gw.serve.statusdoc import (
    listener_document,
    local_listener_document,
    local_upstream_document,
    node_document,
    process_document,
    upstream_document,
)

CONFIG = parse_config(
    tomllib.loads(
        """
[upstreams.web]
balance = "least_conn"
nodes = [{ address = "10.0.0.1:80", weight = 5 }, { address = "10.0.0.2:80", weight = 0 }]

[[listeners]]
name = "l"
listen = "127.0.0.1:8080"
upstream = "web"
"""
    )
)
NODE_KEYS = [
    "address",
    "weight",
    "active_connections",
    "connections_total",
    "connect_failures",
    "source",
    "state",
    "health",
]
UPSTREAM_KEYS = [
    "name",
    "balance",
    "health_check",
    "nodes",
    "health",
    "discovery",
    "unauthorized_dropped",
]


def upstream() -> UpstreamRuntime:
    return UpstreamRuntime(CONFIG.upstreams["web"], BackendAuthorization(CONFIG.authorize))


def test_process_head_with_and_without_a_role() -> None:
    started = time.time() - 2
    head = process_document(
        role=None, draining=False, started_wall=started, reloads=3, reload_failures=1
    )
    assert list(head) == [
        "version",
        "pid",
        "draining",
        "uptime_seconds",
        "reloads",
        "reload_failures",
    ]
    assert (head["version"], head["pid"], head["reloads"]) == (__version__, os.getpid(), 3)
    assert 2 <= head["uptime_seconds"] < 60
    control = process_document(
        role="control", draining=True, started_wall=started, reloads=0, reload_failures=0
    )
    assert list(control)[:4] == ["version", "pid", "role", "draining"]
    assert control["role"] == "control"


def test_listener_from_its_runtime_and_from_sums() -> None:
    lc = CONFIG.listeners[0]
    stats = ListenerStats()
    stats.active = 2
    stats.outcomes["proxied"] = 5
    stats.outcomes["denied"] = 1
    runtime = ListenerRuntime(lc, stats, SourceACL(), RateLimiter(0, 0), {})
    expected = {
        "name": "l",
        "address": "127.0.0.1:8080",
        "mode": "tcp",
        "upstream": "web",
        "active_connections": 2,
        "connections_total": 6,
    }
    assert local_listener_document(runtime) == expected
    assert listener_document(lc, active=2, total=6) == expected


def test_local_upstream_counts_its_own_nodes() -> None:
    up = upstream()
    up.nodes[0].active = 4
    up.nodes[0].connections_total = 9
    up.nodes[1].connect_failures = 2
    doc = local_upstream_document(up)
    assert list(doc) == UPSTREAM_KEYS
    assert (doc["name"], doc["balance"], doc["discovery"]) == ("web", "least_conn", None)
    first, second = doc["nodes"]
    assert list(first)[: len(NODE_KEYS)] == NODE_KEYS
    assert (first["address"], first["weight"], first["active_connections"]) == ("10.0.0.1:80", 5, 4)
    assert (first["connections_total"], first["source"]) == (9, "static")
    assert (second["connect_failures"], second["state"]) == (2, "draining")  # weight 0


def test_summed_counters_replace_the_local_ones() -> None:
    up = upstream()
    up.nodes[0].active = 4
    node = node_document(up.nodes[0], active=10, total=20, failures=30)
    assert [node[k] for k in NODE_KEYS[2:5]] == [10, 20, 30]
    doc = upstream_document(up, [node], {"ejections_total": 7})
    assert doc["nodes"] == [node]
    assert doc["health"] == {"ejections_total": 7}
    assert list(doc) == UPSTREAM_KEYS
