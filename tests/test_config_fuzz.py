"""Config fuzzing: every bad file gets a clear error naming its key, and loses nothing.

Four layers, all bounded and reproducible (``derandomize=True``, no example database):

1. documents generated from the real schema (every section and key, values of the right and of
   wrong types, arbitrary TOML values where a table or array is expected) fed to the function
   ``l4gw check`` runs (:func:`load_config`, :func:`config_problems`, :func:`describe`);
2. mutations of ``conf.toml.example``: keys deleted or retyped, tables duplicated, a referenced
   upstream dropped, garbage or invalid UTF-8 injected, the file truncated;
3. a few of those through the real ``python -m l4gw check`` as a subprocess;
4. rejected files sent to a real running daemon with SIGHUP: each rejection is logged with its
   key, and the daemon keeps serving exactly what it served before.

The one assertion everywhere: the file loads, or :class:`ConfigError` is raised whose every
problem names a key path present in the document (the missing key itself for "is required"),
or the file as a whole for what is not TOML; never another exception, never Python's own
wording in a message.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4gw.core.config import Config, ConfigError, describe, load_config, parse_config
from l4gw.core.config.files import config_problems

from .conftest import (
    REPO,
    DaemonFactory,
    RunningDaemon,
    free_port,
    http_get,
    open_client,
    read_line,
    start_named_backends,
)

EXAMPLE = REPO / "conf.toml.example"

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------------
# The assertion: what `l4gw check` does, and what a rejection must look like.


def check_file(path: Path) -> Config:
    """What ``l4gw check`` runs on a file (``cmd_check``): load, check the files it names,
    summarise. Raises ``ConfigError`` for an invalid file."""
    config = load_config(path)
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems, source=str(path))
    describe(config)
    return config


#: Python's own wording, which an operator should never have to read.
PYTHON_WORDING = (
    "Traceback",
    "invalid literal",
    "Exceeds the limit",
    "set_int_max_str_digits",
    "object has no attribute",
    "NoneType",
    "unsupported operand",
    "not subscriptable",
    "embedded null byte",
)

_KEY = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+')
_INDEX = re.compile(r"\[(\d+)\]")
_POSITION = re.compile(r":\d+:\d+: ")
#: File-level problems that are not TOML decode errors: they have no line to give.
_WHOLE_FILE = ("cannot read", "not UTF-8", "nested too deeply")


def split_key_path(problem: str) -> tuple[list[str | int], str] | None:
    """``'upstreams."a b".nodes[2].weight: msg'`` -> ``(["upstreams", "a b", "nodes", 2,
    "weight"], "msg")``; None when the problem does not start with a key path."""
    parts: list[str | int] = []
    pos = 0
    while True:
        match = _KEY.match(problem, pos)
        if match is None:
            return None
        token = match.group()
        parts.append(json.loads(token) if token.startswith('"') else token)
        pos = match.end()
        while (index := _INDEX.match(problem, pos)) is not None:
            parts.append(int(index[1]))
            pos = index.end()
        if problem.startswith(": ", pos):
            return parts, problem[pos + 2 :]
        if not problem.startswith(".", pos):
            return None
        pos += 1


def resolve(document: object, parts: list[str | int]) -> int:
    """How many leading parts of a key path exist in ``document``."""
    node = document
    for depth, part in enumerate(parts):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return depth
            node = node[part]
        else:
            if not isinstance(node, Mapping) or part not in node:
                return depth
            node = node[part]
    return len(parts)


def assert_clear_rejection(exc: ConfigError, path: Path, document: object | None) -> None:
    """Every problem names a key path of ``document`` (None: the file is not TOML, so every
    problem must name the file), and none is in Python's own words."""
    assert exc.problems, "a ConfigError without problems"
    source = str(path)
    for problem in exc.problems:
        for words in PYTHON_WORDING:
            assert words not in problem, problem
        if problem.startswith(source + ":"):
            rest = problem[len(source) :]
            assert _POSITION.match(rest) or any(w in rest for w in _WHOLE_FILE), problem
            continue
        assert document is not None, f"a key path for a file that is not TOML: {problem}"
        split = split_key_path(problem)
        assert split is not None, f"no key path: {problem}"
        parts, message = split
        found = resolve(document, parts)
        if found < len(parts):
            # Only a missing required key may be named while absent (its table must exist).
            assert found == len(parts) - 1 and "required" in message, (
                f"{problem}: the key path is not in the document"
            )


