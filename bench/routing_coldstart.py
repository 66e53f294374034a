"""Cold-start routing: which kind a description goes to before anything has been learned.

For each ticket of a JSON-lines file (``{"description": ..., "kind": ...}``, other fields
ignored) it asks

* the text prior (``routing/text_prior.py``): the most probable kind, and
* the seed formula as the planner computes it today with no learning store and every kind
  idle (``TaskAnalyzer`` + ``CoordinationPlanner.score_kinds`` + threshold + fallback kind),
  the baseline, measured in the same run on the same tickets,

and prints top-1 accuracy overall and per kind for both, the prior's confusion table, its
top-2 accuracy, its mean top probability against its accuracy (is it calibrated?), and the time
of one uncached ``TextPrior.probabilities`` call (p50/p99 of wall-clock and of thread CPU
time, after a warm-up) and of a cached one.

Target: top-1 accuracy >= 80 %, p99 of an uncached call well under 0.5 ms of CPU time (on a
shared machine the wall-clock tail is mostly time other processes took; both are printed).
Exit status 1 when the accuracy target is missed.

    .venv/bin/python bench/routing_coldstart.py --tickets bench/data/tickets_dev.jsonl
        [--config ROUTING.yaml] [--show-errors] [--rounds 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import median, percentile, table, verdict

from coordinator_agent.routing.config import RoutingConfig, load_routing_config
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.routing.text_prior import TextPrior

TARGET_ACCURACY = 0.80
TARGET_P99_MS = 0.5


def read_tickets(path: Path) -> list[dict[str, str]]:
    tickets = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("description"), str) or not isinstance(row.get("kind"), str):
            raise SystemExit(f"{path}:{number}: needs string fields description and kind")
        tickets.append(row)
    if not tickets:
        raise SystemExit(f"{path}: no tickets")
    return tickets


def seed_formula_kind(planner: CoordinationPlanner, description: str) -> str:
    """Today's cold start: seed confidence of every kind at zero load, threshold, fallback."""
    config = planner.config
    kinds = dict.fromkeys([*config.kinds, config.fallback_kind], 0.0)
    scores = planner.score_kinds(planner.analyzer.analyze(description), kinds, now=0.0)
    best = scores[0]
    return best.kind if best.confidence >= config.threshold else config.fallback_kind


