"""MessageHandler: the aio-pika transport shared by the coordinator, agents and clients.

It owns one connection and supervises it itself instead of relying on RobustConnection (whose
restore has known gaps: cancelled consumers and weakly held queues are not always brought back).
On every (re)connect it declares the topology and starts every registered consumer again.
A consumer the broker cancels (its queue was deleted) counts as a lost connection: noticed at
once, the topology is declared again and every consumer restarted. With ``probe_interval_s``
set, a tiny confirmed publish checks that the broker still works (a hung broker keeps the TCP
connection open): ``connected`` is False while confirms do not come back.

Inbound: security checks -> authorization -> handler -> ack. A rejected message is republished
to the dead-letter exchange with its reason, counted and logged without payload, then acked.
Outbound: sealed by SecurityManager, published with confirms, ``mandatory`` and a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
)
from aiormq.abc import DeliveredMessage
from pydantic import SecretStr

from coordinator_agent.exceptions import (
    NotLeading,
    PublishTimeout,
    RejectedMessage,
    TransportError,
    Unroutable,
)
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.wire import batch, coalesce, protocol
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.batches import BatchedLane, BatchHandler
from coordinator_agent.wire.delivery import Delivery
from coordinator_agent.wire.security import AuthorizationManager, SecurityManager

log = logging.getLogger(__name__)

Handler = Callable[[protocol.Envelope, Delivery], Awaitable[None]]
Topology = Callable[[AbstractChannel], Awaitable[None]]

#: What aiormq and the socket raise when the broker or the connection fails.
BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)
#: How long ``close(delete_queues=...)`` may spend deleting them.
DELETE_ON_CLOSE_S = 5.0


async def close_connection(connection: AbstractConnection, timeout: float = 5.0) -> None:
    """Close an aio-pika connection and wait until its close callbacks ran: aio-pika runs them
    as a task, which a loop closed right after us would report as destroyed."""
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())
    with contextlib.suppress(*BROKER_ERRORS, asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(connection.close(), timeout)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closed.wait(), 1.0)
    await asyncio.sleep(0)  # the callbacks' task marks itself finished on the next turn


PERSISTENT, NOT_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT), \
    int(aio_pika.DeliveryMode.NOT_PERSISTENT)


class _Outgoing(NamedTuple):
    """A message to publish: what ``basic_publish`` takes, no more."""

    body: bytes
    properties: aiormq.spec.Basic.Properties


@dataclass
class _Consumer:
    queue: str
    handler: Handler
    prefetch: int
    #: Quorum queues count deliveries and dead-letter poison messages; classic queues do not,
    #: so a handler crash there dead-letters at once instead of requeueing forever.
    requeue_on_error: bool
    #: Not started until ``resume`` (an agent says hello before it takes work).
    paused: bool = False
    #: Says, before anything is decrypted, that a message may be acked unread (an overloaded
    #: coordinator sheds repeat heartbeats; the owner of the predicate counts what it sheds).
    shed: Callable[[Delivery], bool] | None = None
    #: Awaited once per delivery, after its message or every item of its batch was handled and
    #: before the ack (the coordinator's log barrier: a batch is one log append).
    settle: Callable[[str], Awaitable[None]] | None = None
    #: Handle a batch's items at once, each in its own task (an agent runs its assignments
    #: side by side); otherwise one after the other, in order.
    items_at_once: bool = False
    #: Read in batches, one per loop turn (batches.py): the handler for these types.
    batch: BatchHandler | None = None
    batch_types: frozenset[str] = frozenset()


def mask_url(url: str) -> str:
    """amqp://user:secret@host/ -> amqp://user:******@host/"""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:******@{host}"


