"""The upstreams of one process and their background tasks, kept in step with the config.

Used by the single-process daemon, by the workers' control plane and by each worker: one
``UpstreamRuntime`` per upstream name (kept across reloads, so node health and counters
survive), and per upstream a health task (active probes and passive ejection) and, when
configured, a DNS discovery task — each under a cancel scope that a reload can end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from ..core.acl import BackendAuthorization
from ..core.config import Config
from ..core.health import find_monitor, nodes_changed
from ..core.upstream import UpstreamRuntime
from .discovery import discovery_stats, serve_discovery
from .healthchecks import serve_health
from .metrics import DISCOVERY_COUNTERS, HEALTH_COUNTERS, Metric, MetricFamily, Sample

Service = Callable[..., Awaitable[object]]


class UpstreamSet:
    """Upstream runtimes by name, and their health and discovery tasks.

    ``probes=False`` is for worker processes: the control plane runs the active checks and
    discovery once for all workers and pushes the results, so a worker runs passive ejection
    only.
    """

    def __init__(self, *, probes: bool = True) -> None:
        self.probes = probes
        #: Replaced (not mutated) by ``apply``, so a reader's dict never changes under it.
        self.runtimes: dict[str, UpstreamRuntime] = {}
        self._tasks: dict[tuple[str, str], trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    def apply(self, config: Config) -> None:
        """Take the upstreams of ``config``: existing names keep their runtime (and nodes),
        new names get one, removed names are dropped and their nodes taken out of service."""
        authorization = BackendAuthorization(config.authorize)
        runtimes = dict(self.runtimes)
        for name, up_config in config.upstreams.items():
            existing = runtimes.get(name)
            if existing is None:
                runtimes[name] = UpstreamRuntime(up_config, authorization)
            else:
                existing.apply(up_config, authorization)
        for name in [name for name in runtimes if name not in config.upstreams]:
            for node in runtimes[name].nodes:
                node.in_service = False
            del runtimes[name]
        self.runtimes = runtimes

    def services(self, up: UpstreamRuntime) -> list[tuple[str, Service]]:
        """The tasks ``up`` needs: discovery when configured (and probing), then health."""
        if not self.probes:
            return [("health", partial(serve_health, probes=False))]
        services: list[tuple[str, Service]] = [("health", serve_health)]
        if up.config.discovery is not None:
            services.insert(0, ("discovery", serve_discovery))
        return services

    async def start(self, nursery: trio.Nursery) -> None:
        """Start every upstream's tasks in ``nursery``. Discovery reports started after its
        first lookup, so the nodes it finds exist when this returns."""
        self._nursery = nursery
        for up in self.runtimes.values():
            for kind, serve in self.services(up):
                await nursery.start(self._run, up, kind, serve)

    def restart(self) -> None:
        """After ``apply`` on a reload: stop the tasks of removed upstreams (and discovery
        that was removed), start those that are missing, recheck changed node sets."""
        if self._nursery is None:
            return
        for (name, kind), scope in list(self._tasks.items()):
            up = self.runtimes.get(name)
            if up is None or (kind == "discovery" and up.config.discovery is None):
                scope.cancel()
                del self._tasks[(name, kind)]
        for up in self.runtimes.values():
            for kind, serve in self.services(up):
                if (up.name, kind) not in self._tasks:
                    self._nursery.start_soon(self._run, up, kind, serve)
            nodes_changed(up)

    def metric_families(self) -> list[MetricFamily]:
        """Counter families of the health monitors and DNS discovery, one sample per
        upstream (for ``/metrics``)."""
        families: list[MetricFamily] = []
        sources: list[tuple[Callable[[UpstreamRuntime], Any], dict[str, Metric]]] = [
            (find_monitor, HEALTH_COUNTERS),
            (discovery_stats, DISCOVERY_COUNTERS),
        ]
        for find, counters in sources:
            found = [(up.name, find(up)) for up in self.runtimes.values()]
            for key, metric in counters.items():
                samples: list[Sample] = [
                    ({"upstream": up_name}, obj.as_dict()[key])
                    for up_name, obj in found
                    if obj is not None
                ]
                families.append(metric.family(samples))
        return families

    async def _run(
        self,
        up: UpstreamRuntime,
        kind: str,
        serve: Service,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one task of ``up`` under a scope that ``restart`` can cancel."""
        key = (up.name, kind)
        scope = trio.CancelScope()
        self._tasks[key] = scope
        try:
            with scope:
                await serve(up, task_status=task_status)
        finally:
            if self._tasks.get(key) is scope:
                del self._tasks[key]
