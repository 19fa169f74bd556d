"""Route matching and path rewriting for http mode. No I/O.

A :class:`RouteTable` is compiled once per listener configuration from its
``[[listeners.routes]]`` entries plus the listener's ``upstream`` as a fallback route named
``"default"``. :meth:`RouteTable.match` takes the request method, the Host header and the
request target, and returns the route and the request target to send to the node. The grammar
of path templates and rewrites, and the normalisation of a path segment, live in
:mod:`l4gw.core.templates`, which the config check uses too, so a file ``l4gw check`` accepts
compiles here.

Decisions (also in ``docs/http.md``):

* **Paths are matched on the raw request target, split on "/"**, after one normalisation step
  that changes no meaning (RFC 3986 §6.2.2): percent-encoded *unreserved* characters
  (``A-Z a-z 0-9 - . _ ~``) are decoded and the hex digits of every other escape are
  upper-cased. The node receives this normalised path, so what the matcher saw is what the
  node gets. Nothing else is decoded: a variable never carries a decoded ``/``.
* **Rejected with 400** (:class:`BadRequestPath`): a segment that is ``.`` or ``..`` (also
  when written ``%2E``, or followed by ``;params`` as in Tomcat's ``/..;/``), an encoded
  ``/`` (``%2F``), ``\\`` or ``%5C`` (a separator for some servers), NUL (``%00``), a
  malformed escape (``%zz``, ``%4``), a raw ``#``, and request targets that are neither
  origin-form (``/path?query``) nor absolute-form (``http://host/path``). So a greedy
  variable only ever carries whole, ordinary segments, and no rewrite can climb out of its
  prefix on the node.
* ``{name}`` matches exactly one non-empty segment; ``{name+}`` (last only) matches one or
  more segments and its value must be non-empty: as in API Gateway, ``/foo/{proxy+}`` matches
  ``/foo/a`` and ``/foo/a/b/`` but **not** ``/foo`` nor ``/foo/`` (add a ``/foo`` route for
  those). Literal segments compare case-sensitively; a trailing slash is significant
  (``/foo`` and ``/foo/`` are different paths).
* Host: exact (case-insensitive) or ``*.suffix``, which matches any name ending in
  ``.suffix`` with at least one more label (``a.suffix``, ``a.b.suffix``, not ``suffix``),
  as nginx does. The port and a trailing dot are ignored. An absolute-form target's host
  wins over the Host header (RFC 9112 §3.2.2).
* Methods: empty means any; ``GET`` also admits ``HEAD``.
* The query string is passed on unchanged, after the rewritten path.
* The route name used in metrics is the route's path template, ``"default"`` for the fallback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..core.templates import BadRequestPath, normalize_segment, parse_path_template, parse_rewrite

if TYPE_CHECKING:
    from ..core.config import ListenerConfig, RouteConfig

__all__ = [
    "DEFAULT_ROUTE",
    "BadRequestPath",
    "PathTemplate",
    "Rewrite",
    "Route",
    "RouteMatch",
    "RouteTable",
    "normalize_host",
    "normalize_path",
    "route_table",
    "split_target",
]

#: Route name of the listener's fallback ``upstream``.
DEFAULT_ROUTE = "default"

# -- request target and host ---------------------------------------------------------------


def split_target(target: str) -> tuple[str | None, str, str]:
    """Split a request target into ``(host from absolute-form or None, path, query)``.

    ``query`` keeps its leading ``"?"`` (or is ``""``). Raises :class:`BadRequestPath` for
    asterisk-form, authority-form and anything else that is not origin- or absolute-form.
    """
    if target.startswith("/"):
        path, sep, query = target.partition("?")
        return None, path, sep + query
    lowered = target[:8].lower()
    if lowered.startswith("http://") or lowered.startswith("https://"):
        rest = target[target.index("//") + 2 :]
        cut = len(rest)
        for stop in "/?":
            index = rest.find(stop)
            if 0 <= index < cut:
                cut = index
        authority, remainder = rest[:cut], rest[cut:]
        if "@" in authority or not authority:
            raise BadRequestPath("absolute-form target without a valid authority")
        path, sep, query = remainder.partition("?")
        return authority, (path or "/"), sep + query
    raise BadRequestPath("request target must be a path (origin-form) or an absolute URL")


def normalize_host(host: str | None) -> str | None:
    """Lower-case ``host`` without its port and trailing dot (``"A.b.:80"`` -> ``"a.b"``)."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        host = name
    return host.rstrip(".") or None


