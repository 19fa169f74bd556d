"""Configuration: TOML -> frozen attrs classes, checked with every problem's key path.

The package has one module per job, imported one way only (``model`` <- ``values`` <-
``load``; ``describe`` reads the model):

- :mod:`.model`: the frozen attrs classes (:class:`Config` and its parts), their literal
  types and :class:`ConfigError`. No validation, no I/O.
- :mod:`.values`: validators of single values (durations, names, addresses, path templates
  via :mod:`l4gw.core.templates`).
- :mod:`.load`: :func:`parse_config` and :func:`load_config`, which walk the tables and report
  every problem as ``"key.path: message"``.
- :mod:`.describe`: :func:`describe`, the summary ``l4gw check`` prints.

The names below are the public surface; import them from ``l4gw.core.config``.
"""

from __future__ import annotations

from .describe import describe
from .load import load_config, parse_config
from .model import (
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
from .values import format_duration, parse_duration, path_variables

__all__ = [
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
    "describe",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "path_variables",
]
