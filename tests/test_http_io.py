"""l4gw.http.io: FdIO makes successful system calls without a trip through the scheduler,
but never more than BURST in a row (a busy connection must not hold the trio thread)."""

from __future__ import annotations

import socket

import trio
import trio.testing

from l4gw.http.io import BURST, FdIO


async def test_fdio_yields_every_burst_operations() -> None:
    with trio.fail_after(5):
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            io = FdIO(a)
            # Each of these succeeds at once (the bytes are there, there is room).
            with trio.testing.assert_no_checkpoints():
                for _ in range(BURST - 1):
                    await io.send_all(b"x")
            with trio.testing.assert_checkpoints():
                await io.send_all(b"x")
            for _ in range(2):  # any mix of receives and sends counts
                with trio.testing.assert_checkpoints():
                    for _ in range(BURST // 2):
                        b.send(b"y")
                        assert await io.receive() == b"y"
                        await io.send_all(b"x")
            assert b.recv(4 * BURST) == b"x" * (2 * BURST)


async def test_a_relay_over_fdio_lets_other_tasks_run() -> None:
    """A copy loop whose reads and writes never block (the review's probe, F6): another
    task still runs while it copies."""
    with trio.fail_after(5):
        src, feeder = socket.socketpair()
        dst, drain = socket.socketpair()
        with src, feeder, dst, drain:
            src.setblocking(False)
            dst.setblocking(False)
            reader, writer = FdIO(src), FdIO(dst)
            ticks = 0

            async def other() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                await trio.lowlevel.checkpoint()  # ``other`` has started
                before = ticks
                for _ in range(4 * BURST):
                    feeder.send(b"z" * 100)
                    data = await reader.receive()
                    await writer.send_all(data)
                    drain.recv(65536)
                assert ticks - before >= 3
                nursery.cancel_scope.cancel()
