"""Task labels (``task.submit`` ``labels``): checked like the protocol's labels, read by the
router as contexts of its evidence, carried by the learning updates and the decision log, and
taken by ``replay`` (``route`` takes them: test_routing_cli.py)."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError

from coordinator_agent.coordinator.state import AgentRecord
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.routing.config import default_routing_config
from coordinator_agent.routing.decisions import read_log
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.routing.replay import replay
from coordinator_agent.routing.updates import LearningUpdate
from coordinator_agent.wire import protocol

KINDS = ("development", "security", "cicd", "documentation", "inventory", "general")
NOW = 1_767_225_600.0
#: One sort of task written three ways that share no vocabulary word, then a fourth way.
WORDINGS = ("Ledger totals are off by a cent", "Refunds stuck in the queue overnight",
            "Chargeback export missing rows")
UNSEEN = "Merchant payouts delayed since Friday"


def _fleet() -> list[AgentRecord]:
    return [AgentRecord(f"{kind}-1", kind, frozenset(), 64) for kind in KINDS]


def _route(planner: CoordinationPlanner, task: TaskRecord, good: str) -> str:
    """Route ``task`` once; it succeeds only on kind ``good``."""
    agents = _fleet()
    decision = planner.select(task, agents)
    assert decision.agent is not None and decision.kind is not None
    ok = decision.kind == good
    task.attempts.append(Attempt(1, decision.agent.id, 0.0, 1.0, outcome=(
        AttemptOutcome.SUCCEEDED if ok else AttemptOutcome.FAILED)))
    planner.record_outcome(task, decision.agent, ok)
    return decision.kind


#: Two sorts of task, told apart only by their label: each succeeds on one kind.
SORTS = (("Payments", "inventory"), ("Search", "documentation"))


def _teach(planner: CoordinationPlanner, n: int = 48, *, unique: bool = False) -> None:
    """``n`` tasks of the two sorts in turn, in the three wordings (``unique``: words no other
    task has); a task succeeds only on its sort's kind."""
    for i in range(n):
        label, good = SORTS[i % 2]
        description = _unique(i) if unique else WORDINGS[i % 3]
        task = TaskRecord(id=f"t-{i}", description=description, labels=[label])
        _route(planner, task, good)


