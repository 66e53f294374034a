"""Agents' own reports about themselves: hello, heartbeat (``agent.status``), metrics, goodbye.

A heartbeat updates the agent's record (load, in-flight, last seen) and may make it assignable,
which wakes dispatch. A fresh process's hello, or a goodbye, hands its tasks back for a retry.
"""

from __future__ import annotations

import logging

from coordinator_agent.coordinator.dispatch import Dispatcher
from coordinator_agent.coordinator.liveness import AgentLiveness
from coordinator_agent.coordinator.results import TaskResults
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.wire import protocol

log = logging.getLogger(__name__)


class AgentReports:
    def __init__(self, state: StateManager, dispatcher: Dispatcher, results: TaskResults,
                 metrics: Metrics) -> None:
        self.state = state
        self.dispatcher = dispatcher
        self.results = results
        self.metrics = metrics

    def seen(
        self, agent_id: str, info: protocol.AgentHello | protocol.AgentStatus, now: float,
        *, redelivered: bool = False,
    ) -> None:
        previous = self.state.agents.get(agent_id)
        if (isinstance(info, protocol.AgentHello) and not redelivered
                and previous is not None and previous.in_flight):
            # A (first-delivery) hello means a fresh process: what the old one ran is gone.
            self.results.lose_agent_tasks(previous, "agent restarted")
        agent, became_assignable = self.state.observe_agent(agent_id, info, now)
        self.metrics.operations.labels("heartbeat").inc()
        if became_assignable:
            log.info("agent %s (%s) is available", agent_id, agent.kind)
            self.dispatcher.wake.set()

    def touch(self, agent_id: str, now: float) -> AgentRecord | None:
        """Any message from an agent is a sign of life."""
        agent = self.state.agents.get(agent_id)
        if agent is not None and agent.liveness not in (AgentLiveness.DEAD, AgentLiveness.LEFT):
            agent.last_seen = now
        return agent

    def metrics_report(self, agent_id: str, report: protocol.AgentMetrics, now: float) -> None:
        agent = self.touch(agent_id, now)
        if agent is not None:
            agent.metrics = dict(report.values)

    def goodbye(self, agent_id: str) -> None:
        agent = self.state.agent_left(agent_id)
        if agent is not None:
            log.info("agent %s left", agent_id)
            self.results.lose_agent_tasks(agent, "agent left")
