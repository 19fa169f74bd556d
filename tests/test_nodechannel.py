"""The node-state channel (l4gw.nodechannel): the codec with no I/O, and its two trio ends
over a real socket pair."""

from __future__ import annotations

import socket
import tomllib
from typing import Any

import pytest
import structlog
import trio
from hypothesis import given
from hypothesis import strategies as st

from l4gw.core.acl import BackendAuthorization
from l4gw.core.config import parse_config
from l4gw.core.netaddr import SocketAddress
from l4gw.core.upstream import UpstreamRuntime
from l4gw.workers.channel import (
    ControlEnd,
    LineBuffer,
    apply_node_states,
    control_service,
    decode_node_states,
    encode_node_states,
    node_state_message,
)

UPSTREAM_TOML = """
[upstreams.web]
nodes = [{ address = "10.0.0.1:80", weight = 5 }, { address = "10.0.0.2:80", weight = 1 }]
[upstreams.web.discovery]
name = "web.internal"
port = 80

[upstreams.api]
nodes = [{ address = "10.0.1.1:81" }]

[[listeners]]
name = "l"
listen = "127.0.0.1:8080"
upstream = "web"
"""


def runtimes() -> dict[str, UpstreamRuntime]:
    config = parse_config(tomllib.loads(UPSTREAM_TOML))
    auth = BackendAuthorization(config.authorize)
    return {name: UpstreamRuntime(up, auth) for name, up in config.upstreams.items()}


def states(upstreams: dict[str, UpstreamRuntime]) -> dict[str, dict[str, tuple[Any, ...]]]:
    return {
        name: {n.key: (n.weight, n.source, n.check_up, n.healthy) for n in up.nodes}
        for name, up in upstreams.items()
    }


discovered = st.dictionaries(
    st.integers(3, 254).map(lambda i: SocketAddress(f"10.0.2.{i}", 80)),
    st.integers(1, 100),
    max_size=6,
)


@st.composite
def control_states(draw: st.DrawFn) -> dict[str, UpstreamRuntime]:
    """A control plane's upstreams: some DNS nodes, and any check verdicts."""
    control = runtimes()
    control["web"].set_discovered(list(draw(discovered).items()))
    for up in control.values():
        for node in up.nodes:
            node.check_up = draw(st.booleans())
            node.healthy = node.check_up
    return control


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(control_states(), min_size=1, max_size=4), st.lists(st.integers(0, 10_000)))
def test_states_survive_the_wire_in_any_chunking(
    pushes: list[dict[str, UpstreamRuntime]], cuts: list[int]
) -> None:
    wire = b"".join(encode_node_states(control) for control in pushes)
    lines = LineBuffer()
    received: list[bytes] = []
    for chunk in chunked(wire, cuts):
        lines.feed(chunk)
        while (line := lines.next_line()) is not None:
            received.append(line)
    assert lines.next_line() is None
    assert [decode_node_states(line) for line in received] == [
        node_state_message(control) for control in pushes
    ]
    worker = runtimes()
    for control, line in zip(pushes, received, strict=True):
        apply_node_states(worker, decode_node_states(line))
        assert states(worker) == states(control)


def test_equal_states_encode_to_equal_lines() -> None:
    a, b = runtimes(), runtimes()
    assert encode_node_states(a) == encode_node_states(b)
    b["api"].nodes[0].check_up = False
    assert encode_node_states(a) != encode_node_states(b)
    assert encode_node_states(a).count(b"\n") == 1


@pytest.mark.parametrize("line", [b"[1, 2]", b"not json", b'"text"'])
def test_a_line_that_is_no_object_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode_node_states(line)


def test_a_partial_line_waits_for_its_newline() -> None:
    lines = LineBuffer()
    lines.feed(b'{"upstreams": ')
    assert lines.next_line() is None
    lines.feed(b"{}}\n{")
    assert lines.next_line() == b'{"upstreams": {}}'
    assert lines.next_line() is None


class Owner:
    """A ``NodeStateOwner``: upstreams of a worker, and whether it was told to stop."""

    def __init__(self) -> None:
        self.upstreams = runtimes()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def set_check(up: UpstreamRuntime, index: int, verdict: bool) -> None:
    up.nodes[index].check_up = up.nodes[index].healthy = verdict


async def test_control_end_to_worker_end_over_a_socket_pair() -> None:
    control = runtimes()
    control["web"].set_discovered([(SocketAddress("10.0.2.7", 80), 3)])
    set_check(control["web"], 0, False)
    owner = Owner()
    end = ControlEnd.open()
    assert end.child is not None
    worker_sock = end.child.dup()
    end.worker_started()
    with worker_sock, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(end.serve)
            end.send(b"garbage\n")  # replaced before it was sent
            end.send(encode_node_states(control))
            # started once the first state is applied (before the worker's listeners accept)
            await nursery.start(control_service(worker_sock), owner)
            assert states(owner.upstreams) == states(control)
            set_check(control["web"], 1, False)
            end.send(encode_node_states(control))
            while owner.upstreams["web"].nodes[1].check_up:
                await trio.sleep(0.01)
            assert states(owner.upstreams) == states(control)
            assert not owner.stopped
            end.close()  # the control plane is gone: the worker's end stops its owner
    assert owner.stopped


async def test_a_bad_line_is_logged_and_skipped() -> None:
    owner = Owner()
    control = runtimes()
    set_check(control["api"], 0, False)
    parent, child = socket.socketpair()
    with parent, child, structlog.testing.capture_logs() as logs, trio.fail_after(5):
        parent.sendall(b'{"nope": 1}\n' + encode_node_states(control))
        async with trio.open_nursery() as nursery:
            await nursery.start(control_service(child), owner)
            parent.shutdown(socket.SHUT_WR)
    assert [e["event"] for e in logs] == ["control_message_bad", "control_channel_closed"]
    assert owner.stopped
    assert not owner.upstreams["api"].nodes[0].check_up
