"""The configuration model and its loader: TOML -> frozen attrs classes.

No I/O except reading the file in :func:`load_config`. :func:`parse_config` checks the whole
document and reports every problem at once, each as ``"key.path: message"`` (for example
``upstreams.web.nodes[2].weight: must be an integer 0..1000 (got 1001)``), so an operator can
fix a file in one pass. Unknown keys are errors at every level.

The running daemon never mutates a :class:`Config`; a reload builds a new one and swaps it.

Defaults worth knowing:

- No ``[upstreams.X.health]`` table (or no ``check`` in it) means no active health check, as in
  HAProxy; passive ejection (``passive_failures`` consecutive connect failures) still applies.
- ``[daemon] admin`` defaults to ``127.0.0.1:9901``; ``""`` disables the admin endpoint.
- Once any ``[[authorize]]`` entry exists, every static node must be permitted by one of them.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal, TypeVar, cast, get_args

import attrs

from ..netaddr import (
    IPAddress,
    IPNetwork,
    SocketAddress,
    parse_network,
    parse_port,
    parse_port_range,
    parse_socket_address,
)

__all__ = [
    "AuthorizeRule",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "DiscoveryConfig",
    "HealthConfig",
    "ListenerConfig",
    "ListenerTLSConfig",
    "NodeConfig",
    "RouteConfig",
    "TLSCertificateConfig",
    "UpstreamConfig",
    "UpstreamTLSConfig",
    "describe",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "path_variables",
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


# --------------------------------------------------------------------------------------------
# Durations

_DURATION_RE = re.compile(
    r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(ms|s|m|h)\s*\Z", re.ASCII
)
_UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
_DURATION_HELP = 'a number of seconds or a string with a unit: "250ms", "5s", "2m", "1h"'


def parse_duration(value: object) -> float:
    """Seconds from a non-negative number or a string with a unit (``ms``, ``s``, ``m``, ``h``).

    ``"1.5s"`` is 1.5; ``"250ms"`` is exactly ``250 / 1000``. Raises ``ValueError`` for
    anything else, booleans included.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a duration, {_DURATION_HELP} (got {_show(value)})")
    try:
        if isinstance(value, str):
            match = _DURATION_RE.match(value)
            if match is None:
                raise ValueError(f"must be a duration, {_DURATION_HELP} (got {_show(value)})")
            seconds = float(Fraction(match[1]) * _UNITS[match[2]])
        else:
            seconds = float(value)
    except OverflowError:
        raise ValueError(f"duration {_show(value)} is too large") from None
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration (got {_show(value)})")
    if seconds < 0:
        raise ValueError(f"must not be negative (got {_show(value)})")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest unit string that :func:`parse_duration` turns back into ``seconds``."""
    if seconds == 0:
        return "0s"
    millis = round(seconds * 1000)
    if millis / 1000 == seconds:
        for unit, factor in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
            if millis % factor == 0:
                return f"{millis // factor}{unit}"
        return f"{millis}ms"
    return f"{seconds!r}s"


# --------------------------------------------------------------------------------------------
# The model


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


# --------------------------------------------------------------------------------------------
# Validation machinery: parsers raise ValueError; tables collect the problems with key paths.

T = TypeVar("T")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_VAR_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VAR_NAME_RE = re.compile(_VAR_NAME + r"\Z")
_SEGMENT_VAR_RE = re.compile(r"\{(" + _VAR_NAME + r")(\+?)\}\Z")
_BRACED_RE = re.compile(r"\{([^{}]*)\}")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


class _Invalid(ValueError):
    """Several problems under one key, as ``(path suffix, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{suffix}: {message}" for suffix, message in errors))
        self.errors = errors


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _join(path: str, key: str) -> str:
    return f"{path}.{_key(key)}" if path else _key(key)


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


class _Table:
    """One TOML table being read: unknown keys reported on creation, failed keys remembered
    so that cross-checks between keys do not pile follow-up errors on a bad value."""

    def __init__(
        self, problems: _Problems, path: str, data: Mapping[str, Any], allowed: Sequence[str]
    ) -> None:
        self.problems = problems
        self.path = path
        self.data = data
        self.failed: set[str] = set()
        for key in data:
            if key not in allowed:
                self.problems.add(self.sub(key), f"unknown key (allowed: {', '.join(allowed)})")

    def sub(self, key: str) -> str:
        return _join(self.path, key)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def error(self, key: str, message: str) -> None:
        self.failed.add(key)
        self.problems.add(self.sub(key), message)

    def ok(self, *keys: str) -> bool:
        return self.failed.isdisjoint(keys)

    def get(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        if key not in self.data:
            return default
        try:
            return parse(self.data[key])
        except _Invalid as exc:
            self.failed.add(key)
            for suffix, message in exc.errors:
                self.problems.add(self.sub(key) + suffix, message)
        except ValueError as exc:
            self.error(key, str(exc))
        return default

    def require(self, key: str, parse: Callable[[Any], T]) -> T | None:
        if key not in self.data:
            self.error(key, "is required")
            return None
        return self.get(key, parse, None)

    def table(self, key: str) -> Mapping[str, Any] | None:
        """A sub-table, or None when absent or not a table (reported)."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.error(key, f"must be a table (got {_show(value)})")
            return None
        return value

    def tables(self, key: str) -> list[tuple[str, Mapping[str, Any]]]:
        """An array of tables as ``(path, table)`` pairs; bad items are reported and skipped."""
        value = self.data.get(key)
        if value is None:
            return []
        return _array_of_tables(self.problems, self.sub(key), value, self.failed, key)


def _array_of_tables(
    problems: _Problems, path: str, value: object, failed: set[str], key: str
) -> list[tuple[str, Mapping[str, Any]]]:
    if not isinstance(value, list):
        failed.add(key)
        problems.add(path, f"must be an array of tables (got {_show(value)})")
        return []
    result = []
    for index, item in enumerate(value):
        if isinstance(item, Mapping):
            result.append((f"{path}[{index}]", item))
        else:
            failed.add(key)
            problems.add(f"{path}[{index}]", f"must be a table (got {_show(item)})")
    return result


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string (got {_show(value)})")
    return value


def _nonempty(value: object) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def _optional_text(value: object) -> str | None:
    """A string where ``""`` means "not set"."""
    return _string(value) or None


def _no_space(value: object) -> str:
    text = _string(value)
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"must not contain spaces or control characters (got {_show(text)})")
    return text


def _name(value: object) -> str:
    text = _nonempty(value)
    if not _NAME_RE.match(text):
        raise ValueError(
            'must be a name of up to 64 letters, digits, "_", "-" or ".", starting with a '
            f"letter or digit (got {_show(text)})"
        )
    return text


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false (got {_show(value)})")
    return value


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    wanted = f"an integer {low}..{high}" if high is not None else f"an integer >= {low}"

    def parse(value: object) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            raise ValueError(f"must be {wanted} (got {_show(value)})")
        return value

    return parse


def _number(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"must be a number >= 0 (got {_show(value)})")
    return float(value)


def _choice(allowed: Sequence[str], *, fold_case: bool = False) -> Callable[[object], Any]:
    def parse(value: object) -> str:
        text = value.upper() if fold_case and isinstance(value, str) else value
        if not isinstance(text, str) or text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)} (got {_show(value)})")
        return text

    return parse


def _duration(*, positive: bool) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds == 0:
            raise ValueError("must be greater than 0")
        return seconds

    return parse


def _address(*, allow_port_zero: bool = False) -> Callable[[object], SocketAddress]:
    def parse(value: object) -> SocketAddress:
        return parse_socket_address(value, allow_port_zero=allow_port_zero)

    return parse


def _optional_address(*, allow_port_zero: bool = False) -> Callable[[object], Any]:
    def parse(value: object) -> SocketAddress | None:
        if value == "":
            return None
        return parse_socket_address(value, allow_port_zero=allow_port_zero)

    return parse


def _resolver(value: object) -> SocketAddress | None:
    """``""`` = the system's resolver; an IP without a port means port 53."""
    if value == "":
        return None
    if isinstance(value, str):
        try:
            return SocketAddress(str(ipaddress.ip_address(value)), 53)
        except ValueError:
            pass
    return parse_socket_address(value)


def _list_of(
    item: Callable[[Any], T], *, nonempty: bool = False, what: str = "an array"
) -> Callable[[object], tuple[T, ...]]:
    def parse(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be {what} (got {_show(value)})")
        if nonempty and not value:
            raise ValueError("must not be empty")
        result: list[T] = []
        errors: list[tuple[str, str]] = []
        for index, element in enumerate(value):
            try:
                result.append(item(element))
            except ValueError as exc:
                errors.append((f"[{index}]", str(exc)))
        if errors:
            raise _Invalid(errors)
        return tuple(result)

    return parse


_networks = _list_of(parse_network, what="an array of IP addresses or CIDRs")


def _dns_name(value: object) -> str:
    """A DNS name (underscores allowed, for SRV names), lower case, without the final dot."""
    text = _nonempty(value)
    name = text.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"{_show(text)} is not a valid DNS name")
    return name.lower()


def _route_host(value: object) -> str | None:
    text = _string(value)
    if not text:
        return None
    if ":" in text:
        raise ValueError(f"{_show(text)}: write the host without a port")
    try:
        if text.startswith("*."):
            return "*." + _dns_name(text[2:])
        return _dns_name(text)
    except ValueError:
        raise ValueError(f'must be a host name or "*.suffix" (got {_show(text)})') from None


def _method(value: object) -> str:
    text = _nonempty(value)
    if not _TOKEN_RE.match(text):
        raise ValueError(f"{_show(text)} is not an HTTP method")
    return text.upper()


def _port_range(value: object) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'must be a port or a range "low-high" (got {_show(value)})')
    return parse_port_range(value)


def _expect(value: object) -> tuple[int, int]:
    """An HTTP status (``200``, ``"200"``) or an inclusive range (``"200-399"``)."""
    message = f'must be a status 100..599 or a range like "200-399" (got {_show(value)})'
    if isinstance(value, bool):
        raise ValueError(message)
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str):
        low_text, _, high_text = value.partition("-")
        high_text = high_text or low_text
        if not (low_text.strip().isdigit() and high_text.strip().isdigit()):
            raise ValueError(message)
        low, high = int(low_text), int(high_text)
    else:
        raise ValueError(message)
    if not (100 <= low <= high <= 599):
        raise ValueError(message)
    return (low, high)


