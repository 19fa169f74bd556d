"""What a reload would change: a readable diff of two configurations. No I/O.

Both sides are the JSON form served at ``/config`` (``configfiles.config_as_dict``). Lists whose
items have an identity are compared by it — listeners and ``[[authorize]]`` entries by
``name``, nodes by ``address``, routes by position — so a re-ordered file shows no change and
a changed weight shows as one line, not as a removed and an added node.
"""

from __future__ import annotations

import json
from typing import Any

#: List-valued keys whose items are matched by one of their fields.
_IDENTITY = {"listeners": "name", "authorize": "name", "nodes": "address"}


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _keyed(items: list[Any], key: str) -> dict[str, Any] | None:
    """``{item[key]: item}`` when every item is a dict with a distinct ``key``, else None."""
    result: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict) or key not in item or str(item[key]) in result:
            return None
        result[str(item[key])] = item
    return result


def _walk(path: str, old: Any, new: Any, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys(), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"- {sub}: {_show(old[key])}")
            elif key not in old:
                out.append(f"+ {sub}: {_show(new[key])}")
            else:
                _walk(sub, old[key], new[key], out)
        return
    field = path.rsplit(".", 1)[-1]
    if isinstance(old, list) and isinstance(new, list) and field in _IDENTITY:
        old_keyed = _keyed(old, _IDENTITY[field])
        new_keyed = _keyed(new, _IDENTITY[field])
        if old_keyed is not None and new_keyed is not None:
            for ident in old_keyed.keys() - new_keyed.keys():
                out.append(f"- {path}[{ident}]")
            for ident in new_keyed:
                if ident not in old_keyed:
                    out.append(f"+ {path}[{ident}]: {_show(new_keyed[ident])}")
                else:
                    _walk(f"{path}[{ident}]", old_keyed[ident], new_keyed[ident], out)
            return
    if old != new:
        out.append(f"~ {path}: {_show(old)} -> {_show(new)}")


def diff_configs(running: dict[str, Any], proposed: dict[str, Any]) -> list[str]:
    """One line per change from ``running`` to ``proposed``: ``+`` added, ``-`` removed,
    ``~`` changed, each with its key path (``listeners[vpc-link].allow``,
    ``upstreams.web.nodes[10.0.1.10:80].weight``). An empty list means no change."""
    out: list[str] = []
    _walk("", running, proposed, out)
    return out
