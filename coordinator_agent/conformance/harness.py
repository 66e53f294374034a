"""The kit's coordinator side: one broker connection that listens like a coordinator, records
everything it hears, seals directives like one, and can also send what no coordinator would
(wrong keys, replayed or stale tokens) to see them refused.

It declares the coordinator's topology for its name and consumes the tasks and status queues, so
it refuses to start while a coordinator of that name consumes them. It takes only what the peer
under test sends, and only the dead letters of its own traffic: anything else it leaves unacked,
and the broker gives it back to the queue when the kit disconnects. So a kit pointed at a real
deployment's name by mistake loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from cryptography.fernet import Fernet

from coordinator_agent.exceptions import ConfigError, RejectedMessage, TransportError
from coordinator_agent.settings import Settings
from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import (
    BROKER_ERRORS,
    close_connection,
    coordinator_topology,
)
from coordinator_agent.wire.security import AuthorizationManager, SecurityManager


@dataclass(frozen=True)
class Heard:
    """A message the kit accepted, with the properties it arrived with."""

    at: float  # monotonic time of arrival
    envelope: protocol.Envelope
    routing_key: str
    delivery_mode: int
    content_type: str | None
    message_id: str | None
    #: For an item of a batch (PROTOCOL.md §9.13): the batch's envelope id.
    batch_id: str | None = None


@dataclass(frozen=True)
class Refused:
    """A message the kit refused, as a coordinator would have (reason as in PROTOCOL.md §13)."""

    at: float
    sender: str  # the x-ca-sender header: unauthenticated, but all there is
    reason: str
    detail: str


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    message_id: str
    #: One refused item of a batch: its index (``x-ca-reject-item``); None for a whole message.
    item: int | None = None


@dataclass(frozen=True)
class HeardBatch:
    """A batch the peer sent: where, and how many items of which types."""

    at: float
    routing_key: str
    types: tuple[str, ...]


@dataclass(repr=False)
class Harness:
    settings: Settings
    keyring: Keyring
    #: The principal under test: the only sender whose messages the kit takes.
    peer: str
    heard: list[Heard] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    batches: list[HeardBatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.settings.name
        self.security = SecurityManager.from_settings(self.settings, self.keyring, self.name)
        self.authorizer = AuthorizationManager(self.security)
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._changed = asyncio.Event()
        self._sent_ids: set[str] = set()  # envelope ids the kit published
        #: Messages left for someone else (unacked until the kit disconnects).
        self.left_alone = 0
        #: The agent process's session, the id of its agent.hello: a task.assign carries it as
        #: its correlation id, as the coordinator's do (PROTOCOL.md §9.7), or the agent drops it.
        self.session: str | None = None

    def __repr__(self) -> str:
        return f"Harness(name={self.name!r}, peer={self.peer!r})"

    def require_peer(self, principal: str, role: str) -> None:
        """The principal under test must be a ``role`` of the keyring, and this harness's peer."""
        entry = self.keyring.get(principal)
        if entry is None or entry.role != role:
            raise ConfigError(f"{principal!r} is not an {role} in the kit's keyring: the kit "
                              "needs the coordinator's whole keyring")
        if self.peer != principal:
            raise ValueError(f"the harness takes messages from {self.peer!r}, not {principal!r}")

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        url = self.settings.broker_url.get_secret_value()
        try:
            connection = await aio_pika.connect(
                url, timeout=10, client_properties={"connection_name": f"{self.name}/conformance"})
            self._connection = connection
            channel = await connection.channel(publisher_confirms=True,
                                                     on_return_raises=True)
            await coordinator_topology(self.name)(channel)
            self._channel = channel
            tasks = await self.queue_state(c.tasks_queue(self.name))
            if tasks is not None and tasks[1] > 0:
                raise ConfigError(
                    f"a coordinator named {self.name!r} is consuming its queues: run the kit "
                    "(and the implementation under test) under a name of their own, e.g. "
                    "--name conformance")
            for queue_name in (c.tasks_queue(self.name), c.status_queue(self.name)):
                consumer = await connection.channel()
                await consumer.set_qos(prefetch_count=256)
                queue = await consumer.get_queue(queue_name, ensure=False)
                await queue.consume(self._on_message)
        except BROKER_ERRORS as exc:
            await self.close()
            raise TransportError(f"conformance kit cannot use the broker: {exc}") from exc

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await close_connection(connection)

    # --- inbound ------------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.monotonic()
        header = (message.headers or {}).get(c.HEADER_SENDER)
        sender = header.decode() if isinstance(header, bytes) else str(header or "")
        if sender != self.peer:
            self.left_alone += 1  # not ours to take: it goes back when the kit disconnects
            return
        try:
            envelope = self.security.open(message.body, message.headers,
                                          redelivered=bool(message.redelivered))
            self.authorizer.authorize(envelope)
        except RejectedMessage as exc:
            self.refused.append(Refused(now, sender, exc.reason, exc.detail))
        else:
            if envelope.type == batch.BATCH_TYPE:
                self._hear_batch(now, envelope, message)
            else:
                self.heard.append(Heard(now, envelope, message.routing_key or "",
                                        int(message.delivery_mode or 0), message.content_type,
                                        message.message_id))
        with contextlib.suppress(*BROKER_ERRORS):
            await message.ack()
        self._changed.set()

    def _hear_batch(self, now: float, envelope: protocol.Envelope,
                    message: AbstractIncomingMessage) -> None:
        """Each item as a message of its own, checked as the coordinator would (§9.13)."""
        types = []
        for item in batch.open_items(envelope):
            try:
                if item.error is not None:
                    raise item.error
                assert item.envelope is not None
                self.security.check_item(envelope.sender, item.envelope.id,
                                         redelivered=bool(message.redelivered))
                self.authorizer.authorize(item.envelope)
            except RejectedMessage as exc:
                self.refused.append(Refused(now, envelope.sender, exc.reason, exc.detail))
                continue
            types.append(item.envelope.type)
            self.heard.append(Heard(now, item.envelope, message.routing_key or "",
                                    int(message.delivery_mode or 0), message.content_type,
                                    message.message_id, batch_id=envelope.id))
        self.batches.append(HeardBatch(now, message.routing_key or "", tuple(types)))

    def messages(self, sender: str, *types: str) -> list[Heard]:
        return [h for h in self.heard
                if h.envelope.sender == sender and (not types or h.envelope.type in types)]

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds (re-checked on every message and every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
        return True

    async def read_dead_letters(self) -> list[DeadLetter]:
        """Take what the peer dead-lettered since the last call (PROTOCOL.md §14)."""
        queue = await self._get_queue(c.dead_letter_queue(self.name))
        while True:
            try:
                message = await queue.get(no_ack=False, fail=False, timeout=5)
            except BROKER_ERRORS as exc:
                raise TransportError(f"cannot read the dead-letter queue: {exc}") from exc
            if message is None:
                return self.dead_letters
            if str(message.message_id or "") not in self._sent_ids:
                self.left_alone += 1  # someone else's: stays unacked, back when we disconnect
                continue
            with contextlib.suppress(*BROKER_ERRORS):
                await message.ack()
            reason = (message.headers or {}).get(c.HEADER_REJECT_REASON)
            reason = reason.decode() if isinstance(reason, bytes) else str(reason or "")
            item = (message.headers or {}).get(c.HEADER_REJECT_ITEM)
            self.dead_letters.append(DeadLetter(reason, str(message.message_id or ""),
                                                item if isinstance(item, int) else None))

    async def wait_for_dead_letters(self, expected: dict[str, str], timeout: float) -> dict[
            str, str | None]:
        """message id -> the reason it was dead-lettered with (None: not dead-lettered)."""
        deadline = time.monotonic() + timeout
        while True:
            found = {d.message_id: d.reason for d in await self.read_dead_letters()}
            if all(i in found for i in expected) or time.monotonic() > deadline:
                return {i: found.get(i) for i in expected}
            await asyncio.sleep(0.1)

    async def queue_state(self, name: str) -> tuple[int, int] | None:
        """(messages, consumers) of a queue, or None if it does not exist."""
        if self._connection is None:
            raise TransportError("not connected")
        channel = await self._connection.channel()  # a failed passive declare closes it
        try:
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()

    async def _get_queue(self, name: str) -> AbstractQueue:
        if self._channel is None:
            raise TransportError("not connected")
        return await self._channel.get_queue(name, ensure=False)

    # --- outbound -----------------------------------------------------------------------------

    def seal(self, payload: protocol.Model, peer: str, *, message_id: str | None = None,
             stamped_at: int | None = None, key: Fernet | None = None,
             sender_header: str | None = None) -> tuple[str, bytes, dict[str, Any]]:
        """(envelope id, body, headers) as the coordinator would send them to ``peer``; or, with
        the keyword arguments, a token under another key, time or sender header."""
        session = self.session if isinstance(payload, protocol.TaskAssign) else None
        envelope = protocol.make_envelope(payload, sender=self.name, message_id=message_id,
                                          correlation_id=session)
        if key is None and stamped_at is None:
            body, headers = self.security.seal(envelope, peer)
        else:
            key = key or self.peer_key(peer)
            plain = protocol.encode(envelope)
            body = key.encrypt_at_time(plain, stamped_at) if stamped_at else key.encrypt(plain)
            headers = {c.HEADER_SENDER: self.name}
        if sender_header is not None:
            headers = {c.HEADER_SENDER: sender_header}
        return envelope.id, body, headers

    def peer_key(self, peer: str) -> Fernet:
        """The key a peer reads with: the newest of its list, the one it also writes with."""
        principal = self.keyring.get(peer)
        if principal is None:
            raise ConfigError(f"the keyring has no principal {peer!r}")
        return Fernet(principal.keys[0].get_secret_value())

    async def publish(self, exchange: str, routing_key: str, body: bytes,
                      headers: dict[str, Any], *, message_id: str, message_type: str,
                      persistent: bool = True) -> None:
        if self._channel is None:
            raise TransportError("not connected")
        self._sent_ids.add(message_id)
        message = aio_pika.Message(
            body, headers=headers, message_id=message_id, type=message_type,
            content_type=c.CONTENT_TYPE,
            delivery_mode=(aio_pika.DeliveryMode.PERSISTENT if persistent
                           else aio_pika.DeliveryMode.NOT_PERSISTENT))
        try:
            target = (self._channel.default_exchange if exchange == ""
                      else await self._channel.get_exchange(exchange, ensure=False))
            await target.publish(message, routing_key, mandatory=True,
                                 timeout=self.settings.limits.publish_timeout_s)
        except (*BROKER_ERRORS, TimeoutError) as exc:
            raise TransportError(f"publish to {exchange!r}/{routing_key!r} failed: "
                                 f"{type(exc).__name__}") from exc

    async def batch_to_agent(self, agent_id: str, items: list[dict[str, Any]]) -> str:
        """Seal ``items`` (``batch.item_of``, or deliberately broken ones) as one ``batch`` to
        an agent, as the coordinator would (§9.13); returns the batch's id."""
        envelope = protocol.make_envelope(protocol.Batch(items=items), sender=self.name)
        body, headers = self.security.seal(envelope, agent_id)
        await self.publish(c.AGENTS_EXCHANGE, c.agent_key(self.name, agent_id), body, headers,
                           message_id=envelope.id, message_type=batch.BATCH_TYPE)
        return envelope.id

    async def to_agent(self, agent_id: str, payload: protocol.Model, **seal: Any) -> str:
        """Seal (see ``seal``) and publish a directive to an agent's queue; returns its id."""
        message_id, body, headers = self.seal(payload, agent_id, **seal)
        message_type = protocol.TYPE_OF_PAYLOAD[type(payload)]
        await self.publish(c.AGENTS_EXCHANGE, c.agent_key(self.name, agent_id), body, headers,
                           message_id=message_id, message_type=message_type,
                           persistent=message_type == "task.assign")
        return message_id
