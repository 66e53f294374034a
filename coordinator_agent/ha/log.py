"""The replicated event log: state changes appended to a RabbitMQ stream, read back from any offset.

Writers batch: every event appended in one event-loop turn, and in the turn after it (what the
first turn woke up), goes out as one AMQP message, and the caller's future resolves when the
broker confirms that message (replicated to a quorum of the stream's nodes). Nothing that an
effect waits for waits on a timer, so an idle system adds no latency, and a busy one pays one
publish and one confirm for many events. An event that no effect waits for (a notice marked
sent) rides with the next batch instead of sending one of its own.

Readers consume the stream from an offset they keep themselves (AMQP 0-9-1 clients get no
server-side offset tracking) and apply each batch with its offset, so the store can keep the
offset in the same transaction as the state. A publish retried after a lost confirm repeats its
events: readers drop event ids they have already applied.

Every batch is sealed with the keys it is given (the service gives the operators' keys: see
docs/HA.md), without a TTL (old entries must stay readable), so nobody without them can write
the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from coordinator_agent.exceptions import TransportError
from coordinator_agent.wire.constants import log_queue

log = logging.getLogger(__name__)

#: Event ids a reader remembers to drop repeats (a retried publish repeats a whole batch).
DEDUPE_WINDOW = 100_000
#: Batches a writer remembers for its own reader (the leader reads back what it wrote).
SENT_REMEMBERED = 10_000
#: Every entry's delivery mode.
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
#: At most this long an event no effect waits for waits for a batch to ride with: long enough
#: for the next task's submission after a notice (a few ms), short, since a leader killed
#: meanwhile loses it (a notice marked sent: its successor sends the notice again).
UNAWAITED_FLUSH_S = 0.01


class Event(NamedTuple):
    """One state change. ``epoch`` is the leadership term that decided it."""

    id: str
    epoch: int
    type: str
    data: dict[str, Any]


class LogCodec:
    """Seals and opens batches of events with a principal's keys (newest first)."""

    def __init__(self, secrets: list[str]) -> None:
        if not secrets:
            raise ValueError("the log needs at least one key")
        self._fernet = MultiFernet([Fernet(s) for s in secrets])

    def __repr__(self) -> str:
        return "LogCodec(<keys hidden>)"

    def seal(self, events: list[Event]) -> bytes:
        return self._fernet.encrypt(orjson.dumps([tuple(e) for e in events]))

    def seal_bytes(self, plain: bytes) -> bytes:
        return self._fernet.encrypt(plain)

    def open_bytes(self, body: bytes) -> bytes:
        try:
            return self._fernet.decrypt(body)
        except InvalidToken as exc:
            raise ValueError("an entry that is not sealed with the coordinator's key") from exc

    def open(self, body: bytes) -> list[Event]:
        try:
            rows = orjson.loads(self._fernet.decrypt(body))
        except (InvalidToken, orjson.JSONDecodeError) as exc:
            raise ValueError("a log entry that is not sealed with the coordinator's key") from exc
        if not isinstance(rows, list) or not all(
                isinstance(row, list) and len(row) == 4 for row in rows):
            raise ValueError("a log entry that is not a list of events")
        return [Event(*row) for row in rows]


@dataclass(frozen=True)
class Retention:
    """How long the stream keeps entries: by age (``7D``, ``12h``) and by size, per segment."""

    max_age: str = "7D"
    max_bytes: int = 20 * 1024**3
    segment_bytes: int = 100 * 1024**2


async def declare(channel: AbstractChannel, name: str, retention: Retention) -> None:
    await channel.declare_queue(log_queue(name), durable=True, arguments={
        "x-queue-type": "stream",
        "x-max-age": retention.max_age,
        "x-max-length-bytes": retention.max_bytes,
        "x-stream-max-segment-size-bytes": retention.segment_bytes,
    })


class Confirm(asyncio.Future[None]):
    """The confirm of one batch, awaited by everyone who appended to it and by every barrier.

    A task awaiting a plain future cancels that future when it is itself cancelled, and this
    one is shared: the cancellation would reach every other waiter. So it refuses to be
    cancelled; a cancelled waiter is cancelled once the confirm resolves (a confirm or a
    refusal, within the publish timeout). Cheaper than an ``asyncio.shield`` per wait.
    """

    def cancel(self, msg: Any | None = None) -> bool:
        return False


