"""Tests for l4gw.config: the model, every validation error with its key path, the loader."""

from __future__ import annotations

import ast
import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.config import (
    AuthorizeRule,
    Config,
    ConfigError,
    DaemonConfig,
    DiscoveryConfig,
    HealthConfig,
    ListenerConfig,
    ListenerTLSConfig,
    NodeConfig,
    RouteConfig,
    TLSCertificateConfig,
    UpstreamConfig,
    UpstreamTLSConfig,
    describe,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    path_variables,
)
from l4gw.core.config import load as config_module
from l4gw.core.netaddr import SocketAddress

EXAMPLE = Path(__file__).resolve().parent.parent / "conf.toml.example"
DELETE = object()


def base() -> dict[str, Any]:
    """A small valid document that the error cases below each break in one place."""
    return {
        "upstreams": {
            "web": {"nodes": [{"address": "10.0.1.10:80", "weight": 10}, "10.0.1.11:80"]}
        },
        "listeners": [{"name": "main", "listen": "127.0.0.1:8080", "upstream": "web"}],
    }


def patched(changes: dict[tuple[Any, ...], Any], doc: dict[str, Any] | None = None) -> Any:
    """A copy of ``doc`` (default :func:`base`) with a value set (or deleted) at each path;
    missing intermediate tables are created."""
    data: Any = copy.deepcopy(doc if doc is not None else base())
    for path, value in changes.items():
        target = data
        for key in path[:-1]:
            if isinstance(target, dict) and key not in target:
                target[key] = {}
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        elif isinstance(target, list) and path[-1] == len(target):
            target.append(value)
        else:
            target[path[-1]] = value
    return data


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def assert_problems(data: Any, *expected: str) -> None:
    """Exactly one problem per expected prefix, in order."""
    problems = problems_of(data)
    assert len(problems) == len(expected), problems
    for problem, prefix in zip(problems, expected, strict=True):
        assert problem.startswith(prefix), (problem, prefix)


# ---------------------------------------------------------------------------------------------
# Valid documents


def test_minimal_document_gets_the_defaults() -> None:
    config = parse_config(base())
    assert config.daemon == DaemonConfig()
    assert config.daemon.admin == SocketAddress("127.0.0.1", 9901)
    assert config.daemon.log_level == "info"
    assert config.daemon.log_format == "json"
    assert config.daemon.access_log is True
    assert config.daemon.drain_timeout == 30.0
    assert config.daemon.workers == 1
    assert config.authorize == ()
    assert not config.authorization_enabled
    web = config.upstreams["web"]
    assert web == UpstreamConfig(
        name="web",
        nodes=(
            NodeConfig(SocketAddress("10.0.1.10", 80), 10),
            NodeConfig(SocketAddress("10.0.1.11", 80), 1),
        ),
    )
    assert web.balance == "round_robin"
    assert web.retries == 5  # the SPEC default
    assert web.health.check == "none"
    assert web.health.passive_failures == 3
    assert web.discovery is None
    assert web.tls is None
    (listener,) = config.listeners
    assert listener == ListenerConfig(
        name="main", listen=SocketAddress("127.0.0.1", 8080), upstream="web"
    )
    assert listener.mode == "tcp"
    assert listener.idle_timeout is None
    assert listener.header_timeout == 10.0
    assert listener.burst == 0


BIG: dict[str, Any] = {
    "daemon": {
        "admin": "[::1]:9000",
        "log_level": "debug",
        "log_format": "console",
        "access_log": False,
        "drain_timeout": "1m",
        "workers": 0,
    },
    "authorize": [
        {"name": "web", "address": "10.0.1.0/24", "ports": [80, "8000-8099"]},
        {"name": "v6", "address": "fd00::/64", "ports": ["443"]},
    ],
    "upstreams": {
        "web": {
            "balance": "source_hash",
            "retries": 7,
            "connect_timeout": "250ms",
            "idle_timeout": 90,
            "proxy_protocol": "v1",
            "host_header": "web.internal",
            "max_connections_per_node": 64,
            "response_timeout": 12.5,
            "nodes": [
                {"address": "10.0.1.10:80", "weight": 0},
                "10.0.1.11:8050",
            ],
            "health": {
                "check": "http",
                "path": "/ping",
                "expect": 204,
                "interval": "10s",
                "timeout": "10s",
                "healthy_threshold": 1,
                "unhealthy_threshold": 100,
                "fail_open": False,
                "passive_failures": 0,
                "ejection_time": "1m",
                "max_ejection_time": "1m",
                "max_ejected_percent": 0,
            },
            "tls": {"verify": False, "ca": "/ca.pem", "server_name": "web.internal"},
        },
        "svc": {
            "discovery": {
                "name": "_http._tcp.Svc.Internal.",
                "type": "srv",
                "interval": "2m",
                "resolver": "10.0.0.2",
            },
        },
        "v6": {
            "nodes": [{"address": "[FD00::0001]:443"}],
            "discovery": {
                "name": "v6.internal",
                "type": "AAAA",
                "port": 443,
                "resolver": "[fd00::53]:5353",
                "weight": 0,
            },
        },
    },
    "listeners": [
        {
            "name": "l4",
            "listen": "0.0.0.0:8080",
            "upstream": "web",
            "allow": ["10.0.0.0/8", "fd00::/8"],
            "deny": ["10.0.9.0/24"],
            "accept_proxy_protocol": True,
            "proxy_protocol_from": ["192.168.1.1"],
            "max_connections": 5,
            "rate_limit": 2.5,
            "tls": {
                "certificates": [{"cert": "a.pem", "key": "a.key"}],
                "min_version": "1.3",
                "alpn": ["x-custom"],
            },
        },
        {
            "name": "l7",
            "listen": "[::]:8443",
            "mode": "http",
            "rate_limit": 10,
            "rate_limit_burst": 30,
            "header_timeout": "5s",
            "idle_timeout": "30s",
            "tls": {"certificates": [{"cert": "b.pem", "key": "b.key"}], "min_version": 1.2},
            "routes": [
                {
                    "host": "API.Example.com",
                    "path": "/users/{id}/{rest+}",
                    "methods": ["get", "POST", "GET"],
                    "upstream": "v6",
                    "rewrite": "/u/{id}/{rest}",
                    "host_header": "users.internal",
                },
                {"host": "*.example.com", "path": "/", "upstream": "svc", "host_header": ""},
                {"host": "", "path": "/a/{p+}", "upstream": "web", "rewrite": "/b/{p+}"},
            ],
        },
    ],
}


