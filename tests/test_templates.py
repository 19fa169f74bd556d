"""The one path-template grammar (l4gw.templates): pure functions, no I/O.

Three kinds of test: what a template the config check accepts does in the route matcher (it
compiles, and a path built from it matches with the values put in); that the grammar is the two
former ones combined (the config check's messages, the matcher's compiled form; copies of both
former parsers are kept below as oracles); and the module's independence (no trio, no l4gw).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4gw.core import templates
from l4gw.core.config import ConfigError, parse_config, path_variables
from l4gw.core.templates import (
    BadRequestPath,
    literal_segment,
    normalize_segment,
    parse_path_template,
    parse_rewrite,
)
from l4gw.http.routes import PathTemplate, RouteTable, normalize_path

# --- generators ---------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "id", "_x", "rest", "p2", "Z_9"])
#: Pieces of literal text a request path may carry as they are.
GOOD_PIECES = st.sampled_from(
    [*"abcXYZ019-._~!$&'()*+,;=:@", "%41", "%7e", "%7E", "%2a", "%3F", "%C3%A9"]
)
#: Pieces the grammar refuses somewhere (or that need encoding, as "é").
ODD_PIECES = st.sampled_from(
    ["%2F", "%2f", "%5c", "%00", "%", "%zz", "%4", " ", "\t", "#", "?", "é", "{", "}", "\x7f"]
)
BAD_VARIABLES = st.sampled_from(["{}", "{1x}", "{a-b}", "{x+y}", "{ a}", "{a}}", "{{a}", "{a++}"])

GOOD_LITERAL = st.lists(GOOD_PIECES, max_size=4).map("".join)
ANY_LITERAL = st.lists(st.one_of(GOOD_PIECES, ODD_PIECES), max_size=4).map("".join)
ANY_SEGMENT = st.one_of(
    ANY_LITERAL,
    NAMES.map(lambda n: "{" + n + "}"),
    NAMES.map(lambda n: "{" + n + "+}"),
    BAD_VARIABLES,
    st.tuples(GOOD_LITERAL, NAMES).map(lambda t: f"{t[0]}{{{t[1]}}}"),
)
ANY_TEMPLATE = st.one_of(
    st.lists(ANY_SEGMENT, min_size=1, max_size=5).map(lambda s: "/" + "/".join(s)),
    st.lists(ANY_SEGMENT, min_size=1, max_size=3).map("/".join),  # no leading "/"
    st.text(max_size=12),
)
ANY_REWRITE = st.one_of(
    st.lists(
        st.one_of(
            ANY_LITERAL,
            st.just("/"),
            NAMES.map(lambda n: "{" + n + "}"),
            NAMES.map(lambda n: "{" + n + "+}"),
            BAD_VARIABLES,
        ),
        max_size=6,
    ).map(lambda parts: "/" + "".join(parts)),
    st.text(max_size=12),
)


def _is_dot(segment: str) -> bool:
    return segment.partition(";")[0] in (".", "..")


#: One segment of a request path: non-empty, not a dot segment.
VALUE_SEGMENT = GOOD_LITERAL.filter(lambda s: s != "" and not _is_dot(normalize_segment(s)))


@st.composite
def valid_templates(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    """A template the grammar accepts, and ``(kind, text)`` per segment: ``"literal"``,
    ``"var"`` or ``"greedy"``, text being the literal or the variable's name."""
    kinds = draw(st.lists(st.sampled_from(["literal", "var"]), max_size=5))
    if draw(st.booleans()):
        kinds.append("greedy")
    if not kinds:
        kinds = ["literal"]
    names = iter(draw(st.lists(NAMES, min_size=len(kinds), max_size=len(kinds), unique=True)))
    segments: list[tuple[str, str]] = []
    for kind in kinds:
        if kind == "literal":
            literal = draw(GOOD_LITERAL.filter(lambda s: not _is_dot(normalize_segment(s))))
            segments.append((kind, literal))
        else:
            segments.append((kind, next(names)))
    text = "/" + "/".join(
        t if k == "literal" else "{" + t + ("+}" if k == "greedy" else "}") for k, t in segments
    )
    return text, segments


# --- a template the check accepts works in the matcher --------------------------------------


@settings(max_examples=300)
@given(case=valid_templates(), data=st.data())
def test_accepted_template_compiles_and_matches_a_path_built_from_it(
    case: tuple[str, list[tuple[str, str]]], data: st.DataObject
) -> None:
    text, segments = case
    variables = path_variables(text)  # what `l4gw check` runs; raises if it refuses
    assert variables == {t: k == "greedy" for k, t in segments if k != "literal"}
    template = PathTemplate(text)
    assert template.variables == variables
    request: list[str] = []
    expected: dict[str, str] = {}
    for kind, name_or_literal in segments:
        if kind == "literal":
            request.append(name_or_literal)  # a client writes the literal as the template does
        elif kind == "var":
            value = data.draw(VALUE_SEGMENT)
            request.append(value)
            expected[name_or_literal] = normalize_segment(value)
        else:
            values = data.draw(st.lists(VALUE_SEGMENT | st.just(""), min_size=1, max_size=3))
            if values == [""]:
                values = ["x"]
            request.extend(values)
            expected[name_or_literal] = "/".join(normalize_segment(v) for v in values)
    request_segments, _ = normalize_path("/" + "/".join(request))
    assert template.match(request_segments) == expected


