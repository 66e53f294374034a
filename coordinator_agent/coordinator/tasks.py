"""Task records and their state machine. Illegal moves raise; every attempt is kept."""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator_agent.exceptions import IllegalTransition


class TaskStatus(enum.StrEnum):
    PENDING = "pending"  # accepted, waiting for an agent
    ASSIGNED = "assigned"  # sent to an agent, no word from it yet
    RUNNING = "running"  # the agent reported progress
    ESCALATED = "escalated"  # the fallback chain ran out: waiting for an operator (desk.py)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    # pending -> succeeded: a late success of an earlier attempt, after it was given up on.
    TaskStatus.PENDING: frozenset({TaskStatus.ASSIGNED, TaskStatus.ESCALATED, *TERMINAL}),
    TaskStatus.ASSIGNED: frozenset(
        {TaskStatus.RUNNING, TaskStatus.PENDING, TaskStatus.ESCALATED, *TERMINAL}
    ),
    TaskStatus.RUNNING: frozenset({TaskStatus.PENDING, TaskStatus.ESCALATED, *TERMINAL}),
    # The escalation desk: out of the chain, an operator retries, resolves, fails or cancels.
    TaskStatus.ESCALATED: frozenset({TaskStatus.PENDING, *TERMINAL}),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


class AttemptOutcome(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the agent reported an error
    TIMEOUT = "timeout"
    AGENT_LOST = "agent_lost"  # the agent left (goodbye) while running it
    CRASHED = "crashed"  # the agent died or restarted while running it: a poison suspect
    WITHDRAWN = "withdrawn"  # the agent died, restarted or left before starting it
    UNDELIVERABLE = "undeliverable"  # the broker could not deliver the assignment
    SUPERSEDED = "superseded"  # another attempt finished first
    CANCELLED = "cancelled"  # the task was cancelled while this attempt ran
    REDIRECTED = "redirected"  # an operator sent the task elsewhere (desk.py): costs no retry


#: Attempts that never ran on an agent: bounded per task (results.py MAX_UNDELIVERABLE).
NEVER_RAN = frozenset({AttemptOutcome.UNDELIVERABLE, AttemptOutcome.WITHDRAWN})

#: Attempts that cost no retry: never ran on an agent (undeliverable, withdrawn before it
#: started), or stopped by an operator (redirected).
FREE_OUTCOMES = frozenset(
    {AttemptOutcome.UNDELIVERABLE, AttemptOutcome.WITHDRAWN, AttemptOutcome.REDIRECTED})


@dataclass
class Attempt:
    number: int
    agent_id: str
    started_at: float
    deadline: float
    outcome: AttemptOutcome = AttemptOutcome.RUNNING
    ended_at: float | None = None
    error: str | None = None
    duration_s: float | None = None
    #: The agent said it started running it (``task.progress``): a crash now is the task's.
    started: bool = False
    #: The agent process it was meant for (the id of that process's ``agent.hello``), sent as
    #: the assignment's correlation id: another process of the same agent does not run it.
    session: str | None = None

    def end(self, outcome: AttemptOutcome, error: str | None = None) -> None:
        self.outcome = outcome
        self.error = error
        self.ended_at = time.time()


@dataclass
class TaskRecord:
    id: str
    description: str
    kind: str | None = None
    required_capabilities: list[str] = field(default_factory=list)
    input: Any = None
    timeout_s: float = 60.0
    max_retries: int = 2
    reply_to: str | None = None
    submitted_by: str = ""
    status: TaskStatus = TaskStatus.PENDING
    attempts: list[Attempt] = field(default_factory=list)
    output: Any = None
    error: str | None = None
    progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    #: The terminal notice (task.completed) has been published to reply_to.
    notified: bool = False
    #: Why the router chose what it chose (filled by the planner).
    routing: dict[str, Any] = field(default_factory=dict)
    #: Composite tasks (workflows.py): the parent of a child task, never assigned itself.
    parent_id: str | None = None
    #: Composite tasks: every child created so far, in order of creation.
    child_ids: list[str] = field(default_factory=list)
    #: Composite tasks: the engine's JSON-able state; None for an ordinary task.
    workflow: dict[str, Any] | None = None
    #: Priority band 0-9 (scheduling.py): low 2, medium 5, high 8.
    priority: int = 5
    #: The submitter's labels (``task.submit``): contexts of the router's evidence.
    labels: list[str] = field(default_factory=list)
    #: Operator actions on the task (desk.py): action, by, at, and what was chosen.
    desk: list[dict[str, Any]] = field(default_factory=list)

    def move(self, target: TaskStatus) -> None:
        if target not in TRANSITIONS[self.status]:
            raise IllegalTransition(self.id, self.status.value, target.value)
        self.status = target
        self.updated_at = time.time()

    @property
    def current_attempt(self) -> Attempt | None:
        if self.attempts and self.attempts[-1].outcome is AttemptOutcome.RUNNING:
            return self.attempts[-1]
        return None

    def attempt(self, number: int) -> Attempt | None:
        return self.attempts[number - 1] if 0 < number <= len(self.attempts) else None

    def was_assigned_to(self, agent_id: str) -> bool:
        return any(a.agent_id == agent_id for a in self.attempts)

    @property
    def undeliverable_attempts(self) -> int:
        """Attempts that never ran (undeliverable or withdrawn): bounded, but no retry spent."""
        return sum(a.outcome in NEVER_RAN for a in self.attempts)

    @property
    def crashes(self) -> int:
        return sum(a.outcome is AttemptOutcome.CRASHED for a in self.attempts)

    @property
    def crashed_agents(self) -> frozenset[str]:
        """Agents this task crashed: never given it again (one crash per agent at most)."""
        return frozenset(a.agent_id for a in self.attempts if a.outcome is AttemptOutcome.CRASHED)

    @property
    def executions(self) -> int:
        """Attempts an agent started: more than one means the work ran more than once."""
        return sum(a.started for a in self.attempts)

    @property
    def retries_left(self) -> int:
        # An attempt that never reached an agent, was withdrawn before it started, or was
        # redirected by an operator costs no retry.
        used = sum(a.outcome not in FREE_OUTCOMES for a in self.attempts)
        return self.max_retries + 1 - used

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.labels:
            # Absent rather than empty: a coordinator of the version before labels (a standby
            # during an upgrade) reads the records of unlabelled tasks.
            del data["labels"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        data = dict(data)
        data["status"] = TaskStatus(data["status"])
        data["attempts"] = [
            Attempt(**{**a, "outcome": AttemptOutcome(a["outcome"])}) for a in data["attempts"]
        ]
        return cls(**data)

    def public_view(self) -> dict[str, Any]:
        """What the API and CLI show: no reply queue, bounded."""
        view = self.to_dict()
        view["labels"] = list(self.labels)
        view.pop("reply_to", None)
        view.pop("notified", None)
        if self.workflow is not None:
            # The children's summaries, without the specs and inputs they were built from.
            view["workflow"] = {k: v for k, v in self.workflow.items()
                                if k not in WORKFLOW_PRIVATE_KEYS}
        return view


#: Parts of a workflow state that ``public_view`` leaves out (large, and inputs are the client's).
WORKFLOW_PRIVATE_KEYS = frozenset({"specs", "merge_input"})
