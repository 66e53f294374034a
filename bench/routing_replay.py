"""Offline replay against the truth: does ``routing replay`` estimate what a policy really does?

On the simulated fleet of ``routing_learning.py`` (same task set, ground truth and seeds):

1. the *logging* router (the packaged configuration, or ``--config``) routes the tasks and
   writes its decision log to a learning store in a temporary directory;
2. each *target* configuration is evaluated from that log alone (``replay.replay``: IPS,
   self-normalised IPS and doubly robust, 95 % intervals clipped to [0, 1]);
3. the same target then routes the same task sequence online, against the same hidden success
   probabilities: its true value is the mean success probability of the kinds it chose (the
   expected first-try success, free of the outcome draws' noise).

Targets: the seed's formula; the bandit without exploration (``exploration: greedy``); the
bandit with a weaker text prior (``prior_strength: 0.5``); "always the fallback kind"
(``credible: 0.99``). Reported per target: truth, IPS, SNIPS and DR with intervals, whether each
interval covers the truth, the effective sample size and whether the replay calls it fragile.
Off-policy estimates need the logging policy to be able to take what the target takes;
``--explore`` logs with a broad exploration (``exploration_scale 1, budget 1, gap 1,
credible 0``) to show the difference.

    .venv/bin/python bench/routing_replay.py [--tasks F] [--truth F] [--seeds 1,2,3]
        [--steps 2000] [--explore] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from routing_learning import (
    DEFAULT_TASKS,
    DEFAULT_TRUTH,
    STEP_S,
    Truth,
    load_tasks,
    load_truth,
    planner_run,
)

from coordinator_agent.routing.config import (
    Exploration,
    Policy,
    RoutingConfig,
    default_routing_config,
)
from coordinator_agent.routing.replay import replay


def targets(base: RoutingConfig) -> dict[str, RoutingConfig]:
    bandit = base.bandit
    return {
        "seed formula": base.model_copy(update={"policy": Policy.SEED}),
        "bandit, greedy": base.model_copy(update={"bandit": bandit.model_copy(
            update={"exploration": Exploration.GREEDY})}),
        "bandit, prior 0.5": base.model_copy(update={"bandit": bandit.model_copy(
            update={"prior_strength": 0.5})}),
        "always fallback": base.model_copy(update={"bandit": bandit.model_copy(
            update={"credible": 0.99})}),
    }


def online_value(config: RoutingConfig, tasks: list[Any], truth: Truth, seed: int,
                 steps: int, workdir: Path, name: str, *, log: bool = False) -> float:
    """Route the seed's task sequence online; the mean true success of the chosen kinds."""
    kinds = list(dict.fromkeys([*config.kinds, config.fallback_kind]))
    rng = random.Random(seed)
    order = [rng.choice(tasks) for _ in range(steps)]
    outcome_rng = random.Random(seed * 7919 + 1)
    clock = [1_767_225_600.0]
    run = planner_run(name, config, kinds, seed, clock, workdir)
    total = 0.0
    for step, task in enumerate(order):
        table = truth.at(step)[task.category]
        clock[0] += STEP_S
        kind, _ = run.choose(task, step)
        p = table.get(kind, 0.0)
        total += p
        run.learn(task, kind, outcome_rng.random() < p)
    run.close()
    return total / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=Path, default=DEFAULT_TASKS)
    parser.add_argument("--truth", type=Path, default=DEFAULT_TRUTH)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--explore", action="store_true",
                        help="log with broad exploration (full support)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tasks = load_tasks(args.tasks)
    truth = load_truth(args.truth)
    base = default_routing_config()
    logging_config = base
    if args.explore:
        logging_config = base.model_copy(update={"bandit": base.bandit.model_copy(update={
            "exploration_scale": 1.0, "exploration_budget": 1.0, "max_exploration_gap": 1.0,
            "credible": 0.0})})
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
            workdir = Path(tmp)
            logged = online_value(logging_config, tasks, truth, seed, args.steps, workdir,
                                  "logger")
            for name, target in targets(base).items():
                estimate = replay(workdir / "logger.sqlite3", target, seed=seed)
                true = online_value(target, tasks, truth, seed, args.steps, workdir,
                                    name.replace(" ", "-").replace(",", ""))
                rows.setdefault(name, []).append({"seed": seed, "truth": true,
                                                  "logged_truth": logged, **estimate})
    print(f"routing replay vs truth: {args.steps} tasks, seeds {args.seeds}, logging policy "
          f"{'bandit, broad exploration' if args.explore else 'bandit (packaged)'}")
    print(f"{'target':<20}{'truth':>7}{'IPS':>7}{'IPS 95% CI':>17}{'SNIPS':>7}"
          f"{'SNIPS 95% CI':>17}{'DR':>7}{'DR 95% CI':>17}{'covers':>8}{'ESS':>7}")
    estimators = ("ips", "self_normalised_ips", "doubly_robust")
    summary: dict[str, Any] = {}
    for name, runs in rows.items():
        for r in runs:
            covers = tuple(r[e] is not None and r[e]["ci95"][0] <= r["truth"] <= r[e]["ci95"][1]
                           for e in estimators)
            r["covers"] = covers
            cells = "".join(
                "      -                 -" if r[e] is None else
                f"{r[e]['estimate']:7.3f}  [{r[e]['ci95'][0]:.3f}, {r[e]['ci95'][1]:.3f}]"
                for e in estimators)
            print(f"{name + ' #' + str(r['seed']):<20}{r['truth']:7.3f}{cells}"
                  f"{'/'.join('y' if c else 'n' for c in covers):>8}"
                  f"{r['effective_sample_size']:7.0f}{' fragile' if r['fragile'] else ''}")
        summary[name] = {
            **{f"mean_abs_error_{e}": sum(abs(r[e]["estimate"] - r["truth"]) for r in runs
                                          if r[e] is not None) / len(runs)
               for e in estimators},
            **{f"{e}_coverage": sum(r["covers"][i] for r in runs) / len(runs)
               for i, e in enumerate(estimators)},
            "fragile": sum(r["fragile"] for r in runs),
        }
    print("(covers: IPS/SNIPS/DR 95 % interval holds the truth; fragile: the replay warns that "
          "the effective sample size is too small)")
    for name, s in summary.items():
        print(f"{name:<20} |error| IPS {s['mean_abs_error_ips']:.3f} SNIPS "
              f"{s['mean_abs_error_self_normalised_ips']:.3f} DR "
              f"{s['mean_abs_error_doubly_robust']:.3f}   coverage IPS {s['ips_coverage']:.0%} "
              f"SNIPS {s['self_normalised_ips_coverage']:.0%} "
              f"DR {s['doubly_robust_coverage']:.0%}   fragile {s['fragile']}/{len(rows[name])}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2),
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