class LogWriter:
    """Appends events; one AMQP message and one confirm per event-loop turn's worth."""

    def __init__(self, channel: AbstractChannel, name: str, codec: LogCodec, *,
                 batch_max: int = 1000, publish_timeout_s: float = 10.0) -> None:
        self.channel = channel
        self.queue = log_queue(name)
        self.codec = codec
        self.batch_max = batch_max
        self.publish_timeout_s = publish_timeout_s
        self._batch: list[Event] = []
        #: Resolves when the open batch is confirmed: one future per batch, not per event.
        self._confirm: Confirm | None = None
        self._scheduled = False
        #: The timer of a batch that holds only events no effect waits for.
        self._unawaited: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        #: Batches this writer sealed, by their sealed body: its own reader takes them back as
        #: they are instead of opening them again (``LogReader(known=...)``). Bounded.
        self._sent: OrderedDict[bytes, list[Event]] = OrderedDict()
        self.batches = 0
        self.events = 0

    @property
    def unsent(self) -> int:
        """Events appended and not yet handed to the broker."""
        return len(self._batch)

    def sent(self, body: bytes) -> list[Event] | None:
        """The events of a batch this writer sealed as ``body`` (then forgotten), else None."""
        return self._sent.pop(body, None)

    def append(self, event: Event, *, awaited: bool = True) -> asyncio.Future[None]:
        """Queue ``event`` for this turn's batch; the future resolves once it is confirmed.

        Every event of a batch gets the same future (a future and its callbacks per event were
        a measurable share of a busy leader's time); it cannot be cancelled (``Confirm``), so
        shield it where a wait must end on time (``asyncio.wait_for``).

        ``awaited=False``: no effect waits for this event, so it sends no batch of its own: it
        rides with the next batch that one waits for, or leaves after ``UNAWAITED_FLUSH_S``
        (or at ``hasten``, when a barrier comes to wait for it after all).
        """
        confirm = self._confirm
        if confirm is None:
            confirm = self._confirm = Confirm(loop=asyncio.get_running_loop())
        self._batch.append(event)
        if len(self._batch) >= self.batch_max:
            self._flush()
        elif awaited:
            self.hasten()
        elif not self._scheduled and self._unawaited is None:
            self._unawaited = asyncio.get_running_loop().call_later(
                UNAWAITED_FLUSH_S, self._flush)
        return confirm

    def hasten(self) -> None:
        """Send the open batch at the end of the turn after this one: no timer, no idle
        latency. The extra turn lets what this turn's events woke up run first and join the
        batch (the dispatcher after a submission: a task's accepted and assigned records share
        one confirm)."""
        if self._scheduled or not self._batch:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._unawaited is not None:
            self._unawaited.cancel()
            self._unawaited = None
        if not self._batch or self._confirm is None:
            return
        batch, confirm = self._batch, self._confirm
        self._batch, self._confirm = [], None
        # One channel publishes in order, so batches land in the stream in append order.
        task = asyncio.ensure_future(self._publish(batch, confirm))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _publish(self, batch: list[Event], confirm: Confirm) -> None:
        error: BaseException | None = None
        try:
            body = self.codec.seal(batch)
            self._sent[body] = batch
            while len(self._sent) > SENT_REMEMBERED:
                self._sent.popitem(last=False)
            # aiormq directly, bounded by a timeout scope rather than ``wait_for``: no task of
            # its own, whose start and end were two more loop turns before a barrier woke up;
            # and ``wait=False``: the frame joins the turn's writes (coalesce.py), the confirm
            # is awaited all the same.
            async with asyncio.timeout(self.publish_timeout_s):
                # aio_pika's underlay is aiormq's Channel, whose publish takes ``wait``.
                channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
                # Properties of its own: aiormq writes the message id it matches returns by
                # into them.
                await channel.basic_publish(
                    body, routing_key=self.queue, mandatory=True, wait=False,
                    properties=aiormq.spec.Basic.Properties(delivery_mode=PERSISTENT))
        except Exception as exc:  # unsealable data, a nack, a timeout, a closed channel
            error = TransportError(f"log append of {len(batch)} events failed: {exc!r}")
        else:
            self.batches += 1
            self.events += len(batch)
        if confirm.done():
            return
        if error is None:
            confirm.set_result(None)
        else:
            confirm.set_exception(error)

    async def flush(self) -> None:
        """Wait for every batch appended so far to be confirmed (or to fail)."""
        self._flush()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)


