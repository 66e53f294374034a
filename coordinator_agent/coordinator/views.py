"""Read-only views of the coordinator for the HTTP API, the CLI and the gauges."""

from __future__ import annotations

import time
from typing import Any

from coordinator_agent.coordinator.liveness import AgentLiveness
from coordinator_agent.coordinator.scheduling import priority_name
from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.planner import CoordinationPlanner


def agents_view(state: StateManager, spawned: dict[str, dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    """Every known agent; ``spawned``: what the local spawner says of the ones it runs."""
    now = time.time()
    views = [a.public_view(now) for a in sorted(state.agents.values(), key=lambda a: a.id)]
    for view in views:
        if spawned and view["id"] in spawned:
            view["spawned"] = spawned[view["id"]]
    return views


def status_view(name: str, state: StateManager, *, ready: bool, broker_connected: bool,
                registry: str, started_at: float, role: str = "leader", epoch: int = 0,
                ) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "epoch": epoch,
        "ready": ready,
        "broker_connected": broker_connected,
        "registry": registry,
        "uptime_s": round(time.time() - started_at, 1),
        "agents": state.count_by_liveness(),
        "tasks_open": state.status_counts(),
        "totals": dict(state.totals),
    }


def with_scheduling(explained: dict[str, Any], *, priority: int,
                    held: str | None) -> dict[str, Any]:
    """``route``: the priority a submission would get, and the limit that would hold it."""
    explained["priority"] = priority_name(priority)
    explained["held"] = held
    return explained


def set_gauges(state: StateManager, planner: CoordinationPlanner, metrics: Metrics, *,
               max_in_flight_per_agent: int, registry: str) -> None:
    """Set the gauges from the state: called at scrape time, so they are exact then."""
    planner.export_metrics()
    metrics.registry_up.set(1 if registry == "ok" else 0)
    in_flight: dict[str, int] = {}
    capacity: dict[str, int] = {}
    for agent in state.agents.values():
        if agent.liveness.gone or not agent.heard:
            continue
        in_flight[agent.kind] = in_flight.get(agent.kind, 0) + len(agent.in_flight)
        capacity[agent.kind] = capacity.get(agent.kind, 0) + (
            agent.capacity(max_in_flight_per_agent) if agent.assignable else 0)
    metrics.agent_in_flight.clear()  # kinds that left go with them
    metrics.agent_capacity.clear()
    for kind, count in in_flight.items():
        metrics.agent_in_flight.labels(kind).set(count)
        metrics.agent_capacity.labels(kind).set(capacity[kind])
    by_liveness = state.count_by_liveness()
    for liveness, count in by_liveness.items():
        metrics.agents_by_liveness.labels(liveness).set(count)
    metrics.active_agents.set(by_liveness[AgentLiveness.HEALTHY.value])
    for status, count in state.status_counts().items():
        metrics.tasks_active.labels(status).set(count)
