"""The import graph of l4gw, built from the source (lazy imports inside functions and
``TYPE_CHECKING`` imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import l4gw

PACKAGE = Path(l4gw.__file__).parent


def module_name(path: Path) -> str:
    parts = ["l4gw", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the l4gw modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = node.module or ""
                if node.level:
                    target = f"{base}.{target}" if target else base
                candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            edges.update(c for c in candidates if c in modules and c != name)
        graph[name] = edges
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "l4gw.workers" in graph["l4gw.cli"]  # imported inside cmd_run only
    assert "l4gw.daemon" in graph["l4gw.cli"]


def test_daemon_and_workers_do_not_import_each_other() -> None:
    graph = import_graph()
    assert "l4gw.workers" not in reachable(graph, "l4gw.daemon")
    assert "l4gw.daemon" not in reachable(graph, "l4gw.workers")


def test_the_shared_modules_import_neither_process() -> None:
    graph = import_graph()
    for shared in (
        "l4gw.admin",
        "l4gw.metrics",
        "l4gw.nodechannel",
        "l4gw.reloading",
        "l4gw.statusdoc",
        "l4gw.configfiles",
        "l4gw.listeners",
    ):
        assert not {"l4gw.daemon", "l4gw.workers", "l4gw.cli"} & reachable(graph, shared), shared
