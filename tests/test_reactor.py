"""The reactor and its relay state machine on real loopback TCP: backpressure, fairness, many
connections, descriptor reuse, shutdown, and connecting nodes without a task."""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio

from l4gw.core.acl import BackendAuthorization
from l4gw.core.config import AuthorizeRule, NodeConfig, UpstreamConfig
from l4gw.core.errors import NoHealthyNode, UpstreamConnectError
from l4gw.core.netaddr import SocketAddress, parse_network
from l4gw.core.nodes import NodeState
from l4gw.core.upstream import NodeLease
from l4gw.core.upstream import UpstreamRuntime as Upstream
from l4gw.l4 import relay as relay_mod
from l4gw.l4.connect import NodeConnector
from l4gw.l4.reactor import Reactor, ReactorStopped
from l4gw.l4.relay import PipePool, Relay, SocketRelay

from .conftest import free_port, sock_read_to_eof, sock_send_all, tcp_pair, wait_until


class Conn:
    """client <-> [relay] <-> node; the outer ends are owned (and closed) by the test."""

    def __init__(
        self, reactor: Reactor, pipes: PipePool, finished: list[Relay], idle: float = 3600.0
    ) -> None:
        self.client, proxy_client = tcp_pair()
        proxy_node, self.node = tcp_pair()
        self.relay = SocketRelay(
            reactor, proxy_client, proxy_node, idle, finished.append, pipes=pipes
        )
        self.relay.start()

    def close(self) -> None:
        self.client.close()
        self.node.close()


class Env:
    def __init__(self) -> None:
        self.pool = PipePool()
        self.reactor = Reactor()
        self.finished: list[Relay] = []
        self.conns: list[Conn] = []

    def conn(self) -> Conn:
        c = Conn(self.reactor, self.pool, self.finished)
        self.conns.append(c)
        return c


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(e.reactor.run)
        yield e
        nursery.cancel_scope.cancel()
    for c in e.conns:
        c.close()
    e.pool.close()


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        try:
            data = sock.recv(size - len(out))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not data:
            break
        out += data
    return bytes(out)


def pending_bytes(flow: relay_mod._Flow) -> int:
    """What the proxy holds for one direction, and that holding's bound."""
    if flow.pipe is not None:
        assert flow.left <= flow.pipe.size
        return flow.left
    if flow.pending is not None:
        assert len(flow.pending) <= relay_mod.SMALL_READ
        return len(flow.pending)
    return 0