def check_outcome(path: Path) -> Config | ConfigError:
    """Load ``path`` as ``l4gw check`` does; the assertion above on a rejection."""
    try:
        document: object | None = tomllib.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        document = None
    try:
        return check_file(path)
    except ConfigError as exc:
        assert_clear_rejection(exc, path, document)
        return exc


# --------------------------------------------------------------------------------------------
# A TOML writer (inline tables and arrays only: enough to express any document).


def toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # str() refuses over 4300 digits; TOML hex has no such limit (and no sign).
        return hex(abs(value)) if value.bit_length() > 13_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"no TOML for {value!r}")


def toml_document(document: Mapping[str, object]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in document.items())


# --------------------------------------------------------------------------------------------
# Values: right and wrong for each kind of key, and anything TOML can hold.

#: Integers no TOML file should hold: past 64 bits, past a float, past what Python turns into
#: text (built when drawn: hypothesis cannot show a 5000-digit integer in a strategy's repr).
huge_ints: st.SearchStrategy[int] = st.sampled_from([19, -19, 400, 5000]).map(
    lambda digits: 10 ** abs(digits) * (1 if digits > 0 else -1)
)

any_scalar: st.SearchStrategy[object] = st.one_of(
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(),
    st.text(max_size=12),
    st.dates(),
    st.times(),
    st.datetimes(timezones=st.sampled_from([None, datetime.UTC])),
)
any_value: st.SearchStrategy[object] = st.recursive(
    any_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)

NAMES = ["web", "api", "db"]
DURATIONS = ["250ms", "5s", "2m", "1h", "1.5s", 0.5, 3, 30]
BAD_DURATIONS: list[object] = [
    "3x",
    "-1s",
    "",
    "5",
    "1e99999999s",
    "1" * 5000 + "s",
    "0." + "0" * 5000 + "1s",
    "inf s",
    -1,
    float("nan"),
    float("inf"),
    True,
]
ADDRESSES = ["127.0.0.1:8080", "[::1]:8443", "10.0.1.10:80", "0.0.0.0:0", "10.0.1.11:8000"]
BAD_ADDRESSES: list[object] = [
    "localhost:80",
    "1.2.3.4",
    "1.2.3.4:99999",
    "1.2.3.4:0",
    "[::1]80",
    "::1:80",
    "",
    "1.2.3.4:-1",
    "[zz]:1",
    "1.2.3.4:\u00b2",
    "1.2.3.4:" + "0" * 5000 + "80",
    "1.2.3.4:" + "9" * 5000,
    80,
]
CIDRS = ["10.0.0.0/8", "::1", "fd00:10::/64", "192.168.0.1", "0.0.0.0/0"]
BAD_CIDRS: list[object] = ["10.0.0.1/8", "10.0.0.0/33", "x", "", "::/129", 5, "10.0.0.0/8\x00"]
PORTS: list[object] = [80, "8000-8099", "443", 8443]
BAD_PORTS: list[object] = [
    0,
    70000,
    "9-1",
    "a-b",
    "\u00b2",
    True,
    1.5,
    -1,
    10**400,
    "1-" + "9" * 5000,
]
TEMPLATES = ["/", "/foo/{proxy+}", "/v1/{id}/files/{rest+}", "/a/b", "/{x}"]
BAD_TEMPLATES: list[object] = [
    "",
    "foo",
    "/{",
    "/{a}/{a}",
    "/{a+}/b",
    "/%zz",
    "/a?b",
    "/a b",
    "/{1x}",
    5,
]
REWRITES = ["/{proxy}", "/x/{rest}", "/", "/{id}"]
BAD_REWRITES: list[object] = ["/{nope}", "/{", "}", "x", "/{proxy+}", 7]
MISSING_FILES = ["/nonexistent/l4gw/cert.pem", "/", "", "/tmp/a\x00b", "relative.pem"]


def one_of_values(values: list[Any]) -> st.SearchStrategy[object]:
    return st.sampled_from(values)


def texts_of(*values: str) -> st.SearchStrategy[object]:
    return st.sampled_from(list(values))


Schema = dict[str, tuple[st.SearchStrategy[object], st.SearchStrategy[object]]]


def durations() -> tuple[st.SearchStrategy[object], st.SearchStrategy[object]]:
    return one_of_values(DURATIONS), one_of_values(BAD_DURATIONS)


