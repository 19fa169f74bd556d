"""The daemon: the top nursery with listeners, admin, deadline sweeper, node pool, signals,
reload and drain.

Lifecycle of ``Daemon.run``:

1. bind every listener and the admin endpoint (``BindError`` before anything starts);
2. serve; ``SIGHUP`` reloads the file (a bad file is logged and the old config stays);
3. on ``SIGTERM``/``SIGINT``: stop accepting, ``/healthz`` answers 503, wait up to
   ``drain_timeout`` for connections to finish, close the rest; a second signal closes at once.

Ownership: the daemon creates the reactor, the splice pipe pool, the deadline sweeper
(``l4gw.l4.deadlines.Deadlines``, with the L4 ``IdleSweeper`` as one of its entries) and the http
node pool, runs their tasks in its connections nursery and hands them to the connection
handlers (``ConnectionContext``). Cancelling that nursery at the end of the drain stops them
all: the reactor aborts every handler still registered and the node pool closes its idle
connections.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from .. import __version__
from ..core import logs
from ..core.acl import SourceACL
from ..core.capacity import ConnectionBudget
from ..core.config import Config, ListenerConfig
from ..core.config.files import config_as_dict
from ..core.errors import BindError
from ..core.netaddr import SocketAddress
from ..core.ratelimit import RateLimiter
from ..core.runtime import ListenerRuntime, ListenerStats
from ..core.upstream import UpstreamRuntime
from ..http.pool import NodePool
from ..l4.deadlines import Deadlines
from ..l4.reactor import HAVE_REACTOR, Reactor
from ..l4.relay import IdleSweeper, PipePool
from . import systemd
from .admin import admin_table, serve_admin
from .listeners import (
    ConnectionContext,
    SpareDescriptor,
    bind_listener,
    bind_unix_listener,
    serve_listener,
)
from .metrics import (
    capacity_families,
    lifecycle_families,
    log_families,
    render_metrics,
    sweeper_families,
)
from .reloading import reconfigure_logging, reload_file, warn_start_only
from .statusdoc import local_listener_document, local_upstream_document, process_document
from .upstreams import UpstreamSet

log = structlog.get_logger("l4gw.daemon")


def open_file_limit() -> int | None:
    """This process's soft ``RLIMIT_NOFILE`` (None: unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