def test_big_document_round_trips_into_the_model() -> None:
    config = parse_config(BIG)
    expected = Config(
        daemon=DaemonConfig(
            admin=SocketAddress("::1", 9000),
            log_level="debug",
            log_format="console",
            access_log=False,
            drain_timeout=60.0,
            workers=0,
        ),
        authorize=(
            AuthorizeRule("web", ipaddress.ip_network("10.0.1.0/24"), ((80, 80), (8000, 8099))),
            AuthorizeRule("v6", ipaddress.ip_network("fd00::/64"), ((443, 443),)),
        ),
        upstreams={
            "web": UpstreamConfig(
                name="web",
                balance="source_hash",
                retries=7,
                connect_timeout=0.25,
                idle_timeout=90.0,
                proxy_protocol="v1",
                host_header="web.internal",
                max_connections_per_node=64,
                response_timeout=12.5,
                nodes=(
                    NodeConfig(SocketAddress("10.0.1.10", 80), 0),
                    NodeConfig(SocketAddress("10.0.1.11", 8050), 1),
                ),
                health=HealthConfig(
                    check="http",
                    path="/ping",
                    expect=(204, 204),
                    interval=10.0,
                    timeout=10.0,
                    healthy_threshold=1,
                    unhealthy_threshold=100,
                    fail_open=False,
                    passive_failures=0,
                    ejection_time=60.0,
                    max_ejection_time=60.0,
                    max_ejected_percent=0,
                ),
                tls=UpstreamTLSConfig(verify=False, ca="/ca.pem", server_name="web.internal"),
            ),
            "svc": UpstreamConfig(
                name="svc",
                discovery=DiscoveryConfig(
                    name="_http._tcp.svc.internal",
                    type="SRV",
                    port=None,
                    interval=120.0,
                    resolver=SocketAddress("10.0.0.2", 53),
                ),
            ),
            "v6": UpstreamConfig(
                name="v6",
                nodes=(NodeConfig(SocketAddress("fd00::1", 443), 1),),
                discovery=DiscoveryConfig(
                    name="v6.internal",
                    type="AAAA",
                    port=443,
                    resolver=SocketAddress("fd00::53", 5353),
                    weight=0,
                ),
            ),
        },
        listeners=(
            ListenerConfig(
                name="l4",
                listen=SocketAddress("0.0.0.0", 8080),
                upstream="web",
                allow=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
                deny=(ipaddress.ip_network("10.0.9.0/24"),),
                accept_proxy_protocol=True,
                proxy_protocol_from=(ipaddress.ip_network("192.168.1.1/32"),),
                max_connections=5,
                rate_limit=2.5,
                tls=ListenerTLSConfig(
                    certificates=(TLSCertificateConfig("a.pem", "a.key"),),
                    min_version="1.3",
                    alpn=("x-custom",),
                ),
            ),
            ListenerConfig(
                name="l7",
                listen=SocketAddress("::", 8443),
                mode="http",
                rate_limit=10.0,
                rate_limit_burst=30,
                header_timeout=5.0,
                idle_timeout=30.0,
                tls=ListenerTLSConfig(
                    certificates=(TLSCertificateConfig("b.pem", "b.key"),), min_version="1.2"
                ),
                routes=(
                    RouteConfig(
                        host="api.example.com",
                        path="/users/{id}/{rest+}",
                        methods=("GET", "POST"),
                        upstream="v6",
                        rewrite="/u/{id}/{rest}",
                        host_header="users.internal",
                    ),
                    RouteConfig(host="*.example.com", path="/", upstream="svc"),
                    RouteConfig(path="/a/{p+}", upstream="web", rewrite="/b/{p+}"),
                ),
            ),
        ),
    )
    assert config == expected
    assert list(config.upstreams) == ["web", "svc", "v6"]
    assert config.listeners[0].burst == 3  # the rate rounded up
    assert config.listeners[1].burst == 30


def test_example_file_is_valid_and_uses_every_key() -> None:
    config = load_config(EXAMPLE)
    assert [listener.name for listener in config.listeners] == ["vpc-link", "public-api"]
    assert config.authorization_enabled
    web = config.upstreams["web"]
    assert web.health.check == "http"
    assert web.discovery is not None and web.discovery.port == 80
    assert config.upstreams["api"].tls is not None
    assert config.listeners[1].tls is not None and len(config.listeners[1].tls.certificates) == 2
    assert config.listeners[1].routes[0].rewrite == "/users/{id}/{rest}"
    # Every key the loader knows appears in the example.
    text = EXAMPLE.read_text()
    module = config_module
    for keys in (
        module._DAEMON_KEYS,
        module._AUTHORIZE_KEYS,
        module._UPSTREAM_KEYS,
        module._NODE_KEYS,
        module._HEALTH_KEYS,
        module._DISCOVERY_KEYS,
        module._UPSTREAM_TLS_KEYS,
        module._LISTENER_KEYS,
        module._LISTENER_TLS_KEYS,
        module._CERTIFICATE_KEYS,
        module._ROUTE_KEYS,
    ):
        for key in keys:
            assert f"{key} =" in text or f"{key}]" in text, key
    # Every static node is covered by the example's [[authorize]] entries.
    for upstream in config.upstreams.values():
        for node in upstream.nodes:
            assert config.authorization_for(node.address) is not None


def test_http_listener_alpn_default_and_tcp_listener_alpn_default() -> None:
    tls = {"certificates": [{"cert": "c.pem", "key": "c.key"}]}
    data = patched(
        {
            ("listeners", 0, "tls"): tls,
            ("listeners", 1): {
                "name": "h",
                "listen": "127.0.0.1:8081",
                "mode": "http",
                "upstream": "web",
                "tls": tls,
            },
        }
    )
    config = parse_config(data)
    assert config.listeners[0].tls is not None and config.listeners[0].tls.alpn == ()
    assert config.listeners[1].tls is not None and config.listeners[1].tls.alpn == ("http/1.1",)


def test_http_listener_with_routes_needs_no_fallback_upstream() -> None:
    data = patched(
        {
            ("listeners", 0, "mode"): "http",
            ("listeners", 0, "upstream"): DELETE,
            ("listeners", 0, "routes"): [{"path": "/", "upstream": "web"}],
        }
    )
    assert parse_config(data).listeners[0].upstream is None


def test_admin_can_be_disabled_and_use_port_zero() -> None:
    assert parse_config(patched({("daemon", "admin"): ""})).daemon.admin is None
    admin = parse_config(patched({("daemon", "admin"): "127.0.0.1:0"})).daemon.admin
    assert admin == SocketAddress("127.0.0.1", 0)


def test_upstream_with_only_discovery_is_valid() -> None:
    data = patched(
        {("upstreams", "web"): {"discovery": {"name": "web.internal", "port": 80}}},
    )
    discovery = parse_config(data).upstreams["web"].discovery
    assert discovery == DiscoveryConfig(name="web.internal", port=80)


# ---------------------------------------------------------------------------------------------
# IPv6


def test_ipv6_addresses_everywhere() -> None:
    data = patched(
        {
            ("daemon", "admin"): "[::1]:9901",
            ("upstreams", "web", "nodes"): ["[2001:db8::0:1]:80", {"address": "[::1]:81"}],
            ("listeners", 0, "listen"): "[::]:8080",
            ("listeners", 0, "allow"): ["2001:db8::/32", "::1"],
        }
    )
    config = parse_config(data)
    assert config.daemon.admin == SocketAddress("::1", 9901)
    nodes = config.upstreams["web"].nodes
    assert [str(node.address) for node in nodes] == ["[2001:db8::1]:80", "[::1]:81"]
    assert str(config.listeners[0].listen) == "[::]:8080"
    assert config.listeners[0].allow[1] == ipaddress.ip_network("::1/128")


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("::1:8080", 'listeners[0].listen: "::1:8080": write IPv6 addresses in brackets'),
        ("[::1]8080", "listeners[0].listen: '[::1]8080' is not \"[ipv6]:port\""),
        ("[fe80::zz]:80", "listeners[0].listen: 'fe80::zz' is not an IPv6 address"),
        ("[::1]:65536", "listeners[0].listen: port 65536 is out of range 0..65535"),
    ],
)
def test_bad_ipv6_addresses(listen: str, message: str) -> None:
    problems = problems_of(patched({("listeners", 0, "listen"): listen}))
    assert len(problems) == 1
    # netaddr quotes with repr(); compare without caring about the quote style.
    assert problems[0].replace("'", '"').startswith(message.replace("'", '"'))


