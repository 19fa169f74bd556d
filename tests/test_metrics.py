"""Metric families and the Prometheus text (l4gw.metrics): the definitions, rendering, and
the parse and merge the control plane does over its workers' pages."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.runtime import ListenerStats
from l4gw.serve import metrics
from l4gw.serve.metrics import (
    CONTROL_FAMILIES,
    Family,
    Metric,
    add_families,
    cumulative_families,
    merge_metrics,
    parse_metrics,
    render_metrics,
)


def defined() -> list[Metric]:
    found = [v for v in vars(metrics).values() if isinstance(v, Metric)]
    found += [*metrics.HEALTH_COUNTERS.values(), *metrics.DISCOVERY_COUNTERS.values()]
    return found


def test_every_family_is_defined_once() -> None:
    names = [m.name for m in defined()]
    assert len(names) == len(set(names)) == 27
    assert all(n.startswith("l4gw_") for n in names)
    assert {m.kind for m in defined()} == {"counter", "gauge", "histogram"}
    assert all(m.name.endswith("_total") for m in defined() if m.kind == "counter")
    assert set(names) >= CONTROL_FAMILIES


def test_a_rendered_page_parses_back() -> None:
    stats = ListenerStats()
    stats.outcomes["proxied"] = 3
    stats.active = 1
    stats.requests[("api", 200)] = 2
    stats.durations.observe(0.02)
    page = render_metrics(
        {"h": stats},
        [],
        http_listeners=["h"],
        extra=[*metrics.lifecycle_families(2, 1, True), *metrics.worker_families(3, 4)],
    )
    families = parse_metrics(page)
    connections = families["l4gw_connections_total"]
    assert (connections.kind, connections.help) == ("counter", "Connections accepted, by outcome.")
    assert connections.samples['l4gw_connections_total{listener="h",outcome="proxied"}'] == 3
    assert connections.samples['l4gw_connections_total{listener="h",outcome="denied"}'] == 0
    assert (
        families["l4gw_request_duration_seconds"].samples[
            'l4gw_request_duration_seconds_count{listener="h"}'
        ]
        == 1
    )
    assert families["l4gw_draining"].samples == {"l4gw_draining": 1}
    assert families["l4gw_worker_restarts_total"].kind == "counter"
    assert list(cumulative_families(families)) == [
        "l4gw_connections_total",
        "l4gw_bytes_total",
        "l4gw_node_connect_failures_total",
        "l4gw_unauthorized_nodes_dropped_total",
        "l4gw_http_requests_total",
        "l4gw_request_duration_seconds",
        "l4gw_reloads_total",
        "l4gw_reload_failures_total",
        "l4gw_worker_restarts_total",
    ]


counts = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 10**12), max_size=3)


def page(kind: str, samples: dict[str, int]) -> dict[str, Family]:
    lines = [f"# HELP l4gw_x_total X.\n# TYPE l4gw_x_total {kind}\n"]
    lines += [f'l4gw_x_total{{listener="{k}"}} {v}\n' for k, v in samples.items()]
    lines += ["# HELP l4gw_workers W.\n# TYPE l4gw_workers gauge\nl4gw_workers 9\n"]
    return parse_metrics("".join(lines))


@given(st.lists(counts, max_size=4), counts, counts)
def test_a_merge_sums_the_workers_and_keeps_the_control_planes_own(
    workers: list[dict[str, int]], retired: dict[str, int], control: dict[str, int]
) -> None:
    merged = parse_metrics(
        merge_metrics(
            page("counter", control) | {"l4gw_workers": Family("l4gw_workers", "gauge", "W.", {})},
            [page("counter", w) for w in workers],
            cumulative_families(page("counter", retired)),
        )
    )
    expected: dict[str, int] = {}
    for samples in [*workers, retired]:
        for key, value in samples.items():
            name = f'l4gw_x_total{{listener="{key}"}}'
            expected[name] = expected.get(name, 0) + value
    assert merged["l4gw_x_total"].samples == expected
    assert merged["l4gw_x_total"].kind == "counter"
    assert merged["l4gw_workers"].samples == {}  # the control plane's, not 9 per worker


def test_add_families_creates_and_sums() -> None:
    target: dict[str, Family] = {}
    one = Family("l4gw_a", "counter", "A.", {"l4gw_a": 1})
    add_families(target, [one])
    add_families(target, [one])
    assert target == {"l4gw_a": Family("l4gw_a", "counter", "A.", {"l4gw_a": 2})}
    assert one.samples == {"l4gw_a": 1}
