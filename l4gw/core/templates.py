"""The grammar of http route path templates and rewrites, shared by the config check and the
route matcher. No I/O, no trio.

A **path template** (``[[listeners.routes]] path``) is an absolute path of segments: literal
text, ``{name}`` (exactly one segment) or, as the last segment only, the greedy ``{name+}``
(one or more segments). A variable is a whole segment; a name is letters, digits and ``_``, not
starting with a digit, and appears once. ``"?"`` is refused (routes match the path only), and so
are spaces, control characters and ``"#"``.

A **rewrite** is text starting with ``"/"`` in which ``{name}`` stands for a variable of the
path (anywhere, also inside a segment) and ``{name+}`` for the greedy one; every other brace is
an error.

**Literal text** is kept in the form a normalised request path has (:func:`normalize_segment`,
RFC 3986 §6.2.2): characters outside RFC 3986 ``pchar`` are percent-encoded, escapes of
unreserved characters decoded and the others upper-cased. So a template literal matches a
request written either way, and a literal with a malformed escape or an encoded ``/``, ``\\``
or NUL is refused here, when the configuration is checked, as a request path with it would be.

:func:`parse_path_template` and :func:`parse_rewrite` raise ``ValueError`` whose text is the
message ``l4gw check`` shows after the key path; :class:`BadRequestPath` (a ``ValueError``) is
raised for a request path segment by :func:`normalize_segment`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import quote

__all__ = [
    "BadRequestPath",
    "PathTemplateParts",
    "check_path_text",
    "literal_segment",
    "literal_text",
    "normalize_segment",
    "parse_path_template",
    "parse_rewrite",
    "path_variables",
]

_VAR_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VAR_NAME_RE = re.compile(_VAR_NAME + r"\Z")
#: A whole segment that is a variable: ``{name}`` or ``{name+}``.
_SEGMENT_VAR_RE = re.compile(r"\{(" + _VAR_NAME + r")(\+?)\}\Z")
#: Any braced text in a rewrite (checked to be a variable reference).
_BRACED_RE = re.compile(r"\{([^{}]*)\}")

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: Escapes that would let a segment smuggle a separator or a terminator.
_FORBIDDEN_ESCAPES = {0x2F: "%2F (an encoded '/')", 0x5C: "%5C (an encoded '\\')", 0x00: "%00"}
_HEX = frozenset("0123456789abcdefABCDEF")
#: Characters left as they are when a template literal is percent-encoded (RFC 3986 pchar).
_PCHAR_SAFE = "!$&'()*+,;=:@-._~%"


class BadRequestPath(ValueError):
    """A request target that is refused before routing (HTTP 400)."""

    status_hint = 400


def normalize_segment(segment: str) -> str:
    """One path segment with unreserved escapes decoded and the others upper-cased.

    ``"b%7e%2a"`` -> ``"b~%2A"``. Raises :class:`BadRequestPath` for a malformed escape
    (``%zz``, ``%4``) and for ``%2F``, ``%5C`` and ``%00``.
    """
    out: list[str] = []
    i = 0
    n = len(segment)
    while i < n:
        ch = segment[i]
        if ch == "%":
            hex_digits = segment[i + 1 : i + 3]
            if len(hex_digits) != 2 or hex_digits[0] not in _HEX or hex_digits[1] not in _HEX:
                raise BadRequestPath(f"malformed percent-escape in path segment {segment!r}")
            value = int(hex_digits, 16)
            if value in _FORBIDDEN_ESCAPES:
                raise BadRequestPath(f"path contains {_FORBIDDEN_ESCAPES[value]}")
            if value in _UNRESERVED:
                out.append(chr(value))
            else:
                out.append("%" + hex_digits.upper())
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def literal_segment(segment: str) -> str:
    """A template's literal segment in the form a normalised request path has
    (``"café"`` -> ``"caf%C3%A9"``, ``"%7e"`` -> ``"~"``). Raises :class:`BadRequestPath` as
    :func:`normalize_segment` does."""
    return normalize_segment(quote(segment, safe=_PCHAR_SAFE))


def literal_text(text: str) -> str:
    """Literal text of a rewrite (may span segments), each segment as :func:`literal_segment`."""
    return "/".join(literal_segment(s) for s in text.split("/"))


def _quoted(text: str) -> str:
    return json.dumps(text)


def check_path_text(text: str, *, what: str) -> str:
    """``text`` if it starts with ``"/"`` and has no space, control character or ``"#"``;
    ``what`` names it in the ``ValueError`` raised otherwise (``"path"``, ``"rewrite"``)."""
    if not text.startswith("/"):
        raise ValueError(f'{what} must start with "/" (got {_quoted(text)})')
    if any(c.isspace() or not c.isprintable() or c == "#" for c in text):
        raise ValueError(f'{what} must not contain spaces, control characters or "#"')
    return text


class PathTemplateParts(NamedTuple):
    """A parsed path template, in the form the route matcher uses."""

    #: Every segment but a final greedy one: ``(normalised literal, False)`` or
    #: ``(variable name, True)``.
    fixed: tuple[tuple[str, bool], ...]
    #: The name of the final greedy variable, or None.
    greedy: str | None
    #: Variable name -> True for the greedy one, in template order.
    variables: dict[str, bool]


def parse_path_template(template: str) -> PathTemplateParts:
    """Parse a route path template (see the module docstring).

    ``"/users/{id}/files/{rest+}"`` -> fixed ``(("users", False), ("id", True), ("files",
    False))``, greedy ``"rest"``. Raises ``ValueError`` with the first problem found.
    """
    text = check_path_text(template, what="path")
    if "?" in text:
        raise ValueError('path must not contain "?" (routes match the path only)')
    segments = text[1:].split("/")
    last = len(segments) - 1
    fixed: list[tuple[str, bool]] = []
    greedy: str | None = None
    variables: dict[str, bool] = {}
    for index, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            fixed.append((segment, False))
            continue
        match = _SEGMENT_VAR_RE.match(segment)
        if match is None:
            raise ValueError(
                f"segment {_quoted(segment)}: a variable is a whole segment, {{name}} or "
                "{name+}, its name letters, digits and _ (not starting with a digit)"
            )
        name, plus = match[1], bool(match[2])
        if name in variables:
            raise ValueError(f"variable {{{name}}} appears twice")
        if plus and index != last:
            raise ValueError(f"the greedy variable {{{name}+}} must be the last segment")
        variables[name] = plus
        if plus:
            greedy = name
        else:
            fixed.append((name, True))
    # The literals last, so that a template with another problem too gets the message it always
    # had (the escape rules joined this grammar from the matcher).
    for index, (segment, is_variable) in enumerate(fixed):
        if not is_variable:
            try:
                fixed[index] = (literal_segment(segment), False)
            except BadRequestPath as exc:
                raise ValueError(f"segment {_quoted(segment)}: {exc}") from None
    return PathTemplateParts(tuple(fixed), greedy, variables)


def path_variables(template: str) -> dict[str, bool]:
    """The variables of a route path template, mapped to True for the greedy one.

    ``"/users/{id}/files/{rest+}"`` -> ``{"id": False, "rest": True}``. A variable is a whole
    segment; the greedy ``{name+}`` may only be the last segment. Raises ``ValueError``.
    """
    return parse_path_template(template).variables


def parse_rewrite(text: str, variables: Mapping[str, bool]) -> tuple[tuple[str, bool], ...]:
    """Parse a rewrite against the path's ``variables`` (as :func:`path_variables` returns).

    Returns the parts in order: ``(normalised literal text, False)`` or ``(variable name,
    True)``; ``"/v2/{id}.json"`` -> ``(("/v2/", False), ("id", True), (".json", False))``.
    Raises ``ValueError`` with the first problem found.
    """
    check_path_text(text, what="rewrite")
    parts: list[tuple[str, bool]] = []
    position = 0
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
        if match.start() > position:
            parts.append((text[position : match.start()], False))
        parts.append((name, True))
        position = match.end()
    if position < len(text):
        parts.append((text[position:], False))
    rest = _BRACED_RE.sub("", text)
    if "{" in rest or "}" in rest:
        raise ValueError(f"unbalanced braces in {_quoted(text)}")
    try:
        return tuple((part if is_var else literal_text(part), is_var) for part, is_var in parts)
    except BadRequestPath as exc:
        raise ValueError(f"rewrite {_quoted(text)}: {exc}") from None
