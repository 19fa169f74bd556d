"""The package's import graph, built from the source: no cycles, and layers import downwards.

Every ``import`` counts, at module level, inside functions and under ``TYPE_CHECKING``
alike: a cycle hidden behind a lazy or type-only import is still two modules that cannot be
understood, tested or replaced one without the other.

The layers, lowest first (a module may import from its own layer and the ones below):

``core``     configuration, policy and state: no trio, no event loop
``l4``       the reactor, connecting to nodes, relaying bytes, tcp serving
``http``     the exchange, codecs, routes, TLS stream and the two drivers
``serve``    the daemon: listeners, admin, metrics, health and discovery drivers, systemd
``workers``  the control plane, its channel to workers, the supervisor
``ops``      the command line, the status command, the demo, resource checks
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "l4gw"
LAYERS = ("core", "l4", "http", "serve", "workers", "ops")
#: Modules outside the layer packages: the package root and ``python -m l4gw``.
TOP = {"l4gw", "l4gw.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules that module ``name`` (at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("l4gw"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    yield sub
                elif target in known:
                    yield target


@functools.cache
def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        name: {dep for dep in imported(name, path, known) if dep != name}
        for name, path in found.items()
    }


def layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(edges.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_source() -> None:
    edges = graph()
    assert "l4gw.http.exchange" in edges
    # A relative import, an absolute one and a submodule named in a from-import all count.
    assert "l4gw.http.exchange" in edges["l4gw.http.fastpath"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_every_module_is_in_a_layer() -> None:
    assert [name for name in modules() if layer(name) is None and name not in TOP] == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_point_down(name: str) -> None:
    own = layer(name)
    if own is None:
        return
    upward = sorted(
        dep for dep in graph()[name] if (other := layer(dep)) is not None and other > own
    )
    assert upward == [], f"{name} ({LAYERS[own]}) imports from a higher layer"


def test_core_has_no_trio() -> None:
    """The core has no event loop: no trio (``socket`` is fine for address parsing)."""
    offenders = []
    for name, path in modules().items():
        if layer(name) != 0:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            offenders += [(name, n) for n in names if n.split(".")[0] == "trio"]
    assert offenders == []
