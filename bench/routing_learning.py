"""Routing that learns: regret, drift and calibration on a simulated fleet, hidden success rates.

The fleet has one agent per configured kind. Each task is a line of the task set (JSON lines of
``description`` and ``category``) drawn at random; its first attempt succeeds with the hidden
probability of (category, chosen kind) from the ground truth (JSON: ``success`` per category and
kind, and ``drift``: from task ``at_task`` on, (category, kind) succeeds with ``success``). The
router sees only the description and the outcome; it is the real ``CoordinationPlanner``
(``select`` then ``record_outcome``) with the packaged configuration, or ``--config``.

Policies, all in the same run on the same task sequence and seeds:

* ``router``: the planner with its configured policy (``bandit`` by default);
* ``router (category as label)``: the same, each task submitted with its true category as a
  label (``task.submit`` ``labels``): what the router achieves when the submitter's ticket
  system says what sort of task it is (a type, a component), not the text alone;
* ``seed formula``: the planner with ``policy: seed``;
* ``static keyword``: the analyser's best domain kind, or the fallback kind; never learns;
* ``e-greedy (domain)``: epsilon-greedy (0.1) on success rates keyed on the analyser's best domain;
* ``thompson (true category)``: Beta(1, 1) Thompson sampling keyed on the *true* category;
* ``thompson (told the drift)``: the same, also told the drift itself (the moment, the category
  and the kind that drops), on which it forgets that kind's outcomes in that category: a ceiling
  for the drift share that no policy seeing only descriptions and outcomes can be expected to
  pass.

Reported, averaged over the seeds: regret (sum over tasks of the best kind's success
probability minus the chosen kind's, at that moment), the share of the drifted category's first
attempts that go to its new best kind within the first 100 tasks of that category after the
drift (and in tasks 1-50 and 51-100), and the expected calibration error of the router's confidence
(10 equal-width bins). Goals: router regret <= Thompson (true category); drift share > 0.5;
ECE <= 0.05.

    .venv/bin/python bench/routing_learning.py [--tasks FILE] [--truth FILE] [--seeds 1,2,3,4,5]
        [--steps 2000] [--config routing.yaml] [--move-drift CATEGORY] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator_agent.coordinator.state import AgentRecord
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.routing.analysis import TaskAnalyzer
from coordinator_agent.routing.config import Policy, RoutingConfig, load_routing_config
from coordinator_agent.routing.planner import CoordinationPlanner

HERE = Path(__file__).resolve().parent
DEFAULT_TASKS = HERE / "data" / "routing_tasks.jsonl"
DEFAULT_TRUTH = HERE / "data" / "routing_truth.json"
STEP_S = 60.0  # simulated time between tasks
EPSILON = 0.1
DRIFT_WINDOW = 100
ECE_BINS = 10
LABELLED = "router (category as label)"


@dataclass(frozen=True)
class Task:
    description: str
    category: str


class Truth:
    """Success probability per (category, kind), and the drifts; refuses a malformed file with
    a message that says what is wrong (``SystemExit``)."""

    def __init__(self, data: Any) -> None:
        success = data.get("success") if isinstance(data, dict) else None
        if not isinstance(success, dict) or not success:
            raise SystemExit("truth: needs an object 'success': {category: {kind: probability}}")
        self.success: dict[str, dict[str, float]] = {}
        for cat, kinds in success.items():
            if not isinstance(kinds, dict) or not kinds:
                raise SystemExit(f"truth: success.{cat} must map kinds to probabilities")
            self.success[cat] = {k: _probability(p, f"success.{cat}.{k}")
                                 for k, p in kinds.items()}
        drift = data.get("drift", [])
        if not isinstance(drift, list):
            raise SystemExit("truth: 'drift' must be a list")
        self.drift: list[dict[str, Any]] = []
        for n, change in enumerate(drift):
            where = f"drift[{n}]"
            if not isinstance(change, dict) or not {"at_task", "category", "kind",
                                                    "success"} <= change.keys():
                raise SystemExit(f"truth: {where} needs at_task, category, kind and success")
            if change["category"] not in self.success:
                raise SystemExit(f"truth: {where}: no category {change['category']!r}")
            if change["kind"] not in self.success[change["category"]]:
                raise SystemExit(f"truth: {where}: no kind {change['kind']!r} in its category")
            if not isinstance(change["at_task"], int) or change["at_task"] < 0:
                raise SystemExit(f"truth: {where}: at_task must be a task number")
            _probability(change["success"], f"{where}.success")
            self.drift.append(change)

    def at(self, step: int) -> dict[str, dict[str, float]]:
        table = {cat: dict(kinds) for cat, kinds in self.success.items()}
        for change in self.drift:
            if step >= int(change["at_task"]):
                table[change["category"]][change["kind"]] = float(change["success"])
        return table


def _probability(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise SystemExit(f"truth: {where} must be a probability in [0, 1], not {value!r}")
    return float(value)


def load_truth(path: Path) -> Truth:
    try:
        return Truth(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read a truth ({exc})") from None


def moved_drift(truth: Truth, category: str) -> Truth:
    """The same rates, with the first drift moved to ``category``'s best kind."""
    if not truth.drift or category not in truth.success:
        raise SystemExit(f"--move-drift: no drift to move, or no category {category!r}")
    row = truth.success[category]
    change = {**truth.drift[0], "category": category, "kind": max(row, key=row.__getitem__)}
    return Truth({"success": truth.success, "drift": [change]})


