"""Configuration: TOML -> frozen attrs classes (the loader is :mod:`.load`)."""

from __future__ import annotations

from .load import (
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
