"""Process and kernel limits that cap how many connections the daemon can carry.

``raise_nofile_limit()`` lifts the soft ``RLIMIT_NOFILE`` to the hard one at start (systemd's
default soft limit is 1024 even when ``LimitNOFILE=`` allows more, unless both are set).
``capacity_warnings(expected_connections)`` reads the kernel settings and says, for each one
that is too small, what it is, what it costs and what to run. The checks themselves are pure
functions of the values (``KernelLimits``), so tests never depend on the machine.

What each setting bounds, for one proxied connection:

* file descriptors: the client socket and the node socket, plus up to two splice pipes (two
  fds each) while bytes are in flight in both directions: up to 6.
* ``fs.pipe-user-pages-soft``: pages of pipe buffers one user may hold. A splice pipe is 16
  pages (64 KiB) and grows to 256 (1 MiB) for bulk transfers. Past the limit, new pipes get 2
  pages (8 KiB) and growing is refused (EPERM without ``CAP_SYS_RESOURCE``); the relay keeps
  working, more slowly.
* ``net.ipv4.ip_local_port_range``: ephemeral ports for connections to nodes; each node
  address+port can have at most that many connections from this host at once, counting
  the ones in TIME_WAIT (60 s after this side closes).
* ``net.core.somaxconn``: the cap on every listen backlog; a burst of new connections beyond
  it is dropped and the clients retry after 1 s, 3 s...
"""

from __future__ import annotations

import resource
from pathlib import Path

import attrs

from ..core import capacity

#: Where the persistent form of the ``sysctl -w`` advice goes.
SYSCTL_FILE = "/etc/sysctl.d/90-l4gw.conf"

#: The backlog worth having for a load balancer (the kernel default since Linux 5.4).
MIN_SOMAXCONN = 4096

#: File descriptors per connection at worst (2 sockets + 2 pipes of 2 fds) and a reserve for
#: the listeners, the admin endpoint, health checks, DNS and the idle pipe pool.
FDS_PER_CONNECTION_WORST = 6
FD_RESERVE = 1024

#: Pages of one default-size splice pipe, and pipes per connection moving data both ways.
PIPE_PAGES = 16
PIPES_PER_CONNECTION = 2

#: The size splice pipes grow to (``relay.PipePool.big_size``).
BIG_PIPE_BYTES = 1 << 20


@attrs.frozen
class KernelLimits:
    """The values ``capacity_warnings`` looks at; None where they could not be read."""

    nofile_soft: int | None = None
    nofile_hard: int | None = None
    somaxconn: int | None = None
    pipe_user_pages_soft: int | None = None
    pipe_max_size: int | None = None
    local_port_range: tuple[int, int] | None = None


def _read_ints(path: Path) -> list[int] | None:
    try:
        return [int(word) for word in path.read_text().split()]
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    values = _read_ints(path)
    return values[0] if values and len(values) == 1 else None


def read_kernel_limits(proc: Path = Path("/proc")) -> KernelLimits:
    """Read the limits of this process and the kernel settings under ``proc``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ports = _read_ints(proc / "sys/net/ipv4/ip_local_port_range")
    return KernelLimits(
        nofile_soft=None if soft == resource.RLIM_INFINITY else soft,
        nofile_hard=None if hard == resource.RLIM_INFINITY else hard,
        somaxconn=_read_int(proc / "sys/net/core/somaxconn"),
        pipe_user_pages_soft=_read_int(proc / "sys/fs/pipe-user-pages-soft"),
        pipe_max_size=_read_int(proc / "sys/fs/pipe-max-size"),
        local_port_range=(ports[0], ports[1]) if ports and len(ports) == 2 else None,
    )


def nofile_target(proc: Path = Path("/proc")) -> int:
    """The soft ``RLIMIT_NOFILE`` ``raise_nofile_limit`` aims for: the hard limit, or
    ``fs.nr_open`` (the most the kernel accepts) when the hard limit is infinite."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return _read_int(proc / "sys/fs/nr_open") or 1 << 20
    return hard


def capacity_line(proc: Path = Path("/proc")) -> str:
    """What ``l4gw check`` says about the connection cap a daemon started from this shell
    would have (``l4gw.core.capacity``)."""
    nofile = nofile_target(proc)
    return (
        f"connection cap: {capacity.connection_cap(nofile)} client connections per process "
        f"(open-file limit {nofile} here, {capacity.FDS_PER_CONNECTION} descriptors per "
        f"connection, {capacity.fd_reserve(nofile)} kept for admin, health checks, DNS, logs, "
        f"pipes and pooled node connections); under systemd the unit's LimitNOFILE=1048576 "
        f"gives {capacity.connection_cap(1 << 20)}"
    )