def load_tasks(path: Path) -> list[Task]:
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            tasks.append(Task(str(row["description"]), str(row["category"])))
        except (ValueError, KeyError) as exc:
            raise SystemExit(f"{path}:{number}: not a task line ({exc})") from None
    if not tasks:
        raise SystemExit(f"{path}: no tasks")
    return tasks


# --- policies ---------------------------------------------------------------------------------

Chooser = Callable[[Task, int], tuple[str, float | None]]  # (kind, confidence or None)
Learner = Callable[[Task, str, bool], None]


@dataclass
class Run:
    name: str
    choose: Chooser
    learn: Learner
    close: Callable[[], None] = lambda: None
    regret: float = 0.0
    picks: list[tuple[int, str, str]] = field(default_factory=list)  # (step, category, kind)
    calibration: list[tuple[float, bool]] = field(default_factory=list)


def planner_run(name: str, config: RoutingConfig, kinds: Sequence[str], seed: int,
                clock: list[float], workdir: Path, *, labelled: bool = False) -> Run:
    """The real planner; ``labelled``: each task carries its true category as a label."""
    planner = CoordinationPlanner(64, config=config, store_path=workdir / f"{name}.sqlite3",
                                  clock=lambda: clock[0], rng=random.Random(seed))
    agents = [AgentRecord(f"{kind}-1", kind, frozenset(), 64) for kind in kinds]
    by_id = {a.id: a for a in agents}
    pending: dict[str, TaskRecord] = {}
    counter = [0]

    def choose(task: Task, step: int) -> tuple[str, float | None]:
        counter[0] += 1
        record = TaskRecord(id=f"{name}-{counter[0]}", description=task.description,
                            labels=[task.category] if labelled else [])
        decision = planner.select(record, agents)
        assert decision.agent is not None and decision.kind is not None
        pending[decision.kind] = record
        return decision.kind, decision.confidence

    def learn(task: Task, kind: str, success: bool) -> None:
        record = pending.pop(kind)
        agent = by_id[f"{kind}-1"]
        record.attempts.append(Attempt(1, agent.id, clock[0], clock[0] + 60, outcome=(
            AttemptOutcome.SUCCEEDED if success else AttemptOutcome.FAILED)))
        planner.record_outcome(record, agent, success)

    return Run(name, choose, learn, planner.close)


def static_run(analyzer: TaskAnalyzer, fallback: str) -> Run:
    def choose(task: Task, step: int) -> tuple[str, float | None]:
        domains = analyzer.analyze(task.description).domains
        return (domains[0] if domains else fallback), None

    return Run("static keyword", choose, lambda t, k, s: None)


