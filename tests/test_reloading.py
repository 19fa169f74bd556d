"""The reload procedure shared by the daemon, its workers and the control plane
(l4gw.reloading), with a stand-in process and real files."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import structlog

from l4gw.core.config import Config, DaemonConfig
from l4gw.core.errors import BindError
from l4gw.core.netaddr import SocketAddress
from l4gw.serve import reloading
from l4gw.serve.reloading import reconfigure_logging, reload_file, warn_start_only

GOOD = """
[daemon]
admin = ""

[upstreams.web]
nodes = [{ address = "127.0.0.1:8081" }]

[[listeners]]
name = "l"
listen = "127.0.0.1:8080"
upstream = "web"
"""


class Process:
    """A ``Reloadable`` that records what it was given."""

    def __init__(self, refuse: str | None = None) -> None:
        self.reloads = 0
        self.reload_failures = 0
        self.applied: list[Config] = []
        self.refuse = refuse

    def apply(self, new: Config) -> None:
        if self.refuse is not None:
            raise BindError(self.refuse)
        self.applied.append(new)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "l4gw.toml"
    path.write_text(GOOD)
    return path


def test_a_good_file_is_applied_counted_and_logged(good: Path) -> None:
    process = Process()
    with structlog.testing.capture_logs() as logs:
        assert reload_file(
            process, good, fields={"role": "control"}, summary=lambda c: {"n": len(c.listeners)}
        )
    assert (process.reloads, process.reload_failures) == (1, 0)
    assert [lc.name for lc in process.applied[0].listeners] == ["l"]
    assert logs == [
        {"event": "reloaded", "log_level": "info", "role": "control", "file": str(good), "n": 1}
    ]
    assert list(logs[0]) == ["role", "file", "n", "event", "log_level"]


def test_a_bad_file_is_refused_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace('upstream = "web"', 'upstream = "nope"') + "\n[daemon2]\n")
    process = Process()
    with structlog.testing.capture_logs() as logs:
        assert not reload_file(process, path)
    assert (process.reloads, process.reload_failures, process.applied) == (0, 1, [])
    (line,) = logs
    assert (line["event"], line["log_level"], line["file"]) == (
        "reload_rejected",
        "error",
        str(path),
    )
    assert len(line["problems"]) == 2


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    process = Process()
    with structlog.testing.capture_logs() as logs:
        assert not reload_file(process, tmp_path / "gone.toml")
    assert process.reload_failures == 1
    assert [line["event"] for line in logs] == ["reload_rejected"]


def test_a_bind_error_in_apply_is_refused(good: Path) -> None:
    process = Process(refuse="listener l: cannot listen on 127.0.0.1:8080: in use")
    with structlog.testing.capture_logs() as logs:
        assert not reload_file(process, good)
    assert (process.reloads, process.reload_failures) == (0, 1)
    assert logs[0]["problems"] == ["listener l: cannot listen on 127.0.0.1:8080: in use"]


def test_a_loader_bug_is_a_rejected_reload_not_a_crash(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything but ConfigError out of the loader (a bug) is logged with its traceback and
    counted as a rejected reload; the running config stays and nothing is raised."""

    def broken(path: object) -> Config:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(reloading, "load_usable_config", broken)
    process = Process()
    with structlog.testing.capture_logs() as logs:
        assert not reload_file(process, good)
    assert (process.reloads, process.reload_failures, process.applied) == (0, 1, [])
    assert [line["event"] for line in logs] == ["reload_internal_error", "reload_rejected"]
    assert logs[0]["exc_info"] is True
    assert logs[1]["problems"] == [
        f"{good}: cannot be loaded (RecursionError: maximum recursion depth exceeded)"
    ]


def test_start_only_settings_are_warned_about() -> None:
    old = DaemonConfig()
    new = attrs.evolve(old, admin=SocketAddress("127.0.0.1", 1), workers=4)
    with structlog.testing.capture_logs() as logs:
        warn_start_only(old, new, ["admin"])
        warn_start_only(old, new, ["admin", "workers"])
        warn_start_only(old, old, ["admin", "workers"])
    assert [line["event"] for line in logs] == [
        "reload_admin_unchanged",
        "reload_admin_unchanged",
        "reload_workers_unchanged",
    ]
    assert logs[2]["reason"] == "the number of workers applies at start"


def test_logging_is_reconfigured_only_when_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(reloading, "configure_logging", lambda *args: calls.append(args))
    old = DaemonConfig()
    reconfigure_logging(old, attrs.evolve(old, drain_timeout=1.0, access_log=False))
    assert calls == []
    reconfigure_logging(old, attrs.evolve(old, log_format="console"))
    reconfigure_logging(old, attrs.evolve(old, log_level="debug"))
    assert calls == [("info", "console"), ("debug", "json")]