@settings(max_examples=400)
@given(path=ANY_TEMPLATE, rewrite=st.none() | ANY_REWRITE)
def test_every_route_the_config_accepts_compiles(path: str, rewrite: str | None) -> None:
    route: dict[str, Any] = {"path": path, "upstream": "web"}
    if rewrite is not None:
        route["rewrite"] = rewrite
    document = {
        "upstreams": {"web": {"nodes": ["127.0.0.1:8080"]}},
        "listeners": [{"name": "l", "listen": "127.0.0.1:0", "mode": "http", "routes": [route]}],
    }
    try:
        config = parse_config(document)
    except ConfigError:
        return
    table = RouteTable.for_listener(config.listeners[0])  # raises if it cannot compile
    assert table.routes[0].template is not None
    assert table.routes[0].template.text == path


def test_literal_text_is_kept_in_normalised_form() -> None:
    assert literal_segment("caf\u00e9") == "caf%C3%A9"
    assert literal_segment("%7e%2a") == "~%2A"
    assert parse_path_template("/caf\u00e9/{id}/%7e").fixed == (
        ("caf%C3%A9", False),
        ("id", True),
        ("~", False),
    )
    assert parse_rewrite("/v2/{id}.json?x=%7e", {"id": False}) == (
        ("/v2/", False),
        ("id", True),
        (".json%3Fx=~", False),
    )
    for bad in ("%2F", "%5C", "%00", "%", "%zz"):
        with pytest.raises(BadRequestPath):
            literal_segment(bad)


@given(text=st.text(max_size=20))
def test_parsers_raise_only_value_error(text: str) -> None:
    try:
        variables = parse_path_template(text).variables
    except ValueError:
        variables = {"a": False, "b": True}
    try:
        parse_rewrite(text, variables)
    except ValueError:
        pass


# --- the two former grammars, combined ------------------------------------------------------
# Copies of the parsers as they were at 1eebf99 (config.py:686-739 and routes.py:183-281),
# trimmed to what they accepted, raised and built. The escape rules (normalize_segment) were
# moved unchanged, so the routes oracle uses them.

_OLD_VAR_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_OLD_VAR_NAME_RE = re.compile(_OLD_VAR_NAME + r"\Z")
_OLD_SEGMENT_VAR_RE = re.compile(r"\{(" + _OLD_VAR_NAME + r")(\+?)\}\Z")
_OLD_BRACED_RE = re.compile(r"\{([^{}]*)\}")
_OLD_VAR_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\+?)\}")


def _old_show(text: str) -> str:
    import json

    return json.dumps(text)


def _old_config_path_text(text: str, *, what: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f'{what} must start with "/" (got {_old_show(text)})')
    if any(c.isspace() or not c.isprintable() or c == "#" for c in text):
        raise ValueError(f'{what} must not contain spaces, control characters or "#"')
    return text


def old_config_path_variables(template: str) -> dict[str, bool]:
    text = _old_config_path_text(template, what="path")
    if "?" in text:
        raise ValueError('path must not contain "?" (routes match the path only)')
    segments = text[1:].split("/")
    variables: dict[str, bool] = {}
    for index, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            continue
        match = _OLD_SEGMENT_VAR_RE.match(segment)
        if match is None:
            raise ValueError(
                f"segment {_old_show(segment)}: a variable is a whole segment, {{name}} or "
                "{name+}, its name letters, digits and _ (not starting with a digit)"
            )
        name, greedy = match[1], bool(match[2])
        if name in variables:
            raise ValueError(f"variable {{{name}}} appears twice")
        if greedy and index != len(segments) - 1:
            raise ValueError(f"the greedy variable {{{name}+}} must be the last segment")
        variables[name] = greedy
    return variables


def old_config_check_rewrite(text: str, variables: Mapping[str, bool]) -> str:
    text = _old_config_path_text(text, what="rewrite")
    for match in _OLD_BRACED_RE.finditer(text):
        inner = match[1]
        name = inner.removesuffix("+")
        if not _OLD_VAR_NAME_RE.match(name):
            raise ValueError(f"{{{inner}}} is not a variable reference")
        if name not in variables:
            known = ", ".join(f"{{{v}}}" for v in variables) or "none"
            raise ValueError(f"{{{name}}} is not a variable of the path (variables: {known})")
        if inner.endswith("+") and not variables[name]:
            raise ValueError(f"{{{inner}}}: {{{name}}} is not greedy in the path")
    if "{" in _OLD_BRACED_RE.sub("", text) or "}" in _OLD_BRACED_RE.sub("", text):
        raise ValueError(f"unbalanced braces in {_old_show(text)}")
    return text