class MessageHandler:
    def __init__(
        self,
        broker_url: SecretStr,
        security: SecurityManager,
        *,
        name: str,
        authorizer: AuthorizationManager | None = None,
        metrics: Metrics | None = None,
        publish_timeout_s: float = 10.0,
        reconnect_delay_s: float = 0.5,
        max_reconnect_delay_s: float = 5.0,
        probe_interval_s: float | None = None,
        probe_timeout_s: float = 1.0,
    ) -> None:
        self._url = broker_url
        self.security = security
        self.authorizer = authorizer
        self.metrics = metrics
        self.name = name
        self.publish_timeout_s = publish_timeout_s
        self._reconnect_delay_s = reconnect_delay_s
        self._max_reconnect_delay_s = max_reconnect_delay_s
        self._topology: list[Topology] = []
        self._consumers: list[_Consumer] = []
        self._connection: AbstractConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._publish_underlay: aiormq.Channel | None = None
        #: A channel without confirms, opened on first use (``confirm=False`` publishes).
        self._written_underlay: aiormq.Channel | None = None
        self._written_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._consuming = True
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._in_progress: set[asyncio.Task[Any]] = set()
        self._consumer_channels: list[AbstractChannel] = []
        self._consumer_tags: list[tuple[aiormq.abc.AbstractChannel, str]] = []
        #: The batched lanes of the current connection (batches.py).
        self.batched_lanes: list[BatchedLane] = []
        self.connections_made = 0
        self.active_consumers = 0
        self._lost: asyncio.Event | None = None
        self._connection_id = 0
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        #: False while probes go unconfirmed (a hung broker); True without probes.
        self.confirming = True
        #: When the broker last confirmed a publish or probe (monotonic); None before any.
        self.last_confirm: float | None = None
        self.consumer_cancels = 0
        #: Metric children per message type (types are a fixed, small set).
        self._received_children: dict[str, tuple[Any, Any]] = {}
        self._published_children: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"MessageHandler(name={self.name!r}, url={self.url_for_display!r})"

    @property
    def url_for_display(self) -> str:
        return mask_url(self._url.get_secret_value())

    @property
    def connected(self) -> bool:
        """Connected, consumers up, and (when probing) the broker confirms publishes."""
        return self._ready.is_set() and self.confirming

    @property
    def transport_up(self) -> bool:
        """Connected with topology and consumers up, whether or not confirms come back."""
        return self._ready.is_set()

    # --- set-up -------------------------------------------------------------------------------

    def add_topology(self, declare: Topology) -> None:
        """Register declarations to run on every (re)connect, before consumers start."""
        self._topology.append(declare)

    def consume(
        self, queue: str, handler: Handler, *, prefetch: int, requeue_on_error: bool = True,
        paused: bool = False, shed: Callable[[Delivery], bool] | None = None,
        settle: Callable[[str], Awaitable[None]] | None = None, items_at_once: bool = False,
        batch: BatchHandler | None = None, batch_types: frozenset[str] = frozenset(),
    ) -> None:
        """Consume ``queue``: each message opened, authorized and given to ``handler``, acked
        after it. With ``batch``: messages of ``batch_types`` are handled in batches, one per
        loop turn, by that synchronous handler and acked together (batches.py)."""
        self._consumers.append(
            _Consumer(queue, handler, prefetch, requeue_on_error, paused, shed, settle,
                      items_at_once, batch, batch_types))

    async def resume(self, queue: str) -> None:
        """Start a consumer registered ``paused``, now if connected, else on the next connect."""
        for consumer in self._consumers:
            if consumer.queue == queue and consumer.paused:
                consumer.paused = False
                connection, lost = self._connection, self._lost
                if self._ready.is_set() and connection is not None and lost is not None:
                    try:
                        await self._start_consumer(connection, consumer, lost)
                    except (*BROKER_ERRORS, TimeoutError):
                        lost.set()  # the supervisor reconnects and starts it
                    self.active_consumers = len(self._consumer_channels)

    async def start(self, timeout: float = 15.0) -> None:
        """Connect (retrying) and return once topology and consumers are up."""
        self._closing = False
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.name}-amqp")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            await self.close()
            raise TransportError(
                f"cannot reach RabbitMQ at {self.url_for_display} within {timeout:g}s — "
                "is it running? (`make services` starts it)"
            ) from None

    async def stop_consuming(self) -> None:
        """Cancel consumers (graceful stop). Channels stay open so in-flight work can still ack."""
        self._consuming = False
        await self._cancel_consumers()

    async def _cancel_consumers(self) -> None:
        for underlay, tag in self._consumer_tags:
            with contextlib.suppress(*BROKER_ERRORS, TimeoutError):
                await underlay.basic_cancel(tag, timeout=5)
        self._consumer_tags.clear()
        self.active_consumers = 0

    async def pause_consuming(self) -> None:
        """Stop taking messages at once and give back every one not acked yet (a deposed leader).

        The consumers' channels are closed, so the broker requeues their unacked deliveries for
        whoever consumes next; the connection and the publish channel stay up.
        """
        self._consuming = False
        channels, self._consumer_channels = self._consumer_channels, []
        self._consumer_tags = []
        self.active_consumers = 0
        for channel in channels:
            with contextlib.suppress(*BROKER_ERRORS, TimeoutError):
                await asyncio.wait_for(channel.close(), 5)

    async def resume_consuming(self) -> None:
        """Start the consumers again (after ``pause_consuming`` or a start with them paused)."""
        self._consuming = True
        connection, lost = self._connection, self._lost
        if not self._ready.is_set() or connection is None or lost is None or self._consumer_tags:
            return  # the next (re)connect starts them
        try:
            await self._start_consumers(connection, lost)
        except (*BROKER_ERRORS, TimeoutError):
            lost.set()  # the supervisor reconnects and starts them
        self.active_consumers = len(self._consumer_channels)

    async def drain(self, timeout: float) -> bool:
        """Wait for messages being handled to finish; False if some were still running."""
        if not self._in_progress:
            return True
        _, pending = await asyncio.wait(set(self._in_progress), timeout=timeout)
        return not pending

    async def close(self, *, delete_queues: Iterable[str] = ()) -> None:
        """Close the connection; ``delete_queues``: queues of this handler's own to delete
        first, best effort (a broker out of reach deletes them when they expire)."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if delete_queues:
            await self._delete_queues(delete_queues)
        await self._close_connection()

    async def _delete_queues(self, names: Iterable[str]) -> None:
        """Best effort, bounded as a whole: a broker that stops answering must not hold up a
        close (a CLI command's end) for longer than ``DELETE_ON_CLOSE_S``."""
        connection = self._connection
        if connection is None or connection.is_closed or not self._ready.is_set():
            return

        async def delete() -> None:
            # Our own consumers first: the broker would cancel them, which reads as a lost
            # queue.
            await self._cancel_consumers()
            channel = await connection.channel()
            try:
                for name in names:
                    await channel.queue_delete(name)
            finally:
                await channel.close()

        with contextlib.suppress(*BROKER_ERRORS, TimeoutError):
            await asyncio.wait_for(delete(), DELETE_ON_CLOSE_S)

    async def force_reconnect(self) -> None:
        """Drop the connection; the supervisor reconnects (used by tests and on channel errors)."""
        await self._close_connection()

    # --- connection supervision ---------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = self._reconnect_delay_s
        failing_since: float | None = None
        while not self._closing:
            lost = asyncio.Event()
            try:
                await self._connect(lost)
            except (*BROKER_ERRORS, TimeoutError) as exc:
                await self._close_connection()
                if failing_since is None:  # log once per outage, not once per retry
                    failing_since = time.monotonic()
                    log.warning("broker %s unreachable (%s); retrying", self.url_for_display,
                                type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_reconnect_delay_s)
                continue
            if failing_since is not None:
                log.info("broker connection back after %.1fs", time.monotonic() - failing_since)
                failing_since = None
            delay = self._reconnect_delay_s
            prober = (asyncio.create_task(self._probe(lost), name=f"{self.name}-probe")
                      if self.probe_interval_s else None)
            try:
                await lost.wait()
            finally:
                if prober is not None:
                    prober.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await prober
            self._ready.clear()
            self._set_connected(False)
            if not self._closing:
                log.warning("broker connection lost; reconnecting")
                await self._close_connection()

    async def _probe(self, lost: asyncio.Event) -> None:
        """Publish a tiny confirmed message now and then: a hung broker stops confirming."""
        assert self.probe_interval_s is not None
        probe = aio_pika.Message(b"", delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        while not lost.is_set():
            channel = self._publish_channel
            try:
                if channel is None:
                    raise TransportError("not connected")
                # The default exchange and a queue name nobody uses: confirmed, then dropped.
                await asyncio.wait_for(channel.default_exchange.publish(
                    probe, c.PROBE_ROUTING_KEY, mandatory=False), self.probe_timeout_s)
            except asyncio.CancelledError:
                raise
            except (*BROKER_ERRORS, TimeoutError, TransportError) as exc:
                last = self.last_confirm
                if (isinstance(exc, TimeoutError) and last is not None
                        and time.monotonic() - last < self.probe_timeout_s):
                    continue  # other publishes were confirmed meanwhile: we are slow, not it
                if self.confirming:
                    log.warning("broker %s stopped confirming publishes (%s)",
                                self.url_for_display, type(exc).__name__ or "timeout")
                    self.confirming = False
                    self._set_connected(False)
                continue  # probe again at once: the next confirm ends the outage
            self.last_confirm = time.monotonic()
            if not self.confirming:
                log.info("broker %s confirms publishes again", self.url_for_display)
                self.confirming = True
                self._set_connected(self._ready.is_set())
            await asyncio.sleep(self.probe_interval_s)

    async def _start_consumers(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        """All at once: started one by one behind a backlog, the first queue's deliveries would
        hold up the next one's start for as long as that backlog lasts (submission lanes)."""
        await asyncio.gather(*(self._start_consumer(connection, consumer, lost)
                               for consumer in self._consumers if not consumer.paused))

    async def _start_consumer(
        self, connection: AbstractConnection, consumer: _Consumer, lost: asyncio.Event
    ) -> None:
        channel = await connection.channel()
        # A channel closed by pause_consuming has left the list: that close is no loss.
        channel.close_callbacks.add(
            lambda *_: lost.set() if channel in self._consumer_channels else None)
        await channel.set_qos(prefetch_count=consumer.prefetch)
        underlay = await channel.get_underlay_channel()

        def cancelled(_frame: Any) -> None:
            # The broker cancelled us (queue deleted, or a node of its quorum lost): start over.
            self.consumer_cancels += 1
            log.warning("broker cancelled the consumer of %s; declaring it again", consumer.queue)
            lost.set()

        underlay.on_consumer_cancel_callbacks.add(cancelled)
        # Straight from aiormq: handlers get a light Delivery, not aio-pika's IncomingMessage.
        callback = self._callback(consumer)

        async def deliver(message: DeliveredMessage) -> None:
            await callback(Delivery(message))

        if consumer.batch is not None:
            lane = BatchedLane(self, consumer, underlay, handler=consumer.batch,
                               types=consumer.batch_types, shed=consumer.shed)
            self.batched_lanes.append(lane)
            deliver = lane.deliver
        ok = await underlay.basic_consume(consumer.queue, deliver, no_ack=False)
        self._consumer_channels.append(channel)
        self._consumer_tags.append((underlay, str(ok.consumer_tag)))

    async def _connect(self, lost: asyncio.Event) -> None:
        self._lost = lost
        connection = await coalesce.connect(
            self._url.get_secret_value(),
            timeout=10,
            client_properties={"connection_name": self.name},
        )
        self._connection = connection
        connection.close_callbacks.add(lambda *_: lost.set())
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        publish_channel.close_callbacks.add(lambda *_: lost.set())
        for declare in self._topology:
            await declare(publish_channel)
        self._publish_channel = publish_channel
        underlay = await publish_channel.get_underlay_channel()
        self._publish_underlay = underlay if isinstance(underlay, aiormq.Channel) else None
        self._consumer_channels = []
        self._consumer_tags = []
        self.batched_lanes = []
        if self._consuming:
            await self._start_consumers(connection, lost)
        self.active_consumers = len(self._consumer_channels)
        self.connections_made += 1
        if self.connections_made > 1 and self.metrics:
            self.metrics.broker_reconnects.inc()
        self._set_connected(True)
        self._ready.set()

    def _set_connected(self, up: bool) -> None:
        if not up and not self._ready.is_set():
            self.active_consumers = 0
        if self.metrics:
            self.metrics.broker_connected.set(1 if up and self.confirming else 0)

    async def _close_connection(self) -> None:
        self._ready.clear()
        self._set_connected(False)
        connection, self._connection = self._connection, None
        self._publish_channel = None
        self._publish_underlay = None
        self._written_underlay = None
        if connection is not None and not connection.is_closed:
            await close_connection(connection)

    # --- inbound ------------------------------------------------------------------------------

    def _callback(
        self, consumer: _Consumer
    ) -> Callable[[Delivery], Awaitable[None]]:
        async def on_message(message: Delivery) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._in_progress.add(task)
            try:
                await self._handle(consumer, message)
            finally:
                if task is not None:
                    self._in_progress.discard(task)

        return on_message

    async def _handle(self, consumer: _Consumer, message: Delivery) -> None:
        if consumer.shed is not None and consumer.shed(message):
            with contextlib.suppress(*BROKER_ERRORS):
                await message.ack()
            return
        try:
            envelope = self.security.open(
                message.body, message.headers, redelivered=bool(message.redelivered)
            )
            if self.authorizer is not None:
                self.authorizer.authorize(envelope)
        except RejectedMessage as exc:
            await self.dead_letter(message, exc.reason, exc.detail, sender=exc.sender)
            return
        await self.handle_opened(consumer, message, envelope)

    async def handle_one(self, consumer: _Consumer, message: Delivery) -> None:
        """One message the ordinary way (a batched lane's message of another type)."""
        await self._handle(consumer, message)

    async def handle_opened(
        self, consumer: _Consumer, message: Delivery, envelope: protocol.Envelope
    ) -> None:
        """Run the handler on an opened, authorized message (on each item of a batch), settle
        it (``consumer.settle``); then ack, or settle the failure."""
        try:
            if envelope.type == batch.BATCH_TYPE:
                handled = await self._handle_batch(consumer, envelope, message)
            else:
                await consumer.handler(envelope, message)
                handled = [envelope]
            if consumer.settle is not None:
                await consumer.settle(envelope.type)
            if message.before_ack:
                await asyncio.gather(*message.before_ack)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.settle_failure(consumer, message, exc)
            return
        if self.metrics:
            if envelope.type == batch.BATCH_TYPE:
                self.metrics.batch_items.labels("received").observe(len(handled))
            for done in handled:
                received, latency = self._per_type(done.type)
                received.inc()
                latency.observe(max(0.0, time.time() - done.sent_at))
        with contextlib.suppress(*BROKER_ERRORS):
            await message.ack()

    async def settle_failure(self, consumer: _Consumer, message: Delivery,
                             exc: Exception) -> None:
        """A handler raised: dead-letter a rejection, give back to the leader, or treat as a
        handler error (requeued on quorum lanes, dead-lettered on classic ones)."""
        if isinstance(exc, RejectedMessage):
            await self.dead_letter(message, exc.reason, exc.detail, sender=exc.sender)
        elif isinstance(exc, NotLeading):
            with contextlib.suppress(*BROKER_ERRORS):
                await message.nack(requeue=True)  # for the leader (its channel may be gone)
        else:
            log.error("handler failed for a %s message on %s", message.type, consumer.queue,
                      exc_info=exc)
            if consumer.requeue_on_error:
                if self.metrics:
                    self.metrics.messages_rejected.labels("handler_error").inc()
                with contextlib.suppress(*BROKER_ERRORS):
                    await message.nack(requeue=True)
            else:
                await self.dead_letter(message, "handler_error", "the handler raised")

    def track(self, task: asyncio.Task[Any]) -> None:
        """Count a task handling messages as in progress until it ends (``drain``)."""
        self._in_progress.add(task)
        task.add_done_callback(self._in_progress.discard)

    async def _handle_batch(self, consumer: _Consumer, envelope: protocol.Envelope,
                            message: Delivery) -> list[protocol.Envelope]:
        """Every item of a batch, each checked and handled as a message of its own; a refused
        item is dead-lettered alone. Returns the items handled. Raises what a single message
        would (NotLeading, a handler's error on a queue that requeues): the batch goes back."""
        redelivered = bool(message.redelivered)
        message.in_batch = True
        items = list(batch.open_items(envelope))
        if consumer.items_at_once and len(items) > 1:
            outcomes = await asyncio.gather(
                *(self._handle_item(consumer, item, message, redelivered) for item in items))
        else:
            outcomes = [await self._handle_item(consumer, item, message, redelivered)
                        for item in items]
        return [done for done in outcomes if done is not None]

    async def _handle_item(self, consumer: _Consumer, item: batch.Item, message: Delivery,
                           redelivered: bool) -> protocol.Envelope | None:
        try:
            if item.error is not None:
                raise item.error
            envelope = item.envelope
            assert envelope is not None
            self.security.check_item(envelope.sender, envelope.id, redelivered=redelivered)
            if self.authorizer is not None:
                self.authorizer.authorize(envelope)
            await consumer.handler(envelope, message)
            return envelope
        except RejectedMessage as exc:
            await self.dead_letter(message, exc.reason, exc.detail, sender=exc.sender,
                                   item=item)
        except (NotLeading, asyncio.CancelledError):
            raise
        except Exception:
            if consumer.requeue_on_error:
                raise  # the whole batch goes back (its handled items are idempotent)
            log.exception("handler failed for item %d of a batch on %s", item.index,
                          consumer.queue)
            await self.dead_letter(message, "handler_error", "the handler raised", item=item)
        return None

    async def dead_letter(
        self, message: Delivery, reason: str, detail: str,
        *, sender: str | None = None, item: batch.Item | None = None,
    ) -> None:
        """Park a rejected message with its reason, then ack it. Never raises.

        ``item``: only that item of a batch is refused. The copy (the whole batch, as the
        body is sealed whole) says which item; the batch itself is acked by its handler."""
        if self.metrics:
            self.metrics.messages_rejected.labels(reason).inc()
        which = "" if item is None else f" item={item.index} item_id={str(item.id)[:64]}"
        log.warning(
            "rejected message id=%s%s sender=%s reason=%s: %s",
            str(message.message_id)[:64], which, (sender or "?")[:128], reason, detail,
        )
        headers = {
            **{k: v for k, v in (message.headers or {}).items() if not k.startswith("x-ca-reject")},
            c.HEADER_REJECT_REASON: reason,
            c.HEADER_REJECT_DETAIL: detail[:512],
            c.HEADER_ORIGINAL_EXCHANGE: message.exchange or "",
            c.HEADER_ORIGINAL_ROUTING_KEY: message.routing_key or "",
        }
        if item is not None:
            headers[c.HEADER_REJECT_ITEM] = item.index
            if item.id is not None:
                headers[c.HEADER_REJECT_ITEM_ID] = item.id
        parked = aio_pika.Message(
            message.body,
            headers=headers,
            message_id=message.message_id,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._publish_raw(
                c.dead_letter_exchange(self.security.coordinator_id), "", parked, mandatory=True
            )
        except TransportError:
            if item is not None:
                return  # the other items still count; the log line above keeps the reason
            # The broker's own dead-lettering still keeps it (without our reason).
            with contextlib.suppress(*BROKER_ERRORS):
                await message.reject(requeue=False)
            return
        if item is not None:
            return
        with contextlib.suppress(*BROKER_ERRORS):
            await message.ack()

    # --- outbound -----------------------------------------------------------------------------

    async def park(
        self, payload: protocol.Model, *, peer: str, reason: str, detail: str, exchange: str,
        routing_key: str,
    ) -> None:
        """Put a message of our own on the dead-letter queue with a reason (a poison task)."""
        envelope = protocol.make_envelope(payload, sender=self.security.principal_id)
        body, headers = self.security.seal(envelope, peer)
        if self.metrics:
            self.metrics.messages_rejected.labels(reason).inc()
        parked = aio_pika.Message(
            body,
            headers={**headers, c.HEADER_REJECT_REASON: reason,
                     c.HEADER_REJECT_DETAIL: detail[:512],
                     c.HEADER_ORIGINAL_EXCHANGE: exchange,
                     c.HEADER_ORIGINAL_ROUTING_KEY: routing_key},
            message_id=envelope.id, type=envelope.type, content_type=c.CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._publish_raw(c.dead_letter_exchange(self.security.coordinator_id), "",
                                parked, mandatory=True)

    async def publish(
        self,
        payload: protocol.Model,
        *,
        peer: str,
        exchange: str,
        routing_key: str,
        persistent: bool = True,
        correlation_id: str | None = None,
        message_id: str | None = None,
        expiration_s: float | None = None,
        on_behalf_of: str | None = None,
        confirm: bool = True,
    ) -> protocol.Envelope:
        """Seal and publish; returns the envelope once the broker has confirmed it.

        ``on_behalf_of``: send as that principal, sealed with its keys (a standby coordinator
        forwarding an operator's submission to the leader, which checks it as the operator's).
        ``confirm=False``: returns once the message is written to the connection's socket,
        without waiting for the broker (best-effort telemetry; ``_publish_written``).
        """
        envelope = protocol.make_envelope(
            payload, sender=on_behalf_of or self.security.principal_id,
            correlation_id=correlation_id, message_id=message_id,
        )
        message = self._sealed(envelope, on_behalf_of or peer, correlation_id=correlation_id,
                               persistent=persistent, expiration_s=expiration_s)
        await self._send(exchange, routing_key, message, confirm=confirm)
        if self.metrics:
            self._published(envelope.type).inc()
        return envelope

    async def publish_batch(
        self,
        items: list[dict[str, Any]],
        *,
        peer: str,
        exchange: str,
        routing_key: str,
        persistent: bool = True,
        expiration_s: float | None = None,
        confirm: bool = True,
    ) -> protocol.Envelope:
        """Seal several items (``batch.item_of``) as one ``batch`` message and publish it;
        returns its envelope once the broker has confirmed it (``confirm=False``: once it is
        written, as ``publish``). The caller keeps it within the peer's batch limit and the
        size limit (``batch.split``)."""
        envelope = protocol.make_envelope(protocol.Batch(items=items),
                                          sender=self.security.principal_id)
        message = self._sealed(envelope, peer, correlation_id=None, persistent=persistent,
                               expiration_s=expiration_s)
        await self._send(exchange, routing_key, message, confirm=confirm)
        if self.metrics:
            self._published(envelope.type).inc()
            self.metrics.batch_items.labels("sent").observe(len(items))
            for item in items:
                self._published(str(item["type"])).inc()
        return envelope

    def _sealed(self, envelope: protocol.Envelope, peer: str, *, correlation_id: str | None,
                persistent: bool, expiration_s: float | None) -> _Outgoing:
        """The envelope sealed for ``peer``, with the frame's properties built directly (an
        aio_pika.Message costs ~10 us more to build)."""
        body, headers = self.security.seal(envelope, peer)
        return _Outgoing(body, aiormq.spec.Basic.Properties(
            headers=headers,
            message_id=envelope.id,
            message_type=envelope.type,
            correlation_id=correlation_id,
            content_type=c.CONTENT_TYPE,
            delivery_mode=PERSISTENT if persistent else NOT_PERSISTENT,
            expiration=None if expiration_s is None else str(int(expiration_s * 1000)),
        ))

    async def _publish_raw(
        self, exchange: str, routing_key: str, message: aio_pika.Message | _Outgoing, *,
        mandatory: bool,
    ) -> None:
        deadline = time.monotonic() + self.publish_timeout_s
        try:
            if not self._ready.is_set():
                await asyncio.wait_for(self._ready.wait(), self.publish_timeout_s)
            channel = self._publish_underlay
            if channel is None:
                raise TransportError("not connected")
            remaining = max(0.05, deadline - time.monotonic())
            # wait=False: aiormq would hold the channel's lock until this frame reached the
            # socket, one publish per loop turn; without it every publish of a turn is queued
            # at once and leaves in one write (coalesce.py). The confirm is still awaited.
            await channel.basic_publish(
                message.body, exchange=exchange, routing_key=routing_key,
                properties=message.properties, mandatory=mandatory, timeout=remaining,
                wait=False,
            )
            self.last_confirm = time.monotonic()
        except aiormq.exceptions.PublishError as exc:
            self._count_publish_error("unroutable")
            raise Unroutable(f"no queue bound for {exchange!r}/{routing_key!r}") from exc
        except TimeoutError as exc:
            self._count_publish_error("timeout")
            raise PublishTimeout(
                f"publish to {exchange!r} not confirmed within {self.publish_timeout_s:g}s"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            self._count_publish_error("nacked")
            raise TransportError(f"broker refused message for {exchange!r}") from exc
        except BROKER_ERRORS as exc:
            self._count_publish_error("connection")
            raise TransportError(f"publish failed: {type(exc).__name__}") from exc

    async def _send(self, exchange: str, routing_key: str, message: _Outgoing, *,
                    confirm: bool) -> None:
        if confirm:
            await self._publish_raw(exchange, routing_key, message, mandatory=True)
        else:
            await self._publish_written(exchange, routing_key, message)

    async def _publish_written(self, exchange: str, routing_key: str, message: _Outgoing
                               ) -> None:
        """Publish on a channel without confirms; return once the frame is written.

        aiormq resolves a ``wait=True`` publish after its writer has written and drained the
        frame; the coalescing writer sends that write at once, or by a callback scheduled
        before the publisher is woken (coalesce.py), so the bytes are with the kernel by then:
        they reach the broker even if this process dies next. The broker may still lose the
        message (it is not confirmed), and an unroutable one is dropped silently."""
        try:
            if not self._ready.is_set():
                await asyncio.wait_for(self._ready.wait(), self.publish_timeout_s)
            channel = await self._written_channel()
            await channel.basic_publish(
                message.body, exchange=exchange, routing_key=routing_key,
                properties=message.properties, timeout=self.publish_timeout_s, wait=True,
            )
        except TimeoutError as exc:
            self._count_publish_error("timeout")
            raise PublishTimeout(
                f"publish to {exchange!r} not written within {self.publish_timeout_s:g}s"
            ) from exc
        except BROKER_ERRORS as exc:
            self._count_publish_error("connection")
            raise TransportError(f"publish failed: {type(exc).__name__}") from exc

    async def _written_channel(self) -> aiormq.Channel:
        async with self._written_lock:
            if self._written_underlay is None or self._written_underlay.is_closed:
                connection = self._connection
                if connection is None:
                    raise TransportError("not connected")
                channel = await connection.channel(publisher_confirms=False)
                underlay = await channel.get_underlay_channel()
                if not isinstance(underlay, aiormq.Channel):
                    raise TransportError("no channel")
                self._written_underlay = underlay
            return self._written_underlay

    def received_metrics(self, message_type: str) -> tuple[Any, Any]:
        return self._per_type(message_type)

    def _per_type(self, message_type: str) -> tuple[Any, Any]:
        """The received counter and latency histogram of a type: ``labels()`` costs a lock and
        a tuple per call, per message; the children are looked up once."""
        children = self._received_children.get(message_type)
        if children is None:
            assert self.metrics is not None
            children = (self.metrics.messages_received.labels(message_type),
                        self.metrics.message_latency.labels(message_type))
            self._received_children[message_type] = children
        return children

    def _published(self, message_type: str) -> Any:
        child = self._published_children.get(message_type)
        if child is None:
            assert self.metrics is not None
            child = self.metrics.messages_published.labels(message_type)
            self._published_children[message_type] = child
        return child

    def _count_publish_error(self, kind: str) -> None:
        if self.metrics:
            self.metrics.publish_errors.labels(kind).inc()


# --- topology ---------------------------------------------------------------------------------


def coordinator_topology(coordinator: str) -> Topology:
    """Exchanges, the coordinator's queues and its dead-letter queue (idempotent, so agents and
    clients declare them too and may start before the coordinator)."""

    async def declare(channel: AbstractChannel) -> None:
        direct, fanout = aio_pika.ExchangeType.DIRECT, aio_pika.ExchangeType.FANOUT
        inbound = await channel.declare_exchange(c.COORDINATOR_EXCHANGE, direct, durable=True)
        await channel.declare_exchange(c.AGENTS_EXCHANGE, direct, durable=True)
        dlx_name = c.dead_letter_exchange(coordinator)
        dlx = await channel.declare_exchange(dlx_name, fanout, durable=True)
        dlq = await channel.declare_queue(
            c.dead_letter_queue(coordinator), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dlx)
        tasks = await channel.declare_queue(
            c.tasks_queue(coordinator), durable=True, arguments=_durable_arguments(coordinator))
        await tasks.bind(inbound, c.tasks_key(coordinator))
        status = await channel.declare_queue(
            c.status_queue(coordinator),
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-message-ttl": c.STATUS_MESSAGE_TTL_MS,
                "x-max-length": c.STATUS_QUEUE_MAX_LENGTH,
                "x-overflow": "drop-head",
            },
        )
        await status.bind(inbound, c.status_key(coordinator))

    return declare


def _durable_arguments(coordinator: str) -> dict[str, Any]:
    """The tasks queue's and the submission lanes': replicated, poison messages dead-lettered."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": c.TASKS_DELIVERY_LIMIT,
        "x-dead-letter-exchange": c.dead_letter_exchange(coordinator),
    }


def submission_lanes_topology(coordinator: str, principals: Callable[[], Iterable[str]]
                              ) -> Topology:
    """A submission lane per operator, declared (and so routable) only by the coordinator that
    consumes it: a client whose lane is missing is returned its message and uses the tasks
    queue instead (client.py), so nothing waits in a lane that nobody reads."""

    async def declare(channel: AbstractChannel) -> None:
        inbound = await channel.get_exchange(c.COORDINATOR_EXCHANGE, ensure=False)
        for principal in principals():
            lane = await channel.declare_queue(c.submit_queue(coordinator, principal),
                                               durable=True,
                                               arguments=_durable_arguments(coordinator))
            await lane.bind(inbound, c.submit_key(coordinator, principal))

    return declare


def agent_topology(coordinator: str, agent_id: str) -> Topology:
    declare_coordinator = coordinator_topology(coordinator)

    async def declare(channel: AbstractChannel) -> None:
        await declare_coordinator(channel)
        queue = await channel.declare_queue(
            c.agent_queue(coordinator, agent_id),
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-expires": c.AGENT_QUEUE_EXPIRES_MS,
                "x-dead-letter-exchange": c.dead_letter_exchange(coordinator),
            },
        )
        await queue.bind(c.AGENTS_EXCHANGE, c.agent_key(coordinator, agent_id))

    return declare


def lane_for(coordinator: str, message_type: str) -> str:
    """Routing key on COORDINATOR_EXCHANGE for a message type sent to the coordinator."""
    if message_type in c.TELEMETRY_TYPES:
        return c.status_key(coordinator)
    return c.tasks_key(coordinator)


async def delete_namespace(
    broker_url: SecretStr, coordinator: str, agent_ids: list[str] | tuple[str, ...] = (),
    operators: Iterable[str] = (), queues: Iterable[str] = (),
) -> None:
    """Remove a coordinator's queues, its HA streams and its dead-letter exchange (demo, bench
    and test clean-up); ``operators``: whose submission lanes to remove too; ``queues``: other
    queues of the run (a client's reply queue, ``CoordinatorClient.reply_queue``)."""
    connection = await aio_pika.connect(broker_url.get_secret_value(), timeout=10)
    try:
        names = [*c.namespace_queues(coordinator),
                 *(c.agent_queue(coordinator, agent_id) for agent_id in agent_ids),
                 *(c.submit_queue(coordinator, operator) for operator in operators),
                 *queues]
        for name in names:
            channel = await connection.channel()
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.queue_delete(name)
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()
        channel = await connection.channel()
        with contextlib.suppress(*BROKER_ERRORS):
            await channel.exchange_delete(c.dead_letter_exchange(coordinator))
    finally:
        # Often the last thing a test does: let the close callbacks run before its loop ends.
        await close_connection(connection)