# -- backpressure ---------------------------------------------------------------------------


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy-only"])
async def test_backpressure_stops_reading_the_client(
    env: Env, splice: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that does not read: the proxy stops reading the client once the node's buffers
    are full, and holds at most one buffer (copy) or one pipe (splice) for that direction."""
    if not splice:
        monkeypatch.setattr(relay_mod, "HAVE_SPLICE", False)
    c = env.conn()
    relay = c.relay
    chunk = os.urandom(256 * 1024)
    sent = bytearray()
    with trio.fail_after(20):
        # Write until the client's own send buffer stays full for a while.
        stuck = 0.0
        while stuck < 0.3:
            try:
                n = c.client.send(chunk)
            except BlockingIOError:
                await trio.sleep(0.02)
                stuck += 0.02
                pending_bytes(relay.up)
                continue
            sent += chunk[:n]
            stuck = 0.0
            pending_bytes(relay.up)
            await trio.lowlevel.checkpoint()
        assert relay.up.blocked
        assert not relay.cmask & select.EPOLLIN  # the client is not read any more
        assert relay.nmask & select.EPOLLOUT
        assert relay.up.splice == splice
        held = pending_bytes(relay.up)
        assert 0 < held <= (relay.up.pipe.size if splice and relay.up.pipe else 65536)
        before = relay.bytes_in
        await trio.sleep(0.2)
        assert relay.bytes_in == before  # nothing more read while the node is stuck
        assert env.pool.pipes_open <= 1
        # The node starts reading: everything arrives, in order, and reading resumes.
        c.client.shutdown(socket.SHUT_WR)
        got = await sock_read_to_eof(c.node)
    assert got == bytes(sent)
    assert relay.bytes_in == len(sent)
    assert not relay.up.blocked and relay.up.done


async def test_backpressure_towards_the_client(env: Env) -> None:
    """The same the other way: a client that does not read stops the proxy reading the node."""
    c = env.conn()
    relay = c.relay
    chunk = os.urandom(256 * 1024)
    total = 0
    with trio.fail_after(20):
        stuck = 0.0
        while stuck < 0.3:
            try:
                total += c.node.send(chunk)
                stuck = 0.0
            except BlockingIOError:
                await trio.sleep(0.02)
                stuck += 0.02
            pending_bytes(relay.down)
            await trio.lowlevel.checkpoint()
        assert relay.down.blocked and not relay.nmask & select.EPOLLIN
        assert relay.cmask & select.EPOLLOUT
        c.node.shutdown(socket.SHUT_WR)
        got = await sock_read_to_eof(c.client)
    assert len(got) == total == relay.bytes_out


# -- fairness -------------------------------------------------------------------------------


async def test_bulk_flow_does_not_starve_small_requests(env: Env) -> None:
    """While one connection moves bulk data as fast as it can (peers in threads, so the
    reactor's trio loop does only the proxying), request/response round trips on another
    connection of the same reactor keep completing quickly."""
    bulk = env.conn()
    small = env.conn()
    for sock in (bulk.client, bulk.node):
        sock.setblocking(True)
    stop = threading.Event()
    moved = [0]

    def bulk_sender() -> None:
        block = os.urandom(1 << 20)
        try:
            while not stop.is_set():
                bulk.client.sendall(block)
        except OSError:
            pass
        finally:
            try:
                bulk.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def bulk_receiver() -> None:
        while data := bulk.node.recv(1 << 20):
            moved[0] += len(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, bulk_sender)
        nursery.start_soon(trio.to_thread.run_sync, bulk_receiver)
        try:
            await wait_until(lambda: moved[0] > 8 << 20)
            assert bulk.relay.up.splice
            started = trio.current_time()
            worst = 0.0
            for i in range(50):
                t0 = trio.current_time()
                request = b"ping %d\n" % i
                with trio.fail_after(2):
                    await sock_send_all(small.client, request)
                    assert await recv_exactly(small.node, len(request)) == request
                    await sock_send_all(small.node, b"pong\n")
                    assert await recv_exactly(small.client, 5) == b"pong\n"
                worst = max(worst, trio.current_time() - t0)
            elapsed = trio.current_time() - started
            still_moving = moved[0]
        finally:
            stop.set()  # the threads cannot be cancelled: always let them end
    assert worst < 0.5, worst
    assert elapsed < 5, elapsed
    assert still_moving > 8 << 20


# -- many connections, descriptor reuse -----------------------------------------------------


async def test_many_connections_no_crossed_data(env: Env) -> None:
    conns = [env.conn() for _ in range(200)]
    with trio.fail_after(20):
        for i, c in enumerate(conns):
            await sock_send_all(c.client, b"req-%04d" % i)
        for i, c in enumerate(conns):
            assert await recv_exactly(c.node, 8) == b"req-%04d" % i
            await sock_send_all(c.node, b"rsp-%04d" % i)
        for i, c in enumerate(conns):
            assert await recv_exactly(c.client, 8) == b"rsp-%04d" % i
        for c in conns:
            c.client.shutdown(socket.SHUT_WR)
            c.node.shutdown(socket.SHUT_WR)
        await wait_until(lambda: len(env.finished) == 200)
    assert env.reactor.active == 0 and not env.reactor.handlers


async def test_fd_reuse_after_close_no_crossed_data(env: Env) -> None:
    """Descriptors of closed relays are reused by the next connections: their data must only
    ever reach their own peers."""
    with trio.fail_after(20):
        for round_ in range(5):
            old = [env.conn() for _ in range(10)]
            old_fds = {fd for c in old for fd in (c.relay.cfd, c.relay.nfd)}
            for c in old[:5]:
                c.relay.abort("test")
            for c in old[5:]:
                c.client.close()
                c.node.close()
            await wait_until(lambda old=old: all(c.relay.closed for c in old))  # type: ignore[misc]
            new = [env.conn() for _ in range(10)]
            new_fds = {fd for c in new for fd in (c.relay.cfd, c.relay.nfd)}
            assert old_fds & new_fds  # the numbers really were reused
            for i, c in enumerate(new):
                await sock_send_all(c.client, b"r%d-%03d" % (round_, i))
            for i, c in enumerate(new):
                assert await recv_exactly(c.node, 6) == b"r%d-%03d" % (round_, i)
                await sock_send_all(c.node, b"a%d-%03d" % (round_, i))
                assert await recv_exactly(c.client, 6) == b"a%d-%03d" % (round_, i)
            for c in new:
                c.relay.abort("done")


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []

    def on_event(self, fd: int, mask: int) -> None:
        self.events.append((fd, mask))

    def abort(self, reason: str, *, reset: bool = False) -> None:
        pass


async def test_stale_events_of_a_closed_fd_are_not_delivered_to_its_successor(
    env: Env,
) -> None:
    """In one batch: a handler closes relay B; a new socket reuses B's descriptor numbers. The
    events already collected for B's old sockets must not reach the new owner."""
    reactor = env.reactor
    trigger_a, trigger_b = socket.socketpair()
    b = env.conn()
    recorder = _Recorder()
    reused: list[socket.socket] = []

    class Closer:
        def on_event(self, fd: int, mask: int) -> None:
            old = {b.relay.cfd, b.relay.nfd}
            b.relay.abort("closed by another handler")
            trigger_a.recv(16)
            reactor.forget(fd, select.EPOLLIN)
            # New sockets with no data at all: any event they get is a stale one.
            while len(reused) < 8 and not old <= {s.fileno() for s in reused}:
                pair = socket.socketpair()
                reused.extend(pair)
            for s in reused:
                if s.fileno() in old:
                    reactor.handlers[s.fileno()] = recorder
                    reactor.epoll.register(s.fileno(), select.EPOLLIN)

        def abort(self, reason: str, *, reset: bool = False) -> None:
            pass

    reactor.handlers[trigger_a.fileno()] = Closer()
    reactor.epoll.register(trigger_a.fileno(), select.EPOLLIN)
    # Ready in this order, before the reactor polls: the trigger, then both of B's sockets.
    trigger_b.send(b"x")
    b.client.send(b"to node")
    b.node.send(b"to client")
    with trio.fail_after(5):
        await wait_until(lambda: b.relay.closed)
        await trio.sleep(0.05)
    assert {s.fileno() for s in reused} >= {b.relay.cfd, b.relay.nfd}
    assert recorder.events == []
    for s in reused:
        reactor.forget(s.fileno(), select.EPOLLIN)
        s.close()
    trigger_a.close()
    trigger_b.close()


# -- shutdown -------------------------------------------------------------------------------


class _Owner:
    """A handler owning some sockets: ``abort`` closes them and leaves the reactor (as every
    handler does); ``then`` runs inside its abort (e.g. registers someone else)."""

    def __init__(self, reactor: Reactor, socks: list[socket.socket], mask: int) -> None:
        self.reactor = reactor
        self.socks = socks
        self.mask = mask
        self.aborts: list[str] = []
        self.then: Callable[[], None] | None = None
        for sock in socks:
            reactor.register(sock.fileno(), mask, self)

    def on_event(self, fd: int, mask: int) -> None:
        pass

    def abort(self, reason: str, *, reset: bool = False) -> None:
        self.aborts.append(reason)
        for sock in self.socks:
            self.reactor.forget(sock.fileno(), self.mask)
            sock.close()
        if self.then is not None:
            self.then()


class _Broken(_Owner):
    def abort(self, reason: str, *, reset: bool = False) -> None:
        self.aborts.append(reason)
        raise RuntimeError("bug in a handler")


def test_close_all_aborts_every_registered_handler_once() -> None:
    """Whatever they are: one with two descriptors (aborted once), one with no epoll
    interest (an idle descriptor parked in the table), one registered by another's abort,
    and one whose abort fails (logged; the others are still closed)."""
    reactor = Reactor()
    pairs = [socket.socketpair() for _ in range(5)]
    peers = [b for _, b in pairs]
    two = _Owner(reactor, [pairs[0][0], pairs[1][0]], select.EPOLLIN)
    parked = _Owner(reactor, [pairs[2][0]], 0)
    broken = _Broken(reactor, [pairs[3][0]], select.EPOLLIN)
    late: list[_Owner] = []
    two.then = lambda: late.append(_Owner(reactor, [pairs[4][0]], select.EPOLLIN))
    assert reactor.active == 3
    reactor.close_all()
    assert two.aborts == parked.aborts == broken.aborts == ["shutdown"]
    assert [owner.aborts for owner in late] == [["shutdown"]]
    # Every descriptor but the broken handler's is closed; its peer sees EOF.
    for index, peer in enumerate(peers):
        if index != 3:
            assert peer.recv(1) == b""
    assert list(reactor.handlers.values()) == [broken]  # it never let go: not called again
    reactor.close()
    for a, b in pairs:
        a.close()
        b.close()


async def test_cancellation_closes_everything() -> None:
    pool = PipePool()
    reactor = Reactor()
    finished: list[Relay] = []
    conns: list[Conn] = []
    failures: list[Exception] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            conns = [Conn(reactor, pool, finished) for _ in range(20)]
            # Bulk in flight on some, idle others, half-closed one.
            for c in conns[:5]:
                c.client.send(os.urandom(200_000))
            conns[5].client.shutdown(socket.SHUT_WR)
            await trio.sleep(0.1)
            # A connect still under way when the reactor stops.
            upstream = make_upstream([SocketAddress("127.0.0.1", blackhole_port())])
            connector = NodeConnector(reactor, upstream, b"k", lambda *a: None, failures.append)
            connector.start()
            assert connector.running and connector in reactor.handlers.values()
            nursery.cancel_scope.cancel()
    assert len(finished) == 20 and all(r.reason == "shutdown" for r in finished)
    assert reactor.active == 0 and not reactor.handlers and not connector.running
    assert [type(f) for f in failures] == [ReactorStopped]
    assert upstream.nodes[0].active == 0
    assert reactor.stopped and reactor.epoll.closed
    for c in conns:
        assert c.relay.client.fileno() == -1 and c.relay.node.fileno() == -1
        assert await sock_read_to_eof(c.client) is not None  # EOF, not a hang
        c.close()
    assert pool.pipes_open == len(pool._free)  # none held by a relay
    pool.close()
    # Registering after the stop closes at once.
    late = Conn(reactor, pool, finished)
    assert late.relay.closed and late.relay.reason == "shutdown"
    late.close()


# -- connecting nodes in the reactor --------------------------------------------------------

_blackholes: list[socket.socket] = []


def blackhole_port() -> int:
    """A port whose connects hang: a listener with a full accept queue (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    _blackholes.append(listener)
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        _blackholes.append(filler)
    return port


@pytest.fixture(autouse=True)
def _close_blackholes() -> Iterator[None]:
    yield
    while _blackholes:
        _blackholes.pop().close()


def dead_port() -> int:
    return free_port()


def make_upstream(
    addresses: list[SocketAddress],
    *,
    retries: int = 3,
    connect_timeout: float = 1.0,
    authorize: list[str] | None = None,
) -> Upstream:
    config = UpstreamConfig(
        name="web",
        nodes=tuple(NodeConfig(a) for a in addresses),
        retries=retries,
        connect_timeout=connect_timeout,
    )
    rules = [
        AuthorizeRule(f"r{i}", parse_network(net), ((1, 65535),))
        for i, net in enumerate(authorize or [])
    ]
    return Upstream(config, BackendAuthorization(rules))


class Outcome:
    def __init__(self) -> None:
        self.connected: list[tuple[socket.socket, NodeState, int]] = []
        self.failed: list[Exception] = []
        self.done = trio.Event()

    def on_connected(self, sock: socket.socket, lease: NodeLease, mask: int) -> None:
        self.connected.append((sock, lease.node, mask))
        self.done.set()

    def on_failed(self, exc: Exception) -> None:
        self.failed.append(exc)
        self.done.set()


async def connect_with(env: Env, upstream: Upstream) -> Outcome:
    outcome = Outcome()
    NodeConnector(env.reactor, upstream, b"client", outcome.on_connected, outcome.on_failed).start()
    with trio.fail_after(10):
        await outcome.done.wait()
    return outcome


async def test_connector_retries_past_dead_nodes(env: Env) -> None:
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen(8)
        live_port = live.getsockname()[1]
        addresses = [SocketAddress("127.0.0.1", dead_port()) for _ in range(2)]
        addresses.append(SocketAddress("127.0.0.1", live_port))
        upstream = make_upstream(addresses, retries=3)
        outcome = await connect_with(env, upstream)
        assert not outcome.failed
        ((sock, node, _mask),) = outcome.connected
        assert node.address.port == live_port
        assert [n.active for n in upstream.nodes] == [0, 0, 1]
        assert [n.connect_failures for n in upstream.nodes] == [1, 1, 0]
        assert node.connections_total == 1
        env.reactor.forget(sock.fileno(), _mask)
        sock.close()
    assert not env.reactor.handlers


async def test_connector_all_failed_and_no_node(env: Env) -> None:
    upstream = make_upstream([SocketAddress("127.0.0.1", dead_port()) for _ in range(3)])
    outcome = await connect_with(env, upstream)
    (exc,) = outcome.failed
    assert isinstance(exc, UpstreamConnectError)
    assert "3 connect attempt(s) failed" in str(exc)
    assert all(n.active == 0 and n.connect_failures == 1 for n in upstream.nodes)
    for node in upstream.nodes:
        node.healthy = False
    outcome = await connect_with(env, make_upstream([]))
    assert isinstance(outcome.failed[0], NoHealthyNode)


async def test_connector_never_connects_an_unauthorized_node(env: Env) -> None:
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen(8)
        port = live.getsockname()[1]
        upstream = make_upstream(
            [SocketAddress("127.0.0.1", port)], authorize=["10.0.0.0/8"], retries=2
        )
        outcome = await connect_with(env, upstream)
        assert isinstance(outcome.failed[0], NoHealthyNode)  # nothing was tried
        live.setblocking(False)
        with pytest.raises(BlockingIOError):
            live.accept()
    assert upstream.nodes[0].active == 0


async def test_connector_timeout(env: Env) -> None:
    upstream = make_upstream(
        [SocketAddress("127.0.0.1", blackhole_port())], retries=1, connect_timeout=0.2
    )
    t0 = trio.current_time()
    outcome = await connect_with(env, upstream)
    elapsed = trio.current_time() - t0
    (exc,) = outcome.failed
    assert isinstance(exc, UpstreamConnectError)
    assert "connect timed out after 0.2s" in str(exc)
    assert 0.2 <= elapsed < 2
    assert upstream.nodes[0].active == 0
    assert not env.reactor.handlers
