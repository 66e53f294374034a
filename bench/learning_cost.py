"""The coordinator's learning path alone: CPU per task of ``select`` and ``record_outcome``.

No broker: the planner in this process, driven as the coordinator drives it in a burst. Per
event-loop turn, 16 tasks are decided, then their 16 attempts end and are learned; the learning
store is a SQLite file in a temporary directory (it commits once per turn), task ids are random
128-bit hex (as the client makes them), the clock and the random draws are seeded. CPU time
(``process_time``) per task covers the decision, the learning and the store's commits.

* ``--descriptions one``: every task is "noop" on one agent of kind ``general`` (the e2e
  benchmark's burst);
* ``--descriptions set``: descriptions of ``bench/data/routing_tasks.jsonl``, one agent of
  each configured kind.

``--baseline DIR`` runs the same in a child process with the package from DIR (e.g.
``git archive REV | tar -x -C DIR``), rounds interleaved, and compares the learned state: the
bandit weights, the calibration, the surprise sums and every table of the learning store must
be the same, bit for bit (exit status 1 when not), since a change of speed must not change what
is learned.

    .venv/bin/python bench/learning_cost.py [--descriptions one|set] [--tasks 20000]
        [--rounds 3] [--baseline DIR] [--bandit '{"cluster_threshold": 0.4}']
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import median

import coordinator_agent
from coordinator_agent.coordinator.state import AgentRecord
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.routing.config import default_routing_config
from coordinator_agent.routing.planner import CoordinationPlanner

TASKS_FILE = Path(__file__).resolve().parent / "data" / "routing_tasks.jsonl"
PER_TURN = 16
TABLES = ("outcomes", "bandit_weights", "routing_clusters", "routing_neighbours", "decisions",
          "counters")


def run_once(descriptions: str, tasks: int, bandit: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(3)
    config = default_routing_config()
    if bandit:
        config = config.model_copy(update={"bandit": config.bandit.model_copy(update=bandit)})
    if descriptions == "one":
        agents = [AgentRecord("agent-general", "general", frozenset(), 64)]
        texts = ["noop"]
    else:
        agents = [AgentRecord(f"agent-{kind}", kind, frozenset(), 64) for kind in config.kinds]
        texts = [json.loads(line)["description"]
                 for line in TASKS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    now = [1_767_225_600.0]

    def clock() -> float:
        now[0] += 0.001
        return now[0]

    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        planner = CoordinationPlanner(64, config=config, store_path=Path(tmp) / "r.sqlite3",
                                      clock=clock, rng=random.Random(5))

        async def burst() -> None:
            done = 0
            while done < tasks:
                decided = []
                for _ in range(min(PER_TURN, tasks - done)):
                    task = TaskRecord(id=f"{rng.getrandbits(128):032x}",
                                      description=rng.choice(texts))
                    done += 1
                    decision = planner.select(task, agents)
                    if decision.agent is not None:
                        decided.append((task, decision.agent))
                await asyncio.sleep(0)  # the turn ends: the store commits
                for task, agent in decided:
                    ok = rng.random() < 0.8
                    task.attempts.append(Attempt(
                        1, agent.id, 0.0, 60.0,
                        AttemptOutcome.SUCCEEDED if ok else AttemptOutcome.FAILED,
                        duration_s=0.01))
                    planner.record_outcome(task, agent, ok)
                await asyncio.sleep(0)

        started = time.process_time()
        asyncio.run(burst())
        cpu = time.process_time() - started
        planner.store.commit()
        learner = planner.learner
        state = {
            "weights": sorted(learner.model.rows()),
            "calibration": learner.calibrator.state(),
            "surprise": sorted((group, sorted(kinds.items()))
                               for group, kinds in learner.surprise.state().items()),
            "tables": [list(planner.store.db.execute(f"SELECT * FROM {table} ORDER BY 1, 2"))
                       for table in TABLES],
        }
        planner.close()
    digest = hashlib.sha256(repr(state).encode()).hexdigest()
    return {"us_per_task": cpu / tasks * 1e6, "state": digest,
            "code": str(Path(coordinator_agent.__file__).resolve().parent.parent)}


def run_child(baseline: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--descriptions", args.descriptions, "--tasks",
               str(args.tasks), "--rounds", "1", "--bandit", args.bandit, "--json", "-"]
    env = {**os.environ, "PYTHONPATH": str(baseline.resolve())}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])["rounds"][0]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptions", choices=["one", "set"], default="one")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, metavar="DIR")
    parser.add_argument("--bandit", default="{}", help="JSON: bandit settings to override")
    parser.add_argument("--json", metavar="FILE", help="write the rounds ('-': stdout)")
    args = parser.parse_args()
    bandit = json.loads(args.bandit)
    ours: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        ours.append(run_once(args.descriptions, args.tasks, bandit))
        if args.baseline is not None:
            base.append(run_child(args.baseline, args))
    if args.json == "-":
        print(json.dumps({"rounds": ours}))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours, "base": base}, indent=2),
                                   encoding="utf-8")
    load = os.getloadavg()[0]
    print(f"learning path ({args.descriptions} description(s), {args.tasks} tasks, "
          f"{args.rounds} round(s), load average {load:.2f}): CPU us per task")
    for name, rounds in (("this checkout", ours), (f"baseline {args.baseline}", base)):
        if rounds:
            values = [r["us_per_task"] for r in rounds]
            print(f"  {name:40s} {median(values):7.1f}  ({min(values):.1f}-{max(values):.1f})")
    if not base:
        return 0
    ratio = median([r["us_per_task"] for r in ours]) / median([r["us_per_task"] for r in base])
    same = {r["state"] for r in ours} == {r["state"] for r in base}
    print(f"  now/baseline x{ratio:.2f}; learned state {'the same' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
