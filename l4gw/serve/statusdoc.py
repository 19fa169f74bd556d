"""The parts of the ``/status`` document (JSON-able dicts), shared by a single daemon, its
workers and the control plane of ``workers = N``. No I/O.

A process with traffic fills the counters from its own objects (``local_*``); the control plane
sums them over its workers' documents and passes the sums in. Key order is the order in the
served JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from .. import __version__
from ..core.config import ListenerConfig
from ..core.health import find_monitor, node_status
from ..core.nodes import NodeState
from ..core.runtime import ListenerRuntime
from ..core.upstream import UpstreamRuntime
from .discovery import discovery_stats

__all__ = [
    "listener_document",
    "local_listener_document",
    "local_upstream_document",
    "node_document",
    "process_document",
    "upstream_document",
]


def process_document(
    *,
    role: str | None,
    draining: bool,
    started_wall: float,
    reloads: int,
    reload_failures: int,
) -> dict[str, Any]:
    """The head of the document: version, pid, the ``role`` (the control plane says
    ``control``; a daemon or worker has none), draining, uptime and the reload counters."""
    head: dict[str, Any] = {"version": __version__, "pid": os.getpid()}
    if role is not None:
        head["role"] = role
    head["draining"] = draining
    head["uptime_seconds"] = round(time.time() - started_wall, 3)
    head["reloads"] = reloads
    head["reload_failures"] = reload_failures
    return head


def listener_document(lc: ListenerConfig, *, active: int, total: int) -> dict[str, Any]:
    """One listener: its config and its connection counters."""
    return {
        "name": lc.name,
        "address": str(lc.listen),
        "mode": lc.mode,
        "upstream": lc.upstream,
        "active_connections": active,
        "connections_total": total,
    }


def local_listener_document(runtime: ListenerRuntime) -> dict[str, Any]:
    """One listener of this process."""
    stats = runtime.stats
    return listener_document(
        runtime.config, active=stats.active, total=sum(stats.outcomes.values())
    )


def node_document(node: NodeState, *, active: int, total: int, failures: int) -> dict[str, Any]:
    """One node: address, weight, the connection counters given, source and health state."""
    return {
        "address": node.key,
        "weight": node.weight,
        "active_connections": active,
        "connections_total": total,
        "connect_failures": failures,
        "source": node.source,
        **node_status(node),
    }


def upstream_document(
    up: UpstreamRuntime, nodes: Iterable[dict[str, Any]], health: dict[str, Any] | None
) -> dict[str, Any]:
    """One upstream with its node documents, its health monitor's ``health`` counters (None
    without a monitor) and its discovery counters."""
    discovery = discovery_stats(up)
    return {
        "name": up.name,
        "balance": up.config.balance,
        "health_check": up.config.health.check,
        "nodes": list(nodes),
        "health": health,
        "discovery": discovery.as_dict() if discovery is not None else None,
        "unauthorized_dropped": up.unauthorized_dropped,
    }


def local_upstream_document(up: UpstreamRuntime) -> dict[str, Any]:
    """One upstream of this process, from its own counters. Forgets retired nodes without
    connections first: a node that left shows as draining only while it has connections."""
    up.forget_retired()
    monitor = find_monitor(up)
    nodes = [
        node_document(
            node,
            active=node.active,
            total=node.connections_total,
            failures=node.connect_failures,
        )
        for node in up.all_nodes()
    ]
    return upstream_document(up, nodes, monitor.as_dict() if monitor is not None else None)
