"""structlog set-up: one JSON object per line (or console lines) on stderr, systemd style."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: Fields added to every line of this process (a worker's ``worker`` index); kept across
#: reconfigurations (a reload).
_process_fields: dict[str, object] = {}


def _add_process_fields(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key, value in _process_fields.items():
        event.setdefault(key, value)
    return event


def _processors(fmt: str, out: TextIO) -> list[structlog.typing.Processor]:
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    return [
        _add_process_fields,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]


#: Access lines (``event="connection"`` / ``"request"``). Like nginx's and HAProxy's access
#: logs they do not depend on ``log_level``: ``access_log = true`` writes them even at
#: ``log_level = "warning"``. A lazy proxy: it uses whatever processors and output are
#: configured (also after a reload), with its own INFO-level filter.
access: Any = structlog.wrap_logger(
    None, wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
)


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    *,
    fields: dict[str, object] | None = None,
) -> None:
    """Route every structlog logger to ``stream`` (stderr) at ``level`` in ``fmt`` (the access
    log too, at any level). ``fields`` are added to every line from now on (None keeps the
    ones set before).

    Safe to call again (a reload that changes the level or format takes effect at once for
    every logger, because loggers are not cached).
    """
    if fields is not None:
        _process_fields.clear()
        _process_fields.update(fields)
    out = stream if stream is not None else sys.stderr
    structlog.configure(
        processors=_processors(fmt, out),
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # One write per line (message and newline together): lines from several worker
        # processes sharing stderr never interleave, even when it is unbuffered.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
