"""Every metric family of l4gw, and the Prometheus text exposition (``GET /metrics``). No I/O.

This module is the one home of the families: their names, types and help lines
(``Metric`` constants below), how a process renders its page (``render_metrics``), and how the
control plane of ``workers = N`` parses the workers' pages and merges them into one
(``parse_metrics``, ``merge_metrics``).

Metrics are views over the runtime objects (listener stats, node states) rendered on demand;
the data path only bumps plain integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from ..core.runtime import Histogram, ListenerStats
from ..core.upstream import UpstreamRuntime

#: One sample of a family: (labels, value).
Sample = tuple[dict[str, object], float]
#: (name, type, help, samples) of one metric family from a subsystem.
MetricFamily = tuple[str, str, str, list[Sample]]


@attrs.frozen
class Metric:
    """The definition of one metric family: its name, Prometheus type and help line."""

    name: str
    kind: str
    help: str

    def family(self, samples: list[Sample]) -> MetricFamily:
        """This family with ``samples``, for the ``extra`` of ``render_metrics``."""
        return (self.name, self.kind, self.help, samples)


# -- the families --------------------------------------------------------------------------

# Listeners.
CONNECTIONS = Metric("l4gw_connections_total", "counter", "Connections accepted, by outcome.")
ACTIVE_CONNECTIONS = Metric("l4gw_active_connections", "gauge", "Connections open now.")
BYTES = Metric("l4gw_bytes_total", "counter", "Bytes relayed (in: from clients, out: to clients).")
HTTP_REQUESTS = Metric(
    "l4gw_http_requests_total", "counter", "HTTP requests answered, by route and status."
)
REQUEST_DURATION = Metric("l4gw_request_duration_seconds", "histogram", "HTTP request duration.")
MAX_CONNECTIONS = Metric(
    "l4gw_max_connections",
    "gauge",
    "Client connections the process may hold at once, from its open-file limit (0: no cap).",
)

# Nodes and upstreams.
NODE_HEALTHY = Metric(
    "l4gw_node_healthy", "gauge", "1 if the node may take new connections by health."
)
NODE_ACTIVE_CONNECTIONS = Metric(
    "l4gw_node_active_connections", "gauge", "Connections open to the node now."
)
NODE_WEIGHT = Metric("l4gw_node_weight", "gauge", "Configured weight of the node (0 = drained).")
NODE_CONNECT_FAILURES = Metric(
    "l4gw_node_connect_failures_total", "counter", "Failed connect attempts to the node."
)
UNAUTHORIZED_NODES_DROPPED = Metric(
    "l4gw_unauthorized_nodes_dropped_total",
    "counter",
    "Nodes dropped because backend authorization does not permit them.",
)

# Lifecycle (a single daemon, each worker and the control plane alike).
RELOADS = Metric("l4gw_reloads_total", "counter", "Successful configuration reloads.")
RELOAD_FAILURES = Metric("l4gw_reload_failures_total", "counter", "Rejected configuration reloads.")
DRAINING = Metric("l4gw_draining", "gauge", "1 while the daemon drains before stopping.")

# The idle sweeper of a process that carries traffic.
DRAINED_AFTER_RELOAD = Metric(
    "l4gw_drained_after_reload_total",
    "counter",
    "Connections closed drain_timeout after a reload removed their node or listener.",
)
IDLE_TIMEOUTS = Metric("l4gw_idle_timeouts_total", "counter", "Connections closed by idle_timeout.")

# Logging (a process that carries traffic): lines stderr could not take (l4gw.core.logs).
LOG_LINES_DROPPED = Metric(
    "l4gw_log_lines_dropped_total",
    "counter",
    "Log lines dropped because stderr could not take them (full disk, full pipe, error).",
)

#: ``HealthMonitor.as_dict()`` key -> its counter family (one sample per upstream).
HEALTH_COUNTERS = {
    "checks_total": Metric("l4gw_health_checks_total", "counter", "Active health checks run."),
    "checks_failed_total": Metric(
        "l4gw_health_checks_failed_total", "counter", "Active health checks failed."
    ),
    "ejections_total": Metric("l4gw_ejections_total", "counter", "Passive ejections of nodes."),
    "ejections_refused_total": Metric(
        "l4gw_ejections_refused_total",
        "counter",
        "Ejections not made because max_ejected_percent was reached.",
    ),
}
#: ``DiscoveryStats.as_dict()`` key -> its counter family (one sample per upstream).
DISCOVERY_COUNTERS = {
    "lookups_total": Metric("l4gw_discovery_lookups_total", "counter", "DNS discovery lookups."),
    "failures_total": Metric(
        "l4gw_discovery_failures_total", "counter", "DNS lookups that failed."
    ),
    "empty_total": Metric(
        "l4gw_discovery_empty_total", "counter", "DNS answers with no usable address."
    ),
    "changes_total": Metric(
        "l4gw_discovery_changes_total", "counter", "DNS answers that changed the node set."
    ),
}

# The control plane of ``workers = N``.
WORKERS = Metric("l4gw_workers", "gauge", "Worker processes running.")
WORKER_RESTARTS = Metric(
    "l4gw_worker_restarts_total", "counter", "Worker processes restarted after they exited."
)

#: Families the control plane answers from its own state; every other family is the sum over
#: the workers (samples with the same name and labels added up). Passive ejections are the
#: workers' own, so their counters are summed.
CONTROL_FAMILIES = frozenset(
    m.name
    for m in (
        NODE_HEALTHY,
        NODE_WEIGHT,
        UNAUTHORIZED_NODES_DROPPED,
        RELOADS,
        RELOAD_FAILURES,
        DRAINING,
        HEALTH_COUNTERS["checks_total"],
        HEALTH_COUNTERS["checks_failed_total"],
        *DISCOVERY_COUNTERS.values(),
        WORKERS,
        WORKER_RESTARTS,
    )
)
#: Family types whose samples only grow: the control plane keeps them from workers that exited.
CUMULATIVE_KINDS = ("counter", "histogram")


def lifecycle_families(reloads: int, reload_failures: int, draining: bool) -> list[MetricFamily]:
    """The reload counters and the draining gauge (single daemon and control plane alike)."""
    return [
        RELOADS.family([({}, reloads)]),
        RELOAD_FAILURES.family([({}, reload_failures)]),
        DRAINING.family([({}, int(draining))]),
    ]


def sweeper_families(closed_drained: int, closed_idle: int) -> list[MetricFamily]:
    """The idle sweeper's counters (a process that carries traffic)."""
    return [
        DRAINED_AFTER_RELOAD.family([({}, closed_drained)]),
        IDLE_TIMEOUTS.family([({}, closed_idle)]),
    ]


