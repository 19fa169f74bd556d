"""The configuration model: frozen attrs classes, the value types they use, and ConfigError.

Nothing here reads or validates anything: :mod:`.load` builds these objects from TOML and is the
only place that checks values. The running daemon never mutates a :class:`Config`; a reload
builds a new one and swaps it.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from typing import Literal

import attrs

from ..netaddr import IPAddress, IPNetwork, SocketAddress

__all__ = [
    "DEFAULT_ADMIN",
    "HTTP_ALPN",
    "AuthorizeRule",
    "Balance",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "DiscoveryConfig",
    "DiscoveryType",
    "HealthCheck",
    "HealthConfig",
    "ListenerConfig",
    "ListenerMode",
    "ListenerTLSConfig",
    "LogFormat",
    "LogLevel",
    "NodeConfig",
    "ProxyProtocol",
    "RouteConfig",
    "TLSCertificateConfig",
    "TLSVersion",
    "UpstreamConfig",
    "UpstreamTLSConfig",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]
HealthCheck = Literal["none", "tcp", "http"]
DiscoveryType = Literal["A", "AAAA", "SRV"]
Balance = Literal["round_robin", "least_conn", "random_two", "source_hash"]
ProxyProtocol = Literal["off", "v1", "v2"]
ListenerMode = Literal["tcp", "http"]
TLSVersion = Literal["1.2", "1.3"]


DEFAULT_ADMIN = SocketAddress("127.0.0.1", 9901)
#: ALPN protocols a ``mode = "http"`` listener may offer (it speaks HTTP/1.x only).
HTTP_ALPN = ("http/1.1", "http/1.0")


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` holds one ``"key.path: message"`` each."""

    def __init__(self, problems: Iterable[str], *, source: str = "<config>") -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


@attrs.frozen
class DaemonConfig:
    """``[daemon]``."""

    admin: SocketAddress | None = DEFAULT_ADMIN
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    access_log: bool = True
    drain_timeout: float = 30.0
    #: Processes sharing the ports (SO_REUSEPORT); 0 = one per CPU.
    workers: int = 1


@attrs.frozen
class AuthorizeRule:
    """One ``[[authorize]]`` entry: backend addresses and ports that may be reached."""

    name: str
    network: IPNetwork
    #: Inclusive ``(low, high)`` ranges; a single port is ``(p, p)``.
    ports: tuple[tuple[int, int], ...]

    def permits(self, ip: IPAddress, port: int) -> bool:
        if not any(low <= port <= high for low, high in self.ports):
            return False
        if ip in self.network:
            return True
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return mapped is not None and mapped in self.network

    def permits_address(self, address: SocketAddress) -> bool:
        return self.permits(address.ip, address.port)

    @property
    def ports_text(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)

    def __str__(self) -> str:
        return f"{self.name} ({self.network} ports {self.ports_text})"


@attrs.frozen
class HealthConfig:
    """``[upstreams.X.health]``: active checks (off unless ``check`` is set) and passive
    ejection (on by default: ``passive_failures`` consecutive connect failures eject a node for
    ``ejection_time``, doubling up to ``max_ejection_time``)."""

    check: HealthCheck = "none"
    path: str = "/"
    #: Inclusive range of HTTP statuses counted as a pass.
    expect: tuple[int, int] = (200, 399)
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 3
    unhealthy_threshold: int = 3
    fail_open: bool = True
    passive_failures: int = 3
    ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejected_percent: int = 50


@attrs.frozen
class DiscoveryConfig:
    """``[upstreams.X.discovery]``: nodes found in DNS."""

    name: str
    type: DiscoveryType = "A"
    #: Required for A/AAAA; None for SRV (the records carry the port).
    port: int | None = None
    interval: float = 30.0
    #: DNS server to ask; None = the system's resolver.
    resolver: SocketAddress | None = None
    #: Weight of nodes found by A/AAAA (SRV records carry their own).
    weight: int = 1


@attrs.frozen
class UpstreamTLSConfig:
    """``[upstreams.X.tls]``: connect to the nodes over TLS."""

    verify: bool = True
    ca: str | None = None
    server_name: str | None = None


@attrs.frozen
class NodeConfig:
    address: SocketAddress
    #: 0..1000; 0 = drained (no new connections).
    weight: int = 1


@attrs.frozen
class UpstreamConfig:
    """``[upstreams.NAME]``."""

    name: str
    balance: Balance = "round_robin"
    retries: int = 5
    connect_timeout: float = 3.0
    idle_timeout: float = 350.0
    proxy_protocol: ProxyProtocol = "off"
    host_header: str = ""
    max_connections_per_node: int = 0
    response_timeout: float = 60.0
    nodes: tuple[NodeConfig, ...] = ()
    health: HealthConfig = attrs.field(factory=HealthConfig)
    discovery: DiscoveryConfig | None = None
    tls: UpstreamTLSConfig | None = None


@attrs.frozen
class TLSCertificateConfig:
    cert: str
    key: str


@attrs.frozen
class ListenerTLSConfig:
    """``[listeners.tls]``: terminate TLS on the listener."""

    certificates: tuple[TLSCertificateConfig, ...]
    min_version: TLSVersion = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)


@attrs.frozen
class RouteConfig:
    """``[[listeners.routes]]`` (http mode; the first match wins)."""

    #: Exact host name or ``"*.suffix"``, lower case; None = any host.
    host: str | None = attrs.field(default=None, kw_only=True)
    #: Path template: literal segments, ``{name}`` and a final greedy ``{name+}``.
    path: str
    #: Upper-case method names; empty = any method.
    methods: tuple[str, ...] = attrs.field(default=(), kw_only=True)
    upstream: str
    rewrite: str | None = None
    host_header: str | None = None


@attrs.frozen
class ListenerConfig:
    """``[[listeners]]``."""

    name: str
    listen: SocketAddress
    mode: ListenerMode = "tcp"
    #: The upstream in tcp mode; the fallback when no route matches in http mode.
    upstream: str | None = None
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    accept_proxy_protocol: bool = False
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    max_connections: int = 0
    #: New connections (tcp) or requests (http) per second per source IP; 0 = off.
    rate_limit: float = 0.0
    #: Bucket size; 0 = the rate rounded up (see :attr:`burst`).
    rate_limit_burst: int = 0
    header_timeout: float = 10.0
    #: http mode keep-alive idle time between requests; None = the proxy's default.
    idle_timeout: float | None = None
    tls: ListenerTLSConfig | None = None
    routes: tuple[RouteConfig, ...] = ()

    @property
    def burst(self) -> int:
        """The effective token-bucket size (at least 1 when rate limiting is on)."""
        if self.rate_limit_burst:
            return self.rate_limit_burst
        return max(1, math.ceil(self.rate_limit)) if self.rate_limit > 0 else 0


@attrs.frozen
class Config:
    """The whole file."""

    daemon: DaemonConfig = attrs.field(factory=DaemonConfig)
    authorize: tuple[AuthorizeRule, ...] = ()
    #: By name, in file order.
    upstreams: Mapping[str, UpstreamConfig] = attrs.field(factory=dict, hash=False)
    listeners: tuple[ListenerConfig, ...] = ()

    @property
    def authorization_enabled(self) -> bool:
        """True once any ``[[authorize]]`` entry exists (then anything else is denied)."""
        return bool(self.authorize)

    def authorization_for(self, address: SocketAddress) -> AuthorizeRule | None:
        """The first entry permitting ``address``, or None (denied if authorization is on)."""
        ip = address.ip
        for rule in self.authorize:
            if rule.permits(ip, address.port):
                return rule
        return None