def epsilon_run(analyzer: TaskAnalyzer, kinds: Sequence[str], rng: random.Random) -> Run:
    stats: dict[tuple[str, str], list[int]] = {}

    def key(task: Task) -> str:
        domains = analyzer.analyze(task.description).domains
        return domains[0] if domains else "-"

    def choose(task: Task, step: int) -> tuple[str, float | None]:
        ctx = key(task)
        if rng.random() < EPSILON:
            return rng.choice(list(kinds)), None
        rates = {k: (s[0] + 1) / (s[1] + 2) for k in kinds
                 for s in [stats.get((ctx, k), [0, 0])]}
        best = max(rates.values())
        return rng.choice([k for k, r in rates.items() if r == best]), None

    def learn(task: Task, kind: str, success: bool) -> None:
        s = stats.setdefault((key(task), kind), [0, 0])
        s[0] += int(success)
        s[1] += 1

    return Run("e-greedy (domain)", choose, learn)


def thompson_truth_run(kinds: Sequence[str], rng: random.Random,
                       told: Truth | None = None) -> Run:
    stats: dict[tuple[str, str], list[int]] = {}
    forget = {(int(c["at_task"]), c["category"], c["kind"]) for c in told.drift} if told else set()

    def choose(task: Task, step: int) -> tuple[str, float | None]:
        for at, category, kind in forget:
            if step == at:
                stats.pop((category, kind), None)
        draws = {}
        for k in kinds:
            s = stats.get((task.category, k), [0, 0])
            draws[k] = rng.betavariate(1 + s[0], 1 + s[1] - s[0])
        best = max(draws.values())
        return next(k for k, d in draws.items() if d == best), None

    def learn(task: Task, kind: str, success: bool) -> None:
        s = stats.setdefault((task.category, kind), [0, 0])
        s[0] += int(success)
        s[1] += 1

    return Run("thompson (told the drift)" if told else "thompson (true category)", choose, learn)


# --- the simulation ---------------------------------------------------------------------------


def ece(pairs: Sequence[tuple[float, bool]], bins: int = ECE_BINS) -> float:
    if not pairs:
        return float("nan")
    sums = [[0.0, 0.0, 0] for _ in range(bins)]
    for conf, ok in pairs:
        b = sums[min(bins - 1, int(conf * bins))]
        b[0] += conf
        b[1] += float(ok)
        b[2] += 1
    return sum(abs(c - s) for c, s, n in sums if n) / len(pairs)


def drift_share(run: Run, truth: Truth, window: tuple[int, int]) -> float | None:
    if not truth.drift:
        return None
    change = truth.drift[0]
    category, start = change["category"], int(change["at_task"])
    after = truth.at(start)[category]
    best = max(after, key=after.__getitem__)
    picks = [kind for step, cat, kind in run.picks if cat == category and step >= start]
    chosen = picks[window[0]:window[1]]
    return sum(k == best for k in chosen) / len(chosen) if chosen else None


