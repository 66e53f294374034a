"""Phases: a description that says "do X, with Y, then Z" becomes sequential steps.

A description is read as several phases only when it says so with a sequencing word
(``phases.separators``: "then", "afterwards", "finally" by default, or a ";"). It is cut into
clauses at those words, at commas and semicolons, and at "with", "and", "after that",
"followed by"; each clause gets the kind the text prior is clearly sure of. A clause with no
clear kind joins the phase before it, and neighbouring clauses of one kind join into one step.
Two steps or more, up to ``phases.max_steps``, make a workflow; otherwise the task stays whole.

"Implement rate limiting with a security audit, then deploy" gives three steps: development
("Implement rate limiting"), security ("a security audit") and cicd ("deploy").
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

from coordinator_agent.routing.config import Phases

_JOINERS = ("with", "and", "after that", "followed by", "and then")
#: A clause's top kind must be this many times as likely as the runner-up to be "clear".
CLEAR_RATIO = 1.5


class _Prior(Protocol):
    def probabilities(self, description: str) -> dict[str, float]: ...


@functools.lru_cache(maxsize=8)
def _sequencing(separators: tuple[str, ...]) -> re.Pattern[str]:
    """A sequencing word or a ";": built once per configuration, not once per submission."""
    return re.compile("|".join(r"\b" + re.escape(w) + r"\b" for w in separators) + "|;",
                      re.IGNORECASE)


def _splitter(separators: list[str]) -> re.Pattern[str]:
    words = sorted({*separators, *_JOINERS}, key=len, reverse=True)
    alternatives = "|".join(r"\b" + re.escape(w).replace(r"\ ", r"\s+") + r"\b" for w in words)
    return re.compile(rf"\s*(?:[,;]\s*)?(?:{alternatives})\s+|\s*[,;]\s*", re.IGNORECASE)


def _clear_kind(prior: _Prior, text: str) -> str | None:
    probs = prior.probabilities(text)
    if len(probs) < 2:
        return next(iter(probs), None)
    ranked = sorted(probs.values(), reverse=True)
    if ranked[0] < CLEAR_RATIO * ranked[1]:
        return None
    return next(kind for kind, p in probs.items() if p == ranked[0])


def split_phases(description: str, prior: _Prior,
                 settings: Phases) -> list[tuple[str, str]] | None:
    """[(step description, kind), ...] for a multi-phase description, else None."""
    text = description.strip()
    if not settings.separators or not _sequencing(tuple(settings.separators)).search(text):
        return None
    clauses = [c.strip(" .") for c in _splitter(settings.separators).split(text)]
    steps: list[list[str]] = []  # [kind, text]
    for clause in clauses:
        if not clause:
            continue
        kind = _clear_kind(prior, clause)
        if kind is None or (steps and steps[-1][0] == kind):
            if steps:
                steps[-1][1] += " " + clause
                continue
            if kind is None:
                steps.append(["", clause])
                continue
        if steps and steps[-1][0] == "":
            steps[-1] = [kind, steps[-1][1] + " " + clause]
            continue
        steps.append([kind, clause])
    steps = [s for s in steps if s[0]]
    if not 2 <= len(steps) <= settings.max_steps:
        return None
    return [(clause, kind) for kind, clause in steps]
