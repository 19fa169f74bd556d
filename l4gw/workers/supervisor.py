"""``workers = N``: one supervisor process running N worker processes that share the ports.

Each worker is a full daemon (``l4gw run`` with a worker index) that binds every listener with
SO_REUSEPORT, so the kernel spreads new connections over the workers. The supervisor binds
nothing and proxies nothing; it

* starts the N workers, each in its own process group (a Ctrl-C in a terminal reaches only the
  supervisor, which forwards it once: a worker never sees a signal twice, which would mean
  "close at once" instead of "drain");
* restarts a worker that exits while it is not stopping, after a per-worker backoff (1 s,
  doubling to 30 s, back to 1 s once a worker has lived 60 s). A worker that exits before the
  first time all of them were ready fails the whole start: the others are stopped and
  ``run`` returns 1, as a single ``l4gw run`` does on a bind failure;
* forwards SIGHUP, SIGTERM and SIGINT to the live workers. After SIGTERM/SIGINT nothing is
  restarted, and ``run`` returns 0 once every worker has exited cleanly (status 0, or killed by
  the forwarded signal before it was ready), else 1. A second SIGTERM is forwarded too, so the
  workers close at once;
* speaks ``sd_notify`` for the whole service. Each worker gets ``NOTIFY_SOCKET`` pointing at a
  datagram socket of the supervisor's (one per worker slot, abstract namespace) and runs the
  same ``l4gw.serve.systemd`` calls as a lone daemon. The supervisor sends READY=1 to systemd once
  every worker has, RELOADING=1 on SIGHUP and READY=1 when every worker that was running has
  answered READY=1 (or exited), STOPPING=1 on SIGTERM, and a STATUS line with the counts. So
  the unit keeps ``NotifyAccess=main``;
* is itself watched by systemd (``WatchdogSec=``: pings from its event loop) and watches each
  worker the same way: workers get ``WATCHDOG_USEC`` (no ``WATCHDOG_PID``), and a ready worker
  that has not sent WATCHDOG=1 for a whole period gets SIGABRT (a core or faulthandler dump,
  as systemd's ``WatchdogSignal=``), then SIGKILL half a period later, and is restarted. One
  hung worker is replaced without restarting the service;
* passes sockets inherited from systemd (socket activation) on to every worker, at the same
  fd numbers, with ``LISTEN_FDS``/``LISTEN_FDNAMES`` and ``LISTEN_PID`` set to the worker's
  pid by a ``/bin/sh -c 'export LISTEN_PID=$$; exec "$@"'`` wrapper. All the workers then
  accept from the same socket.





Under systemd, use ``KillMode=mixed``: SIGTERM goes to the supervisor only, which forwards it
(with the default ``control-group`` every worker would get it twice). Outside systemd, stop the
supervisor with SIGTERM, not SIGKILL: workers are not killed with their parent.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import attrs
import structlog
import trio

from ..serve import systemd

log = structlog.get_logger("l4gw.supervisor")

#: Signals the supervisor forwards to its workers.
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)

#: Variables of the supervisor's own environment that are never passed to a worker as they are.
_PRIVATE_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)

#: Sets LISTEN_PID to the pid of the process that the worker command then replaces.
_LISTEN_PID_WRAPPER = ("/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "l4gw-worker")


def worker_count(configured: int) -> int:
    """The number of workers for ``[daemon] workers``: itself, or one per usable CPU for 0."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@attrs.define
class Backoff:
    """Delays between the restarts of one worker.

    The first restart waits ``initial``; each quick exit doubles the delay up to ``maximum``; a
    worker that lived ``reset_after`` seconds or more starts the sequence again.
    """

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0
    current: float = 0.0

    def next_delay(self, lifetime: float) -> float:
        """The delay before restarting a worker that exited after ``lifetime`` seconds."""
        if self.current == 0.0 or lifetime >= self.reset_after:
            self.current = self.initial
        else:
            self.current = min(self.current * 2, self.maximum)
        return self.current


@attrs.define(eq=False)
class WorkerSlot:
    """One of the N worker positions and the process currently filling it."""

    index: int
    backoff: Backoff
    notify_sock: socket.socket
    notify_name: str
    process: trio.Process | None = None
    #: down | starting | ready | reloading | stopping
    state: str = "down"
    started_at: float = 0.0
    last_ping: float = 0.0
    abort_sent_at: float | None = None
    status: str = ""
    starts: int = 0
    #: SIGHUP arrived while this process was starting: sent when it is ready.
    hup_deferred: bool = False
    returncode: int | None = None
    #: False once a process of this slot exited uncleanly while the supervisor was stopping.
    stopped_clean: bool = True

    @property
    def pid(self) -> int | None:
        process = self.process
        return None if process is None or process.returncode is not None else process.pid

    @property
    def running(self) -> bool:
        return self.pid is not None


