"""One client connection of an http listener, as both drivers see it: who the client is, the
bytes it moved, the node pool and route table it uses, its :class:`~l4gw.http.exchange.Exchange`,
and its access lines and request metrics.

The trio task (:mod:`l4gw.http.proxy`) subclasses :class:`HttpConn` with its own state; the
reactor's :class:`~l4gw.http.fastpath.FastConnection` is handed the same object while it
serves the connection. Neither driver imports the other's internals.
"""

from __future__ import annotations

import weakref

import trio

from ..core import logs
from ..core.runtime import ListenerRuntime
from ..core.upstream import UpstreamRuntime
from ..l4.deadlines import Deadlines
from .exchange import Exchange
from .pool import NodePool
from .responses import Record
from .routes import RouteTable, route_table

__all__ = ["HttpConn"]


class HttpConn:
    """Identity, accounting and shared state of one client connection.

    ``deadline``/``phase`` (read by the timeout sweeper) are the exchange's; the sweeper
    calls :meth:`expire`, which a driver overrides.
    """

    __slots__ = (
        "__weakref__",
        "bytes_in",
        "bytes_out",
        "client",
        "client_ip",
        "client_key",
        "client_text",
        "config",
        "counted_in",
        "counted_out",
        "deadlines",
        "exchange",
        "listener",
        "pool",
        "table",
        "tls",
    )

    def __init__(
        self,
        listener: ListenerRuntime,
        client: tuple[str, int],
        tls: bool,
        pool: NodePool,
        deadlines: Deadlines,
    ) -> None:
        self.listener = listener
        self.client = client
        self.client_ip = client[0]
        self.client_key = client[0].encode()
        self.client_text = f"{client[0]}:{client[1]}"  # as on the tcp access lines
        #: The listener terminated TLS (``X-Forwarded-Proto: https``).
        self.tls = tls
        self.bytes_in = 0
        self.bytes_out = 0
        self.counted_in = 0
        self.counted_out = 0
        self.config: object = None
        self.table: RouteTable | None = None
        #: The daemon's node pool and deadline sweeper.
        self.pool = pool
        self.deadlines = deadlines
        # The exchange refers to its connection weakly: no reference cycle, so everything a
        # connection holds (sockets, TLS objects, h11 state) is freed as soon as it ends, not
        # by a later cyclic garbage collection.
        self.exchange = Exchange(weakref.proxy(self), trio.current_time())

    # -- what the timeout sweeper reads ---------------------------------------------------

    @property
    def deadline(self) -> float:
        return self.exchange.deadline

    @property
    def phase(self) -> int:
        return self.exchange.phase

    def expire(self) -> None:
        """The deadline of the exchange's phase has passed (the driver answers)."""
        raise NotImplementedError

    def request_body_done(self) -> bool:
        """Whether the current request's body has been read in full (a driver that reads
        bodies in parts overrides this)."""
        return True

    def watch_upstream(self, upstream: UpstreamRuntime) -> None:
        """Make sure the sweeper checks often enough for ``upstream``'s timeouts."""
        sweeper = self.deadlines
        sweeper.need(upstream.config.response_timeout)
        sweeper.need(upstream.config.idle_timeout)

    # -- routing --------------------------------------------------------------------------

    def route_table(self) -> RouteTable:
        """The compiled routes of the listener's current configuration (after a reload, the
        next request uses the new ones)."""
        config = self.listener.config
        if config is not self.config or self.table is None:
            self.table = route_table(config)
            self.config = config
        return self.table

    # -- accounting -----------------------------------------------------------------------

    def log_request(self, record: Record) -> None:
        """Count ``record`` in the listener's request metrics and write its access line
        (with the bytes moved since the last line)."""
        record.logged = True
        listener = self.listener
        stats = listener.stats
        key = (record.route, record.status)
        requests = stats.requests
        requests[key] = requests.get(key, 0) + 1
        elapsed = trio.current_time() - record.started
        stats.durations.observe(elapsed)
        bytes_in = self.bytes_in - self.counted_in
        bytes_out = self.bytes_out - self.counted_out
        self.counted_in = self.bytes_in
        self.counted_out = self.bytes_out
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        if listener.access_log:
            logs.access.info(
                "request",
                listener=listener.config.name,
                client=self.client_text,
                node=record.node,
                method=record.method,
                path=record.path,
                upstream_path=record.upstream_path,
                host=record.host,
                route=record.route,
                status=record.status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                duration_ms=round(elapsed * 1000, 3),
                **({"reason": record.reason} if record.reason else {}),
            )

    def log_unlogged(self, record: Record) -> None:
        """Log ``record`` at the end of an exchange, unless it was logged or no request was
        under way (no method read, no answer given)."""
        if not record.logged and (record.method is not None or record.status):
            self.log_request(record)

    def count_bytes(self) -> None:
        """Add the bytes not counted by an access line yet to the listener's totals."""
        stats = self.listener.stats
        stats.bytes_in += self.bytes_in - self.counted_in
        stats.bytes_out += self.bytes_out - self.counted_out
        self.counted_in = self.bytes_in
        self.counted_out = self.bytes_out
