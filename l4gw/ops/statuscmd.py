"""``l4gw status``: fetch ``GET /status`` from a running daemon's admin endpoint and print it.

``fetch_status`` is a blocking stdlib HTTP client (the command is a one-shot CLI, no trio);
``format_status`` turns the JSON into tables and is lenient: a missing or mistyped key is shown
as ``-``, never a traceback, so an older or newer daemon can still be read.

The JSON (produced by the admin endpoint)::

    {"version": str, "pid": int, "draining": bool, "uptime_seconds": float,
     "listeners": [{"name", "address", "mode", "upstream", "active_connections",
                    "connections_total"}],
     "upstreams": [{"name", "balance",
                    "nodes": [{"address", "weight", "healthy", "state", "active_connections",
                               "source", "last_check": str | null, "since": float | null}]}]}

``since`` is the UNIX time (``time.time()``) at which the node entered its current state.
"""

from __future__ import annotations

import http.client
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

DEFAULT_ADMIN = "127.0.0.1:9901"


class StatusError(OSError):
    """The admin endpoint could not be reached or did not answer with a status document.
    The message is meant for the operator as it is."""


def _split_admin(admin: str) -> tuple[str, int]:
    text = admin.strip()
    for prefix in ("http://", "HTTP://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.rstrip("/")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise StatusError(f'admin address {admin!r} is not "host:port" or "[ipv6]:port"')
    return host, int(port_text)


def fetch_json(admin: str, path: str, timeout: float) -> dict[str, Any]:
    """``GET http://ADMIN/PATH`` and return the decoded JSON object.

    ``admin`` is ``"host:port"``, ``"[v6]:port"`` or either behind ``http://``. Raises
    ``StatusError`` naming the address and the cause (refused, timed out, not 200, not JSON).
    """
    host, port = _split_admin(admin)
    where = f"http://{admin.removeprefix('http://').rstrip('/')}{path}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
    except TimeoutError:
        raise StatusError(f"{where}: no answer within {timeout:g}s") from None
    except ConnectionRefusedError:
        raise StatusError(
            f"{where}: connection refused (is l4gw running, and is [daemon] admin this address?)"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise StatusError(f"{where}: {exc or type(exc).__name__}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise StatusError(f"{where}: HTTP {response.status} {response.reason}")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatusError(f"{where}: the answer is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise StatusError(f"{where}: the answer is not a JSON object")
    return document


def fetch_status(admin: str, timeout: float) -> dict[str, Any]:
    """``GET http://ADMIN/status`` (see ``fetch_json``)."""
    return fetch_json(admin, "/status", timeout)


def _text(value: object) -> str:
    if value is None or isinstance(value, (dict, list)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return " ".join(str(value).split()) or "-"


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"12m05s"``, ``"3h07m"``, ``"2d04h"``: short, for a table."""
    total = int(seconds) if math.isfinite(seconds) and seconds > 0 else 0
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _dicts(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _node_state(node: dict[str, Any]) -> str:
    state = node.get("state")
    if isinstance(state, str) and state:
        return state
    healthy = node.get("healthy")
    if isinstance(healthy, bool):
        return "healthy" if healthy else "unhealthy"
    return "-"


def format_status(status: dict[str, Any], *, now: float | None = None) -> str:
    """The ``/status`` document as a header line and tables, ending with a newline.

    ``now`` is the current UNIX time used for the age of each node's state (``since``);
    it defaults to ``time.time()``.
    """
    if now is None:
        now = time.time()
    head = [f"l4gw {_text(status.get('version'))}", f"pid {_text(status.get('pid'))}"]
    uptime = _number(status.get("uptime_seconds"))
    if uptime is not None:
        head.append(f"up {format_duration(uptime)}")
    draining = status.get("draining")
    if isinstance(draining, bool):
        head.append("DRAINING (not accepting)" if draining else "serving")
    lines = ["  ".join(head), ""]

    listeners = _dicts(status.get("listeners"))
    lines.append(f"Listeners ({len(listeners)})")
    if listeners:
        rows = [
            [
                _text(item.get("name")),
                _text(item.get("address")),
                _text(item.get("mode")),
                _text(item.get("upstream")),
                _text(item.get("active_connections")),
                _text(item.get("connections_total")),
            ]
            for item in listeners
        ]
        lines += _table(["NAME", "ADDRESS", "MODE", "UPSTREAM", "ACTIVE", "TOTAL"], rows)
    else:
        lines.append("  (none)")

    upstreams = _dicts(status.get("upstreams"))
    for upstream in upstreams:
        nodes = _dicts(upstream.get("nodes"))
        healthy = sum(1 for node in nodes if node.get("healthy") is True)
        lines += [
            "",
            f"Upstream {_text(upstream.get('name'))}  balance {_text(upstream.get('balance'))}"
            f"  {healthy}/{len(nodes)} nodes healthy",
        ]
        if not nodes:
            lines.append("  (no nodes)")
            continue
        rows = []
        for node in nodes:
            since = _number(node.get("since"))
            rows.append(
                [
                    _text(node.get("address")),
                    _node_state(node),
                    format_duration(now - since) if since is not None else "-",
                    _text(node.get("weight")),
                    _text(node.get("active_connections")),
                    _text(node.get("source")),
                    _text(node.get("last_check")),
                ]
            )
        lines += _table(["NODE", "STATE", "FOR", "WEIGHT", "ACTIVE", "SOURCE", "LAST CHECK"], rows)
    if not upstreams:
        lines += ["", "Upstreams (none)"]

    workers = _dicts(status.get("workers"))
    if workers:
        lines += ["", f"Workers ({len(workers)}, {_text(status.get('worker_restarts'))} restarts)"]
        rows = [
            [
                _text(item.get("index")),
                _text(item.get("pid")),
                _text(item.get("state")),
                _text(item.get("starts")),
                _text(item.get("active_connections")),
                _text(item.get("connections_total")),
            ]
            for item in workers
        ]
        lines += _table(["WORKER", "PID", "STATE", "STARTS", "ACTIVE", "TOTAL"], rows)
    return "\n".join(lines) + "\n"


def run_status(
    admin: str = DEFAULT_ADMIN,
    timeout: float = 5.0,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """What ``l4gw status`` does: print the status or the error; returns the exit status
    (0, or 1 when the daemon cannot be reached)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        document = fetch_status(admin, timeout)
    except StatusError as exc:
        print(f"l4gw status: {exc}", file=err)
        return 1
    out.write(format_status(document))
    return 0
