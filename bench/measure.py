"""The measurements: what each figure is, how it is taken, and the parsers for the tools' output.

Every measurement takes a :class:`~bench.peers.Proxied` (the port to connect to and the proxy's
PID) and returns ``{figure key: value}``. Anything that goes wrong raises
:class:`~bench.procs.BenchError` with the tool's own message, so the runner can report it against
that target and carry on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import resource
import selectors
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bench.peers import HOST, Proxied
from bench.procs import BenchError, cpu_seconds, rss_kib


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 1


FIGURES: dict[str, Figure] = {
    f.key: f
    for f in [
        Figure("bulk_gbps", "bulk 1 stream, client->server", "Gbit/s", True, 2),
        Figure("bulk_cpu_pct", "  proxy CPU during bulk", "%", False, 0),
        Figure("bulk_rev_gbps", "bulk 1 stream, server->client (-R)", "Gbit/s", True, 2),
        Figure("bulk_rev_cpu_pct", "  proxy CPU during bulk -R", "%", False, 0),
        Figure("rps", "keep-alive requests/s (50 conns)", "req/s", True, 0),
        Figure("rps_p50_ms", "  keep-alive latency p50", "ms", False, 3),
        Figure("rps_p99_ms", "  keep-alive latency p99", "ms", False, 3),
        Figure("rps_errors", "  keep-alive errors", "count", False, 0),
        Figure("rps_cpu_pct", "  proxy CPU during keep-alive", "%", False, 0),
        Figure("cps", "new connections/s (Connection: close)", "conn/s", True, 0),
        Figure("cps_p50_ms", "  new-connection latency p50", "ms", False, 3),
        Figure("cps_p99_ms", "  new-connection latency p99", "ms", False, 3),
        Figure("cps_errors", "  new-connection errors", "count", False, 0),
        Figure("cps_cpu_pct", "  proxy CPU during new connections", "%", False, 0),
        Figure("tls_rps", "TLS keep-alive requests/s (50 conns)", "req/s", True, 0),
        Figure("tls_rps_p50_ms", "  TLS keep-alive latency p50", "ms", False, 3),
        Figure("tls_rps_p99_ms", "  TLS keep-alive latency p99", "ms", False, 3),
        Figure("tls_rps_errors", "  TLS keep-alive errors", "count", False, 0),
        Figure("tls_rps_cpu_pct", "  proxy CPU during TLS keep-alive", "%", False, 0),
        Figure("tls_rps_client_cpu_pct", "  wrk CPU during TLS keep-alive", "%", False, 0),
        Figure("tls_cps", "TLS handshakes/s, resumed session", "hs/s", True, 0),
        Figure("tls_cps_p50_ms", "  resumed-handshake latency p50", "ms", False, 3),
        Figure("tls_cps_p99_ms", "  resumed-handshake latency p99", "ms", False, 3),
        Figure("tls_cps_errors", "  resumed-handshake errors", "count", False, 0),
        Figure("tls_cps_cpu_pct", "  proxy CPU during resumed handshakes", "%", False, 0),
        Figure("tls_cps_client_cpu_pct", "  wrk CPU during resumed handshakes", "%", False, 0),
        Figure("tls_full_cps", "TLS handshakes/s, full (no tickets)", "hs/s", True, 0),
        Figure("tls_full_cps_p50_ms", "  full-handshake latency p50", "ms", False, 3),
        Figure("tls_full_cps_p99_ms", "  full-handshake latency p99", "ms", False, 3),
        Figure("tls_full_cps_errors", "  full-handshake errors", "count", False, 0),
        Figure("tls_full_cps_cpu_pct", "  proxy CPU during full handshakes", "%", False, 0),
        Figure("tls_full_cps_client_cpu_pct", "  wrk CPU during full handshakes", "%", False, 0),
        Figure("rss_kib_per_conn", "RSS per idle proxied connection", "KiB", False, 2),
        Figure("rss_idle_mib", "  RSS idle (after warm-up)", "MiB", False, 1),
        Figure("rss_loaded_mib", "  RSS with the idle connections", "MiB", False, 1),
    ]
}


@dataclass(frozen=True)
class Options:
    duration: float
    idle_conns: int


@dataclass(frozen=True)
class Measurement:
    name: str  # the --only value
    backend: str  # backend kind, see peers.start_backend
    modes: frozenset[str]
    needs_proxy: bool  # False: direct takes part too
    run: Callable[[Proxied, Options], dict[str, float]]
    tls: bool = False  # measured with --tls (the proxies terminate TLS), and only then
    tls_resume: bool = True  # False: the peers are set not to resume TLS sessions


@contextlib.contextmanager
def cpu_meter(pid: int | None, prefix: str, out: dict[str, float]) -> Iterator[None]:
    """Store the proxy's CPU use during the block in ``out[prefix + "_cpu_pct"]``."""
    if pid is None:
        yield
        return
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    yield
    elapsed = time.monotonic() - t0
    if elapsed > 0:
        out[f"{prefix}_cpu_pct"] = 100.0 * (cpu_seconds(pid) - cpu0) / elapsed


