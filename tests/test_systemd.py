"""l4gw.systemd: sd_notify to a fake NOTIFY_SOCKET, the watchdog, LISTEN_FDS with real inherited
fds in a child process, socket matching, and the unit files checked by systemd-analyze."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from l4gw.core.netaddr import SocketAddress, parse_socket_address
from l4gw.serve import systemd

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A Unix datagram socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with sock:
        yield sock


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, without blocking."""
    messages = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages
    finally:
        sock.settimeout(timeout)


# -- sd_notify ---------------------------------------------------------------------------


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("up") is False
    assert systemd.watchdog() is False


def test_ready_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert systemd.ready("2 listeners bound") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2 listeners bound\n"
    assert systemd.ready() is True
    assert notify_socket.recv(4096) == b"READY=1\n"


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading("reloading /etc/l4gw/conf.toml")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = notify_socket.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2] == "STATUS=reloading /etc/l4gw/conf.toml"


def test_stopping_status_and_watchdog(notify_socket: socket.socket) -> None:
    assert systemd.stopping()
    assert systemd.status("draining\n12 connections\tleft")
    assert systemd.watchdog()
    assert received(notify_socket) == [
        "STOPPING=1\n",
        "STATUS=draining 12 connections left\n",
        "WATCHDOG=1\n",
    ]


def test_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"l4gw-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1", "STATUS=abstract")
        assert sock.recv(4096) == b"READY=1\nSTATUS=abstract\n"


def test_send_failure_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


def test_notify_rejects_malformed_lines(notify_socket: socket.socket) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        systemd.notify("READY=1\nWATCHDOG=1")
    with pytest.raises(ValueError):
        systemd.notify("READY")
    assert received(notify_socket) == []


# -- watchdog ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("1000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
            monkeypatch.setenv(var, pids.get(value, value))
    assert systemd.watchdog_interval() == expected


