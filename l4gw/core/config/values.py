"""Validators of single configuration values, for :mod:`.load`.

Each validator takes one TOML value and returns the typed value or raises ``ValueError`` whose
text is the message shown after the key path (``"must be an integer 0..1000 (got 1001)"``);
:class:`_Invalid` carries several such problems under sub-paths (an array's items). The
underscore names are private to the ``l4gw.core.config`` package; :func:`parse_duration`,
:func:`format_duration` and :func:`path_variables` are public. Route paths and rewrites follow
the one grammar in :mod:`l4gw.core.templates`, which the route matcher compiles too. No I/O.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypeVar

from ..netaddr import SocketAddress, parse_network, parse_port_range, parse_socket_address
from ..templates import check_path_text, parse_rewrite, path_variables

__all__ = ["format_duration", "parse_duration", "path_variables"]

# --------------------------------------------------------------------------------------------
# Durations

# The exponent has at most 3 digits and the number at most _DURATION_DIGITS characters: Fraction
# builds 10**exponent and int() of every digit, so "1e99999999s" took minutes and a 5000-digit
# number hit Python's limit on int() (a ValueError in Python's words).
_DURATION_RE = re.compile(
    r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?)\s*(ms|s|m|h)\s*\Z", re.ASCII
)
_DURATION_DIGITS = 64
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
            if match is None or len(match[1]) > _DURATION_DIGITS:
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
# Single values: each parser returns the value or raises ValueError with the message.

T = TypeVar("T")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
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
    if isinstance(value, int) and value.bit_length() > 13_000:
        # str() refuses more than 4300 digits (a TOML hex integer can have them).
        return f"an integer of {value.bit_length()} bits"
    return str(value)


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


def _file_name(value: object) -> str:
    """A file name: not empty and without NUL, which no file name can hold (``open`` raises
    ``ValueError`` on it, not ``OSError``)."""
    text = _nonempty(value)
    if "\x00" in text:
        raise ValueError(f"must not contain a NUL character (got {_show(text)})")
    return text


def _optional_file_name(value: object) -> str | None:
    """A file name where ``""`` means "not set"."""
    return None if value == "" else _file_name(value)


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
    message = f"must be a number >= 0 (got {_show(value)})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(message)
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range, refused like infinity
        raise ValueError(message) from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(message)
    return number


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
        # At most 3 ASCII digits each: "²".isdigit() is true, and int() then raised in
        # Python's words (as for more than 4300 digits).
        if not all(
            t.strip().isascii() and t.strip().isdigit() and len(t.strip()) <= 3
            for t in (low_text, high_text)
        ):
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
    """A path such as a health check's (see :func:`l4gw.core.templates.check_path_text`)."""
    return check_path_text(_string(value), what=what)


def _check_rewrite(value: object, variables: Mapping[str, bool]) -> str:
    """A rewrite may use only the path's variables (``{name}`` or ``{name+}`` for greedy);
    the grammar is :func:`l4gw.core.templates.parse_rewrite`."""
    text = _string(value)
    parse_rewrite(text, variables)
    return text
