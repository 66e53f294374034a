"""Agents' own reports about themselves: hello, heartbeat (``agent.status``), metrics, goodbye.

A heartbeat updates the agent's record (load, in-flight, last seen) and may make it assignable,
which wakes dispatch. A fresh process's hello, or a goodbye, hands its tasks back: what it had
started is retried (a crash is charged to the task), what was only queued is withdrawn.

A process is told apart by its session, the id of its ``agent.hello``, which the SDK also sends
as the correlation id of its heartbeats; assignments carry the session they are meant for.
"""

from __future__ import annotations

import logging
import time

from coordinator_agent.coordinator.backlog import Backlog
from coordinator_agent.coordinator.dispatch import Dispatcher
from coordinator_agent.coordinator.liveness import AgentLiveness
from coordinator_agent.coordinator.results import TaskResults
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.tasks import Attempt
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.wire import protocol
from coordinator_agent.wire.constants import HEADER_SENDER
from coordinator_agent.wire.delivery import Delivery

log = logging.getLogger(__name__)


class AgentReports:
    def __init__(self, state: StateManager, dispatcher: Dispatcher, results: TaskResults,
                 metrics: Metrics, backlog: Backlog | None = None) -> None:
        self.state = state
        self.dispatcher = dispatcher
        self.results = results
        self.metrics = metrics
        self.backlog = backlog if backlog is not None else Backlog(
            state.liveness.heartbeat_interval_s * state.liveness.behind_after)
        self._missing_exported = 0
        self._heartbeats = metrics.operations.labels("heartbeat")  # looked up once

    def shed(self, message: Delivery) -> bool:
        """Ack a repeat heartbeat unread while behind (backlog.py); counted."""
        backlog = self.backlog
        if not backlog.behind:
            return False
        sender = (message.headers or {}).get(HEADER_SENDER)
        if isinstance(sender, bytes):
            sender = sender.decode("utf-8", "replace")
        agent = self.state.agents.get(sender) if isinstance(sender, str) else None
        last_seen = (agent.last_seen if agent is not None
                     and agent.liveness is AgentLiveness.HEALTHY else None)
        if backlog.sheddable(message.type, last_seen, time.time(),
                             self.state.liveness.heartbeat_interval_s):
            self.metrics.status_shed.inc()
            return True
        return False

    def export_metrics(self) -> None:
        backlog = self.backlog
        self.metrics.status_lag.set(backlog.lag_s)
        self.metrics.liveness_paused.set(1 if backlog.behind else 0)
        missing = self.state.missing_heartbeats
        if missing > self._missing_exported:
            self.metrics.heartbeats_missing.inc(missing - self._missing_exported)
            self._missing_exported = missing

    def view(self) -> dict[str, object]:
        """The ``liveness`` field of the status view: is the coordinator keeping up?"""
        return {**self.backlog.view(), "heartbeats_missing": self.state.missing_heartbeats}

    def seen(
        self, agent_id: str, info: protocol.AgentHello | protocol.AgentStatus, now: float,
        *, redelivered: bool = False, session: str | None = None, sent_at: float | None = None,
    ) -> None:
        previous = self.state.agents.get(agent_id)
        if isinstance(info, protocol.AgentHello) and previous is not None and previous.in_flight:
            self._new_process(previous, session, redelivered=redelivered)
        if sent_at is not None and isinstance(info, protocol.AgentStatus):
            self.backlog.observe(sent_at, now)
        agent, became_assignable = self.state.observe_agent(agent_id, info, now, sent_at)
        if session is not None and (isinstance(info, protocol.AgentHello)
                                    or agent.session is None):
            agent.session = session
        self._heartbeats.inc()
        if became_assignable:
            # One line per sweep sums these up (sweep.py): a fleet coming up is not 10k lines.
            log.debug("agent %s (%s) is available", agent_id, agent.kind)
            self.state.changes["available"] += 1
            self.dispatcher.wake.set()

    def _new_process(self, previous: AgentRecord, session: str | None, *,
                     redelivered: bool) -> None:
        """A hello: what other processes of this agent held is no longer theirs.

        Attempts made for this very session stay (the same hello delivered again, or its
        heartbeat got here first); everything else ends, started or not (results.py).
        """
        if session is None:
            # No session (a hello without an id cannot happen on the wire; kept for callers
            # that have none): a first delivery means a new process.
            if not redelivered:
                self.results.lose_agent_tasks(previous, "agent restarted", crashed=True)
            return

        def still_its_own(attempt: Attempt) -> bool:
            return attempt.session == session

        self.results.lose_agent_tasks(previous, "agent restarted", crashed=True,
                                      keep=still_its_own)

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
            self.results.lose_agent_tasks(agent, "agent left", crashed=False)
