"""``workers = N``: a control plane process and N worker processes (the data plane).

``l4gw run`` with ``[daemon] workers`` other than 1 runs ``ControlPlane``, which accepts no
traffic. In one trio process it runs

* the ``Supervisor`` (``l4gw.workers.supervisor``) of N workers: ``l4gw run -c FILE --worker-index I
  --control-fd FD --admin-socket PATH``, each a full ``Daemon`` binding every listener with
  SO_REUSEPORT (or taking the sockets systemd passed), so the kernel spreads connections;
* health checks and DNS discovery of every upstream, once for the whole daemon (not once per
  worker): the same ``serve_health`` and ``serve_discovery`` as a lone daemon runs;
* the public admin endpoint (``[daemon] admin``): ``/healthz`` from its own state (503 until
  every worker is ready, while no worker runs, and while draining), ``/status`` and
  ``/metrics`` for the whole daemon, merged from each worker's private admin endpoint (a Unix
  socket in a private temporary directory) and its own health state, ``/config`` its own.

Node state push (``l4gw.workers.channel``): each worker has one Unix stream socket pair to the
control plane. The control plane sends the node state (one JSON line) when it changes (looked
at every ``PUSH_POLL``), the full state every ``PUSH_FULL`` and at once when a worker starts or
answers READY=1. Workers run no discovery and no active probes
(``serve_health(probes=False)``); passive ejection stays local to each worker, from its own
connect failures. When the control plane goes away, a worker drains and exits.

Signals to the control plane: SIGHUP reloads its own copy of the file (a bad file is logged
and the old config stays) and is forwarded to every worker, which reloads the same file;
SIGTERM/SIGINT make ``/healthz`` answer 503 and are forwarded; the control plane exits once
every worker has (0 after a clean stop).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from .. import __version__
from ..core.config import Config
from ..core.config.files import config_as_dict
from ..core.errors import BindError
from ..core.health import find_monitor
from ..core.netaddr import SocketAddress
from ..core.runtime import ListenerStats
from ..core.upstream import UpstreamRuntime
from ..serve.admin import admin_table, serve_admin
from ..serve.listeners import bind_listener
from ..serve.metrics import (
    Family,
    add_families,
    cumulative_families,
    lifecycle_families,
    merge_metrics,
    parse_metrics,
    render_metrics,
    worker_families,
)
from ..serve.reloading import reconfigure_logging, reload_file, warn_start_only
from ..serve.statusdoc import listener_document, node_document, process_document, upstream_document
from ..serve.upstreams import UpstreamSet
from .channel import ControlEnd, encode_node_states
from .supervisor import FORWARDED_SIGNALS, Supervisor, WorkerHooks, WorkerSlot, worker_count

log = structlog.get_logger("l4gw.workers")

#: How often the control plane compares its node state with what it last pushed.
PUSH_POLL = 0.2
#: The full node state is pushed at least this often, changed or not.
PUSH_FULL = 5.0
#: Time limit of one request to a worker's private admin endpoint.
WORKER_FETCH_TIMEOUT = 2.0

# -- the worker's private admin endpoint ----------------------------------------------------


async def fetch_worker(path: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` from the admin endpoint at the Unix socket ``path`` (status, body)."""
    with trio.fail_after(WORKER_FETCH_TIMEOUT):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.0\r\nHost: l4gw-worker\r\n\r\n".encode())
            data = bytearray()
            while chunk := await stream.receive_some(1 << 16):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _sum_field(entries: Iterable[Mapping[str, Any]], key: str) -> int:
    return sum(int(entry.get(key) or 0) for entry in entries)


# -- the control plane ----------------------------------------------------------------------