def capacity_families(limit: int) -> list[MetricFamily]:
    """The process's connection cap (its refusals: ``l4gw_connections_total`` with the
    outcome ``fd_limit``)."""
    return [MAX_CONNECTIONS.family([({}, limit)])]


def log_families(dropped: int) -> list[MetricFamily]:
    """Log lines dropped by this process (``l4gw.core.logs.dropped_lines``)."""
    return [LOG_LINES_DROPPED.family([({}, dropped)])]


def worker_families(running: int, restarts: int) -> list[MetricFamily]:
    """The control plane's worker gauge and restart counter."""
    return [WORKERS.family([({}, running)]), WORKER_RESTARTS.family([({}, restarts)])]


# -- rendering ------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def _render_value(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def define(self, metric: Metric) -> None:
        self.family(metric.name, metric.kind, metric.help)

    def sample(self, name: str, value: float, **labels: object) -> None:
        self.lines.append(f"{name}{_labels(**labels) if labels else ''} {_render_value(value)}")

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
    w.define(CONNECTIONS)
    for name, stats in listeners.items():
        for outcome, count in stats.outcomes.items():
            w.sample(CONNECTIONS.name, count, listener=name, outcome=outcome)
    w.define(ACTIVE_CONNECTIONS)
    for name, stats in listeners.items():
        w.sample(ACTIVE_CONNECTIONS.name, stats.active, listener=name)
    w.define(BYTES)
    for name, stats in listeners.items():
        w.sample(BYTES.name, stats.bytes_in, listener=name, direction="in")
        w.sample(BYTES.name, stats.bytes_out, listener=name, direction="out")
    ups = list(upstreams)
    w.define(NODE_HEALTHY)
    for up in ups:
        for node in up.all_nodes():
            w.sample(NODE_HEALTHY.name, int(node.healthy), upstream=up.name, node=node.key)
    w.define(NODE_ACTIVE_CONNECTIONS)
    for up in ups:
        for node in up.all_nodes():
            w.sample(NODE_ACTIVE_CONNECTIONS.name, node.active, upstream=up.name, node=node.key)
    w.define(NODE_WEIGHT)
    for up in ups:
        for node in up.nodes:
            w.sample(NODE_WEIGHT.name, node.weight, upstream=up.name, node=node.key)
    w.define(NODE_CONNECT_FAILURES)
    for up in ups:
        for node in up.all_nodes():
            w.sample(
                NODE_CONNECT_FAILURES.name,
                node.connect_failures,
                upstream=up.name,
                node=node.key,
            )
    w.define(UNAUTHORIZED_NODES_DROPPED)
    for up in ups:
        w.sample(UNAUTHORIZED_NODES_DROPPED.name, up.unauthorized_dropped, upstream=up.name)
    http = [name for name in http_listeners if name in listeners]
    w.define(HTTP_REQUESTS)
    for name in http:
        for (route, status), count in sorted(listeners[name].requests.items()):
            w.sample(HTTP_REQUESTS.name, count, listener=name, route=route, status=status)
    w.define(REQUEST_DURATION)
    for name in http:
        w.histogram(REQUEST_DURATION.name, listeners[name].durations, listener=name)
    for family, kind, help_text, samples in extra:
        w.family(family, kind, help_text)
        for labels, value in samples:
            w.sample(family, value, **labels)
    return "\n".join(w.lines) + "\n"


