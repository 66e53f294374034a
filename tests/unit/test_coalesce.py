"""Frames written in one loop turn leave in one socket write, in order, at the end of the turn."""

from __future__ import annotations

import asyncio
import contextlib

from coordinator_agent.wire.coalesce import CoalescingWriter


class Pair:
    """A real loopback connection: our coalescing writer at one end, a reader at the other."""

    async def __aenter__(self) -> Pair:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.Queue()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        self.server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        _, plain = await asyncio.open_connection("127.0.0.1", port)
        self.writer = CoalescingWriter(plain)
        self.far, self._far_writer = await asyncio.wait_for(accepted.get(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        self._far_writer.close()
        for writer in (self.writer, self._far_writer):
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        self.server.close()
        await self.server.wait_closed()


async def test_one_turns_frames_leave_in_one_write_and_in_order() -> None:
    async with Pair() as pair:
        for i in range(100):
            pair.writer.write(b"%03d;" % i)
        assert pair.writer.writes == 0  # nothing sent during the turn
        await asyncio.sleep(0)  # the end of the turn
        assert (pair.writer.frames, pair.writer.writes) == (100, 1)
        data = await asyncio.wait_for(pair.far.readexactly(400), 10)
        assert data == b"".join(b"%03d;" % i for i in range(100))


async def test_a_lone_frame_leaves_within_a_turn_and_drain_does_not_wait_for_it() -> None:
    async with Pair() as pair:
        pair.writer.write(b"ping")
        await pair.writer.drain()  # returns without flushing: back-pressure only
        assert pair.writer.writes == 0
        await asyncio.sleep(0)
        assert pair.writer.writes == 1
        assert await asyncio.wait_for(pair.far.readexactly(4), 10) == b"ping"


async def test_close_flushes_what_is_buffered() -> None:
    async with Pair() as pair:
        pair.writer.write(b"last words")
        pair.writer.close()
        assert await asyncio.wait_for(pair.far.read(), 10) == b"last words"


async def test_once_the_writer_queue_is_empty_the_frames_leave_without_waiting_for_the_turn(
) -> None:
    # aiormq's writer task takes every queued frame in one step: when its queue is empty after
    # a frame, that step's frames are all there is, and waiting for the end of the turn would
    # only cost each message a loop turn.
    async with Pair() as pair:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        pair.writer.watch(queue)
        queue.put_nowait(b"2;")
        queue.put_nowait(b"3;")
        pair.writer.write(b"1;")  # more frames queued behind it: held
        assert pair.writer.writes == 0
        pair.writer.write(queue.get_nowait())
        pair.writer.write(queue.get_nowait())  # the last one queued: all three leave together
        assert (pair.writer.frames, pair.writer.writes) == (3, 1)
        assert await asyncio.wait_for(pair.far.readexactly(6), 10) == b"1;2;3;"
        await asyncio.sleep(0)  # the end of the turn adds no write of its own
        assert pair.writer.writes == 1

