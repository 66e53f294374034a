"""Delivery: one inbound message as the handlers see it, read straight from aiormq.

aio-pika wraps every delivery in an ``IncomingMessage`` that copies some twenty properties
through a guarded ``__setattr__`` and acks by waiting for the frame to be written: about a tenth
of the CPU a status message costs. The handlers use a handful of fields; this reads them from
the frame when asked, and acks without waiting (the ack leaves with the loop turn's other frames,
coalesce.py). Settling twice is a no-op, as with aio-pika's ``processed`` flag.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage


class Delivery:
    __slots__ = ("_channel", "_message", "before_ack", "body", "delivery_tag", "in_batch",
                 "processed", "redelivered")

    def __init__(self, message: DeliveredMessage) -> None:
        self._message = message
        self._channel = message.channel
        self.body: bytes = message.body
        self.delivery_tag: int = message.delivery_tag or 0
        self.redelivered = bool(message.redelivered)
        self.processed = False
        #: Set once the body opened as a ``batch`` (PROTOCOL.md §9.13): its items' handlers
        #: see this delivery. Trusted, unlike the ``type`` property.
        self.in_batch = False
        #: What a handler started that must end before the ack (a submission's answer).
        self.before_ack: list[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        return f"Delivery(tag={self.delivery_tag}, type={self.type!r})"

    # --- properties -----------------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, Any]:
        return self._message.header.properties.headers or {}

    @property
    def message_id(self) -> str | None:
        return self._message.header.properties.message_id

    @property
    def type(self) -> str | None:
        return self._message.header.properties.message_type

    @property
    def correlation_id(self) -> str | None:
        return self._message.header.properties.correlation_id

    @property
    def content_type(self) -> str | None:
        return self._message.header.properties.content_type

    @property
    def exchange(self) -> str | None:
        return self._message.exchange

    @property
    def routing_key(self) -> str | None:
        return self._message.routing_key

    # --- settling --------------------------------------------------------------------------------

    def _settle(self) -> aiormq.Channel | None:
        if self.processed:
            return None
        self.processed = True
        channel = self._channel
        if not isinstance(channel, aiormq.Channel) or channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the delivery's channel is closed")
        return channel

    async def ack(self) -> None:
        channel = self._settle()
        if channel is not None:
            await channel.basic_ack(self.delivery_tag, wait=False)

    async def nack(self, requeue: bool = True) -> None:
        channel = self._settle()
        if channel is not None:
            await channel.basic_nack(self.delivery_tag, requeue=requeue, wait=False)

    async def reject(self, requeue: bool = False) -> None:
        channel = self._settle()
        if channel is not None:
            await channel.basic_reject(self.delivery_tag, requeue=requeue)