def raise_nofile_limit(proc: Path = Path("/proc")) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns ``(old, new)`` soft limits.

    An infinite hard limit is replaced by ``fs.nr_open`` (the most the kernel accepts). When
    the kernel refuses, the limit is left as it was and ``new == old``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = nofile_target(proc)
    if soft != resource.RLIM_INFINITY and soft >= target:
        return (soft, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return (soft, soft)
    return (soft, target)


def _persist(setting: str, value: str) -> str:
    shown = f'"{value}"' if " " in value else value
    return f"`sysctl -w {setting}={shown}` and put `{setting} = {value}` in {SYSCTL_FILE}"


def nofile_warning(soft: int | None, hard: int | None, expected_connections: int) -> str | None:
    """A warning when the open-file limit is below what ``expected_connections`` need."""
    if soft is None:
        return None
    needed = expected_connections * FDS_PER_CONNECTION_WORST + FD_RESERVE
    if soft >= needed:
        return None
    hard_text = "unlimited" if hard is None else str(hard)
    return (
        f"the open-file limit (RLIMIT_NOFILE) is {soft} (hard limit {hard_text}): "
        f"{expected_connections} connections need up to {needed} (2 sockets and up to 2 "
        f"splice pipes each); beyond it accept() fails with EMFILE and new connections wait; "
        f"set LimitNOFILE=1048576 in the unit (systemctl edit l4gw), or run "
        f"`ulimit -n 1048576` before `l4gw run` outside systemd"
    )


def somaxconn_warning(somaxconn: int | None) -> str | None:
    """A warning when ``net.core.somaxconn`` caps listen backlogs below ``MIN_SOMAXCONN``."""
    if somaxconn is None or somaxconn >= MIN_SOMAXCONN:
        return None
    return (
        f"net.core.somaxconn is {somaxconn}: every listen backlog is capped at {somaxconn} "
        f"pending connections and a burst beyond it is dropped (clients retry after 1 s, "
        f"3 s...); run {_persist('net.core.somaxconn', str(MIN_SOMAXCONN))}"
    )


def pipe_pages_warning(pages_soft: int | None, expected_connections: int) -> str | None:
    """A warning when ``fs.pipe-user-pages-soft`` cannot give every connection two 64 KiB
    splice pipes (0 means no limit)."""
    if pages_soft is None or pages_soft == 0:
        return None
    needed = expected_connections * PIPES_PER_CONNECTION * PIPE_PAGES
    if pages_soft >= needed:
        return None
    connections = pages_soft // (PIPES_PER_CONNECTION * PIPE_PAGES)
    big_pipes = pages_soft * 4096 // BIG_PIPE_BYTES
    return (
        f"fs.pipe-user-pages-soft is {pages_soft} pages ({pages_soft * 4 // 1024} MiB per "
        f"user): past about {connections} connections moving data at once, new splice pipes "
        f"shrink to 8 KiB, and at most {big_pipes} pipes can grow to 1 MiB, which slows bulk "
        f"transfers; for {expected_connections} connections run "
        f"{_persist('fs.pipe-user-pages-soft', str(needed))} (0 = no limit)"
    )


def pipe_max_size_warning(pipe_max_size: int | None) -> str | None:
    """A warning when ``fs.pipe-max-size`` forbids the 1 MiB splice pipes."""
    if pipe_max_size is None or pipe_max_size >= BIG_PIPE_BYTES:
        return None
    return (
        f"fs.pipe-max-size is {pipe_max_size} bytes: splice pipes cannot grow to 1 MiB "
        f"without CAP_SYS_RESOURCE, which slows bulk transfers; run "
        f"{_persist('fs.pipe-max-size', str(BIG_PIPE_BYTES))}"
    )


def port_range_warning(port_range: tuple[int, int] | None, expected_connections: int) -> str | None:
    """A warning when the ephemeral port range is smaller than ``expected_connections``."""
    if port_range is None:
        return None
    low, high = port_range
    size = high - low + 1
    if size >= expected_connections:
        return None
    return (
        f"net.ipv4.ip_local_port_range is {low}-{high} ({size} ports): a node address can "
        f"take at most {size} connections from this host at once, counting those in "
        f"TIME_WAIT for 60 s after they close, and connects beyond it fail with "
        f"EADDRNOTAVAIL; run {_persist('net.ipv4.ip_local_port_range', '10000 65535')}"
    )


def warnings_for(limits: KernelLimits, expected_connections: int) -> list[str]:
    """Every capacity warning for ``limits`` at ``expected_connections`` concurrent
    connections, in a stable order; empty when all is well."""
    checks = (
        nofile_warning(limits.nofile_soft, limits.nofile_hard, expected_connections),
        somaxconn_warning(limits.somaxconn),
        pipe_pages_warning(limits.pipe_user_pages_soft, expected_connections),
        pipe_max_size_warning(limits.pipe_max_size),
        port_range_warning(limits.local_port_range, expected_connections),
    )
    return [warning for warning in checks if warning is not None]


def capacity_warnings(expected_connections: int) -> list[str]:
    """The capacity warnings for this machine and process (see ``warnings_for``)."""
    return warnings_for(read_kernel_limits(), expected_connections)