# --------------------------------------------------------------------------- bulk (iperf3)


def parse_iperf3(text: str) -> tuple[float, float]:
    """(sender, receiver) bits per second from ``iperf3 -J`` output; raises on an error report."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3: unreadable JSON output: {text[-300:]!r}") from exc
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    end = data.get("end", {})
    try:
        return float(end["sum_sent"]["bits_per_second"]), float(
            end["sum_received"]["bits_per_second"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"iperf3: no end.sum_sent/sum_received in output: {exc}") from exc


def iperf3(port: int, duration: float, reverse: bool) -> tuple[float, float]:
    secs = max(1, round(duration))
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(secs), "-J"]
    if reverse:
        argv.append("-R")
    for attempt in range(3):
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=secs + 30, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"iperf3 did not finish within {secs + 30}s") from exc
        try:
            return parse_iperf3(proc.stdout)
        except BenchError as exc:
            # The server still finishing the previous test answers "busy": give it a moment.
            if "busy" not in str(exc) or attempt == 2:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _bulk(reverse: bool) -> Callable[[Proxied, Options], dict[str, float]]:
    prefix = "bulk_rev" if reverse else "bulk"

    def run(target: Proxied, opts: Options) -> dict[str, float]:
        out: dict[str, float] = {}
        with cpu_meter(target.pid, prefix, out):
            _sent, received = iperf3(target.port, opts.duration, reverse)
        out[f"{prefix}_gbps"] = received / 1e9
        return out

    return run


# --------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text: str) -> dict[str, float]:
    """requests/s, p50/p99 latency (ms) and the error count from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not rps:
        raise BenchError(f"wrk: no Requests/sec in output: {text.strip()[-400:]!r}")
    out = {"rps": float(rps.group(1))}
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        out[f"p{pct}_ms"] = float(value) * _UNITS[unit]
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    out["errors"] = errors
    requests = re.search(r"^\s+(\d+) requests in", text, re.M)
    out["requests"] = float(requests.group(1)) if requests else 0.0
    return out


def wrk(port: int, duration: float, close: bool, tls: bool = False) -> dict[str, float]:
    """``wrk -t1 -c50``, over TLS with ``tls`` (wrk does not verify the certificate)."""
    secs = max(1, round(duration))
    argv = ["wrk", "-t1", "-c50", f"-d{secs}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"{'https' if tls else 'http'}://{HOST}:{port}/")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {secs + 30}s") from exc
    result = parse_wrk(proc.stdout + proc.stderr)
    if result["requests"] == 0:
        raise BenchError(f"wrk: no request completed: {proc.stdout.strip()[-300:]!r}")
    return result


def _wrk(
    close: bool, tls: bool = False, prefix: str | None = None
) -> Callable[[Proxied, Options], dict[str, float]]:
    if prefix is None:
        prefix = ("tls_" if tls else "") + ("cps" if close else "rps")

    def run(target: Proxied, opts: Options) -> dict[str, float]:
        if tls and target.tls is None:
            raise BenchError(f"{prefix}: this target does not terminate TLS")
        if not tls and target.tls is not None:
            raise BenchError(f"{prefix}: this target speaks TLS (--tls), not plain HTTP")
        out: dict[str, float] = {}
        # Over TLS the client does as much crypto as the proxy: its CPU use (wrk is the only
        # child that ends during the block) says whether it, rather than the proxy, set the pace.
        usage0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        with cpu_meter(target.pid, prefix, out):
            res = wrk(target.port, opts.duration, close, tls)
        if tls:
            usage1, elapsed = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - t0
            cpu = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
            out[f"{prefix}_client_cpu_pct"] = 100.0 * cpu / elapsed
        out[prefix] = res["rps"]
        out[f"{prefix}_errors"] = res["errors"]
        for pct in ("p50", "p99"):
            if f"{pct}_ms" in res:
                out[f"{prefix}_{pct}_ms"] = res[f"{pct}_ms"]
        return out

    return run


# --------------------------------------------------------------------------- idle RSS

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]  # spread over source IPs: ephemeral ports


