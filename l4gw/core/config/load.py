"""The loader: TOML -> a checked :class:`~.model.Config`, every problem with its key path.

No I/O except reading the file in :func:`load_config`. :func:`parse_config` checks the whole
document and reports every problem at once, each as ``"key.path: message"`` (for example
``upstreams.web.nodes[2].weight: must be an integer 0..1000 (got 1001)``), so an operator can
fix a file in one pass. Unknown keys are errors at every level. Single values are checked by
:mod:`.values`; this module walks the tables, collects the problems (:class:`_Problems`,
:class:`_Table`) and checks what involves several keys (references to upstreams, duplicate
names, conflicting binds, node authorization).

Defaults worth knowing:

- No ``[upstreams.X.health]`` table (or no ``check`` in it) means no active health check, as in
  HAProxy; passive ejection (``passive_failures`` consecutive connect failures) still applies.
- ``[daemon] admin`` defaults to ``127.0.0.1:9901``; ``""`` disables the admin endpoint.
- Once any ``[[authorize]]`` entry exists, every static node must be permitted by one of them.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast, get_args

from ..netaddr import IPNetwork, SocketAddress, parse_network, parse_port, parse_socket_address
from .model import (
    DEFAULT_ADMIN,
    HTTP_ALPN,
    AuthorizeRule,
    Balance,
    Config,
    ConfigError,
    DaemonConfig,
    DiscoveryConfig,
    DiscoveryType,
    HealthCheck,
    HealthConfig,
    ListenerConfig,
    ListenerMode,
    ListenerTLSConfig,
    LogFormat,
    LogLevel,
    NodeConfig,
    ProxyProtocol,
    RouteConfig,
    TLSCertificateConfig,
    TLSVersion,
    UpstreamConfig,
    UpstreamTLSConfig,
)
from .values import (
    _address,
    _alpn,
    _bool,
    _check_path_text,
    _check_rewrite,
    _choice,
    _dns_name,
    _duration,
    _expect,
    _file_name,
    _integer,
    _Invalid,
    _list_of,
    _method,
    _name,
    _networks,
    _no_space,
    _nonempty,
    _number,
    _optional_address,
    _optional_file_name,
    _optional_text,
    _port_range,
    _resolver,
    _route_host,
    _show,
    _string,
    _tls_version,
    format_duration,
    path_variables,
)

__all__ = ["load_config", "parse_config"]

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Problems with key paths: tables collect them while the parsers of .values raise ValueError.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


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
    # Each conflict is reported at a key the table has: when only the other one is written,
    # it conflicts with a default, and the problem says so.
    if t.ok("interval", "timeout") and health.timeout > health.interval:
        if "timeout" in t:
            t.error("timeout", f"must not exceed interval ({format_duration(health.interval)})")
        else:
            t.error(
                "interval",
                f"must not be less than timeout ({format_duration(health.timeout)}, the default)",
            )
    if (
        t.ok("ejection_time", "max_ejection_time")
        and health.max_ejection_time < health.ejection_time
    ):
        if "max_ejection_time" in t:
            t.error(
                "max_ejection_time",
                f"must not be less than ejection_time ({format_duration(health.ejection_time)})",
            )
        else:
            t.error(
                "ejection_time",
                "must not exceed max_ejection_time "
                f"({format_duration(health.max_ejection_time)}, the default)",
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
        ca=t.get("ca", _optional_file_name, None),
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
        cert = ct.require("cert", _file_name)
        key = ct.require("key", _file_name)
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
_AT_END = " (at end of document)"
#: A decimal integer longer than Python turns text into (``sys.get_int_max_str_digits``).
_LONG_INTEGER_RE = re.compile(r"[+-]?[0-9][0-9_]{4000,}")


def _position(text: str, offset: int) -> str:
    """``line:column`` (both from 1) of ``offset`` in ``text``, as tomllib counts them."""
    line = text.count("\n", 0, offset) + 1
    column = offset - text.rfind("\n", 0, offset)
    return f"{line}:{column}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a TOML file. An unreadable file or a syntax error is a
    :class:`ConfigError` with one problem naming the file (and the line and column)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read: {exc.strerror or exc}"], source=source
        ) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"], source=source
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION_RE.match(message)
        if match:
            problem = f"{source}:{match['line']}:{match['col']}: {match['message']}"
        elif message.endswith(_AT_END):
            # A truncated file: tomllib names no line; the end of the text is where it is.
            text = text.replace("\r\n", "\n")
            problem = f"{source}:{_position(text, len(text))}: {message.removesuffix(_AT_END)}"
        else:
            problem = f"{source}: {message}"
        raise ConfigError([f"{problem} (TOML syntax error)"], source=source) from None
    except ValueError:
        # tomllib lets through the ValueError of int() on an integer of more digits than
        # Python converts (4300 by default); TOML integers are 64-bit anyway.
        text = text.replace("\r\n", "\n")
        long = _LONG_INTEGER_RE.search(text)
        where = f"{source}:{_position(text, long.start())}" if long else source
        raise ConfigError(
            [f"{where}: integer out of range (TOML integers are 64-bit) (TOML syntax error)"],
            source=source,
        ) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively, without a depth limit.
        raise ConfigError(
            [f"{source}: arrays or inline tables nested too deeply (TOML syntax error)"],
            source=source,
        ) from None
    return parse_config(data, source=source)
