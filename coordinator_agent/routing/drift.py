"""ChangeDetector: has a kind's success dropped on a group of tasks? A Bernoulli CUSUM.

The surprise detector (surprise.py) widens exploration, but a confident text prior still keeps
a drifted kind ahead, and the kind that is now best (often one the text never points at) keeps
its low prior: it is rarely drawn. So the router also tests, per (group of tasks, kind), a
group being every task with one feature in common (a context or a keyword), whether the kind's
first tries fit "the belief is right" or "its success log-odds dropped by ``shift``". Each first
try, predicted at confidence ``p``, adds the log-likelihood ratio of the two to a CUSUM::

    q = sigmoid(logit(p) - shift)
    S <- max(0, S + log(q / p))               on a success
    S <- max(0, S + log((1 - q) / (1 - p)))   on a failure

Page's test: ``S`` crossing ``threshold`` is the change point. With ``shift`` 2 and ``p`` 0.85,
a failure adds 1.3 and a success takes 0.7 away, so two or three failures in a row on one
group trip it, while a kind that fails as often as predicted never does.

Once tripped, the (group, kind) stays *flagged* for about ``memory`` later first tries on that
group (any kind); the learner then stops trusting the text prior on that group's tasks: every
kind's prior success becomes the same ``drift_prior``, so the evidence alone ranks the kinds
and the kinds the text never pointed at are drawn as often as the others (learner.py). A
kind's weights are not reset: its recent failures are what should now tell against it.

Per feature, like the surprise sums, so a drift that hits only part of a coarse context (docs
beside release notes) trips on the words that part has of its own. A decision costs one lookup
per feature of the task. The state is short-term and in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class ChangeDetector:
    def __init__(self, *, threshold: float, shift: float, memory: float) -> None:
        self.enabled = threshold > 0 and shift > 0
        self.threshold = threshold
        self.shift = shift
        self.keep = 1.0 - 1.0 / memory if memory > 1 else 0.0
        #: group -> kind -> CUSUM statistic
        self._cusum: dict[str, dict[str, float]] = {}
        #: group -> kind -> flag weight (1 when tripped, decays per first try on the group)
        self._flags: dict[str, dict[str, float]] = {}

    def observe(self, group: str, kind: str, probability: float, success: bool) -> bool:
        """One first try of ``kind`` on a task of ``group``, predicted at ``probability``;
        True when it trips the test."""
        if not self.enabled:
            return False
        flags = self._flags.get(group)
        if flags:
            keep = self.keep
            for other in list(flags):
                weight = flags[other] * keep
                if weight < _FLAG_FLOOR:
                    del flags[other]
                else:
                    flags[other] = weight
        p = min(1.0 - 1e-6, max(1e-6, probability))
        z = math.log(p / (1.0 - p)) - self.shift
        q = 1.0 / (1.0 + math.exp(-z))
        llr = math.log(q / p) if success else math.log((1.0 - q) / (1.0 - p))
        per_kind = self._cusum.setdefault(group, {})
        s = max(0.0, per_kind.get(kind, 0.0) + llr)
        if s >= self.threshold:
            self._flags.setdefault(group, {})[kind] = 1.0
            per_kind[kind] = 0.0  # restart: the next change needs its own evidence
            return True
        per_kind[kind] = s
        return False

    def statistic(self, group: str, kind: str) -> float:
        return self._cusum.get(group, {}).get(kind, 0.0)

    def flagged(self, groups: Iterable[str], votes: int = 1) -> set[str]:
        """The kinds flagged on at least ``votes`` of ``groups`` (one lookup per group)."""
        if not self._flags:
            return set()
        flags = self._flags
        counts: dict[str, int] = {}
        for group in groups:
            per_kind = flags.get(group)
            if per_kind:
                for kind in per_kind:
                    counts[kind] = counts.get(kind, 0) + 1
        return {kind for kind, n in counts.items() if n >= votes}

    def state(self) -> dict[str, dict[str, dict[str, float]]]:
        """The statistics and the flags (in memory only, like the surprise sums)."""
        return {"cusum": {g: dict(k) for g, k in self._cusum.items()},
                "flags": {g: dict(k) for g, k in self._flags.items() if k}}


#: A flag whose weight decayed below this is dropped (about 3 x memory first tries).
_FLAG_FLOOR = 0.05
