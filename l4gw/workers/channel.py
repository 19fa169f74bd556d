"""The node-state channel of ``workers = N``: what the control plane pushes to each worker, and
both ends of the socket it goes over.

Each worker has one Unix stream socket pair to the control plane (its end passed at
``--control-fd``). The control plane sends one JSON line per change of the node set or of an
active check verdict, and the full state now and then and when a worker starts or answers
READY=1 (``l4gw.workers.control``)::

    {"upstreams": {"web": [{"address": "10.0.1.10:80", "weight": 10, "source": "static",
                            "check_up": true}, ...]}}

A worker (``control_service``) applies it before its listeners accept (waiting up to
``FIRST_SNAPSHOT_WAIT`` for the first line), then as lines come: DNS nodes through
``UpstreamRuntime.set_discovered``, ``check_up`` on each node, ``healthy = check_up and not
ejected``. When the control plane goes away (the socket reaches EOF), the worker drains and
exits.

The codec (``encode_node_states``, ``LineBuffer``, ``decode_node_states``) and
``apply_node_states`` do no I/O; ``ControlEnd`` and ``control_service`` are the two trio ends.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
import structlog
import trio

from ..core.health import nodes_changed
from ..core.netaddr import SocketAddress, parse_socket_address
from ..core.upstream import UpstreamRuntime

__all__ = [
    "FIRST_SNAPSHOT_WAIT",
    "ControlEnd",
    "LineBuffer",
    "NodeStateOwner",
    "apply_node_states",
    "control_service",
    "decode_node_states",
    "encode_node_states",
    "node_state_message",
]

log = structlog.get_logger("l4gw.workers")

#: A starting worker waits this long for the first node state before it accepts anyway.
FIRST_SNAPSHOT_WAIT = 5.0


# -- the messages (no I/O) ----------------------------------------------------------------


def node_state_message(upstreams: Mapping[str, UpstreamRuntime]) -> dict[str, Any]:
    """What the control plane pushes: every in-service node with its active check verdict."""
    return {
        "upstreams": {
            name: [
                {
                    "address": node.key,
                    "weight": node.weight,
                    "source": node.source,
                    "check_up": node.check_up,
                }
                for node in up.nodes
            ]
            for name, up in upstreams.items()
        }
    }


def encode_node_states(upstreams: Mapping[str, UpstreamRuntime]) -> bytes:
    """``node_state_message`` as one line on the wire (JSON, newline-terminated). Equal
    states encode to equal bytes, so the control plane compares lines to find changes."""
    return json.dumps(node_state_message(upstreams)).encode() + b"\n"


def decode_node_states(line: bytes) -> dict[str, Any]:
    """One line (without its newline) back into a message for ``apply_node_states``.
    Raises ``ValueError`` when it is not a JSON object."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


class LineBuffer:
    """Splits a byte stream into lines: ``feed`` what was received, then take the complete
    lines with ``next_line`` (without their newline) until it returns None."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next complete line, or None when no newline has come yet."""
        end = self._buffer.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line


def apply_node_states(upstreams: Mapping[str, UpstreamRuntime], message: Mapping[str, Any]) -> None:
    """Apply a pushed node state in a worker. Upstreams and nodes the worker does not know
    (its file was reloaded at another moment) are skipped; DNS nodes are taken only where
    the worker's own config has discovery for that upstream.

    Raises ``ValueError`` (no ``upstreams`` object), or ``KeyError``/``TypeError``/
    ``AttributeError``/``ValueError`` on an entry of the wrong shape."""
    pushed = message.get("upstreams")
    if not isinstance(pushed, dict):
        raise ValueError("no upstreams object")
    for name, entries in pushed.items():
        up = upstreams.get(name)
        if up is None:
            continue
        verdicts: dict[str, bool] = {}
        found: list[tuple[SocketAddress, int]] = []
        for entry in entries:
            verdicts[str(entry["address"])] = bool(entry["check_up"])
            if entry["source"] == "dns":
                found.append((parse_socket_address(entry["address"]), int(entry["weight"])))
        added = False
        if up.config.discovery is not None:
            current = sorted((n.address, n.weight) for n in up.nodes if n.source == "dns")
            if sorted(found) != current:
                up.set_discovered(found)
                added = True
        for node in up.nodes:
            verdict = verdicts.get(node.key)
            if verdict is not None:
                node.check_up = verdict
                node.healthy = verdict and node.ejected_until is None
        if added:
            nodes_changed(up)  # the new nodes already carry their verdict