def _tls_version(value: object) -> str:
    text = str(value) if isinstance(value, float) else value
    if not isinstance(text, str) or text not in ("1.2", "1.3"):
        raise ValueError(f'must be "1.2" or "1.3" (got {_show(value)})')
    return text


def _alpn(value: object) -> str:
    text = _nonempty(value)
    if not text.isascii() or len(text) > 255 or not text.isprintable():
        raise ValueError(f"{_show(text)} is not an ALPN protocol name")
    return text


def _check_path_text(value: object, *, what: str) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f'{what} must start with "/" (got {_show(text)})')
    if any(c.isspace() or not c.isprintable() or c == "#" for c in text):
        raise ValueError(f'{what} must not contain spaces, control characters or "#"')
    return text


def path_variables(template: str) -> dict[str, bool]:
    """The variables of a route path template, mapped to True for the greedy one.

    ``"/users/{id}/files/{rest+}"`` -> ``{"id": False, "rest": True}``. A variable is a whole
    segment; the greedy ``{name+}`` may only be the last segment. Raises ``ValueError``.
    """
    text = _check_path_text(template, what="path")
    if "?" in text:
        raise ValueError('path must not contain "?" (routes match the path only)')
    segments = text[1:].split("/")
    variables: dict[str, bool] = {}
    for index, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            continue
        match = _SEGMENT_VAR_RE.match(segment)
        if match is None:
            raise ValueError(
                f"segment {_show(segment)}: a variable is a whole segment, {{name}} or "
                "{name+}, its name letters, digits and _ (not starting with a digit)"
            )
        name, greedy = match[1], bool(match[2])
        if name in variables:
            raise ValueError(f"variable {{{name}}} appears twice")
        if greedy and index != len(segments) - 1:
            raise ValueError(f"the greedy variable {{{name}+}} must be the last segment")
        variables[name] = greedy
    return variables


