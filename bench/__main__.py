"""``python -m bench``: the hot-path benchmarks, l4gw side by side with direct, HAProxy, nginx.

Exit status: 0 when every measurement ran, 2 when some failed (each is reported, and the rest
still run), 1 on a usage error. Missed goals do not change the exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from bench import tomlw
from bench.measure import MEASUREMENTS, Options
from bench.peers import Settings, all_targets, check_l4gw
from bench.procs import REPO_ROOT, raise_nofile_limit
from bench.report import Results, machine_info, table, to_json, write_json
from bench.runner import Plan, execute, say, select_measurements
from bench.soak import parse_duration, run_soak
from bench.tlscert import KEY_TYPES
from l4gw.core.capacity import connection_cap, fd_reserve

DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "latest.json"


def _names(values: list[str] | None, allowed: list[str], what: str) -> list[str]:
    out: list[str] = []
    for value in values or []:
        for item in value.split(","):
            name = item.strip()
            if name and name not in allowed:
                raise SystemExit(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
            if name:
                out.append(name)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    target_names = [t.name for t in all_targets()]
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="l4gw hot-path benchmarks against direct, HAProxy and nginx, interleaved.",
        epilog="docs/benchmarks.md explains every figure and the goals.",
    )
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds per measurement (default 5)"
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help=f"measurements to run: {', '.join(MEASUREMENTS)} (default: all for the mode)",
    )
    p.add_argument(
        "--targets",
        action="append",
        metavar="NAME[,NAME]",
        help=f"targets to compare: {', '.join(target_names)} (default: all available)",
    )
    p.add_argument("--mode", choices=["tcp", "http"], default="tcp", help="listener mode")
    p.add_argument(
        "--tls",
        action="store_true",
        help="with --mode http: every proxy terminates TLS (self-signed certificate made for the "
        "run); measures tls_rps, tls_cps (resumed handshakes) and tls_full_cps (full "
        "handshakes) instead of the plain figures; direct has no TLS and is left out",
    )
    p.add_argument(
        "--tls-key",
        choices=KEY_TYPES,
        default="ec256",
        help="key of the --tls certificate: ECDSA P-256 or RSA 2048 (default ec256)",
    )
    p.add_argument("--workers", type=int, default=1, help="l4gw [daemon] workers (default 1)")
    p.add_argument(
        "--idle-conns",
        type=int,
        default=10_000,
        help="idle proxied connections for the RSS figure (default 10000, capped by the "
        "file-descriptor limit: a proxy holds two per connection)",
    )
    p.add_argument(
        "--allowlist",
        type=int,
        default=0,
        metavar="N",
        help="give every proxy a source allow list of N random non-matching CIDRs "
        "followed by 127.0.0.0/8 (default 0: no list)",
    )
    p.add_argument(
        "--l4gw-set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a key of the generated l4gw TOML, value in TOML syntax, e.g. "
        "--l4gw-set daemon.log_format='\"console\"' --l4gw-set listeners.0.max_connections=0",
    )
    p.add_argument("--haproxy-nbthread", type=int, default=1, help="HAProxy nbthread (default 1)")
    p.add_argument(
        "--haproxy-splice", action="store_true", help="let HAProxy splice (option splice-auto)"
    )
    p.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})"
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the peers' configs and logs")
    p.add_argument(
        "--soak",
        metavar="DURATION",
        help="instead of the figures: mixed tcp, http and https load on one l4gw for DURATION "
        "(600, 600s, 10m), sampling its RSS and open descriptors (bench/soak.py)",
    )
    p.add_argument(
        "--soak-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between soak samples (default 30)",
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.idle_conns < 1 or args.workers < 0:
        p.error("--runs, --duration and --idle-conns must be positive, --workers >= 0")
    if args.tls and args.mode != "http":
        p.error("--tls needs --mode http")
    if args.soak is not None:
        try:
            args.soak = parse_duration(args.soak)
        except ValueError as exc:
            p.error(f"--soak: {exc}")
        if args.soak_every <= 0:
            p.error("--soak-every must be positive")
    args.only = _names(args.only, list(MEASUREMENTS), "measurement")
    args.targets = _names(args.targets, target_names, "target")
    try:
        args.l4gw_set = [tomlw.parse_override(s) for s in args.l4gw_set]
    except ValueError as exc:
        p.error(str(exc))
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT, even where a shell started us with it ignored) unwinds like Ctrl-C,
    # so every peer is stopped and the partial results are still reported.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    nofile = raise_nofile_limit()
    if args.soak is not None:
        return run_soak(args.soak, args.soak_every, args.keep_logs)
    settings = Settings(
        mode=args.mode,
        workers=args.workers,
        allowlist=args.allowlist,
        l4gw_set=args.l4gw_set,
        haproxy_nbthread=args.haproxy_nbthread,
        haproxy_splice=args.haproxy_splice,
        nofile=nofile,
        tls=args.tls,
        tls_key_type=args.tls_key,
    )
    # l4gw refuses connections past its own cap from the same limit (l4gw.core.capacity).
    idle_conns = min(args.idle_conns, settings.maxconn - 100, connection_cap(nofile) - 100)
    if idle_conns < args.idle_conns:
        say(
            f"idle connections capped at {idle_conns} (not {args.idle_conns}): "
            f"RLIMIT_NOFILE is {nofile}, a proxy holds two descriptors per connection and "
            f"l4gw keeps {fd_reserve(nofile)} in reserve"
        )
    measurements, notes = select_measurements(args.only, args.mode, args.tls)
    for note in notes:
        say(note)
    if not measurements:
        say("nothing to measure")
        return 1

    res = Results(runs=args.runs, targets=[], mode=args.mode)
    targets = []
    for target in all_targets():
        if args.targets and target.name not in args.targets:
            continue
        why = target.unavailable(settings)
        if why is None and target.name.startswith("l4gw"):
            problem = check_l4gw()
            why = None if problem is None else f"python -m l4gw --version: {problem}"
        if why is not None:
            res.skipped[target.name] = why
            say(f"{target.name}: skipped: {why}")
            continue
        targets.append(target)
    res.targets = [t.name for t in targets]
    if not targets:
        say("no target available")
        return 1

    plan = Plan(
        runs=args.runs,
        measurements=measurements,
        targets=targets,
        settings=settings,
        options=Options(duration=args.duration, idle_conns=idle_conns),
        keep_logs=args.keep_logs,
    )
    machine = machine_info()
    say(
        f"{args.runs} run(s) x {', '.join(m.name for m in measurements)} x "
        f"{', '.join(res.targets)}; {args.duration:g}s each; mode {args.mode}"
        + (f", TLS ({args.tls_key} certificate)" if args.tls else "")
    )
    interrupted = False
    try:
        execute(plan, res)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: reporting what was measured")

    settings_doc = {
        "runs": args.runs,
        "duration_s": args.duration,
        "mode": args.mode,
        "tls": args.tls,
        "tls_key": args.tls_key if args.tls else None,
        "workers": args.workers,
        "idle_conns": idle_conns,
        "allowlist": args.allowlist,
        "l4gw_set": {k: v for k, v in args.l4gw_set},
        "haproxy_nbthread": args.haproxy_nbthread,
        "haproxy_splice": args.haproxy_splice,
        "measurements": [m.name for m in measurements],
        "targets": res.targets,
        "interrupted": interrupted,
    }
    print(table(res))
    print(
        f"load average {machine['loadavg_start']:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end ({machine['nproc']} CPUs)"
    )
    for name, why in res.skipped.items():
        print(f"skipped {name}: {why}")
    if res.errors:
        print(f"{len(res.errors)} measurement(s) failed; the first:")
        first = res.errors[0]
        print(f"  run {first['run']} {first['measurement']} {first['target']}: {first['error']}")
    write_json(args.json, to_json(res, machine, settings_doc))
    print(f"results written to {args.json}")
    if interrupted:
        return 130
    return 2 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