def _close_all(socks: list[socket.socket]) -> None:
    """Close with a reset (SO_LINGER 0): no TIME_WAIT left behind for later figures."""
    linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.close()
    socks.clear()


def open_echoed(
    port: int, count: int, batch: int = 500, batch_timeout: float = 30.0
) -> list[socket.socket]:
    """``count`` connections to ``port``, each proven end to end by a one-byte echo.

    Opened in batches; raises BenchError (after closing them all) when a batch cannot complete
    within ``batch_timeout`` or a connection is refused or closed.
    """
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for start in range(0, count, batch):
            pending: dict[socket.socket, str] = {}
            for i in range(start, min(count, start + batch)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((SOURCES[i % len(SOURCES)], 0))
                err = sock.connect_ex((HOST, port))
                if err not in (0, errno.EINPROGRESS):
                    raise BenchError(f"connection {i + 1}: connect: {errno.errorcode.get(err)}")
                sel.register(sock, selectors.EVENT_WRITE)
                pending[sock] = "connect"
            deadline = time.monotonic() + batch_timeout
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    done = len(socks) - len(pending)
                    raise BenchError(
                        f"only {done} of {count} connections echoed "
                        f"(batch stuck for {batch_timeout:.0f}s)"
                    )
                for key, _ in sel.select(timeout=min(left, 1.0)):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    if pending[ready] == "connect":
                        err = ready.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise BenchError(f"connect: {errno.errorcode.get(err, err)}")
                        ready.send(b"x")
                        sel.modify(ready, selectors.EVENT_READ)
                        pending[ready] = "echo"
                        continue
                    try:
                        data = ready.recv(1)
                    except OSError as exc:
                        raise BenchError(f"waiting for the echo: {exc}") from exc
                    if data != b"x":
                        done = len(socks) - len(pending)
                        raise BenchError(
                            f"connection closed by the proxy after {done} of {count} echoed"
                        )
                    sel.unregister(ready)
                    del pending[ready]
        return socks
    except BaseException:
        _close_all(socks)
        raise
    finally:
        sel.close()


def idle_rss(target: Proxied, opts: Options) -> dict[str, float]:
    """Proxy RSS with ``idle_conns`` proxied, silent connections, over its idle RSS."""
    if target.pid is None:
        raise BenchError("idle RSS needs a proxy process")
    pid = target.pid
    # Warm-up: code paths and pools used by the first connections are part of "idle".
    _close_all(open_echoed(target.port, 100))
    time.sleep(1.0)
    idle = rss_kib(pid)
    socks = open_echoed(target.port, opts.idle_conns)
    try:
        samples = []
        for _ in range(4):
            time.sleep(0.3)
            samples.append(rss_kib(pid))
        loaded = max(samples)
        if loaded == 0:
            raise BenchError(f"cannot read VmRSS of PID {pid}")
    finally:
        _close_all(socks)
    return {
        "rss_kib_per_conn": (loaded - idle) / opts.idle_conns,
        "rss_idle_mib": idle / 1024,
        "rss_loaded_mib": loaded / 1024,
    }


TCP_HTTP = frozenset({"tcp", "http"})
TCP = frozenset({"tcp"})
HTTP = frozenset({"http"})

MEASUREMENTS: dict[str, Measurement] = {
    m.name: m
    for m in [
        Measurement("bulk", "iperf", TCP, False, _bulk(reverse=False)),
        Measurement("bulk_rev", "iperf", TCP, False, _bulk(reverse=True)),
        Measurement("rps", "http", TCP_HTTP, False, _wrk(close=False)),
        Measurement("cps", "http", TCP_HTTP, False, _wrk(close=True)),
        Measurement("tls_rps", "http", HTTP, True, _wrk(close=False, tls=True), tls=True),
        Measurement("tls_cps", "http", HTTP, True, _wrk(close=True, tls=True), tls=True),
        # The same as tls_cps, with proxies that issue no session tickets: full handshakes.
        Measurement(
            "tls_full_cps",
            "http",
            HTTP,
            True,
            _wrk(close=True, tls=True, prefix="tls_full_cps"),
            tls=True,
            tls_resume=False,
        ),
        Measurement("rss", "hold", TCP, True, idle_rss),
    ]
}