def _check_rewrite(value: object, variables: Mapping[str, bool]) -> str:
    """A rewrite may use only the path's variables (``{name}`` or ``{name+}`` for greedy)."""
    text = _check_path_text(value, what="rewrite")
    for match in _BRACED_RE.finditer(text):
        inner = match[1]
        name = inner.removesuffix("+")
        if not _VAR_NAME_RE.match(name):
            raise ValueError(f"{{{inner}}} is not a variable reference")
        if name not in variables:
            known = ", ".join(f"{{{v}}}" for v in variables) or "none"
            raise ValueError(f"{{{name}}} is not a variable of the path (variables: {known})")
        if inner.endswith("+") and not variables[name]:
            raise ValueError(f"{{{inner}}}: {{{name}}} is not greedy in the path")
    if "{" in _BRACED_RE.sub("", text) or "}" in _BRACED_RE.sub("", text):
        raise ValueError(f"unbalanced braces in {_show(text)}")
    return text


# --------------------------------------------------------------------------------------------
# Sections

_TOP_KEYS = ("daemon", "authorize", "upstreams", "listeners")
_DAEMON_KEYS = ("admin", "log_level", "log_format", "access_log", "drain_timeout", "workers")
_AUTHORIZE_KEYS = ("name", "address", "ports")
_UPSTREAM_KEYS = (
    "balance",
    "retries",
    "connect_timeout",
    "idle_timeout",
    "proxy_protocol",
    "host_header",
    "max_connections_per_node",
    "response_timeout",
    "nodes",
    "health",
    "discovery",
    "tls",
)
_NODE_KEYS = ("address", "weight")
_HEALTH_KEYS = (
    "check",
    "path",
    "expect",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "fail_open",
    "passive_failures",
    "ejection_time",
    "max_ejection_time",
    "max_ejected_percent",
)
_DISCOVERY_KEYS = ("name", "type", "port", "interval", "resolver", "weight")
_UPSTREAM_TLS_KEYS = ("verify", "ca", "server_name")
_LISTENER_KEYS = (
    "name",
    "listen",
    "mode",
    "upstream",
    "allow",
    "deny",
    "accept_proxy_protocol",
    "proxy_protocol_from",
    "max_connections",
    "rate_limit",
    "rate_limit_burst",
    "header_timeout",
    "idle_timeout",
    "tls",
    "routes",
)
_LISTENER_TLS_KEYS = ("certificates", "min_version", "alpn")
_CERTIFICATE_KEYS = ("cert", "key")
_ROUTE_KEYS = ("host", "path", "methods", "upstream", "rewrite", "host_header")

