"""Composite tasks: fan-out/fan-in, coalitions, sequential hand-offs and races.

A composite task (the *parent*) is never assigned to an agent. The engine creates its children as
ordinary tasks with ids derived from the parent's (``job.1``, ``job.2``, ``job.plan`` …), so each
child gets routing, retries, timeouts and agent-death handling like any other task, and the
coordinator tells the engine when one ends. A parent's state lives in ``TaskRecord.workflow``
(JSON-able) and is saved before any child it names is created, so a restarted coordinator picks
up where the last one stopped::

    fan-out    sub-tasks (given, or decomposed by a ``planner`` agent) run up to max_concurrency
               at once and are merged by ``combine`` or by a ``synthesizer`` agent;
               on_subtask_error: skip | fail | retry
    coalition  a fan-out over the smallest set of agents that together cover the capabilities
               that no single agent has
    steps      a chain: each step's input carries the previous step's output
    race       the same task for several kinds; the first success wins, the rest are cancelled

The state and the decisions (cover, combine, failure policy, step input, decomposition) are pure
and live in ``composition.py``; ``WorkflowEngine`` keeps the books and leaves every effect to the
callables it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import orjson

from coordinator_agent.coordinator.composition import (
    DEFAULT_CONCURRENCY,
    DEFAULT_RESUBMITS,
    OPEN,
    Action,
    Child,
    ChildResult,
    ChildStatus,
    ErrorPolicy,
    Mode,
    Phase,
    Workflow,
    child_id,
    coalition_cover,
    combine,
    failure_action,
    parse_decomposition,
    spec_dict,
    step_input,
    to_start,
)
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.tasks import TaskRecord, TaskStatus
from coordinator_agent.exceptions import PlanningError
from coordinator_agent.settings import Limits
from coordinator_agent.wire import protocol

log = logging.getLogger(__name__)

PLANNER_KIND = "planner"
SYNTHESIZER_KIND = "synthesizer"
MAX_ERROR_CHARS = 1024


def merged_output_limit(limits: Limits) -> int:
    """A merged output must fit in one message (task.completed, or the synthesizer's task)."""
    return max(limits.max_output_bytes, limits.max_message_bytes // 2)


# --- the engine -------------------------------------------------------------------------------


class FinishTask(Protocol):
    def __call__(
        self, task: TaskRecord, status: TaskStatus, *, output: Any = None,
        error: str | None = None,
    ) -> None: ...


class WorkflowEngine:
    """Runs composite tasks on top of ordinary ones.

    ``create_child`` stores a new task and queues it for dispatch; ``finish`` ends a task (and
    calls ``on_finished`` back); ``cancel`` cancels a task by id. All are the coordinator's.
    """

    def __init__(
        self,
        state: StateManager,
        *,
        create_child: Callable[[TaskRecord], None],
        finish: FinishTask,
        cancel: Callable[[str, str], object],
        max_merged_bytes: int,
    ) -> None:
        self.state = state
        self._create_child = create_child
        self._finish = finish
        self._cancel = cancel
        self.max_merged_bytes = max_merged_bytes

    # --- entry points (the coordinator's hooks) -------------------------------------------------

    def prepare(self, task: TaskRecord, spec: protocol.TaskSubmit) -> bool:
        """Give a composite submission its workflow state (before its first save)."""
        if not spec.composite:
            return False
        if spec.steps is not None:
            flow = Workflow(Mode.STEPS, "steps", [spec_dict(s) for s in spec.steps],
                            [Child(i + 1) for i in range(len(spec.steps))])
        else:
            subtasks = spec.subtasks or []
            flow = Workflow(
                Mode.FAN_OUT, "planner" if spec.decompose else "subtasks",
                [spec_dict(s) for s in subtasks], [Child(i + 1) for i in range(len(subtasks))],
                phase=Phase.PLANNING if spec.decompose else Phase.RUNNING,
                max_concurrency=spec.max_concurrency or DEFAULT_CONCURRENCY,
                on_error=ErrorPolicy(spec.on_subtask_error or ErrorPolicy.FAIL),
                resubmits=(DEFAULT_RESUBMITS if spec.subtask_retries is None
                           else spec.subtask_retries),
                merge=spec.merge or "combine", merge_input=spec.merge_input,
            )
            if spec.decompose:
                flow.helpers["planner"] = Child(0)
        task.workflow = flow.to_dict()
        return True

    def launch(self, task: TaskRecord) -> None:
        """Start a prepared parent: it runs (its children do) from now on."""
        # Ordinary tasks may not jump from pending to running; a parent passes through assigned
        # in memory only (it is never saved, nor sent anywhere, in that state).
        task.move(TaskStatus.ASSIGNED)
        task.move(TaskStatus.RUNNING)
        self._advance(task, self._load(task))

    def try_coalition(self, task: TaskRecord, agents: Iterable[AgentRecord]) -> bool:
        """Split a task no single agent can run across the fewest agents that together can.

        For a pending task that has never been assigned; the caller takes it off its queue
        when this returns True.
        """
        if (task.workflow is not None or task.attempts or task.status is not TaskStatus.PENDING
                or len(set(task.required_capabilities)) < 2):
            return False
        offers = [(a.id, a.capabilities) for a in agents
                  if a.assignable and (task.kind is None or a.kind == task.kind)]
        cover = coalition_cover(task.required_capabilities, offers)
        if cover is None or len(cover) < 2:
            return False
        specs = [{"description": task.description, "kind": task.kind,
                  "required_capabilities": sorted(brings), "input": None, "timeout_s": None}
                 for _, brings in cover]
        flow = Workflow(Mode.FAN_OUT, "coalition", specs,
                        [Child(i + 1) for i in range(len(cover))], max_concurrency=len(cover),
                        coalition=[{"agent_id": agent_id, "capabilities": sorted(brings)}
                                   for agent_id, brings in cover])
        task.workflow = flow.to_dict()
        log.info("task %s runs as a coalition of %d agents", task.id, len(cover))
        self.launch(task)
        return True

    def hedge(self, task: TaskRecord, kinds: Sequence[str], *, merge: bool = False) -> bool:
        """Race the task on several kinds at once; the first success wins, the rest are cancelled.

        For a pending task that has never been assigned; the caller takes it off its queue
        when this returns True. The parent's output is the winner's output, unchanged. With
        ``merge``, every kind runs to the end and the parent's output combines their results
        (it fails only if all fail).
        """
        distinct = list(dict.fromkeys(kinds))
        if (task.workflow is not None or task.attempts or task.status is not TaskStatus.PENDING
                or len(distinct) < 2):
            return False
        specs = [{"description": task.description, "kind": kind,
                  "required_capabilities": list(task.required_capabilities), "input": None,
                  "timeout_s": None} for kind in distinct]
        children = [Child(i + 1) for i in range(len(specs))]
        if merge:
            # Both run to the end; the parent merges what succeeded (``combine``).
            flow = Workflow(Mode.FAN_OUT, "merge", specs, children, max_concurrency=len(specs),
                            on_error=ErrorPolicy.SKIP, resubmits=0, merge="combine")
        else:
            flow = Workflow(Mode.RACE, "hedge", specs, children, max_concurrency=len(specs))
        task.workflow = flow.to_dict()
        self.launch(task)
        return True

    def on_finished(self, task: TaskRecord) -> None:
        """A task ended (the coordinator's ``_finish``): advance its parent, stop its children."""
        try:
            if task.parent_id is not None:
                parent = self.state.find_task(task.parent_id)
                if (parent is not None and parent.workflow is not None
                        and not parent.status.terminal):
                    self._child_ended(parent, task)
            if task.workflow is not None and task.status.terminal:
                self._stop_children(task, f"parent {task.id} {task.status.value}")
        except Exception:
            # A bug here must not lose the message being handled; a restart reconciles.
            log.exception("workflow bookkeeping failed after task %s ended", task.id)

    def resume(self) -> None:
        """After a restart: carry on with every open parent, from its saved state."""
        for task in list(self.state.tasks.values()):
            if task.workflow is None or task.status.terminal:
                continue
            if task.status is TaskStatus.PENDING:
                self.launch(task)  # accepted, but the crash came before it started
            else:
                self._reconcile(task)
        for task in list(self.state.tasks.values()):  # children of parents that already ended
            if task.parent_id is not None and not task.status.terminal:
                parent = self.state.find_task(task.parent_id)
                if parent is not None and parent.status.terminal:
                    self._cancel(task.id, f"parent {parent.id} {parent.status.value}")

    # --- bookkeeping ------------------------------------------------------------------------------

    @staticmethod
    def _load(task: TaskRecord) -> Workflow:
        assert task.workflow is not None
        return Workflow.from_dict(task.workflow)

    def _store(self, parent: TaskRecord, flow: Workflow) -> None:
        """Save the parent; it must happen before any effect that may call back into us."""
        if flow.children:
            done = sum(c.status not in OPEN for c in flow.children)
            running = sum(self._live_progress(c) for c in flow.children
                          if c.status is ChildStatus.RUNNING)
            parent.progress = round((done + running) / len(flow.children), 4)
        parent.workflow = flow.to_dict()
        self.state.save(parent)

    def _live_progress(self, child: Child) -> float:
        task = self.state.tasks.get(child.task_id) if child.task_id else None
        return task.progress if task is not None else 0.0

    def _reconcile(self, parent: TaskRecord) -> None:
        """Catch up with children that ended, or were never created, while we were down."""
        flow = self._load(parent)
        ended: list[TaskRecord] = []
        for child in flow.open_children():
            if child.status is not ChildStatus.RUNNING or child.task_id is None:
                continue
            task = self.state.find_task(child.task_id)
            if task is None:
                self._create_child(self._child_task(parent, flow, child))
            elif task.status.terminal:
                ended.append(task)
        for task in ended:
            if not parent.status.terminal:
                self._child_ended(parent, task)
        if not parent.status.terminal:
            self._advance(parent, self._load(parent))

    def _stop_children(self, parent: TaskRecord, reason: str) -> None:
        flow = self._load(parent)
        if flow.open_children():
            for child in flow.open_children():
                child.status = ChildStatus.CANCELLED
            flow.phase = Phase.DONE
            parent.workflow = flow.to_dict()
            self.state.save(parent)
        for task_id in parent.child_ids:
            task = self.state.find_task(task_id)
            if task is not None and not task.status.terminal:
                self._cancel(task_id, reason)

    def _advance(self, parent: TaskRecord, flow: Workflow) -> None:
        """Create whatever children the state calls for now, or decide the outcome."""
        if parent.status.terminal or flow.phase is Phase.DONE:
            return
        if flow.phase is Phase.PLANNING:
            self._start_helper(parent, flow, "planner")
        elif flow.phase is Phase.MERGING:
            self._start_helper(parent, flow, "synthesizer")
        elif flow.mode is Mode.STEPS:
            current = next((c for c in flow.children if c.status is not ChildStatus.SUCCEEDED),
                           None)
            if current is None:
                self._finish_steps(parent, flow)
            elif current.status is ChildStatus.WAITING:
                self._start(parent, flow, current, str(current.index))
        else:  # fan-out and race
            for child in to_start(flow.children, flow.max_concurrency):
                self._start(parent, flow, child, self._suffix(child))
            if flow.mode is Mode.FAN_OUT and not flow.open_children():
                self._fan_in(parent, flow)

    @staticmethod
    def _suffix(child: Child) -> str:
        runs = len(child.runs)
        return str(child.index) if runs == 0 else f"{child.index}-r{runs + 1}"

    def _start_helper(self, parent: TaskRecord, flow: Workflow, role: str) -> None:
        helper = flow.helpers.setdefault(role, Child(0))
        if helper.status is ChildStatus.WAITING:
            self._start(parent, flow, helper, "plan" if role == "planner" else "merge")

    def _start(self, parent: TaskRecord, flow: Workflow, child: Child, suffix: str) -> None:
        task_id, taken = child_id(parent.id, suffix), 1
        while self.state.find_task(task_id) is not None:  # a client already took that id
            taken += 1
            task_id = child_id(parent.id, f"{suffix}_{taken}")
        child.status, child.task_id = ChildStatus.RUNNING, task_id
        child.runs.append(task_id)
        child.agent_id = child.error = None
        parent.child_ids.append(task_id)
        task = self._child_task(parent, flow, child)
        self._store(parent, flow)  # the intent is durable before the child exists
        self._create_child(task)

    def _child_task(self, parent: TaskRecord, flow: Workflow, child: Child) -> TaskRecord:
        """The task for a child's current run (also to re-create one lost in a crash)."""
        assert child.task_id is not None
        if child is flow.helpers.get("planner"):
            spec: dict[str, Any] = {"kind": PLANNER_KIND, "input": parent.input}
        elif child is flow.helpers.get("synthesizer"):
            spec = {"kind": SYNTHESIZER_KIND,
                    "input": {"input": flow.merge_input, "previous": self._combined(flow)}}
        else:
            spec = dict(flow.specs[child.index - 1])
            if flow.mode is Mode.STEPS:
                previous = (self._output(flow.children[child.index - 2])
                            if child.index > 1 else None)
                spec["input"] = step_input(child.index, spec.get("input"), parent.input,
                                           previous)
            elif spec.get("input") is None:
                spec["input"] = parent.input
        return TaskRecord(
            id=child.task_id, description=spec.get("description") or parent.description,
            kind=spec.get("kind"), required_capabilities=list(spec.get("required_capabilities")
                                                              or []),
            input=spec.get("input"), timeout_s=spec.get("timeout_s") or parent.timeout_s,
            max_retries=parent.max_retries, reply_to=None, submitted_by=parent.submitted_by,
            parent_id=parent.id, priority=parent.priority, labels=list(parent.labels),
        )

    def _output(self, child: Child) -> Any:
        task = self.state.find_task(child.task_id) if child.task_id else None
        return task.output if task is not None else None

    # --- a child ended ----------------------------------------------------------------------------

    def _child_ended(self, parent: TaskRecord, task: TaskRecord) -> None:
        flow = self._load(parent)
        child = next((c for c in (*flow.children, *flow.helpers.values())
                      if c.task_id == task.id and c.status is ChildStatus.RUNNING), None)
        if child is None or flow.phase is Phase.DONE:
            return  # already counted (a redelivery, or a sibling we cancelled ourselves)
        child.agent_id = task.attempts[-1].agent_id if task.attempts else None
        agent = self.state.agents.get(child.agent_id) if child.agent_id else None
        child.kind = agent.kind if agent is not None else task.kind
        ok = task.status is TaskStatus.SUCCEEDED
        child.status = ChildStatus.SUCCEEDED if ok else ChildStatus.FAILED
        child.error = None if ok else (task.error or task.status.value)[:MAX_ERROR_CHARS]
        if child is flow.helpers.get("planner"):
            self._planned(parent, flow, task)
        elif child is flow.helpers.get("synthesizer"):
            if ok:
                self._conclude(parent, flow, TaskStatus.SUCCEEDED, output=task.output)
            else:
                self._conclude(parent, flow, TaskStatus.FAILED,
                               error=f"synthesizer task {task.id} failed: {child.error}")
        elif flow.mode is Mode.STEPS:
            if ok:
                self._store(parent, flow)
                self._advance(parent, flow)
            else:
                self._conclude(parent, flow, TaskStatus.FAILED,
                               error=f"step {child.index} of {len(flow.children)} ({task.id}) "
                               f"failed: {child.error}")
        elif flow.mode is Mode.RACE:
            self._race_ended(parent, flow, child, task)
        elif ok:
            self._store(parent, flow)
            self._advance(parent, flow)
        else:
            self._subtask_failed(parent, flow, child, task)

    def _planned(self, parent: TaskRecord, flow: Workflow, task: TaskRecord) -> None:
        if task.status is not TaskStatus.SUCCEEDED:
            self._conclude(parent, flow, TaskStatus.FAILED,
                           error=f"planner task {task.id} failed: {task.error or 'cancelled'}")
            return
        try:
            subtasks = parse_decomposition(parent.id, task.output)
        except PlanningError as exc:
            self._conclude(parent, flow, TaskStatus.FAILED, error=exc.reason)
            return
        flow.specs = [spec_dict(s) for s in subtasks]
        flow.children = [Child(i + 1) for i in range(len(subtasks))]
        flow.phase = Phase.RUNNING
        self._store(parent, flow)
        self._advance(parent, flow)

    def _subtask_failed(
        self, parent: TaskRecord, flow: Workflow, child: Child, task: TaskRecord
    ) -> None:
        action = failure_action(flow.on_error, len(child.runs), flow.resubmits,
                                cancelled=task.status is TaskStatus.CANCELLED)
        if action is Action.RESUBMIT:
            child.status = ChildStatus.WAITING
            log.info("sub-task %s failed; submitting it again (run %d)", task.id,
                     len(child.runs) + 1)
        elif action is Action.SKIP:
            child.status = ChildStatus.SKIPPED
        else:
            runs = f" after {len(child.runs)} runs ({', '.join(child.runs)})" \
                if len(child.runs) > 1 else ""
            self._conclude(parent, flow, TaskStatus.FAILED,
                           error=f"sub-task {child.index} ({task.id}) failed{runs}: {child.error}")
            return
        self._store(parent, flow)
        self._advance(parent, flow)

    def _race_ended(
        self, parent: TaskRecord, flow: Workflow, child: Child, task: TaskRecord
    ) -> None:
        if child.status is ChildStatus.SUCCEEDED:
            self._conclude(parent, flow, TaskStatus.SUCCEEDED, output=task.output)
        elif not flow.open_children():
            errors = "; ".join(f"{c.task_id} ({flow.specs[c.index - 1].get('kind')}): {c.error}"
                               for c in flow.children)
            self._conclude(parent, flow, TaskStatus.FAILED, error=f"every racer failed: {errors}")
        else:
            self._store(parent, flow)

    def _conclude(
        self, parent: TaskRecord, flow: Workflow, status: TaskStatus, *, output: Any = None,
        error: str | None = None,
    ) -> None:
        """Decide the outcome: stop what still runs, then end the parent."""
        stop = [c.task_id for c in flow.open_children()
                if c.status is ChildStatus.RUNNING and c.task_id]
        for child in flow.open_children():
            child.status = ChildStatus.CANCELLED
        flow.phase = Phase.DONE
        self._store(parent, flow)  # from here on, events of the cancelled children are ignored
        for task_id in stop:
            self._cancel(task_id, f"parent {parent.id} {status.value}")
        self._finish(parent, status, output=output, error=error[:4096] if error else None)

    # --- fan-in -------------------------------------------------------------------------------

    def _combined(self, flow: Workflow) -> dict[str, Any]:
        results = []
        for child in flow.children:
            task = self.state.find_task(child.task_id) if child.task_id else None
            results.append(ChildResult(
                index=child.index, task_id=child.task_id or "",
                status=task.status.value if task is not None else child.status.value,
                output=task.output if child.status is ChildStatus.SUCCEEDED and task else None,
                agent_id=child.agent_id, runs=tuple(child.runs), error=child.error,
                skipped=child.status is ChildStatus.SKIPPED,
            ))
        extra: dict[str, Any] = {}
        if "planner" in flow.helpers:
            extra["planner"] = {"task_id": flow.helpers["planner"].task_id,
                                "agent_id": flow.helpers["planner"].agent_id}
        if flow.coalition:
            extra["coalition"] = flow.coalition
        return combine(results, source=flow.source, extra=extra)

    def _fan_in(self, parent: TaskRecord, flow: Workflow) -> None:
        if not any(c.status is ChildStatus.SUCCEEDED for c in flow.children):
            errors = "; ".join(f"{c.task_id}: {c.error}" for c in flow.children)[:2000]
            self._conclude(parent, flow, TaskStatus.FAILED,
                           error=f"every sub-task failed: {errors}")
            return
        combined = self._combined(flow)
        size = len(orjson.dumps(combined))
        if size > self.max_merged_bytes:
            self._conclude(parent, flow, TaskStatus.FAILED,
                           error=f"merged output of {size} bytes exceeds the "
                           f"{self.max_merged_bytes}-byte limit")
        elif flow.merge == "synthesizer":
            flow.phase = Phase.MERGING
            self._start_helper(parent, flow, "synthesizer")
        else:
            self._conclude(parent, flow, TaskStatus.SUCCEEDED, output=combined)

    def _finish_steps(self, parent: TaskRecord, flow: Workflow) -> None:
        record = [{"index": c.index, "task_id": c.task_id, "kind": c.kind,
                   "agent_id": c.agent_id, "status": c.status.value} for c in flow.children]
        self._conclude(parent, flow, TaskStatus.SUCCEEDED,
                       output={"output": self._output(flow.children[-1]), "steps": record})
