"""TurnBatcher: the messages of one loop turn for one destination leave as one batch.

Senders ``await send(...)`` as they would ``publish``; the message waits in a list until the end
of the loop turn (``call_soon``, never a timer: an idle sender adds one loop turn, microseconds).
Then each destination's messages go out as one ``batch`` message (batch.py), split by the
peer's limit and the size limit, or alone when there is just one; every sender's ``send``
returns once the broker has confirmed the message that carried it (or, for a destination
that does not wait for confirms, once it is written), or raises its error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire.messaging import MessageHandler


class Destination(NamedTuple):
    peer: str
    exchange: str
    routing_key: str
    persistent: bool
    #: Let the broker drop it after this long (telemetry); None: never.
    expiration_s: float | None = None
    #: Wait for the broker's confirm; False: only until it is written (messaging.py).
    confirm: bool = True


class _Waiting(NamedTuple):
    payload: protocol.Model
    correlation_id: str | None
    done: asyncio.Future[None]


class TurnBatcher:
    def __init__(self, messages: MessageHandler, limit: Callable[[Destination], int]) -> None:
        self.messages = messages
        #: Most items per batch to a destination: 1 sends everything alone (the old shape).
        self.limit = limit
        self._waiting: dict[Destination, list[_Waiting]] = {}
        self._scheduled = False
        self._publishing: set[asyncio.Task[None]] = set()
        #: Batches sent, and the messages they carried (the ratio is the batching achieved).
        self.batches = 0
        self.batched = 0

    async def send(self, payload: protocol.Model, destination: Destination, *,
                   correlation_id: str | None = None) -> None:
        """Publish ``payload`` with this turn's others for the same destination."""
        if self.limit(destination) <= 1:  # it takes no batches: no reason to wait
            await self.messages.publish(
                payload, peer=destination.peer, exchange=destination.exchange,
                routing_key=destination.routing_key, persistent=destination.persistent,
                correlation_id=correlation_id, expiration_s=destination.expiration_s,
                confirm=destination.confirm)
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.setdefault(destination, []).append(_Waiting(payload, correlation_id, done))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        await done

    def _flush(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, {}
        for destination, messages in waiting.items():
            limit = self.limit(destination) if len(messages) > 1 else 1
            if limit <= 1:
                for message in messages:
                    self._spawn(self._alone(destination, message))
                continue
            items = [batch.item_of(m.payload, correlation_id=m.correlation_id) for m in messages]
            start = 0
            max_bytes = self.messages.security.max_message_bytes  # the limits agree (§15)
            for chunk in batch.split(items, limit=limit, max_bytes=max_bytes):
                carried = messages[start:start + len(chunk)]
                start += len(chunk)
                if len(chunk) == 1:
                    self._spawn(self._alone(destination, carried[0]))
                else:
                    self._spawn(self._together(destination, chunk, carried))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _alone(self, destination: Destination, message: _Waiting) -> None:
        try:
            await self.messages.publish(
                message.payload, peer=destination.peer, exchange=destination.exchange,
                routing_key=destination.routing_key, persistent=destination.persistent,
                correlation_id=message.correlation_id, expiration_s=destination.expiration_s,
                confirm=destination.confirm)
        except Exception as exc:  # handed to the sender, who decides
            _settle(message.done, exc)
        else:
            _settle(message.done, None)

    async def _together(self, destination: Destination, items: list[dict[str, Any]],
                        carried: list[_Waiting]) -> None:
        try:
            await self.messages.publish_batch(
                items, peer=destination.peer, exchange=destination.exchange,
                routing_key=destination.routing_key, persistent=destination.persistent,
                expiration_s=destination.expiration_s, confirm=destination.confirm)
        except Exception as exc:  # handed to every sender it carried
            for message in carried:
                _settle(message.done, exc)
            return
        self.batches += 1
        self.batched += len(carried)
        for message in carried:
            _settle(message.done, None)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return  # its sender was cancelled
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
