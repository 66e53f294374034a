"""Results and the retry chain: how an attempt ends and what happens to its task next.

    submit -> pending -> assigned -> running -> succeeded | failed | cancelled
                 ^__________|___________|  (attempt failed, timed out or its agent died: retry)

Every change is saved before the message that caused it is acked, and a task completes once,
whatever is redelivered or arrives late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from coordinator_agent.coordinator.dispatch import Dispatcher
from coordinator_agent.coordinator.outbox import Outbox
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.tasks import (
    FREE_OUTCOMES,
    Attempt,
    AttemptOutcome,
    TaskRecord,
    TaskStatus,
)
from coordinator_agent.coordinator.workflows import WorkflowEngine
from coordinator_agent.exceptions import AuthorizationError
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.planner import CoordinationPlanner, FallbackAction, matches
from coordinator_agent.wire import protocol

log = logging.getLogger(__name__)

#: Agents named in the one log line of a sweep's deaths (the rest are counted).
BURY_NAMED = 5

#: Assignments that never ran (undeliverable, withdrawn) cost no retry, up to this many per task.
MAX_UNDELIVERABLE = 10


class TaskResults:
    def __init__(
        self,
        state: StateManager,
        planner: CoordinationPlanner,
        dispatcher: Dispatcher,
        outbox: Outbox,
        metrics: Metrics,
        *,
        max_output_bytes: int,
    ) -> None:
        self.state = state
        self.planner = planner
        self.dispatcher = dispatcher
        self.outbox = outbox
        self.metrics = metrics
        self.max_output_bytes = max_output_bytes
        self.workflows: WorkflowEngine | None = None  # bound by the service
        #: The escalation desk (desk.py), bound by the service: True when it took the task.
        self.escalate: Callable[[TaskRecord, str], bool] | None = None

    # --- reports from agents ------------------------------------------------------------------

    def on_progress(self, agent_id: str, report: protocol.TaskProgress) -> None:
        task = self.state.tasks.get(report.task_id)
        attempt = task.attempt(report.attempt) if task else None
        if task is None or attempt is None or attempt is not task.current_attempt:
            return  # stale: that attempt is over
        if attempt.agent_id != agent_id:
            raise AuthorizationError("not_assigned", "attempt belongs to another agent",
                                     sender=agent_id)
        task.progress = report.progress
        if not attempt.started:
            attempt.started = True
            if task.executions > 1:
                # An earlier attempt had started too: the work runs (at least) twice.
                self.metrics.duplicate_executions.inc()
            if task.status is TaskStatus.ASSIGNED:
                task.move(TaskStatus.RUNNING)
            self.state.save(task)

    def on_result(self, agent_id: str, result: protocol.TaskResult) -> None:
        task = self.state.find_task(result.task_id)
        attempt = task.attempt(result.attempt) if task else None
        if task is None or attempt is None or attempt.agent_id != agent_id:
            raise AuthorizationError("not_assigned", "no such attempt for this agent",
                                     sender=agent_id)
        agent = self.state.agents.get(agent_id)
        if task.status.terminal:
            # Redelivered or late: the task completes once, whatever arrives after.
            self.metrics.operations.labels("duplicate_result").inc()
            return
        if attempt.outcome is AttemptOutcome.REDIRECTED:
            return  # an operator sent the task elsewhere (desk.py); this attempt is over
        attempt.duration_s = result.duration_s
        current = task.current_attempt
        if agent is not None and (current is attempt or current is None):
            agent.in_flight.discard(task.id)
        if result.success:
            output, error = self._bounded(result.output)
            if error is not None:
                if attempt is current:
                    self.retry_or_fail(task, attempt, AttemptOutcome.FAILED, error)
                else:
                    attempt.end(AttemptOutcome.FAILED, error)
                    self.state.save(task)
                return
            attempt.end(AttemptOutcome.SUCCEEDED)
            if current is not None and current is not attempt:
                # A late success from an earlier attempt wins; stop the newer one.
                self.abandon(task, current, AttemptOutcome.SUPERSEDED)
            if agent is not None:
                agent.completed += 1
            self._learn(task, agent, True)
            self.finish(task, TaskStatus.SUCCEEDED, output=output)
        elif attempt is current:
            if agent is not None:
                agent.failed += 1
            self.retry_or_fail(task, attempt, AttemptOutcome.FAILED, result.error or "failed")
        self.dispatcher.wake.set()

    def _learn(self, task: TaskRecord, agent: AgentRecord | None, success: bool) -> None:
        self.planner.record_outcome(task, agent, success)

    def _bounded(self, output: Any) -> tuple[Any, str | None]:
        try:
            size = len(orjson.dumps(output))
        except (orjson.JSONEncodeError, TypeError) as exc:
            return None, f"output cannot be stored: {exc}"
        if size > self.max_output_bytes:
            return None, f"output of {size} bytes exceeds the {self.max_output_bytes}-byte limit"
        return output, None

    # --- the retry chain ----------------------------------------------------------------------

    def retry_or_fail(
        self, task: TaskRecord, attempt: Attempt, outcome: AttemptOutcome, error: str
    ) -> None:
        attempt.end(outcome, error)
        agent = self.state.agents.get(attempt.agent_id)
        if agent is not None:
            agent.in_flight.discard(task.id)
        if outcome in FREE_OUTCOMES:
            delay: float | None = 0.0
            if task.undeliverable_attempts > MAX_UNDELIVERABLE:
                delay, reason = None, "too many assignments that never ran"
        else:
            self._learn(task, agent, False)
            if outcome is AttemptOutcome.CRASHED and self._poison(task):
                self.quarantine(task)
                return
            # The fallback chain: retry the kind with backoff, then the next alternative kind.
            # A crash is the agent lost, as far as the chain is concerned.
            step = self.planner.next_step(task, AttemptOutcome.AGENT_LOST
                                          if outcome is AttemptOutcome.CRASHED else outcome)
            delay = None if step.action is FallbackAction.ESCALATE else step.delay_s
            reason = step.reason
        if delay is None:
            chain = "; ".join(f"#{a.number} {a.agent_id}: {a.outcome}" for a in task.attempts)
            error = f"{error}; escalated: {reason} (attempts: {chain})"
            if self.escalate is not None and self.escalate(task, error):
                return  # waits, escalated, for an operator
            log.warning("task %s escalated: %s (attempts: %s)", task.id, reason, chain)
            self.finish(task, TaskStatus.FAILED, error=error)
            return
        task.move(TaskStatus.PENDING)
        self.state.totals["retried"] += 1
        self.metrics.task_retries.labels(outcome.value).inc()
        self.state.save(task)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.dispatcher.enqueue, task.id)
        else:
            self.dispatcher.enqueue(task.id)

    # --- poison tasks -------------------------------------------------------------------------

    def _poison(self, task: TaskRecord) -> bool:
        """After a crash: no retry left, or every agent that could run it has crashed on it."""
        if task.retries_left <= 0:
            return True
        spared = task.crashed_agents
        return not any(
            agent.id not in spared and not agent.liveness.gone and agent.heard
            and matches(task, agent) for agent in self.state.agents.values())

    def quarantine(self, task: TaskRecord) -> None:
        """Fail a task that keeps killing its agents, and park it on the dead-letter queue."""
        crashes = task.crashes
        agents = ", ".join(sorted(task.crashed_agents))
        log.error("task %s crashed its agent %d times (%s): quarantined", task.id, crashes,
                  agents)
        self.metrics.tasks_quarantined.inc()
        self.finish(task, TaskStatus.FAILED,
                    error=f"crashed its agent {crashes} times ({agents}); quarantined: "
                    "dead-lettered with reason poison_task, not retried")
        self.outbox.quarantined(task)

    def abandon(self, task: TaskRecord, attempt: Attempt, outcome: AttemptOutcome) -> None:
        """End an attempt that no longer counts and tell its agent to stop."""
        attempt.end(outcome)
        agent = self.state.agents.get(attempt.agent_id)
        if agent is not None:
            agent.in_flight.discard(task.id)
        self.outbox.cancel_attempt(task, attempt, outcome.value)

    def time_out(self, task: TaskRecord, attempt: Attempt) -> None:
        self.retry_or_fail(task, attempt, AttemptOutcome.TIMEOUT,
                           f"no result within {task.timeout_s:g}s")
        self.outbox.cancel_attempt(task, attempt, "timeout")  # once the store agrees

    def finish(
        self, task: TaskRecord, status: TaskStatus, *, output: Any = None, error: str | None = None
    ) -> None:
        task.move(status)
        task.output = output
        task.error = error
        task.progress = 1.0 if status is TaskStatus.SUCCEEDED else task.progress
        self.dispatcher.drop(task.id)
        self.state.save(task)  # durable before anything is acked or announced
        self.state.totals[status.value] += 1
        metrics = self.metrics
        metrics.child(metrics.tasks, status.value).inc()
        metrics.child(metrics.task_duration, status.value).observe(
            task.updated_at - task.created_at)
        metrics.child(metrics.operations, f"task_{status.value}").inc()
        self.outbox.completed(task)
        if self.workflows is not None and (task.parent_id is not None
                                           or task.workflow is not None):
            self.workflows.on_finished(task)  # advance its parent, or stop its children

    def cancel(self, task_id: str, reason: str = "cancelled by operator") -> TaskRecord:
        task = self.state.get_task(task_id)
        if not task.status.terminal:
            attempt = task.current_attempt
            if attempt is not None:
                self.abandon(task, attempt, AttemptOutcome.CANCELLED)
            self.finish(task, TaskStatus.CANCELLED, error=reason)
        return task

    # --- agents that went away ----------------------------------------------------------------

    def lose_agent_tasks(
        self, agent: AgentRecord, why: str, *, crashed: bool,
        keep: Callable[[Attempt], bool] | None = None,
    ) -> None:
        """The agent's process is gone (``crashed``: died or restarted; else it left).

        What it had started ends ``crashed`` (or ``agent_lost``) and costs a retry: at least
        once. What it had not started is withdrawn at no cost: its queued copy is another
        process's now, and the agent drops it (the session check), so it runs once.
        ``keep`` spares attempts that are still the agent's (its current session's).
        """
        for task_id in list(agent.in_flight):
            task = self.state.tasks.get(task_id)
            attempt = task.current_attempt if task else None
            if task is None or attempt is None or attempt.agent_id != agent.id:
                agent.in_flight.discard(task_id)
                continue
            if keep is not None and keep(attempt):
                continue
            agent.in_flight.discard(task_id)
            if not attempt.started:
                outcome = AttemptOutcome.WITHDRAWN
            else:
                outcome = AttemptOutcome.CRASHED if crashed else AttemptOutcome.AGENT_LOST
            self.retry_or_fail(task, attempt, outcome, why)

    def bury(self, dead: list[AgentRecord], now: float) -> None:
        """Reassign the tasks of agents that just died; one log line for all of them."""
        if not dead:
            return
        tasks = sum(len(agent.in_flight) for agent in dead)
        named = ", ".join(f"{a.id} ({a.liveness_reason}, silent {now - a.last_seen:.1f}s, "
                          f"registry {a.registry.value if a.registry else '-'})"
                          for a in dead[:BURY_NAMED])
        more = f" and {len(dead) - BURY_NAMED} more" if len(dead) > BURY_NAMED else ""
        log.warning("%d agent(s) dead: %s%s; reassigning %d tasks", len(dead), named, more,
                    tasks)
        for agent in dead:
            self.lose_agent_tasks(agent, f"agent is dead ({agent.liveness_reason})",
                                  crashed=True)