# ---------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (1.5, 1.5),
        ("0ms", 0.0),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        (" 3s ", 3.0),
        ("0.5h", 1800.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "must be a duration"),
        (False, "must be a duration"),
        (None, "must be a duration"),
        ([1], "must be a duration"),
        ("5", "must be a duration"),
        ("5 sec", "must be a duration"),
        ("1d", "must be a duration"),
        ("", "must be a duration"),
        ("s", "must be a duration"),
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        ("-5s", "must not be negative"),
        (float("inf"), "must be a finite duration"),
        (float("nan"), "must be a finite duration"),
        (10**400, "is too large"),
        ("1e400h", "is too large"),
        # Found by tests/test_config_fuzz.py: Fraction built 10**9999999 (seconds of CPU;
        # minutes for one more digit), or int() refused 5000 digits in Python's words.
        ("1e9999999s", "must be a duration"),
        ("1" * 5000 + "s", "must be a duration"),
        ("0." + "0" * 5000 + "1s", "must be a duration"),
    ],
)
def test_parse_duration_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@given(st.integers(min_value=0, max_value=10**12))
def test_any_number_of_ms_parses_and_formats_back(millis: int) -> None:
    seconds = parse_duration(f"{millis}ms")
    assert seconds == millis / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert text.endswith(("ms", "s", "m", "h"))


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_any_duration_formats_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_picks_the_largest_exact_unit() -> None:
    assert [format_duration(s) for s in (0, 0.25, 5, 90, 120, 7200, 0.0001)] == [
        "0s",
        "250ms",
        "5s",
        "90s",
        "2m",
        "2h",
        "0.0001s",
    ]


# ---------------------------------------------------------------------------------------------
# Every error path, with its key path


