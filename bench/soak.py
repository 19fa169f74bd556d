"""``python -m bench --soak DURATION``: mixed L4, L7 and TLS load on one l4gw for a long time,
with its resident memory and open descriptors sampled at the start, every ``--soak-every``
seconds and after the load.

One daemon serves three listeners in front of one nginx backend: ``tcp`` (L4 splice), ``http``
and ``https`` (TLS offload). Three ``wrk`` clients load them at once, in segments that
alternate keep-alive and ``Connection: close`` (new connections and, over TLS, full
handshakes), so every path allocates and frees all the time. The baseline is taken after a
short warm-up of the same mix (first-use allocations: pools, caches, TLS contexts); the final
sample after the load and a pause for idle connections to close. The goal: the final RSS
within 5% of the baseline and no descriptor left over beyond the baseline's (pooled idle node
connections included in both).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import tomlw
from bench.measure import parse_wrk
from bench.peers import HOST, start_backend
from bench.procs import REPO_ROOT, BenchError, Managed, free_port, http_status, rss_kib
from bench.runner import say
from bench.tlscert import make_tls_files

#: The soak's goal: RSS after the load within this share of the baseline.
RSS_GOAL = 0.05
#: wrk connections per client (three clients at once).
CONNECTIONS = 20
#: Seconds per load segment (each client's keep-alive / close alternation).
SEGMENT = 10.0
#: Seconds of warm-up before the baseline, and of rest after the load.
WARMUP = 4.0
REST = 10.0


def parse_duration(text: str) -> float:
    """Seconds from ``600``, ``600s``, ``10m`` or ``1h``. Raises ``ValueError``."""
    text = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(text[-1:])
    number = text[:-1] if scale is not None else text
    value = float(number) * (scale or 1.0)
    if not value > 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return value


def open_fds(pid: int) -> int:
    """Descriptors the process holds now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak_config(ports: dict[str, int], admin: int, backend: int, cert: Path, key: Path) -> Any:
    listeners: list[dict[str, Any]] = []
    for name, mode in (("tcp", "tcp"), ("http", "http"), ("https", "http")):
        listener: dict[str, Any] = {
            "name": name,
            "listen": f"{HOST}:{ports[name]}",
            "mode": mode,
            "upstream": "web",
        }
        if name == "https":
            listener["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}]}
        listeners.append(listener)
    return {
        "daemon": {
            "admin": f"{HOST}:{admin}",
            "log_level": "warning",
            "access_log": False,
            "drain_timeout": "1s",
        },
        "upstreams": {"web": {"nodes": [{"address": f"{HOST}:{backend}", "weight": 1}]}},
        "listeners": listeners,
    }


def _wrk_argv(url: str, seconds: float, close: bool) -> list[str]:
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


class Totals:
    """Requests and errors over every wrk segment."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.segments = 0

    def add(self, output: str) -> None:
        result = parse_wrk(output)
        self.requests += int(result.get("requests", 0))
        self.errors += int(result.get("errors", 0))
        self.segments += 1


def _segment(urls: Sequence[str], seconds: float, close: bool, totals: Totals) -> None:
    """One load segment: a wrk per URL, all at once."""
    procs = [
        subprocess.Popen(
            _wrk_argv(url, seconds, close), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for url in urls
    ]
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise BenchError("wrk did not finish in time") from None
        totals.add(out.decode(errors="replace"))


def _sample(label: str, pid: int, base: tuple[int, int] | None) -> tuple[int, int]:
    rss, fds = rss_kib(pid), open_fds(pid)
    if base is None:
        say(f"[soak] {label:>10}: RSS {rss / 1024:8.1f} MiB, {fds} open descriptors")
    else:
        growth = (rss - base[0]) / base[0] * 100
        say(
            f"[soak] {label:>10}: RSS {rss / 1024:8.1f} MiB ({growth:+.1f}% of the baseline), "
            f"{fds} open descriptors ({fds - base[1]:+d})"
        )
    return rss, fds


def run_soak(duration: float, every: float = 30.0, keep_logs: bool = False) -> int:
    """Run the soak; returns 0 when it ran (the goal's verdict is printed), 2 on a failure."""
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-soak-"))
    with contextlib.ExitStack() as stack:
        if not keep_logs:
            stack.callback(_remove_tree, workdir)
        try:
            backend = start_backend("http", workdir, stack)
            files = make_tls_files(workdir)
            ports = {name: free_port() for name in ("tcp", "http", "https")}
            admin = free_port()
            conf = workdir / "conf.toml"
            conf.write_text(
                tomlw.dumps(soak_config(ports, admin, backend.port, files.cert, files.key))
            )
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
            argv = [sys.executable, "-m", "l4gw", "run", "-c", str(conf)]
            proc = Managed("l4gw", argv, workdir / "l4gw.log", cwd=REPO_ROOT, env=env)
            stack.callback(proc.stop)
            proc.wait_ready(lambda: http_status(f"http://{HOST}:{admin}/healthz") == 200, 20)
            urls = [
                f"http://{HOST}:{ports['tcp']}/",
                f"http://{HOST}:{ports['http']}/",
                f"https://{HOST}:{ports['https']}/",
            ]
            say(
                f"[soak] {duration:.0f} s of tcp, http and https load (wrk x3, {CONNECTIONS} "
                f"connections each, keep-alive and Connection: close alternating every "
                f"{SEGMENT:.0f} s); samples every {every:.0f} s"
            )
            totals = Totals()
            _sample("start", proc.pid, None)
            _segment(urls, WARMUP / 2, False, Totals())
            _segment(urls, WARMUP / 2, True, Totals())
            time.sleep(2)
            base = _sample("baseline", proc.pid, None)
            started = time.monotonic()
            next_sample = started + every
            close = False
            while (left := duration - (time.monotonic() - started)) > 0.5:
                _segment(urls, min(SEGMENT, left), close, totals)
                close = not close
                if not proc.alive():
                    raise proc.fail("died during the soak")
                if time.monotonic() >= next_sample:
                    _sample(f"{time.monotonic() - started:.0f} s", proc.pid, base)
                    next_sample += every
            _sample("load over", proc.pid, base)
            time.sleep(REST)
            rss, fds = _sample(f"+{REST:.0f} s", proc.pid, base)
        except BenchError as exc:
            say(f"[soak] failed: {exc}")
            return 2
        growth = (rss - base[0]) / base[0]
        verdict = "ok" if growth <= RSS_GOAL and fds <= base[1] else "MISSED"
        say(
            f"[soak] {totals.requests} requests in {totals.segments} wrk segments, "
            f"{totals.errors} errors; RSS after the load {growth * 100:+.1f}% of the baseline, "
            f"descriptors {fds - base[1]:+d}; goal (RSS within {RSS_GOAL * 100:.0f}%, no "
            f"descriptor left over): {verdict}"
        )
        if keep_logs:
            say(f"[soak] logs and configs kept in {workdir}")
    return 0


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