def _is_dot_segment(segment: str) -> bool:
    if not segment.startswith("."):
        return False
    head = segment.partition(";")[0]
    return head in (".", "..")


def normalize_path(path: str) -> tuple[list[str], str]:
    """The segments of an absolute path and the normalised path (see the module docstring).

    ``"/a/b%7e/"`` -> ``(["a", "b~", ""], "/a/b~/")``. Raises :class:`BadRequestPath`.
    """
    if not path.startswith("/"):
        raise BadRequestPath("path must start with '/'")
    segments = path[1:].split("/")
    if "%" in path:
        segments = [normalize_segment(s) if "%" in s else s for s in segments]
        path = "/" + "/".join(segments)
    if "\\" in path:
        raise BadRequestPath("path contains '\\'")
    if "#" in path:
        raise BadRequestPath("path contains '#'")
    if "." in path:
        for segment in segments:
            if _is_dot_segment(segment):
                raise BadRequestPath("path contains a '.' or '..' segment")
    return segments, path


# -- templates -----------------------------------------------------------------------------


class PathTemplate:
    """A compiled route path: literal segments, ``{name}`` and a final greedy ``{name+}``.

    The grammar (and the ``ValueError`` raised for a bad template) is
    :func:`l4gw.core.templates.parse_path_template`, the one the config check uses.
    """

    __slots__ = ("fixed", "greedy", "text", "variables")

    def __init__(self, text: str) -> None:
        parts = parse_path_template(text)
        self.text = text
        self.fixed = parts.fixed
        self.greedy = parts.greedy
        #: Variable name -> True for the greedy one.
        self.variables = parts.variables

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        """The variables if the (normalised) ``segments`` match, else None."""
        fixed = self.fixed
        count = len(fixed)
        if self.greedy is None:
            if len(segments) != count:
                return None
        elif len(segments) <= count:
            return None
        values: dict[str, str] = {}
        for index in range(count):
            expected, is_variable = fixed[index]
            segment = segments[index]
            if is_variable:
                if not segment:
                    return None
                values[expected] = segment
            elif segment != expected:
                return None
        if self.greedy is not None:
            rest = "/".join(segments[count:])
            if not rest:
                return None
            values[self.greedy] = rest
        return values

    def __repr__(self) -> str:
        return f"PathTemplate({self.text!r})"


class Rewrite:
    """A compiled rewrite template: text with ``{name}`` (or ``{name+}``) substitutions.

    The grammar (and the ``ValueError`` raised for a bad rewrite) is
    :func:`l4gw.core.templates.parse_rewrite`, the one the config check uses.
    """

    __slots__ = ("parts", "text")

    def __init__(self, text: str, variables: Mapping[str, bool]) -> None:
        self.text = text
        self.parts = parse_rewrite(text, variables)

    def expand(self, values: Mapping[str, str]) -> str:
        """The rewritten path (not re-checked; see :meth:`Route.upstream_path`)."""
        return "".join(values[p] if is_var else p for p, is_var in self.parts)

    def __repr__(self) -> str:
        return f"Rewrite({self.text!r})"


