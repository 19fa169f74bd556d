"""The L4 data path on real loopback TCP pairs (splice and copy, driven by the reactor) and on
in-memory streams."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from l4gw.l4 import relay as relay_mod
from l4gw.l4.deadlines import Deadlines
from l4gw.l4.reactor import Reactor
from l4gw.l4.relay import IdleSweeper, PipePool, Relay, SocketRelay, StreamRelay

from .conftest import sock_read_to_eof, sock_send_all, tcp_pair, wait_until


class Setup:
    """client <-> [proxy_client | relay | proxy_node] <-> node, all real TCP."""

    def __init__(self) -> None:
        self.client, self.proxy_client = tcp_pair()
        self.proxy_node, self.node = tcp_pair()
        self.finished: list[Relay] = []
        self.pool = PipePool()
        self.reactor = Reactor()

    def relay(self, idle: float = 3600.0) -> SocketRelay:
        """A relay between the two proxy-side sockets, registered with the reactor."""
        relay = SocketRelay(
            self.reactor,
            self.proxy_client,
            self.proxy_node,
            idle,
            self.finished.append,
            pipes=self.pool,
        )
        relay.start()
        return relay

    def close(self) -> None:
        for sock in (self.client, self.node, self.proxy_client, self.proxy_node):
            sock.close()
        self.reactor.close()
        self.pool.close()


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    """The sockets plus a running reactor (cancelled, which aborts what is left, at the end)."""
    s = Setup()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.reactor.run)
        yield s
        nursery.cancel_scope.cancel()
    s.close()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy-only"])
@pytest.mark.parametrize("size", [1, 1000, 64 * 1024, 3 * 1024 * 1024 + 7])
async def test_bytes_both_ways_and_half_close(
    setup: Setup, size: int, splice: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sizes below and above the shared buffer (copy mode, then splice mode); without splice
    (``HAVE_SPLICE`` false) everything stays in copy mode."""
    if not splice:
        monkeypatch.setattr(relay_mod, "HAVE_SPLICE", False)
    up = os.urandom(size)
    down = os.urandom(size // 2 + 1)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            relay = setup.relay()

            async def client_side() -> bytes:
                await sock_send_all(setup.client, up)
                setup.client.shutdown(socket.SHUT_WR)  # half-close: reply must still arrive
                return await sock_read_to_eof(setup.client)

            async def node_side() -> bytes:
                got = await sock_read_to_eof(setup.node)
                await sock_send_all(setup.node, down)
                setup.node.shutdown(socket.SHUT_WR)
                return got

            results: dict[str, bytes] = {}

            async def run(name: str, fn: object) -> None:
                results[name] = await fn()  # type: ignore[operator]

            nursery.start_soon(run, "client", client_side)
            nursery.start_soon(run, "node", node_side)
        await wait_until(lambda: setup.finished)
    assert results["node"] == up
    assert results["client"] == down
    assert setup.finished == [relay]
    assert relay.bytes_in == len(up)
    assert relay.bytes_out == len(down)
    assert relay.reason == ""
    assert setup.proxy_client.fileno() == -1 and setup.proxy_node.fileno() == -1
    if size < relay_mod.SMALL_READ or not splice:
        assert not relay.up.splice and not relay.down.splice
    elif size > 1 << 20:  # a bulk flow fills the shared buffer at some point
        assert relay.up.splice and relay.down.splice
    assert not setup.reactor.handlers
    if not splice:
        assert setup.pool.pipes_open == 0


async def test_reset_on_one_side_closes_the_other(setup: Setup) -> None:
    with trio.fail_after(10):
        relay = setup.relay()
        await sock_send_all(setup.client, b"hello")
        assert await _recv_some(setup.node) == b"hello"
        # The node resets its connection.
        setup.node.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        setup.node.close()
        with pytest.raises(ConnectionResetError):
            await sock_read_to_eof(setup.client)
    assert setup.finished == [relay]
    assert "ECONNRESET" in relay.reason


async def _recv_some(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def test_idle_timeout_closes_both_sides(setup: Setup) -> None:
    deadlines = Deadlines()
    sweeper = IdleSweeper(deadlines)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = setup.relay(idle=0.3)
            sweeper.add(relay)
            nursery.start_soon(deadlines.run)
            await sock_send_all(setup.client, b"x")
            assert await _recv_some(setup.node) == b"x"
            assert await sock_read_to_eof(setup.client) == b""
            nursery.cancel_scope.cancel()
    assert relay.reason == "idle timeout"
    assert sweeper.closed_idle == 1
    assert setup.finished == [relay]


def test_sweeper_exact_times() -> None:
    """Pure: a relay idle for exactly its timeout is aborted; activity resets the clock."""

    class FakeRelay:
        def __init__(self) -> None:
            self.bytes_in = self.bytes_out = 0
            self.idle_timeout = 10.0
            self.idle_since = 0.0
            self.idle_checked_total = 0
            self.closed = False
            self.aborted: list[str] = []
            self.listener = "l"
            self.node_state: object = None
            self.drain_deadline: float | None = None

        def abort(self, reason: str, *, reset: bool = False) -> None:
            self.closed = True
            self.aborted.append(reason)

    sweeper = IdleSweeper(Deadlines())
    fake = FakeRelay()
    sweeper.relays.add(fake)  # type: ignore[arg-type]
    sweeper.sweep(9.9)
    assert not fake.aborted
    fake.bytes_in = 5
    sweeper.sweep(9.95)  # activity seen: idle clock restarts at 9.95
    sweeper.sweep(19.9)
    assert not fake.aborted
    sweeper.sweep(19.95)
    assert fake.aborted == ["idle timeout"]

    # Drain deadlines (a reload removed the node or listener): exact, and undone when the
    # node or listener comes back before the deadline.
    busy, back = FakeRelay(), FakeRelay()
    for relay in (busy, back):
        sweeper.relays.add(relay)  # type: ignore[arg-type]
    assert sweeper.drain_removed(lambda relay: True, deadline=30.0) == 3
    assert sweeper.drain_removed(lambda relay: relay is busy, deadline=99.0) == 1
    assert (busy.drain_deadline, back.drain_deadline) == (30.0, None)  # first deadline kept
    busy.bytes_in = back.bytes_in = 1  # activity does not postpone a drain deadline
    sweeper.sweep(29.99)
    assert not busy.aborted
    sweeper.sweep(30.0)
    assert busy.aborted == ["drained after reload"]
    assert not back.aborted
    assert sweeper.closed_drained == 1


async def test_stream_relay_copy_loop_half_close() -> None:
    """The copy-loop path on in-memory streams (as for TLS), including half-close."""
    client_outer, client_inner = trio.testing.memory_stream_pair()
    node_inner, node_outer = trio.testing.memory_stream_pair()
    finished: list[Relay] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = StreamRelay(client_inner, node_inner, 3600, finished.append)
            nursery.start_soon(relay.run, nursery)
            await client_outer.send_all(b"request")
            await client_outer.send_eof()
            got = b""
            while chunk := await node_outer.receive_some():
                got += chunk
            assert got == b"request"
            await node_outer.send_all(b"reply")
            await node_outer.send_eof()
            reply = b""
            while chunk := await client_outer.receive_some():
                reply += chunk
            assert reply == b"reply"
    assert finished == [relay]
    assert (relay.bytes_in, relay.bytes_out) == (7, 5)


async def test_stream_relay_abort_closes_both() -> None:
    client_outer, client_inner = trio.testing.memory_stream_pair()
    node_inner, _node_outer = trio.testing.memory_stream_pair()
    finished: list[Relay] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = StreamRelay(client_inner, node_inner, 3600, finished.append)
            nursery.start_soon(relay.run, nursery)
            await trio.testing.wait_all_tasks_blocked()
            relay.abort("test")
    assert finished == [relay]
    assert await client_outer.receive_some() == b""


def test_pipe_pool_reuses_and_bounds() -> None:
    pool = PipePool(max_free=2)
    pipes = [pool.acquire() for _ in range(4)]
    assert pool.pipes_open == 4
    for pipe in pipes:
        pool.release(pipe)
    assert pool.pipes_open == 2  # two kept, two closed
    again = pool.acquire()
    assert again in pipes[:2]
    pool.release(again)
    pool.close()
    assert pool.pipes_open == 0


def test_pipe_pool_grow_falls_back_on_eperm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over fs.pipe-user-pages-soft an unprivileged user gets EPERM: pipes stay small."""
    pool = PipePool()
    pipe = pool.acquire()
    small = pipe.size
    real_fcntl = fcntl.fcntl  # the module l4gw.relay calls

    def denying_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == relay_mod._F_SETPIPE_SZ:
            raise OSError(errno.EPERM, "Operation not permitted")
        return int(real_fcntl(fd, cmd, arg))

    monkeypatch.setattr(fcntl, "fcntl", denying_fcntl)
    pool.grow(pipe)
    assert pipe.size == small
    assert pool._grow_denied == pool.grow_backoff
    monkeypatch.setattr(fcntl, "fcntl", real_fcntl)
    pool.grow(pipe)  # still backing off: no attempt
    assert pipe.size == small
    pool._grow_denied = 0
    pool.grow(pipe)
    assert pipe.size >= pool.big_size
    pool.release(pipe)
    pool.close()


async def test_bulk_flow_switches_to_splice(setup: Setup) -> None:
    """A read that fills the shared buffer moves the direction to splice (pipes get used)."""
    data = os.urandom(4 * relay_mod.SMALL_READ)
    setup.client.setblocking(True)
    setup.client.sendall(data[: relay_mod.SMALL_READ * 2])  # queued before the relay runs
    setup.client.setblocking(False)
    with trio.fail_after(10):
        relay = setup.relay()
        await sock_send_all(setup.client, data[relay_mod.SMALL_READ * 2 :])
        setup.client.shutdown(socket.SHUT_WR)
        got = await sock_read_to_eof(setup.node)
        setup.node.shutdown(socket.SHUT_WR)
        assert await sock_read_to_eof(setup.client) == b""
    assert got == data
    assert relay.up.splice and not relay.down.splice
    assert setup.pool.pipes_open >= 1


async def test_bulk_flow_copies_when_no_pipe_can_be_had(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors for a splice pipe (EMFILE), a bulk flow goes on by copying: the
    connection is not failed."""

    def no_pipe() -> relay_mod.Pipe:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(setup.pool, "acquire", no_pipe)
    data = os.urandom(8 * relay_mod.SMALL_READ + 5)
    with trio.fail_after(10):
        setup.relay()

        async def client_side() -> None:
            await sock_send_all(setup.client, data)
            setup.client.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            got = await sock_read_to_eof(setup.node)
        setup.node.shutdown(socket.SHUT_WR)
        assert await sock_read_to_eof(setup.client) == b""
    assert got == data
    assert setup.finished
    assert setup.pool.pipes_open == 0
