"""How many client connections one process may hold at once, from its open-file limit. No I/O.

Every proxied connection holds two descriptors: the client's socket and the node's. The rest
of the process needs a reserve: the listening sockets, the admin endpoint and its clients,
health checks (one connection per node at a time), DNS lookups, log files, the epoll and
wake-up descriptors, splice pipes while bytes are in flight (a relay copies instead when none
can be had), and the idle pooled node connections of http listeners. The reserve is
``RESERVE_MIN`` descriptors plus an eighth of the limit.

Past the cap, a new connection is refused at once (reset, counted with the outcome
``fd_limit``): its client learns it at once instead of waiting in the listen backlog for
descriptors that are not coming, and the reserve keeps the admin endpoint and the health
checks working while every connection slot is taken. This is HAProxy's ``maxconn`` derived
from ``ulimit -n``.
"""

from __future__ import annotations

__all__ = ["FDS_PER_CONNECTION", "RESERVE_MIN", "ConnectionBudget", "connection_cap", "fd_reserve"]

#: Descriptors one proxied connection holds: the client's socket and the node's.
FDS_PER_CONNECTION = 2
#: Descriptors kept for everything else at any limit.
RESERVE_MIN = 64
#: The further share of the limit kept in reserve (1/8): pipes and pooled node connections
#: grow with the traffic.
RESERVE_DIVISOR = 8
#: Refusals are logged at most this often (seconds), with the count since the last line.
LOG_INTERVAL = 1.0


def fd_reserve(nofile: int) -> int:
    """The descriptors kept out of the connection cap at an open-file limit of ``nofile``."""
    return RESERVE_MIN + nofile // RESERVE_DIVISOR


def connection_cap(nofile: int | None) -> int:
    """The most client connections a process with the open-file limit ``nofile`` may hold
    (at least 1); 0 when there is no limit (``nofile`` None: ``RLIM_INFINITY``)."""
    if nofile is None:
        return 0
    return max(1, (nofile - fd_reserve(nofile)) // FDS_PER_CONNECTION)


class ConnectionBudget:
    """The process-wide connection count against its cap, shared by every listener's stats.

    ``active`` is raised by :class:`l4gw.l4.client.ClientConnection` and lowered by
    ``ListenerStats.connection_ended``, beside each listener's own count; the accept loops
    refuse while ``limit`` (0: none) is reached and count each refusal with :meth:`refused_now`.
    """

    __slots__ = ("active", "limit", "logged_at", "nofile", "refused", "unlogged")

    def __init__(self, nofile: int | None = None) -> None:
        #: The open-file limit the cap comes from (None: unlimited, or not derived from one).
        self.nofile = nofile
        self.limit = connection_cap(nofile)
        self.active = 0
        #: Connections refused because the cap was reached or descriptors ran out.
        self.refused = 0
        self.unlogged = 0
        self.logged_at = -LOG_INTERVAL

    @property
    def reserve(self) -> int:
        """The descriptors kept out of the cap (0 when there is no cap)."""
        return 0 if self.nofile is None else fd_reserve(self.nofile)

    def full(self) -> bool:
        """Whether a new connection must be refused."""
        return 0 < self.limit <= self.active

    def refused_now(self, now: float) -> int:
        """Count one refusal at ``now``. Returns the refusals to log now (those since the last
        line, this one included) at most once per ``LOG_INTERVAL``; 0 otherwise."""
        self.refused += 1
        self.unlogged += 1
        if now - self.logged_at < LOG_INTERVAL:
            return 0
        count = self.unlogged
        self.unlogged = 0
        self.logged_at = now
        return count

    def document(self) -> dict[str, int | None]:
        """The ``capacity`` part of ``/status``."""
        return {
            "max_connections": self.limit or None,
            "open_file_limit": self.nofile,
            "fd_reserve": self.reserve,
            "active_connections": self.active,
            "refused_total": self.refused,
        }
