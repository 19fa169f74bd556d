"""The one-screen summary of a :class:`~.model.Config` that ``l4gw check`` prints. No I/O."""

from __future__ import annotations

from collections.abc import Sequence

from .model import Config, HealthConfig
from .values import format_duration

__all__ = ["describe"]


def _table_lines(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return [
        (
            indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _describe_health(health: HealthConfig) -> str:
    if health.check == "none":
        active = "no active check"
    else:
        active = f"{health.check} check every {format_duration(health.interval)}"
        if health.check == "http":
            low, high = health.expect
            expect = str(low) if low == high else f"{low}-{high}"
            active += f" GET {health.path} expect {expect}"
    passive = (
        f"eject after {health.passive_failures} failures"
        if health.passive_failures
        else "no passive ejection"
    )
    return f"{active}, {passive}"


def describe(config: Config) -> str:
    """The one-screen summary printed by ``l4gw check``."""
    d = config.daemon
    lines = [
        f"daemon: admin {d.admin or 'off'}, workers {d.workers or 'one per CPU'}, "
        f"log {d.log_level} ({d.log_format}), access log {'on' if d.access_log else 'off'}, "
        f"drain {format_duration(d.drain_timeout)}",
        "",
        f"listeners ({len(config.listeners)}):",
    ]
    rows: list[list[str]] = []
    for listener in config.listeners:
        if listener.mode == "tcp":
            target = f"-> {listener.upstream}"
        else:
            target = f"{len(listener.routes)} route(s)"
            if listener.upstream:
                target += f", fallback {listener.upstream}"
        rows.append(
            [
                listener.name,
                str(listener.listen),
                listener.mode,
                target,
                f"tls {'yes' if listener.tls else 'no'}",
                f"allow {len(listener.allow)}",
                f"deny {len(listener.deny)}",
            ]
        )
    for listener, row in zip(config.listeners, _table_lines(rows), strict=True):
        lines.append(row)
        extras = []
        if listener.accept_proxy_protocol:
            extras.append("accepts PROXY header")
        if listener.max_connections:
            extras.append(f"max {listener.max_connections} connections")
        if listener.rate_limit:
            extras.append(f"rate limit {listener.rate_limit:g}/s burst {listener.burst}")
        if extras:
            lines.append(f"      {'; '.join(extras)}")
        for route in listener.routes:
            methods = ",".join(route.methods) or "any"
            rewrite = f" rewrite {route.rewrite}" if route.rewrite else ""
            lines.append(
                f"      route {route.host or '*'} {route.path} [{methods}] -> "
                f"{route.upstream}{rewrite}"
            )
    lines.extend(["", f"upstreams ({len(config.upstreams)}):"])
    for name, upstream in config.upstreams.items():
        parts = [upstream.balance, f"retries {upstream.retries}", _describe_health(upstream.health)]
        if upstream.proxy_protocol != "off":
            parts.append(f"PROXY {upstream.proxy_protocol}")
        if upstream.tls is not None:
            parts.append("tls" + ("" if upstream.tls.verify else " (no verify)"))
        lines.append(f"  {name}: {', '.join(parts)}")
        if upstream.discovery is not None:
            disc = upstream.discovery
            port = f":{disc.port}" if disc.port is not None else ""
            lines.append(
                f"    discovery {disc.type} {disc.name}{port} every "
                f"{format_duration(disc.interval)} via {disc.resolver or 'system resolver'}"
            )
        rows = [
            [str(node.address), f"weight {node.weight}" + (" (drained)" if not node.weight else "")]
            for node in upstream.nodes
        ]
        lines.extend(_table_lines(rows, indent="    "))
    lines.append("")
    if config.authorize:
        lines.append(f"authorization ({len(config.authorize)} entries; other nodes refused):")
        lines.extend(f"  {rule}" for rule in config.authorize)
    else:
        lines.append("authorization: none (any node address may be reached)")
    return "\n".join(lines)
