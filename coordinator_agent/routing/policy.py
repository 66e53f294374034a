"""ThompsonPolicy: which kind, given what the model believes; and how likely each choice was.

Among the kinds that are *credible* (predicted success at least ``bandit.credible``), the policy
draws one sample of each kind's log-odds from its belief, its spread scaled by
``exploration_scale``, and takes the kind with the best draw: Thompson sampling. Kinds whose
predicted success is more than ``max_exploration_gap`` below the best are not drawn at all, and
when the recent share of decisions that differed from the greedy choice (the best predicted
success) reaches ``exploration_budget``, the policy takes the greedy choice until the share
falls again. So exploration is deliberate and bounded: its price per decision and its frequency
are both capped. With no credible kind, the fallback kind takes the task.

Because draws are independent normals, the probability that the policy picks a kind (its
*propensity*) is a one-dimensional integral, computed exactly enough on a fixed grid; it is
written to the decision log so that another policy can be evaluated offline (``replay.py``).
Ties between equal greedy scores are broken at random, never by name.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator_agent.routing.bandit import KindBelief, sigmoid
from coordinator_agent.routing.config import BanditSettings, Exploration

#: Grid for E_u[prod_j Phi((mu_c + s_c u - mu_j) / s_j)], u ~ N(0, 1).
_GRID_STEP = 0.25
_GRID = [i * _GRID_STEP for i in range(-24, 25)]
_GRID_WEIGHTS = [math.exp(-u * u / 2.0) for u in _GRID]
_GRID_NORM = sum(_GRID_WEIGHTS)
_GRID_WEIGHTS = [w / _GRID_NORM for w in _GRID_WEIGHTS]
_SQRT2 = math.sqrt(2.0)
#: The exploration share is a moving average over about this many decisions.
BUDGET_HORIZON = 200.0


def _phi_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2)


@dataclass(frozen=True, slots=True)
class Choice:
    kind: str
    propensity: float  # probability that the policy picks this kind for this task, now
    label: str  # greedy | explore | fallback | only_kind
    explored: bool  # differs from the greedy choice
    draws: Mapping[str, float]  # sampled success probability per drawn kind (empty if none)


class ThompsonPolicy:
    def __init__(self, settings: BanditSettings, fallback_kind: str) -> None:
        self.settings = settings
        self.fallback_kind = fallback_kind
        #: Moving share of recent decisions that explored (differed from the greedy choice).
        self.explore_share = 0.0

    # --- the distribution over kinds ----------------------------------------------------------

    def _greedy(self, beliefs: Sequence[KindBelief]) -> list[KindBelief]:
        best = max(b.mean for b in beliefs)
        return [b for b in beliefs if b.mean >= best - 1e-12]

    def _drawn(self, beliefs: Sequence[KindBelief]) -> list[KindBelief]:
        """Kinds the sampler may pick: credible and not too far below the best."""
        best = max(b.probability for b in beliefs)
        gap = self.settings.max_exploration_gap
        return [b for b in beliefs if b.probability >= best - gap]

    def _credible(self, beliefs: Sequence[KindBelief]) -> list[KindBelief]:
        return [b for b in beliefs if b.probability >= self.settings.credible]

    def _explores(self) -> bool:
        s = self.settings
        return (s.exploration is Exploration.THOMPSON and s.exploration_scale > 0
                and self.explore_share < s.exploration_budget)

    def distribution(self, beliefs: Sequence[KindBelief]) -> dict[str, float]:
        """P(policy picks kind) for each kind, in the policy's current state (no side effects)."""
        if not beliefs:
            return {}
        out = {b.kind: 0.0 for b in beliefs}
        credible = self._credible(beliefs)
        if not credible:
            names = [b.kind for b in beliefs]
            target = self.fallback_kind if self.fallback_kind in names else None
            if target is not None:
                out[target] = 1.0
            else:
                for b in self._greedy(beliefs):
                    out[b.kind] = 1.0 / len(self._greedy(beliefs))
            return out
        drawn = self._drawn(credible)
        if not self._explores() or len(drawn) == 1:
            greedy = self._greedy(credible)
            for b in greedy:
                out[b.kind] = 1.0 / len(greedy)
            return out
        for b in drawn:
            out[b.kind] = self.win_probability(b, drawn)
        total = sum(out.values())
        return {k: v / total for k, v in out.items()} if total > 0 else out

    def win_probability(self, chosen: KindBelief, drawn: Sequence[KindBelief]) -> float:
        """P(chosen's draw beats every other drawn kind's draw)."""
        scale = self.settings.exploration_scale
        mu_c, s_c = chosen.mean, max(1e-9, chosen.std * scale)
        others = [(b.mean, max(1e-9, b.std * scale)) for b in drawn if b is not chosen]
        if not others:
            return 1.0
        total = 0.0
        for u, w in zip(_GRID, _GRID_WEIGHTS, strict=True):
            z = mu_c + s_c * u
            p = w
            for mu, s in others:
                p *= _phi_cdf((z - mu) / s)
                if p < 1e-12:
                    break
            total += p
        return min(1.0, max(1e-6, total))

    # --- one decision -------------------------------------------------------------------------

    def choose(self, beliefs: Sequence[KindBelief], rng: random.Random) -> Choice:
        credible = self._credible(beliefs)
        if not credible:
            names = [b.kind for b in beliefs]
            if self.fallback_kind in names:
                return Choice(self.fallback_kind, 1.0, "fallback", False, {})
            greedy = self._greedy(beliefs)
            return Choice(rng.choice(greedy).kind, 1.0 / len(greedy), "no_fallback_agent",
                          False, {})
        greedy = self._greedy(credible)
        drawn = self._drawn(credible)
        if len(drawn) == 1 or not self._explores():
            pick = greedy[0] if len(greedy) == 1 else rng.choice(greedy)
            self._count(False)
            label = "only_kind" if len(credible) == 1 else "greedy"
            return Choice(pick.kind, 1.0 / len(greedy), label, False, {})
        scale = self.settings.exploration_scale
        draws = {b.kind: rng.gauss(b.mean, b.std * scale) for b in drawn}
        best = max(draws.values())
        winner = next(b for b in drawn if draws[b.kind] == best)
        explored = all(winner is not g for g in greedy)
        self._count(explored)
        return Choice(winner.kind, self.win_probability(winner, drawn),
                      "explore" if explored else "greedy", explored,
                      {k: sigmoid(v) for k, v in draws.items()})

    def _count(self, explored: bool) -> None:
        self.explore_share += (float(explored) - self.explore_share) / BUDGET_HORIZON

    def expect(self, distribution: Mapping[str, float], greedy_kind: str) -> None:
        """Advance the exploration share by its expectation (offline replay)."""
        self.explore_share += ((1.0 - distribution.get(greedy_kind, 0.0)) - self.explore_share) \
            / BUDGET_HORIZON
