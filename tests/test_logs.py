"""Logging set-up: whole lines in one write, access lines independent of log_level."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
from collections.abc import Iterator

import pytest
import structlog

from l4gw.core import logs


class RecordingStream(io.StringIO):
    """Remembers every ``write`` call, as the kernel would see them on unbuffered stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[RecordingStream]:
    out = RecordingStream()
    yield out
    structlog.reset_defaults()


def test_each_line_is_one_write(stream: RecordingStream) -> None:
    """Worker processes share stderr: a line split over two writes could interleave with
    another process's line and break JSON-lines parsing."""
    logs.configure_logging("info", "json", stream)
    structlog.get_logger("t").info("started", listeners=2)
    logs.access.info("connection", bytes_in=1)
    assert len(stream.writes) == 2
    for written in stream.writes:
        assert written.endswith("\n") and written.count("\n") == 1
        json.loads(written)


def test_access_lines_do_not_depend_on_log_level(stream: RecordingStream) -> None:
    logs.configure_logging("warning", "json", stream)
    structlog.get_logger("t").info("filtered")
    logs.access.info("connection", outcome="proxied")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["connection"]


def test_process_fields_on_every_line_and_kept_on_reload(stream: RecordingStream) -> None:
    """A worker's lines carry its index, also after a reload reconfigures logging."""
    logs.configure_logging("info", "json", stream, fields={"worker": 1})
    structlog.get_logger("t").info("started")
    logs.configure_logging("debug", "json", stream)  # a reload: fields not given, kept
    logs.access.info("connection", worker="explicit wins")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["worker"] == 1
    assert second["worker"] == "explicit wins"
    logs.configure_logging("info", "json", stream, fields={})


# -- a failing log destination (LogOutput) ----------------------------------------------------


@contextlib.contextmanager
def fails_after(seconds: float) -> Iterator[None]:
    """A blocking write that should not block fails the test instead of hanging it."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError("blocked in a write")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_full_disk_drops_lines_and_counts_them() -> None:
    """/dev/full: every write fails with ENOSPC; nothing raises, each line is counted."""
    with open("/dev/full", "wb") as full:
        out = logs.LogOutput(full.fileno())
        for _ in range(3):
            assert out.write('{"event": "x"}\n') == 15
        assert out.dropped == 3
        out.close()


def test_a_pipe_nobody_reads_never_blocks_and_keeps_lines_whole() -> None:
    """The reader stopped: lines that fit are written whole, the rest are dropped and counted,
    and the descriptor shared with other processes keeps its blocking mode."""
    r, w = os.pipe()
    try:
        out = logs.LogOutput(w)
        line = json.dumps({"event": "request", "pad": "x" * 200}) + "\n"
        with fails_after(5):
            for _ in range(2000):  # ~420 KB into a 64 KiB pipe
                out.write(line)
        assert out.dropped > 0
        assert os.get_blocking(w)
        os.set_blocking(r, False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 1 << 16):
                data += chunk
        written = data.decode().splitlines(keepends=True)
        assert set(written) == {line}
        assert len(written) + out.dropped == 2000
        # Once the reader catches up, lines flow again.
        out.write(line)
        assert os.read(r, 1 << 16) == line.encode()
        out.close()
    finally:
        os.close(r)
        os.close(w)


def test_a_line_taken_in_part_is_finished_before_the_next() -> None:
    """A line over ``PIPE_BUF`` may be taken in part when the pipe is nearly full; its tail
    goes first next time, so the reader sees whole lines in order, never two mixed."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        out = logs.LogOutput(w)
        lines = [f"{i:04d}" + "x" * (9000 if i % 3 else 50) + "\n" for i in range(400)]
        data = b""
        partial = 0
        with fails_after(5):
            for i, line in enumerate(lines):
                out.write(line)
                partial += bool(out._pending)
                if i % 7 == 0:  # a slow reader
                    with contextlib.suppress(BlockingIOError):
                        data += os.read(r, 20000)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 1 << 16):
                data += chunk
        out.write("end\n")  # sends a pending tail first, if any
        data += os.read(r, 1 << 16)
        out.close()
        seen = data.decode().splitlines(keepends=True)
        assert seen[-1] == "end\n"
        assert partial > 0  # the case under test happened
        assert out.dropped > 0
        assert len(seen) - 1 + out.dropped == len(lines)
        positions = [lines.index(line) for line in seen[:-1]]  # each one whole ...
        assert positions == sorted(positions)  # ... and in order
    finally:
        os.close(r)
        os.close(w)


def test_a_socket_nobody_reads_never_blocks() -> None:
    """journald's stdout stream is a socket: full, it drops lines instead of waiting."""
    a, b = socket.socketpair()
    with a, b:
        out = logs.LogOutput(a.fileno())
        with fails_after(5):
            for _ in range(20000):
                out.write("x" * 100 + "\n")
        assert out.dropped > 0
        assert a.getblocking()
        out.close()
