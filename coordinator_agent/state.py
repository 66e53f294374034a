"""StateManager: agents with liveness, active tasks (persisted through TaskStore), totals."""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from .exceptions import UnknownTask
from .settings import Liveness
from .store import TaskStore
from .tasks import TaskRecord, TaskStatus


class AgentLiveness(enum.StrEnum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"  # missed heartbeats: no new work, tasks kept
    DEAD = "dead"  # silent too long: in-flight tasks are reassigned
    DRAINING = "draining"  # stopping gracefully: no new work, tasks finish
    LEFT = "left"  # said goodbye


@dataclass
class AgentRecord:
    id: str
    kind: str
    capabilities: frozenset[str]
    max_concurrency: int
    version: str = ""
    reported_state: str = "ready"
    reported_in_flight: int = 0
    reported_load: float = 0.0
    liveness: AgentLiveness = AgentLiveness.HEALTHY
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    #: Task ids the coordinator has assigned to this agent and not yet seen finish.
    in_flight: set[str] = field(default_factory=set)
    metrics: dict[str, float] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0

    def capacity(self, cap: int) -> int:
        return min(self.max_concurrency, cap)

    def free_slots(self, cap: int) -> int:
        return self.capacity(cap) - len(self.in_flight)

    @property
    def assignable(self) -> bool:
        return self.liveness is AgentLiveness.HEALTHY and self.reported_state != "draining"

    def public_view(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "capabilities": sorted(self.capabilities),
            "liveness": self.liveness.value,
            "state": self.reported_state,
            "max_concurrency": self.max_concurrency,
            "in_flight": len(self.in_flight),
            "load": round(self.reported_load, 3),
            "last_seen_s": round(now - self.last_seen, 3),
            "completed": self.completed,
            "failed": self.failed,
            "version": self.version,
        }


class StateManager:
    """The coordinator's view of the world. Single-threaded: called from the event loop only."""

    RECENT_TASKS = 200

    def __init__(self, store: TaskStore, liveness: Liveness) -> None:
        self.store = store
        self.liveness = liveness
        self.agents: dict[str, AgentRecord] = {}
        self.tasks: dict[str, TaskRecord] = {}  # non-terminal or not yet notified
        self.recent: OrderedDict[str, TaskRecord] = OrderedDict()  # finished, newest last
        self.totals: dict[str, int] = {"submitted": 0, "succeeded": 0, "failed": 0,
                                       "cancelled": 0, "retried": 0}

    # --- agents -------------------------------------------------------------------------------

    def observe_agent(
        self, agent_id: str, info: protocol.AgentHello | protocol.AgentStatus, now: float
    ) -> tuple[AgentRecord, bool]:
        """Record a hello or heartbeat; returns (record, became_assignable)."""
        record = self.agents.get(agent_id)
        was_assignable = record is not None and record.assignable
        if record is None or record.liveness in (AgentLiveness.DEAD, AgentLiveness.LEFT):
            record = AgentRecord(agent_id, info.kind, frozenset(info.capabilities),
                                 info.max_concurrency, first_seen=now)
            if agent_id in self.agents:
                record.in_flight = self.agents[agent_id].in_flight
            self.agents[agent_id] = record
        record.kind = info.kind
        record.capabilities = frozenset(info.capabilities)
        record.max_concurrency = info.max_concurrency
        record.last_seen = now
        if isinstance(info, protocol.AgentHello):
            record.version = info.version
            record.reported_state = "ready"
        else:
            record.reported_state = info.state
            record.reported_in_flight = info.in_flight
            record.reported_load = info.load
        record.liveness = (
            AgentLiveness.DRAINING if record.reported_state == "draining"
            else AgentLiveness.HEALTHY
        )
        return record, record.assignable and not was_assignable

    def agent_left(self, agent_id: str) -> AgentRecord | None:
        record = self.agents.get(agent_id)
        if record is not None:
            record.liveness = AgentLiveness.LEFT
        return record

    def sweep_liveness(self, now: float) -> list[AgentRecord]:
        """Advance liveness from missed heartbeats; returns the agents that just died."""
        interval = self.liveness.heartbeat_interval_s
        suspect_after = interval * self.liveness.suspect_after
        dead_after = interval * self.liveness.dead_after
        died: list[AgentRecord] = []
        for record in self.agents.values():
            if record.liveness in (AgentLiveness.DEAD, AgentLiveness.LEFT):
                continue
            silent = now - record.last_seen
            if silent >= dead_after:
                record.liveness = AgentLiveness.DEAD
                died.append(record)
            elif silent >= suspect_after and record.liveness is AgentLiveness.HEALTHY:
                record.liveness = AgentLiveness.SUSPECT
        return died

    def forget_departed(self, now: float, keep_s: float = 600.0) -> None:
        gone = [
            a.id for a in self.agents.values()
            if a.liveness in (AgentLiveness.DEAD, AgentLiveness.LEFT)
            and not a.in_flight and now - a.last_seen > keep_s
        ]
        for agent_id in gone:
            del self.agents[agent_id]

    def count_by_liveness(self) -> dict[str, int]:
        counts = {state.value: 0 for state in AgentLiveness}
        for record in self.agents.values():
            counts[record.liveness.value] += 1
        return counts

    # --- tasks --------------------------------------------------------------------------------

    def find_task(self, task_id: str) -> TaskRecord | None:
        task = self.tasks.get(task_id) or self.recent.get(task_id)
        return task if task is not None else self.store.get(task_id)

    def get_task(self, task_id: str) -> TaskRecord:
        task = self.find_task(task_id)
        if task is None:
            raise UnknownTask(task_id)
        return task

    def add_task(self, task: TaskRecord) -> None:
        self.tasks[task.id] = task
        self.totals["submitted"] += 1
        self.save(task)

    def save(self, task: TaskRecord) -> None:
        """Persist; finished and notified tasks leave the active set."""
        self.store.save(task)
        if task.status.terminal and task.notified:
            self.tasks.pop(task.id, None)
            self.recent[task.id] = task
            self.recent.move_to_end(task.id)
            while len(self.recent) > self.RECENT_TASKS:
                self.recent.popitem(last=False)

    def restore(self) -> list[TaskRecord]:
        """Load the tasks a previous run left open (after a crash or a restart)."""
        restored = list(self.store.open_tasks())
        for task in restored:
            self.tasks[task.id] = task
        return restored

    def is_assigned(self, agent_id: str, task_id: str) -> bool:
        task = self.find_task(task_id)
        return task is not None and task.was_assigned_to(agent_id)

    def pending(self) -> list[TaskRecord]:
        return [t for t in self.tasks.values() if t.status is TaskStatus.PENDING]

    def status_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in TaskStatus}
        for task in self.tasks.values():
            counts[task.status.value] += 1
        return counts