class _Listening:
    """A bound listener: its runtime, socket and the cancel scope of its accept loop."""

    def __init__(self, runtime: ListenerRuntime, sock: socket.socket) -> None:
        self.runtime = runtime
        self.sock = sock
        self.scope = trio.CancelScope()

    def close(self) -> None:
        self.scope.cancel()
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class Daemon:
    """One gateway process. Construct with a validated ``Config``; ``run`` serves until stopped.

    ``reuse_port`` sets SO_REUSEPORT on listeners (several worker processes per port);
    ``inherited`` maps listener addresses to sockets passed in by systemd.

    A worker process under ``workers = N`` (``l4gw.workers.control``) also sets ``admin_path`` (the
    admin endpoint on that Unix socket instead of ``[daemon] admin``), ``remote_health`` (no
    DNS discovery and no active probes here: the control plane pushes node sets and check
    verdicts; passive ejection stays local) and ``extra_services`` (each started as
    ``nursery.start(service, daemon)`` after the upstream tasks, before the listeners accept).
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | os.PathLike[str] | None = None,
        reuse_port: bool = False,
        inherited: Callable[[ListenerConfig], socket.socket | None] | None = None,
        on_ready: Callable[[Daemon], None] | None = None,
        admin_path: str | None = None,
        remote_health: bool = False,
        extra_services: Sequence[Callable[..., Awaitable[object]]] = (),
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.reuse_port = reuse_port
        self.inherited = inherited
        self.on_ready = on_ready
        self.admin_path = admin_path
        self.remote_health = remote_health
        self.extra_services = list(extra_services)
        self.started_wall = time.time()
        self.draining = False
        self.stats: dict[str, ListenerStats] = {}
        #: The process's connection count and its cap from the open-file limit (every
        #: listener's stats share it).
        self.budget = ConnectionBudget(open_file_limit())
        self.upstream_set = UpstreamSet(probes=not remote_health)
        self.listening: dict[str, _Listening] = {}
        self.pool = PipePool()
        #: The one deadline sweeper (L4 idle timeouts through ``sweeper``, http phases).
        self.deadlines = Deadlines()
        self.sweeper = IdleSweeper(self.deadlines)
        #: Idle keep-alive connections to http nodes.
        self.node_pool = NodePool()
        #: Runs the plain-TCP connections (created by ``run``; None where there is no epoll).
        self.reactor: Reactor | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.admin_address: SocketAddress | None = None
        self._stop = trio.Event()
        self._hard_stop = trio.Event()
        #: Set when no connection is left (the drain waits on it).
        self._idle = trio.Event()
        self._ctx: ConnectionContext | None = None
        self._services: trio.Nursery | None = None

    # -- building runtime state from config ---------------------------------------------

    @property
    def upstreams(self) -> dict[str, UpstreamRuntime]:
        return self.upstream_set.runtimes

    def _listener_runtime(self, lc: ListenerConfig, access_log: bool) -> ListenerRuntime:
        stats = self.stats.get(lc.name)
        if stats is None:
            stats = self.stats[lc.name] = ListenerStats(self.budget)
            stats.on_idle = self._check_idle
        return ListenerRuntime(
            config=lc,
            stats=stats,
            acl=SourceACL(lc.allow, lc.deny),
            rate_limiter=RateLimiter(lc.rate_limit, lc.rate_limit_burst),
            upstreams=self.upstreams,
            proxy_from=SourceACL(lc.proxy_protocol_from) if lc.proxy_protocol_from else None,
            access_log=access_log,
        )

    def _bind(self, lc: ListenerConfig) -> socket.socket:
        if self.inherited is not None:
            sock = self.inherited(lc)
            if sock is not None:
                sock.setblocking(False)
                log.info("listener_inherited", listener=lc.name, address=str(lc.listen))
                return sock
        return bind_listener(lc.name, lc.listen, reuse_port=self.reuse_port)

    def bind_all(self) -> None:
        """Bind every listener of the current config. Raises ``BindError`` (nothing left open)."""
        self.upstream_set.apply(self.config)
        bound: dict[str, _Listening] = {}
        try:
            for lc in self.config.listeners:
                runtime = self._listener_runtime(lc, self.config.daemon.access_log)
                bound[lc.name] = _Listening(runtime, self._bind(lc))
        except BindError:
            for item in bound.values():
                item.sock.close()
            raise
        self.listening = bound

    # -- serving ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until a stop signal (or ``stop()``) and the drain are over.

        Raises ``BindError`` when a listener or the admin endpoint cannot be bound.
        """
        admin_sock: socket.socket | None = None
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            if not self.listening:
                self.bind_all()
            admin = self.config.daemon.admin
            if admin is not None or self.admin_path is not None:
                try:
                    if self.admin_path is not None:
                        admin_sock = bind_unix_listener("admin", self.admin_path)
                    else:
                        assert admin is not None
                        admin_sock = bind_listener("admin", admin)
                except BindError:
                    for item in self.listening.values():
                        item.sock.close()
                    raise
                if admin_sock.family != socket.AF_UNIX:
                    host, port = admin_sock.getsockname()[:2]
                    self.admin_address = SocketAddress(host, port)
            spare = SpareDescriptor()
            try:
                async with trio.open_nursery() as services:
                    self._services = services
                    services.start_soon(self._handle_signals, signals)
                    if admin_sock is not None:
                        await services.start(serve_admin, admin_sock, admin_table(self))
                    async with trio.open_nursery() as connections:
                        if HAVE_REACTOR:
                            # Cancelled with this nursery at the end of the drain: it then
                            # closes every connection still open.
                            self.reactor = Reactor()
                            connections.start_soon(self.reactor.run)
                        # Both end with the drain too: the pool then closes its idle
                        # connections.
                        connections.start_soon(self.deadlines.run)
                        connections.start_soon(self.node_pool.run)
                        self._ctx = ConnectionContext(
                            connections,
                            self.pool,
                            self.sweeper,
                            self.reactor,
                            deadlines=self.deadlines,
                            node_pool=self.node_pool,
                            spare=spare,
                        )
                        # Discovery reports started after its first lookup, so the nodes it
                        # finds exist before the first connection is accepted.
                        await self.upstream_set.start(services)
                        for service in self.extra_services:
                            await services.start(service, self)
                        for item in self.listening.values():
                            self._start_accepting(item)
                        log.info(
                            "started",
                            version=__version__,
                            listeners={
                                n: str(i.runtime.config.listen) for n, i in self.listening.items()
                            },
                            admin=str(self.admin_address) if self.admin_address else None,
                        )
                        interval = systemd.watchdog_interval()
                        if interval is not None:
                            services.start_soon(systemd.serve_watchdog, interval)
                        task_status.started(self)
                        systemd.ready(self.summary())
                        if self.on_ready is not None:
                            self.on_ready(self)
                        await self._stop.wait()
                        await self._drain(connections)
                    services.cancel_scope.cancel()
            finally:
                for item in self.listening.values():
                    item.close()
                if admin_sock is not None and admin_sock.fileno() >= 0:
                    admin_sock.close()
                if self.reactor is not None:
                    self.reactor.close()
                self.pool.close()
                spare.close()
        log.info("stopped")

    def _start_accepting(self, item: _Listening) -> None:
        assert self._services is not None and self._ctx is not None
        ctx = self._ctx

        async def accept_loop() -> None:
            with item.scope:
                await serve_listener(item.runtime, item.sock, ctx)

        self._services.start_soon(accept_loop)

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.reload()
            elif self._stop.is_set():
                log.warning("stop_now", signal=signal.Signals(signum).name)
                self._hard_stop.set()
            else:
                systemd.stopping()
                log.info(
                    "stopping",
                    signal=signal.Signals(signum).name,
                    drain_timeout=self.config.daemon.drain_timeout,
                )
                self.stop()

    def stop(self) -> None:
        """Begin a graceful shutdown (as SIGTERM does)."""
        self._stop.set()

    def stop_now(self) -> None:
        """Close every connection at once (as a second SIGTERM does)."""
        self._stop.set()
        self._hard_stop.set()

    def active_connections(self) -> int:
        """Client connections under way on every listener (they all share ``budget``)."""
        return self.budget.active

    def _check_idle(self) -> None:
        """``on_idle`` of every listener's stats: one of them dropped to 0 connections (on
        the data path: only counts while draining)."""
        if self.draining and self.active_connections() == 0:
            self._idle.set()

    async def _drain(self, connections: trio.Nursery) -> None:
        """Stop accepting, wait (up to ``drain_timeout``, or until a second signal) until no
        connection is left, then cancel ``connections``: that closes whatever is left (the
        reactor's handlers, http tasks, idle pooled node connections)."""
        self.draining = True
        for item in self.listening.values():
            item.runtime.draining = True
            item.close()
        timeout = self.config.daemon.drain_timeout
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as waiter:

                async def hard() -> None:
                    await self._hard_stop.wait()
                    waiter.cancel_scope.cancel()

                waiter.start_soon(hard)
                self._idle = trio.Event()
                self._check_idle()
                await self._idle.wait()
                waiter.cancel_scope.cancel()
        left = self.active_connections()
        if left:
            log.warning("drain_cut", connections=left, timed_out=scope.cancelled_caught)
        connections.cancel_scope.cancel()

    # -- reload -------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply it; on any problem keep the running config.

        Returns True when the new config is in force.
        """
        if self.config_path is None:
            log.warning("reload_ignored", reason="no config file (embedded config)")
            return False
        systemd.reloading()
        try:
            return self._reload(self.config_path)
        finally:
            systemd.ready(self.summary())

    def _reload(self, path: Path) -> bool:
        return reload_file(
            self,
            path,
            summary=lambda new: {"listeners": len(new.listeners), "upstreams": len(new.upstreams)},
        )

    def apply(self, new: Config) -> None:
        """Make ``new`` the running configuration without cutting any connection.

        New listeners are bound first (``BindError`` leaves everything as it was); listeners
        that keep their name and address keep their socket, so no connection attempt is
        refused; removed listeners stop accepting while their connections run on.
        """
        old_daemon = self.config.daemon
        warn_start_only(old_daemon, new.daemon, ["admin"])
        fresh: dict[str, _Listening] = {}
        keep: dict[str, ListenerConfig] = {}
        try:
            for lc in new.listeners:
                current = self.listening.get(lc.name)
                if current is not None and current.runtime.config.listen == lc.listen:
                    keep[lc.name] = lc
                    continue
                moved = next(
                    (i for i in self.listening.values() if i.runtime.config.listen == lc.listen),
                    None,
                )
                if moved is not None:
                    raise BindError(
                        f"listener {lc.name}: {lc.listen} is still used by listener "
                        f"{moved.runtime.name}; rename in two reloads"
                    )
                fresh[lc.name] = _Listening(
                    self._listener_runtime(lc, new.daemon.access_log), self._bind(lc)
                )
        except BindError:
            for item in fresh.values():
                item.sock.close()
            raise
        reconfigure_logging(old_daemon, new.daemon)
        self.config = new
        self.upstream_set.apply(new)
        listening: dict[str, _Listening] = {}
        for name, item in self.listening.items():
            if name in keep:
                lc = keep[name]
                runtime = item.runtime
                runtime.acl = SourceACL(lc.allow, lc.deny)
                if (lc.rate_limit, lc.rate_limit_burst) != (
                    runtime.config.rate_limit,
                    runtime.config.rate_limit_burst,
                ):
                    # Same limits: the buckets (and what each source has used) carry over.
                    runtime.rate_limiter = RateLimiter(lc.rate_limit, lc.rate_limit_burst)
                runtime.proxy_from = (
                    SourceACL(lc.proxy_protocol_from) if lc.proxy_protocol_from else None
                )
                runtime.access_log = new.daemon.access_log
                runtime.upstreams = self.upstreams
                runtime.config = lc
                listening[name] = item
            else:
                # Removed: stop accepting; http keep-alive connections end after their current
                # response (as when the daemon drains); tcp relays get drain_timeout (below).
                item.runtime.draining = True
                item.close()
        for name, item in fresh.items():
            listening[name] = item
            if self._ctx is not None:
                self._start_accepting(item)
        self.listening = listening
        self.upstream_set.restart()
        # Connections to removed nodes or on removed listeners get drain_timeout to finish.
        names = set(listening)
        draining = self.sweeper.drain_removed(
            lambda relay: (
                relay.listener not in names
                or (relay.node_state is not None and not relay.node_state.in_service)
            ),
            trio.current_time() + new.daemon.drain_timeout,
        )
        if draining:
            log.info(
                "reload_draining", connections=draining, drain_timeout=new.daemon.drain_timeout
            )

    # -- visibility ---------------------------------------------------------------------

    def summary(self) -> str:
        """One line for systemd's STATUS=: listeners, nodes up, connections."""
        nodes = [node for up in self.upstreams.values() for node in up.nodes]
        up_count = sum(1 for node in nodes if node.healthy and node.weight > 0)
        return (
            f"{len(self.listening)} listener(s), {up_count}/{len(nodes)} node(s) up, "
            f"{self.active_connections()} connection(s)"
        )

    def health(self) -> tuple[bool, str]:
        """``/healthz``: ok until the drain begins."""
        return (False, "draining") if self.draining else (True, "ok")

    def config_dict(self) -> dict[str, Any]:
        """``/config``: the running configuration."""
        return config_as_dict(self.config)

    async def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        return {
            **process_document(
                role=None,
                draining=self.draining,
                started_wall=self.started_wall,
                reloads=self.reloads,
                reload_failures=self.reload_failures,
            ),
            "capacity": self.budget.document(),
            "listeners": [local_listener_document(i.runtime) for i in self.listening.values()],
            "upstreams": [local_upstream_document(up) for up in self.upstreams.values()],
        }

    async def metrics_text(self) -> str:
        """The ``/metrics`` page."""
        for up in self.upstreams.values():
            up.forget_retired()
        return render_metrics(
            self.stats,
            self.upstreams.values(),
            http_listeners=[
                i.runtime.name for i in self.listening.values() if i.runtime.config.mode == "http"
            ],
            extra=[
                *lifecycle_families(self.reloads, self.reload_failures, self.draining),
                *sweeper_families(self.sweeper.closed_drained, self.sweeper.closed_idle),
                *capacity_families(self.budget.limit),
                *log_families(logs.dropped_lines()),
                *self.upstream_set.metric_families(),
            ],
        )
