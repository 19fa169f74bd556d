"""One accepted client connection: who owns its socket, and the one place it is counted and
logged when it ends.

Every connection a listener admits becomes a :class:`ClientConnection`. Whatever serves it
(a relay in the reactor, a connection task, the http handler) ends it through
:meth:`ClientConnection.finish`, which is the only code that takes a connection out of the
listener's ``active`` count, counts its outcome and bytes, releases its node lease and writes
its access line. Connections refused at accept are never counted as active:
:func:`refuse_connection` counts and logs them.
"""

from __future__ import annotations

import socket
import struct

import trio

from ..core import logs
from ..core.nodes import NodeState
from ..core.runtime import ListenerRuntime
from ..core.upstream import NodeLease

__all__ = ["ClientConnection", "log_connection", "refuse_connection"]

_LINGER_RESET = struct.pack("ii", 1, 0)


def log_connection(
    listener: ListenerRuntime,
    client: tuple[str, int],
    node: NodeState | None,
    bytes_in: int,
    bytes_out: int,
    started: float,
    outcome: str,
    reason: str = "",
) -> None:
    """The access line of one TCP connection (SPEC fields), if access logging is on."""
    if not listener.access_log:
        return
    logs.access.info(
        "connection",
        listener=listener.config.name,
        client=f"{client[0]}:{client[1]}",
        node=node.key if node is not None else None,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        duration_ms=round((trio.current_time() - started) * 1000, 3),
        outcome=outcome,
        **({"reason": reason} if reason else {}),
    )


def reset(sock: socket.socket) -> None:
    """Close ``sock`` at once with a reset (no TIME_WAIT is left here)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def refuse_connection(
    listener: ListenerRuntime,
    sock: socket.socket,
    client: tuple[str, int],
    started: float,
    outcome: str,
) -> None:
    """A connection refused at accept (``denied``, ``rate_limited``, ``max_connections``):
    reset it, count the outcome, write the access line. It was never counted as active."""
    reset(sock)
    outcomes = listener.stats.outcomes
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    log_connection(listener, client, None, 0, 0, started, outcome)


class ClientConnection:
    """One admitted client connection, from accept to close (see the module docstring).

    Resource handling: owns ``sock`` until :meth:`hand_over` gives it to whatever closes it
    from then on (a relay, a stream); :meth:`close` closes it while it is still owned here.
    Whoever serves the connection calls :meth:`finish` once it ends (later calls do
    nothing); :meth:`hand_over` with ``finishes=True`` passes that duty on too (a relay
    finishes the connection from its ``on_finish``).
    """

    __slots__ = (
        "client",
        "destination",
        "early",
        "finish_handed",
        "finished",
        "lease",
        "listener",
        "sock",
        "started",
    )

    def __init__(
        self,
        listener: ListenerRuntime,
        sock: socket.socket,
        client: tuple[str, int],
        started: float,
    ) -> None:
        self.listener = listener
        self.sock: socket.socket | None = sock
        #: The client's address: the peer's, or the one an accepted PROXY header carries.
        self.client = client
        self.started = started
        #: The original destination an accepted PROXY header carries (None: this listener).
        self.destination: tuple[str, int] | None = None
        #: Bytes read from the client before the relay started (after a PROXY header).
        self.early = b""
        #: The lease of the node connection that serves it (released by ``finish``).
        self.lease: NodeLease | None = None
        self.finished = False
        self.finish_handed = False
        stats = listener.stats
        stats.active += 1
        stats.budget.active += 1

    def hand_over(self, *, finishes: bool) -> socket.socket:
        """Give the socket to its next owner, who closes it (and, with ``finishes``, calls
        :meth:`finish` when the connection ends)."""
        sock = self.sock
        assert sock is not None, "handed over twice"
        self.sock = None
        self.finish_handed = finishes
        return sock

    def close(self, *, reset_it: bool = False) -> None:
        """Close the socket if it is still owned here (with a reset if ``reset_it``)."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        if reset_it:
            reset(sock)
        else:
            sock.close()

    def finish(
        self,
        outcome: str,
        *,
        bytes_in: int = 0,
        bytes_out: int = 0,
        reason: str = "",
        log: bool = True,
    ) -> None:
        """The connection has ended with ``outcome`` (``l4gw_connections_total``): leave the
        listener's ``active`` count, count the bytes relayed, release the node lease, and
        write the access line (unless ``log`` is False: http connections log per request).
        The line's ``bytes_in`` includes the bytes read ahead (``early``)."""
        if self.finished:
            return
        self.finished = True
        listener = self.listener
        stats = listener.stats
        stats.connection_ended()
        outcomes = stats.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        node: NodeState | None = None
        lease = self.lease
        if lease is not None:
            self.lease = None
            node = lease.node
            lease.release()
        if log and listener.access_log:
            log_connection(
                listener,
                self.client,
                node,
                bytes_in + len(self.early),
                bytes_out,
                self.started,
                outcome,
                reason,
            )
