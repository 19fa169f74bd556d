"""End-to-end operations: sd_notify to a fake NOTIFY_SOCKET, socket activation, ``l4gw status``
and ``l4gw check --diff`` against the real running daemon."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .conftest import REPO, DaemonFactory, free_port, require_program
from .test_e2e_tcp import Backends, greeting, tcp_config

pytestmark = pytest.mark.e2e


class FakeSystemd:
    """A Unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[dict[str, str]] = []

    async def bind(self) -> None:
        await self.sock.bind(str(self.path))

    async def expect(self, key: str, value: str | None = None) -> dict[str, str]:
        """The next message that has ``key`` (and ``value``), keeping the others."""
        while True:
            data = await self.sock.recv(4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            if key in fields and (value is None or fields[key] == value):
                return fields

    def close(self) -> None:
        self.sock.close()


async def test_sd_notify_ready_reloading_watchdog_stopping(
    l4gw_daemon: DaemonFactory, backends: Backends, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        systemd = FakeSystemd(tmp_path / "notify.sock")
        await systemd.bind()
        try:
            port = free_port()
            daemon = await l4gw_daemon(
                tcp_config([(a, 1)], port),
                env={"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"},
                wait=False,
            )
            ready = await systemd.expect("READY", "1")
            # READY=1 comes once every listener is bound: a connection works right away.
            assert await greeting(port) == b"a"
            assert "1 listener(s)" in ready["STATUS"]
            await systemd.expect("WATCHDOG", "1")  # from the event loop, every 200 ms
            await systemd.expect("WATCHDOG", "1")
            daemon.send_signal(signal.SIGHUP)
            reloading = await systemd.expect("RELOADING", "1")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            await systemd.expect("READY", "1")
            daemon.send_signal(signal.SIGTERM)
            await systemd.expect("STOPPING", "1")
            assert await daemon.wait_exit() == 0
        finally:
            systemd.close()


async def test_socket_activation_takes_over_the_passed_socket(
    l4gw_daemon: DaemonFactory, backends: Backends
) -> None:
    """systemd-socket-activate binds the port and passes it (LISTEN_FDS): the daemon uses it
    instead of binding its own."""
    activate = require_program("systemd-socket-activate")
    with trio.fail_after(30):
        (a,) = await backends(["a"])
        port = free_port()
        daemon = await l4gw_daemon(
            tcp_config([(a, 1)], port),
            argv=[activate, f"--listen=127.0.0.1:{port}", "--fdname=vpc-link"],
            wait=False,
        )
        # As with systemd, the first connection starts the service; it waits in the passed
        # socket's backlog and is served once the daemon has taken the socket over.
        while "Listening on" not in daemon.stderr_text():
            await trio.sleep(0.02)
        assert await greeting(port) == b"a"
        await daemon.wait_log("started")
        assert await greeting(port) == b"a"
        (line,) = daemon.logs("listener_inherited")
        assert (line["listener"], line["address"]) == ("vpc-link", f"127.0.0.1:{port}")
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        assert daemon.logs("inherited_socket_unused") == []


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4gw", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


async def test_status_command_and_check_diff(
    l4gw_daemon: DaemonFactory, backends: Backends, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        a, b = await backends(["a", "b"])
        port = free_port()
        daemon = await l4gw_daemon(tcp_config([(a, 1)], port))
        result = await trio.to_thread.run_sync(run_cli, "status", "--admin", daemon.admin)
        assert result.returncode == 0, result.stderr
        assert "vpc-link" in result.stdout
        assert f"127.0.0.1:{a}" in result.stdout

        proposed = tmp_path / "proposed.toml"
        proposed.write_text(tcp_config([(a, 3), (b, 1)], port).replace("{admin}", daemon.admin))
        result = await trio.to_thread.run_sync(run_cli, "check", "--diff", "-c", str(proposed))
        assert result.returncode == 0, result.stderr
        assert f"~ upstreams.web.nodes[127.0.0.1:{a}].weight: 1 -> 3" in result.stdout
        assert f"+ upstreams.web.nodes[127.0.0.1:{b}]" in result.stdout
        assert "would change 2 setting(s)" in result.stdout

        same = await trio.to_thread.run_sync(
            run_cli, "check", "--diff", "-c", str(daemon.config_path)
        )
        assert "would change 0 setting(s)" in same.stdout


def test_status_unreachable_exits_1() -> None:
    result = run_cli("status", "--admin", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "connection refused" in result.stderr
    assert "Traceback" not in result.stderr
