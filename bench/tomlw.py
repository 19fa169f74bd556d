"""A minimal TOML writer (the standard library only reads TOML), plus dotted-path overrides.

Enough for the l4gw configs the bench generates: strings, integers, floats, booleans, lists,
tables, and lists of tables (written as ``[[name]]`` blocks, which is equivalent to inline tables).
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

TomlTable = dict[str, Any]


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_scalar(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key)
    return key if bare else json.dumps(key)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _is_flat(table: TomlTable) -> bool:
    return not any(isinstance(v, dict) or _is_table_list(v) for v in table.values())


def _block(value: Any, depth: int) -> bool:
    """Whether ``value`` is written as a ``[table]`` / ``[[table]]`` block, not inline.

    Top-level lists of tables are ``[[blocks]]`` (``[[listeners]]``); deeper lists of flat tables
    are inline arrays (``nodes = [{ address = ..., weight = 1 }]``), as in the spec's examples.
    """
    if isinstance(value, dict):
        return True
    if _is_table_list(value):
        return depth == 0 or not all(_is_flat(v) for v in value)
    return False


def _value(value: Any) -> str:
    """A value, long lists one item per line."""
    if isinstance(value, list) and len(value) > 4:
        return "[\n" + "".join(f"  {_scalar(v)},\n" for v in value) + "]"
    return _scalar(value)


def _write_table(table: TomlTable, prefix: list[str], out: list[str]) -> None:
    depth = len(prefix)
    for key, value in table.items():
        if not _block(value, depth):
            out.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if not _block(value, depth):
            continue
        path = [*prefix, key]
        header = ".".join(_key(p) for p in path)
        if isinstance(value, dict):
            # A table holding only sub-tables needs no header of its own.
            if any(not _block(v, depth + 1) for v in value.values()) or not value:
                out.extend(["", f"[{header}]"])
            _write_table(value, path, out)
        else:
            for item in value:
                out.extend(["", f"[[{header}]]"])
                _write_table(item, path, out)


def dumps(doc: TomlTable) -> str:
    """``doc`` as TOML text; ``tomllib.loads(dumps(doc)) == doc`` for the supported types."""
    out: list[str] = []
    _write_table(doc, [], out)
    return "\n".join(out).lstrip("\n") + "\n"


def parse_override(text: str) -> tuple[str, Any]:
    """``"daemon.log_format=\\"json\\""`` → ``("daemon.log_format", "json")``.

    The value is TOML (``5``, ``true``, ``"250ms"``, ``["10.0.0.0/8"]``); a bare word that is
    not valid TOML is taken as a string.
    """
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"expected KEY.PATH=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path.strip(), value


def set_path(doc: TomlTable, path: str, value: Any) -> None:
    """Set ``doc[a][b][0][c] = value`` for ``path = "a.b.0.c"``, creating tables as needed."""
    parts = path.split(".")
    node: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