def _unique(i: int) -> str:
    stem = chr(97 + i % 26) + chr(97 + i // 26 % 26)
    return f"{stem}ton {stem}mar {stem}vel"


def _belief(planner: CoordinationPlanner, labels: list[str]) -> dict[str, float]:
    explained = planner.explain(UNSEEN, labels=labels)
    return {kind: k["parts"]["model"] for kind, k in explained["kinds"].items()}


# --- the wire ---------------------------------------------------------------------------------


def test_a_submission_takes_up_to_eight_labels_of_the_protocols_label_rule() -> None:
    spec = protocol.TaskSubmit(description="Fix the login", labels=["bug", "team:auth"])
    assert spec.labels == ["bug", "team:auth"]
    plain = protocol.TaskSubmit(description="Fix the login")
    assert plain.labels == []
    # Left out of the message when empty: the coordinator before labels takes it.
    assert "labels" not in plain.model_dump(mode="json")
    assert spec.model_dump(mode="json")["labels"] == ["bug", "team:auth"]
    for bad in (["two words"], [""], ["x" * 65], [f"l{i}" for i in range(9)], "bug"):
        with pytest.raises(ValidationError, match="labels"):
            protocol.TaskSubmit(description="Fix the login", labels=bad)


def test_task_labels_checks_and_keeps_each_label_once() -> None:
    # Whatever its case, the first spelling kept; repeats do not count towards the limit.
    assert protocol.task_labels(["Bug", "ui", "bug", "BUG"]) == ["Bug", "ui"]
    assert protocol.TaskSubmit(description="x", labels=["bug"] * 9).labels == ["bug"]
    assert protocol.task_labels([]) == []
    with pytest.raises(ValueError, match="at most 8 labels, not 9"):
        protocol.task_labels([f"l{i}" for i in range(9)])
    with pytest.raises(ValueError, match="label 'two words'"):
        protocol.task_labels(["two words"])


# --- the router -------------------------------------------------------------------------------


def test_a_label_pools_what_tasks_written_other_ways_taught() -> None:
    planner = CoordinationPlanner(32, config=default_routing_config(), clock=lambda: NOW,
                                  rng=random.Random(3))
    _teach(planner)
    # A label matches without regard to case, and tells the two sorts apart in a wording
    # never seen; the text alone cannot.
    assert "l:payments" in planner.explain(UNSEEN, labels=["PAYMENTS"])["contexts"]["names"]
    without = _belief(planner, [])
    for label, good in SORTS:
        with_label = _belief(planner, [label.lower()])
        assert with_label[good] == max(with_label.values()), (label, with_label)
        assert with_label[good] > without[good] + 0.1, (label, with_label, without)
    # A label never seen reads nothing; labels are one part of a task, so eight never seen
    # widen the exploration no more than one.
    assert _belief(planner, ["billing"]) == without
    spread = [planner.explain(UNSEEN, labels=labels)["kinds"]["inventory"]["parts"][
        "exploration"] for labels in ([], ["new"], [f"new{i}" for i in range(8)])]
    assert spread[0] < spread[1] == spread[2], spread
    planner.close()


def test_a_labelled_tasks_update_carries_its_labels_and_a_standby_learns_the_same() -> None:
    leader = CoordinationPlanner(32, config=default_routing_config(), clock=lambda: NOW,
                                 rng=random.Random(4))
    shipped: list[dict[str, object]] = []
    leader.outcome_hook = lambda update: shipped.append(json.loads(json.dumps(
        update.to_dict())))
    _teach(leader, n=12)
    standby = CoordinationPlanner(32, config=default_routing_config(), clock=lambda: NOW)
    for n, data in enumerate(shipped):
        assert data["labels"] == [SORTS[n % 2][0]]
        standby.apply_outcome(LearningUpdate.from_dict(data))
    assert sorted(standby.learner.model.rows()) == sorted(leader.learner.model.rows())
    assert _belief(standby, ["Payments"]) == _belief(leader, ["Payments"])
    leader.close()
    standby.close()


def test_an_update_without_labels_reads_as_the_version_before_them() -> None:
    update = LearningUpdate(task_id="t", attempt=1, at=NOW, description="Fix it", kind="cicd",
                            success=True, keywords=("fix",))
    data = update.to_dict()
    assert "labels" not in data  # a coordinator without labels still reads it
    assert LearningUpdate.from_dict(data) == update
    labelled = LearningUpdate.from_dict({**data, "labels": ["bug"]})
    assert labelled.labels == ("bug",) and labelled.to_dict()["labels"] == ["bug"]
    for bad in ("bug", [1], None):
        with pytest.raises(ValueError, match="'labels' must be a list of strings"):
            LearningUpdate.from_dict({**data, "labels": bad})


# --- the decision log and replay --------------------------------------------------------------


def _store_from_before_labels(path: Path) -> Path:
    """The decision log as stores written before labels have it, with one logged decision."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE decisions (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL, at REAL NOT NULL, policy TEXT NOT NULL,
            reason TEXT NOT NULL, description TEXT NOT NULL, candidates TEXT NOT NULL,
            kind TEXT NOT NULL, propensity REAL NOT NULL, confidence REAL NOT NULL,
            outcome INTEGER, ended_at REAL);
        INSERT INTO decisions (task_id, attempt, at, policy, reason, description, candidates,
            kind, propensity, confidence, outcome, ended_at) VALUES ('old', 1, 1.0, 'bandit',
            'confident', 'Deploy it', '{"cicd":{"p":0.8}}', 'cicd', 0.9, 0.8, 1, 2.0);
    """)
    db.commit()
    db.close()
    return path


def test_replay_reads_a_store_from_before_labels_without_changing_it(tmp_path: Path) -> None:
    old = _store_from_before_labels(tmp_path / "old.sqlite3")
    estimate = replay(old, default_routing_config())  # opens it read-only
    assert estimate["decisions"] == 1 and estimate["logged"]["estimate"] == 1.0


def test_the_decision_log_keeps_labels_and_a_store_from_before_them_is_read(
    tmp_path: Path,
) -> None:
    old = _store_from_before_labels(tmp_path / "old.sqlite3")
    planner = CoordinationPlanner(32, config=default_routing_config(), store_path=old,
                                  clock=lambda: NOW, rng=random.Random(5))
    _route(planner, TaskRecord(id="new", description=WORDINGS[0], labels=["bug", "ui"]),
           "inventory")
    planner.close()
    db = sqlite3.connect(old)
    rows = {d.task_id: d for d in read_log(db)}
    db.close()
    assert rows["old"].labels == () and rows["old"].kind == "cicd"
    assert rows["new"].labels == ("bug", "ui")


def test_replay_reads_each_decisions_labels(tmp_path: Path) -> None:
    store = tmp_path / "r.sqlite3"
    planner = CoordinationPlanner(32, config=default_routing_config(), store_path=store,
                                  clock=lambda: NOW, rng=random.Random(6))
    _teach(planner, n=60, unique=True)
    planner.close()
    with_labels = replay(store, default_routing_config())
    db = sqlite3.connect(store)
    db.execute("UPDATE decisions SET labels = ''")
    db.commit()
    db.close()
    without = replay(store, default_routing_config())
    assert with_labels["decisions"] == without["decisions"] == 60
    # Replayed with its labels, the configuration tells the two sorts apart as the logged
    # policy did, and agrees with its choices more.
    assert with_labels["agreement"] > without["agreement"] + 0.2, (with_labels, without)
