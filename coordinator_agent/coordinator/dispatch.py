"""Dispatch: pending tasks meet free agents.

One loop wakes whenever something may have changed (a task queued, an agent freed or revived),
takes pending tasks in the order of the queue discipline (``scheduling.py``: fair share, then
priority with aging), skips what a fleet-wide limit holds (``limits.py``), asks the planner for
a kind and an instance, and records the assignment before publishing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from coordinator_agent.coordinator.limits import FleetLimiter
from coordinator_agent.coordinator.outbox import Outbox, Spawn
from coordinator_agent.coordinator.scheduling import SchedulingQueue
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord, TaskStatus
from coordinator_agent.coordinator.workflows import WorkflowEngine
from coordinator_agent.exceptions import StoreError, TransportError, Unroutable
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.config import CloseCall
from coordinator_agent.routing.decision_cost import DecisionCost
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
        queue: SchedulingQueue | None = None,
        limits: FleetLimiter | None = None,
        scan_limit: int = 256,
    ) -> None:
        self.state = state
        self.planner = planner
        planner.fleet_log = state.fleet  # its grouping folds the agents that changed
        self.outbox = outbox
        self.metrics = metrics
        self.decision_cost = DecisionCost(metrics)  # wall and CPU time; the slow ones logged
        self.cap = max_in_flight_per_agent
        self.spawn = spawn
        self.pending = queue if queue is not None else SchedulingQueue()
        self.limits = limits
        self.scan_limit = scan_limit
        self._token_wake_at = 0.0  # when the wake for a rate-limited task is due
        self._room_wake_at = 0.0  # when the wake for room kept free (fair share) is due
        #: The collection ``_serving`` returned when it was the whole fleet (no one retiring).
        self._whole: Collection[AgentRecord] | None = None
        #: Agents that get no new work: the spawner is draining them (spawner.py).
        self.retiring: set[str] = set()
        self.wake = asyncio.Event()
        self.active = False
        # Bound by the service once the parts that depend on each other exist.
        self.workflows: WorkflowEngine | None = None
        self.on_undeliverable: Undeliverable | None = None
        #: False while the broker does not work (no connection, or no confirms): assignments
        #: wait instead of timing out, so an outage costs no retries.
        self.broker_ok: Callable[[], bool] = lambda: True

    def enqueue(self, task_id: str) -> None:
        task = self.state.tasks.get(task_id)
        if task is None:
            return
        self.pending.add(task_id, task.submitted_by, task.priority, time.time(), task.kind)
        self.wake.set()

    def drop(self, task_id: str) -> None:
        self.pending.discard(task_id)

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.active and self.broker_ok():
                self.dispatch()
            await asyncio.sleep(0)

    def dispatch(self) -> None:
        if not self.pending:
            return  # most wakes (an agent revived, a slot freed) find nothing to place
        agents: Collection[AgentRecord] = self._serving()
        free = self._free_slots(agents, len(self.pending))
        if free <= 0:
            return  # a backlog with no free agent costs one pass over the fleet per wake
        now = time.time()
        limits = self.limits
        by_principal: dict[str, int] = {}
        held_kinds: dict[str, tuple[str, str]] = {}  # kind -> (limit, why)
        holding: set[str] = set()  # held kinds that kept a task waiting in this pass
        if limits is not None:
            by_kind, by_principal, in_flight = self._running()
            limits.begin(by_kind, by_principal, in_flight)
            room = limits.room()
            if room is not None and room <= 0:
                limits.held("global_in_flight")
                return
            free = free if room is None else min(free, room)
            held_kinds = self._held_kinds(now)
            agents = self._without(held_kinds)
        # Tasks that name a kind with no free agent, or one held by a limit, wait as a lane.
        blocked = self._blocked_kinds(agents) | set(held_kinds)
        serving = self.pending.serving_order(now, by_principal, blocked)
        quota = self._quotas(agents, now)
        try:
            while free > 0:
                picked = serving.next(self.scan_limit)
                if picked is None:
                    break
                task_id, principal = picked
                task = self.state.tasks.get(task_id)
                if task is None or task.status is not TaskStatus.PENDING:
                    self.drop(task_id)
                    continue
                if principal in quota and serving.running.get(principal, 0) >= quota[principal]:
                    task.routing["held"] = "fair share: room kept for other recent submitters"
                    serving.leave(principal)
                    self._wake_when_room_expires(now)
                    continue
                if limits is not None:
                    hold = limits.principal_hold(principal, now)
                    if hold is not None:
                        limits.held(hold[0])
                        task.routing["held"] = hold[1]
                        serving.leave(principal)  # the rest of its tasks are held alike
                        continue
                    if task.kind is not None and task.kind in held_kinds:
                        task.routing["held"] = held_kinds[task.kind][1]
                        holding.add(task.kind)
                        continue
                spared = task.crashed_agents
                # At most one crash per agent: a task never goes back to an agent it crashed.
                self.decision_cost.begin()
                if spared or agents is not self._whole:
                    decision = self.planner.select(
                        task, [a for a in agents if a.id not in spared] if spared else agents)
                else:
                    decision = self.planner.select(task, agents,
                                                   fleet_version=self.state.fleet_version)
                self.decision_cost.end(self.planner.work, len(agents))
                if self._hedge(task):
                    self.drop(task_id)  # raced on two kinds (workflows.py)
                    continue
                if decision.agent is None:
                    if (decision.reason == "no_free_agent" and task.kind is not None
                            and not task.required_capabilities and not spared):
                        serving.block(task.kind)  # it filled up in this pass: no more tries
                    if held_kinds:
                        task.routing["held"] = "; ".join(sorted(
                            {why for _, why in held_kinds.values()}))
                        holding.update(held_kinds)
                    if (decision.reason == "no_matching_agent" and self.workflows is not None
                            and self.workflows.try_coalition(task, agents)):
                        self.drop(task_id)  # split across agents (workflows.py)
                    continue
                self.drop(task_id)
                task.routing.pop("held", None)
                if not self._assign(task, decision.agent):
                    continue  # not recorded: rolled back and queued again (on_rollback)
                serving.took(principal)
                free -= 1
                if limits is not None:
                    kind = decision.agent.kind
                    limits.started(kind, principal, now)
                    hold = limits.kind_hold(kind, now)
                    if hold is not None:  # that kind is full now: route the rest elsewhere
                        held_kinds[kind] = hold
                        agents = self._without(held_kinds)
        finally:
            serving.close()
        if limits is not None:
            for kind in holding:
                limits.held(held_kinds[kind][0])
            self._wake_for_tokens(now)

    def _blocked_kinds(self, agents: Collection[AgentRecord]) -> set[str]:
        """Kinds known in the fleet with no free assignable agent among ``agents``.

        From the planner's grouping of the whole fleet when it is current: one look per kind
        until a free agent, instead of two passes over 10,000 agents on every wake.
        """
        cap = self.cap
        by_kind = (self.planner.fleet_kinds(self.state.fleet_version)
                   if agents is self._whole else {})
        if not by_kind:
            open_kinds = {a.kind for a in agents if a.assignable and a.free_slots(cap) > 0}
            return {a.kind for a in self.state.agents.values()} - open_kinds
        return {kind for kind, group in by_kind.items()
                if not any(healthy and len(agent.in_flight) < min(capacity, cap)
                           and agent.assignable for agent, capacity, healthy in group)}

    def _quotas(self, agents: Collection[AgentRecord], now: float) -> dict[str, float]:
        """Each principal's share of the fleet's slots, while a recent submitter with nothing
        pending keeps its share free (scheduling.py); empty otherwise."""
        sharing = self.pending.keeping_room(now)
        if not sharing:
            return {}
        cap = self.cap
        slots = sum(agent.capacity(cap) for agent in agents if agent.assignable)
        total = sum(sharing.values())
        return {p: slots * w / total for p, w in sharing.items()}

    def _free_slots(self, agents: Collection[AgentRecord], enough: int) -> int:
        """Free slots of assignable agents, counted until there are ``enough`` (the pending
        tasks): with 10,000 agents and one task the pass stops at the first free agent."""
        cap = self.cap
        free = 0
        for agent in agents:
            if agent.assignable:
                slots = agent.free_slots(cap)
                if slots > 0:
                    free += slots
                    if free >= enough:
                        break
        return free

    def running_by_principal(self) -> dict[str, int]:
        """Tasks in flight per submitting principal (readahead.py)."""
        return self._running()[1]

    def _running(self) -> tuple[dict[str, int], dict[str, int], int]:
        """Tasks in flight by agent kind and by principal, and in all."""
        by_kind: dict[str, int] = {}
        by_principal: dict[str, int] = {}
        total = 0
        for agent in self.state.agents.values():
            if not agent.in_flight:
                continue
            by_kind[agent.kind] = by_kind.get(agent.kind, 0) + len(agent.in_flight)
            total += len(agent.in_flight)
            for task_id in agent.in_flight:
                task = self.state.tasks.get(task_id)
                if task is not None:
                    by_principal[task.submitted_by] = by_principal.get(task.submitted_by, 0) + 1
        return by_kind, by_principal, total

    def _held_kinds(self, now: float) -> dict[str, tuple[str, str]]:
        assert self.limits is not None
        held: dict[str, tuple[str, str]] = {}
        for kind in self.limits.config.kinds:
            hold = self.limits.kind_hold(kind, now)
            if hold is not None:
                held[kind] = hold
        return held

    def _serving(self) -> Collection[AgentRecord]:
        agents = self.state.agents.values()
        if self.retiring:
            return [a for a in agents if a.id not in self.retiring]
        self._whole = agents
        return agents

    def refresh_routing(self) -> None:
        """Keep the planner's grouping of the whole fleet current, off the decision path."""
        if (not self.retiring and self.planner.refresh_fleet(self.state.agents.values(),
                                                             self.state.fleet_version)
                and self.pending):
            self.wake.set()  # what waited for an agent the old grouping did not have

    def _without(self, held_kinds: dict[str, tuple[str, str]]) -> Collection[AgentRecord]:
        """The agents a task may go to: a kind at its limit counts as a kind with no free agent."""
        agents = self._serving()
        return [a for a in agents if a.kind not in held_kinds] if held_kinds else agents

    def _wake_for_tokens(self, now: float) -> None:
        """A bucket held work: look again when it has a token."""
        assert self.limits is not None
        at = self.limits.next_token_at
        if at is None or now < self._token_wake_at <= at:
            return  # an earlier wake is already due
        self._token_wake_at = at
        asyncio.get_running_loop().call_later(max(0.001, at - now), self.wake.set)

    def _wake_when_room_expires(self, now: float) -> None:
        """Room kept free ends after ``reserve_s`` of quiet: look again then, even if no slot
        frees meanwhile."""
        at = now + self.pending.reserve_s
        if now < self._room_wake_at <= at:
            return  # a wake is already due by then
        self._room_wake_at = at
        asyncio.get_running_loop().call_later(self.pending.reserve_s + 0.01, self.wake.set)

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

    def assign_to(self, task: TaskRecord, agent: AgentRecord) -> None:
        """An operator's choice of agent (desk.py): no routing, no limits."""
        self.drop(task.id)
        self._assign(task, agent)

    def _assign(self, task: TaskRecord, agent: AgentRecord) -> bool:
        """Record the assignment, then send it; False if the store could not record it."""
        now = time.time()
        attempt = Attempt(len(task.attempts) + 1, agent.id, now, now + task.timeout_s,
                          session=agent.session)
        task.attempts.append(attempt)
        if attempt.number == 1:
            waited = max(0.0, now - task.created_at)
            self.metrics.child(self.metrics.task_wait, str(task.priority)).observe(waited)
        task.move(TaskStatus.ASSIGNED)
        agent.in_flight.add(task.id)
        try:
            self.state.save(task)  # durable before it is sent
        except StoreError as exc:
            log.warning("assignment of %s not recorded: %s", task.id, exc)
            return False  # rolled back to pending, and queued again by on_rollback
        self.metrics.child(self.metrics.operations, "task_assign").inc()
        self.spawn(self.send(task, attempt))
        return True

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