_positive = _duration(positive=True)
_weight = _integer(0, 1000)


def _daemon(problems: _Problems, data: Mapping[str, Any]) -> DaemonConfig:
    t = _Table(problems, "daemon", data, _DAEMON_KEYS)
    return DaemonConfig(
        admin=t.get("admin", _optional_address(allow_port_zero=True), DEFAULT_ADMIN),
        log_level=t.get("log_level", _choice(get_args(LogLevel)), "info"),
        log_format=t.get("log_format", _choice(get_args(LogFormat)), "json"),
        access_log=t.get("access_log", _bool, True),
        drain_timeout=t.get("drain_timeout", _duration(positive=False), 30.0),
        workers=t.get("workers", _integer(0, 256), 1),
    )


def _authorize(problems: _Problems, value: object) -> tuple[tuple[AuthorizeRule, ...], bool]:
    """The rules and whether they all parsed (if not, node authorization is not checked)."""
    before = len(problems.items)
    rules: list[AuthorizeRule] = []
    seen: dict[str, str] = {}
    for path, data in _array_of_tables(problems, "authorize", value, set(), "authorize"):
        t = _Table(problems, path, data, _AUTHORIZE_KEYS)
        name = t.require("name", _name)
        network = t.require("address", parse_network)
        ports = t.require("ports", _list_of(_port_range, nonempty=True))
        if name is not None:
            if name in seen:
                t.error("name", f"duplicate name {_show(name)} (also {seen[name]})")
            seen.setdefault(name, path)
        if name is not None and network is not None and ports is not None:
            rules.append(AuthorizeRule(name, network, ports))
    return tuple(rules), len(problems.items) == before


def _health(problems: _Problems, path: str, data: Mapping[str, Any]) -> HealthConfig:
    t = _Table(problems, path, data, _HEALTH_KEYS)
    health = HealthConfig(
        check=t.get("check", _choice(get_args(HealthCheck)), "none"),
        path=t.get("path", lambda v: _check_path_text(v, what="path"), "/"),
        expect=t.get("expect", _expect, (200, 399)),
        interval=t.get("interval", _positive, 5.0),
        timeout=t.get("timeout", _positive, 2.0),
        healthy_threshold=t.get("healthy_threshold", _integer(1, 100), 3),
        unhealthy_threshold=t.get("unhealthy_threshold", _integer(1, 100), 3),
        fail_open=t.get("fail_open", _bool, True),
        passive_failures=t.get("passive_failures", _integer(0, 100), 3),
        ejection_time=t.get("ejection_time", _positive, 30.0),
        max_ejection_time=t.get("max_ejection_time", _positive, 300.0),
        max_ejected_percent=t.get("max_ejected_percent", _integer(0, 100), 50),
    )
    if t.ok("interval", "timeout") and health.timeout > health.interval:
        t.error("timeout", f"must not exceed interval ({format_duration(health.interval)})")
    if (
        t.ok("ejection_time", "max_ejection_time")
        and health.max_ejection_time < health.ejection_time
    ):
        t.error(
            "max_ejection_time",
            f"must not be less than ejection_time ({format_duration(health.ejection_time)})",
        )
    return health


