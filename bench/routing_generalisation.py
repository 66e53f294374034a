"""How the text prior copes with words it was never told about: vocabulary held back at random.

A deployment's tickets name products, tools and phrasings that no vocabulary lists. This
benchmark imitates that: for each seed it removes a random fraction (``--drop``) of every
kind's ``terms``, ``hints``, ``phrases`` and ``examples`` (the ``keywords``, the kind's core
words, stay), builds the text prior from what is left and measures top-1 accuracy on the
ticket files. The same run measures the full vocabulary, the reference.

What it rewards is evidence that carries over to unseen words (word families, the shape of
a token, what the remaining examples teach), not one more listed name. Compare two versions of
the code by running this file against each (``PYTHONPATH``) with the same seeds.

    .venv/bin/python bench/routing_generalisation.py --tickets bench/data/tickets_dev.jsonl
        [--tickets MORE.jsonl] [--drop 0.4] [--seeds 1,2,3,4,5] [--config ROUTING.yaml]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from _common import table
from routing_coldstart import read_tickets

from coordinator_agent.routing.config import RoutingConfig, load_routing_config
from coordinator_agent.routing.text_prior import TextPrior

HELD_BACK = ("terms", "hints", "phrases", "examples")


def ablated(config: RoutingConfig, drop: float, seed: int) -> RoutingConfig:
    """The config with a random ``drop`` share of each kind's held-back lists removed."""
    rng = random.Random(seed)
    kinds = {}
    for name, spec in config.kinds.items():
        update = {}
        for field in HELD_BACK:
            items = list(getattr(spec, field))
            keep = len(items) - round(drop * len(items))
            update[field] = sorted(rng.sample(items, keep), key=items.index)
        kinds[name] = spec.model_copy(update=update)
    return config.model_copy(update={"kinds": kinds})


def accuracy(prior: TextPrior, tickets: list[dict[str, str]]) -> float:
    return sum(prior.best(t["description"]) == t["kind"] for t in tickets) / len(tickets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=Path, action="append", required=True,
                        help="JSON lines file (repeatable)")
    parser.add_argument("--config", type=Path, default=None,
                        help="routing config (default: the packaged one)")
    parser.add_argument("--drop", type=float, default=0.4,
                        help="share of each kind's terms, hints, phrases, examples held back")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds")
    args = parser.parse_args(argv)
    if not 0 <= args.drop < 1:
        raise SystemExit("--drop must be in [0, 1)")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    config = load_routing_config(args.config)
    files = {str(path): read_tickets(path) for path in args.tickets}
    full = TextPrior(config)
    rows = []
    means = []
    for name, tickets in files.items():
        held = [accuracy(TextPrior(ablated(config, args.drop, seed)), tickets) for seed in seeds]
        mean = sum(held) / len(held)
        means.append(mean)
        rows.append((name, len(tickets), f"{100 * accuracy(full, tickets):.1f}%",
                     f"{100 * mean:.1f}%", f"{100 * min(held):.1f}%"))
    print(table(("TICKETS", "N", "FULL VOCABULARY",
                 f"{100 * args.drop:.0f}% HELD BACK (mean)", "(worst seed)"), rows))
    print(f"\nmean over files, vocabulary held back: {100 * sum(means) / len(means):.1f}% "
          f"(seeds {args.seeds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
