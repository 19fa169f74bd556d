"""Active health checks and passive ejection of backend nodes.

Two layers, as with h11 and its trio adapter; this module is the first:

- ``HealthMonitor`` is the state machine of one upstream: rise/fall counting of active check
  results, passive ejection on consecutive connect failures, ejection timers and the probe
  schedule. It does no I/O and never imports a clock: time comes from the ``clock`` callable it
  is given (``trio.current_time`` in the daemon, so tests run it under ``MockClock``).
- ``l4gw.serve.healthchecks.serve_health`` drives one monitor with trio: it runs the probes
  (``run_check``), wakes up for ejection timers, and registers the monitor as a passive
  observer on ``upstream.observers``.

Per-node health state lives on ``NodeState`` (``check_up``, ``ejected_until``, ...), so it
survives a reload or a DNS refresh that keeps the node, and ``node_status`` can show it.
The behaviour is documented for operators in ``docs/health.md``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Literal

import attrs
import structlog

from .config import HealthConfig
from .nodes import NodeState
from .upstream import UpstreamRuntime

__all__ = [
    "CheckResult",
    "HealthMonitor",
    "HealthState",
    "find_monitor",
    "health_state",
    "node_status",
    "nodes_changed",
]

log = structlog.get_logger("l4gw.health")

HealthState = Literal["up", "down", "ejected"]

#: Later probes of a node start ``interval * (1 ± PROBE_JITTER)`` after the previous one
#: started, so probes from several l4gw instances (or many nodes) do not fall into step.
PROBE_JITTER = 0.1
#: A node that waits for its first check before taking traffic (found by DNS while checks are
#: configured) is probed within this many seconds (or ``interval`` if shorter).
PENDING_PROBE_SPREAD = 1.0
#: ``serve_health`` looks at the upstream's node list and configuration at least this often,
#: to notice a reload even when no probe or ejection timer is due.
POLL_INTERVAL = 1.0
#: Largest HTTP response head an http check reads (h11's default limit, as for clients).
MAX_RESPONSE_HEAD = 16 * 1024
USER_AGENT = "l4gw-health-check"


def health_state(node: NodeState) -> HealthState:
    """The node's health as the checks see it: "down" (active checks failing) wins over
    "ejected" (passive, temporary), otherwise "up"."""
    if not node.check_up:
        return "down"
    if node.ejected_until is not None:
        return "ejected"
    return "up"


def node_status(node: NodeState) -> dict[str, object]:
    """Health fields of one node for ``/status`` (merge them into the node's entry).

    ``state`` is ``health`` unless the node is drained (weight 0) or left the node set
    (not in service), which shows as "draining". Times are wall clock epoch seconds.
    """
    health = health_state(node)
    state: str = health
    if not node.in_service or node.weight <= 0:
        state = "draining"
    return {
        "state": state,
        "health": health,
        "healthy": node.healthy,
        "reason": node.health_reason or None,
        "since": node.health_since,
        "last_check": node.last_check or None,
        "last_check_at": node.last_check_at or None,
        "consecutive_check_failures": node.check_failures,
        "consecutive_connect_failures": node.passive_failures,
        "ejections": node.ejections,
    }


@attrs.frozen
class CheckResult:
    """One active check: pass or fail, and what was seen ("status 200", "connect refused")."""

    ok: bool
    reason: str


def max_ejectable(nodes: int, percent: int) -> int:
    """How many of ``nodes`` may be ejected at once: ``percent`` of them rounded down, but
    at least one (as Envoy: the first outlier is always ejected); 0 percent ejects none."""
    if percent <= 0 or nodes <= 0:
        return 0
    return max(1, nodes * percent // 100)


class HealthMonitor:
    """The health state machine of one upstream. No I/O; ``clock`` gives the time.

    Fed by three things:

    - ``check_done(node, result, started)``: the result of an active check;
    - ``connect_failed`` / ``connect_succeeded`` (the ``NodeObserver`` protocol): connect
      results on live traffic, for passive ejection;
    - ``expire_ejections()``: called when ``next_deadline()`` has passed.

    ``track(nodes)`` tells it the upstream's current node list (new nodes get their initial
    state and a first probe time; removed nodes are forgotten), ``due()`` hands out the nodes
    whose probe should start now, ``reconfigure(config)`` takes a reloaded ``HealthConfig``.
    ``wakeup`` is called whenever a timer earlier than the last ``next_deadline()`` may have
    been armed, so a driver sleeping until that deadline can recompute it.

    ``probes=False`` (a worker process under ``workers = N``): no active probe is ever due and
    ``check_up`` is never touched here; the control plane probes and pushes its verdicts
    (``l4gw.workers.control``). Passive ejection and its timers work as usual.

    Every change of ``health_state(node)`` sets ``node.healthy`` (what the balancer reads),
    ``node.health_reason`` and ``node.health_since`` and logs ``node_health``.
    """

    def __init__(
        self,
        upstream: str,
        config: HealthConfig,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        jitter: float = PROBE_JITTER,
        probes: bool = True,
    ) -> None:
        self.upstream = upstream
        self.config = config
        self.probes = probes
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng if rng is not None else random.Random()
        self.jitter = jitter
        self.wakeup: Callable[[], None] = _nothing
        #: Tracked nodes -> when their next probe starts (inf: no active check, or in flight).
        self._next_probe: dict[NodeState, float] = {}
        self._in_flight: set[NodeState] = set()
        #: Counters for metrics and /status.
        self.checks_total = 0
        self.checks_failed_total = 0
        self.ejections_total = 0
        #: Ejections not made because ``max_ejected_percent`` of the nodes were out already.
        self.ejections_refused_total = 0

    def as_dict(self) -> dict[str, object]:
        """Counters for /status and metrics."""
        return {
            "checks_total": self.checks_total,
            "checks_failed_total": self.checks_failed_total,
            "ejections_total": self.ejections_total,
            "ejections_refused_total": self.ejections_refused_total,
        }

    @property
    def active(self) -> bool:
        """Whether active checks are configured."""
        return self.config.check != "none"

    # -- node set and configuration ----------------------------------------------------

    def track(self, nodes: Iterable[NodeState]) -> None:
        """Take the upstream's current node list (call it whenever it may have changed)."""
        current = set()
        armed = False
        for node in nodes:
            current.add(node)
            if node not in self._next_probe:
                self._start_tracking(node)
                armed = True
        for node in [node for node in self._next_probe if node not in current]:
            del self._next_probe[node]
            self._in_flight.discard(node)
        if armed:
            self.wakeup()

    def _start_tracking(self, node: NodeState) -> None:
        now = self.clock()
        if not self.probes:
            # check_up belongs to the control plane; only ejection is decided here.
            if not node.health_reason:
                node.health_reason = "checked by the control plane"
                node.health_since = self.wall_clock()
            node.healthy = health_state(node) == "up"
            self._next_probe[node] = math.inf
            return
        if not node.health_reason:
            # First seen by any monitor: choose the initial state (docs/health.md).
            if self.active and node.source == "dns":
                before = health_state(node)
                node.check_up = False
                self._settle(node, before, "pending first check")
            else:
                node.health_reason = (
                    "up until the first check" if self.active else "no active check"
                )
                node.health_since = self.wall_clock()
                node.healthy = health_state(node) == "up"
        elif not self.active and not node.check_up:
            # Held down by an earlier monitor whose checks are gone now.
            before = health_state(node)
            node.check_up = True
            node.check_passes = node.check_failures = 0
            self._settle(node, before, "active checks turned off")
        if not self.active:
            self._next_probe[node] = math.inf
        elif not node.check_up and not node.check_passes and not node.check_failures:
            spread = min(self.config.interval, PENDING_PROBE_SPREAD)
            self._next_probe[node] = now + self.rng.random() * spread
        else:
            self._next_probe[node] = now + self.rng.random() * self.config.interval

    def reconfigure(self, config: HealthConfig) -> None:
        """Take a reloaded configuration. A change of what is checked (``check``, ``path``,
        ``expect``) clears the check history, so the next result decides; checks turned off
        bring every node that they held down back up."""
        old, self.config = self.config, config
        if config == old or not self.probes:
            return
        what_changed = _check_key(old) != _check_key(config)
        if not what_changed and old.interval == config.interval:
            return
        for node in self._next_probe:
            if what_changed:
                node.check_passes = node.check_failures = 0
                before = health_state(node)
                if not self.active:
                    node.check_up = True
                    self._settle(node, before, "active checks turned off")
                elif before == "up":
                    node.health_reason = "up until the first check"
            if node in self._in_flight:
                continue
            if self.active:
                self._next_probe[node] = self.clock() + self.rng.random() * config.interval
            else:
                self._next_probe[node] = math.inf
        self.wakeup()

    # -- active checks ------------------------------------------------------------------

    def due(self) -> list[NodeState]:
        """The nodes whose probe should start now; they count as in flight until
        ``check_done`` (or until they leave the node set)."""
        if not self.active or not self.probes:
            return []
        now = self.clock()
        ready = [node for node, at in self._next_probe.items() if at <= now]
        for node in ready:
            self._next_probe[node] = math.inf
            self._in_flight.add(node)
        return ready

    def check_done(self, node: NodeState, result: CheckResult, started: float) -> None:
        """Record an active check of ``node`` that started at ``started`` (clock time)."""
        if node not in self._next_probe:
            return  # left the node set while it was probed
        self._in_flight.discard(node)
        now = self.clock()
        config = self.config
        if not self.active:
            return  # checks turned off while this one ran
        spread = 1.0 + self.jitter * (2.0 * self.rng.random() - 1.0)
        self._next_probe[node] = max(started + config.interval * spread, now)
        self.wakeup()

        self.checks_total += 1
        node.last_check = result.reason
        node.last_check_at = self.wall_clock()
        before = health_state(node)
        first = node.check_passes == 0 and node.check_failures == 0
        if result.ok:
            node.check_failures = 0
            node.check_passes += 1
            if first:
                reason = f"first check passed: {result.reason}"
            else:
                reason = f"{node.check_passes} consecutive checks passed: {result.reason}"
            if not node.check_up and (first or node.check_passes >= config.healthy_threshold):
                node.check_up = True
            if node.ejected_until is not None and started >= node.ejected_at:
                # Envoy's successful_active_health_check_uneject_host: a check that started
                # after the ejection and passed ends it early.
                self._rejoin(node, now)
                reason = f"check passed while ejected: {result.reason}"
        else:
            self.checks_failed_total += 1
            node.check_passes = 0
            node.check_failures += 1
            if first:
                reason = f"first check failed: {result.reason}"
            else:
                reason = f"{node.check_failures} consecutive checks failed: {result.reason}"
            if node.check_up and (first or node.check_failures >= config.unhealthy_threshold):
                node.check_up = False
        self._settle(node, before, reason)

    # -- passive ejection (NodeObserver) --------------------------------------------------

    def connect_failed(self, upstream: UpstreamRuntime, node: NodeState) -> None:
        config = self.config
        if config.passive_failures <= 0 or not node.healthy:
            # Off, or the node is out already (it only gets traffic when fail_open applies).
            return
        node.passive_failures += 1
        if node.passive_failures < config.passive_failures:
            return
        nodes = upstream.nodes
        ejected = sum(1 for n in nodes if n.ejected_until is not None)
        if ejected >= max_ejectable(len(nodes), config.max_ejected_percent):
            self.ejections_refused_total += 1
            if node.passive_failures == config.passive_failures:
                log.warning(
                    "ejection_refused",
                    upstream=self.upstream,
                    node=node.key,
                    ejected=ejected,
                    nodes=len(nodes),
                    max_ejected_percent=config.max_ejected_percent,
                )
            return
        if node not in self._next_probe and node in nodes:
            self._start_tracking(node)
        now = self.clock()
        before = health_state(node)
        failures = node.passive_failures
        node.ejections = self.ejection_multiplier(node, now)
        duration = min(config.ejection_time * node.ejections, config.max_ejection_time)
        node.ejected_at = now
        node.ejected_until = now + duration
        node.passive_failures = 0
        self.ejections_total += 1
        self._settle(
            node, before, f"{failures} consecutive connect failures: ejected for {duration:g}s"
        )
        self.wakeup()

    def connect_succeeded(self, upstream: UpstreamRuntime, node: NodeState) -> None:
        node.passive_failures = 0

    def ejection_multiplier(self, node: NodeState, now: float) -> int:
        """The ``n`` of the next ejection of ``node`` (duration ``ejection_time * n``).

        ``n`` is one more than the ejections in a row so far, where each full
        ``ejection_time`` the node has spent back in service since its last ejection takes
        one off; it stops growing once ``ejection_time * n`` reaches ``max_ejection_time``.
        """
        config = self.config
        previous = node.ejections
        if previous and node.ejected_until is None:
            previous = max(0, previous - int((now - node.rejoined_at) // config.ejection_time))
        cap = max(1, math.ceil(config.max_ejection_time / config.ejection_time))
        return min(previous + 1, cap)

    def expire_ejections(self) -> None:
        """End the ejections whose time is up."""
        now = self.clock()
        for node in self._next_probe:
            until = node.ejected_until
            if until is not None and until <= now:
                before = health_state(node)
                self._rejoin(node, now)
                self._settle(node, before, f"ejection over after {until - node.ejected_at:g}s")

    def next_deadline(self) -> float:
        """When the next probe or ejection end is due (clock time; inf if none)."""
        deadline = math.inf
        for node, at in self._next_probe.items():
            deadline = min(deadline, at)
            if node.ejected_until is not None:
                deadline = min(deadline, node.ejected_until)
        return deadline

    # -- internals ----------------------------------------------------------------------

    def _rejoin(self, node: NodeState, now: float) -> None:
        node.ejected_until = None
        node.rejoined_at = now
        node.passive_failures = 0

    def _settle(self, node: NodeState, before: HealthState, reason: str) -> None:
        after = health_state(node)
        node.healthy = after == "up"
        if after == before and node.health_reason:
            return
        node.health_reason = reason
        node.health_since = self.wall_clock()
        if after == before:
            return
        (log.info if node.healthy else log.warning)(
            "node_health",
            upstream=self.upstream,
            node=node.key,
            healthy=node.healthy,
            state=after,
            previous=before,
            reason=reason,
        )


def _check_key(config: HealthConfig) -> tuple[object, ...]:
    """What a check checks: a change of it starts the check history afresh."""
    return (config.check, config.path, config.expect)


def _nothing() -> None:
    pass


def find_monitor(upstream: UpstreamRuntime) -> HealthMonitor | None:
    """The monitor ``serve_health`` registered on ``upstream``, if it runs."""
    for observer in upstream.observers:
        if isinstance(observer, HealthMonitor):
            return observer
    return None


def nodes_changed(upstream: UpstreamRuntime) -> None:
    """Tell the health monitor of ``upstream`` (if one runs) that its node list changed.

    Called right after ``set_discovered`` (and usable after a reload's ``apply``), in the same
    trio step, so a new node gets its initial state before any connection can pick it.
    Without this call the monitor notices within ``POLL_INTERVAL``.
    """
    monitor = find_monitor(upstream)
    if monitor is not None:
        monitor.track(upstream.nodes)