class ControlPlane(WorkerHooks):
    """The main process of ``workers = N``; see the module docstring."""

    def __init__(
        self,
        config: Config,
        config_path: str | os.PathLike[str],
        *,
        inherited: Sequence[tuple[socket.socket, str | None]] = (),
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self.config_path = Path(os.path.abspath(config_path))
        self.python = python
        self.n = worker_count(config.daemon.workers)
        self.upstream_set = UpstreamSet()
        self.draining = False
        self.reloads = 0
        self.reload_failures = 0
        self.started_wall = time.time()
        self.admin_address: SocketAddress | None = None
        #: Private directory (mode 0700) of the workers' admin sockets, made by ``run``.
        self._dir = ""
        self._channels: dict[int, ControlEnd] = {}
        self._services: trio.Nursery | None = None
        #: slot index -> (pid, cumulative families of its last /metrics page).
        self._counters: dict[int, tuple[int, dict[str, Family]]] = {}
        #: Cumulative families of workers that exited, so sums never go backwards.
        self._retired: dict[str, Family] = {}
        self._pushed = b""
        self.supervisor = Supervisor(self._argv, self.n, inherited=inherited, hooks=self)

    # -- workers --------------------------------------------------------------------------

    def admin_socket(self, index: int) -> str:
        return os.path.join(self._dir, f"worker-{index}.sock")

    def _argv(self, index: int) -> list[str]:
        channel = self._channels[index]
        assert channel.child is not None
        return [
            self.python,
            "-m",
            "l4gw",
            "run",
            "-c",
            str(self.config_path),
            "--worker-index",
            str(index),
            "--control-fd",
            str(channel.child.fileno()),
            "--admin-socket",
            self.admin_socket(index),
        ]

    def pass_fds(self, slot: WorkerSlot) -> list[int]:
        self._close_channel(slot.index)
        channel = ControlEnd.open()
        self._channels[slot.index] = channel
        assert channel.child is not None
        return [channel.child.fileno()]

    def spawned(self, slot: WorkerSlot) -> None:
        channel = self._channels.get(slot.index)
        if channel is None:
            return
        channel.worker_started()  # the worker has its copy: EOF there once we are gone
        assert self._services is not None
        self._services.start_soon(channel.serve)
        channel.send(self._message())

    def ready(self, slot: WorkerSlot) -> None:
        channel = self._channels.get(slot.index)
        if channel is not None:
            channel.send(self._message())

    def exited(self, slot: WorkerSlot) -> None:
        self._close_channel(slot.index)
        cached = self._counters.pop(slot.index, None)
        if cached is not None:
            add_families(self._retired, cached[1].values())

    def signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            if not self.draining:
                self.reload()
        elif not self.draining:
            self.draining = True
            log.info("control_plane_draining", signal=signal.Signals(signum).name)

    def _close_channel(self, index: int) -> None:
        channel = self._channels.pop(index, None)
        if channel is not None:
            channel.close()

    def _message(self) -> bytes:
        return encode_node_states(self.upstreams)

    async def _push_loop(self) -> None:
        last_full = trio.current_time()
        while True:
            await trio.sleep(PUSH_POLL)
            message = self._message()
            now = trio.current_time()
            if message != self._pushed or now - last_full >= PUSH_FULL:
                self._pushed = message
                last_full = now
                for channel in self._channels.values():
                    channel.send(message)

    # -- upstreams (as in Daemon, without traffic) ----------------------------------------

    @property
    def upstreams(self) -> dict[str, UpstreamRuntime]:
        return self.upstream_set.runtimes

    # -- reload ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the file for the control plane's own part (upstreams, health, discovery,
        logging); the workers reload it themselves. True when the new config is in force."""
        return reload_file(self, self.config_path, fields={"role": "control"})

    def apply(self, new: Config) -> None:
        """Make ``new`` the control plane's config (raises nothing: it binds no listener)."""
        warn_start_only(self.config.daemon, new.daemon, ["admin", "workers"])
        reconfigure_logging(self.config.daemon, new.daemon)
        self.config = new
        self.upstream_set.apply(new)
        self.upstream_set.restart()

    # -- serving ------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT and the workers' exit; the exit status of ``l4gw run``.
        Raises ``BindError`` when the admin endpoint cannot be bound."""
        with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
            admin_sock = None
            if self.config.daemon.admin is not None:
                admin_sock = bind_listener("admin", self.config.daemon.admin)
                host, port = admin_sock.getsockname()[:2]
                self.admin_address = SocketAddress(host, port)
            try:
                self._dir = tempfile.mkdtemp(prefix="l4gw-workers-")
                async with trio.open_nursery() as services:
                    self._services = services
                    self.upstream_set.apply(self.config)
                    # As in Daemon.run: discovery reports started after its first lookup, so
                    # the first state a worker gets holds the nodes found.
                    await self.upstream_set.start(services)
                    if admin_sock is not None:
                        await services.start(serve_admin, admin_sock, admin_table(self))
                    self._pushed = self._message()
                    services.start_soon(self._push_loop)
                    log.info(
                        "control_plane_started",
                        version=__version__,
                        workers=self.n,
                        admin=str(self.admin_address) if self.admin_address else None,
                    )
                    status = await self.supervisor.run(signals=signals)
                    services.cancel_scope.cancel()
            finally:
                for index in list(self._channels):
                    self._close_channel(index)
                if admin_sock is not None and admin_sock.fileno() >= 0:
                    admin_sock.close()
                if self._dir:
                    shutil.rmtree(self._dir, ignore_errors=True)
        return status

    def health(self) -> tuple[bool, str]:
        """``/healthz``: (ok, reason)."""
        if self.draining:
            return False, "draining"
        if not self.supervisor.all_ready.is_set():
            return False, "starting"
        if not any(slot.running for slot in self.supervisor.slots):
            return False, "no worker running"
        return True, "ok"

    # -- the admin endpoint (served by ``admin.serve_admin``) ----------------------------

    def config_dict(self) -> dict[str, Any]:
        """``/config``: the control plane's copy of the running configuration."""
        return config_as_dict(self.config)

    async def _fetch_all(self, target: str) -> dict[int, tuple[int, bytes]]:
        """``target`` from every running worker: slot index -> (pid, body). A worker that
        does not answer (starting, hung, exiting) is left out."""
        results: dict[int, tuple[int, bytes]] = {}

        async def one(slot: WorkerSlot, pid: int) -> None:
            try:
                code, body = await fetch_worker(self.admin_socket(slot.index), target)
            except (
                OSError,
                trio.BrokenResourceError,
                trio.TooSlowError,
                ValueError,
                IndexError,
            ) as exc:
                log.debug("worker_admin_unreachable", worker=slot.index, error=repr(exc))
                return
            if code == 200 and slot.pid == pid:  # else it exited (or was replaced) meanwhile
                results[slot.index] = (pid, body)

        async with trio.open_nursery() as nursery:
            for slot in self.supervisor.slots:
                pid = slot.pid
                if pid is not None:
                    nursery.start_soon(one, slot, pid)
        return results

    async def status(self) -> dict[str, Any]:
        """The ``/status`` document of the whole daemon."""
        docs: dict[int, dict[str, Any]] = {}
        for index, (_, body) in (await self._fetch_all("/status")).items():
            with contextlib.suppress(ValueError):
                docs[index] = json.loads(body)
        now = trio.current_time()
        workers = []
        for slot in self.supervisor.slots:
            doc = docs.get(slot.index)
            listeners = doc.get("listeners", []) if doc else []
            workers.append(
                {
                    "index": slot.index,
                    "pid": slot.pid,
                    "state": slot.state if slot.running else "down",
                    "starts": slot.starts,
                    "uptime_seconds": round(now - slot.started_at, 3) if slot.running else None,
                    "reachable": doc is not None,
                    "reloads": doc.get("reloads") if doc else None,
                    "reload_failures": doc.get("reload_failures") if doc else None,
                    "active_connections": _sum_field(listeners, "active_connections"),
                    "connections_total": _sum_field(listeners, "connections_total"),
                    "capacity": doc.get("capacity") if doc else None,
                }
            )
        by_listener: dict[str, list[dict[str, Any]]] = {}
        by_node: dict[tuple[str, str], list[dict[str, Any]]] = {}
        by_upstream: dict[str, list[dict[str, Any]]] = {}
        for doc in docs.values():
            for item in doc.get("listeners", []):
                by_listener.setdefault(item["name"], []).append(item)
            for up in doc.get("upstreams", []):
                by_upstream.setdefault(up["name"], []).append(up)
                for node in up.get("nodes", []):
                    by_node.setdefault((up["name"], node["address"]), []).append(node)
        listeners = []
        for lc in self.config.listeners:
            entries = by_listener.get(lc.name, [])
            listeners.append(
                listener_document(
                    lc,
                    active=_sum_field(entries, "active_connections"),
                    total=_sum_field(entries, "connections_total"),
                )
            )
        return {
            **process_document(
                role="control",
                draining=self.draining,
                started_wall=self.started_wall,
                reloads=self.reloads,
                reload_failures=self.reload_failures,
            ),
            "worker_restarts": self.supervisor.restarts,
            "workers": workers,
            "listeners": listeners,
            "upstreams": [
                self._upstream_status(up, by_node, by_upstream.get(up.name, []))
                for up in self.upstreams.values()
            ],
        }

    def _upstream_status(
        self,
        up: UpstreamRuntime,
        by_node: dict[tuple[str, str], list[dict[str, Any]]],
        worker_ups: list[dict[str, Any]],
    ) -> dict[str, Any]:
        up.forget_retired()
        nodes = []
        for node in up.all_nodes():
            entries = by_node.pop((up.name, node.key), [])
            doc = node_document(
                node,
                active=_sum_field(entries, "active_connections"),
                total=_sum_field(entries, "connections_total"),
                failures=_sum_field(entries, "connect_failures"),
            )
            doc["ejected_workers"] = sum(1 for e in entries if e.get("health") == "ejected")
            nodes.append(doc)
        # Nodes that left here but still carry connections in some worker.
        for (up_name, address), entries in list(by_node.items()):
            if up_name != up.name:
                continue
            del by_node[(up_name, address)]
            nodes.append(
                {
                    **entries[0],
                    "active_connections": _sum_field(entries, "active_connections"),
                    "connections_total": _sum_field(entries, "connections_total"),
                    "connect_failures": _sum_field(entries, "connect_failures"),
                    "ejected_workers": sum(1 for e in entries if e.get("health") == "ejected"),
                }
            )
        monitor = find_monitor(up)
        health: dict[str, Any] | None = monitor.as_dict() if monitor is not None else None
        if health is not None:
            worker_health = [w["health"] for w in worker_ups if w.get("health")]
            for key in ("ejections_total", "ejections_refused_total"):
                health[key] = _sum_field(worker_health, key)
        return upstream_document(up, nodes, health)

    def _own_metrics(self) -> str:
        extra = lifecycle_families(self.reloads, self.reload_failures, self.draining)
        extra += self.upstream_set.metric_families()
        running = sum(1 for slot in self.supervisor.slots if slot.running)
        extra += worker_families(running, self.supervisor.restarts)
        for up in self.upstreams.values():
            up.forget_retired()
        return render_metrics(
            {lc.name: ListenerStats() for lc in self.config.listeners},
            self.upstreams.values(),
            http_listeners=[lc.name for lc in self.config.listeners if lc.mode == "http"],
            extra=extra,
        )

    async def metrics_text(self) -> str:
        """The ``/metrics`` page of the whole daemon (see ``merge_metrics``)."""
        pages = []
        for index, (pid, body) in (await self._fetch_all("/metrics")).items():
            page = parse_metrics(body.decode("utf-8", "replace"))
            pages.append(page)
            self._counters[index] = (pid, cumulative_families(page))
        return merge_metrics(parse_metrics(self._own_metrics()), pages, self._retired)


def run_control_plane(config: Config, path: str) -> int:
    """``l4gw run`` with ``workers`` other than 1: the control plane until it stops."""
    from ..serve import systemd

    inherited = systemd.listen_fds()
    try:
        plane = ControlPlane(config, path, inherited=inherited)
        return trio.run(plane.run)
    except BindError as exc:
        print(f"l4gw: {exc}", file=sys.stderr)
        return 1
    finally:
        for sock, _ in inherited:
            sock.close()
