"""Intake: a submitted task becomes a durable record and joins the dispatch queue.

Durable first, visible after: the record is written before it enters memory, before any
``task.accepted`` and before the ack. A task the store cannot take is refused: over AMQP the
client gets a ``rejected`` notice and the submission is dead-lettered with the reason
(``store_unavailable`` or ``unstorable_input``); over HTTP the answer is 503 or 422.

Answered, then acked: an AMQP submission is acked only once its answer (``task.accepted`` or
``rejected``) has left, confirmed or failed. A lane's prefetch thus bounds how many of one
principal's answers are on their way at once, so a flood cannot queue thousands of notices
ahead of the assignments on the coordinator's connection (PROTOCOL.md §4.4).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from coordinator_agent.coordinator.dispatch import Dispatcher
from coordinator_agent.coordinator.limits import FleetLimiter
from coordinator_agent.coordinator.outbox import Outbox, completed_notice
from coordinator_agent.coordinator.scheduling import URGENCY_PRIORITY, priority_band
from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.tasks import TaskRecord
from coordinator_agent.coordinator.workflows import WorkflowEngine
from coordinator_agent.exceptions import (
    AuthorizationError,
    RejectedMessage,
    StoreError,
    SubmissionRefused,
    UnstorableTask,
)
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.settings import Limits
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol


class Intake:
    def __init__(self, state: StateManager, dispatcher: Dispatcher, outbox: Outbox,
                 metrics: Metrics, limits: Limits, *, admission: FleetLimiter | None = None,
                 planner: CoordinationPlanner | None = None,
                 priority_from_urgency: bool = False) -> None:
        self.state = state
        self.admission = admission
        self.planner = planner
        self.priority_from_urgency = priority_from_urgency
        self.dispatcher = dispatcher
        self.outbox = outbox
        self.metrics = metrics
        self.limits = limits
        self.workflows: WorkflowEngine | None = None  # bound by the service

    def submit(
        self, spec: protocol.TaskSubmit, *, submitted_by: str, default_id: str
    ) -> tuple[TaskRecord, bool]:
        """Accept a task (durably) or return the existing one for a repeated id."""
        task_id = spec.task_id or default_id
        existing = self.state.find_task(task_id)
        if existing is not None:
            if existing.submitted_by != submitted_by:
                # Never show one principal another's task, nor let it hijack the id.
                raise SubmissionRefused(f"task id {task_id} is already used by another client")
            return existing, True
        if len(self.state.tasks) >= self.limits.max_pending_tasks:
            raise SubmissionRefused(f"{len(self.state.tasks)} tasks open, the limit is "
                                    f"{self.limits.max_pending_tasks}",
                                    retry_after_s=self.admission.config.retry_after_s
                                    if self.admission is not None else None)
        if self.admission is not None:
            self.admission.admit(submitted_by, self.dispatcher.pending.backlog(submitted_by))
        task = TaskRecord(
            id=task_id,
            description=spec.description,
            kind=spec.kind,
            required_capabilities=list(spec.required_capabilities),
            labels=list(spec.labels),
            input=spec.input,
            timeout_s=spec.timeout_s or self.limits.task_timeout_s,
            max_retries=self.limits.max_retries if spec.max_retries is None else spec.max_retries,
            reply_to=spec.reply_to,
            submitted_by=submitted_by,
            priority=self.priority_for(spec.priority, spec.description),
        )
        assert self.workflows is not None
        spec = self._phased(spec)
        composite = self.workflows.prepare(task, spec)  # before the first save, for a restart
        self.state.add_task(task)  # raises StoreError: then nothing was accepted
        self.metrics.tasks_submitted.inc()
        self.metrics.child(self.metrics.operations, "task_submit").inc()
        if composite:
            self.workflows.launch(task)  # never assigned itself: its children are
        else:
            self.dispatcher.enqueue(task.id)
        return task, False

    def priority_for(self, given: str | int | None, description: str) -> int:
        """The band a submission gets: as given, else from the urgency words (if configured)."""
        if given is not None or not self.priority_from_urgency or self.planner is None:
            return priority_band(given)
        urgency = self.planner.analyzer.analyze(description).urgency
        return URGENCY_PRIORITY.get(urgency, priority_band(None))

    def _phased(self, spec: protocol.TaskSubmit) -> protocol.TaskSubmit:
        """A multi-phase description becomes sequential steps (routing ``phases``)."""
        if spec.composite or spec.kind is not None or spec.required_capabilities:
            return spec
        steps = self.dispatcher.planner.phases(spec.description)
        if not steps or self.kinds_missing_for(steps):
            return spec
        return spec.model_copy(update={"steps": [
            protocol.SubtaskSpec(description=s["description"], kind=s["kind"]) for s in steps]})

    def kinds_missing_for(self, steps: list[dict[str, Any]]) -> list[str]:
        """Step kinds no live agent runs. Each step names its kind, a hard constraint: the
        description is split only when this is empty, or it would wait for a kind nobody runs
        instead of running whole."""
        known = {a.kind for a in self.state.agents.values() if not a.liveness.gone}
        return sorted({s["kind"] for s in steps} - known)

    @staticmethod
    def _refusal(envelope: protocol.Envelope, spec: protocol.TaskSubmit, why: str,
                 *, retry_after_s: float | None = None) -> protocol.TaskCompleted:
        return protocol.TaskCompleted(task_id=spec.task_id or envelope.id, status="rejected",
                                      error=why, retry_after_s=retry_after_s)

    def create_child(self, child: TaskRecord) -> None:
        """A composite task's child (workflows.py): an ordinary task from here on."""
        self.state.add_task(child)
        self.metrics.operations.labels("task_child").inc()
        self.dispatcher.enqueue(child.id)

    def on_submit(self, envelope: protocol.Envelope, spec: protocol.TaskSubmit
                  ) -> Coroutine[Any, Any, None] | None:
        """``task.submit`` over AMQP: answered on the client's own reply queue.

        Returns the answer still to send (None: no reply queue); the caller awaits it before
        it acks the submission."""
        if spec.reply_to is not None and not spec.reply_to.startswith(
            f"{c.CLIENT_QUEUE_PREFIX}{envelope.sender}."
        ):
            raise AuthorizationError(
                "forbidden", f"reply_to must be one of the sender's own "
                f"{c.CLIENT_QUEUE_PREFIX}{envelope.sender}.* queues",
                sender=envelope.sender, message_id=envelope.id)
        try:
            task, duplicate = self.submit(spec, submitted_by=envelope.sender,
                                          default_id=envelope.id)
        except SubmissionRefused as exc:
            if not spec.reply_to:
                return None
            return self.outbox.answer(spec.reply_to, envelope.sender, self._refusal(
                envelope, spec, str(exc), retry_after_s=exc.retry_after_s))
        except StoreError as exc:
            self.metrics.store_errors.labels("task.submit").inc()
            reason = "unstorable_input" if isinstance(exc, UnstorableTask) else "store_unavailable"
            detail = (f"the task store cannot hold this task: {exc.detail}"
                      if isinstance(exc, UnstorableTask)
                      else "the task store is not writable; submit again later")
            if spec.reply_to:  # dead-lettered at once; the notice follows on its own
                self.outbox.reply(spec.reply_to, envelope.sender,
                                  self._refusal(envelope, spec, detail))
            raise RejectedMessage(reason, detail, sender=envelope.sender,
                                  message_id=envelope.id) from exc
        if not spec.reply_to:
            return None
        accepted = protocol.TaskAccepted(task_id=task.id, status=task.status.value,
                                         duplicate=duplicate)
        if duplicate and task.status.terminal:
            return self.outbox.answer(spec.reply_to, envelope.sender, accepted,
                                      completed_notice(task))
        return self.outbox.answer(spec.reply_to, envelope.sender, accepted)
