"""Phases: a description that says "do X, with Y, then Z" becomes sequential steps.

A description is read as several phases only when it says so with a sequencing word
(``phases.separators``: "then", "afterwards", "finally" by default, or a ";"). It is cut into
clauses at those words, at commas and semicolons, and at "and", "after that", "followed
by"; each clause gets the kind the text prior is clearly sure of. A clause with no clear kind
joins the phase before it, and neighbouring clauses of one kind join into one step. Two steps
or more, up to ``phases.max_steps``, make a workflow; otherwise the task stays whole.

"with" cuts only where what follows it is a phase of its own, not the tool or means of the
clause before it: the with-clause must name work (a word of ``phases.work_words``: an audit, a
review, a test, a deployment...), the text prior must be clearly sure of its kind, and that
kind must differ from the clause before it's. Otherwise it stays in the clause before it, which
is then read whole: "redeploy payments-api with ArgoCD" is one cicd clause, and ArgoCD, Helm,
Terraform or "a feature flag" never become a step of their own.

"Implement rate limiting with a security audit, then deploy" gives three steps: development
("Implement rate limiting"), security ("a security audit") and cicd ("deploy").
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

from coordinator_agent.routing.analysis import stem
from coordinator_agent.routing.config import Phases

_JOINERS = ("with", "and", "after that", "followed by", "and then")
#: A clause's top kind must be this many times as likely as the runner-up to be "clear".
CLEAR_RATIO = 1.5
_WORD = re.compile(r"[A-Za-z]+")


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


@functools.lru_cache(maxsize=8)
def _work_stems(words: tuple[str, ...]) -> frozenset[str]:
    return frozenset(stem(w) for w in words)


def _names_work(text: str, settings: Phases) -> bool:
    stems = _work_stems(tuple(settings.work_words))
    return any(stem(w.lower()) in stems for w in _WORD.findall(text))


def _clauses(text: str, prior: _Prior, settings: Phases) -> list[str]:
    """The clauses of ``text``; a with-clause that is not a phase of its own stays whole with
    the clause before it (see the module's docstring)."""
    clauses: list[tuple[int, int]] = []  # (start, end) in text
    start, with_clause = 0, False
    for cut in [*_splitter(settings.separators).finditer(text), None]:
        end = len(text) if cut is None else cut.start()
        if with_clause and clauses and not _own_phase(
                text[clauses[-1][0]:clauses[-1][1]], text[start:end], prior, settings):
            clauses[-1] = (clauses[-1][0], end)
        else:
            clauses.append((start, end))
        if cut is not None:
            start = cut.end()
            with_clause = cut.group(0).strip(" \t\n\r,;").lower() == "with"
    return [text[a:b].strip(" .") for a, b in clauses]


def _own_phase(before: str, clause: str, prior: _Prior, settings: Phases) -> bool:
    """Whether a with-clause is work of its own kind, not the means of the clause before."""
    if not _names_work(clause, settings):
        return False
    kind = _clear_kind(prior, clause)
    return kind is not None and kind != _clear_kind(prior, before.strip(" ."))


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
    clauses = _clauses(text, prior, settings)
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
