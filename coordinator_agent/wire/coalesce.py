"""One socket write per event-loop turn: AMQP frames written in a turn leave together.

aiormq writes every frame (a publish, an ack) with its own ``transport.write``, and an idle
socket sends at once: one system call per frame, which was the coordinator's largest single
cost in a burst. Here the frames of one turn are joined and written by a callback at the end
of the turn (``call_soon``): no timer, so an idle connection adds one loop turn (microseconds)
and a busy one sends a few large writes instead of hundreds of small ones. Order is kept: every
frame goes through the same buffer, and ``close`` flushes it first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory
from yarl import URL


class CoalescingWriter:
    """A ``StreamWriter`` look-alike whose ``write`` buffers until the end of the loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._buffer: list[bytes] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        #: Socket writes made and frames given (the ratio is the coalescing achieved).
        self.writes = 0
        self.frames = 0

    def write(self, data: bytes) -> None:
        self.frames += 1
        self._buffer.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buffer:
            return
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        if self._writer.is_closing():
            return  # the connection is going: aiormq notices it through the reader
        self.writes += 1
        self._writer.write(data)

    async def drain(self) -> None:
        # aiormq drains after every publish: flushing here would undo the coalescing. The
        # frame is buffered and leaves at the end of this turn; back-pressure still applies,
        # since the socket's own buffer is what pauses the writer.
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class CoalescingTCPTransportFactory(TCPTransportFactory):
    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, Any]:
        reader, writer = await super().create(url, **kwargs)
        return reader, CoalescingWriter(writer)


#: Frames aiormq may queue for its writer. Its default, 10, makes a convoy under load: once
#: full, each frame written lets one waiting publisher in, on the next turn, so frames leave
#: one per turn however many are ready. Publishes are bounded upstream (prefetch, slots).
WRITE_QUEUE_FRAMES = 1024


class CoalescingConnection(aio_pika.Connection):
    """An aio-pika connection whose frames are coalesced per loop turn (plain TCP only: TLS
    connections keep aiormq's own transport)."""

    def __init__(self, url: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        if self.url.scheme == "amqp":
            self.kwargs["transport_factory"] = CoalescingTCPTransportFactory()

    async def connect(self, timeout: Any = None) -> None:
        await super().connect(timeout)
        queue = getattr(getattr(self.transport, "connection", None), "write_queue", None)
        if isinstance(queue, asyncio.Queue) and hasattr(queue, "_maxsize"):
            queue._maxsize = WRITE_QUEUE_FRAMES  # no public setter; empty at this point


async def connect(url: str, **kwargs: Any) -> aio_pika.abc.AbstractConnection:
    """``aio_pika.connect`` with coalesced writes."""
    connection: aio_pika.abc.AbstractConnection = await aio_pika.connect(
        url, connection_class=CoalescingConnection, **kwargs)
    return connection

