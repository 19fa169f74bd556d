"""structlog set-up: one JSON object per line (or console lines) on stderr, systemd style.

A log destination that fails must not take traffic down with it. stderr is written through
:class:`LogOutput`, which never raises and never blocks the event loop: a line the destination
cannot take now (a full disk: ENOSPC; a pipe or socket whose reader stopped reading: it would
block) is dropped and counted (``dropped_lines``, the metric ``l4gw_log_lines_dropped_total``).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import stat
import sys
from typing import Any, TextIO, cast

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


class LogOutput(io.TextIOBase):
    """stderr (or any descriptor) as structlog's output: one ``write`` per line, each line
    written whole or dropped, never an exception and never a blocking wait.

    Why: a blocking ``write`` to a full pipe (a stuck log shipper, journald that stopped
    reading) would stop the daemon's single event loop, every connection with it; and an
    ``OSError`` (ENOSPC on a full disk) raised from a log call would end the connection, or the
    daemon, that logged. Like HAProxy's logs (UDP) and unlike nginx's blocking writes, lines
    the destination cannot take are lost instead; they are counted.

    How, per kind of descriptor (decided once): a pipe is reopened through
    ``/proc/self/fd/N`` as a new open file description with ``O_NONBLOCK`` (so the flags of
    the descriptor shared with the parent and the workers are left alone); a socket is
    written with ``MSG_DONTWAIT``; anything else (a regular file, a terminal, /dev/null) is
    written as it is, since such writes do not wait for a reader. A line the destination took
    only in part (over ``PIPE_BUF`` bytes) has its tail sent first next time, so lines stay
    whole; while that tail cannot go, new lines are dropped.

    Resource handling: the reopened pipe or the duplicated socket is owned by this object
    and lives as long as the process (one per process, see ``_stderr_output``).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = self._given = fd
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._pending = b""
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        if stat.S_ISFIFO(mode):
            try:
                self.fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                pass  # no /proc, or no reader (ENXIO): plain writes (EPIPE is then dropped)
        elif stat.S_ISSOCK(mode):
            try:
                self._sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                pass

    def _send(self, data: bytes) -> int:
        """Bytes taken now (0 if none could be); raises ``OSError`` for a failed write."""
        try:
            if self._sock is not None:
                return self._sock.send(data, socket.MSG_DONTWAIT)
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        try:
            if self._pending:
                sent = self._send(self._pending)
                self._pending = self._pending[sent:]
                if self._pending:
                    self.dropped += 1
                    return len(text)
            sent = self._send(data)
        except OSError:  # ENOSPC, EPIPE, EIO...: the line is lost, the count says so
            self._pending = b""
            self.dropped += 1
            return len(text)
        if sent == 0:
            self.dropped += 1
        elif sent < len(data):
            self._pending = data[sent:]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        try:
            return os.isatty(self.fd)
        except OSError:
            return False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close what this object opened (the reopened pipe, the duplicated socket)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self.fd != self._given:
            os.close(self.fd)
            self.fd = self._given
        super().close()


#: The process's stderr as a :class:`LogOutput` (made on first use, kept across reloads).
_stderr_output: LogOutput | None = None


def _stderr() -> TextIO:
    global _stderr_output
    if _stderr_output is None:
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            return sys.stderr  # replaced by something without a descriptor (pytest capture)
        _stderr_output = LogOutput(fd)
    return cast(TextIO, _stderr_output)


def dropped_lines() -> int:
    """Log lines lost so far in this process because stderr could not take them."""
    return _stderr_output.dropped if _stderr_output is not None else 0


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    *,
    fields: dict[str, object] | None = None,
) -> None:
    """Route every structlog logger to ``stream`` (default: stderr, through :class:`LogOutput`)
    at ``level`` in ``fmt`` (the access log too, at any level). ``fields`` are added to every
    line from now on (None keeps the ones set before).

    Safe to call again (a reload that changes the level or format takes effect at once for
    every logger, because loggers are not cached).
    """
    if fields is not None:
        _process_fields.clear()
        _process_fields.update(fields)
    out = stream if stream is not None else _stderr()
    structlog.configure(
        processors=_processors(fmt, out),
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # One write per line (message and newline together): lines from several worker
        # processes sharing stderr never interleave, even when it is unbuffered.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
