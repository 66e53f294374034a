"""What the coordinator sends: directives to agents and notices to clients.

``task.completed`` goes out from the store (an outbox): a task is marked ``notified`` only once the
broker confirmed the notice, and the sweep sends again whatever is terminal and not yet notified.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.tasks import Attempt, TaskRecord
from coordinator_agent.exceptions import StoreError, TransportError, Unroutable
from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.batching import Destination, TurnBatcher
from coordinator_agent.wire.messaging import MessageHandler

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]
#: Reply queues remembered as taking batches (each client instance has its own).
MAX_BATCH_REPLY_QUEUES = 10_000


def completed_notice(task: TaskRecord) -> protocol.TaskCompleted:
    return protocol.TaskCompleted(
        task_id=task.id,
        status=task.status.value,
        output=task.output,
        error=task.error,
        attempts=[
            protocol.AttemptSummary(attempt=a.number, agent_id=a.agent_id,
                                    outcome=a.outcome.value, error=a.error,
                                    duration_s=a.duration_s)
            for a in task.attempts
        ],
    )


class Outbox:
    def __init__(self, name: str, state: StateManager, messages: MessageHandler,
                 spawn: Spawn) -> None:
        self.name = name
        self.state = state
        self.messages = messages
        self.spawn = spawn
        #: The epoch directives carry (PROTOCOL.md §10.7); None without HA: the field is left out.
        self.epoch: Callable[[], int | None] = lambda: None
        #: False once deposed: a directive still on its way out (a retry, a spawned send) is
        #: dropped, not published with a stale epoch (agents would refuse it anyway).
        self.leading: Callable[[], bool] = lambda: True
        #: Until every change recorded so far is durable: committed to the store (group
        #: commit, store.py) or, HA, confirmed by the log (ha/replication.py). Nothing leaves
        #: before the changes it announces are durable. None: writes are durable at once.
        self.barrier: Callable[[], Awaitable[None]] | None = None
        #: Notices on their way out: the sweep's retry does not send a second copy meanwhile.
        self._notifying: set[str] = set()
        #: An agent's assignments of one loop turn leave as one batch if it announced that it
        #: takes them (PROTOCOL.md §9.13), else one by one as always.
        self.assignments = TurnBatcher(messages, self._batch_limit)
        #: Reply queues of clients that submitted a batch, so take batches (most recent last):
        #: their replies of one loop turn leave as one batch too.
        self._batch_reply_queues: OrderedDict[str, None] = OrderedDict()
        self.replies = TurnBatcher(messages, self._reply_limit)
        #: Answers to clients (accepted, rejected) being published now: bounded by the lanes'
        #: prefetch, since a submission is acked only once answered (intake.py).
        self.answering = 0

    def _batch_limit(self, to: Destination) -> int:
        agent = self.state.agents.get(to.peer)
        return 1 if agent is None else batch.limit_of(agent.capabilities)

    def takes_batches(self, reply_queue: str) -> None:
        """A client submitted a batch naming this reply queue: it reads batches."""
        queues = self._batch_reply_queues
        queues[reply_queue] = None
        queues.move_to_end(reply_queue)
        while len(queues) > MAX_BATCH_REPLY_QUEUES:
            queues.popitem(last=False)

    def _reply_limit(self, to: Destination) -> int:
        return batch.MAX_BATCH_ITEMS if to.routing_key in self._batch_reply_queues else 1

    async def _durable(self) -> bool:
        """Wait until durable; False when this process may not send any more. Raises
        TransportError when not durable (yet): the callers' retry path."""
        if self.barrier is not None:
            try:
                await self.barrier()  # TransportError: the log refused a batch
            except StoreError as exc:  # a failed commit, held until the disk takes it
                raise TransportError(f"not sent before it is stored: {exc}") from exc
        return self.leading()

    # --- to agents ----------------------------------------------------------------------------

    async def assignment(self, task: TaskRecord, attempt: Attempt) -> None:
        """Publish ``task.assign``; raises TransportError (Unroutable: the agent has no queue)."""
        if not self.leading() or not await self._durable():
            log.info("assignment of %s not sent: no longer the leader", task.id)
            return
        assign = protocol.TaskAssign(
            task_id=task.id, attempt=attempt.number, description=task.description,
            input=task.input, timeout_s=task.timeout_s, epoch=self.epoch(),
        )
        await self.assignments.send(
            assign, Destination(attempt.agent_id, c.AGENTS_EXCHANGE,
                                c.agent_key(self.name, attempt.agent_id), persistent=True),
            # The agent process it is for: another process of the agent drops it unrun.
            correlation_id=attempt.session,
        )

    def quarantined(self, task: TaskRecord) -> None:
        """Park a poison task on the dead-letter queue, with its reason, for an operator."""
        self.spawn(self._park(task))

    async def _park(self, task: TaskRecord) -> None:
        last = task.attempts[-1] if task.attempts else None
        if last is None:
            return
        assign = protocol.TaskAssign(
            task_id=task.id, attempt=last.number, description=task.description,
            input=task.input, timeout_s=task.timeout_s, epoch=self.epoch())
        detail = task.error or "poison task"
        with contextlib.suppress(TransportError):
            if not await self._durable():
                return
            await self.messages.park(assign, peer=last.agent_id, reason="poison_task",
                                     detail=detail, exchange=c.AGENTS_EXCHANGE,
                                     routing_key=c.agent_key(self.name, last.agent_id))

    async def to_agent(self, agent_id: str, payload: protocol.Model) -> None:
        """A best-effort directive (cancel, drain): lost with the agent's queue, which is fine.
        It carries this term's epoch (fencing), whoever built it."""
        if not self.leading():
            return  # deposed: directives are the new leader's to send
        epoch = self.epoch()
        if epoch is not None and getattr(payload, "epoch", epoch) is None:
            payload = payload.model_copy(update={"epoch": epoch})
        with contextlib.suppress(TransportError):
            if not await self._durable():
                return
            await self.messages.publish(
                payload, peer=agent_id, exchange=c.AGENTS_EXCHANGE,
                routing_key=c.agent_key(self.name, agent_id), persistent=False,
            )

    def cancel_attempt(self, task: TaskRecord, attempt: Attempt, reason: str) -> None:
        cancel = protocol.TaskCancel(task_id=task.id, attempt=attempt.number, reason=reason,
                                     epoch=self.epoch())
        self.spawn(self.to_agent(attempt.agent_id, cancel))

    # --- to clients ---------------------------------------------------------------------------

    def reply(self, queue: str, principal: str, payload: protocol.Model) -> None:
        """A best-effort notice to a client's reply queue, sent in the background."""
        self.spawn(self.answer(queue, principal, payload))

    async def answer(self, queue: str, principal: str, *payloads: protocol.Model) -> None:
        """Best-effort notices to a client's reply queue, in order, each until the broker
        confirmed or refused it (in one batch with the turn's others if the client reads
        batches). Intake awaits this before acking a submission (intake.py)."""
        self.answering += 1
        try:
            with contextlib.suppress(TransportError):
                if not await self._durable():
                    return
                for payload in payloads:
                    await self.replies.send(payload, Destination(principal, "", queue,
                                                                 persistent=True))
        finally:
            self.answering -= 1

    def completed(self, task: TaskRecord) -> None:
        if task.id not in self._notifying:
            self.spawn(self.notify(task))

    async def notify(self, task: TaskRecord) -> None:
        """Send task.completed from the store; marked sent only once confirmed."""
        self._notifying.add(task.id)
        try:
            await self._notify(task)
        finally:
            self._notifying.discard(task.id)

    async def _notify(self, task: TaskRecord) -> None:
        if self.state.tasks.get(task.id) is not task:
            return  # memory was rolled back or moved on; the sweep sends the current one
        # Only what the store holds is announced. Memory never runs ahead of the store (a
        # write it refuses puts a new record in memory, read from the store), so the record in
        # memory is the stored one, on disk (or in the log) once ``_durable`` returns.
        if not task.status.terminal or task.notified:
            return
        try:
            if not await self._durable():
                return  # deposed: the new leader sends it from its store
        except TransportError:
            return  # the sweep tries again
        if task.reply_to:
            try:
                await self.replies.send(completed_notice(task), Destination(
                    task.submitted_by, "", task.reply_to, persistent=True))
            except Unroutable:
                log.info("client queue for task %s is gone; result kept for the API", task.id)
            except TransportError:
                return  # the sweep tries again
        task.notified = True
        with contextlib.suppress(StoreError):  # sent again later: clients keep the first
            self.state.save(task)

    def resend_unsent(self) -> None:
        if not self.messages.connected:
            return
        for task in list(self.state.tasks.values()):
            if task.status.terminal and not task.notified:
                self.completed(task)


def background(tasks: set[asyncio.Task[Any]]) -> Spawn:
    """A spawn function that keeps a reference to each task until it is done."""
    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return spawn
