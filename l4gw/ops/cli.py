"""Command line: ``l4gw run | check | demo | status | --version``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import structlog
import trio

from .. import __version__
from ..core.config import ConfigError, describe, load_config

DEFAULT_CONFIG = "/etc/l4gw/conf.toml"


def config_path(arg: str | None) -> str:
    """``-c FILE``, else ``$L4GW_CONFIG``, else ``/etc/l4gw/conf.toml``."""
    return arg or os.environ.get("L4GW_CONFIG") or DEFAULT_CONFIG


def _print_problems(path: str, exc: ConfigError) -> None:
    print(f"l4gw: {path}: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from ..core.config.files import config_as_dict, config_problems

    path = config_path(args.config)
    try:
        config = load_config(path)
        problems = config_problems(config)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    if args.diff:
        return _print_diff(path, config_as_dict(config), args.admin or config.daemon.admin)
    from .resources import capacity_line

    print(f"{path}: valid")
    print(describe(config))
    print(capacity_line())
    return 0


def _print_diff(path: str, proposed: dict[str, object], admin: object) -> int:
    """``check --diff``: what a reload of ``path`` would change in the running daemon."""
    from ..core.config.diff import diff_configs
    from .statuscmd import StatusError, fetch_json

    if admin is None:
        print("l4gw: --diff needs the admin endpoint ([daemon] admin or --admin)", file=sys.stderr)
        return 1
    try:
        running = fetch_json(str(admin), "/config", timeout=5.0)
    except StatusError as exc:
        print(f"l4gw: {exc}", file=sys.stderr)
        return 1
    lines = diff_configs(running, proposed)
    print(f"{path}: valid; a reload would change {len(lines)} setting(s) of the daemon at {admin}")
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..core.config.files import load_usable_config
    from ..core.errors import BindError
    from ..core.logs import configure_logging
    from ..serve.daemon import Daemon
    from ..serve.systemd import InheritedSockets
    from .resources import capacity_warnings, raise_nofile_limit

    path = config_path(args.config)
    try:
        config = load_usable_config(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    worker = args.worker_index is not None
    configure_logging(
        config.daemon.log_level,
        config.daemon.log_format,
        fields={"worker": args.worker_index} if worker else {},
    )
    if not worker and config.daemon.workers != 1:
        # The control plane: health checks, discovery, admin and N workers; no traffic.
        from ..workers.control import run_control_plane

        return run_control_plane(config, path)
    extra_services = []
    if args.control_fd is not None:
        import socket

        from ..workers.channel import control_service

        try:
            control = socket.socket(fileno=args.control_fd)
        except OSError as exc:
            print(f"l4gw: --control-fd {args.control_fd}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        extra_services.append(control_service(control))
    log = structlog.get_logger("l4gw.cli")
    old, new = raise_nofile_limit()
    expected = sum(lc.max_connections for lc in config.listeners) or 10_000
    log.info("resources", nofile_soft=new, nofile_before=old, sized_for_connections=expected)
    # The same host-wide warnings from every worker would only repeat: worker 0 says them.
    for warning in capacity_warnings(expected) if args.worker_index in (None, 0) else ():
        log.warning("capacity", message=warning)
    inherited = InheritedSockets.from_environment()
    daemon = Daemon(
        config,
        on_ready=_settle_memory,
        config_path=path,
        inherited=lambda lc: inherited.take(lc.name, lc.listen),
        reuse_port=worker,
        admin_path=args.admin_socket,
        remote_health=args.control_fd is not None,
        extra_services=extra_services,
    )
    try:
        trio.run(daemon.run)
    except BindError as exc:
        print(f"l4gw: {exc}", file=sys.stderr)
        return 1
    finally:
        for name in inherited.unclaimed():
            log.warning("inherited_socket_unused", socket=name)
        inherited.close()
    return 0


def _settle_memory(_daemon: object) -> None:
    """Once serving: move every object made at start-up (modules, configuration, the
    daemon's tables) out of the cyclic garbage collector's reach (``gc.freeze``), so its
    full collections under load scan only what traffic allocates, not the whole process."""
    import gc

    gc.freeze()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(port=args.port, admin_port=args.admin_port)


def cmd_status(args: argparse.Namespace) -> int:
    from .statuscmd import run_status

    return run_status(args.admin, timeout=5.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l4gw", description="Load-balancer daemon for reaching private services."
    )
    parser.add_argument("--version", action="version", version=f"l4gw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", help=f"config file ($L4GW_CONFIG, else {DEFAULT_CONFIG})")
    # Set by the control plane for its worker processes (l4gw.workers); not for operators.
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--admin-socket", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("-c", "--config", help=f"config file ($L4GW_CONFIG, else {DEFAULT_CONFIG})")
    check.add_argument(
        "--diff",
        action="store_true",
        help="show what a reload would change in the running daemon (via its admin endpoint)",
    )
    check.add_argument("--admin", help="admin address for --diff (default: [daemon] admin)")
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
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `l4gw check | head`: the reader went away; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
