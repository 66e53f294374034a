"""The operator's desk: cancel and redirect any open task; retry, resolve or fail escalated ones.

Escalation: when a task's fallback chain runs out and ``escalation`` says ``desk`` for its kind,
it enters ``escalated`` instead of ``failed`` and waits for a person. Its client hears a
``task.completed`` notice with ``status: "escalated"`` and the chain of attempts (not final: the
final notice follows when an operator acts). From the CLI, ``POST /api/tasks/{id}/...`` or the
status page, an operator then

* retries it on a chosen kind or agent (one more attempt; if that fails it escalates again),
* resolves it by hand with an output (``succeeded``), or
* fails it with a reason (``failed``).

Cancel works on any open task; a workflow's parent takes its children with it (workflows.py).
Redirect sends a pending or running task to another kind: the running attempt is stopped
(``redirected``, which costs no retry) and the task is assigned anew.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from coordinator_agent.coordinator.dispatch import Dispatcher
from coordinator_agent.coordinator.outbox import Outbox, completed_notice
from coordinator_agent.coordinator.results import TaskResults
from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.tasks import AttemptOutcome, TaskRecord, TaskStatus
from coordinator_agent.exceptions import TaskConflict
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.settings import EscalationSettings

log = logging.getLogger(__name__)


class OperatorDesk:
    def __init__(self, state: StateManager, dispatcher: Dispatcher, results: TaskResults,
                 outbox: Outbox, metrics: Metrics, *, config: EscalationSettings,
                 max_output_bytes: int) -> None:
        self.state = state
        self.dispatcher = dispatcher
        self.results = results
        self.outbox = outbox
        self.metrics = metrics
        self.config = config
        self.max_output_bytes = max_output_bytes

    # --- escalation ---------------------------------------------------------------------------

    def escalate(self, task: TaskRecord, error: str) -> bool:
        """Called where the chain runs out: True when the task now waits at the desk."""
        kind = task.kind or task.routing.get("kind") or (
            self._agent_kind(task.attempts[-1].agent_id) if task.attempts else None)
        policy = self.config.kinds.get(kind or "", self.config.default)
        if policy != "desk":
            return False
        task.move(TaskStatus.ESCALATED)
        task.error = error
        task.routing.pop("held", None)
        self.dispatcher.drop(task.id)
        self.state.save(task)
        self.metrics.escalations.inc()
        self.metrics.desk_actions.labels("escalated").inc()
        log.warning("task %s escalated to the desk: %s", task.id, error[:300])
        if task.reply_to:
            # Not final: the final task.completed follows when an operator acts.
            self.outbox.reply(task.reply_to, task.submitted_by, completed_notice(task))
        return True

    def _agent_kind(self, agent_id: str) -> str | None:
        agent = self.state.agents.get(agent_id)
        return agent.kind if agent is not None else None

    def escalated(self) -> list[TaskRecord]:
        """The tasks waiting at the desk, longest waiting first."""
        waiting = [t for t in self.state.tasks.values() if t.status is TaskStatus.ESCALATED]
        return sorted(waiting, key=lambda t: t.updated_at)

    def retry(self, task_id: str, operator: str, *, kind: str | None = None,
              agent_id: str | None = None) -> TaskRecord:
        task = self._escalated(task_id, "retry")
        agent = None
        if agent_id is not None:
            agent = self.state.agents.get(agent_id)
            if agent is None or not agent.assignable:
                raise TaskConflict(task_id, f"agent {agent_id} is not connected and healthy")
            if agent.free_slots(self.dispatcher.cap) <= 0:
                raise TaskConflict(task_id, f"agent {agent_id} has no free slot; try later")
        if kind is not None:
            task.kind = kind
        task.error = None
        self._note(task, "retried", operator, kind=kind, agent_id=agent_id)
        task.move(TaskStatus.PENDING)
        self.state.save(task)
        if agent is not None:
            self.dispatcher.assign_to(task, agent)
        else:
            self.dispatcher.enqueue(task.id)
        self.metrics.desk_actions.labels("retry").inc()
        return task

    def resolve(self, task_id: str, operator: str, output: Any) -> TaskRecord:
        task = self._escalated(task_id, "resolve")
        size = len(orjson.dumps(output))
        if size > self.max_output_bytes:
            raise TaskConflict(task_id, f"output of {size} bytes exceeds the "
                               f"{self.max_output_bytes}-byte limit")
        self._note(task, "resolved", operator)
        self.results.finish(task, TaskStatus.SUCCEEDED, output=output)
        self.metrics.desk_actions.labels("resolve").inc()
        return task

    def fail(self, task_id: str, operator: str, reason: str) -> TaskRecord:
        task = self._escalated(task_id, "fail")
        self._note(task, "failed", operator)
        self.results.finish(task, TaskStatus.FAILED,
                            error=f"failed by {operator}: {reason}"[:4096])
        self.metrics.desk_actions.labels("fail").inc()
        return task

    def _escalated(self, task_id: str, action: str) -> TaskRecord:
        task = self.state.get_task(task_id)
        if task.status is not TaskStatus.ESCALATED:
            raise TaskConflict(task_id, f"is {task.status.value}; only an escalated task can "
                               f"be given to {action}")
        return task

    # --- cancel and redirect --------------------------------------------------------------------

    def cancel(self, task_id: str, operator: str, reason: str = "") -> TaskRecord:
        """Cancel an open task; a workflow's children go with it."""
        task = self.state.get_task(task_id)
        if task.status.terminal:
            raise TaskConflict(task_id, f"already {task.status.value}")
        self._note(task, "cancelled", operator)
        self.results.cancel(task_id, f"cancelled by {operator}" + (f": {reason}" if reason
                                                                   else ""))
        self.metrics.desk_actions.labels("cancel").inc()
        return task

    def redirect(self, task_id: str, operator: str, kind: str) -> TaskRecord:
        """Send a pending, running or escalated task to agents of another kind."""
        task = self.state.get_task(task_id)
        if task.status.terminal:
            raise TaskConflict(task_id, f"already {task.status.value}")
        if task.workflow is not None:
            raise TaskConflict(task_id, "is a workflow: redirect its children instead")
        if task.status is TaskStatus.ESCALATED:
            return self.retry(task_id, operator, kind=kind)
        attempt = task.current_attempt
        if attempt is not None:
            self.results.abandon(task, attempt, AttemptOutcome.REDIRECTED)
            task.move(TaskStatus.PENDING)
        task.kind = kind
        task.routing.pop("held", None)
        self._note(task, "redirected", operator, kind=kind)
        self.state.save(task)
        self.dispatcher.drop(task.id)
        self.dispatcher.enqueue(task.id)
        self.metrics.desk_actions.labels("redirect").inc()
        return task

    @staticmethod
    def _note(task: TaskRecord, action: str, operator: str, **details: str | None) -> None:
        """Who did what, kept with the task (``desk``) for the task view."""
        task.desk.append({"action": action, "by": operator, "at": time.time(),
                          **{k: v for k, v in details.items() if v is not None}})
        del task.desk[:-20]

    # --- gauges ---------------------------------------------------------------------------------

    def set_gauges(self, now: float) -> None:
        waiting = [now - t.updated_at for t in self.state.tasks.values()
                   if t.status is TaskStatus.ESCALATED]
        self.metrics.escalated_oldest.set(max(waiting, default=0.0))
        self.metrics.escalated_overdue.set(
            sum(w > self.config.overdue_after_s for w in waiting))