async def test_serve_watchdog_pings_from_the_event_loop(
    notify_socket: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(systemd.serve_watchdog, 10.0)
            assert received(notify_socket) == ["WATCHDOG=1\n"]
            await trio.sleep(25)
            nursery.cancel_scope.cancel()
    assert trio.current_time() == 25
    assert received(notify_socket) == ["WATCHDOG=1\n", "WATCHDOG=1\n"]


async def test_watchdog_stops_when_the_loop_is_blocked(notify_socket: socket.socket) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(systemd.serve_watchdog, 0.05)
            time.sleep(0.3)  # a stuck synchronous call: no ping can go out meanwhile  # noqa: ASYNC251
            assert received(notify_socket) == ["WATCHDOG=1\n"]
            await trio.sleep(0.12)
            nursery.cancel_scope.cancel()
    assert len(received(notify_socket)) >= 1


# -- LISTEN_FDS --------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    from l4gw.serve import systemd
    from l4gw.core.netaddr import parse_socket_address

    fds = systemd.listen_fds()
    report = {
        "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
        "again": len(systemd.listen_fds()),
        "sockets": [
            {
                "fd": sock.fileno(),
                "name": name,
                "family": int(sock.family),
                "type": int(sock.type),
                "sockname": list(sock.getsockname()),
                "inheritable": os.get_inheritable(sock.fileno()),
            }
            for sock, name in fds
        ],
    }
    for key, (name, address) in json.loads(sys.argv[1]).items():
        found = systemd.match_inherited(fds, name, parse_socket_address(address))
        report[key] = None if found is None else found.fileno()
    print(json.dumps(report), flush=True)
    """
)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(var, None)
    return env


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    return sock


def test_listen_fds_from_a_launcher_that_execs() -> None:
    """The launcher: pass fds 3 and 4, set LISTEN_PID to the pid that exec keeps (sh's $$)."""
    first, second = listening_socket(), listening_socket()
    with first, second:
        # Put the two sockets at fds 3 and 4 in the child, as systemd does.
        port_a, port_b = first.getsockname()[1], second.getsockname()[1]
        queries = {
            "by_name": ["admin", "127.0.0.1:1"],
            "by_address": ["vpc-link", f"127.0.0.1:{port_b}"],
            "wildcard": ["other", f"0.0.0.0:{port_a}"],
        }
        script = (
            "import os, sys; a, b = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
            "os.dup2(a, 3); os.dup2(b, 4); "
            "os.set_inheritable(3, True); os.set_inheritable(4, True); "
            "os.environ['LISTEN_FDS'] = '2'; os.environ['LISTEN_FDNAMES'] = 'admin:unknown'; "
            "os.execvp('sh', ['sh', '-c', 'export LISTEN_PID=$$; exec \"$0\" \"$@\"', "
            "*sys.argv[3:]])"
        )
        argv = [sys.executable, "-c", script, str(first.fileno()), str(second.fileno())]
        argv += [sys.executable, "-c", CHILD, json.dumps(queries)]
        out = subprocess.run(
            argv,
            env=child_env(),
            pass_fds=(first.fileno(), second.fileno()),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    report = json.loads(out)
    assert report["env"] == {}, "LISTEN_* must not reach the daemon's children"
    assert report["again"] == 0
    assert [(s["fd"], s["name"]) for s in report["sockets"]] == [(3, "admin"), (4, "unknown")]
    assert [s["sockname"] for s in report["sockets"]] == [
        ["127.0.0.1", port_a],
        ["127.0.0.1", port_b],
    ]
    assert all(s["family"] == socket.AF_INET for s in report["sockets"])
    assert all(s["type"] == socket.SOCK_STREAM for s in report["sockets"])
    assert not any(s["inheritable"] for s in report["sockets"])
    assert report["by_name"] == 3
    assert report["by_address"] == 4
    assert report["wildcard"] is None  # 127.0.0.1 is not the wildcard


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing"
)
def test_listen_fds_from_systemd_socket_activate() -> None:
    for _attempt in range(5):
        with listening_socket() as probe:
            port = probe.getsockname()[1]
        queries = {
            "by_name": ["vpc-link", "10.0.0.1:80"],
            "by_address": ["other", f"127.0.0.1:{port}"],
            "missing": ["other", "127.0.0.1:1"],
        }
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                f"--listen=127.0.0.1:{port}",
                "--fdname=vpc-link",
                sys.executable,
                "-c",
                CHILD,
                json.dumps(queries),
            ],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # systemd-socket-activate starts the program on the first connection.
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == 0:
            break
        assert "Address already in use" in err, err  # lost the race for the port: retry
    report = json.loads(out)
    assert report["env"] == {}
    assert [(s["fd"], s["name"], s["sockname"]) for s in report["sockets"]] == [
        (3, "vpc-link", ["127.0.0.1", port])
    ]
    assert report["by_name"] == 3
    assert report["by_address"] == 3
    assert report["missing"] is None


def test_listen_fds_for_another_process_is_ignored_and_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "vpc-link")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


@pytest.mark.parametrize("fds", ["", "0", "x", "-2"])
def test_listen_fds_without_a_count(monkeypatch: pytest.MonkeyPatch, fds: str) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", fds)
    assert systemd.listen_fds() == []


# -- matching inherited sockets to listeners ---------------------------------------------


def addr(text: str) -> SocketAddress:
    return parse_socket_address(text)


def test_match_prefers_the_name_then_the_address() -> None:
    with listening_socket() as a, listening_socket() as b:
        port_b = b.getsockname()[1]
        inherited: list[tuple[socket.socket, str | None]] = [(a, "vpc-link"), (b, None)]
        assert systemd.match_inherited(inherited, "vpc-link", addr("10.1.1.1:9")) is a
        assert systemd.match_inherited(inherited, "api", addr(f"127.0.0.1:{port_b}")) is b
        assert systemd.match_inherited(inherited, "api", addr("127.0.0.1:1")) is None
        b.close()
        assert systemd.match_inherited(inherited, "api", addr(f"127.0.0.1:{port_b}")) is None


def test_ipv4_wildcard_matches_a_dual_stack_socket_only() -> None:
    dual = socket.socket(socket.AF_INET6)
    v6only = socket.socket(socket.AF_INET6)
    with dual, v6only:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        v6only.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6only.bind(("::", 0))
        port, port6 = dual.getsockname()[1], v6only.getsockname()[1]
        assert systemd.socket_matches(dual, addr(f"0.0.0.0:{port}"))
        assert systemd.socket_matches(dual, addr(f"[::]:{port}"))
        assert not systemd.socket_matches(v6only, addr(f"0.0.0.0:{port6}"))
        assert systemd.socket_matches(v6only, addr(f"[::]:{port6}"))
        assert not systemd.socket_matches(dual, addr(f"0.0.0.0:{port + 1 if port < 65535 else 1}"))
    with listening_socket("0.0.0.0") as v4:
        port4 = v4.getsockname()[1]
        assert systemd.socket_matches(v4, addr(f"0.0.0.0:{port4}"))
        assert not systemd.socket_matches(v4, addr(f"[::]:{port4}"))
        assert not systemd.socket_matches(v4, addr(f"127.0.0.1:{port4}"))


