"""One reload procedure for every process that reads the config file: a single daemon, each
worker of ``workers = N`` and the control plane.

``reload_file`` loads and checks the file, lets the process apply it (a daemon binds its new
listeners there), counts and logs the outcome; ``warn_start_only`` and ``reconfigure_logging``
are the steps about ``[daemon]`` that every process takes in its ``apply``. No trio, no sockets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import structlog

from ..core.config import Config, ConfigError, DaemonConfig
from ..core.config.files import load_usable_config
from ..core.errors import BindError
from ..core.logs import configure_logging

__all__ = ["START_ONLY", "Reloadable", "reconfigure_logging", "reload_file", "warn_start_only"]

log = structlog.get_logger("l4gw.reload")

#: ``[daemon]`` settings a reload cannot change: setting -> (log event, reason).
START_ONLY = {
    "admin": ("reload_admin_unchanged", "the admin address applies at start"),
    "workers": ("reload_workers_unchanged", "the number of workers applies at start"),
}


class Reloadable(Protocol):
    """A process whose config a reload replaces."""

    reloads: int
    reload_failures: int

    def apply(self, new: Config) -> None:
        """Make ``new`` the running config. Raises ``BindError`` leaving the old one in force."""


def reload_file(
    target: Reloadable,
    path: str | os.PathLike[str],
    *,
    fields: Mapping[str, object] = {},
    summary: Callable[[Config], Mapping[str, object]] = lambda new: {},
) -> bool:
    """Load ``path``, check it (``load_usable_config``) and ``target.apply`` it; True when the
    new config is in force.

    A file that does not load or check, or an apply that raises ``BindError``, counts in
    ``target.reload_failures`` and is logged (``reload_rejected`` with every problem); the
    running config stays. Success counts in ``target.reloads`` and logs ``reloaded`` with
    ``fields`` (on both lines) and ``summary(new)``. Raises nothing else of its own.

    A file whose loading fails in a way it should not (a loader bug: anything but
    ``ConfigError``) is a rejected reload too, logged with its traceback: a file must never
    stop the daemon."""
    try:
        new = load_usable_config(path)
    except ConfigError as exc:
        return _rejected(target, path, fields, exc.problems)
    except Exception as exc:
        log.exception("reload_internal_error", **fields, file=str(path))
        return _rejected(
            target, path, fields, [f"{path}: cannot be loaded ({type(exc).__name__}: {exc})"]
        )
    try:
        target.apply(new)
    except BindError as exc:
        return _rejected(target, path, fields, [str(exc)])
    target.reloads += 1
    log.info("reloaded", **fields, file=str(path), **summary(new))
    return True


def _rejected(
    target: Reloadable,
    path: str | os.PathLike[str],
    fields: Mapping[str, object],
    problems: Sequence[str],
) -> bool:
    target.reload_failures += 1
    log.error("reload_rejected", **fields, file=str(path), problems=list(problems))
    return False


def warn_start_only(old: DaemonConfig, new: DaemonConfig, settings: Iterable[str]) -> None:
    """Log a warning for each of ``settings`` (keys of ``START_ONLY``) that ``new`` changes:
    the process keeps the old value until it restarts."""
    for setting in settings:
        if getattr(new, setting) != getattr(old, setting):
            event, reason = START_ONLY[setting]
            log.warning(event, reason=reason)


def reconfigure_logging(old: DaemonConfig, new: DaemonConfig) -> None:
    """Apply a changed ``log_level`` or ``log_format`` at once."""
    if (new.log_level, new.log_format) != (old.log_level, old.log_format):
        configure_logging(new.log_level, new.log_format)
