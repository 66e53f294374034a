"""What a composite task is made of, and the pure decisions about it.

A parent's state (``Workflow``: its mode, phase, sub-task specs and ``Child`` positions) is
JSON-able and kept in ``TaskRecord.workflow``. The decisions (coalition cover, fan-in combine,
failure policy, step input, decomposition parsing, child ids) are pure functions: no I/O, no
coordinator and no state manager. ``WorkflowEngine`` (``workflows.py``) applies them.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from coordinator_agent.exceptions import PlanningError
from coordinator_agent.wire import protocol

DEFAULT_CONCURRENCY = 8
DEFAULT_RESUBMITS = 1
#: Up to this many distinct capability offers the smallest coalition is found exactly.
EXACT_COVER_LIMIT = 12
MAX_ID_LENGTH = 128


class Mode(enum.StrEnum):
    FAN_OUT = "fan_out"
    STEPS = "steps"
    RACE = "race"


class Phase(enum.StrEnum):
    PLANNING = "planning"  # waiting for the planner's decomposition
    RUNNING = "running"  # children running
    MERGING = "merging"  # waiting for the synthesizer
    DONE = "done"  # the outcome is decided


class ChildStatus(enum.StrEnum):
    WAITING = "waiting"  # not created yet (or waiting to be re-submitted)
    RUNNING = "running"  # its task exists and is not finished
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # failed, and on_subtask_error=skip merged without it
    CANCELLED = "cancelled"  # stopped because the parent's outcome was decided


class ErrorPolicy(enum.StrEnum):
    SKIP = "skip"
    FAIL = "fail"
    RETRY = "retry"


class Action(enum.StrEnum):
    """What a failed sub-task does to its fan-out."""

    SKIP = "skip"
    ABORT = "abort"
    RESUBMIT = "resubmit"


OPEN = frozenset({ChildStatus.WAITING, ChildStatus.RUNNING})


@dataclass
class Child:
    """One position of a workflow; each run of it is a task (``runs``, the last is current)."""

    index: int
    status: ChildStatus = ChildStatus.WAITING
    task_id: str | None = None
    runs: list[str] = field(default_factory=list)
    agent_id: str | None = None
    kind: str | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Child:
        known = {f.name for f in fields(cls)}
        child = cls(**{k: v for k, v in data.items() if k in known})
        child.status = ChildStatus(child.status)
        return child


@dataclass
class Workflow:
    """A parent's JSON-able state, kept in ``TaskRecord.workflow``."""

    mode: Mode
    source: str  # subtasks | planner | coalition | steps | hedge
    specs: list[dict[str, Any]]
    children: list[Child]
    phase: Phase = Phase.RUNNING
    max_concurrency: int = DEFAULT_CONCURRENCY
    on_error: ErrorPolicy = ErrorPolicy.FAIL
    resubmits: int = DEFAULT_RESUBMITS
    merge: str = "combine"
    merge_input: Any = None
    #: The planner and synthesizer tasks, by role.
    helpers: dict[str, Child] = field(default_factory=dict)
    #: A coalition's members: which agent's capabilities each child stands for.
    coalition: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workflow:
        known = {f.name for f in fields(cls)}
        flow = cls(**{k: v for k, v in data.items() if k in known})
        flow.mode, flow.phase = Mode(flow.mode), Phase(flow.phase)
        flow.on_error = ErrorPolicy(flow.on_error)
        flow.children = [Child.from_dict(c) for c in data.get("children", [])]
        flow.helpers = {k: Child.from_dict(v) for k, v in data.get("helpers", {}).items()}
        return flow

    def open_children(self) -> list[Child]:
        return [c for c in (*self.children, *self.helpers.values()) if c.status in OPEN]


# --- pure decisions ---------------------------------------------------------------------------


def failure_action(policy: ErrorPolicy, runs: int, resubmits: int, *, cancelled: bool) -> Action:
    """A sub-task ended without success after ``runs`` runs: skip it, abort, or run it again.

    A cancellation from outside (an operator) is deliberate: it is never re-submitted.
    """
    if policy is ErrorPolicy.SKIP:
        return Action.SKIP
    if policy is ErrorPolicy.RETRY and not cancelled and runs <= resubmits:
        return Action.RESUBMIT
    return Action.ABORT


def to_start(children: Sequence[Child], max_concurrency: int) -> list[Child]:
    """The waiting children to create now, in index order, without exceeding the concurrency."""
    running = sum(c.status is ChildStatus.RUNNING for c in children)
    waiting = [c for c in children if c.status is ChildStatus.WAITING]
    return waiting[: max(0, max_concurrency - running)]


