"""Offline replay: how another routing policy or threshold would have done, from the log alone.

For every logged first attempt that the policy chose (not an explicit kind, not a step of a
fallback chain) and whose outcome is known, in order:

* the *target* planner (built from the other configuration, learning in memory) gives the
  probability ``pi(k)`` with which it would pick each kind the logged decision could choose
  from, and its predicted success ``r(k)`` of each;
* the inverse-propensity estimate adds ``pi(a) / mu(a) x reward``, where ``a`` is the logged
  kind, ``mu(a)`` its logged propensity and reward 1 for a success;
* the doubly robust estimate adds ``sum_k pi(k) r(k) + pi(a) / mu(a) x (reward - r(a))``;
* then the target learns the logged outcome, as it would have had it made that decision.

The self-normalised estimate (SNIPS) divides the weighted rewards by the sum of the weights
instead of by their number: ``sum w x reward / sum w`` with ``w = pi(a) / mu(a)``. It is slightly
biased for a small log but always a probability, and its variance is lower when the weights are
uneven. IPS and DR are unbiased means of terms that may exceed 1, so on a small log they can fall
outside [0, 1]: every reported estimate and interval is clipped to [0, 1] (a first-try success
rate is a probability), and the unclipped mean is kept beside it (``unclipped_estimate``).

Each estimate comes with a 95 % interval: a normal approximation (mean +- 1.96 standard errors;
for SNIPS the Wilson score interval on the effective sample size, which is the delta method's
variance V (1 - V) / ESS kept inside [0, 1]) and a bootstrap percentile interval. The effective
sample size ``(sum w)^2 / sum w^2`` of the weights says how much of the log the target policy
really agrees with; below ``MIN_EFFECTIVE_SAMPLE`` decisions, or below ``MIN_EFFECTIVE_SHARE``
of the log, the result says the estimates are too fragile to trust (``fragile``).

``seed`` seeds the bootstrap resampling only: the point estimates and the normal intervals are
deterministic functions of the log and the target configuration, and neither policy's
distribution is sampled (``policy_distribution`` is exact), so only the bootstrap bounds move
with it.
"""

from __future__ import annotations

import math
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator_agent.exceptions import ConfigError
from coordinator_agent.routing.config import RoutingConfig
from coordinator_agent.routing.decisions import CorruptDecision, read_log
from coordinator_agent.routing.planner import CoordinationPlanner

#: Decisions the policy made itself; the others say nothing about a policy's choice.
POLICY_REASONS = frozenset({"confident", "explore", "no_credible_kind", "below_threshold",
                            "no_fallback_agent"})
BOOTSTRAP_SAMPLES = 500
Z95 = 1.959964
#: Below this many effective decisions a 95 % interval is at least +-10 points wide even for a
#: perfect estimator (1.96 x 0.5 / sqrt(100)), and rests on few decisions: ``fragile``.
MIN_EFFECTIVE_SAMPLE = 100.0
#: Below this share of the log, a few decisions carry the whole estimate: ``fragile``.
MIN_EFFECTIVE_SHARE = 0.1


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def _percentiles(values: list[float]) -> tuple[float, float]:
    values.sort()
    return (values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))])


def _bounded(estimate: float, ci95: tuple[float, float],
             bootstrap: tuple[float, float]) -> dict[str, Any]:
    """An estimate of a probability: point and intervals clipped to [0, 1], the raw mean kept."""
    return {"estimate": _clip(estimate), "ci95": [_clip(ci95[0]), _clip(ci95[1])],
            "bootstrap95": [_clip(bootstrap[0]), _clip(bootstrap[1])],
            "unclipped_estimate": estimate, "clipped": not 0.0 <= estimate <= 1.0}


def _interval(terms: Sequence[float], rng: random.Random) -> dict[str, Any]:
    """The mean of per-decision terms, with its normal and bootstrap 95 % intervals."""
    n = len(terms)
    mean = sum(terms) / n
    var = sum((t - mean) ** 2 for t in terms) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    means = [sum(rng.choices(terms, k=n)) / n for _ in range(BOOTSTRAP_SAMPLES)]
    return _bounded(mean, (mean - half, mean + half), _percentiles(means))


