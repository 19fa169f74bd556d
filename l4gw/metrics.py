"""Prometheus text exposition of the daemon's counters (``GET /metrics``). No I/O.

Metrics are views over the runtime objects (listener stats, node states) rendered on demand;
the data path only bumps plain integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .runtime import Histogram, ListenerStats
from .upstream import UpstreamRuntime

#: (name, type, help, samples) of one metric family from a subsystem; a sample is
#: (labels, value).
MetricFamily = tuple[str, str, str, list[tuple[dict[str, object], float]]]


def lifecycle_families(reloads: int, reload_failures: int, draining: bool) -> list[MetricFamily]:
    """The reload counters and the draining gauge (single daemon and control plane alike)."""
    return [
        ("l4gw_reloads_total", "counter", "Successful configuration reloads.", [({}, reloads)]),
        (
            "l4gw_reload_failures_total",
            "counter",
            "Rejected configuration reloads.",
            [({}, reload_failures)],
        ),
        (
            "l4gw_draining",
            "gauge",
            "1 while the daemon drains before stopping.",
            [({}, int(draining))],
        ),
    ]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        rendered = repr(float(value)) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{_labels(**labels) if labels else ''} {rendered}")

    def histogram(self, name: str, hist: Histogram, **labels: object) -> None:
        cumulative = 0
        for bound, count in zip(hist.bounds, hist.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, **labels, le=f"{bound:g}")
        self.sample(f"{name}_bucket", hist.count, **labels, le="+Inf")
        self.sample(f"{name}_sum", hist.total, **labels)
        self.sample(f"{name}_count", hist.count, **labels)


def render_metrics(
    listeners: Mapping[str, ListenerStats],
    upstreams: Iterable[UpstreamRuntime],
    *,
    http_listeners: Iterable[str] = (),
    extra: Iterable[tuple[str, str, str, Iterable[tuple[dict[str, object], float]]]] = (),
) -> str:
    """The whole ``/metrics`` page.

    ``extra`` adds families from other subsystems as (name, type, help, samples) where each
    sample is (labels, value).
    """
    w = _Writer()
    w.family("l4gw_connections_total", "counter", "Connections accepted, by outcome.")
    for name, stats in listeners.items():
        for outcome, count in stats.outcomes.items():
            w.sample("l4gw_connections_total", count, listener=name, outcome=outcome)
    w.family("l4gw_active_connections", "gauge", "Connections open now.")
    for name, stats in listeners.items():
        w.sample("l4gw_active_connections", stats.active, listener=name)
    w.family("l4gw_bytes_total", "counter", "Bytes relayed (in: from clients, out: to clients).")
    for name, stats in listeners.items():
        w.sample("l4gw_bytes_total", stats.bytes_in, listener=name, direction="in")
        w.sample("l4gw_bytes_total", stats.bytes_out, listener=name, direction="out")
    ups = list(upstreams)
    w.family("l4gw_node_healthy", "gauge", "1 if the node may take new connections by health.")
    for up in ups:
        for node in up.all_nodes():
            w.sample("l4gw_node_healthy", int(node.healthy), upstream=up.name, node=node.key)
    w.family("l4gw_node_active_connections", "gauge", "Connections open to the node now.")
    for up in ups:
        for node in up.all_nodes():
            w.sample("l4gw_node_active_connections", node.active, upstream=up.name, node=node.key)
    w.family("l4gw_node_weight", "gauge", "Configured weight of the node (0 = drained).")
    for up in ups:
        for node in up.nodes:
            w.sample("l4gw_node_weight", node.weight, upstream=up.name, node=node.key)
    w.family("l4gw_node_connect_failures_total", "counter", "Failed connect attempts to the node.")
    for up in ups:
        for node in up.all_nodes():
            w.sample(
                "l4gw_node_connect_failures_total",
                node.connect_failures,
                upstream=up.name,
                node=node.key,
            )
    w.family(
        "l4gw_unauthorized_nodes_dropped_total",
        "counter",
        "Nodes dropped because backend authorization does not permit them.",
    )
    for up in ups:
        w.sample("l4gw_unauthorized_nodes_dropped_total", up.unauthorized_dropped, upstream=up.name)
    http = [name for name in http_listeners if name in listeners]
    w.family("l4gw_http_requests_total", "counter", "HTTP requests answered, by route and status.")
    for name in http:
        for (route, status), count in sorted(listeners[name].requests.items()):
            w.sample("l4gw_http_requests_total", count, listener=name, route=route, status=status)
    w.family("l4gw_request_duration_seconds", "histogram", "HTTP request duration.")
    for name in http:
        w.histogram("l4gw_request_duration_seconds", listeners[name].durations, listener=name)
    for family, kind, help_text, samples in extra:
        w.family(family, kind, help_text)
        for labels, value in samples:
            w.sample(family, value, **labels)
    return "\n".join(w.lines) + "\n"