class Route:
    """One compiled route (or the fallback when ``template`` is None)."""

    __slots__ = (
        "config",
        "host_exact",
        "host_header",
        "host_suffix",
        "methods",
        "name",
        "rewrite",
        "template",
        "upstream",
    )

    def __init__(
        self,
        *,
        name: str,
        upstream: str,
        template: PathTemplate | None,
        host: str | None = None,
        methods: Iterable[str] = (),
        rewrite: str | None = None,
        host_header: str | None = None,
        config: RouteConfig | None = None,
    ) -> None:
        self.name = name
        self.upstream = upstream
        self.template = template
        self.config = config
        self.host_exact: str | None = None
        self.host_suffix: str | None = None
        if host:
            host = host.lower().rstrip(".")
            if host.startswith("*."):
                self.host_suffix = host[1:]  # ".example.com"
            else:
                self.host_exact = host
        method_set = {m.upper() for m in methods}
        if "GET" in method_set:
            method_set.add("HEAD")
        self.methods: frozenset[str] | None = frozenset(method_set) if method_set else None
        if rewrite is not None and template is None:
            raise ValueError("a rewrite needs a path template")
        self.rewrite = (
            Rewrite(rewrite, template.variables) if rewrite is not None and template else None
        )
        #: Host sent to the node instead of the upstream's ``host_header`` ("" = not set).
        self.host_header = host_header or None

    @classmethod
    def from_config(cls, config: RouteConfig) -> Route:
        """Compile one ``[[listeners.routes]]`` entry. Raises ``ValueError``."""
        return cls(
            name=config.path,
            upstream=config.upstream,
            template=PathTemplate(config.path),
            host=config.host,
            methods=config.methods,
            rewrite=config.rewrite,
            host_header=config.host_header,
            config=config,
        )

    def host_matches(self, host: str | None) -> bool:
        if self.host_exact is not None:
            return host == self.host_exact
        if self.host_suffix is not None:
            return (
                host is not None
                and host.endswith(self.host_suffix)
                and len(host) > len(self.host_suffix)
            )
        return True

    def match_path(self, segments: Sequence[str], path: str) -> str | None:
        """The path for the node if the normalised path matches, else None.

        Raises :class:`BadRequestPath` if a rewrite would produce a dot segment (only possible
        through literal text of the rewrite itself, e.g. ``"/{a}/.."``).
        """
        template = self.template
        if template is None:
            return path
        values = template.match(segments)
        if values is None:
            return None
        if self.rewrite is None:
            return path
        result = self.rewrite.expand(values)
        if "." in result and any(_is_dot_segment(s) for s in result.split("/")):
            raise BadRequestPath("the rewritten path would contain a '.' or '..' segment")
        return result

    def __repr__(self) -> str:
        return f"Route({self.name!r} -> {self.upstream!r})"


class RouteMatch:
    """The result of routing one request."""

    __slots__ = ("host", "path", "route", "target")

    def __init__(self, route: Route, target: str, path: str, host: str | None) -> None:
        self.route = route
        #: Request target for the node: rewritten (or normalised) path plus the query.
        self.target = target
        #: The normalised request path (before any rewrite), for logs.
        self.path = path
        #: The normalised host the route was matched with (None if the request had none).
        self.host = host


class RouteTable:
    """The routes of one listener, tried in order; the fallback (if any) comes last."""

    __slots__ = ("routes",)

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    @classmethod
    def from_config(cls, routes: Sequence[RouteConfig], fallback: str | None = None) -> RouteTable:
        """Compile routes plus, if ``fallback`` is an upstream name, the default route."""
        compiled = [Route.from_config(r) for r in routes]
        if fallback:
            compiled.append(Route(name=DEFAULT_ROUTE, upstream=fallback, template=None))
        return cls(compiled)

    @classmethod
    def for_listener(cls, config: ListenerConfig) -> RouteTable:
        return cls.from_config(config.routes, config.upstream)

    def match(self, method: str, host_header: str | None, target: str) -> RouteMatch | None:
        """Route one request; None when no route matches (404).

        Raises :class:`BadRequestPath` (400) for targets refused by the rules above, whether
        or not a route would match.
        """
        authority, raw_path, query = split_target(target)
        host = normalize_host(authority if authority is not None else host_header)
        segments, path = normalize_path(raw_path)
        for route in self.routes:
            methods = route.methods
            if methods is not None and method not in methods:
                continue
            if (route.host_exact is not None or route.host_suffix is not None) and (
                not route.host_matches(host)
            ):
                continue
            upstream_path = route.match_path(segments, path)
            if upstream_path is not None:
                return RouteMatch(route, upstream_path + query, path, host)
        return None


_TABLES: dict[int, tuple[ListenerConfig, RouteTable]] = {}


def route_table(config: ListenerConfig) -> RouteTable:
    """The compiled table of a listener configuration (cached per configuration object)."""
    entry = _TABLES.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    table = RouteTable.for_listener(config)
    if len(_TABLES) >= 64:
        _TABLES.clear()
    _TABLES[id(config)] = (config, table)
    return table
