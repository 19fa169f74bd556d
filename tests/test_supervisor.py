"""l4gw.supervisor with tiny fake workers (python -c) that speak sd_notify through l4gw.systemd:
start, replacement of a killed worker, signal forwarding, reload and readiness aggregation,
the per-worker watchdog, a failed start, and socket-activation fds handed on to workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from l4gw.workers import supervisor
from l4gw.workers.supervisor import Backoff, Supervisor, WorkerHooks, WorkerSlot

REPO = Path(__file__).resolve().parent.parent

#: argv: index, log file, mode. Modes: ok, fail (exit 3 before ready), hang-once (the first
#: incarnation stops pinging the watchdog after READY=1), listen (logs the fds it inherited),
#: fd:N (writes its index to the inherited fd N).
WORKER = textwrap.dedent(
    """
    import json, os, resource, signal, sys, time
    from l4gw.serve import systemd

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    index, log_path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    def log(*words):
        with open(log_path, "a") as f:
            f.write(" ".join([str(index), str(os.getpid()), *map(str, words)]) + "\\n")

    def on_term(signum, frame):
        log("term", signal.Signals(signum).name)
        systemd.stopping()
        sys.exit(0)

    def on_hup(signum, frame):
        log("hup")
        systemd.reloading()
        systemd.ready("reloaded")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    log("start", os.environ.get("WATCHDOG_USEC", "-"), os.environ.get("NOTIFY_SOCKET", "-"))
    if mode == "fail":
        sys.exit(3)
    if mode == "listen":
        fds = systemd.listen_fds()
        log("fds", json.dumps([[s.fileno(), n, list(s.getsockname())] for s, n in fds]))
    if mode.startswith("fd:"):
        os.write(int(mode[3:]), f"{index}\\n".encode())
    hang = mode == "hang-once" and index == 0 and not os.path.exists(log_path + ".hung")
    systemd.ready(f"worker {index}")
    if hang:
        open(log_path + ".hung", "w").close()
        log("hanging")
        time.sleep(3600)
    interval = systemd.watchdog_interval()
    while True:
        time.sleep(interval or 0.2)
        systemd.watchdog()
    """
)


def worker_argv(
    log_path: Path, mode: str | Callable[[int], str] = "ok"
) -> Callable[[int], list[str]]:
    def argv(index: int) -> list[str]:
        worker_mode = mode(index) if callable(mode) else mode
        return [sys.executable, "-c", WORKER, str(index), str(log_path), worker_mode]

    return argv


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def log_lines(log_path: Path) -> list[list[str]]:
    if not log_path.exists():
        return []
    return [line.split(" ", 3) for line in log_path.read_text().splitlines()]


def events(log_path: Path, event: str) -> list[list[str]]:
    return [line for line in log_lines(log_path) if line[2] == event]


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def quick_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.2, reset_after=60.0)


@pytest.fixture
def systemd_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The supervisor's own $NOTIFY_SOCKET, as systemd would give it; no watchdog."""
    path = tmp_path / "systemd-notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with sock:
        yield sock


