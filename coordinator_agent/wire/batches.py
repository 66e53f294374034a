"""A lane read in batches: every delivery of a loop turn is handled in one pass, and acked once.

Per message, the ordinary consumer path costs a coroutine chain (the handler, the ack) and an
ack frame. For a lane of small, frequent, self-contained messages (the agents' heartbeats) that
is a large part of the message's cost. Here a delivery only joins the turn's batch; one task per
batch opens and authorizes each message and hands the batch to a synchronous handler; then the
whole batch is settled with one ``basic.ack`` (``multiple``) when nothing before it is still
being settled one by one.

What does not fit the batch goes the ordinary way, message by message, with its own ack:

* a message of a type the batch handler does not take (read from the AMQP ``type`` property,
  then checked against the authenticated envelope);
* a rejected message: dead-lettered with its reason and counted, as on any lane;
* a handler error: logged, then dead-lettered or requeued as the lane says.

``multiple`` acks everything unacked up to a tag on the channel, so it is used only while no
message of this channel is settled by anyone else (``outstanding`` is zero): otherwise the batch
is acked message by message. Deliveries join in tag order and one flusher runs at a time, so
the acks of a channel go out in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiormq
from aiormq.abc import DeliveredMessage

from coordinator_agent.exceptions import NotLeading, RejectedMessage
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.wire import protocol
from coordinator_agent.wire.delivery import Delivery
from coordinator_agent.wire.security import AuthorizationManager, SecurityManager

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What a batched lane uses of its ``MessageHandler`` (``consumer`` is its consumer entry,
    passed back as it came)."""

    security: SecurityManager
    authorizer: AuthorizationManager | None
    metrics: Metrics | None

    def handle_one(self, consumer: Any, message: Delivery) -> Awaitable[None]: ...
    def handle_opened(self, consumer: Any, message: Delivery,
                      envelope: protocol.Envelope) -> Awaitable[None]: ...
    def settle_failure(self, consumer: Any, message: Delivery,
                       exc: Exception) -> Awaitable[None]: ...
    def dead_letter(self, message: Delivery, reason: str, detail: str, *,
                    sender: str | None = None) -> Awaitable[None]: ...
    def received_metrics(self, message_type: str) -> tuple[Any, Any]: ...
    def track(self, task: asyncio.Task[Any]) -> None: ...

#: Handles a batch of opened, authorized messages, in delivery order, synchronously. Returns,
#: for each, None (handled: acked) or the exception it raised (RejectedMessage: dead-lettered
#: with its reason; anything else: a handler error). May raise NotLeading for the whole batch
#: (every message goes back to the queue).
BatchHandler = Callable[[list[tuple[protocol.Envelope, Delivery]]], list[Exception | None]]

_BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)


class BatchedLane:
    """The batching consumer of one queue on one channel (a new one per (re)connect)."""

    def __init__(self, transport: Transport, consumer: Any,
                 channel: aiormq.abc.AbstractChannel, *, handler: BatchHandler,
                 types: frozenset[str], shed: Callable[[Delivery], bool] | None) -> None:
        self._transport = transport
        self._consumer = consumer
        self._shed = shed
        self._channel = channel
        self._handler = handler
        self._types = types
        self._pending: list[DeliveredMessage] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Messages of this channel settled one by one, elsewhere, and not settled yet.
        self.outstanding = 0
        #: Batches handled and messages acked by one ``multiple`` ack (tests and profiling).
        self.batches = 0
        self.multiple_acked = 0

    async def deliver(self, message: DeliveredMessage) -> None:
        """aiormq's consumer callback: join the turn's batch."""
        self._pending.append(message)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
            self._transport.track(self._flusher)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._settle_batch(batch)
        finally:
            self._flusher = None

    async def _settle_batch(self, batch: list[DeliveredMessage]) -> None:
        transport, consumer = self._transport, self._consumer
        security, authorizer, shed = transport.security, transport.authorizer, self._shed
        types = self._types
        opened: list[tuple[protocol.Envelope, Delivery]] = []
        to_ack: list[Delivery] = []
        separately = 0
        for raw in batch:
            message = Delivery(raw)
            if shed is not None and shed(message):
                to_ack.append(message)
                continue
            if message.type not in types:
                self._aside(transport.handle_one(consumer, message))
                separately += 1
                continue
            try:
                envelope = security.open(message.body, message.headers,
                                         redelivered=message.redelivered)
                if authorizer is not None:
                    authorizer.authorize(envelope)
            except RejectedMessage as exc:
                self._aside(transport.dead_letter(message, exc.reason, exc.detail,
                                                  sender=exc.sender))
                separately += 1
                continue
            if envelope.type not in types:  # the type property said otherwise: not ours
                self._aside(transport.handle_opened(consumer, message, envelope))
                separately += 1
                continue
            opened.append((envelope, message))
        if opened:
            try:
                outcomes = self._handler(opened)
            except NotLeading:
                for _, message in opened:  # for the leader
                    with contextlib.suppress(*_BROKER_ERRORS):
                        await message.nack(requeue=True)
                separately += len(opened)
                opened = []
                outcomes = []
            self._count(opened, outcomes)
            for (_, message), outcome in zip(opened, outcomes, strict=True):
                if outcome is None:
                    to_ack.append(message)
                else:
                    self._aside(transport.settle_failure(consumer, message, outcome))
                    separately += 1
        self.batches += 1
        await self._ack(to_ack, whole=separately == 0)

    def _count(self, opened: list[tuple[protocol.Envelope, Delivery]],
               outcomes: list[Exception | None]) -> None:
        """The received counters and latencies of the handled messages, counters per batch."""
        if self._transport.metrics is None:
            return
        counts: dict[str, int] = {}
        now = time.time()
        per_type = self._transport.received_metrics
        for (envelope, _), outcome in zip(opened, outcomes, strict=True):
            if outcome is None:
                counts[envelope.type] = counts.get(envelope.type, 0) + 1
                per_type(envelope.type)[1].observe(max(0.0, now - envelope.sent_at))
        for message_type, n in counts.items():
            per_type(message_type)[0].inc(n)

    async def _ack(self, messages: list[Delivery], *, whole: bool) -> None:
        if not messages:
            return
        channel = self._channel
        if whole and self.outstanding == 0 and isinstance(channel, aiormq.Channel):
            # Every delivery up to the last one is in this batch: one frame acks them all.
            for message in messages:
                message.processed = True
            with contextlib.suppress(*_BROKER_ERRORS):
                await channel.basic_ack(messages[-1].delivery_tag, multiple=True, wait=False)
            self.multiple_acked += len(messages)
            return
        for message in messages:
            with contextlib.suppress(*_BROKER_ERRORS):
                await message.ack()

    def _aside(self, settling: Awaitable[None]) -> None:
        """Settle one message on its own; until then, no ``multiple`` ack on this channel."""
        self.outstanding += 1
        task = asyncio.ensure_future(settling)
        self._transport.track(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self.outstanding -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("settling a message failed", exc_info=task.exception())
