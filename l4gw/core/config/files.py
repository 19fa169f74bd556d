"""The configuration file as a running process uses it: loaded and checked against the files it
names (``load_usable_config``), and as plain JSON-able data (``config_as_dict``, served at
``/config`` and compared by ``l4gw check --diff``).

``config.py`` parses and validates the values; this module adds what needs the file system
(certificates, keys, CA files). No trio, no sockets.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import attrs

from ..netaddr import SocketAddress
from ..tls import build_client_context, check_certificates
from .load import load_config
from .model import Config, ConfigError

__all__ = ["config_as_dict", "config_problems", "load_usable_config"]


def config_problems(config: Config) -> list[str]:
    """Problems that make a parsed config unusable beyond its syntax and values: the files it
    names (certificates and keys that are unreadable, mismatched, expired or not
    yet valid; CA files that do not load). Each problem names its key path and file."""
    problems: list[str] = []
    for index, lc in enumerate(config.listeners):
        if lc.tls is not None:
            problems += [f"listeners[{index}].tls: {p}" for p in check_certificates(lc.tls)]
    for name, up in config.upstreams.items():
        if up.tls is not None:
            try:
                build_client_context(up.tls)
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"upstreams.{name}.tls.ca: cannot load {up.tls.ca}: {exc}")
    return problems


def load_usable_config(path: str | os.PathLike[str]) -> Config:
    """Load and validate ``path`` for running. Raises ``ConfigError`` listing every problem."""
    config = load_config(path)
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, SocketAddress):
        return str(value)  # "host:port", as written in the file
    if attrs.has(type(value)):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_as_dict(config: Config) -> dict[str, Any]:
    """The running configuration as plain JSON-able data (``/config``, ``check --diff``)."""
    result = _to_jsonable(config)
    assert isinstance(result, dict)
    return result