ERROR_CASES: list[tuple[dict[tuple[Any, ...], Any], list[str]]] = [
    # top level
    ({("bogus",): 1}, ["bogus: unknown key (allowed: daemon, authorize, upstreams, listeners)"]),
    ({("listeners",): DELETE}, ["listeners: at least one [[listeners]] entry is required"]),
    # [daemon]
    ({("daemon",): "x"}, ['daemon: must be a table (got "x")']),
    (
        {("daemon", "extra"): 1},
        [
            "daemon.extra: unknown key (allowed: admin, log_level, log_format, access_log, "
            "drain_timeout, workers)"
        ],
    ),
    ({("daemon", "admin"): "localhost:9901"}, ["daemon.admin: 'localhost' is not an IP address"]),
    ({("daemon", "admin"): 9901}, ['daemon.admin: must be a string "ip:port"']),
    (
        {("daemon", "log_level"): "trace"},
        ['daemon.log_level: must be one of debug, info, warning, error (got "trace")'],
    ),
    ({("daemon", "log_format"): "text"}, ["daemon.log_format: must be one of json, console"]),
    ({("daemon", "access_log"): "yes"}, ['daemon.access_log: must be true or false (got "yes")']),
    ({("daemon", "access_log"): 1}, ["daemon.access_log: must be true or false (got 1)"]),
    ({("daemon", "drain_timeout"): "30"}, ["daemon.drain_timeout: must be a duration"]),
    ({("daemon", "drain_timeout"): -1}, ["daemon.drain_timeout: must not be negative"]),
    ({("daemon", "workers"): 257}, ["daemon.workers: must be an integer 0..256 (got 257)"]),
    ({("daemon", "workers"): True}, ["daemon.workers: must be an integer 0..256 (got true)"]),
    ({("daemon", "workers"): 2.0}, ["daemon.workers: must be an integer 0..256 (got 2.0)"]),
    # [upstreams]
    ({("upstreams",): []}, ["upstreams: must be a table of [upstreams.NAME] tables"]),
    (
        {("upstreams", "web"): "x"},
        [
            'upstreams.web: must be a table (got "x")',
            'listeners[0].upstream: no upstream named "web" (defined: none)',
        ],
    ),
    (
        {("upstreams", "bad name"): {"nodes": ["10.0.0.1:1"]}},
        ['upstreams."bad name": upstream name must be a name of up to 64 letters'],
    ),
    (
        {("upstreams", "web", "extra"): 1},
        ["upstreams.web.extra: unknown key (allowed: balance, retries, connect_timeout"],
    ),
    (
        {("upstreams", "web", "balance"): "rr"},
        [
            "upstreams.web.balance: must be one of round_robin, least_conn, random_two, "
            'source_hash (got "rr")'
        ],
    ),
    ({("upstreams", "web", "retries"): 0}, ["upstreams.web.retries: must be an integer 1..100"]),
    ({("upstreams", "web", "retries"): 101}, ["upstreams.web.retries: must be an integer 1..100"]),
    (
        {("upstreams", "web", "connect_timeout"): "0s"},
        ["upstreams.web.connect_timeout: must be greater than 0"],
    ),
    (
        {("upstreams", "web", "idle_timeout"): "5 sec"},
        ["upstreams.web.idle_timeout: must be a duration"],
    ),
    (
        {("upstreams", "web", "proxy_protocol"): "v3"},
        ['upstreams.web.proxy_protocol: must be one of off, v1, v2 (got "v3")'],
    ),
    (
        {("upstreams", "web", "proxy_protocol"): False},
        ["upstreams.web.proxy_protocol: must be one of off, v1, v2 (got false)"],
    ),
    (
        {("upstreams", "web", "host_header"): "a b"},
        ["upstreams.web.host_header: must not contain spaces"],
    ),
    (
        {("upstreams", "web", "max_connections_per_node"): -1},
        ["upstreams.web.max_connections_per_node: must be an integer >= 0 (got -1)"],
    ),
    (
        {("upstreams", "web", "response_timeout"): True},
        ["upstreams.web.response_timeout: must be a duration"],
    ),
    # nodes
    ({("upstreams", "web", "nodes"): "10.0.1.10:80"}, ["upstreams.web.nodes: must be an array"]),
    (
        {("upstreams", "web", "nodes"): []},
        ["upstreams.web: has no nodes: give nodes = [...] or a [upstreams.web.discovery] section"],
    ),
    (
        {("upstreams", "web", "nodes"): DELETE},
        ["upstreams.web: has no nodes"],
    ),
    (
        {("upstreams", "web", "nodes", 2): {"address": "10.0.1.12:80", "weight": 1001}},
        ["upstreams.web.nodes[2].weight: must be an integer 0..1000 (got 1001)"],
    ),
    (
        {("upstreams", "web", "nodes", 0, "weight"): -1},
        ["upstreams.web.nodes[0].weight: must be an integer 0..1000 (got -1)"],
    ),
    (
        {("upstreams", "web", "nodes", 0, "weight"): False},
        ["upstreams.web.nodes[0].weight: must be an integer 0..1000 (got false)"],
    ),
    (
        {("upstreams", "web", "nodes", 0, "address"): DELETE},
        ["upstreams.web.nodes[0].address: is required"],
    ),
    (
        {("upstreams", "web", "nodes", 0, "address"): "web:80"},
        ["upstreams.web.nodes[0].address: 'web' is not an IP address (host names belong in"],
    ),
    (
        {("upstreams", "web", "nodes", 1): "10.0.1.11"},
        ["upstreams.web.nodes[1]: '10.0.1.11' is not \"ip:port\""],
    ),
    (
        {("upstreams", "web", "nodes", 1): "10.0.1.11:0"},
        ["upstreams.web.nodes[1]: port 0 is out of range 1..65535"],
    ),
    (
        {("upstreams", "web", "nodes", 1): "10.0.1.10:80"},
        ["upstreams.web.nodes[1]: 10.0.1.10:80 is listed twice (also nodes[0])"],
    ),
    (
        {("upstreams", "web", "nodes", 2): {"address": "10.0.1.11:80"}},
        ["upstreams.web.nodes[2].address: 10.0.1.11:80 is listed twice (also nodes[1])"],
    ),
    (
        {("upstreams", "web", "nodes", 1): 5},
        ['upstreams.web.nodes[1]: must be "ip:port" or { address = "ip:port", weight = N }'],
    ),
    (
        {("upstreams", "web", "nodes", 0, "port"): 80},
        ["upstreams.web.nodes[0].port: unknown key (allowed: address, weight)"],
    ),
    # health
    (
        {("upstreams", "web", "health"): "tcp"},
        ['upstreams.web.health: must be a table (got "tcp")'],
    ),
    (
        {("upstreams", "web", "health", "extra"): 1},
        ["upstreams.web.health.extra: unknown key (allowed: check, path, expect, interval"],
    ),
    (
        {("upstreams", "web", "health", "check"): "udp"},
        ['upstreams.web.health.check: must be one of none, tcp, http (got "udp")'],
    ),
    (
        {("upstreams", "web", "health", "path"): "healthz"},
        ['upstreams.web.health.path: path must start with "/"'],
    ),
    (
        {("upstreams", "web", "health", "expect"): "600"},
        ['upstreams.web.health.expect: must be a status 100..599 or a range like "200-399"'],
    ),
    (
        {("upstreams", "web", "health", "expect"): "399-200"},
        ["upstreams.web.health.expect: must be a status 100..599"],
    ),
    (
        {("upstreams", "web", "health", "expect"): "2xx"},
        ["upstreams.web.health.expect: must be a status 100..599"],
    ),
    (
        {("upstreams", "web", "health", "expect"): True},
        ["upstreams.web.health.expect: must be a status 100..599"],
    ),
    (
        {("upstreams", "web", "health", "interval"): 0},
        ["upstreams.web.health.interval: must be greater than 0"],
    ),
    (
        {("upstreams", "web", "health", "timeout"): "10s"},
        ["upstreams.web.health.timeout: must not exceed interval (5s)"],
    ),
    (
        {("upstreams", "web", "health", "timeout"): 0},
        ["upstreams.web.health.timeout: must be greater than 0"],
    ),
    (
        {("upstreams", "web", "health", "healthy_threshold"): 0},
        ["upstreams.web.health.healthy_threshold: must be an integer 1..100 (got 0)"],
    ),
    (
        {("upstreams", "web", "health", "unhealthy_threshold"): 101},
        ["upstreams.web.health.unhealthy_threshold: must be an integer 1..100 (got 101)"],
    ),
    (
        {("upstreams", "web", "health", "fail_open"): "true"},
        ['upstreams.web.health.fail_open: must be true or false (got "true")'],
    ),
    (
        {("upstreams", "web", "health", "passive_failures"): 101},
        ["upstreams.web.health.passive_failures: must be an integer 0..100 (got 101)"],
    ),
    (
        {("upstreams", "web", "health", "ejection_time"): -1},
        ["upstreams.web.health.ejection_time: must not be negative"],
    ),
    (
        {("upstreams", "web", "health", "max_ejection_time"): "10s"},
        ["upstreams.web.health.max_ejection_time: must not be less than ejection_time (30s)"],
    ),
    (
        {("upstreams", "web", "health", "max_ejected_percent"): 101},
        ["upstreams.web.health.max_ejected_percent: must be an integer 0..100 (got 101)"],
    ),
    # discovery
    ({("upstreams", "web", "discovery"): 1}, ["upstreams.web.discovery: must be a table (got 1)"]),
    (
        {("upstreams", "web", "discovery"): {"port": 80}},
        ["upstreams.web.discovery.name: is required"],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "bad name!", "port": 80}},
        ['upstreams.web.discovery.name: "bad name!" is not a valid DNS name'],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "a..b", "port": 80}},
        ['upstreams.web.discovery.name: "a..b" is not a valid DNS name'],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.internal", "type": "MX", "port": 80}},
        ['upstreams.web.discovery.type: must be one of A, AAAA, SRV (got "MX")'],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.internal"}},
        ['upstreams.web.discovery.port: is required with type = "A"'],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.internal", "type": "AAAA"}},
        ['upstreams.web.discovery.port: is required with type = "AAAA"'],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "_w._tcp.x", "type": "SRV", "port": 80}},
        ['upstreams.web.discovery.port: not allowed with type = "SRV"'],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "_w._tcp.x", "type": "SRV", "weight": 2}},
        ['upstreams.web.discovery.weight: not allowed with type = "SRV"'],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.internal", "port": 0}},
        ["upstreams.web.discovery.port: port 0 is out of range 1..65535"],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.x", "port": 80, "interval": 0}},
        ["upstreams.web.discovery.interval: must be greater than 0"],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.x", "port": 80, "resolver": "dns.google"}},
        ["upstreams.web.discovery.resolver: 'dns.google' is not \"ip:port\""],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.x", "port": 80, "weight": 2000}},
        ["upstreams.web.discovery.weight: must be an integer 0..1000 (got 2000)"],
    ),
    (
        {("upstreams", "web", "discovery"): {"name": "w.x", "port": 80, "ttl": 5}},
        ["upstreams.web.discovery.ttl: unknown key (allowed: name, type, port, interval"],
    ),
    # upstream tls
    ({("upstreams", "web", "tls"): True}, ["upstreams.web.tls: must be a table (got true)"]),
    (
        {("upstreams", "web", "tls", "verify"): "no"},
        ['upstreams.web.tls.verify: must be true or false (got "no")'],
    ),
    ({("upstreams", "web", "tls", "ca"): 1}, ["upstreams.web.tls.ca: must be a string (got 1)"]),
    # A conflict with a default named the key that was not written (found by
    # tests/test_config_fuzz.py): now the key that was.
    (
        {("upstreams", "web", "health"): {"interval": "250ms"}},
        ["upstreams.web.health.interval: must not be less than timeout (2s, the default)"],
    ),
    (
        {("upstreams", "web", "health"): {"ejection_time": "1h"}},
        ["upstreams.web.health.ejection_time: must not exceed max_ejection_time (5m, the default)"],
    ),
    # Unicode and overlong digits: int() raised in Python's words ("invalid literal for int()",
    # "Exceeds the limit (4300 digits)"), found by tests/test_config_fuzz.py.
    (
        {("upstreams", "web", "nodes"): ["10.0.1.10:\u00b2", "10.0.1.10:" + "9" * 5000]},
        [
            "upstreams.web.nodes[0]: '\u00b2' is not a port number",
            "upstreams.web.nodes[1]: '999",
            "upstreams.web: has no nodes",
        ],
    ),
    (
        {("upstreams", "web", "health", "expect"): "\u00b2"},
        ['upstreams.web.health.expect: must be a status 100..599 or a range like "200-399"'],
    ),
    (
        {("upstreams", "web", "health", "expect"): "200-" + "9" * 5000},
        ['upstreams.web.health.expect: must be a status 100..599 or a range like "200-399"'],
    ),
    # A NUL in a file name made open() raise ValueError out of `l4gw check` and out of a
    # SIGHUP reload, which stopped the daemon (found by tests/test_config_fuzz.py).
    (
        {("upstreams", "web", "tls", "ca"): "/ca\x00.pem"},
        ['upstreams.web.tls.ca: must not contain a NUL character (got "/ca\\u0000.pem")'],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": [{"cert": "c\x00", "key": "k\x00"}]}},
        [
            'listeners[0].tls.certificates[0].cert: must not contain a NUL character (got "c',
            'listeners[0].tls.certificates[0].key: must not contain a NUL character (got "k',
        ],
    ),
    (
        {("upstreams", "web", "tls", "server_name"): "a b"},
        ["upstreams.web.tls.server_name: must not contain spaces"],
    ),
    (
        {("upstreams", "web", "tls", "cert"): "c.pem"},
        ["upstreams.web.tls.cert: unknown key (allowed: verify, ca, server_name)"],
    ),
    # [[listeners]]
    ({("listeners",): {"name": "x"}}, ["listeners: must be an array of tables (got a table)"]),
    ({("listeners",): []}, ["listeners: at least one [[listeners]] entry is required"]),
    ({("listeners", 0): "x"}, ['listeners[0]: must be a table (got "x")']),
    (
        {("listeners", 0, "extra"): 1},
        ["listeners[0].extra: unknown key (allowed: name, listen, mode, upstream, allow"],
    ),
    ({("listeners", 0, "name"): DELETE}, ["listeners[0].name: is required"]),
    ({("listeners", 0, "name"): ""}, ["listeners[0].name: must not be empty"]),
    ({("listeners", 0, "name"): "a b"}, ["listeners[0].name: must be a name of up to 64"]),
    ({("listeners", 0, "name"): 3}, ["listeners[0].name: must be a string (got 3)"]),
    ({("listeners", 0, "listen"): DELETE}, ["listeners[0].listen: is required"]),
    ({("listeners", 0, "listen"): "127.0.0.1"}, ["listeners[0].listen: '127.0.0.1' is not"]),
    (
        {("listeners", 0, "mode"): "udp"},
        ['listeners[0].mode: must be one of tcp, http (got "udp")'],
    ),
    (
        {("listeners", 0, "upstream"): "nope"},
        ['listeners[0].upstream: no upstream named "nope" (defined: web)'],
    ),
    (
        {("listeners", 0, "upstream"): DELETE},
        ['listeners[0].upstream: is required with mode = "tcp"'],
    ),
    (
        {("listeners", 0, "upstream"): DELETE, ("listeners", 0, "mode"): "http"},
        ['listeners[0]: mode = "http" needs an upstream (the fallback) or at least one'],
    ),
    (
        {("listeners", 0, "routes"): [{"path": "/", "upstream": "web"}]},
        ['listeners[0].routes: only allowed with mode = "http"'],
    ),
    (
        {("listeners", 0, "allow"): "10.0.0.0/8"},
        ['listeners[0].allow: must be an array of IP addresses or CIDRs (got "10.0.0.0/8")'],
    ),
    (
        {("listeners", 0, "allow"): ["10.0.0.0/8", "10.0.0.300"]},
        ["listeners[0].allow[1]: '10.0.0.300' is not an IP address or CIDR"],
    ),
    (
        {("listeners", 0, "deny"): ["10.0.0.1/8"]},
        ["listeners[0].deny[0]: '10.0.0.1/8' is not an IP address or CIDR (10.0.0.1/8 has host"],
    ),
    (
        {("listeners", 0, "accept_proxy_protocol"): "yes"},
        ['listeners[0].accept_proxy_protocol: must be true or false (got "yes")'],
    ),
    (
        {("listeners", 0, "proxy_protocol_from"): ["10.0.0.1"]},
        ["listeners[0].proxy_protocol_from: has no effect unless accept_proxy_protocol = true"],
    ),
    (
        {
            ("listeners", 0, "accept_proxy_protocol"): True,
            ("listeners", 0, "proxy_protocol_from"): [1],
        },
        ["listeners[0].proxy_protocol_from[0]: must be a string IP address or CIDR"],
    ),
    (
        {("listeners", 0, "max_connections"): -1},
        ["listeners[0].max_connections: must be an integer >= 0 (got -1)"],
    ),
    ({("listeners", 0, "rate_limit"): -1}, ["listeners[0].rate_limit: must be a number >= 0"]),
    (
        {("listeners", 0, "rate_limit"): True},
        ["listeners[0].rate_limit: must be a number >= 0 (got true)"],
    ),
    (
        {("listeners", 0, "rate_limit"): "5"},
        ['listeners[0].rate_limit: must be a number >= 0 (got "5")'],
    ),
    (
        # Past a float (found by tests/test_config_fuzz.py): was an OverflowError.
        {("listeners", 0, "rate_limit"): 10**400},
        ["listeners[0].rate_limit: must be a number >= 0 (got 1000"],
    ),
    (
        {("listeners", 0, "rate_limit_burst"): 1.5},
        ["listeners[0].rate_limit_burst: must be an integer >= 0 (got 1.5)"],
    ),
    (
        {("listeners", 0, "header_timeout"): 0},
        ["listeners[0].header_timeout: must be greater than 0"],
    ),
    (
        {("listeners", 0, "idle_timeout"): "forever"},
        ["listeners[0].idle_timeout: must be a duration"],
    ),
    (
        {("listeners", 1): {"name": "main", "listen": "127.0.0.1:8081", "upstream": "web"}},
        ['listeners[1].name: duplicate listener name "main" (also listeners[0])'],
    ),
    # listener tls
    ({("listeners", 0, "tls"): []}, ["listeners[0].tls: must be a table (got an array)"]),
    (
        {("listeners", 0, "tls"): {"min_version": "1.3"}},
        ['listeners[0].tls.certificates: is required: [{ cert = "file.pem", key = "file.key" }]'],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": []}},
        ["listeners[0].tls.certificates: must not be empty"],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": "c.pem"}},
        ['listeners[0].tls.certificates: must be an array of tables (got "c.pem")'],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": [{"cert": "c.pem"}]}},
        ["listeners[0].tls.certificates[0].key: is required"],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": [{"cert": "", "key": "k"}]}},
        ["listeners[0].tls.certificates[0].cert: must not be empty"],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": [{"cert": "c", "key": "k", "chain": "x"}]}},
        ["listeners[0].tls.certificates[0].chain: unknown key (allowed: cert, key)"],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": [{"cert": "c", "key": "k"}], "sni": 1}},
        ["listeners[0].tls.sni: unknown key (allowed: certificates, min_version, alpn)"],
    ),
    (
        {
            ("listeners", 0, "tls"): {
                "certificates": [{"cert": "c", "key": "k"}],
                "min_version": "1.1",
            }
        },
        ['listeners[0].tls.min_version: must be "1.2" or "1.3" (got "1.1")'],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": [{"cert": "c", "key": "k"}], "alpn": "h2"}},
        ['listeners[0].tls.alpn: must be an array of strings (got "h2")'],
    ),
    (
        {("listeners", 0, "tls"): {"certificates": [{"cert": "c", "key": "k"}], "alpn": [""]}},
        ["listeners[0].tls.alpn[0]: must not be empty"],
    ),
    (
        {
            ("listeners", 0, "mode"): "http",
            ("listeners", 0, "tls"): {
                "certificates": [{"cert": "c", "key": "k"}],
                "alpn": ["http/1.1", "h2"],
            },
        },
        ['listeners[0].tls.alpn[1]: "h2" is not spoken in mode = "http" (allowed: http/1.1,'],
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    ERROR_CASES,
    ids=[
        str(expected[0].partition(":")[0]) + f"-{i}" for i, (_, expected) in enumerate(ERROR_CASES)
    ],
)
def test_error_paths(changes: dict[tuple[Any, ...], Any], expected: list[str]) -> None:
    assert_problems(patched(changes), *expected)


