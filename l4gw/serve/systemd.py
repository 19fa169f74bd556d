"""The systemd service protocol: ``sd_notify``, the watchdog, and socket activation.

Standard library only (plus trio for the watchdog task); no libsystemd, no daemon state, so it
is also what the ``workers`` supervisor and its workers speak to each other.

Notifications (``sd_notify(3)``):

* ``notify(*lines)`` sends ``KEY=VALUE`` lines as one datagram to ``$NOTIFY_SOCKET`` (a path,
  or ``@name`` for an abstract socket). It returns ``False`` when the variable is unset (not
  started by systemd, ``Type=`` other than ``notify``) and when the send fails: a daemon never
  stops because its supervisor cannot be told something.
* ``ready``, ``reloading``, ``stopping``, ``status``, ``watchdog`` are the usual messages.
  ``reloading`` carries ``MONOTONIC_USEC`` as systemd 253+ asks (older versions ignore it).
* ``watchdog_interval()`` reads ``WATCHDOG_USEC``/``WATCHDOG_PID`` and returns how often to
  ping (half the period); ``serve_watchdog`` pings from the trio event loop, so a loop that
  hangs stops pinging and systemd restarts the service (``WatchdogSec=``).

``$NOTIFY_SOCKET`` is deliberately left in the environment: the daemon notifies for its whole
life. The ``workers`` supervisor gives its workers a socket of its own instead.

Socket activation (``sd_listen_fds(3)``):

* ``listen_fds()`` returns the sockets systemd passed (fds 3.., ``LISTEN_FDS`` of them, named by
  ``LISTEN_FDNAMES``) when ``LISTEN_PID`` is this process, marks them close-on-exec, and
  removes ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from ``os.environ`` so that
  no child process (health-check helpers, workers) believes the fds are meant for it. Call it
  once, early: a second call finds nothing.
* ``match_inherited(sockets, name, address)`` picks the socket a listener takes over: the one
  whose fd name is the listener's name (``FileDescriptorName=vpc-link``), else the one bound
  to the listener's address (``0.0.0.0:8080`` also matches a dual-stack ``[::]:8080``).
  ``InheritedSockets`` wraps both and hands each socket out once:
  ``pool = InheritedSockets.from_environment(); sock = pool.take(name, address)``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NoReturn

import trio

if TYPE_CHECKING:
    from ..core.netaddr import SocketAddress

#: The first fd passed by systemd (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3

#: How long one notification may wait for a full receive queue before it is dropped; the send
#: runs on the event loop thread, and systemd drains its queue quickly.
_SEND_TIMEOUT = 1.0

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify_address(value: str | None = None) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value (read from the environment when
    ``value`` is None): a filesystem path, or ``"\\0name"`` for ``@name``. None when unset or
    of a kind this module does not speak (``vsock:``)."""
    if value is None:
        value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` as one datagram.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is unset or
    unusable or the send failed (the error is swallowed). Raises ``ValueError`` for a line that
    contains a newline or no ``=``.
    """
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"not a KEY=VALUE notification line: {line!r}")
    address = notify_address()
    if address is None:
        return False
    payload = ("\n".join(lines) + "\n").encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())


def ready(status: str | None = None) -> bool:
    """``READY=1``: every listener is bound (also sent when a reload is complete)."""
    return notify("READY=1", *([_status_line(status)] if status else []))


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading(status: str | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC``; send ``ready()`` when the reload is over."""
    return notify(
        "RELOADING=1",
        f"MONOTONIC_USEC={monotonic_usec()}",
        *([_status_line(status)] if status else []),
    )


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: the daemon is draining and will exit."""
    return notify("STOPPING=1", *([_status_line(status)] if status else []))


def status(text: str) -> bool:
    """``STATUS=...``, shown by ``systemctl status`` (whitespace is collapsed to one line)."""
    return notify(_status_line(text))


def watchdog() -> bool:
    """One ``WATCHDOG=1`` keep-alive ping."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when there is no
    watchdog for this process (unset, invalid, or ``WATCHDOG_PID`` names another process)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000


async def serve_watchdog(
    interval: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Send ``WATCHDOG=1`` every ``interval`` seconds from the trio event loop, forever.

    Run it in the daemon's top nursery when ``watchdog_interval()`` is not None. The ping is
    sent by the event loop itself, so a loop blocked by a stuck synchronous call stops pinging
    and systemd kills and restarts the service. The first ping is sent at once.
    """
    task_status.started()
    while True:
        watchdog()
        await trio.sleep(interval)


def listen_fds(*, unset_environment: bool = True) -> list[tuple[socket.socket, str | None]]:
    """The sockets passed by systemd, in fd order, each with its ``FileDescriptorName``.

    Empty unless ``LISTEN_PID`` is this process and ``LISTEN_FDS`` is a positive count. The
    name is None when ``LISTEN_FDNAMES`` is absent or does not have one name per fd (systemd's
    default name is the socket unit's name, e.g. ``"l4gw.socket"``). Each fd is marked
    close-on-exec; fds that are not sockets (``ListenFIFO=``) are left alone and skipped.

    Resource handling: the caller owns the returned sockets and should close the ones no
    listener takes over. With ``unset_environment`` (the default) the three ``LISTEN_*``
    variables are removed from ``os.environ`` whatever they said, so child processes never
    see them and a second call returns an empty list.
    """
    try:
        pid_text = os.environ.get("LISTEN_PID", "")
        fds_text = os.environ.get("LISTEN_FDS", "")
        names_text = os.environ.get("LISTEN_FDNAMES")
    finally:
        if unset_environment:
            for var in _LISTEN_VARS:
                os.environ.pop(var, None)
    try:
        if int(pid_text) != os.getpid():
            return []
        count = int(fds_text)
    except ValueError:
        return []
    if count <= 0:
        return []
    names: list[str | None] = [None] * count
    if names_text is not None:
        split = names_text.split(":")
        if len(split) == count:
            names = list(split)
    result: list[tuple[socket.socket, str | None]] = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError:  # EBADF, ENOTSOCK: not a socket we can use
            continue
        result.append((sock, name))
    return result


def _normalize(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _dual_stack(sock: socket.socket) -> bool:
    try:
        return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except OSError:
        return False


def socket_matches(sock: socket.socket, address: SocketAddress) -> bool:
    """Whether a TCP socket is bound to ``address``.

    IPv4-mapped IPv6 addresses compare equal to their IPv4 form, and a listener on the IPv4
    wildcard ``0.0.0.0:P`` matches a dual-stack (``IPV6_V6ONLY=0``) socket on ``[::]:P``, which
    is what ``ListenStream=P`` binds by default. The reverse (``[::]:P`` wanted, ``0.0.0.0:P``
    inherited) does not match: the socket would not serve IPv6 clients.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return False
    try:
        bound = sock.getsockname()
    except OSError:
        return False
    if bound[1] != address.port:
        return False
    have, want = _normalize(bound[0]), _normalize(address.host)
    if have is None or want is None:
        return False
    if have == want:
        return True
    return (
        want == ipaddress.IPv4Address("0.0.0.0")
        and have == ipaddress.IPv6Address("::")
        and _dual_stack(sock)
    )


def match_inherited(
    sockets: Iterable[tuple[socket.socket, str | None]], name: str, address: SocketAddress
) -> socket.socket | None:
    """The inherited socket listener ``name`` on ``address`` should take over, if any.

    A socket whose fd name is ``name`` wins, whatever its address (the caller may log the
    difference); otherwise the first socket bound to ``address`` (see ``socket_matches``).
    Nothing is removed from ``sockets``: the caller tracks which ones were claimed.
    """
    candidates: Sequence[tuple[socket.socket, str | None]] = list(sockets)
    for sock, fd_name in candidates:
        if fd_name == name and sock.fileno() >= 0:
            return sock
    for sock, _ in candidates:
        if sock.fileno() >= 0 and socket_matches(sock, address):
            return sock
    return None


class InheritedSockets:
    """The sockets systemd passed, each handed out once to the listener it matches.

    ``take`` removes the socket it returns, so two listeners (``0.0.0.0:P`` and ``[::]:P``)
    never get the same one. Sockets nobody takes stay open (a later reload may add their
    listener); ``unclaimed()`` describes them for a warning: systemd keeps queueing
    connections on them that nobody accepts.
    """

    def __init__(self, sockets: Iterable[tuple[socket.socket, str | None]] = ()) -> None:
        self._free = list(sockets)

    @classmethod
    def from_environment(cls) -> InheritedSockets:
        """``listen_fds()`` of this process (and the ``LISTEN_*`` variables removed)."""
        return cls(listen_fds())

    def take(self, name: str, address: SocketAddress) -> socket.socket | None:
        """The socket for listener ``name`` on ``address`` (see ``match_inherited``), or None."""
        sock = match_inherited(self._free, name, address)
        if sock is not None:
            self._free = [item for item in self._free if item[0] is not sock]
        return sock

    def unclaimed(self) -> list[str]:
        """``"name [address]"`` of each socket not taken yet."""
        descriptions = []
        for sock, fd_name in self._free:
            description = fd_name or "unnamed"
            with contextlib.suppress(OSError):
                description += f" {sock.getsockname()!r}"
            descriptions.append(description)
        return descriptions

    def close(self) -> None:
        """Close the sockets not taken."""
        for sock, _ in self._free:
            sock.close()
        self._free = []

    def __len__(self) -> int:
        return len(self._free)
