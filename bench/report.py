"""Medians, per-run ratios, the goals from the issue, the printed table and the JSON file."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import FIGURES
from bench.peers import versions
from bench.procs import REPO_ROOT, run_text

RATIOS = [("l4gw", "direct"), ("l4gw", "haproxy")]


@dataclass(frozen=True)
class Goal:
    """A target from the issue: ``figure`` of l4gw, alone or divided by a peer's, vs a bound."""

    figure: str
    over: str | None  # None: l4gw's own value
    minimum: float | None = None
    maximum: float | None = None

    def describe(self) -> str:
        what = f"l4gw/{self.over}" if self.over else "l4gw"
        if self.minimum is not None:
            return f"{what} >= {self.minimum:g}"
        return f"{what} <= {self.maximum:g}"

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        if self.minimum is not None and value < self.minimum:
            return False
        return not (self.maximum is not None and value > self.maximum)


#: The issues' goals by listener mode: tcp against HAProxy mode tcp, http against HAProxy
#: mode http (one thread each).
GOALS = {
    "tcp": [
        Goal("bulk_gbps", "haproxy", minimum=1.2),
        Goal("rps", "haproxy", minimum=0.6),
        Goal("cps", "haproxy", minimum=0.5),
        Goal("rss_kib_per_conn", None, maximum=10.0),
    ],
    "http": [
        Goal("rps", "haproxy", minimum=0.25),
        Goal("cps", "haproxy", minimum=0.25),
    ],
}


@dataclass
class Results:
    """Per-run values: ``values[figure][target][run]`` (None where not measured)."""

    runs: int
    targets: list[str]
    mode: str = "tcp"
    values: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why

    def add(self, run: int, target: str, figures: dict[str, float]) -> None:
        for key, value in figures.items():
            per_target = self.values.setdefault(key, {})
            per_target.setdefault(target, [None] * self.runs)[run] = value

    def series(self, figure: str, target: str) -> list[float | None]:
        return self.values.get(figure, {}).get(target, [None] * self.runs)

    def median(self, figure: str, target: str) -> float | None:
        return _median(self.series(figure, target))

    def ratio_runs(self, figure: str, num: str, den: str) -> list[float | None]:
        out: list[float | None] = []
        for a, b in zip(self.series(figure, num), self.series(figure, den), strict=True):
            out.append(a / b if a is not None and b else None)
        return out

    def ratio(self, figure: str, num: str, den: str) -> float | None:
        """The median of the per-run ratios (each run's pair was measured back to back)."""
        return _median(self.ratio_runs(figure, num, den))

    def goal_value(self, goal: Goal) -> float | None:
        if goal.over is None:
            return self.median(goal.figure, "l4gw")
        return self.ratio(goal.figure, "l4gw", goal.over)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _spread(values: list[float | None]) -> str:
    """``min..max`` of the per-run ratios: how much the noise moved them."""
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return ""
    return f"{min(present):.2f}..{max(present):.2f}"


def table(res: Results) -> str:
    """The side-by-side table: medians per target, the l4gw ratios (median of the per-run
    ratios, and the range of the last one over the runs) and the goal."""
    targets = [t for t in res.targets if any(t in res.values.get(f, {}) for f in FIGURES)]
    header = ["figure", "unit", *targets, *(f"{a}/{b}" for a, b in RATIOS), "range", "goal"]
    goals = {g.figure: g for g in GOALS.get(res.mode, [])}
    rows: list[list[str]] = []
    for key, fig in FIGURES.items():
        if key not in res.values:
            continue
        row = [fig.label, fig.unit]
        row += [_fmt(res.median(key, t), fig.digits) for t in targets]
        row += [_fmt(res.ratio(key, a, b), 2) for a, b in RATIOS]
        row.append(_spread(res.ratio_runs(key, *RATIOS[-1])))
        goal = goals.get(key)
        if goal is None:
            row.append("")
        else:
            ok = goal.check(res.goal_value(goal))
            mark = {True: "ok", False: "MISSED", None: "n/a"}[ok]
            row.append(f"{goal.describe()}: {mark}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        rest = [c.rjust(w) for c, w in zip(cells[2:-1], widths[2:-1], strict=True)]
        return "  ".join([*first, *rest, cells[-1]]).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = run_text(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = bool(run_text(["git", "-C", str(REPO_ROOT), "status", "--porcelain"]))
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "loadavg_start": os.getloadavg()[0],
        "git_commit": commit + ("+dirty" if dirty and commit else ""),
        "versions": versions(),
    }


def to_json(res: Results, machine: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for key, fig in FIGURES.items():
        if key not in res.values:
            continue
        figures[key] = {
            "label": fig.label.strip(),
            "unit": fig.unit,
            "higher_is_better": fig.higher_is_better,
            "targets": {
                t: {"runs": res.series(key, t), "median": res.median(key, t)}
                for t in res.targets
                if t in res.values[key]
            },
            "ratios": {
                f"{a}/{b}": {"runs": res.ratio_runs(key, a, b), "median": res.ratio(key, a, b)}
                for a, b in RATIOS
            },
        }
    goals = [
        {
            "figure": g.figure,
            "goal": g.describe(),
            "value": res.goal_value(g),
            "met": g.check(res.goal_value(g)),
        }
        for g in GOALS.get(res.mode, [])
        if g.figure in res.values
    ]
    machine = dict(machine, loadavg_end=os.getloadavg()[0])
    return {
        "machine": machine,
        "settings": settings,
        "figures": figures,
        "goals": goals,
        "errors": res.errors,
        "skipped_targets": res.skipped,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