def http_doc(**route: Any) -> Any:
    """:func:`base` with listener 0 in http mode and one route built from ``route``."""
    return patched(
        {
            ("listeners", 0, "mode"): "http",
            ("listeners", 0, "routes"): [{"path": "/", "upstream": "web", **route}],
        }
    )


ROUTE_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"path": DELETE}, "listeners[0].routes[0].path: is required"),
    ({"path": 5}, "listeners[0].routes[0].path: must be a string (got 5)"),
    ({"path": "foo"}, 'listeners[0].routes[0].path: path must start with "/" (got "foo")'),
    ({"path": "/a b"}, "listeners[0].routes[0].path: path must not contain spaces"),
    ({"path": "/a?b=1"}, 'listeners[0].routes[0].path: path must not contain "?"'),
    (
        {"path": "/a/{proxy+}/b"},
        "listeners[0].routes[0].path: the greedy variable {proxy+} must be the last segment",
    ),
    (
        {"path": "/{a+}/{b+}"},
        "listeners[0].routes[0].path: the greedy variable {a+} must be the last segment",
    ),
    ({"path": "/a/{x}/{x}"}, "listeners[0].routes[0].path: variable {x} appears twice"),
    ({"path": "/a/{x}/{x+}"}, "listeners[0].routes[0].path: variable {x} appears twice"),
    (
        {"path": "/a/x{id}"},
        'listeners[0].routes[0].path: segment "x{id}": a variable is a whole segment',
    ),
    ({"path": "/a/{1x}"}, 'listeners[0].routes[0].path: segment "{1x}": a variable is'),
    ({"path": "/a/{}"}, 'listeners[0].routes[0].path: segment "{}": a variable is'),
    ({"path": "/a/{x"}, 'listeners[0].routes[0].path: segment "{x": a variable is'),
    ({"path": "/a/{x+y}"}, 'listeners[0].routes[0].path: segment "{x+y}": a variable is'),
    (
        {"path": "/u/{id}", "rewrite": "/v/{other}"},
        "listeners[0].routes[0].rewrite: {other} is not a variable of the path (variables: {id})",
    ),
    (
        {"rewrite": "/v/{x}"},
        "listeners[0].routes[0].rewrite: {x} is not a variable of the path (variables: none)",
    ),
    (
        {"path": "/u/{id}", "rewrite": "/v/{id+}"},
        "listeners[0].routes[0].rewrite: {id+}: {id} is not greedy in the path",
    ),
    (
        {"path": "/u/{id}", "rewrite": "v/{id}"},
        "listeners[0].routes[0].rewrite: rewrite must start",
    ),
    (
        {"path": "/u/{id}", "rewrite": "/v/{id"},
        'listeners[0].routes[0].rewrite: unbalanced braces in "/v/{id"',
    ),
    (
        {"path": "/u/{id}", "rewrite": "/v/{i-d}"},
        "listeners[0].routes[0].rewrite: {i-d} is not a variable reference",
    ),
    ({"rewrite": 1}, "listeners[0].routes[0].rewrite: must be a string (got 1)"),
    ({"host": "a b"}, 'listeners[0].routes[0].host: must be a host name or "*.suffix"'),
    ({"host": "*."}, 'listeners[0].routes[0].host: must be a host name or "*.suffix" (got "*.")'),
    ({"host": "a.*.com"}, 'listeners[0].routes[0].host: must be a host name or "*.suffix"'),
    ({"host": "api.example.com:80"}, 'listeners[0].routes[0].host: "api.example.com:80": write'),
    ({"methods": "GET"}, 'listeners[0].routes[0].methods: must be an array of strings (got "GET")'),
    ({"methods": ["GET", "G ET"]}, 'listeners[0].routes[0].methods[1]: "G ET" is not an HTTP'),
    ({"methods": [1]}, "listeners[0].routes[0].methods[0]: must be a string (got 1)"),
    ({"upstream": DELETE}, "listeners[0].routes[0].upstream: is required"),
    (
        {"upstream": "api"},
        'listeners[0].routes[0].upstream: no upstream named "api" (defined: web)',
    ),
    ({"host_header": "a\tb"}, "listeners[0].routes[0].host_header: must not contain spaces"),
    ({"weight": 1}, "listeners[0].routes[0].weight: unknown key (allowed: host, path, methods"),
]


