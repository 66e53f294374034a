"""BanditModel: the probability that a kind succeeds at a task on its first try, learned online.

Per kind, the log-odds of success is a sum::

    logit P(success | task, kind) = logit(prior_k) + w[kind, bias] + sum over keywords
                                    of w[kind, keyword] / sqrt(#keywords)

``prior_k`` comes from the text alone (``TextPrior``: P(kind | text) mapped onto a success
probability between ``success_if_wrong`` and ``success_if_right``). Each weight has a Gaussian
belief (mean, precision) that starts at N(0, 2 / prior_strength): worth about
``prior_strength`` pseudo-outcomes in all. Dividing by sqrt(#keywords) keeps that prior the same
for short and long descriptions. An outcome updates the weights of the task's features with one
Laplace step (online Bayesian logistic regression with a diagonal posterior), so a kind learns
which words predict its successes and its failures, and similar tasks share what was learned.

Evidence fades back towards the prior, two ways (drift):

* by time: ``2 ** (-age / half_life_s)`` applied when a weight is read;
* by count: before an outcome is added to a weight, that weight's evidence is multiplied by
  ``1 - 1 / window``, so a feature remembers roughly its last ``window`` outcomes. A kind whose
  success rate drops is seen through its recent failures, not through its long past.

The model is pure: no I/O. ``rows`` and ``load`` move its state in and out of the store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

BIAS = ""  # the feature every task of a kind has (off by default)
CONTEXT_PREFIX = "@"  # keywords are stems of [a-z0-9-]: no clash
_LOGIT_CLIP = 8.0
_NEWTON_STEPS = 6
#: (kind, feature, evidence precision, information, successes, failures, reference time)
Row = tuple[str, str, float, float, float, float, float]
#: Rescale to a new reference time once stored values would grow past 2**REBASE_EXPONENT.
REBASE_EXPONENT = 64.0


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def logit(p: float) -> float:
    p = min(1.0 - 1e-6, max(1e-6, p))
    return math.log(p / (1.0 - p))


@dataclass(frozen=True, slots=True)
class KindBelief:
    """What the model believes about one kind for one task, on the log-odds scale."""

    kind: str
    prior: float  # P(success) from the text alone
    mean: float  # mean log-odds, prior included
    std: float  # its standard deviation
    successes: float  # decayed outcomes behind the weights, for people (see ``evidence``)
    failures: float
    #: The model's predicted probability of first-try success, sigmoid(mean): computed once,
    #: since the policy reads it several times per decision.
    probability: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.probability):
            object.__setattr__(self, "probability", sigmoid(self.mean))


def features(keywords: Sequence[str], contexts: Sequence[str] = (), *,
             bias: bool = False) -> list[tuple[str, float]]:
    """(feature, value) of a task: its contexts (full weight), each keyword scaled by 1/sqrt(n).

    Contexts are groups of tasks the router can see, coarse to fine (the kind the text points
    at; the set of vocabulary words it uses): each pools the evidence of every task of its
    group, so a kind learns fast what it is good at, and the keywords then tell apart tasks
    within a group. No per-kind bias by default: it would carry a kind's successes on one sort
    of task over to every other sort (a kind great at docs would look good at deployments it
    never tried).
    """
    words = list(dict.fromkeys(keywords))
    head = [(BIAS, 1.0)] if bias else []
    head.extend((CONTEXT_PREFIX + c, 1.0) for c in contexts)
    if not words:
        return head
    x = 1.0 / math.sqrt(len(words))
    return [*head, *((w, x) for w in words)]


class BanditModel:
    """Weights per (kind, feature), kept as evidence relative to the prior.

    A weight's belief is N(m, 1/q) with q = q0 + E and q x m = H (the prior's mean is 0): E is
    the evidence's precision and H its information, and both simply scale when evidence decays.
    So they are stored multiplied by ``2 ** ((t - t0) / half_life)`` for one reference time
    ``t0`` (as ``patterns.py`` does): time decay costs one power per decision, not one per
    weight. Successes and failures are decayed counts of the outcomes behind the weight, kept
    only to explain a decision.
    """

    def __init__(self, *, prior_strength: float, window: float, half_life_s: float,
                 groups: int = 3) -> None:
        # A Beta prior worth n pseudo-outcomes has a log-odds variance of about 4 / n at 0.5;
        # the ``groups`` parts of a task (contexts and keywords) share it.
        self.q0 = groups * prior_strength / 4.0
        self.keep = 1.0 - 1.0 / window if window > 0 else 1.0
        self.half_life_s = half_life_s
        #: feature -> kind -> (E, H, successes, failures), each x 2 ** ((t - t0) / half_life)
        self._w: dict[str, dict[str, tuple[float, float, float, float]]] = {}
        self._t0: float | None = None
        self._newest = -math.inf
        self.updates = 0

    def _scale(self, now: float) -> float:
        """What a stored value is multiplied by to read it at ``now``."""
        if self._t0 is None:
            return 1.0
        now = max(now, self._newest)  # nothing is fresher than the newest outcome
        return float(2.0 ** ((self._t0 - now) / self.half_life_s))

    # --- reading ------------------------------------------------------------------------------

    def belief(self, kind: str, prior: float, feats: Sequence[tuple[str, float]],
               now: float) -> KindBelief:
        return self.beliefs({kind: prior}, feats, now)[0]

    def beliefs(self, priors: Mapping[str, float], feats: Sequence[tuple[str, float]],
                now: float) -> list[KindBelief]:
        """One belief per kind of ``priors`` (kind -> prior success), in that order.

        Weights are stored feature first, so a feature costs one lookup and then only the kinds
        that have learned something about it: this loop is most of a decision's cost.
        """
        q0 = self.q0
        k = self._scale(now)
        acc = {kind: [logit(p), 0.0, 0.0, 0.0] for kind, p in priors.items()}  # mean, var, s, f
        spread = 0.0  # sum of x^2: every kind starts from the prior's variance of each feature
        w = self._w
        for name, x in feats:
            xx = x * x
            spread += xx
            per_kind = w.get(name)
            if per_kind is None:
                continue
            counted = name[:1] != CONTEXT_PREFIX and name != BIAS
            for kind, stat in per_kind.items():
                a = acc.get(kind)
                if a is None:
                    continue
                q = q0 + stat[0] * k
                a[0] += x * stat[1] * k / q
                a[1] += xx / q - xx / q0  # the kind's own precision instead of the prior's
                if counted:
                    # Each outcome touched every feature of its task: weigh counts like values.
                    a[2] += stat[2] * xx
                    a[3] += stat[3] * xx
        base_var = spread / q0
        out = []
        sqrt = math.sqrt
        for kind, (mean, var, succ, fail) in acc.items():
            clipped = -_LOGIT_CLIP if mean < -_LOGIT_CLIP else (
                _LOGIT_CLIP if mean > _LOGIT_CLIP else mean)
            total = base_var + var
            out.append(KindBelief(kind, priors[kind], clipped, sqrt(total if total > 1e-12
                                                                    else 1e-12),
                                  succ * k, fail * k, sigmoid(clipped)))
        return out

    # --- learning -----------------------------------------------------------------------------

    def update(self, kind: str, prior: float, feats: Sequence[tuple[str, float]],
               success: bool, now: float) -> list[Row]:
        """Add one outcome; returns the changed rows, for the store."""
        return self.predict_and_update(kind, prior, feats, success, now)[1]

    def predict_and_update(self, kind: str, prior: float, feats: Sequence[tuple[str, float]],
                           success: bool, now: float) -> tuple[float, list[Row]]:
        """``update``, and the probability ``belief`` gave the outcome just before: one pass
        over the weights, where the neighbours' residual needs both (neighbours.py)."""
        if self._t0 is None:
            self._t0 = now
        if (now - self._t0) / self.half_life_s > REBASE_EXPONENT:
            predicted = self.belief(kind, prior, feats, now).probability  # the scale moves
            self._rebase(now)
        else:
            predicted = math.nan
        self._newest = max(self._newest, now)
        k = self._scale(now)
        w = self._w
        q0, keep = self.q0, self.keep
        current: list[tuple[str, float, float, float, float, float]] = []
        a = logit(prior)
        mean = a  # the belief's mean (before the count decay), as ``beliefs`` sums it
        v = 0.0
        for name, x in feats:
            per_kind = w.get(name)
            stat = per_kind.get(kind) if per_kind is not None else None
            if stat is None:
                e = h = s = f = 0.0
            else:
                mean += x * stat[1] * k / (q0 + stat[0] * k)
                # Count decay: this weight's evidence shrinks towards the prior before it grows.
                f_keep = k * keep
                e, h, s, f = (stat[0] * f_keep, stat[1] * f_keep, stat[2] * f_keep,
                              stat[3] * f_keep)
            q = q0 + e
            current.append((name, x, h / q, q, s, f))
            a += x * h / q
            v += x * x / q
        y = 1.0 if success else 0.0
        # MAP along the prior-scaled direction: t = y - sigmoid(a + t v), by Newton.
        t = 0.0
        for _ in range(_NEWTON_STEPS):
            p = sigmoid(a + t * v)
            g = t - y + p
            t -= g / (1.0 + v * p * (1.0 - p))
        p = sigmoid(a + t * v)
        curvature = p * (1.0 - p)
        changed: list[Row] = []
        t0 = self._t0
        for name, x, m, q, s, f in current:
            new_m = m + t * x / q
            new_q = q + x * x * curvature
            stat = ((new_q - q0) / k, new_q * new_m / k, (s + y) / k, (f + 1.0 - y) / k)
            w.setdefault(name, {})[kind] = stat
            changed.append((kind, name, *stat, t0))
        self.updates += 1
        if math.isnan(predicted):
            predicted = sigmoid(-_LOGIT_CLIP if mean < -_LOGIT_CLIP else (
                _LOGIT_CLIP if mean > _LOGIT_CLIP else mean))
        return predicted, changed

    def _rebase(self, t0: float) -> None:
        assert self._t0 is not None
        k = float(2.0 ** ((self._t0 - t0) / self.half_life_s))
        self._w = {name: {kind: (e * k, h * k, s * k, f * k) for kind, (e, h, s, f) in w.items()}
                   for name, w in self._w.items()}
        self._t0 = t0

    # --- persistence --------------------------------------------------------------------------

    def rows(self) -> Iterable[Row]:
        t0 = self._t0 if self._t0 is not None else 0.0
        for name, per_kind in self._w.items():
            for kind, stat in per_kind.items():
                yield (kind, name, *stat, t0)

    def load(self, rows: Iterable[Row]) -> None:
        for kind, name, e, h, s, f, ref in rows:
            if self._t0 is None:
                self._t0 = ref
            k = float(2.0 ** ((ref - self._t0) / self.half_life_s))
            self._w.setdefault(name, {})[kind] = (e * k, h * k, s * k, f * k)
            self._newest = max(self._newest, ref)

    def kinds(self) -> Mapping[str, int]:
        """Weights learned per kind."""
        counts: dict[str, int] = {}
        for per_kind in self._w.values():
            for kind in per_kind:
                counts[kind] = counts.get(kind, 0) + 1
        return counts