def step_input(index: int, own_input: Any, parent_input: Any, previous: Any) -> Any:
    """Step 1 gets its own input (or the parent's); a later step also the previous output."""
    if index == 1:
        return own_input if own_input is not None else parent_input
    return {"input": own_input, "previous": previous}


@dataclass(frozen=True)
class ChildResult:
    """What the combiner needs to know about one sub-task."""

    index: int
    task_id: str
    status: str
    output: Any = None
    agent_id: str | None = None
    runs: tuple[str, ...] = ()
    error: str | None = None
    skipped: bool = False


def combine(
    results: Iterable[ChildResult], *, source: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The deterministic fan-in: results in index order, whatever order they finished in."""
    ordered = sorted(results, key=lambda r: r.index)
    provenance: dict[str, Any] = {
        "source": source,
        "children": [{"index": r.index, "task_id": r.task_id, "agent_id": r.agent_id,
                      "runs": list(r.runs)} for r in ordered],
        "skipped": [{"index": r.index, "task_id": r.task_id, "error": r.error}
                    for r in ordered if r.skipped],
        **(extra or {}),
    }
    return {
        "results": [{"index": r.index, "task_id": r.task_id, "status": r.status,
                     "output": r.output} for r in ordered],
        "provenance": provenance,
    }


def parse_decomposition(task_id: str, output: Any) -> list[protocol.SubtaskSpec]:
    """A planner's answer, validated like any untrusted input; PlanningError says what is wrong."""
    if not isinstance(output, dict):
        raise PlanningError(task_id, 'planner output must be an object {"subtasks": [...]}')
    try:
        return list(protocol.Decomposition.model_validate(output).subtasks)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'output'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)[:3]
        )
        raise PlanningError(task_id, f"planner output rejected: {problems}"[:500]) from None


def coalition_cover(
    required: Iterable[str], agents: Iterable[tuple[str, Iterable[str]]],
    *, exact_limit: int = EXACT_COVER_LIMIT,
) -> list[tuple[str, frozenset[str]]] | None:
    """The smallest set of agents whose capabilities together include ``required``.

    Returns ``(agent_id, capabilities it brings)`` pairs, the brought sets disjoint and
    together ``required``, or None when the agents together do not cover it. Exact for up to
    ``exact_limit`` distinct offers, greedy (within a log factor of the smallest) beyond.
    Deterministic: ties go to the lowest agent ids.
    """
    need = frozenset(required)
    if not need:
        return None
    offers: dict[frozenset[str], str] = {}  # what an agent brings -> the first agent bringing it
    for agent_id, capabilities in sorted(((a, frozenset(c)) for a, c in agents),
                                         key=lambda pair: pair[0]):
        brings = need & capabilities
        if brings and brings not in offers:
            offers[brings] = agent_id
    if frozenset().union(*offers) != need:
        return None
    # An offer inside another one is never needed in a smallest cover.
    useful = sorted((s for s in offers if not any(s < other for other in offers)),
                    key=lambda s: (-len(s), offers[s]))
    chosen = (_exact_cover(need, useful) if len(useful) <= exact_limit
              else _greedy_cover(need, useful))
    members: list[tuple[str, frozenset[str]]] = []
    left = need
    for offer in chosen:  # each capability goes to the first chosen agent that has it
        members.append((offers[offer], offer & left))
        left -= offer
    return members


def _exact_cover(need: frozenset[str], offers: list[frozenset[str]]) -> list[frozenset[str]]:
    for size in range(1, len(offers) + 1):
        for combo in itertools.combinations(offers, size):
            if frozenset().union(*combo) == need:
                return list(combo)
    raise AssertionError("offers cover the need")  # checked by the caller


def _greedy_cover(need: frozenset[str], offers: list[frozenset[str]]) -> list[frozenset[str]]:
    chosen: list[frozenset[str]] = []
    left = need
    while left:
        best = max(offers, key=lambda s: len(s & left))  # max keeps the first of equals
        chosen.append(best)
        left -= best
    return chosen


def child_id(parent_id: str, suffix: str) -> str:
    """``<parent>.<suffix>``, shortened with a digest of the parent id when too long."""
    candidate = f"{parent_id}.{suffix}"
    if len(candidate) <= MAX_ID_LENGTH:
        return candidate
    digest = hashlib.sha256(parent_id.encode()).hexdigest()[:16]
    keep = MAX_ID_LENGTH - len(digest) - len(suffix) - 2
    return f"{parent_id[:keep]}.{digest}.{suffix}"


def spec_dict(spec: protocol.SubtaskSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")
