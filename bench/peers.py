"""The processes a measurement talks to: backends behind the proxies, and the targets.

A *backend* (iperf3 server, nginx serving a tiny response, the idle-connection holder) is
started once and shared by every target. A *target* is the path a client takes to that backend:
``direct`` (no proxy) or one of the proxies, each started fresh for every measurement from a
config generated here, so that one figure's leftovers (memory, TIME_WAIT sockets, caches) never
leak into another's.

Adding ``--mode http`` support to a proxy means filling in the ``mode == "http"`` branch of its
config; the measurements pick the figures that make sense in that mode.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import tomlw
from bench.procs import (
    REPO_ROOT,
    BenchError,
    Managed,
    free_port,
    http_status,
    listening_ports,
    run_text,
    wait_port_listening,
)
from bench.tlscert import TLSFiles

HOST = "127.0.0.1"
HAPROXY_MAXPIPES = 256  # with --haproxy-splice; HAProxy's default (maxconn/4) needs more fds
# TLS 1.2 suites offered by the peers with --tls: l4gw's own list (Mozilla "intermediate", see
# l4gw/core/tls.py), so that every proxy negotiates the same suite; TLS 1.3 suites are OpenSSL's.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


@dataclass
class Settings:
    """What the command line says about the peers (see ``python -m bench --help``)."""

    mode: str = "tcp"
    workers: int = 1
    allowlist: int = 0  # extra non-matching source CIDRs in front of 127.0.0.0/8; 0 = no ACL
    l4gw_set: list[tuple[str, Any]] = field(default_factory=list)
    haproxy_nbthread: int = 1
    haproxy_splice: bool = False
    nofile: int = 20000  # RLIMIT_NOFILE the proxies inherit
    tls: bool = False  # --tls: the proxies terminate TLS (http mode)
    tls_key_type: str = "ec256"  # --tls-key
    tls_files: TLSFiles | None = None  # the certificate, made by the runner in its temp dir
    # False for the full-handshake figure: no proxy issues TLS session tickets (nor keeps a
    # session cache), so no new connection can resume a session. See bench/tlscert.py.
    tls_resume: bool = True

    def tls_or_none(self) -> TLSFiles | None:
        """The certificate when the proxies terminate TLS; an error if it was not made."""
        if not self.tls:
            return None
        if self.tls_files is None:
            raise BenchError("--tls: no certificate was made (tls_files is not set)")
        return self.tls_files

    @property
    def maxconn(self) -> int:
        """Connections a single proxy process can hold: two descriptors each, minus headroom
        (and minus HAProxy's splice pipes, two descriptors each, when it splices)."""
        pipes = HAPROXY_MAXPIPES if self.haproxy_splice else 0
        return (self.nofile - 200) // 2 - pipes

    def allow_cidrs(self) -> list[str] | None:
        """The source allow list under test, or None when ``--allowlist`` is 0."""
        if self.allowlist <= 0:
            return None
        return [*random_cidrs(self.allowlist, seed=4242), "127.0.0.0/8"]


def random_cidrs(count: int, seed: int) -> list[str]:
    """``count`` distinct IPv4 networks (prefix /8 to /32) that never contain 127.0.0.0/8."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        prefix = rng.choice([8, 12, 16, 20, 22, 24, 24, 24, 26, 28, 32, 32])
        first = rng.choice([o for o in range(1, 224) if o != 127])
        addr = (first << 24) | rng.getrandbits(24)
        net = ipaddress.IPv4Network((addr, prefix), strict=False)
        out[str(net)] = None
    return list(out)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    kind: str
    port: int
    proc: Managed


def start_backend(kind: str, workdir: Path, stack: contextlib.ExitStack) -> Backend:
    """Start the backend ``kind`` (``iperf``, ``http``, ``hold``); it is stopped by ``stack``."""
    port = free_port()
    bdir = workdir / f"backend-{kind}"
    bdir.mkdir(parents=True, exist_ok=True)
    if kind == "iperf":
        argv = ["iperf3", "-s", "-B", HOST, "-p", str(port)]
    elif kind == "http":
        conf = bdir / "nginx.conf"
        conf.write_text(_nginx_conf(bdir, _nginx_http_backend(port)))
        argv = ["nginx", "-p", str(bdir), "-c", str(conf), "-e", str(bdir / "error.log")]
    elif kind == "hold":
        argv = [sys.executable, "-m", "bench.holder", "--host", HOST, "--port", str(port)]
    else:
        raise ValueError(f"unknown backend kind {kind!r}")
    proc = Managed(f"backend {kind}", argv, bdir / "output.log", cwd=REPO_ROOT)
    stack.callback(proc.stop)
    wait_port_listening(proc, port)
    return Backend(kind, port, proc)


# --------------------------------------------------------------------------- nginx configs


def _nginx_conf(prefix: Path, body: str, nofile: int = 20000, modules: str = "") -> str:
    temp = "\n".join(
        f"    {name}_temp_path {prefix / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{modules}
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections {nofile - 100};
    multi_accept on;
}}
{body.replace("@TEMP@", temp)}
"""


def _nginx_http_backend(port: int) -> str:
    return f"""http {{
@TEMP@
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{ return 200 "hello from the bench backend\\n"; }}
    }}
}}"""


def nginx_stream_module() -> tuple[bool, str]:
    """(available, load_module line or the reason it is not) for nginx's L4 ``stream`` module."""
    configure = run_text(["nginx", "-V"])
    if not configure:
        return False, "nginx is not installed"
    if re.search(r"--with-stream(\s|$)", configure):
        return True, ""
    if "--with-stream=dynamic" in configure:
        modules_dir = Path("/usr/lib/nginx/modules")
        match = re.search(r"--modules-path=(\S+)", configure)
        if match:
            modules_dir = Path(match.group(1))
        so = modules_dir / "ngx_stream_module.so"
        if so.exists():
            return True, f"load_module {so};"
        return False, f"nginx stream module not installed ({so}; Debian: libnginx-mod-stream)"
    return False, "nginx was built without the stream module"


# --------------------------------------------------------------------------- targets


@dataclass
class Proxied:
    """Where a client connects for one measurement, and the proxy's PID (None for direct).

    ``tls`` is set when the proxy terminates TLS on that port (``--tls``).
    """

    port: int
    pid: int | None
    tls: TLSFiles | None = None


class Target(ABC):
    """One way of reaching the backend. ``figures`` limits the measurements it takes part in."""

    name: str
    figures: frozenset[str] | None = None

    def unavailable(self, settings: Settings) -> str | None:
        """Why this target cannot run on this machine, or None."""
        return None

    @abstractmethod
    def open(
        self, backend_port: int, workdir: Path, settings: Settings
    ) -> contextlib.AbstractContextManager[Proxied]:
        """Start the proxy in front of ``backend_port``; it is stopped when the block exits."""


class Direct(Target):
    name = "direct"

    def unavailable(self, settings: Settings) -> str | None:
        if settings.tls:
            return "no TLS endpoint (the backend speaks plain HTTP): --tls compares the proxies"
        return None

    @contextlib.contextmanager
    def open(self, backend_port: int, workdir: Path, settings: Settings) -> Iterator[Proxied]:
        yield Proxied(backend_port, None)


class HAProxy(Target):
    name = "haproxy"

    def unavailable(self, settings: Settings) -> str | None:
        return None if run_text(["haproxy", "-v"]) else "haproxy is not installed"

    def config(self, listen_port: int, backend_port: int, workdir: Path, s: Settings) -> str:
        acl = ""
        cidrs = s.allow_cidrs()
        if cidrs is not None:
            (workdir / "allow.lst").write_text("\n".join(cidrs) + "\n")
            reject = "tcp-request connection reject"
            acl = f"    {reject} unless {{ src -f {workdir / 'allow.lst'} }}\n"
        splice = "    option splice-auto\n" if s.haproxy_splice else ""
        pipes = f"    maxpipes {HAPROXY_MAXPIPES}\n" if s.haproxy_splice else ""
        if s.mode == "http":
            mode = "mode http\n    option http-keep-alive\n    timeout http-request 10s\n"
            mode += "    timeout http-keep-alive 300s"
        else:
            mode = "mode tcp"
        tls, ssl_global = "", ""
        files = s.tls_or_none()
        if files is not None:
            tls = f" ssl crt {files.pem}"
            ssl_global = f"    ssl-default-bind-ciphers {TLS12_CIPHERS}\n"
            if not s.tls_resume:
                tls += " no-tls-tickets"
                ssl_global += "    tune.ssl.cachesize 0\n"
        return f"""global
    nbthread {s.haproxy_nbthread}
    maxconn {s.maxconn}
{pipes}{ssl_global}
defaults
    {mode}
    maxconn {s.maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout client-fin 5s
    timeout server-fin 5s
{splice}
frontend bench
    bind {HOST}:{listen_port} backlog 4096{tls}
{acl}    default_backend nodes

backend nodes
    server n1 {HOST}:{backend_port}
"""

    @contextlib.contextmanager
    def open(self, backend_port: int, workdir: Path, settings: Settings) -> Iterator[Proxied]:
        port = free_port()
        conf = workdir / "haproxy.cfg"
        conf.write_text(self.config(port, backend_port, workdir, settings))
        proc = Managed("haproxy", ["haproxy", "-db", "-f", str(conf)], workdir / "haproxy.log")
        try:
            wait_port_listening(proc, port)
            yield Proxied(port, proc.pid, settings.tls_or_none())
        finally:
            proc.stop()


class NginxProxy(Target):
    """nginx as a peer: the ``stream`` module in tcp mode, ``proxy_pass`` in http mode."""

    name = "nginx"

    def unavailable(self, settings: Settings) -> str | None:
        if settings.mode == "http":
            return None if run_text(["nginx", "-v"]) else "nginx is not installed"
        ok, why = nginx_stream_module()
        return None if ok else why

    def config(self, listen_port: int, backend_port: int, workdir: Path, s: Settings) -> str:
        cidrs = s.allow_cidrs()
        acl = ""
        if cidrs is not None:
            acl = "".join(f"        allow {c};\n" for c in cidrs) + "        deny all;\n"
        listen = f"listen {HOST}:{listen_port} backlog=4096;"
        files = s.tls_or_none()
        if files is not None:
            listen = f"listen {HOST}:{listen_port} ssl backlog=4096;"
            listen += f"\n        ssl_certificate {files.cert};"
            listen += f"\n        ssl_certificate_key {files.key};"
            listen += "\n        ssl_protocols TLSv1.2 TLSv1.3;"
            listen += f"\n        ssl_ciphers {TLS12_CIPHERS};"
            listen += "\n        ssl_prefer_server_ciphers on;"
            # No session cache is nginx's default; tickets are on unless told otherwise.
            listen += f"\n        ssl_session_tickets {'on' if s.tls_resume else 'off'};"
        if s.mode == "http":
            body = f"""http {{
@TEMP@
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    upstream nodes {{ server {HOST}:{backend_port}; keepalive 64; }}
    server {{
        {listen}
{acl}        location / {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}"""
            modules = ""
        else:
            body = f"""stream {{
    upstream nodes {{ server {HOST}:{backend_port}; }}
    server {{
        {listen}
{acl}        proxy_pass nodes;
        proxy_timeout 300s;
    }}
}}"""
            modules = nginx_stream_module()[1]
        return _nginx_conf(workdir, body, s.nofile, modules)

    @contextlib.contextmanager
    def open(self, backend_port: int, workdir: Path, settings: Settings) -> Iterator[Proxied]:
        port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(self.config(port, backend_port, workdir, settings))
        argv = ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
        proc = Managed("nginx", argv, workdir / "nginx.log")
        try:
            wait_port_listening(proc, port)
            yield Proxied(port, proc.pid, settings.tls_or_none())
        finally:
            proc.stop()


class L4gw(Target):
    """``python -m l4gw run -c FILE`` from this tree, with a generated TOML config."""

    def __init__(
        self, name: str = "l4gw", access_log: bool = False, figures: frozenset[str] | None = None
    ) -> None:
        self.name = name
        self.access_log = access_log
        self.figures = figures

    def config(self, listen_port: int, admin_port: int, backend_port: int, s: Settings) -> Any:
        listener: dict[str, Any] = {
            "name": "bench",
            "listen": f"{HOST}:{listen_port}",
            "mode": s.mode,
            "upstream": "bench",
        }
        cidrs = s.allow_cidrs()
        if cidrs is not None:
            listener["allow"] = cidrs
        files = s.tls_or_none()
        if files is not None:
            listener["tls"] = {"certificates": [{"cert": str(files.cert), "key": str(files.key)}]}
        doc: dict[str, Any] = {
            "daemon": {
                "admin": f"{HOST}:{admin_port}",
                # Access lines are logged at info: the l4gw+log variant needs that level.
                "log_level": "info" if self.access_log else "warning",
                "access_log": self.access_log,
                "drain_timeout": "1s",
            },
            "upstreams": {"bench": {"nodes": [{"address": f"{HOST}:{backend_port}", "weight": 1}]}},
            "listeners": [listener],
        }
        if s.workers != 1:  # the default; written only when asked, like any other override
            doc["daemon"]["workers"] = s.workers
        for path, value in s.l4gw_set:
            tomlw.set_path(doc, path, value)
        return doc

    @contextlib.contextmanager
    def open(self, backend_port: int, workdir: Path, settings: Settings) -> Iterator[Proxied]:
        port, admin = free_port(), free_port()
        conf = workdir / "conf.toml"
        conf.write_text(tomlw.dumps(self.config(port, admin, backend_port, settings)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        files = settings.tls_or_none()
        if files is not None and not settings.tls_resume:
            # l4gw has no setting for session tickets: OpenSSL's own configuration turns them off.
            env["OPENSSL_CONF"] = str(files.no_tickets_conf)
        argv = [sys.executable, "-m", "l4gw", "run", "-c", str(conf)]
        proc = Managed(self.name, argv, workdir / "l4gw.log", cwd=REPO_ROOT, env=env)
        healthz = f"http://{HOST}:{admin}/healthz"
        try:
            proc.wait_ready(
                lambda: port in listening_ports() and http_status(healthz) == 200, timeout=20
            )
            yield Proxied(port, proc.pid, settings.tls_or_none())
            if not proc.alive():
                raise proc.fail("died during the measurement")
        finally:
            proc.stop()


def all_targets() -> list[Target]:
    """Every target, in table order. ``l4gw+log`` only runs the figure its log line affects."""
    return [
        Direct(),
        HAProxy(),
        L4gw(),
        L4gw("l4gw+log", access_log=True, figures=frozenset({"cps"})),
        NginxProxy(),
    ]


def check_l4gw() -> str | None:
    """None when ``python -m l4gw --version`` works from this tree, else what it printed."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "l4gw", "--version"],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=REPO_ROOT,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def versions() -> dict[str, str]:
    """First line of each peer's version output (empty when it is missing)."""
    out = {
        "haproxy": run_text(["haproxy", "-v"]),
        "nginx": run_text(["nginx", "-v"]),
        "iperf3": run_text(["iperf3", "--version"]),
        "wrk": run_text(["wrk", "-v"]),
    }
    return {k: (v.splitlines()[0] if v else "") for k, v in out.items()}


__all__ = [
    "HOST",
    "Backend",
    "BenchError",
    "Direct",
    "HAProxy",
    "L4gw",
    "NginxProxy",
    "Proxied",
    "Settings",
    "Target",
    "all_targets",
    "check_l4gw",
    "start_backend",
    "versions",
]