def _discovery(problems: _Problems, path: str, data: Mapping[str, Any]) -> DiscoveryConfig | None:
    t = _Table(problems, path, data, _DISCOVERY_KEYS)
    name = t.require("name", _dns_name)
    kind: DiscoveryType = t.get("type", _choice(get_args(DiscoveryType), fold_case=True), "A")
    port = t.get("port", parse_port, None)
    interval = t.get("interval", _positive, 30.0)
    resolver = t.get("resolver", _resolver, None)
    weight = t.get("weight", _weight, 1)
    if t.ok("type"):
        if kind == "SRV":
            for key in ("port", "weight"):
                if key in t:
                    t.error(key, 'not allowed with type = "SRV" (the SRV records carry it)')
        elif port is None and t.ok("port"):
            t.error("port", f'is required with type = "{kind}"')
    if name is None:
        return None
    return DiscoveryConfig(
        name=name, type=kind, port=port, interval=interval, resolver=resolver, weight=weight
    )


def _upstream_tls(problems: _Problems, path: str, data: Mapping[str, Any]) -> UpstreamTLSConfig:
    t = _Table(problems, path, data, _UPSTREAM_TLS_KEYS)
    return UpstreamTLSConfig(
        verify=t.get("verify", _bool, True),
        ca=t.get("ca", _optional_text, None),
        server_name=t.get("server_name", lambda v: _optional_text(_no_space(v)), None),
    )


def _nodes(
    problems: _Problems, t: _Table, node_paths: list[tuple[str, SocketAddress]]
) -> tuple[NodeConfig, ...]:
    value = t.data.get("nodes")
    if value is None:
        return ()
    base = t.sub("nodes")
    if not isinstance(value, list):
        t.error(
            "nodes", f'must be an array of "ip:port" or {{ address, weight }} (got {_show(value)})'
        )
        return ()
    nodes: list[NodeConfig] = []
    seen: dict[SocketAddress, int] = {}
    for index, item in enumerate(value):
        path = f"{base}[{index}]"
        address: SocketAddress | None = None
        weight = 1
        if isinstance(item, str):
            try:
                address = parse_socket_address(item)
            except ValueError as exc:
                problems.add(path, str(exc))
            address_path = path
        elif isinstance(item, Mapping):
            nt = _Table(problems, path, item, _NODE_KEYS)
            address = nt.require("address", _address())
            weight = nt.get("weight", _weight, 1)
            address_path = nt.sub("address")
        else:
            problems.add(
                path,
                f'must be "ip:port" or {{ address = "ip:port", weight = N }} (got {_show(item)})',
            )
            continue
        if address is None:
            continue
        if address in seen:
            problems.add(address_path, f"{address} is listed twice (also nodes[{seen[address]}])")
            continue
        seen[address] = index
        node_paths.append((address_path, address))
        nodes.append(NodeConfig(address, weight))
    return tuple(nodes)


def _upstream(
    problems: _Problems,
    path: str,
    name: str,
    data: Mapping[str, Any],
    node_paths: list[tuple[str, SocketAddress]],
) -> UpstreamConfig:
    t = _Table(problems, path, data, _UPSTREAM_KEYS)
    nodes = _nodes(problems, t, node_paths)
    health_data = t.table("health")
    discovery_data = t.table("discovery")
    tls_data = t.table("tls")
    discovery = (
        _discovery(problems, t.sub("discovery"), discovery_data)
        if discovery_data is not None
        else None
    )
    if not nodes and discovery_data is None and t.ok("nodes", "discovery"):
        problems.add(
            path,
            f"has no nodes: give nodes = [...] or a [{path}.discovery] section",
        )
    return UpstreamConfig(
        name=name,
        balance=t.get("balance", _choice(get_args(Balance)), "round_robin"),
        retries=t.get("retries", _integer(1, 100), 5),
        connect_timeout=t.get("connect_timeout", _positive, 3.0),
        idle_timeout=t.get("idle_timeout", _positive, 350.0),
        proxy_protocol=t.get("proxy_protocol", _choice(get_args(ProxyProtocol)), "off"),
        host_header=t.get("host_header", _no_space, ""),
        max_connections_per_node=t.get("max_connections_per_node", _integer(0), 0),
        response_timeout=t.get("response_timeout", _positive, 60.0),
        nodes=nodes,
        health=(
            _health(problems, t.sub("health"), health_data)
            if health_data is not None
            else HealthConfig()
        ),
        discovery=discovery,
        tls=_upstream_tls(problems, t.sub("tls"), tls_data) if tls_data is not None else None,
    )