# -- the control plane's end ---------------------------------------------------------------


@attrs.define(eq=False)
class ControlEnd:
    """The control plane's end of one worker process's socket pair.

    ``send`` queues a whole state (it replaces one not sent yet); ``serve`` writes what is
    queued until ``close`` or until the worker is gone. ``close`` closes both ends (the
    worker's, ``child``, is open here only until the worker is started)."""

    sock: trio.socket.SocketType
    #: The worker's end, open in this process only until the worker is started.
    child: socket.socket | None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    wake: trio.Event = attrs.field(factory=trio.Event)
    pending: bytes = b""

    @classmethod
    def open(cls) -> ControlEnd:
        """A new socket pair; pass ``child.fileno()`` to the worker."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(trio.socket.from_stdlib_socket(parent), child)

    def send(self, data: bytes) -> None:
        """Queue ``data`` (a whole state: it replaces one not sent yet)."""
        self.pending = data
        self.wake.set()

    def worker_started(self) -> None:
        """Close this process's copy of the worker's end: the worker sees EOF once we are
        gone."""
        if self.child is not None:
            self.child.close()
            self.child = None

    async def serve(self) -> None:
        """Write each queued state until ``close``; returns when the worker is gone (its
        slot then closes this end)."""
        with self.scope:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                data, self.pending = memoryview(self.pending), b""
                try:
                    while data:
                        sent = await self.sock.send(data)
                        data = data[sent:]
                except OSError:
                    return

    def close(self) -> None:
        self.scope.cancel()
        self.worker_started()
        self.sock.close()


# -- the worker's end ----------------------------------------------------------------------


class NodeStateOwner(Protocol):
    """What the worker's end needs from the process it runs in (a ``Daemon``)."""

    @property
    def upstreams(self) -> Mapping[str, UpstreamRuntime]: ...

    def stop(self) -> None:
        """Begin a graceful shutdown."""


async def _receive_line(sock: trio.socket.SocketType, lines: LineBuffer) -> bytes | None:
    """The next line (without its newline), or None at EOF."""
    while (line := lines.next_line()) is None:
        try:
            data = await sock.recv(1 << 16)
        except OSError:  # ECONNRESET: the other end is gone as well
            return None
        if not data:
            return None
        lines.feed(data)
    return line


def control_service(sock: socket.socket) -> Callable[..., Awaitable[None]]:
    """The worker's end of the channel on ``sock`` (which it then owns), as a ``Daemon`` extra
    service: it reports started once the first node state is applied (or after
    ``FIRST_SNAPSHOT_WAIT``), then applies every line; at EOF (the control plane is gone) it
    stops its owner gracefully. A bad line is logged and skipped."""

    async def serve_control(
        owner: NodeStateOwner, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        tsock = trio.socket.from_stdlib_socket(sock)
        lines = LineBuffer()

        def apply(line: bytes) -> None:
            try:
                apply_node_states(owner.upstreams, decode_node_states(line))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("control_message_bad", error=repr(exc))

        eof = False
        with trio.move_on_after(FIRST_SNAPSHOT_WAIT) as first:
            line = await _receive_line(tsock, lines)
            if line is None:
                eof = True
            else:
                apply(line)
        if first.cancelled_caught:
            log.warning("control_state_late", waited=FIRST_SNAPSHOT_WAIT)
        task_status.started()
        while not eof:
            line = await _receive_line(tsock, lines)
            if line is None:
                break
            apply(line)
        log.warning("control_channel_closed", reason="the control plane is gone; stopping")
        owner.stop()

    return serve_control