@pytest.mark.parametrize(("route", "expected"), ROUTE_ERRORS)
def test_route_errors(route: dict[str, Any], expected: str) -> None:
    data = http_doc(**{key: value for key, value in route.items() if value is not DELETE})
    for key, value in route.items():
        if value is DELETE:
            del data["listeners"][0]["routes"][0][key]
    assert_problems(data, expected)


def test_routes_must_be_an_array_of_tables() -> None:
    data = patched({("listeners", 0, "mode"): "http", ("listeners", 0, "routes"): {"path": "/"}})
    assert_problems(data, "listeners[0].routes: must be an array of tables (got a table)")
    data = patched({("listeners", 0, "mode"): "http", ("listeners", 0, "routes"): ["/"]})
    assert_problems(data, 'listeners[0].routes[0]: must be a table (got "/")')


@pytest.mark.parametrize(
    ("template", "variables"),
    [
        ("/", {}),
        ("/a/b/", {}),
        ("/foo/{proxy+}", {"proxy": True}),
        ("/users/{id}/files/{rest+}", {"id": False, "rest": True}),
        ("/{a}/{_b2}", {"a": False, "_b2": False}),
        ("/{all+}", {"all": True}),
    ],
)
def test_path_variables(template: str, variables: dict[str, bool]) -> None:
    assert path_variables(template) == variables


@pytest.mark.parametrize(
    ("path", "rewrite"),
    [
        ("/foo/{proxy+}", "/foo/{proxy}"),
        ("/foo/{proxy+}", "/bar/{proxy+}"),
        ("/u/{id}/{rest+}", "/{rest}/users/{id}"),
        ("/u/{id}", "/users?id={id}"),
        ("/u/{id}", "/items-{id}.json"),
        ("/static", "/"),
    ],
)
def test_valid_rewrites(path: str, rewrite: str) -> None:
    config = parse_config(http_doc(path=path, rewrite=rewrite))
    assert config.listeners[0].routes[0].rewrite == rewrite


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (
            {"path": "/a/%2F"},
            """listeners[0].routes[0].path: segment "%2F": path contains %2F (an encoded '/')""",
        ),
        (
            {"path": "/a/b%5cc/{x}"},
            """listeners[0].routes[0].path: segment "b%5cc": path contains %5C (an encoded""",
        ),
        ({"path": "/%00"}, 'listeners[0].routes[0].path: segment "%00": path contains %00'),
        (
            {"path": "/100%/{x}"},
            'listeners[0].routes[0].path: segment "100%": malformed percent-escape in path segment',
        ),
        (
            {"path": "/u/{id}", "rewrite": "/v%2F{id}"},
            """listeners[0].routes[0].rewrite: rewrite "/v%2F{id}": path contains %2F (an enc""",
        ),
        (
            {"path": "/u/{id}", "rewrite": "/v/{id}/%zz"},
            """listeners[0].routes[0].rewrite: rewrite "/v/{id}/%zz": malformed percent-escape""",
        ),
    ],
)
def test_route_literals_need_escapes_a_request_path_may_have(
    route: dict[str, Any], expected: str
) -> None:
    """A literal that the route matcher cannot compile (an escape a request path may not have)
    is refused by the check, not found by the first request on the listener."""
    assert_problems(http_doc(**route), expected)
    # Escapes a request path may have are fine, and kept as written.
    config = parse_config(http_doc(path="/caf%C3%A9/%7e/{x}", rewrite="/%41/{x}"))
    assert config.listeners[0].routes[0].path == "/caf%C3%A9/%7e/{x}"


