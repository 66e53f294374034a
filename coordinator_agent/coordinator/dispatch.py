"""Dispatch: pending tasks meet free agents.

One loop wakes whenever something may have changed (a task queued, an agent freed or revived),
asks the planner for a kind and an instance, and records the assignment before publishing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from coordinator_agent.coordinator.outbox import Outbox, Spawn
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord, TaskStatus
from coordinator_agent.coordinator.workflows import WorkflowEngine
from coordinator_agent.exceptions import StoreError, TransportError, Unroutable
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.config import CloseCall
from coordinator_agent.routing.planner import CoordinationPlanner

log = logging.getLogger(__name__)

#: Called when an assignment could not be delivered: (task, attempt, outcome, error).
Undeliverable = Callable[[TaskRecord, Attempt, AttemptOutcome, str], None]


class Dispatcher:
    def __init__(
        self,
        state: StateManager,
        planner: CoordinationPlanner,
        outbox: Outbox,
        metrics: Metrics,
        *,
        max_in_flight_per_agent: int,
        spawn: Spawn,
    ) -> None:
        self.state = state
        self.planner = planner
        self.outbox = outbox
        self.metrics = metrics
        self.cap = max_in_flight_per_agent
        self.spawn = spawn
        self.pending: OrderedDict[str, None] = OrderedDict()
        self.wake = asyncio.Event()
        self.active = False
        # Bound by the service once the parts that depend on each other exist.
        self.workflows: WorkflowEngine | None = None
        self.on_undeliverable: Undeliverable | None = None
        #: False while the broker does not work (no connection, or no confirms): assignments
        #: wait instead of timing out, so an outage costs no retries.
        self.broker_ok: Callable[[], bool] = lambda: True

    def enqueue(self, task_id: str) -> None:
        self.pending[task_id] = None
        self.wake.set()

    def drop(self, task_id: str) -> None:
        self.pending.pop(task_id, None)

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.active and self.broker_ok():
                self.dispatch()
            await asyncio.sleep(0)

    def dispatch(self) -> None:
        agents = self.state.agents.values()
        free = sum(max(0, a.free_slots(self.cap)) for a in agents if a.assignable)
        if free <= 0 or not self.pending:
            return  # a backlog with no free agent costs nothing per wake
        for task_id in list(self.pending):
            if free <= 0:
                return
            task = self.state.tasks.get(task_id)
            if task is None or task.status is not TaskStatus.PENDING:
                self.drop(task_id)
                continue
            spared = task.crashed_agents
            # At most one crash per agent: a task never goes back to an agent it crashed.
            decision = self.planner.select(
                task, [a for a in agents if a.id not in spared] if spared else agents)
            if self._hedge(task):
                self.drop(task_id)  # raced on two kinds (workflows.py)
                continue
            if decision.agent is None:
                if (decision.reason == "no_matching_agent" and self.workflows is not None
                        and self.workflows.try_coalition(task, agents)):
                    self.drop(task_id)  # split across agents (workflows.py)
                continue
            self.drop(task_id)
            self._assign(task, decision.agent)
            free -= 1

    def _hedge(self, task: TaskRecord) -> bool:
        """Race a first attempt on the top two kinds when they score within the margin."""
        hedge = self.planner.config.hedge
        if (not hedge.enabled or self.workflows is None or task.attempts
                or task.parent_id is not None or task.kind):
            return False
        routing = task.routing
        alternatives = routing.get("alternatives") or []
        top = routing.get("confidence")
        if routing.get("kind") is None or top is None or not alternatives:
            return False
        runner_up = alternatives[0]
        if top - float(runner_up.get("confidence", 0.0)) > hedge.margin:
            return False
        merge = hedge.mode is CloseCall.MERGE
        started = self.workflows.hedge(task, [routing["kind"], runner_up["kind"]], merge=merge)
        if started:
            self.metrics.multi_master_tasks.labels(hedge.mode.value).inc()
        return started

    def _assign(self, task: TaskRecord, agent: AgentRecord) -> None:
        now = time.time()
        attempt = Attempt(len(task.attempts) + 1, agent.id, now, now + task.timeout_s,
                          session=agent.session)
        task.attempts.append(attempt)
        task.move(TaskStatus.ASSIGNED)
        agent.in_flight.add(task.id)
        try:
            self.state.save(task)  # durable before it is sent
        except StoreError as exc:
            log.warning("assignment of %s not recorded: %s", task.id, exc)
            return  # rolled back to pending, and queued again by on_rollback
        self.metrics.operations.labels("task_assign").inc()
        self.spawn(self.send(task, attempt))

    async def send(self, task: TaskRecord, attempt: Attempt) -> None:
        """Publish an assignment until the broker takes it, or it no longer counts.

        A timeout or a lost connection leaves it unknown whether the agent got it, so the same
        attempt is sent again (the agent ignores a copy it already has) rather than a new one
        made: a broker outage neither costs a retry nor runs the task twice.
        """
        delay = 0.5
        while True:
            try:
                await self.outbox.assignment(task, attempt)
                return
            except Unroutable as exc:
                if self.state.tasks.get(task.id) is not task or attempt is not task.current_attempt:
                    return
                log.warning("assignment of %s to %s failed: %s", task.id, attempt.agent_id, exc)
                agent = self.state.agents.get(attempt.agent_id)
                if agent is not None:
                    self.state.suspect(agent, "queue_gone")
                if self.on_undeliverable is not None:
                    with contextlib.suppress(StoreError):
                        self.on_undeliverable(task, attempt, AttemptOutcome.UNDELIVERABLE,
                                              str(exc))
                return
            except TransportError as exc:
                if self.state.tasks.get(task.id) is not task or attempt is not task.current_attempt:
                    return
                log.info("assignment of %s to %s not confirmed (%s); sending it again",
                         task.id, attempt.agent_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
