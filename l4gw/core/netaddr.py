"""Socket addresses, networks and port ranges as they are written in the TOML file.

No I/O: these are parsers and small value types shared by the config loader, the ACLs,
the balancer and the data path.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TypeAlias

import attrs

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen(order=True)
class SocketAddress:
    """An IP literal and a port. ``host`` is the normalised literal, without brackets."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress:
        return ipaddress.ip_address(self.host)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def sockaddr(self) -> tuple[str, int]:
        """The address tuple for ``socket.connect``/``bind``."""
        return (self.host, self.port)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_socket_address(text: object, *, allow_port_zero: bool = False) -> SocketAddress:
    """Parse ``"host:port"`` or ``"[v6addr]:port"`` where host is an IP literal.

    Raises ``ValueError`` with a message fit to show after a key path.
    """
    if not isinstance(text, str):
        raise ValueError('must be a string "ip:port" or "[ipv6]:port"')
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f'{text!r} is not "[ipv6]:port"')
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ip: IPAddress = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'{text!r} is not "ip:port" (IPv6: "[addr]:port")')
        if ":" in host:
            raise ValueError(f'{text!r}: write IPv6 addresses in brackets, "[addr]:port"')
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address (host names belong in a discovery section)"
            ) from None
    port = parse_port(port_text, allow_zero=allow_port_zero)
    return SocketAddress(str(ip), port)


def parse_port(value: object, *, allow_zero: bool = False) -> int:
    """A TCP port from an int or a decimal string. Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("must be a port number")
    if isinstance(value, str):
        # ASCII digits only ("²".isdigit() is true, and int() then fails in Python's words),
        # and no more than a port can have (int() refuses over 4300 digits the same way).
        digits = value.lstrip("0") or "0"
        if not (value.isascii() and value.isdigit()) or len(digits) > 5:
            raise ValueError(f"{value!r} is not a port number")
        value = int(digits)
    if not isinstance(value, int):
        raise ValueError("must be a port number")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        # str() refuses an integer of over 4300 digits (a TOML hex integer can have them).
        shown = value if value.bit_length() <= 64 else f"of {value.bit_length()} bits"
        raise ValueError(f"port {shown} is out of range {low}..65535")
    return value


def parse_network(value: object) -> IPNetwork:
    """An IP address or CIDR (``"10.0.0.0/8"``, ``"::1"``). Host bits must be zero."""
    if not isinstance(value, str):
        raise ValueError("must be a string IP address or CIDR")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address or CIDR ({exc})") from None


def parse_port_range(value: object) -> tuple[int, int]:
    """A port (``80``) or an inclusive range (``"8000-8099"``) as ``(low, high)``."""
    if isinstance(value, str) and "-" in value:
        low_text, _, high_text = value.partition("-")
        low, high = parse_port(low_text.strip()), parse_port(high_text.strip())
        if low > high:
            raise ValueError(f"range {value!r} is empty (low > high)")
        return (low, high)
    port = parse_port(value)
    return (port, port)


def client_ip(sockaddr: tuple[object, ...]) -> str:
    """The IP text of a peer address tuple from ``accept``/``getpeername``."""
    host = sockaddr[0]
    assert isinstance(host, str)
    return host
