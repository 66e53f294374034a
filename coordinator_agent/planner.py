"""CoordinationPlanner: which agent gets a task, and what happens when an attempt fails.

This first planner filters by hard constraints (kind, required capabilities, health, free
capacity) and picks the least-loaded agent. Scoring is behind ``Router`` so a learning router
can replace ``LeastLoadedRouter`` without touching the coordinator.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .state import AgentRecord
from .tasks import AttemptOutcome, TaskRecord


@dataclass(frozen=True)
class RoutingDecision:
    agent: AgentRecord | None
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


class Router(Protocol):
    def choose(self, task: TaskRecord, candidates: Sequence[AgentRecord]) -> RoutingDecision: ...

    def record_outcome(self, task: TaskRecord, agent: AgentRecord | None, success: bool) -> None:
        ...


class LeastLoadedRouter:
    """Lowest in-flight / capacity wins; ties are broken at random so load spreads."""

    def __init__(self, in_flight_cap: int) -> None:
        self.in_flight_cap = in_flight_cap

    def choose(self, task: TaskRecord, candidates: Sequence[AgentRecord]) -> RoutingDecision:
        best = min(
            candidates,
            key=lambda a: (len(a.in_flight) / a.capacity(self.in_flight_cap), random.random()),
        )
        return RoutingDecision(best, "least_loaded", {"candidates": len(candidates)})

    def record_outcome(self, task: TaskRecord, agent: AgentRecord | None, success: bool) -> None:
        return None


def matches(task: TaskRecord, agent: AgentRecord) -> bool:
    """Hard constraints: explicit kind and every required capability."""
    if task.kind is not None and agent.kind != task.kind:
        return False
    return agent.capabilities.issuperset(task.required_capabilities)


class CoordinationPlanner:
    def __init__(self, in_flight_cap: int, router: Router | None = None) -> None:
        self.in_flight_cap = in_flight_cap
        self.router: Router = router or LeastLoadedRouter(in_flight_cap)

    def select(self, task: TaskRecord, agents: Iterable[AgentRecord]) -> RoutingDecision:
        """Pick an agent now, or say why none can take the task yet."""
        able = [a for a in agents if matches(task, a)]
        if not able:
            return RoutingDecision(None, "no_matching_agent")
        ready = [a for a in able if a.assignable and a.free_slots(self.in_flight_cap) > 0]
        if not ready:
            return RoutingDecision(None, "no_free_agent")
        # Prefer agents that have not already failed this task, when there is a choice.
        tried = {a.agent_id for a in task.attempts if a.outcome is not AttemptOutcome.SUCCEEDED}
        fresh = [a for a in ready if a.id not in tried]
        decision = self.router.choose(task, fresh or ready)
        task.routing = {"agent_id": decision.agent.id if decision.agent else None,
                        "reason": decision.reason, **decision.details}
        return decision

    def should_retry(self, task: TaskRecord) -> bool:
        return task.retries_left > 0

    def record_outcome(self, task: TaskRecord, agent: AgentRecord | None, success: bool) -> None:
        self.router.record_outcome(task, agent, success)