#: Applies a run of entries: their fresh events in log order, and the offset of the last.
Apply = Callable[[list[Event], int], Awaitable[None] | None]


class _Entry(NamedTuple):
    offset: int
    events: list[Event]
    size: int
    message: AbstractIncomingMessage


class LogReader:
    """Applies the stream from an offset, in order, each event once.

    Entries delivered in one loop turn (and while the previous run was being applied) are
    applied as one run: one call of ``apply`` with the last entry's offset (so one store
    transaction, which holds each task's last record once). The credit goes back in one ack
    once half a prefetch of entries is taken.
    """

    def __init__(self, channel: AbstractChannel, name: str, codec: LogCodec, apply: Apply, *,
                 prefetch: int = 500,
                 known: Callable[[bytes], list[Event] | None] | None = None) -> None:
        self.channel = channel
        self.queue = log_queue(name)
        self.codec = codec
        self.apply = apply
        #: The events of an entry this process wrote itself (``LogWriter.sent``): no need to
        #: open what it sealed. Matched on the whole sealed body, so nothing else can match.
        self.known = known
        self.prefetch = prefetch
        #: Deliveries (entries, or credit only) taken between two acks.
        self.ack_every = max(1, prefetch // 2)
        self._unacked = 0
        self.acks = 0
        #: Every entry before this one is applied.
        self.next_offset = 0
        self.applied_events = 0
        self.applied_bytes = 0
        self.runs = 0  # calls of ``apply`` (a run holds one or more entries)
        self.rejected = 0
        self.gaps = 0  # resumed where the entries it needed were gone (see resume)
        self._anchor: int | None = None
        #: Every entry before this one is taken (applied, or waiting in ``_run``).
        self._taken_offset = 0
        self._run: list[_Entry] = []
        self._applier: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tag: str | None = None
        self._progress = asyncio.Condition()
        self._waiting = 0  # callers of wait_for_offset: no one to notify most of the time
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, from_offset: int, *, next_offset: int | None = None) -> None:
        """Consume from ``from_offset``; apply from ``next_offset`` (default: the same)."""
        self.next_offset = from_offset if next_offset is None else next_offset
        self._taken_offset = self.next_offset
        await self.channel.set_qos(prefetch_count=self.prefetch)  # streams refuse 0
        queue = await self.channel.get_queue(self.queue, ensure=False)
        self._tag = await queue.consume(self._on_message, no_ack=False,
                                        arguments={"x-stream-offset": from_offset})

    async def resume(self, applied: int | None) -> None:
        """Start after ``applied`` (a store's ``log_offset()``; None: from the beginning).

        Reads from ``applied`` itself, which must still be in the stream, and skips it: offsets
        are not contiguous (a new segment takes one), so only finding that entry proves that
        nothing after it fell to retention. If it is gone, ``gaps`` counts it.
        """
        self._anchor = 0 if applied is None else applied
        await self.start(self._anchor, next_offset=0 if applied is None else applied + 1)

    async def stop(self) -> None:
        if self._tag is not None:
            queue = await self.channel.get_queue(self.queue, ensure=False)
            with contextlib.suppress(Exception):
                await queue.cancel(self._tag)
            self._tag = None
        await self._idle.wait()  # deliveries already handed to us are applied first

    async def wait_for_offset(self, offset: int, timeout: float) -> None:
        """Until every entry before ``offset`` is applied."""
        self._waiting += 1
        try:
            async with self._progress:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: self.next_offset >= offset), timeout)
        finally:
            self._waiting -= 1

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Take an entry into the run; the applier, started for the first, applies the run
        once this turn's deliveries have all joined it."""
        header = (message.headers or {}).get("x-stream-offset")
        offset = header if isinstance(header, int) else self._taken_offset  # a stream sets it
        if self._anchor is not None and offset >= self._anchor:
            if offset != self._anchor:  # retention ran ahead of the store: state is missing
                self.gaps += 1
                log.error("log gap: entry %d is no longer in the stream (it starts at %d); "
                          "this replica must restore a newer snapshot", self._anchor, offset)
            self._anchor = None
        events: list[Event] = []
        if offset >= self._taken_offset:  # the broker may start a chunk before our offset
            try:
                own = self.known(message.body) if self.known is not None else None
                events = own if own is not None else self.codec.open(message.body)
            except ValueError:
                self.rejected += 1
                log.error("log entry at offset %d is not sealed with the coordinator's key; "
                          "skipped", offset)
            seen = self._seen
            events = [e for e in events if e.id not in seen]
            seen.update(dict.fromkeys(e.id for e in events))
            for _ in range(len(seen) - DEDUPE_WINDOW):
                seen.popitem(last=False)
            self._taken_offset = offset + 1
            self._run.append(_Entry(offset, events, len(message.body), message))
        else:  # before our offset: only the credit
            self._run.append(_Entry(-1, [], 0, message))
        if self._applier is None:
            self._idle.clear()
            # Its first step comes after the deliveries already scheduled in this turn.
            self._applier = asyncio.ensure_future(self._apply_runs())

    async def _apply_runs(self) -> None:
        try:
            while self._run:
                run, self._run = self._run, []
                await self._apply_run(run)
        finally:
            self._applier = None
            self._idle.set()

    async def _apply_run(self, run: list[_Entry]) -> None:
        taken = [entry for entry in run if entry.offset >= 0]
        if taken:
            last = taken[-1].offset
            events = [e for entry in taken for e in entry.events]
            if events:
                try:
                    result = self.apply(events, last)
                    if result is not None:
                        await result
                except Exception:  # a bug in apply: said, and the log goes on
                    log.exception("log entries up to offset %d not applied", last)
                else:
                    self.applied_events += len(events)
                self.runs += 1
            self.applied_bytes += sum(entry.size for entry in taken)  # the snapshot schedule
            self.next_offset = last + 1
        # On a stream an ack is credit, not deletion (the offset is ours to keep): one for
        # every half a prefetch of entries keeps delivery going, and spares the broker and this
        # process an ack frame per entry while the log grows one entry at a time.
        self._unacked += len(run)
        if self._unacked >= self.ack_every:
            self._unacked = 0
            self.acks += 1
            with contextlib.suppress(Exception):  # a closed channel: the credit went with it
                await run[-1].message.ack(multiple=True)
        if self._waiting:
            async with self._progress:
                self._progress.notify_all()


