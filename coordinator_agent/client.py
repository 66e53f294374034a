"""CoordinatorClient: submit tasks over AMQP and wait for their results (the operator's side).

Replies come to a queue of the client's own, named once, so they survive reconnects.
``submit_many`` sends many tasks in ``batch`` messages (PROTOCOL.md §9.13); the coordinator then
answers that queue in batches too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from aio_pika.abc import AbstractChannel

from coordinator_agent.exceptions import SubmissionTooLarge, Unroutable, WaitTimeout
from coordinator_agent.settings import Settings
from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.delivery import Delivery
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import MessageHandler, coordinator_topology
from coordinator_agent.wire.security import (
    AuthorizationManager,
    SecurityManager,
    fernet_token_bytes,
)

REPLY_QUEUE_EXPIRES_MS = 5 * 60 * 1000
#: How long a client keeps to the shared tasks queue once told its lane is missing. Short: a
#: client started with its coordinator is told so before the lanes are declared, and a missing
#: lane costs one returned publish per try.
LANE_RETRY_S = 1.0


class CoordinatorClient:
    def __init__(self, settings: Settings, keyring: Keyring, principal_id: str) -> None:
        self.settings = settings
        self.principal_id = principal_id
        self.coordinator_id = settings.name
        self.security = SecurityManager.from_settings(
            settings, keyring.subset(principal_id), principal_id
        )
        self.reply_queue = f"{c.CLIENT_QUEUE_PREFIX}{principal_id}.{uuid.uuid4().hex[:12]}"
        self.messages = MessageHandler(
            settings.broker_url, self.security, name=f"{settings.name}/client:{principal_id}",
            authorizer=AuthorizationManager(self.security),
            publish_timeout_s=settings.limits.publish_timeout_s,
        )
        self.messages.add_topology(self._declare)
        self.messages.consume(self.reply_queue, self._on_reply, prefetch=512,
                              requeue_on_error=False)
        self.accepted: dict[str, protocol.TaskAccepted] = {}
        self.completed: dict[str, protocol.TaskCompleted] = {}
        #: ``escalated`` notices: the task waits for an operator (a final notice follows).
        self.escalated: dict[str, protocol.TaskCompleted] = {}
        #: Every completion notice received, duplicates included (tests count them).
        self.notices: list[protocol.TaskCompleted] = []
        self._waiters: dict[str, list[asyncio.Future[protocol.TaskCompleted]]] = {}
        self._final_waiters: set[asyncio.Future[protocol.TaskCompleted]] = set()
        #: Submissions go to this operator's own lane (PROTOCOL.md §4); while the broker says
        #: there is none, to the shared tasks queue.
        self._lane_missing_until = 0.0

    async def _declare(self, channel: AbstractChannel) -> None:
        await coordinator_topology(self.coordinator_id)(channel)
        await channel.declare_queue(
            self.reply_queue, durable=False, auto_delete=False,
            arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS, "x-queue-type": "classic"},
        )

    async def __aenter__(self) -> CoordinatorClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.messages.start()

    async def close(self) -> None:
        """Disconnect, deleting the reply queue: its name is this client's alone, so whatever
        came to it later would wait unread until it expired (the coordinator keeps a result
        whose reply queue is gone for the API)."""
        await self.messages.close(delete_queues=[self.reply_queue])

    async def submit(
        self,
        description: str,
        *,
        kind: str | None = None,
        required_capabilities: list[str] | None = None,
        input: Any = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        task_id: str | None = None,
        priority: protocol.PriorityName | int | None = None,
        labels: list[str] | None = None,
        **fields: Any,
    ) -> str:
        """Publish a task.submit (confirmed by the broker); returns the task id.

        ``fields`` are the other ``task.submit`` fields, e.g. ``subtasks=[...]``,
        ``steps=[...]``, ``decompose=True``, ``on_subtask_error="skip"`` (see PROTOCOL.md);
        pydantic's ValidationError says what is wrong with them before anything is sent, and
        SubmissionTooLarge refuses a task the coordinator would drop for its size.
        """
        task_id = task_id or uuid.uuid4().hex
        spec = protocol.TaskSubmit(
            task_id=task_id, description=description, kind=kind,
            required_capabilities=required_capabilities or [], input=input,
            timeout_s=timeout_s, max_retries=max_retries, reply_to=self.reply_queue,
            priority=priority, labels=labels or [], **fields,
        )
        encoded = protocol.encode(protocol.make_envelope(spec, sender=self.principal_id))
        size = fernet_token_bytes(len(encoded))
        if size > self.security.max_message_bytes:
            raise SubmissionTooLarge(size, self.security.max_message_bytes)
        if self._lane_missing_until <= time.monotonic():
            try:
                await self.messages.publish(spec, peer=self.coordinator_id,
                                            exchange=c.COORDINATOR_EXCHANGE,
                                            routing_key=c.submit_key(self.coordinator_id,
                                                                     self.principal_id))
                return task_id
            except Unroutable:  # no lane for us (an older coordinator, or a newer operator)
                self._lane_missing_until = time.monotonic() + LANE_RETRY_S
        await self.messages.publish(spec, peer=self.coordinator_id,
                                    exchange=c.COORDINATOR_EXCHANGE,
                                    routing_key=c.tasks_key(self.coordinator_id))
        return task_id

    async def submit_many(self, tasks: Iterable[Mapping[str, Any]]) -> list[str]:
        """Submit several tasks in as few sealed messages as the limits allow (``batch``
        messages of up to 64 items, PROTOCOL.md §9.13); returns their ids, in order.

        Each mapping holds ``task.submit`` fields (``description`` at least). Every task gets
        its own id, ``task.accepted`` and ``task.completed`` (``wait``), as with ``submit``.
        All are checked before anything is sent: pydantic's ValidationError, or
        SubmissionTooLarge for a task over the size limit even alone.
        """
        specs = [protocol.TaskSubmit(**{**fields, "task_id": fields.get("task_id")
                                        or uuid.uuid4().hex, "reply_to": self.reply_queue})
                 for fields in tasks]
        items = [batch.item_of(spec) for spec in specs]
        limit = self.security.max_message_bytes
        for item in items:
            size = fernet_token_bytes(batch.ENVELOPE_OVERHEAD_BYTES + batch.item_bytes(item))
            if size > limit:
                raise SubmissionTooLarge(size, limit)
        for chunk in batch.split(items, limit=batch.MAX_BATCH_ITEMS, max_bytes=limit):
            await self._publish_submission(chunk)
        return [spec.task_id or "" for spec in specs]

    async def _publish_submission(self, items: list[dict[str, Any]]) -> None:
        """One batch to this operator's lane, or to the tasks queue while it has none."""
        if self._lane_missing_until <= time.monotonic():
            try:
                await self.messages.publish_batch(
                    items, peer=self.coordinator_id, exchange=c.COORDINATOR_EXCHANGE,
                    routing_key=c.submit_key(self.coordinator_id, self.principal_id))
                return
            except Unroutable:
                self._lane_missing_until = time.monotonic() + LANE_RETRY_S
        await self.messages.publish_batch(
            items, peer=self.coordinator_id, exchange=c.COORDINATOR_EXCHANGE,
            routing_key=c.tasks_key(self.coordinator_id))

    async def wait(self, task_id: str, timeout: float | None = None, *,
                   final: bool = False) -> protocol.TaskCompleted:
        """The task's outcome, or an ``escalated`` notice: it waits for an operator (its
        ``attempts`` are the chain so far). ``final=True`` waits past escalation.
        WaitTimeout (a TimeoutError) after ``timeout`` seconds."""
        done = self.completed.get(task_id)
        if done is None and not final:
            done = self.escalated.get(task_id)
        if done is not None:
            return done
        future: asyncio.Future[protocol.TaskCompleted] = asyncio.get_running_loop().create_future()
        if final:
            self._final_waiters.add(future)  # an escalated notice does not end this wait
        self._waiters.setdefault(task_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise WaitTimeout(task_id, timeout) from None
        finally:
            waiters = self._waiters.get(task_id, [])
            if future in waiters:
                waiters.remove(future)
            self._final_waiters.discard(future)

    async def _on_reply(
        self, envelope: protocol.Envelope, message: Delivery
    ) -> None:
        payload = envelope.payload
        if isinstance(payload, protocol.TaskAccepted):
            self.accepted[payload.task_id] = payload
        elif isinstance(payload, protocol.TaskCompleted):
            self.notices.append(payload)
            if payload.status == "escalated":
                # Not final: ``wait`` returns it (the chain so far); a final notice follows.
                self.escalated[payload.task_id] = payload
            else:
                self.completed.setdefault(payload.task_id, payload)
            waiting = self._waiters.pop(payload.task_id, [])
            if payload.status == "escalated":
                keep = [f for f in waiting if f in self._final_waiters]
                waiting = [f for f in waiting if f not in self._final_waiters]
                if keep:
                    self._waiters[payload.task_id] = keep
            for future in waiting:
                if not future.done():
                    future.set_result(payload)