def time_calls(config: RoutingConfig, descriptions: list[str], rounds: int) -> dict[str, float]:
    uncached = TextPrior(config.model_copy(
        update={"prior": config.prior.model_copy(update={"cache_size": 0})}))
    cached = TextPrior(config)
    for d in descriptions:  # warm-up (and fill the cache)
        uncached.probabilities(d)
        cached.probabilities(d)
    cold: list[float] = []
    cpu: list[float] = []
    warm: list[float] = []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(rounds):
        for d in descriptions:
            c0, t0 = cpu_clock(), clock()
            uncached.probabilities(d)
            t1, c1 = clock(), cpu_clock()
            cached.probabilities(d)
            t2 = clock()
            cold.append((t1 - t0) / 1e6)
            cpu.append((c1 - c0) / 1e6)
            warm.append((t2 - t1) / 1e6)
    return {"p50_ms": median(cold), "p99_ms": percentile(cold, 99),
            "cpu_p50_ms": median(cpu), "cpu_p99_ms": percentile(cpu, 99),
            "cached_p50_ms": median(warm), "cached_p99_ms": percentile(warm, 99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=Path, required=True, help="JSON lines file")
    parser.add_argument("--config", type=Path, default=None,
                        help="routing config (default: the packaged one)")
    parser.add_argument("--show-errors", action="store_true",
                        help="list the tickets the prior gets wrong (tune on dev only)")
    parser.add_argument("--rounds", type=int, default=50, help="timing rounds over the file")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    config = load_routing_config(args.config)
    tickets = read_tickets(args.tickets)
    prior = TextPrior(config)
    planner = CoordinationPlanner(1, config=config)
    try:
        truth = [t["kind"] for t in tickets]
        chosen: list[str] = []
        second: list[str] = []
        top_probability: list[float] = []
        for t in tickets:
            probs = prior.probabilities(t["description"])
            ranked = sorted(probs, key=lambda k: -probs[k])
            chosen.append(prior.best(t["description"]))
            second.append(ranked[1])
            top_probability.append(probs[chosen[-1]])
        baseline = [seed_formula_kind(planner, t["description"]) for t in tickets]
    finally:
        planner.close()
    timing = time_calls(config, [t["description"] for t in tickets], args.rounds)

    kinds = list(dict.fromkeys([*sorted(set(truth)), *config.kinds]))
    n = len(tickets)
    hits = sum(c == k for c, k in zip(chosen, truth, strict=True))
    base_hits = sum(c == k for c, k in zip(baseline, truth, strict=True))
    top2 = sum(k in (c, s) for c, s, k in zip(chosen, second, truth, strict=True))
    accuracy, base_accuracy = hits / n, base_hits / n
    print(f"tickets {n} from {args.tickets}")
    rows = []
    per_kind: dict[str, dict[str, float]] = {}
    for kind in sorted(set(truth)):
        idx = [i for i, k in enumerate(truth) if k == kind]
        a = sum(chosen[i] == kind for i in idx) / len(idx)
        b = sum(baseline[i] == kind for i in idx) / len(idx)
        per_kind[kind] = {"tickets": len(idx), "prior": a, "seed_formula": b}
        rows.append((kind, len(idx), f"{100 * a:.1f}%", f"{100 * b:.1f}%"))
    rows.append(("all", n, f"{100 * accuracy:.1f}%", f"{100 * base_accuracy:.1f}%"))
    print(table(("KIND", "TICKETS", "TEXT PRIOR TOP-1", "SEED FORMULA TOP-1 (baseline)"), rows))
    print(f"\ntext prior top-2: {100 * top2 / n:.1f}%   mean top probability "
          f"{sum(top_probability) / n:.3f} (accuracy {accuracy:.3f})")

    confusion = Counter(zip(truth, chosen, strict=True))
    columns = [k for k in kinds if any(confusion[(t, k)] for t in kinds)]
    print("\nconfusion of the text prior (rows: true kind, columns: chosen kind)")
    print(table(("TRUE", *columns),
                [(t, *(confusion[(t, c)] for c in columns)) for t in sorted(set(truth))]))
    load = os.getloadavg()[0]
    print(f"\nTextPrior.probabilities per call, uncached: wall p50 "
          f"{timing['p50_ms'] * 1000:.1f} us, p99 {timing['p99_ms'] * 1000:.1f} us; "
          f"CPU p50 {timing['cpu_p50_ms'] * 1000:.1f} us, "
          f"p99 {timing['cpu_p99_ms'] * 1000:.1f} us; cached wall p50 "
          f"{timing['cached_p50_ms'] * 1000:.1f} us, p99 {timing['cached_p99_ms'] * 1000:.1f} us "
          f"(load average {load:.2f} on {os.cpu_count()} CPUs: wall-clock tails include time "
          f"other processes took)")
    if args.show_errors:
        print("\nmisrouted by the text prior:")
        for t, c in zip(tickets, chosen, strict=True):
            if c != t["kind"]:
                print(f"  {t['kind']:>13} -> {c:<13} {t['description']}")
    ok = accuracy >= TARGET_ACCURACY
    fast = timing["cpu_p99_ms"] < TARGET_P99_MS
    print(f"\ntop-1 {100 * accuracy:.1f}% (target >= {100 * TARGET_ACCURACY:.0f}%, seed formula "
          f"{100 * base_accuracy:.1f}%): {verdict(ok)}; CPU p99 {timing['cpu_p99_ms'] * 1000:.1f}"
          f" us (target < {TARGET_P99_MS * 1000:.0f} us): {verdict(fast)}")
    if args.json is not None:
        figures: dict[str, Any] = {
            "tickets": n, "file": str(args.tickets), "accuracy": accuracy,
            "top2_accuracy": top2 / n, "seed_formula_accuracy": base_accuracy,
            "per_kind": per_kind, "confusion": {f"{t}->{c}": v for (t, c), v in
                                                sorted(confusion.items())},
            "mean_top_probability": sum(top_probability) / n, **timing,
        }
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
