"""SurpriseDetector: do a kind's recent first tries contradict what the router believed?

The bandit explores little on purpose (``bandit.exploration_scale``): while its beliefs are
right, that costs little. When a kind that the router relies on starts to fail far more often
than it predicted (the fleet changed: a drift), a small spread keeps the router on it and
leaves the other kinds at their prior, never tried again. So the router watches its own
residuals and widens the exploration where they say its belief is wrong.

Per (kind, group of tasks), a group being every task with one feature in common (a context,
such as "the text points at cicd", or a keyword), it keeps exponentially weighted sums, over
about ``window`` first tries, of the residuals ``success - p`` (``p`` the confidence the
decision had) and of their variance under the belief, ``p (1 - p)``:

    R <- lam R + (y - p)        V <- lam**2 V + p (1 - p)        z = R / sqrt(V)

While the beliefs are right, ``z`` has mean 0 and variance 1 whatever ``p`` was. A kind doing
``|z|`` standard deviations worse than believed makes the belief look ``z**2`` times too
narrow, so the exploration spread of a decision whose best kind shows ``z < -1`` on any of
the task's features is multiplied by the largest such ``|z|`` (its variance by ``z**2``, as
an adaptive Kalman filter inflates its covariance by the innovations' excess): up to plain
Thompson sampling (``max_exploration_scale``). Only a shortfall counts: a kind doing better
than believed is already being chosen more.

A shortfall well past chance (``z < -bandit.surprise_shift``) also moves the
kind's belief on the task: its log-odds drop by ``R / (1 + V)``, the one Newton step of a
log-odds shift with a unit-precision prior fitted to those residuals (the most negative over the
task's features). The shared weights follow a drift slowly when one sort of task that drifted
shares contexts and words with sorts that did not; the residuals of its own features see it
within a few first tries. Every kind is watched, not only the best: once the dropped kind is
passed over, the kind taking its place may fail there too. A kind not chosen on a feature keeps
its sums until it is tried there again, so the shift holds while the alternatives are explored.

A feature localises the shortfall: tasks that share the coarse context but not the failing
words (release notes beside docs, both pointing at documentation) do not dilute it. The
widening costs a decision one lookup per feature of the task, for the best kind only; the shift
one per feature, for every kind with sums there. The sums are short-term and
kept in memory (as many as the model's weights at most): after a restart the detector needs a
few outcomes to see a drift again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


class SurpriseDetector:
    def __init__(self, window: float) -> None:
        self.keep = 1.0 - 1.0 / window if window > 0 else 0.0
        self.enabled = window > 0
        #: group -> kind -> (R, V)
        self._sums: dict[str, dict[str, tuple[float, float]]] = {}

    def observe(self, group: str, kind: str, probability: float, success: bool) -> None:
        """One first try of ``kind`` on a task of ``group``, predicted at ``probability``."""
        if not self.enabled:
            return
        p = min(1.0, max(0.0, probability))
        per_kind = self._sums.setdefault(group, {})
        r, v = per_kind.get(kind, (0.0, 0.0))
        lam = self.keep
        per_kind[kind] = (lam * r + (float(success) - p), lam * lam * v + p * (1.0 - p))

    def z(self, group: str, kind: str) -> float:
        """Recent residuals of ``kind`` on ``group`` in standard deviations (0: no evidence)."""
        r, v = self._sums.get(group, {}).get(kind, (0.0, 0.0))
        return r / math.sqrt(v) if v > 1e-9 else 0.0

    def spread(self, group: str, kind: str) -> float:
        """Factor on the exploration spread: ``|z|`` when ``kind`` does worse than believed by
        more than one standard deviation, else 1."""
        return max(1.0, -self.z(group, kind))

    def widest(self, groups: Iterable[str], kind: str) -> float:
        """The largest ``spread`` of ``kind`` over ``groups`` (one lookup per group)."""
        sums = self._sums
        worst = 0.0  # the most negative z
        for group in groups:
            per_kind = sums.get(group)
            if per_kind is None:
                continue
            rv = per_kind.get(kind)
            if rv is not None and rv[0] < 0.0 and rv[1] > 1e-9:
                z = rv[0] / math.sqrt(rv[1])
                worst = min(worst, z)
        return max(1.0, -worst)

    def shortfalls(self, groups: Iterable[str], threshold: float) -> dict[str, float]:
        """Per kind, the log-odds shift ``R / (1 + V)`` of its worst shortfall over ``groups``
        among those with ``z < -threshold`` (one lookup per group; kinds without one absent)."""
        sums = self._sums
        shifts: dict[str, float] = {}
        for group in groups:
            per_kind = sums.get(group)
            if per_kind is None:
                continue
            for kind, (r, v) in per_kind.items():
                if r < 0.0 and v > 1e-9 and r < -threshold * math.sqrt(v):
                    shift = r / (1.0 + v)
                    if shift < shifts.get(kind, 0.0):
                        shifts[kind] = shift
        return shifts

    def falling(self, group: str, threshold: float) -> list[str]:
        """The kinds whose ``z`` on ``group`` is below ``-threshold``, in a fixed order."""
        per_kind = self._sums.get(group)
        if not per_kind:
            return []
        limit = -threshold
        return sorted(kind for kind, (r, v) in per_kind.items()
                      if r < 0.0 and v > 1e-9 and r / math.sqrt(v) < limit)

    def state(self) -> Mapping[str, Mapping[str, tuple[float, float]]]:
        return self._sums