def ints(low: int, high: int) -> tuple[st.SearchStrategy[object], st.SearchStrategy[object]]:
    return st.integers(low, high), st.one_of(
        st.integers(max_value=low - 1),
        st.integers(min_value=high + 1),
        huge_ints,
        st.floats(),
        st.booleans(),
        st.just(str(low)),
    )


def choice(*allowed: str) -> tuple[st.SearchStrategy[object], st.SearchStrategy[object]]:
    return texts_of(*allowed), st.one_of(texts_of("", "nope", allowed[0].upper() + "!"), any_scalar)


BOOL = (st.booleans(), st.one_of(texts_of("true", "yes"), st.integers(0, 1)))


def lists_of(
    good: list[Any], bad: list[Any], *, min_size: int = 0
) -> tuple[st.SearchStrategy[object], st.SearchStrategy[object]]:
    return (
        st.lists(st.sampled_from(good), min_size=min_size, max_size=3),
        st.one_of(
            st.lists(st.sampled_from(good + bad), min_size=1, max_size=3),
            st.sampled_from(good + bad),
        ),
    )


def refs() -> tuple[st.SearchStrategy[object], st.SearchStrategy[object]]:
    """A reference to an upstream: mostly a defined name, sometimes one that is not."""
    return st.sampled_from(NAMES), st.one_of(texts_of("", "missing", "Web"), any_scalar)


@st.composite
def tables(draw: st.DrawFn, schema: Schema, required: tuple[str, ...] = ()) -> dict[str, object]:
    """A table of ``schema``: each key absent, right, wrong or anything; sometimes an unknown
    key (required keys are mostly present)."""
    table: dict[str, object] = {}
    for key, (good, bad) in schema.items():
        roll = draw(st.integers(0, 19))
        if roll < (1 if key in required else 8):
            continue
        if roll < 16:
            table[key] = draw(good)
        elif roll < 19:
            table[key] = draw(bad)
        else:
            table[key] = draw(any_value)
    if draw(st.integers(0, 9)) == 0:
        table[draw(st.sampled_from(["nodez", "Name", "listen ", "timeout_s", ""]))] = draw(
            any_value
        )
    return table


def sub(
    strategy: st.SearchStrategy[Any],
) -> tuple[st.SearchStrategy[object], st.SearchStrategy[object]]:
    """A key whose value is a table or an array of tables: wrong means any TOML value."""
    return strategy, any_value