# -- parsing and merging (the control plane of ``workers = N``) -----------------------------

Number = int | float


@attrs.define
class Family:
    """One metric family of a parsed ``/metrics`` page: samples keyed by ``name{labels}``."""

    name: str
    kind: str = "untyped"
    help: str = ""
    samples: dict[str, Number] = attrs.field(factory=dict)


def _number(text: str) -> Number:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_metrics(text: str) -> dict[str, Family]:
    """The families of a page in l4gw's own exposition format (``# HELP``/``# TYPE`` before
    the samples of each family), in order. Samples repeated within a page are added up.
    Raises ``ValueError`` on a sample whose value is not a number."""
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            name, _, rest = line[7:].partition(" ")
            current = families.setdefault(name, Family(name))
            if line.startswith("# HELP "):
                current.help = rest
            else:
                current.kind = rest
        elif line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if current is None or not key.startswith(current.name):
                base = key.split("{", 1)[0]
                current = families.setdefault(base, Family(base))
            current.samples[key] = current.samples.get(key, 0) + _number(value)
    return families


def add_families(target: dict[str, Family], families: Iterable[Family]) -> None:
    """Add the samples of ``families`` into ``target`` (a family missing there is created with
    the same type and help; samples with the same key are summed)."""
    for family in families:
        into = target.get(family.name)
        if into is None:
            into = target[family.name] = Family(family.name, family.kind, family.help)
        for key, value in family.samples.items():
            into.samples[key] = into.samples.get(key, 0) + value


def cumulative_families(page: Mapping[str, Family]) -> dict[str, Family]:
    """The families of ``page`` whose samples only grow (``CUMULATIVE_KINDS``)."""
    return {name: family for name, family in page.items() if family.kind in CUMULATIVE_KINDS}


def merge_metrics(
    control: Mapping[str, Family],
    workers: Iterable[Mapping[str, Family]],
    retired: Mapping[str, Family] = {},
) -> str:
    """One page: ``CONTROL_FAMILIES`` from ``control``, every other family summed over
    ``workers`` plus ``retired`` (counters of workers that exited). Families keep the order
    of ``control``, then of the workers."""
    summed: dict[str, Family] = {}
    for page in workers:
        add_families(summed, page.values())
    add_families(summed, retired.values())
    order = list(control)
    order += [name for name in summed if name not in control]
    lines: list[str] = []
    for name in order:
        source = control if name in CONTROL_FAMILIES else summed
        header = control.get(name) or summed[name]
        family = source.get(name)
        lines.append(f"# HELP {name} {header.help}")
        lines.append(f"# TYPE {name} {header.kind}")
        if family is not None:
            lines += [f"{key} {_render_value(value)}" for key, value in family.samples.items()]
    return "\n".join(lines) + "\n"
