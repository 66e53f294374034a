"""Random ground truths for ``routing_learning.py``: the learning goals beyond hand-written truths.

Each truth draws, per category of the task set, the success probability of a first try on
every kind, and one drift. The kind a category's words point at is its best kind with
probability ``--right`` (else another kind is best: the keywords mislead); the best kind
succeeds 0.7-0.92 of the time, the fallback kind (``general``) 0.25-0.65, the others
0.05-0.5, always at least 0.1 below the best. The drift picks a category and a task between
800 and 1,200; the category's best kind drops to 0.2-0.35, and the new best kind leads the
runner-up by at least ``--lead`` (otherwise "the new best kind" is a coin toss that no policy
can be judged on).

Then it runs ``routing_learning.py`` on each truth (all its policies in the same run, the seeds
given) and prints, per truth and in total, the router's regret against Thompson sampling
keyed on the true category, the drift share in tasks 51-100 after the drop against the
ceiling (Thompson sampling told the drift) and the router given each task's category as a
label (``labelled``), and the ECE.

    .venv/bin/python bench/random_truths.py [--truths 10] [--seed 100] [--seeds 1,2,3,4,5]
        [--right 0.75] [--lead 0.1] [--out DIR] [--config routing.yaml]

Nothing is tuned on these: they exist to say how often the goals hold on fleets nobody wrote.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from routing_learning import DEFAULT_TASKS, LABELLED, Task, load_tasks

from coordinator_agent.routing.config import RoutingConfig, load_routing_config
from coordinator_agent.routing.text_prior import TextPrior

HERE = Path(__file__).resolve().parent


def points_at(tasks: list[Task], config: RoutingConfig) -> dict[str, str]:
    """The kind each category's descriptions point at: the text prior's most frequent top kind."""
    prior = TextPrior(config)
    votes: dict[str, Counter[str]] = {}
    for task in tasks:
        text = prior.probabilities(task.description)
        votes.setdefault(task.category, Counter())[max(text, key=text.__getitem__)] += 1
    return {category: count.most_common(1)[0][0] for category, count in votes.items()}


def _row(rng: random.Random, kinds: list[str], fallback: str, best: str) -> dict[str, float]:
    top = round(rng.uniform(0.7, 0.92), 2)
    row = {}
    for kind in kinds:
        if kind == best:
            row[kind] = top
        elif kind == fallback:
            row[kind] = round(min(top - 0.1, rng.uniform(0.25, 0.65)), 2)
        else:
            row[kind] = round(min(top - 0.1, rng.uniform(0.05, 0.5)), 2)
    return row


def make_truth(rng: random.Random, kinds: list[str], fallback: str, pointed_at: dict[str, str],
               right: float, lead: float) -> dict[str, Any]:
    categories = sorted(pointed_at)
    while True:  # until some category can drift onto a well-defined new best kind
        success = {}
        for category in categories:
            pointed = pointed_at[category]
            best = pointed if rng.random() < right else rng.choice(
                [k for k in kinds if k != pointed])
            success[category] = _row(rng, kinds, fallback, best)
        candidates = [c for c in categories if _can_drift(success[c], lead)]
        if candidates:
            break
    category = rng.choice(candidates)
    row = success[category]
    dropped = max(row, key=row.__getitem__)
    runner_up = sorted(row.values())[-2]
    drift = {"at_task": rng.randrange(800, 1201), "category": category, "kind": dropped,
             "success": round(rng.uniform(0.2, min(0.35, runner_up - lead)), 2)}
    return {"note": "random truth (bench/random_truths.py)", "success": success,
            "drift": [drift]}


def _can_drift(row: dict[str, float], lead: float) -> bool:
    """Whether the runner-up, once the best kind drops (to 0.2 at least), leads every other kind
    by ``lead``."""
    ranked = sorted(row.values(), reverse=True)
    return ranked[1] - max(ranked[2], 0.2) >= lead


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--truths", type=int, default=10)
    parser.add_argument("--seed", type=int, default=100, help="draws the truths")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="the simulation's, per truth")
    parser.add_argument("--right", type=float, default=0.75,
                        help="chance that a category's best kind is the one its words point at")
    parser.add_argument("--lead", type=float, default=0.1,
                        help="the new best kind's least lead after the drift")
    parser.add_argument("--tasks", type=Path, default=DEFAULT_TASKS)
    parser.add_argument("--config", type=Path, help="routing config (default: packaged)")
    parser.add_argument("--out", type=Path, help="keep the truths and results here")
    args = parser.parse_args()
    if args.truths < 1 or not 0 <= args.right <= 1 or not 0 <= args.lead < 0.5:
        parser.error("--truths >= 1, --right in [0, 1], --lead in [0, 0.5)")
    config = load_routing_config(args.config)
    kinds = list(dict.fromkeys([*config.kinds, config.fallback_kind]))
    pointed_at = points_at(load_tasks(args.tasks), config)
    print("the words of each category point at: "
          + ", ".join(f"{c} -> {k}" for c, k in sorted(pointed_at.items())))
    rng = random.Random(args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="random-truths-"))
    out.mkdir(parents=True, exist_ok=True)
    met = {"regret": 0, "drift": 0, "labelled": 0, "ceiling": 0, "ece": 0}
    print(f"{'truth':<8}{'drift in':<15}{'regret':>8}{'thompson':>10}{'drift':>7}"
          f"{'labelled':>10}{'ceiling':>9}{'ECE':>7}", flush=True)
    for n in range(args.truths):
        truth = make_truth(rng, kinds, config.fallback_kind, pointed_at, args.right,
                           args.lead)
        truth_file, result = out / f"truth-{n}.json", out / f"result-{n}.json"
        truth_file.write_text(json.dumps(truth, indent=1), encoding="utf-8")
        command = [sys.executable, str(HERE / "routing_learning.py"), "--tasks", str(args.tasks),
                   "--truth", str(truth_file), "--seeds", args.seeds, "--json", str(result)]
        if args.config:
            command += ["--config", str(args.config)]
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if not result.exists():
            sys.stderr.write(run.stdout + run.stderr)
            return 2
        summary = json.loads(result.read_text(encoding="utf-8"))["summary"]
        router, oracle = summary["router"], summary["thompson (true category)"]
        ceiling = summary["thompson (told the drift)"]["drift_late"]
        late, labelled = router["drift_late"], summary[LABELLED]["drift_late"]
        met["regret"] += router["regret"] <= oracle["regret"]
        met["drift"] += late > 0.5
        met["labelled"] += labelled > 0.5
        met["ceiling"] += ceiling > 0.5
        met["ece"] += router["ece"] <= 0.05
        print(f"{n:<8}{truth['drift'][0]['category']:<15}{router['regret']:8.1f}"
              f"{oracle['regret']:10.1f}{late:7.2f}{labelled:10.2f}{ceiling:9.2f}{router['ece']:7.3f}",
              flush=True)
    total = args.truths
    print(f"regret <= thompson (true category): {met['regret']}/{total}; drift share > 0.5 in "
          f"tasks 51-100: router {met['drift']}/{total}, "
          f"with the category as label {met['labelled']}/{total}, "
          f"ceiling {met['ceiling']}/{total}; "
          f"ECE <= 0.05: {met['ece']}/{total}  (truths and results in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
