"""The interleaved loop: for each run, each measurement, each target (rotated per run)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import FIGURES, MEASUREMENTS, Measurement, Options
from bench.peers import Settings, Target, start_backend
from bench.procs import BenchError, StartupError
from bench.report import Results
from bench.tlscert import make_tls_files

# A target that fails to start this many times in a row is left out of the remaining runs.
MAX_STARTUP_FAILURES = 2


@dataclass
class Plan:
    runs: int
    measurements: list[Measurement]
    targets: list[Target]
    settings: Settings
    options: Options
    keep_logs: bool = False
    progress: bool = True
    workdir: Path | None = field(default=None, init=False)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _brief(values: dict[str, float]) -> str:
    keys = [k for k in FIGURES if k in values]
    return ", ".join(f"{k}={values[k]:,.{FIGURES[k].digits}f}" for k in keys)


def execute(plan: Plan, res: Results) -> None:
    """Run ``plan``, filling ``res`` as it goes (so an interrupted run still reports)."""
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-bench-"))
    plan.workdir = workdir
    startup_failures = dict.fromkeys((t.name for t in plan.targets), 0)
    try:
        if plan.settings.tls and plan.settings.tls_files is None:
            plan.settings.tls_files = make_tls_files(workdir / "tls", plan.settings.tls_key_type)
        with contextlib.ExitStack() as stack:
            backends: dict[str, int] = {}
            for m in plan.measurements:
                if m.backend not in backends:
                    backends[m.backend] = start_backend(m.backend, workdir, stack).port
            for run in range(plan.runs):
                shift = run % len(plan.targets)
                order = plan.targets[shift:] + plan.targets[:shift]
                for m in plan.measurements:
                    settings = plan.settings
                    if m.tls_resume != settings.tls_resume:
                        settings = dataclasses.replace(settings, tls_resume=m.tls_resume)
                    for target in order:
                        if target.name in res.skipped:
                            continue
                        if target.figures is not None and m.name not in target.figures:
                            continue
                        if m.needs_proxy and target.name == "direct":
                            continue
                        tdir = workdir / f"run{run + 1}-{m.name}-{target.name}"
                        tdir.mkdir()
                        label = f"[run {run + 1}/{plan.runs}] {m.name:<8} {target.name:<9}"
                        t0 = time.monotonic()
                        try:
                            with target.open(backends[m.backend], tdir, settings) as prox:
                                values = m.run(prox, plan.options)
                        except BenchError as exc:
                            res.errors.append(
                                {
                                    "run": run + 1,
                                    "measurement": m.name,
                                    "target": target.name,
                                    "error": str(exc),
                                }
                            )
                            say(f"{label} FAILED: {exc}")
                            if isinstance(exc, StartupError):
                                startup_failures[target.name] += 1
                                if startup_failures[target.name] >= MAX_STARTUP_FAILURES:
                                    res.skipped[target.name] = (
                                        f"failed to start {MAX_STARTUP_FAILURES} times in a row"
                                    )
                                    say(f"{target.name}: left out of the remaining runs")
                            continue
                        startup_failures[target.name] = 0
                        res.add(run, target.name, values)
                        if plan.progress:
                            say(f"{label} {_brief(values)} ({time.monotonic() - t0:.1f}s)")
    finally:
        if plan.keep_logs or res.errors:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def select_measurements(
    only: list[str], mode: str, tls: bool = False
) -> tuple[list[Measurement], list[str]]:
    """The measurements to run, in table order, and notes on those left out for ``mode``.

    With ``tls`` only the TLS measurements run (every proxy then terminates TLS), without it
    only the others; a measurement of the other kind is noted only when ``only`` names it.
    """
    names = only or [name for name, m in MEASUREMENTS.items() if m.tls == tls]
    chosen, notes = [], []
    for name in MEASUREMENTS:
        if name not in names:
            continue
        m = MEASUREMENTS[name]
        if m.tls != tls:
            notes.append(f"{name}: {'not measured with' if tls else 'needs'} --tls")
        elif mode in m.modes:
            chosen.append(m)
        else:
            notes.append(f"{name}: not measured in {mode} mode")
    return chosen, notes
