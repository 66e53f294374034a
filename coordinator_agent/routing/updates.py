"""LearningUpdate: one ended attempt, as plain data: everything the learning state needs from it.

The planner turns an ended attempt into a ``LearningUpdate`` and applies it with
``CoordinationPlanner.apply_outcome``; a standby coordinator applies the same updates, read
from the replicated log, with the same call. So the update carries everything the arithmetic
reads, the time used for decay included: applying it reads no clock and draws no random
number, and two planners with the same configuration fed the same updates in the same order
end in the same learning state (bandit weights, calibration, surprise sums, change-test
statistics, pattern aggregates, first-try counters).

``to_dict`` and ``from_dict`` move it to and from JSON-able data; ``from_dict`` refuses a
malformed entry with a ``ValueError`` that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from coordinator_agent.routing.patterns import Outcome

VERSION = 1


@dataclass(frozen=True, slots=True)
class LearningUpdate:
    """An ended attempt of a task, as the learner sees it."""

    task_id: str
    attempt: int
    at: float  # when it was learned (seconds since the epoch): the decay's clock
    description: str
    kind: str  # the kind that ran the attempt
    success: bool
    keywords: tuple[str, ...]  # the analyser's, as recorded with the decision
    labels: tuple[str, ...] = ()  # the task's (task.submit): contexts of its evidence
    category: str = "general"
    complexity: str = "medium"
    agent_id: str = ""
    quality: float = 1.0
    duration_s: float | None = None
    prior: float | None = None  # the prior success the decision saw; None: computed again
    first_try: bool = False  # the task's first learned attempt (routing accuracy)
    #: Set only for a first try of the kind the decision chose: the model's probability (it
    #: teaches the calibration) and the decision's confidence (the surprise detector's residual).
    model_probability: float | None = None
    confidence: float | None = None

    def outcome(self) -> Outcome:
        """The row of the pattern store (``policy: seed``'s state)."""
        return Outcome(keywords=self.keywords, kind=self.kind, success=self.success,
                       agent_id=self.agent_id, category=self.category,
                       complexity=self.complexity, quality=self.quality,
                       duration_s=self.duration_s, at=self.at)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar but the keywords and labels: no need for asdict's deep copy.
        data = {name: getattr(self, name) for name in _FIELDS}
        data["keywords"] = list(self.keywords)
        if self.labels:
            data["labels"] = list(self.labels)
        else:
            # Absent rather than empty: a coordinator of the version before labels reads it.
            del data["labels"]
        data["version"] = VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearningUpdate:
        """Validate and build; a ``ValueError`` names the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("learning update: not an object")
        if data.get("version", VERSION) != VERSION:
            raise ValueError(f"learning update: unknown version {data.get('version')!r}")
        known = {f.name for f in fields(cls)}
        extra = set(data) - known - {"version"}
        if extra:
            raise ValueError(f"learning update: unknown field {sorted(extra)[0]!r}")
        values: dict[str, Any] = {}
        for name in ("task_id", "description", "kind", "category", "complexity", "agent_id"):
            if name in data:
                values[name] = _text(data, name)
        for name in ("task_id", "description", "kind"):
            if name not in values:
                raise ValueError(f"learning update: missing field {name!r}")
        values["attempt"] = _integer(data, "attempt")
        values["at"] = _number(data, "at")
        for name in ("success", "first_try"):
            if name in data:
                if not isinstance(data[name], bool):
                    raise ValueError(f"learning update: {name!r} must be a boolean")
                values[name] = data[name]
        if "success" not in values:
            raise ValueError("learning update: missing field 'success'")
        for name in ("keywords", "labels"):
            words = data.get(name, [])
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise ValueError(f"learning update: {name!r} must be a list of strings")
            values[name] = tuple(words)
        if "quality" in data:
            values["quality"] = _number(data, "quality")
        for name in ("duration_s", "prior", "model_probability", "confidence"):
            if data.get(name) is not None:
                values[name] = _number(data, name)
        for name in ("prior", "model_probability", "confidence"):
            value = values.get(name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"learning update: {name!r} must be in [0, 1]")
        return cls(**values)


_FIELDS = tuple(f.name for f in fields(LearningUpdate))


def _text(data: dict[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise ValueError(f"learning update: {name!r} must be a string")
    return value


def _number(data: dict[str, Any], name: str) -> float:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"learning update: {name!r} must be a finite number")
    return float(value)


def _integer(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"learning update: {name!r} must be a positive integer")
    return value