# ---------------------------------------------------------------------------------------------
# [[authorize]]

AUTHORIZED = {
    ("authorize",): [
        {"name": "private-web", "address": "10.0.1.0/24", "ports": [80, "8000-8099"]},
        {"name": "v6", "address": "fd00::/64", "ports": [443]},
    ]
}


def test_authorization_permits_covered_nodes() -> None:
    config = parse_config(patched(AUTHORIZED))
    assert config.authorization_enabled
    rule = config.authorization_for(SocketAddress("10.0.1.200", 8050))
    assert rule is not None and rule.name == "private-web"
    assert config.authorization_for(SocketAddress("10.0.1.200", 8100)) is None
    assert config.authorization_for(SocketAddress("10.0.2.1", 80)) is None
    v6 = config.authorization_for(SocketAddress("fd00::5", 443))
    assert v6 is not None and v6.name == "v6"
    # An IPv4-mapped IPv6 address is the IPv4 address.
    mapped = config.authorization_for(SocketAddress("::ffff:10.0.1.1", 80))
    assert mapped is not None and mapped.name == "private-web"


def test_authorize_rule_str_and_permits() -> None:
    rule = AuthorizeRule(
        "private-web", ipaddress.ip_network("10.0.1.0/24"), ((80, 80), (8000, 8099))
    )
    assert str(rule) == "private-web (10.0.1.0/24 ports 80,8000-8099)"
    assert rule.permits(ipaddress.ip_address("10.0.1.1"), 8099)
    assert not rule.permits(ipaddress.ip_address("10.0.1.1"), 81)
    assert not rule.permits(ipaddress.ip_address("fd00::1"), 80)


def test_authorization_refuses_uncovered_nodes_naming_node_and_entries() -> None:
    data = patched(
        {
            **AUTHORIZED,
            ("upstreams", "web", "nodes", 2): {"address": "10.0.2.5:80"},
            ("upstreams", "web", "nodes", 3): "10.0.1.12:8100",
        }
    )
    entries = "private-web (10.0.1.0/24 ports 80,8000-8099); v6 (fd00::/64 ports 443)"
    assert problems_of(data) == [
        "upstreams.web.nodes[2].address: node 10.0.2.5:80 is not permitted by any "
        f"[[authorize]] entry ({entries})",
        "upstreams.web.nodes[3]: node 10.0.1.12:8100 is not permitted by any "
        f"[[authorize]] entry ({entries})",
    ]


def test_no_authorization_check_while_authorize_entries_are_broken() -> None:
    data = patched(
        {
            ("authorize",): [{"name": "x", "address": "10.0.1.0/24", "ports": ["80-"]}],
            ("upstreams", "web", "nodes", 2): "192.168.0.1:80",
        }
    )
    assert_problems(data, "authorize[0].ports[0]: '' is not a port number")


AUTHORIZE_ERRORS: list[tuple[Any, list[str]]] = [
    ({"name": "x"}, ["authorize: must be an array of tables (got a table)"]),
    (["x"], ['authorize[0]: must be a table (got "x")']),
    (
        [{"address": "10.0.1.0/24", "ports": [80]}],
        ["authorize[0].name: is required"],
    ),
    (
        [{"name": "a", "ports": [80]}],
        ["authorize[0].address: is required"],
    ),
    (
        [{"name": "a", "address": "10.0.1.0/24"}],
        ["authorize[0].ports: is required"],
    ),
    (
        [{"name": "a", "address": "10.0.1.1/24", "ports": [80]}],
        ["authorize[0].address: '10.0.1.1/24' is not an IP address or CIDR"],
    ),
    (
        [{"name": "a", "address": "10.0.0.0/8", "ports": []}],
        ["authorize[0].ports: must not be empty"],
    ),
    (
        [{"name": "a", "address": "10.0.0.0/8", "ports": 80}],
        ["authorize[0].ports: must be an array (got 80)"],
    ),
    (
        [{"name": "a", "address": "10.0.0.0/8", "ports": [80, "90-80"]}],
        ["authorize[0].ports[1]: range '90-80' is empty (low > high)"],
    ),
    (
        [{"name": "a", "address": "10.0.0.0/8", "ports": [True, 70000]}],
        [
            "authorize[0].ports[0]: must be a port or a range",
            "authorize[0].ports[1]: port 70000 is out of range 1..65535",
        ],
    ),
    (
        [{"name": "a", "address": "10.0.0.0/8", "ports": [80], "proto": "tcp"}],
        ["authorize[0].proto: unknown key (allowed: name, address, ports)"],
    ),
    (
        [
            {"name": "a", "address": "10.0.0.0/8", "ports": [80]},
            {"name": "a", "address": "10.0.0.0/8", "ports": [443]},
        ],
        ['authorize[1].name: duplicate name "a" (also authorize[0])'],
    ),
]


@pytest.mark.parametrize(("authorize", "expected"), AUTHORIZE_ERRORS)
def test_authorize_errors(authorize: Any, expected: list[str]) -> None:
    assert_problems(patched({("authorize",): authorize}), *expected)


@pytest.mark.parametrize(
    ("ports", "ranges"),
    [
        ([80], ((80, 80),)),
        (["80"], ((80, 80),)),
        (["8000-8099", 443], ((8000, 8099), (443, 443))),
        (["1 - 65535"], ((1, 65535),)),
        (["22-22"], ((22, 22),)),
    ],
)
def test_port_ranges(ports: list[Any], ranges: tuple[tuple[int, int], ...]) -> None:
    data = patched({("authorize",): [{"name": "all", "address": "0.0.0.0/0", "ports": ports}]})
    data["upstreams"]["web"]["nodes"] = [f"10.0.0.1:{ranges[0][0]}"]
    assert parse_config(data).authorize[0].ports == ranges


# ---------------------------------------------------------------------------------------------
# Listener address conflicts


def two_listeners(first: str, second: str) -> Any:
    return patched(
        {
            ("listeners", 0, "listen"): first,
            ("listeners", 1): {"name": "second", "listen": second, "upstream": "web"},
        }
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "0.0.0.0:8080"),
        ("0.0.0.0:8080", "0.0.0.0:8080"),
        ("[::]:8080", "[::1]:8080"),
        ("[::1]:8080", "[::]:8080"),
        ("[::1]:8080", "[0:0::1]:8080"),
    ],
)
def test_listener_address_conflicts(first: str, second: str) -> None:
    problems = problems_of(two_listeners(first, second))
    first_text = str(parse_config(two_listeners(first, "127.0.0.9:1")).listeners[0].listen)
    assert len(problems) == 1
    assert problems[0].startswith("listeners[1].listen: ")
    assert problems[0].endswith(f'conflicts with listeners[0].listen ("main", {first_text})')


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8081"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "[::]:8080"),  # separate families (the listener sets IPV6_V6ONLY)
        ("127.0.0.1:0", "127.0.0.1:0"),  # ephemeral ports never collide
    ],
)
def test_listener_addresses_that_do_not_conflict(first: str, second: str) -> None:
    assert len(parse_config(two_listeners(first, second)).listeners) == 2


