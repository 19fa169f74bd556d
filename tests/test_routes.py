"""Route matching and path rewriting (l4gw.http.routes): pure functions, no I/O."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from l4gw.core.config import ListenerConfig, RouteConfig
from l4gw.core.netaddr import SocketAddress
from l4gw.http.routes import (
    DEFAULT_ROUTE,
    BadRequestPath,
    PathTemplate,
    Rewrite,
    Route,
    RouteTable,
    normalize_host,
    normalize_path,
    route_table,
    split_target,
)


def table(*routes: RouteConfig, fallback: str | None = None) -> RouteTable:
    return RouteTable.from_config(routes, fallback)


def target_of(t: RouteTable, target: str, method: str = "GET", host: str | None = None) -> str:
    match = t.match(method, host, target)
    assert match is not None, target
    return match.target


# --- request targets and hosts ----------------------------------------------------------


def test_split_target_forms() -> None:
    assert split_target("/a/b?x=1&y") == (None, "/a/b", "?x=1&y")
    assert split_target("/") == (None, "/", "")
    assert split_target("http://Example.com:8080/p?q") == ("Example.com:8080", "/p", "?q")
    assert split_target("https://h") == ("h", "/", "")
    assert split_target("HTTP://h?x") == ("h", "/", "?x")
    for bad in ("*", "example.com:443", "ftp://h/", "http:///x", "http://user@h/", "a/b"):
        with pytest.raises(BadRequestPath):
            split_target(bad)


def test_normalize_host() -> None:
    assert normalize_host("API.Example.com:8080") == "api.example.com"
    assert normalize_host("example.com.") == "example.com"
    assert normalize_host("[::1]:80") == "[::1]"
    assert normalize_host("10.0.0.1") == "10.0.0.1"
    assert normalize_host("") is None
    assert normalize_host(None) is None


# --- path normalisation -------------------------------------------------------------------


def test_normalize_path_decodes_unreserved_only() -> None:
    assert normalize_path("/a/%7euser/%41b") == (["a", "~user", "Ab"], "/a/~user/Ab")
    assert normalize_path("/x%2a/y%3f") == (["x%2A", "y%3F"], "/x%2A/y%3F")
    assert normalize_path("/") == ([""], "/")
    assert normalize_path("/a//b/") == (["a", "", "b", ""], "/a//b/")


@pytest.mark.parametrize(
    "path",
    [
        "/a/../b",
        "/a/./b",
        "/..",
        "/a/%2e%2e/b",
        "/a/%2E./b",
        "/a/.%2e",
        "/%2e",
        "/a/..;jsessionid=1/b",
        "/a/%2F/b",
        "/a%2fb",
        "/a%5cb",
        "/a\\b",
        "/a%00b",
        "/a%zz",
        "/a%4",
        "/a%",
        "/a#frag",
    ],
)
def test_normalize_path_refuses(path: str) -> None:
    with pytest.raises(BadRequestPath):
        normalize_path(path)


def test_dots_inside_segments_are_fine() -> None:
    assert normalize_path("/a/.well-known/x..y/...")[1] == "/a/.well-known/x..y/..."


# --- templates ----------------------------------------------------------------------------


def test_greedy_needs_at_least_one_segment() -> None:
    t = PathTemplate("/foo/{proxy+}")
    assert t.match(["foo"]) is None  # /foo
    assert t.match(["foo", ""]) is None  # /foo/
    assert t.match(["foo", "a"]) == {"proxy": "a"}
    assert t.match(["foo", "a", "b", ""]) == {"proxy": "a/b/"}
    assert t.match(["fo", "a"]) is None


def test_single_variable_is_one_nonempty_segment() -> None:
    t = PathTemplate("/users/{id}/files")
    assert t.match(["users", "42", "files"]) == {"id": "42"}
    assert t.match(["users", "", "files"]) is None
    assert t.match(["users", "4", "2", "files"]) is None


def test_literals_and_trailing_slash_are_exact() -> None:
    t = PathTemplate("/foo")
    assert t.match(["foo"]) == {}
    assert t.match(["foo", ""]) is None
    assert t.match(["Foo"]) is None
    assert PathTemplate("/").match([""]) == {}


def test_template_literal_is_normalised_like_requests() -> None:
    t = PathTemplate("/caf\u00e9/%7e")
    segments, _ = normalize_path("/caf%c3%a9/~")
    assert t.match(segments) == {}


@pytest.mark.parametrize("text", ["foo", "/a/{x+}/b", "/{x}/{x}", "/a{x}", "/{1x}", "/a/%2F"])
def test_bad_templates(text: str) -> None:
    with pytest.raises(ValueError):
        PathTemplate(text)


def test_rewrite_templates() -> None:
    variables = PathTemplate("/u/{id}/{rest+}").variables
    assert Rewrite("/v2/users/{id}/{rest}", variables).expand({"id": "7", "rest": "a/b"}) == (
        "/v2/users/7/a/b"
    )
    assert Rewrite("/x-{id}.json", variables).expand({"id": "7", "rest": "z"}) == "/x-7.json"
    assert Rewrite("/{rest+}", variables).expand({"id": "7", "rest": "z/y"}) == "/z/y"
    with pytest.raises(ValueError):
        Rewrite("/{nope}", variables)
    with pytest.raises(ValueError):
        Rewrite("/{id+}", variables)
    with pytest.raises(ValueError):
        Rewrite("/{id", variables)


# --- the route table ----------------------------------------------------------------------


def test_first_match_wins_and_fallback() -> None:
    t = table(
        RouteConfig(path="/api/{proxy+}", upstream="api", rewrite="/{proxy}"),
        RouteConfig(path="/api/special", upstream="special"),
        fallback="web",
    )
    match = t.match("GET", "h", "/api/special?x=1")
    assert match is not None
    assert match.route.upstream == "api"
    assert match.route.name == "/api/{proxy+}"
    assert match.target == "/special?x=1"
    match = t.match("GET", "h", "/other")
    assert match is not None
    assert match.route.name == DEFAULT_ROUTE
    assert match.route.upstream == "web"
    assert match.target == "/other"
    assert t.match("GET", "h", "/api") is not None  # the fallback takes it
    assert table(RouteConfig(path="/a", upstream="x")).match("GET", None, "/b") is None


def test_hosts() -> None:
    t = table(
        RouteConfig(host="api.example.com", path="/{p+}", upstream="api"),
        RouteConfig(host="*.example.com", path="/{p+}", upstream="wild"),
    )

    def upstream(host: str | None, target: str = "/x") -> str | None:
        match = t.match("GET", host, target)
        return match.route.upstream if match else None

    assert upstream("API.example.com:8443") == "api"
    assert upstream("api.example.com.") == "api"
    assert upstream("www.example.com") == "wild"
    assert upstream("a.b.example.com") == "wild"
    assert upstream("example.com") is None
    assert upstream("badexample.com") is None
    assert upstream(None) is None
    # absolute-form: the URL's host wins over the Host header
    assert upstream("other.org", "http://api.example.com/x") == "api"


def test_methods() -> None:
    t = table(
        RouteConfig(path="/r", methods=("GET",), upstream="read"),
        RouteConfig(path="/r", methods=("POST", "PUT"), upstream="write"),
    )

    def upstream(method: str) -> str | None:
        match = t.match(method, None, "/r")
        return match.route.upstream if match else None

    assert upstream("GET") == "read"
    assert upstream("HEAD") == "read"  # GET admits HEAD
    assert upstream("PUT") == "write"
    assert upstream("DELETE") is None


def test_query_is_kept_after_rewrite() -> None:
    t = table(RouteConfig(path="/foo/{proxy+}", upstream="u", rewrite="/bar/{proxy}"))
    assert target_of(t, "/foo/a/b?x=%2F&y=../..") == "/bar/a/b?x=%2F&y=../.."
    assert target_of(t, "/foo/%7Ea") == "/bar/~a"


def test_refused_targets_raise_even_without_a_match() -> None:
    t = table(RouteConfig(path="/foo/{proxy+}", upstream="u"))
    for target in ("/foo/../etc/passwd", "/foo/%2e%2e/x", "/foo/a%2Fb", "*"):
        with pytest.raises(BadRequestPath):
            t.match("GET", None, target)


def test_rewrite_literal_dot_segment_is_refused() -> None:
    t = table(RouteConfig(path="/a/{x}", upstream="u", rewrite="/{x}/.."))
    with pytest.raises(BadRequestPath):
        t.match("GET", None, "/a/b")


def test_route_table_is_cached_per_config_object() -> None:
    config = ListenerConfig(
        name="l",
        listen=SocketAddress("127.0.0.1", 1),
        mode="http",
        upstream="web",
        routes=(RouteConfig(path="/x", upstream="web"),),
    )
    first = route_table(config)
    assert route_table(config) is first
    assert [r.name for r in first.routes] == ["/x", "default"]


def test_route_from_config_keeps_host_header() -> None:
    route = Route.from_config(RouteConfig(path="/x", upstream="u", host_header="internal"))
    assert route.host_header == "internal"
    assert (
        Route.from_config(RouteConfig(path="/x", upstream="u", host_header="")).host_header is None
    )


# --- properties ---------------------------------------------------------------------------

# Segments made of pieces that exercise the normaliser: dots, escapes of every kind.
PIECES = st.sampled_from(
    [
        "a",
        "B",
        "0",
        "-",
        "_",
        "~",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%00",
        "%41",
        "%7e",
        "%20",
        "%25",
        "%zz",
        "%",
        ";",
        "=",
        "@",
        ":",
        "\\",
        "#",
    ]
)
SEGMENT = st.lists(PIECES, max_size=4).map("".join)
PATHS = st.lists(SEGMENT, min_size=1, max_size=6).map(lambda segs: "/" + "/".join(segs))
QUERY = st.text(alphabet=string.ascii_letters + "/.%=&?", max_size=10).map(
    lambda q: "?" + q if q else ""
)

CASES = [
    ("/foo/{proxy+}", "/bar/{proxy}", "/bar/{proxy+}"),
    ("/foo/{proxy+}", "/{proxy}", "/{proxy+}"),
    ("/{a}/{b}/{rest+}", "/x/{b}/{a}/{rest}", "/x/{b}/{a}/{rest+}"),
    ("/v1/{id}", "/v2/items/{id}", "/v2/items/{id}"),
]


def _is_dot(segment: str) -> bool:
    return segment.partition(";")[0] in (".", "..")


@settings(max_examples=400)
@given(path=PATHS, query=QUERY, case=st.sampled_from(CASES))
def test_rewritten_paths_match_the_rewrite_and_never_escape(
    path: str, query: str, case: tuple[str, str, str]
) -> None:
    template, rewrite, rewrite_as_template = case
    t = table(RouteConfig(path=template, upstream="u", rewrite=rewrite))
    try:
        match = t.match("GET", None, path + query)
    except BadRequestPath:
        return
    if match is None:
        return
    target = match.target
    assert target.endswith(query)
    upstream_path = target[: len(target) - len(query)] if query else target
    segments, normalised = normalize_path(upstream_path)  # never raises: no dot segments
    assert normalised == upstream_path
    assert not any(_is_dot(s) for s in segments)
    for bad in ("%2F", "%5C", "%00", "\\", "#"):
        assert bad not in upstream_path
    # The rewritten path matches the rewrite seen as a template, with the same values.
    values = PathTemplate(template).match(normalize_path(path)[0])
    assert values is not None
    assert PathTemplate(rewrite_as_template).match(segments) == values


@settings(max_examples=300)
@given(path=PATHS)
def test_normalisation_is_idempotent_and_safe(path: str) -> None:
    try:
        segments, normalised = normalize_path(path)
    except BadRequestPath:
        return
    assert normalize_path(normalised) == (segments, normalised)
    assert "/" + "/".join(segments) == normalised
    assert not any(_is_dot(s) for s in segments)
    for segment in segments:
        assert "%2F" not in segment.upper()


@given(path=PATHS)
def test_greedy_variable_carries_whole_segments(path: str) -> None:
    try:
        segments, _ = normalize_path(path)
    except BadRequestPath:
        return
    assume(segments[0] == "foo")
    values = PathTemplate("/foo/{proxy+}").match(segments)
    if values is None:
        assert len(segments) == 1 or "/".join(segments[1:]) == ""
        return
    assert values["proxy"].split("/") == segments[1:]