def test_ipv4_mapped_and_non_tcp_sockets() -> None:
    with socket.socket(socket.AF_INET6) as mapped:
        mapped.bind(("::ffff:127.0.0.1", 0))
        port = mapped.getsockname()[1]
        assert systemd.socket_matches(mapped, addr(f"127.0.0.1:{port}"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        assert not systemd.socket_matches(udp, addr(f"127.0.0.1:{udp.getsockname()[1]}"))
    unix_a, unix_b = socket.socketpair()
    with unix_a, unix_b:
        assert not systemd.socket_matches(unix_a, addr("127.0.0.1:80"))
        # A name match still wins: the fd name is the operator's explicit choice.
        assert systemd.match_inherited([(unix_a, "x")], "x", addr("127.0.0.1:80")) is unix_a


def test_inherited_sockets_hand_each_socket_out_once() -> None:
    dual = socket.socket(socket.AF_INET6)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 0))
    port = dual.getsockname()[1]
    extra = listening_socket()
    pool = systemd.InheritedSockets([(dual, "l4gw.socket"), (extra, None)])
    assert len(pool) == 2
    assert pool.take("v6", addr(f"[::]:{port}")) is dual
    assert pool.take("v4", addr(f"0.0.0.0:{port}")) is None  # already taken by "v6"
    (left,) = pool.unclaimed()
    assert left.startswith("unnamed ('127.0.0.1', ")
    pool.close()
    assert extra.fileno() == -1
    assert dual.fileno() >= 0
    assert len(pool) == 0
    dual.close()


# -- unit files --------------------------------------------------------------------------


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNIT_DIR / name).read_text())
    return parser


def test_service_unit_settings() -> None:
    service = unit("l4gw.service")["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["KillMode"] == "mixed"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"] == "/opt/l4gw/venv/bin/l4gw run -c /etc/l4gw/conf.toml"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["LimitNOFILE"] == "1048576"
    # Stopping must outlast the default drain_timeout (30s) and the watchdog must be set.
    stop = re.fullmatch(r"(\d+)s", service["TimeoutStopSec"])
    assert stop is not None
    assert int(stop.group(1)) > 30
    assert service["WatchdogSec"] == "30"
    socket_unit = unit("l4gw.socket")["Socket"]
    assert socket_unit["FileDescriptorName"] == "vpc-link"
    assert socket_unit["Service"] == "l4gw.service"


def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(groups: dict[str, list[str]], name: str) -> set[str]:
    result: set[str] = set()
    for item in groups.get(name, []):
        result |= _expand(groups, item) if item.startswith("@") else {item}
    return result


#: System calls the daemon needs that a careless filter would miss: the splice data path,
#: pipe sizing, the nofile limit, the event loop, sd_notify, and the workers' processes.
DAEMON_SYSCALLS = {
    "splice", "pipe2", "fcntl", "prlimit64", "setrlimit", "epoll_wait", "epoll_ctl",
    "accept4", "socket", "bind", "listen", "connect", "setsockopt", "getsockopt",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "getrandom", "eventfd2",
    "clone3", "execve", "wait4", "waitid", "pidfd_open", "kill", "rt_sigaction", "mmap",
}  # fmt: skip


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_system_call_filter_allows_what_the_daemon_uses() -> None:
    groups = _syscall_groups()
    allowed = _expand(groups, "@system-service") - _expand(groups, "@privileged")
    assert DAEMON_SYSCALLS - allowed == set()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verify both units; the ExecStart binary is replaced by a stub (not installed here)."""
    stub = tmp_path / "l4gw"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    service = (UNIT_DIR / "l4gw.service").read_text()
    (tmp_path / "l4gw.service").write_text(service.replace("/opt/l4gw/venv/bin/l4gw", str(stub)))
    shutil.copy(UNIT_DIR / "l4gw.socket", tmp_path / "l4gw.socket")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "l4gw.service", "l4gw.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr
