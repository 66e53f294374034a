"""LearningUpdate and CoordinationPlanner.apply_outcome: the learning state is a deterministic
function of the updates applied, so a standby replaying the leader's updates (the HA log)
learns exactly what the leader learned, and the state survives a restart."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from coordinator_agent.coordinator.state import AgentRecord
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.routing.config import default_routing_config
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.routing.updates import LearningUpdate

KINDS = ("development", "security", "cicd", "documentation", "inventory", "general")
NOW = 1_767_225_600.0
DESCRIPTIONS = (
    "Deploy the billing service to staging",
    "Write release notes for the billing service",
    "Memory leak in the gateway after the upgrade",
    "Pen test the login flow before launch",
    "Which team owns the payments database?",
    "Rotate the leaked Vault credentials",
    "Add rate limiting to the public API",
    "ArgoCD sync stuck on the orders app",
)
#: Hidden success per (description index, kind): the leader's fleet.
RATES = {i: {k: 0.2 + 0.6 * ((i + j) % 3 == 0) for j, k in enumerate(KINDS)}
         for i in range(len(DESCRIPTIONS))}


def _no_clock() -> float:
    raise AssertionError("apply_outcome must not read the clock")


def _leader_run(planner: CoordinationPlanner, steps: int, seed: int) -> list[dict[str, Any]]:
    """Route and finish ``steps`` tasks (retries included); returns the updates it learned
    from, as the JSON the log would carry."""
    shipped: list[dict[str, Any]] = []
    planner.outcome_hook = lambda update: shipped.append(json.loads(json.dumps(
        update.to_dict())))
    agents = [AgentRecord(f"{kind}-1", kind, frozenset(), 64) for kind in KINDS]
    rng = random.Random(seed)
    clock = [NOW]
    planner._clock = lambda: clock[0]  # the leader's own clock, stepped by the test
    for n in range(steps):
        index = rng.randrange(len(DESCRIPTIONS))
        task = TaskRecord(id=f"task-{n}", description=DESCRIPTIONS[index], max_retries=1)
        for number in (1, 2):
            clock[0] += 30.0
            decision = planner.select(task, agents)
            assert decision.agent is not None and decision.kind is not None
            ok = rng.random() < RATES[index][decision.kind]
            task.attempts.append(Attempt(number, decision.agent.id, clock[0], clock[0] + 1,
                                         outcome=(AttemptOutcome.SUCCEEDED if ok
                                                  else AttemptOutcome.FAILED)))
            planner.record_outcome(task, decision.agent, ok)
            if ok:
                break
            planner.next_step(task)
    return shipped


def _state(planner: CoordinationPlanner) -> dict[str, Any]:
    """Everything the planner has learned (not what only deciding changes)."""
    learner = planner.learner
    counters = planner._counters
    return {
        "weights": sorted(learner.model.rows()),
        "clusters": sorted(learner.clusters.rows()),
        "neighbours": learner.neighbours.rows(),
        "calibration": learner.calibrator.state(),
        "surprise": {g: dict(k) for g, k in learner.surprise.state().items()},
        "changes": learner.changes.state(),
        "pattern": planner.store.kinds(now=NOW + 10**6),
        "evidence": [planner.store.evidence(planner.analyzer.analyze(d).keywords, KINDS,
                                            now=NOW + 10**6) for d in DESCRIPTIONS],
        "first_tries": (counters["first_tries"], counters["first_try_successes"]),
        "outcomes": len(planner.store),
    }


def _beliefs(planner: CoordinationPlanner) -> list[Any]:
    out = []
    for description in DESCRIPTIONS:
        analysis = planner.analyzer.analyze(description)
        out.append([(s.kind, s.belief, s.calibrated) for s in
                    planner.learner.scores(description, analysis, KINDS, NOW + 86_400)])
    return out


@pytest.mark.parametrize("change_test", ["packaged", "features", "cluster"])
def test_a_standby_applying_the_leaders_updates_learns_the_same_state(
        tmp_path: Path, change_test: str) -> None:
    config = default_routing_config()
    # Evidence from similar recent tasks (neighbours.py, off in the packaged file) replicates.
    update: dict[str, Any] = {"neighbour_memory": 2000}
    if change_test != "packaged":  # the change test (drift.py) must replicate on any scope,
        # beside the clusters of similar descriptions (clusters.py; off in the packaged file)
        update |= {"drift_threshold": 2.0, "drift_votes": 1, "drift_scope": change_test,
                   "cluster_threshold": 0.4}
    config = config.model_copy(update={"bandit": config.bandit.model_copy(update=update)})
    leader = CoordinationPlanner(8, config=config, store_path=tmp_path / "leader.sqlite3",
                                 rng=random.Random(1))
    shipped = _leader_run(leader, 150, seed=3)
    assert len(shipped) > 150  # retries are learned too
    assert any(u["model_probability"] is not None for u in shipped)
    assert any(not u["first_try"] for u in shipped)
    # Two standbys with other random generators and no usable clock.
    standbys = [CoordinationPlanner(8, config=config, clock=_no_clock, rng=random.Random(seed))
                for seed in (7, 8)]
    for standby in standbys:
        for entry in shipped:
            standby.apply_outcome(LearningUpdate.from_dict(entry))
    assert _state(standbys[0]) == _state(standbys[1]) == _state(leader)
    assert _beliefs(standbys[0]) == _beliefs(leader)
    assert _state(leader)["weights"]  # something was learned
    assert len(_state(leader)["neighbours"]) == len(shipped)  # every learned attempt, in order
    # The clusters of similar descriptions (clusters.py) replicate, and the model learned
    # per cluster: one cluster context per cluster, in the weights.
    clusters = _state(leader)["clusters"]
    features = {row[1] for row in _state(leader)["weights"]}
    if change_test == "packaged":
        assert clusters == [] and not any(f.startswith("@c:") for f in features)
        return
    assert 2 <= len(clusters) <= len(DESCRIPTIONS)
    assert {f"@c:{row[0]}" for row in clusters} <= features
    assert _state(leader)["changes"]["flags"]  # the test tripped somewhere
    leader.close()


def test_applied_updates_survive_a_restart(tmp_path: Path) -> None:
    config = default_routing_config()
    shipped = _leader_run(CoordinationPlanner(8, config=config, rng=random.Random(1)), 80,
                          seed=5)
    path = tmp_path / "standby.sqlite3"
    standby = CoordinationPlanner(8, config=config, store_path=path, clock=_no_clock)
    for entry in shipped:
        standby.apply_outcome(LearningUpdate.from_dict(entry))
    before = _state(standby)
    beliefs = _beliefs(standby)
    standby.close()
    reopened = CoordinationPlanner(8, config=config, store_path=path, clock=_no_clock)
    after = _state(reopened)
    # The surprise sums are short-term and kept in memory only (surprise.py).
    assert after.pop("surprise") == {}
    before.pop("surprise")
    assert after.pop("changes") == {"cusum": {}, "flags": {}}
    before.pop("changes")
    assert after == before
    assert _beliefs(reopened) == beliefs
    reopened.close()


def test_an_update_round_trips_and_bad_entries_are_refused() -> None:
    update = LearningUpdate(task_id="t-1", attempt=1, at=NOW, description="Deploy it",
                            kind="cicd", success=True, keywords=("deploy",), prior=0.7,
                            first_try=True, model_probability=0.65, confidence=0.7)
    assert LearningUpdate.from_dict(json.loads(json.dumps(update.to_dict()))) == update
    good = update.to_dict()
    for field, value, message in [
        ("at", float("nan"), "'at' must be a finite number"),
        ("attempt", 0, "'attempt' must be a positive integer"),
        ("success", 1, "'success' must be a boolean"),
        ("keywords", "deploy", "'keywords' must be a list of strings"),
        ("prior", 1.5, "'prior' must be in [0, 1]"),
        ("kind", None, "'kind' must be a string"),
        ("version", 99, "unknown version 99"),
        ("surprise", 1, "unknown field 'surprise'"),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            LearningUpdate.from_dict({**good, field: value})
    missing = dict(good)
    del missing["description"]
    with pytest.raises(ValueError, match="missing field 'description'"):
        LearningUpdate.from_dict(missing)
