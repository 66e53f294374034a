"""A leadership lease on the broker alone, for HA without Consul.

Every candidate consumes the quorum queue ``ca.<name>.leader`` with single-active-consumer: the
broker delivers only to one of them, and holds a token message there. Whoever holds a token
delivery (unacked) leads. When its connection closes (a crash: at once; a pause or a partition:
after the broker misses two heartbeats) the token goes back to the queue and to the next active
consumer. A graceful release closes the channel, which does the same at once.

The **epoch** is the offset of a marker the new leader appends to the stream
``ca.<name>.epochs`` and reads back: stream offsets only grow, across terms and restarts.

The holder proves its connection every ``ttl / 3`` with a round trip and believes it leads only
while the last one is younger than ``ttl - margin``; the broker cannot pass the token on before
it has missed two heartbeats (``heartbeat_s``, at least ``ttl / 2``). Details and failure modes:
docs/HA.md, "Broker-only election".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from coordinator_agent.exceptions import DiscoveryError
from coordinator_agent.ha.lease import HolderClock, Term
from coordinator_agent.wire.constants import epochs_queue, leader_queue

log = logging.getLogger(__name__)

#: The holder swaps its token for a fresh one this often: the broker closes a channel that
#: holds a delivery unacked past ``consumer_timeout`` (30 min by default; per queue only from
#: RabbitMQ 3.12), which would hand leadership over for nothing.
TOKEN_REFRESH_S = 60.0


class BrokerLease(HolderClock):
    def __init__(self, url: str, name: str, holder: str, *, ttl_s: float = 2.0,
                 margin_s: float = 0.3, timeout_s: float = 2.0) -> None:
        if ttl_s <= 2 * margin_s:
            raise ValueError(f"ttl_s ({ttl_s}) must exceed twice margin_s ({margin_s})")
        self.url = url
        self.key = leader_queue(name)
        self.epochs = epochs_queue(name)
        self.holder = holder
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.timeout_s = timeout_s
        # The broker drops a silent peer after two missed heartbeats: never before ttl_s.
        self.heartbeat_s = max(1, round(ttl_s / 2 + 0.49))
        self.term: Term | None = None
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._tokens: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Event()
        self._renewed_at = 0.0
        self._refreshed_at = 0.0

    def __repr__(self) -> str:
        return f"BrokerLease(key={self.key!r}, holder={self.holder!r}, term={self.term!r})"

    async def acquire(self) -> Term | None:
        """Join the queue if we have not; our term once the broker has handed us the token."""
        started = time.monotonic()
        await self._join()
        if not self._tokens:
            return None
        epoch = await self._mark_epoch()
        self.term = Term(self.holder, epoch)
        self._renewed_at = self._refreshed_at = started
        log.info("leadership acquired on the broker: %s, epoch %d", self.key, epoch)
        return self.term

    async def current(self, *, index: int | None = None, wait_s: float | None = None
                      ) -> dict[str, Any] | None:
        """Consul-shaped for the campaign: someone else holds it while we have no token.

        With ``index``, wait until the token reaches us (or ``wait_s`` ends).
        """
        if index is not None and not self._tokens:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait_s or 10)
        if self._tokens:
            return None  # free for us: the campaign tries again at once
        return {"Session": "another candidate", "ModifyIndex": 0}

    async def renew(self) -> bool:
        """A round trip on our channel; False once the channel (and so the token) is gone."""
        channel = self._channel
        if channel is None or channel.is_closed or not self._tokens:
            self._lost("the broker closed our channel")
            return False
        started = time.monotonic()
        try:
            await asyncio.wait_for(channel.declare_queue(self.key, passive=True), self.timeout_s)
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            if channel.is_closed:
                self._lost("the broker closed our channel")
                return False
            raise DiscoveryError("broker/lease", repr(exc)) from exc
        self._renewed_at = started
        if started - self._refreshed_at >= TOKEN_REFRESH_S:
            self._refreshed_at = started
            await self._publish_token(channel)  # it reaches us; _on_token acks the old one
        return True

    async def release(self) -> None:
        """Hand over at once: closing the channel returns the token to the next consumer."""
        self.term = None
        self._tokens.clear()
        self._arrived.clear()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        await self.release()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    # --- the broker ---------------------------------------------------------------------------

    async def _join(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            return
        try:
            if self._connection is None or self._connection.is_closed:
                # Not a robust connection: one that reconnected by itself would bring the
                # consumer back behind our back; a lost channel must mean a lost lease.
                self._connection = await aio_pika.connect(
                    self.url, heartbeat=self.heartbeat_s,
                    client_properties={"connection_name": f"{self.holder}/leader"})
            channel = await self._connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=10)
            queue = await self._declare(channel)
            await channel.declare_queue(self.epochs, durable=True, arguments={
                "x-queue-type": "stream", "x-max-length-bytes": 1024**2,
                "x-stream-max-segment-size-bytes": 100_000})
            self._tokens.clear()
            self._arrived.clear()
            self._channel = channel
            await queue.consume(self._on_token, no_ack=False)
            # A token for the queue, in case there is none (a new queue, or one purged): extras
            # reach the holder too, which acks all but one.
            await self._publish_token(channel)
        except (aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
            raise DiscoveryError("broker/lease", repr(exc)) from exc

    async def _declare(self, channel: AbstractChannel) -> AbstractQueue:
        arguments: dict[str, Any] = {"x-queue-type": "quorum", "x-single-active-consumer": True}
        transport = getattr(self._connection, "transport", None)
        properties = getattr(getattr(transport, "connection", None), "server_properties", {})
        version = str(properties.get("version", ""))
        if version[:1].isdigit() and int(version.split(".", maxsplit=1)[0]) >= 4:
            # 4.0 made 20 the default delivery limit: the token would be dropped after 20
            # handovers. -1 is unlimited there; before 4.0 no limit is the default (and -1 is
            # not "unlimited"), so the argument is left out.
            arguments["x-delivery-limit"] = -1
        return await channel.declare_queue(self.key, durable=True, arguments=arguments)

    async def _publish_token(self, channel: AbstractChannel) -> None:
        await channel.default_exchange.publish(
            aio_pika.Message(self.holder.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.key)

    async def _on_token(self, message: AbstractIncomingMessage) -> None:
        # Hold the newest token, ack the others: one token stays, whoever published it.
        self._tokens.append(message)
        while len(self._tokens) > 1:
            with contextlib.suppress(Exception):
                await self._tokens.pop(0).ack()
        self._arrived.set()

    async def _mark_epoch(self) -> int:
        channel = self._channel
        assert channel is not None
        marker = uuid.uuid4().hex
        await channel.default_exchange.publish(aio_pika.Message(
            marker.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.epochs)
        found: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_marker(message: AbstractIncomingMessage) -> None:
            await message.ack()
            offset = (message.headers or {}).get("x-stream-offset")
            if message.body == marker.encode() and isinstance(offset, int) and not found.done():
                found.set_result(offset)

        assert self._connection is not None
        reader = await self._connection.channel()
        try:
            await reader.set_qos(prefetch_count=100)
            queue = await reader.get_queue(self.epochs, ensure=False)
            await queue.consume(on_marker, no_ack=False, arguments={"x-stream-offset": "first"})
            return await asyncio.wait_for(found, 10 * self.timeout_s) + 1  # epochs start at 1
        finally:
            with contextlib.suppress(Exception):
                await reader.close()

    def _lost(self, reason: str) -> None:
        if self.term is not None:
            log.warning("leadership lost: %s", reason)
        self.term = None
        self._tokens.clear()
        self._arrived.clear()
