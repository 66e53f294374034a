"""CoordinationPlanner: hard constraints, health, capacity, least loaded, retry preference."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from coordinator_agent.planner import (
    CoordinationPlanner,
    LeastLoadedRouter,
    RoutingDecision,
    matches,
)
from coordinator_agent.state import AgentLiveness, AgentRecord
from coordinator_agent.tasks import Attempt, AttemptOutcome, TaskRecord

CAP = 4


def _agent(
    agent_id: str,
    kind: str = "development",
    capabilities: Sequence[str] = ("python",),
    max_concurrency: int = 4,
    in_flight: int = 0,
    liveness: AgentLiveness = AgentLiveness.HEALTHY,
    reported_state: str = "ready",
) -> AgentRecord:
    record = AgentRecord(agent_id, kind, frozenset(capabilities), max_concurrency,
                         liveness=liveness, reported_state=reported_state)
    record.in_flight = {f"{agent_id}-task-{i}" for i in range(in_flight)}
    return record


def _task(kind: str | None = None, caps: Sequence[str] = ()) -> TaskRecord:
    return TaskRecord(id="t-1", description="d", kind=kind, required_capabilities=list(caps))


def _failed(task: TaskRecord, agent_id: str,
            outcome: AttemptOutcome = AttemptOutcome.FAILED) -> None:
    n = len(task.attempts) + 1
    task.attempts.append(Attempt(n, agent_id, 0.0, 10.0, outcome=outcome))


@pytest.fixture
def planner() -> CoordinationPlanner:
    return CoordinationPlanner(in_flight_cap=CAP)


def test_matches() -> None:
    agent = _agent("a", kind="development", capabilities=["python", "git"])
    assert matches(_task(), agent)
    assert matches(_task(kind="development"), agent)
    assert matches(_task(caps=["python", "git"]), agent)
    assert not matches(_task(kind="research"), agent)
    assert not matches(_task(caps=["python", "gpu"]), agent)


def test_filters_by_kind(planner: CoordinationPlanner) -> None:
    agents = [_agent("dev", kind="development"), _agent("res", kind="research")]
    decision = planner.select(_task(kind="research"), agents)
    assert decision.agent is not None
    assert decision.agent.id == "res"


def test_any_kind_when_task_has_none(planner: CoordinationPlanner) -> None:
    agents = [_agent("res", kind="research")]
    decision = planner.select(_task(), agents)
    assert decision.agent is agents[0]


def test_filters_by_required_capabilities(planner: CoordinationPlanner) -> None:
    agents = [
        _agent("py", capabilities=["python"], in_flight=0),
        _agent("gpu", capabilities=["python", "gpu"], in_flight=3),
    ]
    decision = planner.select(_task(caps=["gpu"]), agents)
    assert decision.agent is not None
    assert decision.agent.id == "gpu"  # busier, but the only one that can


def test_no_matching_agent(planner: CoordinationPlanner) -> None:
    agents = [_agent("a", kind="development"), _agent("b", capabilities=[])]
    decision = planner.select(_task(kind="development", caps=["gpu"]), agents)
    assert decision == RoutingDecision(None, "no_matching_agent")
    assert planner.select(_task(), []).reason == "no_matching_agent"


@pytest.mark.parametrize(
    "liveness", [AgentLiveness.SUSPECT, AgentLiveness.DEAD, AgentLiveness.DRAINING,
                 AgentLiveness.LEFT],
)
def test_skips_non_healthy_agents(planner: CoordinationPlanner, liveness: AgentLiveness) -> None:
    sick = _agent("sick", liveness=liveness)
    healthy = _agent("healthy", in_flight=3)
    decision = planner.select(_task(), [sick, healthy])
    assert decision.agent is healthy
    assert planner.select(_task(), [sick]).reason == "no_free_agent"


def test_skips_agent_reporting_draining(planner: CoordinationPlanner) -> None:
    draining = _agent("d", reported_state="draining")
    assert planner.select(_task(), [draining]) == RoutingDecision(None, "no_free_agent")


def test_skips_full_agents(planner: CoordinationPlanner) -> None:
    full = _agent("full", max_concurrency=2, in_flight=2)
    capped = _agent("capped", max_concurrency=100, in_flight=CAP)  # at the coordinator's cap
    decision = planner.select(_task(), [full, capped])
    assert decision.agent is None
    assert decision.reason == "no_free_agent"
    roomy = _agent("roomy", max_concurrency=1, in_flight=0)
    assert planner.select(_task(), [full, capped, roomy]).agent is roomy


def test_picks_least_loaded(planner: CoordinationPlanner) -> None:
    agents = [
        _agent("busy", max_concurrency=4, in_flight=3),
        _agent("half", max_concurrency=4, in_flight=2),
        _agent("light", max_concurrency=4, in_flight=1),
    ]
    for _ in range(20):  # ties are random; there is no tie here
        decision = planner.select(_task(), agents)
        assert decision.agent is not None
        assert decision.agent.id == "light"
        assert decision.reason == "least_loaded"
        assert decision.details == {"candidates": 3}


def test_load_is_relative_to_capacity(planner: CoordinationPlanner) -> None:
    small = _agent("small", max_concurrency=2, in_flight=1)  # 1/2
    big = _agent("big", max_concurrency=4, in_flight=1)  # 1/4
    assert planner.select(_task(), [small, big]).agent is big


def test_ties_are_spread(planner: CoordinationPlanner) -> None:
    agents = [_agent("a"), _agent("b"), _agent("c")]
    chosen = set()
    for _ in range(200):
        decision = planner.select(_task(), agents)
        assert decision.agent is not None
        chosen.add(decision.agent.id)
    assert chosen == {"a", "b", "c"}


def test_routing_is_recorded_on_task(planner: CoordinationPlanner) -> None:
    task = _task()
    agent = _agent("a")
    planner.select(task, [agent])
    assert task.routing == {"agent_id": "a", "reason": "least_loaded", "candidates": 1}


@pytest.mark.parametrize(
    "outcome", [AttemptOutcome.FAILED, AttemptOutcome.TIMEOUT, AttemptOutcome.AGENT_LOST],
)
def test_prefers_agents_that_have_not_failed_the_task(
    planner: CoordinationPlanner, outcome: AttemptOutcome
) -> None:
    failed_before = _agent("failed-before", in_flight=0)
    fresh = _agent("fresh", in_flight=3)  # much busier, still preferred
    task = _task()
    _failed(task, "failed-before", outcome)
    for _ in range(10):
        assert planner.select(task, [failed_before, fresh]).agent is fresh


def test_falls_back_to_agent_that_failed_when_no_other(planner: CoordinationPlanner) -> None:
    only = _agent("only")
    busy_other = _agent("other", max_concurrency=1, in_flight=1)
    task = _task()
    _failed(task, "only")
    decision = planner.select(task, [only, busy_other])
    assert decision.agent is only
    assert decision.details == {"candidates": 1}


def test_should_retry(planner: CoordinationPlanner) -> None:
    task = TaskRecord(id="t", description="d", max_retries=1)
    assert planner.should_retry(task)
    _failed(task, "a")
    assert planner.should_retry(task)
    _failed(task, "b")
    assert not planner.should_retry(task)
    _failed(task, "c", AttemptOutcome.UNDELIVERABLE)
    assert not planner.should_retry(task)


def test_custom_router_is_used() -> None:
    seen: list[tuple[str, list[str]]] = []
    outcomes: list[bool] = []

    class FirstRouter:
        def choose(self, task: TaskRecord, candidates: Sequence[AgentRecord]) -> RoutingDecision:
            seen.append((task.id, [a.id for a in candidates]))
            return RoutingDecision(candidates[-1], "custom", {"score": 1.0})

        def record_outcome(self, task: TaskRecord, agent: AgentRecord | None,
                           success: bool) -> None:
            outcomes.append(success)

    planner = CoordinationPlanner(CAP, router=FirstRouter())
    task = _task()
    decision = planner.select(task, [_agent("a"), _agent("b", liveness=AgentLiveness.DEAD),
                                     _agent("c")])
    assert decision.agent is not None
    assert decision.agent.id == "c"
    assert seen == [("t-1", ["a", "c"])]
    assert task.routing == {"agent_id": "c", "reason": "custom", "score": 1.0}
    planner.record_outcome(task, decision.agent, True)
    assert outcomes == [True]


def test_least_loaded_router_directly() -> None:
    router = LeastLoadedRouter(in_flight_cap=2)
    # Capacity is min(max_concurrency, cap): 1/2 vs 0/1.
    a = _agent("a", max_concurrency=10, in_flight=1)
    b = _agent("b", max_concurrency=1, in_flight=0)
    assert router.choose(_task(), [a, b]).agent is b
    assert router.record_outcome(_task(), a, True) is None