def test_admin_address_conflicts_with_a_listener() -> None:
    data = patched({("listeners", 0, "listen"): "0.0.0.0:9901"})
    assert_problems(
        data,
        'daemon.admin: 127.0.0.1:9901 conflicts with listeners[0].listen ("main", 0.0.0.0:9901)',
    )


# ---------------------------------------------------------------------------------------------
# Many problems at once


def test_every_problem_is_reported_at_once() -> None:
    data = patched(
        {
            ("daemon", "workers"): -1,
            ("daemon", "colour"): "blue",
            ("upstreams", "web", "retries"): "3",
            ("upstreams", "web", "nodes", 0, "weight"): 5000,
            ("upstreams", "web", "health", "check"): "icmp",
            ("listeners", 0, "mode"): "udp",
            ("listeners", 0, "allow"): ["nope"],
            ("listeners", 1): {"listen": "127.0.0.1:8080", "upstream": "missing"},
        }
    )
    problems = problems_of(data)
    assert [problem.partition(":")[0] for problem in problems] == [
        "daemon.colour",
        "daemon.workers",
        "upstreams.web.nodes[0].weight",
        "upstreams.web.retries",
        "upstreams.web.health.check",
        "listeners[0].mode",
        "listeners[0].allow[0]",
        "listeners[1].name",
        "listeners[1].upstream",
    ]


def test_document_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="the document must be a table"):
        parse_config([])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# load_config


def test_load_config_reads_toml(tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    path.write_text(
        '[upstreams.web]\nnodes = ["10.0.1.10:80"]\n\n'
        '[[listeners]]\nname = "a"\nlisten = "127.0.0.1:8080"\nupstream = "web"\n'
    )
    config = load_config(path)
    assert config.listeners[0].name == "a"
    assert load_config(str(path)) == config


def test_load_config_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    path.write_text('[daemon]\nlog_level = "info"\nworkers = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:3:")
    assert problem.endswith("(TOML syntax error)")
    assert info.value.source == str(path)


def test_load_config_integer_too_long_for_python_names_file_and_line(tmp_path: Path) -> None:
    """tomllib raised a plain ValueError (Python's limit of 4300 digits for int()) that
    escaped the loader (found by tests/test_config_fuzz.py)."""
    path = tmp_path / "conf.toml"
    path.write_text('[upstreams.web]\nnodes = ["10.0.1.10:80"]\nretries = ' + "1" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:3:11: integer out of range (TOML integers are 64-bit) (TOML syntax error)"
    ]


@pytest.mark.parametrize("value", ["[" * 3000 + "]" * 3000, "{ a = " * 3000 + "1" + " }" * 3000])
def test_load_config_nesting_too_deep_names_the_file(tmp_path: Path, value: str) -> None:
    """tomllib recursed into a RecursionError that escaped the loader (found by
    tests/test_config_fuzz.py)."""
    path = tmp_path / "conf.toml"
    path.write_text(f"deep = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: arrays or inline tables nested too deeply (TOML syntax error)"
    ]


def test_load_config_syntax_error_at_the_end_names_the_last_line(tmp_path: Path) -> None:
    """A file cut short: tomllib says "at end of document" without a line, and the problem
    had no position (found by tests/test_config_fuzz.py)."""
    path = tmp_path / "conf.toml"
    path.write_text("[daemon]\r\nworkers = [1,\r\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:3:1: Invalid value (TOML syntax error)"]
    path.write_text('[daemon]\nlog_level = "in')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:2:16: Unterminated string (TOML syntax error)"]


def test_load_config_hex_integer_too_long_to_show(tmp_path: Path) -> None:
    """A hex integer of 5000 digits parses (no int() limit for base 16), and showing it in a
    problem raised ValueError out of the loader (found by tests/test_config_fuzz.py)."""
    path = tmp_path / "conf.toml"
    huge = "0x" + "f" * 5000
    path.write_text(
        f'[upstreams.web]\nnodes = [{huge}]\nretries = {huge}\n[[listeners]]\nname = "m"\n'
        'listen = "127.0.0.1:80"\nupstream = "web"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        'upstreams.web.nodes[0]: must be "ip:port" or { address = "ip:port", weight = N } '
        "(got an integer of 20000 bits)",
        "upstreams.web: has no nodes: give nodes = [...] or a [upstreams.web.discovery] section",
        "upstreams.web.retries: must be an integer 1..100 (got an integer of 20000 bits)",
    ]


def test_authorize_port_too_long_to_show(tmp_path: Path) -> None:
    """parse_port put a 5000-digit hex port into its message with str(), which raised
    Python's ValueError as the message (found by tests/test_config_fuzz.py)."""
    data = patched({("authorize",): [{"name": "a", "address": "10.0.0.0/8", "ports": [16**5000]}]})
    assert (
        problems_of(data)[0] == "authorize[0].ports[0]: port of 20001 bits is out of range 1..65535"
    )


def test_load_config_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    path.write_bytes(b'x = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: not UTF-8 text")


def test_load_config_reports_validation_problems(tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    path.write_text("[daemon]\nworkers = true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "daemon.workers: must be an integer 0..256 (got true)",
        "listeners: at least one [[listeners]] entry is required",
    ]


# ---------------------------------------------------------------------------------------------
# describe()


def test_describe_summarises_listeners_upstreams_nodes_and_authorization() -> None:
    text = describe(load_config(EXAMPLE))
    for needle in (
        "listeners (2):",
        "vpc-link",
        "0.0.0.0:8080",
        "public-api",
        "[::1]:8443",
        "tls yes",
        "allow 2  deny 1",
        "accepts PROXY header; max 10000 connections; rate limit 50/s burst 100",
        "route api.example.com /v1/users/{id}/files/{rest+} [GET,HEAD] -> api",
        "upstreams (2):",
        "web: round_robin, retries 5, http check every 5s GET /healthz expect 200-399",
        "discovery A web.service.internal:80 every 30s via 10.0.0.2:53",
        "10.0.1.10:80",
        "weight 10",
        "[fd00:10::22]:8443",
        "weight 0 (drained)",
        "authorization (2 entries",
        "private-web (10.0.1.0/24 ports 80,8000-8099)",
    ):
        assert needle in text, needle
    assert len(text.splitlines()) < 40
    plain = describe(parse_config(base()))
    assert "authorization: none" in plain
    assert "no active check" in plain


# The package's shape


def test_config_modules_import_one_way_only() -> None:
    """model <- values <- load, and describe reads model and values: no cycle, no module
    importing the loader but ``files`` (the file-level checks), and nothing in the package
    imports trio (it is no I/O)."""
    package = Path(config_module.__file__).parent
    allowed = {
        "model": set(),
        "values": set(),
        "load": {"model", "values"},
        "describe": {"model", "values"},
        "files": {"model", "load"},
        "diff": set(),
    }
    assert {p.stem for p in package.glob("*.py")} == {*allowed, "__init__"}
    for name, may_import in allowed.items():
        tree = ast.parse((package / f"{name}.py").read_text())
        siblings: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    siblings.add(node.module or "")
                assert not (node.module or "").startswith("trio"), name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("trio") for alias in node.names), name
        assert siblings <= may_import, (name, siblings - may_import)
