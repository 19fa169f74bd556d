"""Process, port and /proc helpers shared by the peers and the measurements.

Every process the bench starts is a :class:`Managed` object: its output goes to a log file (never
a pipe that could fill up), and :meth:`Managed.stop` ends it by its own PID (then by the process
group that was created for it alone, in case it forked workers), so nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A peer or a measurement failed; the message says what and where to look."""


class StartupError(BenchError):
    """A peer exited, or did not become ready, when it was started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def listening_ports() -> set[int]:
    """Local TCP ports in the LISTEN state, from /proc/net/tcp{,6}.

    Readiness is checked this way rather than by connecting, because a probe connection through
    a proxy would reach the backend (iperf3 in particular treats a bare connection as a failed
    test).
    """
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def http_status(url: str, timeout: float = 0.5) -> int | None:
    """The status code of ``GET url``, or None when it cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (children of every thread), depth first."""
    out = [pid]
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tids = [p.name for p in task_dir.iterdir()]
    except OSError:
        return out
    for tid in tids:
        try:
            children = (task_dir / tid / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.extend(descendants(int(child)))
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` plus all its descendants, in KiB (workers count towards the total)."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its descendants, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


class Managed:
    """A child process with its output in ``log_path``; stop it with :meth:`stop`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own group: workers it forks can be found and ended
            )
        except OSError as exc:
            self._log.close()
            raise StartupError(f"{name}: cannot start {self.argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, what: str, cls: type[BenchError] = BenchError) -> BenchError:
        """An error naming this process, its exit status and the end of its log."""
        status = self.popen.poll()
        state = "running" if status is None else f"exited with status {status}"
        tail = self.log_tail()
        detail = "\n    " + tail.replace("\n", "\n    ") if tail else ""
        return cls(
            f"{self.name}: {what} ({state}; command: {' '.join(self.argv)}; "
            f"log: {self.log_path}){detail}"
        )

    def wait_ready(self, check: Callable[[], bool], timeout: float = 15.0) -> None:
        """Poll ``check`` until it is true; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail("exited before it was ready", StartupError)
            if check():
                return
            time.sleep(0.05)
        raise self.fail(f"not ready after {timeout:.0f}s", StartupError)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; leftover group members are killed."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.popen.kill()
                    self.popen.wait(timeout=5)
            # Workers forked by the process live in the session/group created for it alone.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        finally:
            self._log.close()


def wait_port_listening(proc: Managed, port: int, timeout: float = 15.0) -> None:
    proc.wait_ready(lambda: port in listening_ports(), timeout)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run_text(argv: Sequence[str], timeout: float = 10.0) -> str:
    """stdout+stderr of a short command, or "" when it cannot run."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout + proc.stderr).strip()