def _upstreams(
    problems: _Problems, value: object, node_paths: list[tuple[str, SocketAddress]]
) -> dict[str, UpstreamConfig] | None:
    if not isinstance(value, Mapping):
        problems.add(
            "upstreams", f"must be a table of [upstreams.NAME] tables (got {_show(value)})"
        )
        return None
    result: dict[str, UpstreamConfig] = {}
    for name, data in value.items():
        path = _join("upstreams", name)
        try:
            _name(name)
        except ValueError as exc:
            problems.add(path, f"upstream name {exc}")
        if not isinstance(data, Mapping):
            problems.add(path, f"must be a table (got {_show(data)})")
            continue
        result[name] = _upstream(problems, path, name, data, node_paths)
    return result


def _upstream_ref(upstreams: Mapping[str, UpstreamConfig] | None) -> Callable[[object], str]:
    def parse(value: object) -> str:
        name = _nonempty(value)
        if upstreams is not None and name not in upstreams:
            defined = ", ".join(upstreams) or "none"
            raise ValueError(f"no upstream named {_show(name)} (defined: {defined})")
        return name

    return parse


def _listener_tls(
    problems: _Problems, path: str, data: Mapping[str, Any], mode: str
) -> ListenerTLSConfig | None:
    t = _Table(problems, path, data, _LISTENER_TLS_KEYS)
    certificates: list[TLSCertificateConfig] = []
    if "certificates" not in t:
        t.error("certificates", 'is required: [{ cert = "file.pem", key = "file.key" }]')
    elif isinstance(t.data["certificates"], list) and not t.data["certificates"]:
        t.error("certificates", "must not be empty")
    for cert_path, cert_data in t.tables("certificates"):
        ct = _Table(problems, cert_path, cert_data, _CERTIFICATE_KEYS)
        cert = ct.require("cert", _nonempty)
        key = ct.require("key", _nonempty)
        if cert is not None and key is not None:
            certificates.append(TLSCertificateConfig(cert, key))
    min_version = t.get("min_version", _tls_version, "1.2")
    default_alpn: tuple[str, ...] = ("http/1.1",) if mode == "http" else ()
    alpn = t.get("alpn", _list_of(_alpn, what="an array of strings"), default_alpn)
    if mode == "http" and t.ok("alpn"):
        for index, protocol in enumerate(alpn):
            if protocol not in HTTP_ALPN:
                problems.add(
                    f"{t.sub('alpn')}[{index}]",
                    f'{_show(protocol)} is not spoken in mode = "http" (allowed: '
                    f"{', '.join(HTTP_ALPN)})",
                )
    if not certificates:
        return None
    return ListenerTLSConfig(
        certificates=tuple(certificates),
        min_version=cast(TLSVersion, min_version),
        alpn=alpn,
    )


def _route(
    problems: _Problems,
    path: str,
    data: Mapping[str, Any],
    upstreams: Mapping[str, UpstreamConfig] | None,
) -> RouteConfig | None:
    t = _Table(problems, path, data, _ROUTE_KEYS)
    host = t.get("host", _route_host, None)
    template = t.require("path", _string)
    variables: dict[str, bool] | None = None
    if template is not None:
        try:
            variables = path_variables(template)
        except ValueError as exc:
            t.error("path", str(exc))
    methods: tuple[str, ...] = t.get("methods", _list_of(_method, what="an array of strings"), ())
    upstream = t.require("upstream", _upstream_ref(upstreams))
    rewrite: str | None = None
    if "rewrite" in t:
        if variables is not None:
            rewrite = t.get("rewrite", lambda v: _check_rewrite(v, variables), None)
        else:
            rewrite = t.get("rewrite", lambda v: _check_path_text(v, what="rewrite"), None)
    host_header = t.get("host_header", lambda v: _optional_text(_no_space(v)), None)
    if template is None or variables is None or upstream is None:
        return None
    return RouteConfig(
        host=host,
        path=template,
        methods=tuple(dict.fromkeys(methods)),
        upstream=upstream,
        rewrite=rewrite,
        host_header=host_header,
    )