def _old_literal(segment: str) -> str:
    from urllib.parse import quote

    return normalize_segment(quote(segment, safe="!$&'()*+,;=:@-._~%"))


def old_routes_template(
    text: str,
) -> tuple[tuple[tuple[str, bool], ...], str | None, dict[str, bool]]:
    if not text.startswith("/"):
        raise ValueError(f"path template {text!r} must start with '/'")
    segments = text[1:].split("/")
    fixed: list[tuple[str, bool]] = []
    greedy: str | None = None
    variables: dict[str, bool] = {}
    for index, segment in enumerate(segments):
        match = _OLD_SEGMENT_VAR_RE.match(segment)
        if match is None:
            if "{" in segment or "}" in segment:
                raise ValueError(f"segment {segment!r}: a variable is a whole segment")
            fixed.append((_old_literal(segment), False))
            continue
        name, plus = match[1], bool(match[2])
        if name in variables:
            raise ValueError(f"variable {{{name}}} appears twice")
        variables[name] = plus
        if plus:
            if index != len(segments) - 1:
                raise ValueError(f"the greedy variable {{{name}+}} must be the last segment")
            greedy = name
        else:
            fixed.append((name, True))
    return tuple(fixed), greedy, variables


def old_routes_rewrite(text: str, variables: Mapping[str, bool]) -> tuple[tuple[str, bool], ...]:
    def literal_text(part: str) -> str:
        return "/".join(_old_literal(s) for s in part.split("/"))

    if not text.startswith("/"):
        raise ValueError(f"rewrite {text!r} must start with '/'")
    if "{" in _OLD_VAR_RE.sub("", text) or "}" in _OLD_VAR_RE.sub("", text):
        raise ValueError(f"unbalanced braces in rewrite {text!r}")
    parts: list[tuple[str, bool]] = []
    position = 0
    for match in _OLD_VAR_RE.finditer(text):
        if match.start() > position:
            parts.append((literal_text(text[position : match.start()]), False))
        name = match[1]
        if name not in variables:
            raise ValueError(f"{{{name}}} is not a variable of the path")
        if match[2] and not variables[name]:
            raise ValueError(f"{{{name}+}}: {{{name}}} is not greedy in the path")
        parts.append((name, True))
        position = match.end()
    if position < len(text):
        parts.append((literal_text(text[position:]), False))
    return tuple(parts)


def _outcome(parse: Any, *args: Any) -> tuple[bool, Any]:
    try:
        return True, parse(*args)
    except ValueError as exc:
        return False, str(exc)


@settings(max_examples=1000)
@given(text=ANY_TEMPLATE)
def test_path_grammar_is_the_former_two_combined(text: str) -> None:
    """Accepted exactly when both former parsers accepted; compiled as the matcher did; the
    check's message as it was. Where only the config check accepted (a literal escape a
    request may not have: the matcher could not compile it), the new message names it."""
    new_ok, new = _outcome(parse_path_template, text)
    config_ok, config = _outcome(old_config_path_variables, text)
    routes_ok, routes = _outcome(old_routes_template, text)
    assert new_ok == (config_ok and routes_ok)
    if new_ok:
        assert (new.fixed, new.greedy, new.variables) == routes
        assert new.variables == config
    elif not config_ok:
        assert new == config
    else:
        assert new.startswith("segment ") and re.search("path contains|malformed", new), new


@settings(max_examples=1000)
@given(
    rewrite=ANY_REWRITE,
    variables=st.dictionaries(NAMES, st.booleans(), max_size=3),
)
def test_rewrite_grammar_is_the_former_two_combined(
    rewrite: str, variables: dict[str, bool]
) -> None:
    new_ok, new = _outcome(parse_rewrite, rewrite, variables)
    config_ok, config = _outcome(old_config_check_rewrite, rewrite, variables)
    routes_ok, routes = _outcome(old_routes_rewrite, rewrite, variables)
    assert new_ok == (config_ok and routes_ok)
    if new_ok:
        assert new == routes
    elif not config_ok:
        assert new == config
    else:
        assert new.startswith("rewrite ") and re.search("path contains|malformed", new), new


# --- the module stands alone ----------------------------------------------------------------


def test_templates_imports_neither_trio_nor_the_rest_of_l4gw() -> None:
    tree = ast.parse(Path(templates.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, ast.unparse(node)
            assert not (node.module or "").startswith(("trio", "l4gw")), ast.unparse(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith(("trio", "l4gw")), alias.name