#: A tail probe waits this long for the stream's last chunk to start arriving, then reads on
#: until entries stop for ``TAIL_PAUSE_S``, or for ``TAIL_READ_S`` at most: under steady writes
#: they never stop, and a probe that read on took every entry a second time (and, never
#: returning, never reported a tail).
TAIL_FIRST_S = 1.0
TAIL_PAUSE_S = 0.1
TAIL_READ_S = 0.25


async def tail_offset(channel: AbstractChannel, name: str) -> int | None:
    """The offset of the stream's last entry (or a later one), read through the last chunk:
    AMQP 0-9-1 has no tail offset query, and the broker starts a ``last`` consumer at that
    chunk's first entry. Every delivery is acked: a stream closes the connection on a nack or
    a reject. Closes ``channel``. None: the stream is empty."""
    offsets: list[int] = []
    arrived = asyncio.Event()

    async def on_entry(message: AbstractIncomingMessage) -> None:
        header = (message.headers or {}).get("x-stream-offset")
        await message.ack()
        if isinstance(header, int):
            offsets.append(header)
            arrived.set()
    loop = asyncio.get_running_loop()
    try:
        await channel.set_qos(prefetch_count=100)
        queue = await channel.get_queue(log_queue(name), ensure=False)
        tag = await queue.consume(on_entry, arguments={"x-stream-offset": "last"})
        try:
            wait, until = TAIL_FIRST_S, None
            while True:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), wait)
                except TimeoutError:
                    break
                now = loop.time()
                until = now + TAIL_READ_S if until is None else until
                wait = min(TAIL_PAUSE_S, until - now)
                if wait <= 0:
                    break
        finally:
            await queue.cancel(tag)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return max(offsets) if offsets else None


async def writer_channel(connection: AbstractConnection) -> AbstractChannel:
    """A confirming channel for appends: a message no queue takes (the stream was deleted)
    fails its publish. On a channel that does not raise on returns the broker confirms it all
    the same, and an append lost that way would count as durable."""
    return await connection.channel(publisher_confirms=True, on_return_raises=True)
