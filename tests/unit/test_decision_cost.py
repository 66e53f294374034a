"""What a routing decision did besides deciding (the planner's ``work``), the warm-up that keeps
the text prior off the first decision, and how slow decisions are timed, counted and logged."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.coordinator.state import AgentRecord, FleetLog
from coordinator_agent.coordinator.tasks import TaskRecord
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.config import Policy, default_routing_config
from coordinator_agent.routing.decision_cost import DecisionCost, DecisionWork, slow_cause
from coordinator_agent.routing.planner import CoordinationPlanner

CAP = 4


def _planner(tmp_path: Path, policy: Policy = Policy.BANDIT) -> CoordinationPlanner:
    config = default_routing_config().model_copy(update={"policy": policy})
    return CoordinationPlanner(CAP, config=config, store_path=tmp_path / "routing.sqlite3")


def _agents(n: int) -> dict[str, AgentRecord]:
    return {f"ag-{i}": AgentRecord(f"ag-{i}", "general", frozenset(), 2) for i in range(n)}


def test_the_first_decision_builds_the_text_prior_unless_warmed_up(tmp_path: Path) -> None:
    agents = list(_agents(3).values())
    cold = _planner(tmp_path / "cold")
    cold.select(TaskRecord(id="t1", description="scan the repository"), agents)
    assert cold.work.prior_built
    cold.select(TaskRecord(id="t2", description="scan the repository"), agents)
    assert not cold.work.prior_built  # built once

    warm = _planner(tmp_path / "warm")
    warm.warm_up()
    assert warm.learner.prior_ready
    warm.select(TaskRecord(id="t3", description="scan the repository"), agents)
    assert not warm.work.prior_built
    for planner in (cold, warm):
        planner.close()


def test_the_seed_policy_needs_no_text_prior(tmp_path: Path) -> None:
    planner = _planner(tmp_path, Policy.SEED)
    planner.warm_up()
    assert not planner.learner.prior_ready
    planner.close()


def test_work_says_regrouped_folded_and_view_built(tmp_path: Path) -> None:
    agents = _agents(50)
    log = FleetLog(agents)
    planner = _planner(tmp_path)
    planner.fleet_log = log
    planner.warm_up()

    def decide(task_id: str, kind: str | None = None) -> DecisionWork:
        task = TaskRecord(id=task_id, description="tidy the docs", kind=kind)
        planner.select(task, agents.values(), fleet_version=log.version)
        w = planner.work
        return DecisionWork(w.regrouped, w.folded, w.view_built, w.prior_built)

    assert decide("t1") == DecisionWork(regrouped=50)  # the first grouping (with its plain view)
    assert decide("t2") == DecisionWork()  # nothing changed: nothing but the decision
    for agent_id in ("ag-1", "ag-2", "ag-1"):
        log.changed(agent_id)
    assert decide("t3") == DecisionWork(folded=3)  # repeats included
    assert decide("t4", kind="general") == DecisionWork(view_built=True)  # a new constraint
    assert decide("t5", kind="general") == DecisionWork()
    planner.close()


def test_the_decision_that_fills_the_log_buffer_says_it_wrote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from coordinator_agent.routing import decisions

    monkeypatch.setattr(decisions, "MAX_PENDING", 3)
    agents = list(_agents(5).values())
    planner = _planner(tmp_path)
    planner.warm_up()
    written = []
    for n in range(6):
        planner.select(TaskRecord(id=f"t{n}", description="tidy the docs"), agents)
        written.append(planner.work.log_written)
    assert written == [False, False, True, False, False, True]
    assert len(planner.decisions) == 6  # written, not lost
    planner.close()


@pytest.mark.parametrize(("work", "gcs", "wall", "cpu", "cause"), [
    (DecisionWork(prior_built=True, regrouped=9), 1, 0.05, 0.04, "text_prior"),
    (DecisionWork(regrouped=10_000, view_built=True), 1, 0.03, 0.03, "regroup"),
    (DecisionWork(log_written=True), 1, 0.03, 0.01, "log_write"),
    (DecisionWork(folded=3), 2, 0.004, 0.004, "gc"),
    (DecisionWork(view_built=True), 0, 0.002, 0.002, "view"),
    (DecisionWork(folded=3), 0, 0.005, 0.0004, "waited_for_cpu"),
    (DecisionWork(folded=3), 0, 0.005, 0.0004, "blocked"),
    (DecisionWork(folded=3), 0, 0.002, 0.0018, "fold"),
    (DecisionWork(), 0, 0.002, 0.0019, "scoring"),
])
def test_slow_cause(work: DecisionWork, gcs: int, wall: float, cpu: float, cause: str) -> None:
    assert slow_cause(work, gcs, wall, cpu, blocked=cause == "blocked") == cause


def test_a_decision_that_sleeps_is_blocked_not_waiting_for_a_cpu() -> None:
    registry = CollectorRegistry()
    cost = DecisionCost(Metrics(registry))
    cost.begin()
    time.sleep(0.01)  # off the CPU of its own accord, as a read from the disk would be
    assert cost.end(DecisionWork(), agents=1) >= 0.01
    # Only Linux counts a thread's context switches; elsewhere a long wait reads as preempted.
    cause = "blocked" if sys.platform.startswith("linux") else "waited_for_cpu"
    assert registry.get_sample_value("coordinator_dispatch_decision_slow_total",
                                     {"cause": cause}) == 1.0
    assert registry.get_sample_value("coordinator_dispatch_decision_cpu_seconds_bucket",
                                     {"le": "0.001"}) == 1.0  # it hardly ran


def test_slow_decisions_are_counted_by_cause_and_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    cost = DecisionCost(metrics, slow_s=0.0, log_every_s=3600.0)  # every decision is "slow"
    caplog.set_level(logging.INFO, logger="coordinator_agent.routing.decision_cost")
    for _ in range(3):
        cost.begin()
        assert cost.end(DecisionWork(regrouped=10_000), agents=10_000) > 0.0
    slow = registry.get_sample_value("coordinator_dispatch_decision_slow_total",
                                     {"cause": "regroup"})
    assert slow == 3.0
    assert registry.get_sample_value("coordinator_dispatch_decision_seconds_count") == 3.0
    assert registry.get_sample_value("coordinator_dispatch_decision_cpu_seconds_count") == 3.0
    lines = [r.getMessage() for r in caplog.records if "slow routing decision" in r.getMessage()]
    assert len(lines) == 1
    assert "(regroup)" in lines[0] and "10000 agents" in lines[0] and "regrouped 10000" in lines[0]

    cost.log_every_s = 0.0
    cost.begin()
    cost.end(DecisionWork(), agents=1)
    last = [r.getMessage() for r in caplog.records][-1]
    assert "2 more slow since the last such line" in last


def test_a_fast_decision_is_timed_but_not_counted_as_slow() -> None:
    registry = CollectorRegistry()
    cost = DecisionCost(Metrics(registry))  # 1 ms
    cost.begin()
    cost.end(DecisionWork(), agents=1)
    assert registry.get_sample_value("coordinator_dispatch_decision_seconds_count") == 1.0
    assert registry.get_sample_value("coordinator_dispatch_decision_seconds_bucket",
                                     {"le": "0.001"}) == 1.0
    assert registry.get_sample_value("coordinator_dispatch_decision_slow_total",
                                     {"cause": "scoring"}) is None