DAEMON: Schema = {
    "admin": (st.sampled_from(["", *ADDRESSES]), one_of_values(BAD_ADDRESSES)),
    "log_level": choice("debug", "info", "warning", "error"),
    "log_format": choice("json", "console"),
    "access_log": BOOL,
    "drain_timeout": durations(),
    "workers": ints(0, 256),
}
AUTHORIZE: Schema = {
    "name": (st.sampled_from(["private", "v6"]), st.one_of(texts_of("", "a b", "-x"), any_scalar)),
    "address": (one_of_values(CIDRS), one_of_values(BAD_CIDRS)),
    "ports": lists_of(PORTS, BAD_PORTS, min_size=1),
}
NODE: Schema = {
    "address": (one_of_values(ADDRESSES), one_of_values(BAD_ADDRESSES)),
    "weight": ints(0, 1000),
}
nodes = st.lists(
    st.one_of(st.sampled_from(ADDRESSES), tables(NODE, ("address",)), any_scalar), max_size=3
)
HEALTH: Schema = {
    "check": choice("none", "tcp", "http"),
    "path": (texts_of("/", "/healthz"), st.one_of(texts_of("", "x", "/a b"), any_scalar)),
    "expect": (
        st.one_of(texts_of("200-399", "200", "204"), st.integers(100, 599)),
        st.one_of(texts_of("399-200", "2xx", "\u00b2", "9" * 5000, "200-"), any_scalar),
    ),
    "interval": durations(),
    "timeout": durations(),
    "healthy_threshold": ints(1, 100),
    "unhealthy_threshold": ints(1, 100),
    "fail_open": BOOL,
    "passive_failures": ints(0, 100),
    "ejection_time": durations(),
    "max_ejection_time": durations(),
    "max_ejected_percent": ints(0, 100),
}
DISCOVERY: Schema = {
    "name": (texts_of("web.service.internal", "_http._tcp.x"), texts_of("", "a..b", "-a.b", "a b")),
    "type": choice("A", "AAAA", "SRV"),
    "port": (st.integers(1, 65535), one_of_values(BAD_PORTS)),
    "interval": durations(),
    "resolver": (texts_of("", "10.0.0.2:53", "10.0.0.2", "[::1]:53"), one_of_values(BAD_ADDRESSES)),
    "weight": ints(0, 1000),
}
UPSTREAM_TLS: Schema = {
    "verify": BOOL,
    "ca": (one_of_values(MISSING_FILES), any_scalar),
    "server_name": (texts_of("api.internal", ""), st.one_of(texts_of("a b", "\x00"), any_scalar)),
}
UPSTREAM: Schema = {
    "balance": choice("round_robin", "least_conn", "random_two", "source_hash"),
    "retries": ints(1, 100),
    "connect_timeout": durations(),
    "idle_timeout": durations(),
    "proxy_protocol": choice("off", "v1", "v2"),
    "host_header": (texts_of("", "api.internal"), st.one_of(texts_of("a b", "\n"), any_scalar)),
    "max_connections_per_node": ints(0, 10**6),
    "response_timeout": durations(),
    "nodes": sub(nodes),
    "health": sub(tables(HEALTH)),
    "discovery": sub(tables(DISCOVERY, ("name",))),
    "tls": sub(tables(UPSTREAM_TLS)),
}
CERTIFICATE: Schema = {
    "cert": (one_of_values(MISSING_FILES), any_scalar),
    "key": (one_of_values(MISSING_FILES), any_scalar),
}
LISTENER_TLS: Schema = {
    "certificates": sub(st.lists(tables(CERTIFICATE, ("cert", "key")), max_size=2)),
    "min_version": (texts_of("1.2", "1.3"), st.one_of(texts_of("1.1", "TLSv1.3"), any_scalar)),
    "alpn": lists_of(["http/1.1", "http/1.0"], ["h2", "", "\x00", "x" * 300]),
}
ROUTE: Schema = {
    "host": (
        texts_of("", "api.example.com", "*.example.com"),
        st.one_of(texts_of("a:80", "*", "a..b", "*.*.x"), any_scalar),
    ),
    "path": (one_of_values(TEMPLATES), one_of_values(BAD_TEMPLATES)),
    "methods": lists_of(["GET", "POST", "head"], ["", "G T", "\u00e9", 5]),
    "upstream": refs(),
    "rewrite": (one_of_values(REWRITES), one_of_values(BAD_REWRITES)),
    "host_header": (texts_of("", "users.internal"), st.one_of(texts_of("a b"), any_scalar)),
}
LISTENER: Schema = {
    "name": (st.sampled_from(["a", "b"]), st.one_of(texts_of("", "a b", "." * 65), any_scalar)),
    "listen": (one_of_values(ADDRESSES), one_of_values(BAD_ADDRESSES)),
    "mode": choice("tcp", "http"),
    "upstream": refs(),
    "allow": lists_of(CIDRS, BAD_CIDRS),
    "deny": lists_of(CIDRS, BAD_CIDRS),
    "accept_proxy_protocol": BOOL,
    "proxy_protocol_from": lists_of(CIDRS, BAD_CIDRS),
    "max_connections": ints(0, 10**6),
    "rate_limit": (
        st.one_of(st.integers(0, 1000), st.floats(0, 1000)),
        st.one_of(st.sampled_from([-1, -0.5]), huge_ints, st.floats(), any_scalar),
    ),
    "rate_limit_burst": ints(0, 10**6),
    "header_timeout": durations(),
    "idle_timeout": durations(),
    "tls": sub(tables(LISTENER_TLS, ("certificates",))),
    "routes": sub(st.lists(tables(ROUTE, ("path", "upstream")), max_size=3)),
}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, object]:
    """A whole file from the schema: each section right, wrong or anything; upstream and
    listener names from small pools, so duplicates and dangling references come up."""
    document: dict[str, object] = {}
    parts: dict[str, st.SearchStrategy[object]] = {
        "daemon": tables(DAEMON),
        "authorize": st.lists(tables(AUTHORIZE, ("name", "address", "ports")), max_size=2),
        "upstreams": st.dictionaries(
            st.one_of(st.sampled_from(NAMES), texts_of("", "a b", "x" * 65)),
            tables(UPSTREAM),
            max_size=3,
        ),
        "listeners": st.lists(tables(LISTENER, ("name", "listen")), max_size=3),
    }
    for key, strategy in parts.items():
        roll = draw(st.integers(0, 9))
        if roll == 0:
            continue
        document[key] = draw(any_value) if roll == 1 else draw(strategy)
    return document


