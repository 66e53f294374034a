"""One socket write per event-loop turn: AMQP frames written in a turn leave together.

aiormq writes every frame (a publish, an ack) with its own ``transport.write``, and an idle
socket sends at once: one system call per frame, which was the coordinator's largest single
cost in a burst. Here the frames are joined and written together. Order is kept: every frame
goes through the same buffer, and ``close`` flushes it first.

aiormq's writer task takes every frame queued so far in one step (``write_queue``), so the
frames of a step are complete once that queue is empty: they are written then, in that step.
Without the queue to look at (before the connection is up), the write waits for a callback at
the end of the turn (``call_soon``). Waiting for the end of the turn in every case cost each
message one more loop turn, on every hop of a task (an assignment, the agent's reports, the
client's notices), and a busy process's turns last milliseconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory
from yarl import URL


class CoalescingWriter:
    """A ``StreamWriter`` look-alike whose ``write`` buffers until aiormq's writer step ends
    (or, before that is known, the loop turn)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._buffer: list[bytes] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        #: The frames aiormq has queued for its writer task, once known (``watch``).
        self._queue: asyncio.Queue[Any] | None = None
        #: Socket writes made and frames given (the ratio is the coalescing achieved), and
        #: the writes that waited for the end of the turn.
        self.writes = 0
        self.frames = 0
        self.late_writes = 0

    def watch(self, queue: asyncio.Queue[Any]) -> None:
        """The queue aiormq's writer task takes frames from: once it is empty, the frames
        written so far are all there is for now, and leave at once."""
        self._queue = queue

    def write(self, data: bytes) -> None:
        self.frames += 1
        self._buffer.append(data)
        if self._queue is not None and self._queue.empty():
            self.flush()  # the writer's step is done: nothing else is ready to join them
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        if self._buffer:
            self.late_writes += 1
        self.flush()

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
        # frame is buffered and leaves with its writer step; back-pressure still applies,
        # since the socket's own buffer is what pauses the writer.
        await self._writer.drain()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class CoalescingTCPTransportFactory(TCPTransportFactory):
    #: The writer of the connection made last (one factory per connection).
    writer: CoalescingWriter | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, Any]:
        reader, writer = await super().create(url, **kwargs)
        self.writer = CoalescingWriter(writer)
        return reader, self.writer


#: Frames aiormq may queue for its writer. Its default, 10, makes a convoy under load: once
#: full, each frame written lets one waiting publisher in, on the next turn, so frames leave
#: one per turn however many are ready. Publishes are bounded upstream (prefetch, slots).
WRITE_QUEUE_FRAMES = 1024


def _coalesce(connection: aio_pika.Connection) -> CoalescingTCPTransportFactory | None:
    """Give ``connection`` a coalescing transport (plain TCP only: TLS connections keep
    aiormq's own transport)."""
    if connection.url.scheme != "amqp":
        return None
    factory = CoalescingTCPTransportFactory()
    connection.kwargs["transport_factory"] = factory
    return factory


def _watch(connection: aio_pika.Connection,
           factory: CoalescingTCPTransportFactory | None) -> None:
    """Once connected: a larger write queue, and the writer told which queue to watch."""
    transport = getattr(connection.transport, "connection", None)
    queue = getattr(transport, "write_queue", None)
    if isinstance(queue, asyncio.Queue) and hasattr(queue, "_maxsize"):
        queue._maxsize = WRITE_QUEUE_FRAMES  # no public setter; it only grows
        if factory is not None and factory.writer is not None:
            factory.writer.watch(queue)


class CoalescingConnection(aio_pika.Connection):
    """An aio-pika connection whose frames are coalesced per loop turn (plain TCP only: TLS
    connections keep aiormq's own transport)."""

    def __init__(self, url: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self._factory = _coalesce(self)

    async def connect(self, timeout: Any = None) -> None:
        await super().connect(timeout)
        _watch(self, self._factory)


class CoalescingRobustConnection(aio_pika.RobustConnection):
    """The same for a robust connection; each reconnect makes a new transport, watched once
    its channels are restored (until then its writes wait for the end of the turn)."""

    def __init__(self, url: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self._factory = _coalesce(self)
        self.reconnect_callbacks.add(lambda *_: _watch(self, self._factory))

    async def connect(self, timeout: Any = None) -> None:
        await super().connect(timeout)
        _watch(self, self._factory)


async def connect(url: str, **kwargs: Any) -> aio_pika.abc.AbstractConnection:
    """``aio_pika.connect`` with coalesced writes."""
    connection: aio_pika.abc.AbstractConnection = await aio_pika.connect(
        url, connection_class=CoalescingConnection, **kwargs)
    return connection


async def connect_robust(url: str, **kwargs: Any) -> aio_pika.abc.AbstractRobustConnection:
    """``aio_pika.connect_robust`` with coalesced writes."""
    connection: aio_pika.abc.AbstractRobustConnection = await aio_pika.connect_robust(
        url, connection_class=CoalescingRobustConnection, **kwargs)
    return connection