def notifications(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def start(nursery: trio.Nursery, sup: Supervisor) -> dict[str, int]:
    """Run ``sup`` in ``nursery``; the returned dict gets ``status`` when ``run`` returns."""
    result: dict[str, int] = {}

    async def runner(task_status: trio.TaskStatus[Supervisor]) -> None:
        result["status"] = await sup.run(task_status=task_status)

    await nursery.start(runner)
    return result


def live_pids(sup: Supervisor) -> list[int]:
    return [pid for pid in (slot.pid for slot in sup.slots) if pid is not None]


# -- pure parts --------------------------------------------------------------------------


def test_backoff_doubles_to_the_maximum_and_resets_after_a_long_life() -> None:
    backoff = Backoff()
    assert [backoff.next_delay(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.next_delay(59.9) == 30
    assert backoff.next_delay(60.0) == 1
    assert backoff.next_delay(3.0) == 2


def test_worker_count() -> None:
    assert supervisor.worker_count(3) == 3
    assert supervisor.worker_count(0) == len(os.sched_getaffinity(0))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Supervisor(lambda i: ["true"], 0)
    with socket.socket() as sock:
        if sock.fileno() != 3:
            with pytest.raises(ValueError, match="fds"):
                Supervisor(lambda i: ["true"], 1, inherited=[(sock, "x")])


# -- real processes ----------------------------------------------------------------------


async def test_start_ready_and_clean_stop(tmp_path: Path, systemd_socket: socket.socket) -> None:
    log_path = tmp_path / "workers.log"
    sup = Supervisor(worker_argv(log_path), 3, env=worker_env(), backoff=quick_backoff)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result = await start(nursery, sup)
            await sup.all_ready.wait()
            pids = live_pids(sup)
            assert len(set(pids)) == 3
            assert notifications(systemd_socket) == ["READY=1\nSTATUS=3/3 workers ready\n"]
            starts = events(log_path, "start")
            assert sorted(int(line[0]) for line in starts) == [0, 1, 2]
            # Each worker got its own notify socket (not systemd's) and no watchdog.
            sockets = {line[3].split()[1] for line in starts}
            assert len(sockets) == 3
            assert all(s.startswith("@l4gw-supervisor/") for s in sockets)
            assert all(line[3].split()[0] == "-" for line in starts)
            sup.stop()
    assert result["status"] == 0
    assert not any(alive(pid) for pid in pids)
    assert sorted(int(line[0]) for line in events(log_path, "term")) == [0, 1, 2]
    assert notifications(systemd_socket)[0].startswith("STOPPING=1\n")


async def test_a_killed_worker_is_replaced(tmp_path: Path, systemd_socket: socket.socket) -> None:
    log_path = tmp_path / "workers.log"
    sup = Supervisor(worker_argv(log_path), 3, env=worker_env(), backoff=quick_backoff)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result = await start(nursery, sup)
            await sup.all_ready.wait()
            before = [slot.pid for slot in sup.slots]
            victim = before[1]
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: sup.slots[1].pid not in (None, victim))
            await wait_for(lambda: sup.slots[1].state == "ready")
            assert [slot.pid for slot in sup.slots][0::2] == before[0::2]
            assert sup.restarts == 1
            assert sup.slots[1].starts == 2
            assert "STATUS=3/3 workers ready, 1 restarts\n" in notifications(systemd_socket)
            sup.stop()
    assert result["status"] == 0
    assert len(events(log_path, "start")) == 4


class RecordingHooks(WorkerHooks):
    """Passes each worker process one end of a fresh socket pair and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.signals: list[int] = []
        self.parents: dict[int, socket.socket] = {}
        self.children: dict[int, socket.socket] = {}

    def pass_fds(self, slot: WorkerSlot) -> list[int]:
        self.calls.append(("pass_fds", slot.index))
        parent, child = socket.socketpair()
        parent.setblocking(False)
        if slot.index in self.parents:
            self.parents[slot.index].close()
        self.parents[slot.index], self.children[slot.index] = parent, child
        return [child.fileno()]

    def spawned(self, slot: WorkerSlot) -> None:
        assert slot.pid is not None
        self.calls.append(("spawned", slot.index))
        self.children.pop(slot.index).close()

    def ready(self, slot: WorkerSlot) -> None:
        self.calls.append(("ready", slot.index))

    def exited(self, slot: WorkerSlot) -> None:
        assert slot.pid is None
        self.calls.append(("exited", slot.index))

    def signal(self, signum: int) -> None:
        self.signals.append(signum)

    def received(self, index: int) -> bytes:
        try:
            return self.parents[index].recv(100)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        for sock in [*self.parents.values(), *self.children.values()]:
            sock.close()


async def test_hooks_pass_an_fd_and_hear_of_starts_readiness_exits_and_signals(
    tmp_path: Path, systemd_socket: socket.socket
) -> None:
    log_path = tmp_path / "workers.log"
    hooks = RecordingHooks()
    argv = worker_argv(log_path, lambda index: f"fd:{hooks.children[index].fileno()}")
    sup = Supervisor(argv, 2, env=worker_env(), backoff=quick_backoff, hooks=hooks)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                result = await start(nursery, sup)
                await sup.all_ready.wait()
                for index in (0, 1):
                    await wait_for(lambda i=index: hooks.received(i) == f"{i}\n".encode())
                victim = sup.slots[1].pid
                assert victim is not None
                os.kill(victim, signal.SIGKILL)
                await wait_for(lambda: sup.slots[1].pid not in (None, victim))
                await wait_for(lambda: sup.slots[1].state == "ready")
                await wait_for(lambda: hooks.received(1) == b"1\n")  # through the new pair
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        hooks.close()
    assert result["status"] == 0
    assert [name for name, index in hooks.calls if index == 1] == [
        "pass_fds",
        "spawned",
        "ready",
        "exited",
        "pass_fds",
        "spawned",
        "ready",
        "exited",
    ]
    assert [name for name, index in hooks.calls if index == 0] == [
        "pass_fds",
        "spawned",
        "ready",
        "exited",
    ]
    assert hooks.signals == [signal.SIGTERM]


async def test_sigterm_is_forwarded_and_stops_everything(
    tmp_path: Path, systemd_socket: socket.socket
) -> None:
    log_path = tmp_path / "workers.log"
    sup = Supervisor(worker_argv(log_path), 2, env=worker_env(), backoff=quick_backoff)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result = await start(nursery, sup)
            await sup.all_ready.wait()
            pids = live_pids(sup)
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the supervisor's signal receiver
    assert result["status"] == 0
    assert not any(alive(pid) for pid in pids)
    assert sorted((line[0], line[3]) for line in events(log_path, "term")) == [
        ("0", "SIGTERM"),
        ("1", "SIGTERM"),
    ]
    assert len(events(log_path, "start")) == 2  # nothing restarted after the stop


async def test_sighup_is_forwarded_and_the_reload_is_aggregated(
    tmp_path: Path, systemd_socket: socket.socket
) -> None:
    log_path = tmp_path / "workers.log"
    sup = Supervisor(worker_argv(log_path), 2, env=worker_env(), backoff=quick_backoff)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result = await start(nursery, sup)
            await sup.all_ready.wait()
            notifications(systemd_socket)
            os.kill(os.getpid(), signal.SIGHUP)
            await wait_for(lambda: len(events(log_path, "hup")) == 2)
            await wait_for(lambda: all(slot.state == "ready" for slot in sup.slots))
            await wait_for(lambda: sup._reload_pending is None)
            sent = notifications(systemd_socket)
            assert sent[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert sent[-1] == "READY=1\nSTATUS=2/2 workers ready\n"
            os.kill(os.getpid(), signal.SIGINT)
    assert result["status"] == 0
    assert sorted(line[3] for line in events(log_path, "term")) == ["SIGINT", "SIGINT"]


async def test_a_worker_failing_at_start_fails_the_supervisor(
    tmp_path: Path, systemd_socket: socket.socket
) -> None:
    log_path = tmp_path / "workers.log"
    argv = worker_argv(log_path, lambda index: "fail" if index == 1 else "ok")
    sup = Supervisor(argv, 3, env=worker_env(), backoff=quick_backoff)
    with trio.fail_after(30):
        status = await sup.run()
    assert status == 1
    assert not sup.all_ready.is_set()
    assert live_pids(sup) == []
    # Worker 1 was not restarted (the others may be stopped before they even log their start).
    assert [line[0] for line in events(log_path, "start")].count("1") == 1
    assert any(
        message.startswith("STATUS=failed: worker 1 exited with status 3")
        for message in notifications(systemd_socket)
    )


async def test_a_hung_worker_is_aborted_and_restarted(
    tmp_path: Path, systemd_socket: socket.socket
) -> None:
    log_path = tmp_path / "workers.log"
    sup = Supervisor(
        worker_argv(log_path, "hang-once"),
        2,
        env=worker_env(),
        backoff=quick_backoff,
        worker_watchdog=1.0,
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result = await start(nursery, sup)
            await sup.all_ready.wait()
            first = sup.slots[0].pid
            await wait_for(lambda: sup.slots[0].pid not in (None, first))
            assert sup.slots[0].returncode == -signal.SIGABRT
            await wait_for(lambda: sup.slots[0].state == "ready")
            assert sup.slots[1].starts == 1  # the healthy worker was left alone
            starts = events(log_path, "start")
            assert {line[3].split()[0] for line in starts} == {"1000000"}
            sup.stop()
    assert result["status"] == 0


SUPERVISED_WITH_FDS = textwrap.dedent(
    """
    import os, socket, sys, trio
    from l4gw.workers.supervisor import Supervisor, Backoff

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    if sock.fileno() != 3:
        os.dup2(sock.fileno(), 3)
        sock.close()
        sock = socket.socket(fileno=3)
    print(sock.getsockname()[1], flush=True)
    log_path = sys.argv[1]

    def argv(index):
        return [sys.executable, "-c", sys.argv[2], str(index), log_path, "listen"]

    sup = Supervisor(argv, 2, inherited=[(sock, "vpc-link")])
    sys.exit(trio.run(sup.run))
    """
)


async def test_inherited_sockets_are_handed_on_to_every_worker(tmp_path: Path) -> None:
    log_path = tmp_path / "workers.log"
    env = worker_env()
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS"):
        env.pop(var, None)
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", SUPERVISED_WITH_FDS, str(log_path), WORKER],
            env=env,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            port = int((await proc.stdout.receive_some(100)).decode().strip())
            await wait_for(lambda: len(events(log_path, "fds")) == 2)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for line in events(log_path, "fds"):
        assert json.loads(line[3]) == [[3, "vpc-link", ["127.0.0.1", port]]]
    assert len(events(log_path, "term")) == 2


async def test_a_missing_worker_binary_fails_the_start(systemd_socket: socket.socket) -> None:
    sup = Supervisor(lambda i: ["/nonexistent/l4gw"], 2, backoff=quick_backoff)
    with trio.fail_after(10):
        assert await sup.run() == 1


async def test_a_stop_while_workers_are_starting(
    tmp_path: Path, systemd_socket: socket.socket
) -> None:
    log_path = tmp_path / "workers.log"
    sup = Supervisor(worker_argv(log_path), 2, env=worker_env(), backoff=quick_backoff)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result = await start(nursery, sup)
            while not all(slot.state == "starting" for slot in sup.slots):
                await trio.lowlevel.checkpoint()
            sup.stop()
    assert result["status"] == 0
    assert live_pids(sup) == []
    assert not sup.all_ready.is_set()