class Calibrator:
    """Platt scaling, learned online: ``logit(confidence) = a x logit(p) + b``.

    ``p`` is the model's probability for the kind a decision chose, and the outcome is that
    decision's first try. A diagonal Bayesian model shrinks towards its prior, so its middle
    predictions come out too timid and its boldest too bold; two numbers learned from every
    first try undo that without changing how kinds rank (``a`` stays positive). The two are
    correlated, so their belief is a full 2 x 2 Gaussian (Laplace step per outcome), starting
    at the identity (a = 1, b = 0) with a prior worth ``strength`` outcomes; it remembers about
    ``window`` outcomes (count decay), so it follows a fleet that changes.
    """

    STATE = ("calibration_a", "calibration_b", "calibration_paa", "calibration_pab",
             "calibration_pbb")
    MIN_SLOPE = 0.05

    def __init__(self, *, strength: float = 20.0, window: float = 400.0) -> None:
        self.p0 = strength / 4.0  # prior precision of each parameter
        self.keep = 1.0 - 1.0 / window
        self.a, self.b = 1.0, 0.0
        self.paa, self.pab, self.pbb = self.p0, 0.0, self.p0

    def apply(self, p: float) -> float:
        return self.apply_logit(logit(p))

    def apply_logit(self, z: float) -> float:
        """``apply`` for a probability given by its log-odds (saves a log per kind)."""
        a = self.a if self.a > self.MIN_SLOPE else self.MIN_SLOPE
        return sigmoid(a * z + self.b)

    def update(self, p: float, success: bool) -> None:
        x1, x2 = logit(p), 1.0
        # Count decay of the evidence (precision and information) towards the prior.
        p0, keep = self.p0, self.keep
        ha = self.paa * (self.a - 1.0) + self.pab * self.b
        hb = self.pab * (self.a - 1.0) + self.pbb * self.b
        paa, pab, pbb = p0 + keep * (self.paa - p0), keep * self.pab, p0 + keep * (self.pbb - p0)
        ha, hb = keep * ha, keep * hb
        det = paa * pbb - pab * pab
        da, db = (pbb * ha - pab * hb) / det, (paa * hb - pab * ha) / det
        a, b = 1.0 + da, db
        # Laplace step along the prior-scaled direction, as in BanditModel.update.
        sx1, sx2 = (pbb * x1 - pab * x2) / det, (paa * x2 - pab * x1) / det  # P^-1 x
        v = x1 * sx1 + x2 * sx2
        z0 = a * x1 + b * x2
        y = 1.0 if success else 0.0
        t = 0.0
        for _ in range(_NEWTON_STEPS):
            q = sigmoid(z0 + t * v)
            t -= (t - y + q) / (1.0 + v * q * (1.0 - q))
        q = sigmoid(z0 + t * v)
        c = q * (1.0 - q)
        self.a, self.b = a + t * sx1, b + t * sx2
        self.paa, self.pab, self.pbb = paa + c * x1 * x1, pab + c * x1 * x2, pbb + c * x2 * x2

    def state(self) -> dict[str, float]:
        return dict(zip(self.STATE, (self.a, self.b, self.paa, self.pab, self.pbb), strict=True))

    def load(self, stored: Mapping[str, float]) -> None:
        if all(name in stored for name in self.STATE):
            self.a, self.b, self.paa, self.pab, self.pbb = (stored[n] for n in self.STATE)