def _listener(
    problems: _Problems,
    path: str,
    data: Mapping[str, Any],
    upstreams: Mapping[str, UpstreamConfig] | None,
) -> ListenerConfig | None:
    t = _Table(problems, path, data, _LISTENER_KEYS)
    name = t.require("name", _name)
    listen = t.require("listen", _address(allow_port_zero=True))
    mode: ListenerMode = t.get("mode", _choice(get_args(ListenerMode)), "tcp")
    upstream = t.get("upstream", _upstream_ref(upstreams), None)
    accept_proxy_protocol = t.get("accept_proxy_protocol", _bool, False)
    proxy_protocol_from: tuple[IPNetwork, ...] = t.get("proxy_protocol_from", _networks, ())
    if proxy_protocol_from and not accept_proxy_protocol and t.ok("accept_proxy_protocol"):
        t.error("proxy_protocol_from", "has no effect unless accept_proxy_protocol = true")
    tls_data = t.table("tls")
    tls = _listener_tls(problems, t.sub("tls"), tls_data, mode) if tls_data is not None else None
    routes = tuple(
        route
        for route_path, route_data in t.tables("routes")
        if (route := _route(problems, route_path, route_data, upstreams)) is not None
    )
    if t.ok("mode"):
        if mode == "tcp":
            if upstream is None and t.ok("upstream"):
                t.error("upstream", 'is required with mode = "tcp"')
            if t.data.get("routes"):
                t.error("routes", 'only allowed with mode = "http"')
        elif upstream is None and not t.data.get("routes") and t.ok("upstream"):
            problems.add(
                path,
                'mode = "http" needs an upstream (the fallback) or at least one '
                "[[listeners.routes]] entry",
            )
    listener = ListenerConfig(
        name=name or "",
        listen=listen or SocketAddress("0.0.0.0", 0),
        mode=mode,
        upstream=upstream,
        allow=t.get("allow", _networks, ()),
        deny=t.get("deny", _networks, ()),
        accept_proxy_protocol=accept_proxy_protocol,
        proxy_protocol_from=proxy_protocol_from,
        max_connections=t.get("max_connections", _integer(0), 0),
        rate_limit=t.get("rate_limit", _number, 0.0),
        rate_limit_burst=t.get("rate_limit_burst", _integer(0), 0),
        header_timeout=t.get("header_timeout", _positive, 10.0),
        idle_timeout=t.get("idle_timeout", _positive, None),
        tls=tls,
        routes=routes,
    )
    return listener if name is not None and listen is not None else None


def _conflicts(a: SocketAddress, b: SocketAddress) -> bool:
    """Whether two binds would collide: the same port and family, and the same host or a
    wildcard (``0.0.0.0``/``::``) on either side. Port 0 (an ephemeral port) never collides."""
    if a.port != b.port or a.port == 0 or a.family != b.family:
        return False
    return a.host == b.host or a.ip.is_unspecified or b.ip.is_unspecified