# --------------------------------------------------------------------------------------------
# Mutations of a file, driven by a random.Random (hypothesis's, or a seeded one).


def _paths(node: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path of a document (tables and arrays included)."""
    found = [prefix] if prefix else []
    if isinstance(node, Mapping):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _parent(document: Any, path: tuple[str | int, ...]) -> Any:
    node = document
    for part in path[:-1]:
        node = node[part]
    return node


def mutate_data(document: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Delete a key, change a value's type, or drop an upstream that is referenced."""
    result = copy.deepcopy(document)
    paths = _paths(result)
    kind = rng.choice(["delete", "retype", "retype", "drop_upstream"])
    if (
        kind == "drop_upstream"
        and isinstance(result.get("upstreams"), dict)
        and result["upstreams"]
    ):
        del result["upstreams"][rng.choice(sorted(result["upstreams"]))]
        return result
    path = rng.choice(paths)
    parent = _parent(result, path)
    if kind == "delete":
        del parent[path[-1]]
    else:
        old = parent[path[-1]]
        pool: list[object] = [
            5,
            -1,
            2.5,
            float("nan"),
            True,
            "",
            "3x",
            "\x00",
            [],
            [1, "a"],
            {},
            {"x": 1},
            datetime.date(1979, 5, 27),
            10**400,
            "[::1]",
        ]
        parent[path[-1]] = rng.choice([v for v in pool if type(v) is not type(old)])
    return result


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    """Byte-level damage: truncation, garbage, invalid UTF-8, a lost or repeated line, a table
    header declared twice, a value replaced by another type."""
    lines = data.split(b"\n")
    kind = rng.choice(
        ["truncate", "garbage", "utf8", "delete_line", "duplicate_table", "retype_line", "nest"]
    )
    if kind == "truncate":
        return data[: rng.randrange(len(data) + 1)]
    if kind == "garbage":
        at = rng.randrange(len(data) + 1)
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[at:]
    if kind == "utf8":
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xfe\xfe"]) + data[at:]
    if kind == "delete_line":
        del lines[rng.randrange(len(lines))]
        return b"\n".join(lines)
    if kind == "duplicate_table":
        headers = [i for i, line in enumerate(lines) if re.match(rb"\[[^\[]", line)]
        if headers:
            i = rng.choice(headers)
            return b"\n".join([*lines, lines[i], *lines[i + 1 : i + 2]])
        return data + b"\n" + data
    if kind == "nest":
        depth = rng.choice([5, 50, 2000])
        at = rng.randrange(len(lines) + 1)
        return b"\n".join([*lines[:at], b"deep = " + b"[" * depth + b"]" * depth, *lines[at:]])
    assignments = [i for i, line in enumerate(lines) if re.match(rb"[a-z_]+ *=", line)]
    if assignments:
        i = rng.choice(assignments)
        key = lines[i].split(b"=", 1)[0]
        value = rng.choice(
            ['"x"', "5", "-1", "2.5", "[1, 2]", "{ a = 1 }", "true", "nan", "1979-05-27"]
        )
        lines[i] = key + b"= " + value.encode()
    return b"\n".join(lines)


# --------------------------------------------------------------------------------------------
# 1a, 1b: in process.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(documents())
def test_generated_documents_load_or_name_their_keys(
    workdir: Path, document: dict[str, object]
) -> None:
    path = workdir / "generated.toml"
    path.write_text(toml_document(document))
    check_outcome(path)


def example_document() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


@FUZZ
@given(st.randoms(use_true_random=False), st.integers(1, 3))
def test_mutated_example_data_loads_or_names_its_keys(
    workdir: Path, rng: random.Random, rounds: int
) -> None:
    document = example_document()
    for _ in range(rounds):
        document = mutate_data(document, rng)
    path = workdir / "mutated.toml"
    path.write_text(toml_document(document))
    check_outcome(path)


@FUZZ
@given(st.randoms(use_true_random=False), st.integers(1, 2))
def test_damaged_example_file_loads_or_names_its_keys(
    workdir: Path, rng: random.Random, rounds: int
) -> None:
    data = EXAMPLE.read_bytes()
    for _ in range(rounds):
        data = mutate_text(data, rng)
    path = workdir / "damaged.toml"
    path.write_bytes(data)
    check_outcome(path)


def test_the_example_itself_is_rejected_only_for_its_missing_certificates() -> None:
    """The baseline of the mutations: the example parses, and `check` refuses it only because
    the certificate and CA files it names do not exist here."""
    outcome = check_outcome(EXAMPLE)
    assert isinstance(outcome, ConfigError)
    assert all(
        p.startswith(("listeners[1].tls:", "upstreams.api.tls.ca:")) for p in outcome.problems
    )


def test_the_fuzzers_produce_both_outcomes(workdir: Path) -> None:
    """The generators are not vacuous: seeded runs of them give valid files and each kind of
    rejection (key path, TOML syntax, not UTF-8)."""
    rng = random.Random(13)
    valid = 0
    kinds: set[str] = set()
    path = workdir / "both.toml"
    base = example_document()
    for listener in base["listeners"]:
        listener.pop("tls", None)
    del base["upstreams"]["api"]["tls"]
    for listener in base["listeners"]:
        listener["routes"] = [r for r in listener.get("routes", []) if r["upstream"] != "api"]
    for _ in range(200):
        if rng.random() < 0.5:
            path.write_text(toml_document(mutate_data(base, rng)))
        else:
            path.write_bytes(mutate_text(toml_document(base).encode(), rng))
        outcome = check_outcome(path)
        if isinstance(outcome, Config):
            valid += 1
        else:
            for problem in outcome.problems:
                if "TOML syntax error" in problem:
                    kinds.add("syntax")
                elif "not UTF-8" in problem:
                    kinds.add("utf8")
                else:
                    kinds.add("key")
    assert valid > 0
    assert kinds == {"syntax", "utf8", "key"}


# --------------------------------------------------------------------------------------------
# 1c: the real command line.

L = '[[listeners]]\nname = "m"\nlisten = "127.0.0.1:8080"\nupstream = "web"\n'
U = '[upstreams.web]\nnodes = ["10.0.1.10:80"]\n'

CLI_CASES: list[tuple[bytes, str]] = [
    ((U + L + "rate_limit = 1" + "0" * 400 + "\n").encode(), "listeners[0].rate_limit"),
    ((U.replace('"10.0.1.10:80"', "1" + "0" * 5000) + L).encode(), ":2:"),
    ((U + L + "deep = " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested too deeply"),
    (
        (
            U + L + 'tls = { certificates = [{ cert = "/nonexistent.pem", key = "/a\\u0000b" }] }\n'
        ).encode(),
        "listeners[0].tls",
    ),
    ((U + 'tls = { ca = "/a\\u0000b" }\n' + L).encode(), "upstreams.web.tls.ca"),
    ((U + 'connect_timeout = "1e99999999s"\n' + L).encode(), "upstreams.web.connect_timeout"),
    ((U + L).encode()[:-9] + b"\xff\xfe", "not UTF-8"),
]


@pytest.mark.parametrize(("data", "names"), CLI_CASES)
def test_check_command_names_the_key_without_a_traceback(
    tmp_path: Path, data: bytes, names: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k != "L4GW_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "l4gw", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "invalid configuration" in result.stderr
    assert names in result.stderr, result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------------------------
# 1d: a running daemon refuses bad files and keeps serving.


async def _http_named(name: bytes, stream: trio.SocketStream) -> None:
    """An HTTP node that answers every request with its own name, then closes."""
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (len(name), name)
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def serving_config(tcp_node: int, http_node: int, tcp_port: int, http_port: int) -> str:
    return f"""
[daemon]
admin = "{{admin}}"
log_format = "json"
drain_timeout = "5s"

[upstreams.plain]
connect_timeout = "2s"
nodes = ["127.0.0.1:{tcp_node}"]

[upstreams.site]
connect_timeout = "2s"
nodes = [{{ address = "127.0.0.1:{http_node}", weight = 3 }}]

[[listeners]]
name = "tcp"
listen = "127.0.0.1:{tcp_port}"
upstream = "plain"

[[listeners]]
name = "web"
listen = "127.0.0.1:{http_port}"
mode = "http"
upstream = "site"
header_timeout = "5s"

[[listeners.routes]]
path = "/named/{{rest+}}"
upstream = "site"
rewrite = "/{{rest}}"
"""


def stable_status(status: dict[str, Any]) -> object:
    """What a reload may change in ``/status``: listeners and upstreams with their nodes,
    without counters."""
    counters = ("connections", "total", "failures", "uptime", "reload", "pid", "last_", "bytes")

    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not any(c in k for c in counters)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip({k: status[k] for k in ("listeners", "upstreams")})


async def served(daemon: RunningDaemon, tcp_port: int, http_port: int) -> tuple[bytes, bytes]:
    """The backend names the tcp and the http listener reach now."""
    stream = await open_client(tcp_port)
    async with stream:
        greeting = await read_line(stream)
    status, body = await http_get(f"127.0.0.1:{http_port}", "/named/x", timeout=10)
    assert status == 200, body
    return greeting.strip(), body


def rejected_files(valid: str, count: int) -> list[bytes]:
    """``count`` files that `check` rejects: the regression inputs first, then seeded
    mutations (data- and byte-level) of the running file."""
    document = tomllib.loads(valid)
    fixed = [
        toml_document(
            {**document, "listeners": [{**document["listeners"][0], "rate_limit": 10**400}]}
        ),
        valid.replace('nodes = ["', "nodes = [" + "1" * 5000 + ', "', 1),
        valid + "\ndeep = " + "[" * 3000 + "]" * 3000 + "\n",
        valid.replace(
            'name = "tcp"',
            'name = "tcp"\ntls = { certificates = [{ cert = "/none.pem", key = "/a\\u0000b" }] }',
        ),
        valid.replace("[upstreams.site]\n", '[upstreams.site]\ntls = { ca = "/a\\u0000b" }\n'),
        valid.replace('connect_timeout = "2s"', 'connect_timeout = "1e99999999s"', 1),
        valid.replace('upstream = "site"\nrewrite', 'upstream = "gone"\nrewrite'),
        valid.replace('mode = "http"', 'mode = "http"\nrate_limit = "fast"'),
    ]
    files = [text.encode() for text in fixed]
    rng = random.Random(1313)
    for _ in range(500):
        if len(files) >= count:
            break
        if rng.random() < 0.5:
            candidate = toml_document(mutate_data(document, rng)).encode()
        else:
            candidate = mutate_text(valid.encode(), rng)
        if _is_rejected(candidate):
            files.append(candidate)
    assert len(files) >= count
    return files[:count]


def _is_rejected(data: bytes) -> bool:
    """Whether ``check`` refuses this file (in process, without writing it)."""
    try:
        config = parse_config(tomllib.loads(data.decode()))
    except (ConfigError, UnicodeDecodeError, ValueError, RecursionError):
        return True
    return bool(config_problems(config))


async def test_rejected_reloads_change_nothing_and_a_good_one_still_works(
    l4gw_daemon: DaemonFactory, nursery: trio.Nursery
) -> None:
    with trio.fail_after(120):
        a, b = await start_named_backends(nursery, ["a", "b"])
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_http_named, b"h"), 0, host="127.0.0.1")
        )
        http_node = listeners[0].socket.getsockname()[1]
        tcp_port, http_port = free_port(), free_port()
        valid = serving_config(a, http_node, tcp_port, http_port)
        daemon = await l4gw_daemon(valid)
        valid = valid.replace("{admin}", daemon.admin)
        before = stable_status(await daemon.status())
        assert await served(daemon, tcp_port, http_port) == (b"a", b"h")

        for count, data in enumerate(rejected_files(valid, 16), start=1):
            daemon.config_path.write_bytes(data)
            daemon.send_signal(signal.SIGHUP)
            line = (await daemon.wait_log("reload_rejected", count=count, timeout=30))[-1]
            try:
                document: object | None = tomllib.loads(data.decode())
            except (UnicodeDecodeError, ValueError, RecursionError):
                document = None
            assert_clear_rejection(ConfigError(line["problems"]), daemon.config_path, document)
            assert daemon.proc.poll() is None, daemon.stderr_text()
            assert stable_status(await daemon.status()) == before
            assert await served(daemon, tcp_port, http_port) == (b"a", b"h")

        assert "Traceback" not in daemon.stderr_text()
        daemon.config_path.write_text(valid.replace(f"127.0.0.1:{a}", f"127.0.0.1:{b}"))
        daemon.send_signal(signal.SIGHUP)
        await daemon.wait_log("reloaded", timeout=30)
        assert await served(daemon, tcp_port, http_port) == (b"b", b"h")
        assert await daemon.metric("l4gw_reload_failures_total") == 16
        assert await daemon.metric("l4gw_reloads_total") == 1