def _self_normalised(weights: Sequence[float], rewards: Sequence[float],
                     rng: random.Random) -> dict[str, Any] | None:
    """sum w r / sum w, with a delta-method interval and a bootstrap over decisions; None when
    the target gives every logged choice probability 0 (nothing to normalise by)."""
    n = len(weights)
    sw = sum(weights)
    if sw <= 0:
        return None
    value = sum(w * r for w, r in zip(weights, rewards, strict=True)) / sw
    # The delta method gives Var ~ sum w^2 (r - V)^2 / (sum w)^2, about V (1 - V) / ESS: the
    # Wilson score interval on the effective sample size is that interval kept inside [0, 1]
    # and not of zero width when every matched decision succeeded (or failed).
    ess = sw * sw / sum(w * w for w in weights)
    ratios = []
    for _ in range(BOOTSTRAP_SAMPLES):
        picks = rng.choices(range(n), k=n)
        total = sum(weights[i] for i in picks)
        ratios.append(sum(weights[i] * rewards[i] for i in picks) / total if total > 0
                      else value)
    return _bounded(value, _wilson(value, ess), _percentiles(ratios))


def _wilson(p: float, n: float) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion ``p`` observed on ``n`` (effective) trials."""
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # It always holds p; min/max keep float rounding (p = 1: 0.9999999999999999) from saying
    # otherwise.
    return _clip(min(p, centre - half)), _clip(max(p, centre + half))


def replay(store_path: Path | str, target: RoutingConfig, *, seed: int = 0) -> dict[str, Any]:
    """Estimate the first-try success rate the ``target`` configuration would have had."""
    path = Path(store_path)
    if not path.exists():
        raise ConfigError(f"learning store {path} does not exist: nothing to replay")
    if path.is_dir():
        raise ConfigError(f"learning store {path} is a directory: name the store's file "
                          "(<data_dir>/<name>.routing.sqlite3)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"learning store {path} cannot be opened ({exc})") from None
    try:
        try:
            rows = [d for d in read_log(db) if d.attempt == 1 and d.reason in POLICY_REASONS]
        except sqlite3.OperationalError as exc:
            raise ConfigError(f"learning store {path} has no decision log ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"learning store {path} is not a SQLite database ({exc})") from None
        except CorruptDecision as exc:
            raise ConfigError(f"learning store {path}: {exc}; nothing was estimated") from None
    finally:
        db.close()
    now = [rows[0].at if rows else 0.0]
    planner = CoordinationPlanner(1, config=target, clock=lambda: now[0],
                                  rng=random.Random(seed))
    ips: list[float] = []
    dr: list[float] = []
    weights: list[float] = []
    agree = 0.0
    try:
        for d in rows:
            now[0] = d.at
            kinds = list(d.candidates) or [d.kind]
            pi, predicted = planner.policy_distribution(d.description, kinds, d.at, d.labels)
            reward = 1.0 if d.outcome else 0.0
            w = pi.get(d.kind, 0.0) / max(d.propensity, 1e-6)
            r_hat = predicted.get(d.kind, 0.0)
            ips.append(w * reward)
            dr.append(sum(pi[k] * predicted[k] for k in pi) + w * (reward - r_hat))
            weights.append(w)
            agree += pi.get(d.kind, 0.0)
            planner.learn_logged(d.description, d.kind, bool(d.outcome), d.at, d.labels)
    finally:
        planner.close()
    n = len(rows)
    result: dict[str, Any] = {"decisions": n, "target_policy": target.policy.value}
    if n == 0:
        result["note"] = "no logged first attempts with a known outcome"
        return result
    rng = random.Random(seed)
    sw, sw2 = sum(weights), sum(w * w for w in weights)
    logged = [1.0 if d.outcome else 0.0 for d in rows]
    ess = sw * sw / sw2 if sw2 > 0 else 0.0
    result.update(
        logged_policy=sorted({d.policy for d in rows}),
        logged=_interval(logged, rng),
        ips=_interval(ips, rng),
        self_normalised_ips=_self_normalised(weights, logged, rng),
        doubly_robust=_interval(dr, rng),
        effective_sample_size=ess,
        fragile=ess < MIN_EFFECTIVE_SAMPLE or ess < MIN_EFFECTIVE_SHARE * n,
        agreement=agree / n,
        bootstrap_seed=seed,
    )
    return result