def simulate(tasks: list[Task], truth: Truth, config: RoutingConfig, seed: int,
             steps: int) -> list[Run]:
    kinds = list(dict.fromkeys([*config.kinds, config.fallback_kind]))
    missing = {c for c in truth.success} ^ {t.category for t in tasks}
    if missing:
        raise SystemExit(f"categories in only one of tasks and truth: {sorted(missing)}")
    unknown = {k for row in truth.success.values() for k in row} - set(kinds)
    if unknown:
        # The fleet has one agent per configured kind: no policy could choose these.
        raise SystemExit(f"truth names kinds the routing config does not: {sorted(unknown)} "
                         "(give a --config that lists them)")
    rng = random.Random(seed)
    order = [rng.choice(tasks) for _ in range(steps)]
    outcome_rng = random.Random(seed * 7919 + 1)
    analyzer = TaskAnalyzer(config)
    clock = [1_767_225_600.0]
    seed_config = config.model_copy(update={"policy": Policy.SEED})
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        workdir = Path(tmp)
        runs = [
            planner_run("router", config, kinds, seed, clock, workdir),
            planner_run(LABELLED, config, kinds, seed, clock, workdir, labelled=True),
            planner_run("seed formula", seed_config, kinds, seed, clock, workdir),
            static_run(analyzer, config.fallback_kind),
            epsilon_run(analyzer, kinds, random.Random(seed + 1)),
            thompson_truth_run(kinds, random.Random(seed + 2)),
            thompson_truth_run(kinds, random.Random(seed + 3), told=truth),
        ]
        # Every policy faces the same outcome draw per step: u < p(kind) means success.
        for step, task in enumerate(order):
            table = truth.at(step)[task.category]
            best = max(table.values())
            u = outcome_rng.random()
            clock[0] += STEP_S
            for run in runs:
                kind, confidence = run.choose(task, step)
                p = table.get(kind, 0.0)
                success = u < p
                run.regret += best - p
                run.picks.append((step, task.category, kind))
                if confidence is not None:
                    run.calibration.append((confidence, success))
                run.learn(task, kind, success)
        for run in runs:
            run.close()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=Path, default=DEFAULT_TASKS)
    parser.add_argument("--truth", type=Path, default=DEFAULT_TRUTH)
    parser.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--config", type=Path, help="routing config (default: packaged)")
    parser.add_argument("--move-drift", metavar="CATEGORY",
                        help="move the truth's drift to this category: at the same task, its "
                             "best kind drops to the same success (tests drift elsewhere)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    tasks = load_tasks(args.tasks)
    truth = load_truth(args.truth)
    if args.move_drift:
        truth = moved_drift(truth, args.move_drift)
    config = load_routing_config(args.config)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    totals: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        for run in simulate(tasks, truth, config, seed, args.steps):
            row = totals.setdefault(run.name, {"regret": [], "drift": [], "drift_early": [],
                                               "drift_late": [], "ece": []})
            row["regret"].append(run.regret)
            first = drift_share(run, truth, (0, DRIFT_WINDOW))
            early = drift_share(run, truth, (0, DRIFT_WINDOW // 2))
            late = drift_share(run, truth, (DRIFT_WINDOW // 2, DRIFT_WINDOW))
            if first is not None:
                row["drift"].append(first)
            if early is not None:
                row["drift_early"].append(early)
            if late is not None:
                row["drift_late"].append(late)
            if run.calibration:
                row["ece"].append(ece(run.calibration))

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def fmt(value: float | None, spec: str) -> str:
        width = int(spec.partition(".")[0])
        return f"{'-':>{width}}" if value is None else format(value, spec)

    summary = {name: {k: mean(v) for k, v in row.items()} | {"per_seed_regret": row["regret"]}
               for name, row in totals.items()}
    print(f"routing learning: {args.steps} tasks x {len(seeds)} seeds ({args.seeds}); "
          f"tasks {args.tasks.name}, truth {args.truth.name}")
    print(f"{'policy':<26}{'regret':>9}{'drift 1-50':>12}{'drift 51-100':>14}"
          f"{'drift 1-100':>13}{'ECE':>8}")
    for name, row in summary.items():
        print(f"{name:<26}{fmt(row['regret'], '9.1f')}{fmt(row['drift_early'], '12.2f')}"
              f"{fmt(row['drift_late'], '14.2f')}{fmt(row['drift'], '13.2f')}"
              f"{fmt(row['ece'], '8.3f')}")
    router, oracle = summary["router"], summary["thompson (true category)"]
    goals = {
        "regret <= thompson (true category)": (router["regret"] or 0) <= (oracle["regret"] or 0),
        "drift: most first attempts move (tasks 51-100 after)": (router["drift_late"] or 0) > 0.5,
        "ECE <= 0.05": (router["ece"] if router["ece"] is not None else 1) <= 0.05,
    }
    for goal, ok in goals.items():
        print(f"{goal}: {'MET' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "goals": goals}, indent=2),
                             encoding="utf-8")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