def _open_notify_socket(index: int) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    name = f"l4gw-supervisor/{os.getpid()}/{secrets.token_hex(6)}/{index}"
    try:
        sock.bind("\0" + name)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, "@" + name


class WorkerHooks:
    """Callbacks of a ``Supervisor`` (each does nothing here; override what you need).

    Called from the supervisor's trio task, synchronously: they must not block.
    """

    def pass_fds(self, slot: WorkerSlot) -> list[int]:
        """Extra fds for the process about to be started in ``slot`` (kept at their numbers);
        called just before ``argv_for_worker(slot.index)``."""
        return []

    def spawned(self, slot: WorkerSlot) -> None:
        """The process of ``slot`` was started (``slot.process`` is set)."""

    def ready(self, slot: WorkerSlot) -> None:
        """The process of ``slot`` sent READY=1 (after its start or after a reload)."""

    def exited(self, slot: WorkerSlot) -> None:
        """The process of ``slot`` exited, or could not be started."""

    def signal(self, signum: int) -> None:
        """SIGHUP, SIGTERM or SIGINT arrived; it is forwarded to the workers after this."""


def _clean_stop(returncode: int | None) -> bool:
    return returncode is None or returncode in (0, -signal.SIGTERM, -signal.SIGINT)


class Supervisor:
    """Runs ``n`` workers; see the module docstring for what it promises.

    ``argv_for_worker(i)`` is the command of worker ``i`` (0-based). ``env`` is the workers'
    base environment (default: this process's, read now). ``inherited`` are sockets passed by
    systemd, at fds 3, 4, ... in that order (``systemd.listen_fds()``), handed on to every
    worker. ``worker_watchdog`` is the workers' watchdog period in seconds: None follows
    systemd's (``WATCHDOG_USEC`` of this process, if any), 0 disables it. ``hooks``: see
    ``WorkerHooks``.
    """

    def __init__(
        self,
        argv_for_worker: Callable[[int], list[str]],
        n: int,
        *,
        env: Mapping[str, str] | None = None,
        inherited: Sequence[tuple[socket.socket, str | None]] = (),
        backoff: Callable[[], Backoff] = Backoff,
        worker_watchdog: float | None = None,
        hooks: WorkerHooks | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"need at least one worker, not {n}")
        fds = [sock.fileno() for sock, _ in inherited]
        expected = list(range(systemd.LISTEN_FDS_START, systemd.LISTEN_FDS_START + len(fds)))
        if fds != expected:
            raise ValueError(f"inherited sockets must be fds {expected}, not {fds}")
        self.argv_for_worker = argv_for_worker
        self.n = n
        self.env = {
            key: value
            for key, value in (os.environ if env is None else env).items()
            if key not in _PRIVATE_VARS
        }
        self.inherited = list(inherited)
        if worker_watchdog is None:
            interval = systemd.watchdog_interval()
            worker_watchdog = 2 * interval if interval else 0.0
        self.worker_watchdog = worker_watchdog
        self.slots: list[WorkerSlot] = []
        self.hooks = hooks if hooks is not None else WorkerHooks()
        self._backoff = backoff
        self.stopping = False
        self._stop_signum: int = signal.SIGTERM
        self.exit_status = 0
        #: Set the first time every worker is ready (READY=1 sent to systemd).
        self.all_ready = trio.Event()
        self._stop_event = trio.Event()
        self._reload_pending: set[int] | None = None
        self._last_status = ""
        self.restarts = 0

    # -- the worker processes ---------------------------------------------------------------

    def _command(self, slot: WorkerSlot) -> tuple[list[str], dict[str, str], list[int]]:
        extra_fds = self.hooks.pass_fds(slot)
        argv = list(self.argv_for_worker(slot.index))
        env = dict(self.env)
        env["NOTIFY_SOCKET"] = slot.notify_name
        if self.worker_watchdog > 0:
            env["WATCHDOG_USEC"] = str(int(self.worker_watchdog * 1_000_000))
        pass_fds = [sock.fileno() for sock, _ in self.inherited]
        if pass_fds:
            env["LISTEN_FDS"] = str(len(pass_fds))
            env["LISTEN_FDNAMES"] = ":".join(name or "unknown" for _, name in self.inherited)
            argv = [*_LISTEN_PID_WRAPPER, *argv]
        return argv, env, [*pass_fds, *extra_fds]

    def _drain_notifications(self, slot: WorkerSlot) -> None:
        """Drop what a dead process of this slot sent, so it cannot count for the next one."""
        while True:
            try:
                slot.notify_sock.recv(4096)
            except OSError:  # BlockingIOError: empty
                return

    async def _run_slot(self, slot: WorkerSlot) -> None:
        while not self.stopping:
            self._drain_notifications(slot)
            slot.state = "starting"
            slot.status = ""
            slot.hup_deferred = False
            argv, env, pass_fds = self._command(slot)
            started = trio.current_time()
            try:
                process = await trio.lowlevel.open_process(
                    argv, env=env, pass_fds=pass_fds, process_group=0
                )
            except OSError as exc:
                slot.state = "down"
                slot.returncode = None
                self.hooks.exited(slot)
                log.error("worker_spawn_failed", worker=slot.index, error=str(exc))
                if not await self._after_exit(slot, 0.0, f"could not be started: {exc}"):
                    return
                continue
            slot.process = process
            slot.started_at = slot.last_ping = started
            slot.abort_sent_at = None
            slot.starts += 1
            log.info("worker_started", worker=slot.index, pid=process.pid, starts=slot.starts)
            self.hooks.spawned(slot)
            if self.stopping:  # the stop came while this worker was being spawned
                self._signal(slot, self._stop_signum)
            self._publish_status()
            try:
                await process.wait()
            finally:
                if process.returncode is None:  # cancelled: never leave a worker behind
                    with contextlib.suppress(OSError):
                        process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
            slot.returncode = process.returncode
            slot.state = "down"
            self.hooks.exited(slot)
            if self._reload_pending is not None:
                self._reload_pending.discard(slot.index)
            lifetime = trio.current_time() - started
            if not await self._after_exit(
                slot, lifetime, f"exited with status {process.returncode}"
            ):
                return

    async def _after_exit(self, slot: WorkerSlot, lifetime: float, what: str) -> bool:
        """Bookkeeping after a worker process is gone; False when the slot is done."""
        self._check_reload()
        self._publish_status()
        if self.stopping:
            slot.stopped_clean = _clean_stop(slot.returncode)
            log.info("worker_stopped", worker=slot.index, returncode=slot.returncode)
            return False
        if not self.all_ready.is_set():
            log.error("worker_failed_to_start", worker=slot.index, reason=what)
            self.fail(f"worker {slot.index} {what} before it was ready")
            return False
        delay = slot.backoff.next_delay(lifetime)
        self.restarts += 1
        log.warning(
            "worker_exited",
            worker=slot.index,
            reason=what,
            lifetime=round(lifetime, 3),
            restart_in=delay,
        )
        with trio.move_on_after(delay):
            await self._stop_event.wait()
        return not self.stopping

    def _signal(self, slot: WorkerSlot, signum: int) -> None:
        process = slot.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    # -- control ----------------------------------------------------------------------------

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop: forward ``signum`` to every live worker and restart nothing from now on.
        Calling it again forwards the signal again (the workers then close at once)."""
        self._stop_signum = signum
        if not self.stopping:
            self.stopping = True
            self._stop_event.set()
            self._reload_pending = None
            systemd.stopping(f"stopping {self._live_count()} workers")
            log.info("supervisor_stopping", signal=signal.Signals(signum).name)
        for slot in self.slots:
            self._signal(slot, signum)

    def fail(self, reason: str) -> None:
        """Stop every worker and make ``run`` return 1."""
        self.exit_status = 1
        if not self.stopping:
            log.error("supervisor_failed", reason=reason)
            systemd.status(f"failed: {reason}")
            self.stop(signal.SIGTERM)

    def reload(self) -> None:
        """Forward SIGHUP to the live workers; READY=1 goes to systemd once each of the ready
        ones has answered READY=1 again (or exited). A worker still starting gets its SIGHUP
        when it is ready (before that, SIGHUP's default action would kill it)."""
        if self.stopping:
            return
        pending = set()
        for slot in self.slots:
            if not slot.running:
                continue
            if slot.state == "starting":
                slot.hup_deferred = True
                continue
            pending.add(slot.index)
            slot.state = "reloading"
            self._signal(slot, signal.SIGHUP)
        log.info("supervisor_reloading", workers=len(pending))
        self._reload_pending = pending
        systemd.reloading(f"reloading {len(pending)} workers")
        self._check_reload()

    def _check_reload(self) -> None:
        if self._reload_pending is not None and not self._reload_pending:
            self._reload_pending = None
            log.info("supervisor_reloaded")
            self._last_status = self._status_text()
            systemd.ready(self._last_status)

    # -- notifications from the workers -----------------------------------------------------

    async def _receive_notifications(self, slot: WorkerSlot) -> None:
        sock = slot.notify_sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                self.handle_notification(slot, data)

    def handle_notification(self, slot: WorkerSlot, data: bytes) -> None:
        """Apply one ``sd_notify`` datagram from the process in ``slot``."""
        now = trio.current_time()
        for line in data.decode("utf-8", "replace").split("\n"):
            key, _, value = line.partition("=")
            if key == "READY" and value == "1":
                was_starting = slot.state == "starting"
                slot.state = "ready"
                slot.last_ping = now
                if self._reload_pending is not None and not was_starting:
                    self._reload_pending.discard(slot.index)
                if slot.hup_deferred and not self.stopping:
                    slot.hup_deferred = False
                    slot.state = "reloading"
                    self._signal(slot, signal.SIGHUP)
                self.hooks.ready(slot)
            elif key == "RELOADING" and value == "1":
                slot.state = "reloading"
            elif key == "STOPPING" and value == "1":
                slot.state = "stopping"
            elif key == "WATCHDOG" and value == "1":
                slot.last_ping = now
            elif key == "WATCHDOG" and value == "trigger":
                self._abort(slot, "watchdog triggered by the worker", now)
            elif key == "STATUS":
                slot.status = value
        if not self.all_ready.is_set() and all(s.state == "ready" for s in self.slots):
            self.all_ready.set()
            log.info("supervisor_ready", workers=self.n)
            self._last_status = self._status_text()
            systemd.ready(self._last_status)
        self._check_reload()
        self._publish_status()

    # -- watchdog ---------------------------------------------------------------------------

    def _abort(self, slot: WorkerSlot, reason: str, now: float) -> None:
        if slot.abort_sent_at is not None or not slot.running:
            return
        log.error("worker_watchdog", worker=slot.index, pid=slot.pid, reason=reason)
        slot.abort_sent_at = now
        self._signal(slot, signal.SIGABRT)

    def check_watchdog(self, now: float) -> None:
        """Abort (then kill) ready workers that have not pinged for a whole period."""
        period = self.worker_watchdog
        if period <= 0 or self.stopping:
            return
        for slot in self.slots:
            if not slot.running or slot.state not in ("ready", "reloading"):
                continue
            if slot.abort_sent_at is not None:
                if now - slot.abort_sent_at >= period / 2:
                    self._signal(slot, signal.SIGKILL)
            elif now - slot.last_ping > period:
                self._abort(slot, f"no WATCHDOG=1 for {period:g}s", now)

    async def _watch_workers(self) -> None:
        while True:
            await trio.sleep(self.worker_watchdog / 4)
            self.check_watchdog(trio.current_time())

    # -- status -----------------------------------------------------------------------------

    def _live_count(self) -> int:
        return sum(1 for slot in self.slots if slot.running)

    def _status_text(self) -> str:
        # A worker that is reloading still serves with its old config.
        ready = sum(1 for s in self.slots if s.running and s.state in ("ready", "reloading"))
        text = f"{ready}/{self.n} workers ready"
        if self.restarts:
            text += f", {self.restarts} restarts"
        return text

    def _publish_status(self) -> None:
        text = self._status_text()
        if text != self._last_status and self.all_ready.is_set() and not self.stopping:
            self._last_status = text
            systemd.status(text)

    # -- the whole ----------------------------------------------------------------------------

    async def run(
        self,
        *,
        signals: AsyncIterator[int] | None = None,
        task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Run the workers until they are stopped; returns the exit status (0 or 1).

        ``task_status.started(self)`` is called once the signal handlers are installed and the
        workers are being started (wait for ``all_ready`` to know they are up). ``signals``:
        a receiver of ``FORWARDED_SIGNALS`` the caller opened earlier (signals that arrived
        before ``run`` are then handled first); by default ``run`` opens its own.
        """
        with contextlib.ExitStack() as stack:
            if signals is None:
                signals = stack.enter_context(trio.open_signal_receiver(*FORWARDED_SIGNALS))
            try:
                for index in range(self.n):
                    sock, name = _open_notify_socket(index)
                    self.slots.append(WorkerSlot(index, self._backoff(), sock, name))
                async with trio.open_nursery() as services:
                    services.start_soon(self._handle_signals, signals)
                    interval = systemd.watchdog_interval()
                    if interval is not None:
                        services.start_soon(systemd.serve_watchdog, interval)
                    if self.worker_watchdog > 0:
                        services.start_soon(self._watch_workers)
                    for slot in self.slots:
                        services.start_soon(self._receive_notifications, slot)
                    async with trio.open_nursery() as workers:
                        for slot in self.slots:
                            workers.start_soon(self._run_slot, slot)
                        task_status.started(self)
                    services.cancel_scope.cancel()
            finally:
                for slot in self.slots:
                    slot.notify_sock.close()
        if not all(slot.stopped_clean for slot in self.slots):
            self.exit_status = 1
        log.info("supervisor_exit", status=self.exit_status)
        return self.exit_status

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.hooks.signal(signum)
            if signum == signal.SIGHUP:
                self.reload()
            else:
                self.stop(signum)