def _listeners(
    problems: _Problems,
    value: object,
    upstreams: Mapping[str, UpstreamConfig] | None,
    admin: SocketAddress | None,
) -> tuple[ListenerConfig, ...]:
    entries = _array_of_tables(problems, "listeners", value, set(), "listeners")
    if isinstance(value, list) and not value:
        problems.add("listeners", "at least one [[listeners]] entry is required")
    listeners: list[tuple[str, ListenerConfig]] = []
    for path, data in entries:
        listener = _listener(problems, path, data, upstreams)
        if listener is not None:
            listeners.append((path, listener))
    names: dict[str, str] = {}
    for index, (path, listener) in enumerate(listeners):
        if listener.name in names:
            problems.add(
                f"{path}.name",
                f"duplicate listener name {_show(listener.name)} (also {names[listener.name]})",
            )
        names.setdefault(listener.name, path)
        for other_path, other in listeners[:index]:
            if _conflicts(listener.listen, other.listen):
                problems.add(
                    f"{path}.listen",
                    f"{listener.listen} conflicts with {other_path}.listen "
                    f"({_show(other.name)}, {other.listen})",
                )
                break
    if admin is not None:
        for path, listener in listeners:
            if _conflicts(admin, listener.listen):
                problems.add(
                    "daemon.admin",
                    f"{admin} conflicts with {path}.listen ({_show(listener.name)}, "
                    f"{listener.listen})",
                )
    return tuple(listener for _, listener in listeners)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Build a :class:`Config` from parsed TOML, or raise :class:`ConfigError` listing every
    problem found."""
    problems = _Problems()
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source}: the document must be a table"], source=source)
    _Table(problems, "", data, _TOP_KEYS)

    daemon_data = data.get("daemon", {})
    if isinstance(daemon_data, Mapping):
        daemon = _daemon(problems, daemon_data)
    else:
        problems.add("daemon", f"must be a table (got {_show(daemon_data)})")
        daemon = DaemonConfig()

    authorize, authorize_ok = _authorize(problems, data.get("authorize", []))

    node_paths: list[tuple[str, SocketAddress]] = []
    upstreams = _upstreams(problems, data.get("upstreams", {}), node_paths)

    if "listeners" in data:
        listeners = _listeners(problems, data["listeners"], upstreams, daemon.admin)
    else:
        problems.add("listeners", "at least one [[listeners]] entry is required")
        listeners = ()

    if authorize and authorize_ok:
        entries = "; ".join(str(rule) for rule in authorize)
        for path, address in node_paths:
            if not any(rule.permits_address(address) for rule in authorize):
                problems.add(
                    path, f"node {address} is not permitted by any [[authorize]] entry ({entries})"
                )

    if problems.items:
        raise ConfigError(problems.items, source=source)
    return Config(
        daemon=daemon, authorize=authorize, upstreams=upstreams or {}, listeners=listeners
    )


_TOML_POSITION_RE = re.compile(
    r"^(?P<message>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$"
)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a TOML file. An unreadable file or a syntax error is a
    :class:`ConfigError` with one problem naming the file (and the line and column)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read: {exc.strerror or exc}"], source=source
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"], source=source
        ) from None
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        match = _TOML_POSITION_RE.match(text)
        if match:
            problem = f"{source}:{match['line']}:{match['col']}: {match['message']}"
        else:
            problem = f"{source}: {text}"
        raise ConfigError([f"{problem} (TOML syntax error)"], source=source) from None
    return parse_config(data, source=source)


# --------------------------------------------------------------------------------------------
# Reports


def _table_lines(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return [
        (
            indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _describe_health(health: HealthConfig) -> str:
    if health.check == "none":
        active = "no active check"
    else:
        active = f"{health.check} check every {format_duration(health.interval)}"
        if health.check == "http":
            low, high = health.expect
            expect = str(low) if low == high else f"{low}-{high}"
            active += f" GET {health.path} expect {expect}"
    passive = (
        f"eject after {health.passive_failures} failures"
        if health.passive_failures
        else "no passive ejection"
    )
    return f"{active}, {passive}"


def describe(config: Config) -> str:
    """The one-screen summary printed by ``l4gw check``."""
    d = config.daemon
    lines = [
        f"daemon: admin {d.admin or 'off'}, workers {d.workers or 'one per CPU'}, "
        f"log {d.log_level} ({d.log_format}), access log {'on' if d.access_log else 'off'}, "
        f"drain {format_duration(d.drain_timeout)}",
        "",
        f"listeners ({len(config.listeners)}):",
    ]
    rows: list[list[str]] = []
    for listener in config.listeners:
        if listener.mode == "tcp":
            target = f"-> {listener.upstream}"
        else:
            target = f"{len(listener.routes)} route(s)"
            if listener.upstream:
                target += f", fallback {listener.upstream}"
        rows.append(
            [
                listener.name,
                str(listener.listen),
                listener.mode,
                target,
                f"tls {'yes' if listener.tls else 'no'}",
                f"allow {len(listener.allow)}",
                f"deny {len(listener.deny)}",
            ]
        )
    for listener, row in zip(config.listeners, _table_lines(rows), strict=True):
        lines.append(row)
        extras = []
        if listener.accept_proxy_protocol:
            extras.append("accepts PROXY header")
        if listener.max_connections:
            extras.append(f"max {listener.max_connections} connections")
        if listener.rate_limit:
            extras.append(f"rate limit {listener.rate_limit:g}/s burst {listener.burst}")
        if extras:
            lines.append(f"      {'; '.join(extras)}")
        for route in listener.routes:
            methods = ",".join(route.methods) or "any"
            rewrite = f" rewrite {route.rewrite}" if route.rewrite else ""
            lines.append(
                f"      route {route.host or '*'} {route.path} [{methods}] -> "
                f"{route.upstream}{rewrite}"
            )
    lines.extend(["", f"upstreams ({len(config.upstreams)}):"])
    for name, upstream in config.upstreams.items():
        parts = [upstream.balance, f"retries {upstream.retries}", _describe_health(upstream.health)]
        if upstream.proxy_protocol != "off":
            parts.append(f"PROXY {upstream.proxy_protocol}")
        if upstream.tls is not None:
            parts.append("tls" + ("" if upstream.tls.verify else " (no verify)"))
        lines.append(f"  {name}: {', '.join(parts)}")
        if upstream.discovery is not None:
            disc = upstream.discovery
            port = f":{disc.port}" if disc.port is not None else ""
            lines.append(
                f"    discovery {disc.type} {disc.name}{port} every "
                f"{format_duration(disc.interval)} via {disc.resolver or 'system resolver'}"
            )
        rows = [
            [str(node.address), f"weight {node.weight}" + (" (drained)" if not node.weight else "")]
            for node in upstream.nodes
        ]
        lines.extend(_table_lines(rows, indent="    "))
    lines.append("")
    if config.authorize:
        lines.append(f"authorization ({len(config.authorize)} entries; other nodes refused):")
        lines.extend(f"  {rule}" for rule in config.authorize)
    else:
        lines.append("authorization: none (any node address may be reached)")
    return "\n".join(lines)
