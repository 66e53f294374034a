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

Both estimates are means of per-decision terms; the interval is a normal approximation
(mean +- 1.96 standard errors) and a bootstrap percentile interval. The effective sample size
``(sum w)^2 / sum w^2`` of the weights ``w = pi(a) / mu(a)`` says how much of the log the
target policy really agrees with; a small one means a wide, fragile estimate.
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


def _interval(terms: Sequence[float], rng: random.Random) -> dict[str, Any]:
    n = len(terms)
    mean = sum(terms) / n
    var = sum((t - mean) ** 2 for t in terms) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    means = sorted(sum(rng.choices(terms, k=n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    low = means[int(0.025 * (BOOTSTRAP_SAMPLES - 1))]
    high = means[int(0.975 * (BOOTSTRAP_SAMPLES - 1))]
    return {"estimate": mean, "ci95": [mean - half, mean + half], "bootstrap95": [low, high]}


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
            pi, predicted = planner.policy_distribution(d.description, kinds, d.at)
            reward = 1.0 if d.outcome else 0.0
            w = pi.get(d.kind, 0.0) / max(d.propensity, 1e-6)
            r_hat = predicted.get(d.kind, 0.0)
            ips.append(w * reward)
            dr.append(sum(pi[k] * predicted[k] for k in pi) + w * (reward - r_hat))
            weights.append(w)
            agree += pi.get(d.kind, 0.0)
            planner.learn_logged(d.description, d.kind, bool(d.outcome), d.at)
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
    result.update(
        logged_policy=sorted({d.policy for d in rows}),
        logged=_interval(logged, rng),
        ips=_interval(ips, rng),
        doubly_robust=_interval(dr, rng),
        effective_sample_size=sw * sw / sw2 if sw2 > 0 else 0.0,
        agreement=agree / n,
    )
    return result
