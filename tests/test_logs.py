"""Logging set-up: whole lines in one write, access lines independent of log_level."""

from __future__ import annotations

import io
import json
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
