"""Command line: ``l4gw run | check | demo | status | --version``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import ConfigError, describe, load_config

DEFAULT_CONFIG = "/etc/l4gw/conf.toml"


def config_path(arg: str | None) -> str:
    """``-c FILE``, else ``$L4GW_CONFIG``, else ``/etc/l4gw/conf.toml``."""
    return arg or os.environ.get("L4GW_CONFIG") or DEFAULT_CONFIG


def _print_problems(path: str, exc: ConfigError) -> None:
    print(f"l4gw: {path}: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from .daemon import config_problems

    path = config_path(args.config)
    try:
        config = load_config(path)
        problems = config_problems(config)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    print(f"{path}: valid")
    print(describe(config))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon, load_usable_config
    from .listeners import BindError
    from .logs import configure_logging

    path = config_path(args.config)
    try:
        config = load_usable_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    configure_logging(config.daemon.log_level, config.daemon.log_format)
    daemon = Daemon(config, config_path=path)
    try:
        trio.run(daemon.run)
    except BindError as exc:
        print(f"l4gw: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(port=args.port, admin_port=args.admin_port)


def cmd_status(args: argparse.Namespace) -> int:
    from .statuscmd import fetch_status, format_status

    try:
        status = fetch_status(args.admin, timeout=5.0)
    except OSError as exc:
        print(f"l4gw: cannot reach the admin endpoint at {args.admin}: {exc}", file=sys.stderr)
        return 1
    print(format_status(status))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l4gw", description="Load-balancer daemon for reaching private services."
    )
    parser.add_argument("--version", action="version", version=f"l4gw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", help=f"config file ($L4GW_CONFIG, else {DEFAULT_CONFIG})")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("-c", "--config", help=f"config file ($L4GW_CONFIG, else {DEFAULT_CONFIG})")
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="run demo backends and a gateway on loopback")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9901, help="admin port (default 9901)")
    demo.set_defaults(func=cmd_demo)
    status = sub.add_parser("status", help="show a running daemon's state")
    status.add_argument("--admin", default="127.0.0.1:9901", help="admin address (host:port)")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
