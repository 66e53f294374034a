"""CoordinationPlanner: hard constraints, confidence, selection, load balancing, learning,
fallback chains, metrics and explain."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.coordinator.state import AgentLiveness, AgentRecord
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.config import (
    RoutingConfig,
    default_routing_config,
    parse_routing_config,
)
from coordinator_agent.routing.planner import (
    CoordinationPlanner,
    FallbackAction,
    FallbackStep,
    RoutingDecision,
    matches,
)

CAP = 4
KINDS = ("development", "security", "cicd", "documentation", "inventory", "general")
CVE = "Scan repository for CVE-2024-12345 vulnerability"
_ids = itertools.count()


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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


def _fleet(kinds: Sequence[str] = KINDS, per_kind: int = 2) -> list[AgentRecord]:
    return [_agent(f"{kind}-{i}", kind) for kind in kinds for i in range(per_kind)]


def _task(description: str = "d", kind: str | None = None, caps: Sequence[str] = (),
          max_retries: int = 2) -> TaskRecord:
    return TaskRecord(id=f"t-{next(_ids)}", description=description, kind=kind,
                      required_capabilities=list(caps), max_retries=max_retries)


def _end(task: TaskRecord, agent_id: str, outcome: AttemptOutcome) -> Attempt:
    attempt = Attempt(len(task.attempts) + 1, agent_id, 0.0, 10.0, outcome=outcome)
    task.attempts.append(attempt)
    return attempt


def _config(extra: str = "") -> RoutingConfig:
    """The packaged vocabulary with the seed's formula and some top-level settings replaced.

    These tests pin the seed policy's arithmetic; the bandit policy has test_bandit.py.
    """
    base = default_routing_config().model_dump(mode="json")
    base["policy"] = "seed"
    base.update(parse_routing_config("kinds: {x: {}}\n" + extra).model_dump(
        mode="json", exclude_unset=True, exclude={"kinds"}))
    return RoutingConfig.model_validate(base)


def _route_and_learn(planner: CoordinationPlanner, agents: list[AgentRecord],
                     description: str, success: bool | None = None,
                     fail_kind: str | None = None) -> RoutingDecision:
    """Route one task and report its first attempt: success given, or failure for fail_kind."""
    task = _task(description)
    decision = planner.select(task, agents)
    assert decision.agent is not None
    ok = success if success is not None else decision.kind != fail_kind
    _end(task, decision.agent.id, AttemptOutcome.SUCCEEDED if ok else AttemptOutcome.FAILED)
    planner.record_outcome(task, decision.agent, ok)
    return decision


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def planner(clock: Clock) -> Iterator[CoordinationPlanner]:
    p = CoordinationPlanner(in_flight_cap=CAP, config=_config(), clock=clock,
                            rng=random.Random(1))
    yield p
    p.close()


# --- hard constraints, health, capacity -----------------------------------------------------


def test_matches() -> None:
    agent = _agent("a", kind="development", capabilities=["python", "git"])
    assert matches(_task(), agent)
    assert matches(_task(kind="development"), agent)
    assert matches(_task(caps=["python", "git"]), agent)
    assert not matches(_task(kind="research"), agent)
    assert not matches(_task(caps=["python", "gpu"]), agent)


def test_default_construction_uses_packaged_vocabulary_and_memory_store() -> None:
    p = CoordinationPlanner(CAP)
    try:
        assert p.config == default_routing_config()
        assert p.store.path is None
        assert p.config.policy.value == "bandit"
        # The default policy samples: the kind it most likely takes is what explain names.
        assert p.explain(CVE, _fleet())["kind"] == "security"
        assert p.select(_task(CVE), _fleet()).agent is not None
    finally:
        p.close()


def test_explicit_kind_is_a_hard_constraint(planner: CoordinationPlanner) -> None:
    agents = _fleet(("security", "inventory"))
    decision = planner.select(_task(CVE, kind="inventory"), agents)
    assert decision.agent is not None and decision.agent.kind == "inventory"
    assert decision.reason == "explicit_kind"
    assert not decision.fallback_used


def test_required_capabilities_filter_before_scoring(planner: CoordinationPlanner) -> None:
    agents = [_agent("sec", "security", ["scanner"]), _agent("dev", "development", ["gpu"]),
              _agent("dev-busy", "development", ["gpu", "scanner"], in_flight=3)]
    decision = planner.select(_task(CVE, caps=["gpu"]), agents)
    assert decision.agent is not None and decision.agent.id == "dev"
    assert [a["kind"] for a in decision.details["alternatives"]] == []
    decision = planner.select(_task(CVE, caps=["gpu", "scanner"]), agents)
    assert decision.agent is not None and decision.agent.id == "dev-busy"


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
    assert planner.select(_task(), [sick, healthy]).agent is healthy
    assert planner.select(_task(), [sick]).reason == "no_free_agent"


def test_skips_agent_reporting_draining(planner: CoordinationPlanner) -> None:
    draining = _agent("d", reported_state="draining")
    assert planner.select(_task(), [draining]) == RoutingDecision(None, "no_free_agent")


def test_skips_full_agents(planner: CoordinationPlanner) -> None:
    full = _agent("full", max_concurrency=2, in_flight=2)
    capped = _agent("capped", max_concurrency=100, in_flight=CAP)  # at the coordinator's cap
    decision = planner.select(_task(), [full, capped])
    assert decision.agent is None and decision.reason == "no_free_agent"
    roomy = _agent("roomy", max_concurrency=1, in_flight=0)
    assert planner.select(_task(), [full, capped, roomy]).agent is roomy


def test_changes_to_agents_between_decisions_are_seen(planner: CoordinationPlanner) -> None:
    # The same records, changed in place between two decisions (as heartbeats and
    # assignments do): the grouping may be reused, the chosen agent is still checked live.
    a, b = _agent("a"), _agent("b", in_flight=1)
    agents = [a, b]
    assert planner.select(_task(), agents).agent is a
    a.in_flight = {"x", "y"}
    assert planner.select(_task(), agents).agent is b
    b.liveness = AgentLiveness.DEAD
    assert planner.select(_task(), agents).agent is a
    a.in_flight = {"x", "y", "z", "w"}
    assert planner.select(_task(), agents).agent is None


@pytest.mark.parametrize("change", ["died", "changed_kind"])
def test_a_stale_grouping_is_redone_at_once(planner: CoordinationPlanner, change: str) -> None:
    sec, dev = _agent("sec", "security"), _agent("dev", "development")
    agents = [sec, dev]
    assert planner.select(_task(CVE), agents).agent is sec
    # Changed in place, as the liveness sweep or a heartbeat does: the cached grouping still
    # has sec as the only security agent; the live check catches it and the fleet is regrouped.
    if change == "died":
        sec.liveness = AgentLiveness.DEAD
    else:
        sec.kind = "documentation"
    decision = planner.select(_task(CVE), agents)
    assert decision.agent is dev and decision.kind == "development"


# --- load balancing -------------------------------------------------------------------------


def test_picks_least_loaded(planner: CoordinationPlanner) -> None:
    agents = [_agent("busy", in_flight=3), _agent("half", in_flight=2),
              _agent("light", in_flight=1)]
    for _ in range(20):
        decision = planner.select(_task(), agents)
        assert decision.agent is not None and decision.agent.id == "light"
        assert decision.details["candidates"] == 3


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


def test_power_of_two_choices(clock: Clock) -> None:
    p = CoordinationPlanner(CAP, config=_config("balance: two_choices"), clock=clock,
                            rng=random.Random(3))
    agents = [_agent(f"a{i}", max_concurrency=4, in_flight=i % 4) for i in range(40)]
    agents.append(_agent("full", max_concurrency=4, in_flight=4))
    picked = []
    for _ in range(400):
        decision = p.select(_task(), agents)
        assert decision.agent is not None
        picked.append(decision.agent)
    assert all(a.id != "full" for a in picked)
    # Of two random agents the less loaded wins: load-3 agents only win against each other.
    loads = [len(a.in_flight) for a in picked]
    assert loads.count(0) > loads.count(1) > loads.count(2) > loads.count(3)
    assert len({a.id for a in picked}) > 10  # spread, not always the single least loaded
    p.close()


@pytest.mark.parametrize(
    "outcome", [AttemptOutcome.FAILED, AttemptOutcome.TIMEOUT, AttemptOutcome.AGENT_LOST],
)
def test_prefers_agents_that_have_not_failed_the_task(
    planner: CoordinationPlanner, outcome: AttemptOutcome
) -> None:
    failed_before = _agent("failed-before", in_flight=0)
    fresh = _agent("fresh", in_flight=3)  # much busier, still preferred
    task = _task()
    _end(task, "failed-before", outcome)
    for _ in range(10):
        assert planner.select(task, [failed_before, fresh]).agent is fresh


def test_falls_back_to_agent_that_failed_when_no_other(planner: CoordinationPlanner) -> None:
    only = _agent("only")
    busy_other = _agent("other", max_concurrency=1, in_flight=1)
    task = _task()
    _end(task, "only", AttemptOutcome.FAILED)
    assert planner.select(task, [only, busy_other]).agent is only


# --- confidence and the choice of kind -------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "kind"),
    [
        (CVE, "security"),
        ("Deploy release 2.3 to staging", "cicd"),
        ("Refactor the payment module", "development"),
        ("Write the README section on installation", "documentation"),
        ("List all servers and their installed software licenses", "inventory"),
    ],
)
def test_examples_route_to_their_kind(
    planner: CoordinationPlanner, description: str, kind: str
) -> None:
    decision = planner.select(_task(description), _fleet())
    assert decision.kind == kind
    assert decision.agent is not None and decision.agent.kind == kind
    assert decision.confidence == pytest.approx(0.8)  # 0.5 + 0.2 domain + 0.1 complexity
    assert decision.reason == "confident"
    assert not decision.fallback_used


def test_confidence_parts_follow_the_formula(planner: CoordinationPlanner) -> None:
    agents = [_agent("sec", "security", in_flight=1),  # workload 1/4
              _agent("doc", "documentation", in_flight=2)]  # workload 2/4
    task = _task("Redesign the security architecture of the distributed platform")
    decision = planner.select(task, agents)
    parts = task.routing["parts"]
    assert decision.kind == "security"
    assert parts["domain"] == 1.0 and parts["complexity"] == 1.0
    assert parts["workload"] == 0.25 and parts["pattern"] == 0.0
    assert task.routing["confidence"] == pytest.approx(0.5 + 0.2 + 0.1 - 0.1 * 0.25)
    # Documentation does not take high-complexity work: no complexity part.
    scores = {s.kind: s for s in planner.score_kinds(
        planner.analyzer.analyze(task.description), {"documentation": 0.5})}
    assert scores["documentation"].complexity == 0.0
    assert scores["documentation"].confidence == pytest.approx(0.5 - 0.05)


def test_weights_are_configurable(clock: Clock) -> None:
    p = CoordinationPlanner(CAP, config=_config("weights: {domain: 0.0, workload: 0.5}"),
                            clock=clock)
    agents = [_agent("sec", "security", in_flight=2), _agent("dev", "development")]
    decision = p.select(_task(CVE), agents)
    assert decision.kind == "development"  # the domain no longer counts, the load does
    p.close()


def test_below_threshold_uses_the_fallback_kind(clock: Clock) -> None:
    p = CoordinationPlanner(CAP, config=_config("threshold: 0.9"), clock=clock)
    task = _task(CVE)
    decision = p.select(task, _fleet(("security", "general")))
    assert decision.kind == "general" and decision.fallback_used
    assert decision.reason == "below_threshold"
    assert task.routing["fallback_used"] is True
    assert "below the threshold 0.90" in task.routing["reason"]
    assert task.routing["alternatives"][0]["kind"] == "security"
    # No agent of the fallback kind: the best kind is taken rather than waiting forever.
    decision = p.select(_task(CVE), _fleet(("security", "development")))
    assert decision.kind == "security" and not decision.fallback_used
    assert decision.reason == "no_fallback_agent"
    p.close()


def test_a_busy_best_kind_is_waited_for(planner: CoordinationPlanner) -> None:
    sec = _agent("sec", "security", max_concurrency=1, in_flight=1)
    dev = _agent("dev", "development")
    decision = planner.select(_task(CVE), [sec, dev])
    assert decision.agent is None and decision.reason == "no_free_agent"
    assert decision.kind == "security"


def test_kinds_unknown_to_the_vocabulary_are_routed(planner: CoordinationPlanner) -> None:
    decision = planner.select(_task("count words"), [_agent("g", "crypto")])
    assert decision.agent is not None and decision.kind == "crypto"


def test_routing_is_recorded_on_task_and_json_able(planner: CoordinationPlanner) -> None:
    task = _task(CVE)
    decision = planner.select(task, _fleet())
    assert decision.agent is not None
    routing = json.loads(json.dumps(task.routing))
    assert routing["agent_id"] == decision.agent.id
    assert routing["kind"] == "security"
    assert routing["confidence"] == pytest.approx(0.8)
    assert set(routing["parts"]) == {"pattern", "evidence", "success_rate", "domain",
                                     "complexity", "workload", "raw"}
    assert routing["alternatives"][0] == {"kind": "development",
                                          "confidence": pytest.approx(0.6667, abs=1e-4)}
    assert len(routing["alternatives"]) == len(KINDS) - 1
    assert routing["analysis"]["keywords"] == ["scan", "repository", "cve", "vulnerability"]
    assert routing["fallback_used"] is False and routing["threshold"] == 0.6
    assert routing["chain"] == [{"attempt": 1, "kind": "security",
                                 "agent_id": decision.agent.id,
                                 "confidence": pytest.approx(0.8), "reason": "confident"}]
    assert decision.details is task.routing


# --- learning -------------------------------------------------------------------------------


def test_successes_raise_confidence_step_by_step_towards_a_bound(
    planner: CoordinationPlanner
) -> None:
    agents = [_agent("g", "general")]
    confidences = [_route_and_learn(planner, agents, "count words in the text", True).confidence
                   for _ in range(21)]
    steps = [b - a for a, b in itertools.pairwise(c or 0.0 for c in confidences)]
    assert confidences[0] == pytest.approx(0.6)  # unknown: neutral pattern
    assert all(step > 0 for step in steps)
    assert all(later < earlier for earlier, later in itertools.pairwise(steps))
    # 0.6 + 0.4 x 20 / (20 + 2): bounded by base + pattern + complexity weights.
    assert confidences[-1] == pytest.approx(0.6 + 0.4 * 20 / 22)
    assert confidences[-1] < 1.0


def test_repeated_failures_make_the_router_switch_kind(planner: CoordinationPlanner) -> None:
    agents = _fleet(("security", "development"))
    kinds = [_route_and_learn(planner, agents, CVE, fail_kind="security").kind
             for _ in range(6)]
    assert kinds[0] == "security"
    switched = kinds.index("development")
    assert switched <= 3
    assert set(kinds[switched:]) == {"development"}  # and it stays where it succeeds
    explained = planner.explain(CVE)
    assert explained["kinds"]["security"]["parts"]["pattern"] < 0
    assert explained["kinds"]["development"]["parts"]["pattern"] > 0


def test_learning_generalises_to_similar_descriptions(planner: CoordinationPlanner) -> None:
    agents = _fleet(("security", "development"))
    for _ in range(5):
        _route_and_learn(planner, agents, "Scan the billing service for leaked secrets",
                         fail_kind="security")
    similar = planner.explain("Scan the billing service for leaked passwords")
    unrelated = planner.explain("Audit firewall rules")
    assert similar["kinds"]["security"]["parts"]["pattern"] < 0
    assert similar["kinds"]["security"]["parts"]["evidence"] > 0
    assert unrelated["kinds"]["security"]["parts"]["pattern"] == 0.0


def test_old_outcomes_fade(planner: CoordinationPlanner, clock: Clock) -> None:
    agents = _fleet(("security",))
    for _ in range(4):
        _route_and_learn(planner, agents, CVE, fail_kind="security")
    fresh = planner.explain(CVE)["kinds"]["security"]["parts"]["pattern"]
    clock.now += 10 * planner.config.learning.half_life_s
    faded = planner.explain(CVE)["kinds"]["security"]["parts"]["pattern"]
    assert fresh < -0.5
    assert fresh < faded < 0
    assert faded > -0.01


def test_each_attempt_is_learned_once(planner: CoordinationPlanner) -> None:
    agents = [_agent("g", "general")]
    task = _task("count words")
    decision = planner.select(task, agents)
    _end(task, "g", AttemptOutcome.SUCCEEDED)
    for _ in range(3):
        planner.record_outcome(task, decision.agent, True)
    assert len(planner.store) == 1
    assert task.routing["learned"] == [1]


@pytest.mark.parametrize(
    "outcome", [AttemptOutcome.UNDELIVERABLE, AttemptOutcome.CANCELLED,
                AttemptOutcome.SUPERSEDED],
)
def test_attempts_that_say_nothing_about_the_kind_are_not_learned(
    planner: CoordinationPlanner, outcome: AttemptOutcome
) -> None:
    task = _task("count words")
    decision = planner.select(task, [_agent("g", "general")])
    _end(task, "g", outcome)
    planner.record_outcome(task, decision.agent, False)
    assert len(planner.store) == 0
    assert planner.snapshot()["first_tries"] == 0


def test_quality_and_duration_are_stored(planner: CoordinationPlanner) -> None:
    task = _task("count words")
    decision = planner.select(task, [_agent("g", "general")])
    _end(task, "g", AttemptOutcome.SUCCEEDED).duration_s = 9.0
    planner.record_outcome(task, decision.agent, True, quality=0.25)
    summary = planner.snapshot()["kinds"]["general"]
    assert summary["success_rate"] == pytest.approx(0.25)
    assert summary["mean_duration_s"] == pytest.approx(9.0)


def test_outcome_of_a_forgotten_agent_is_learned_from_the_recorded_chain(
    planner: CoordinationPlanner
) -> None:
    task = _task(CVE)
    planner.select(task, _fleet(("security",)))
    _end(task, "security-0", AttemptOutcome.TIMEOUT)
    planner.record_outcome(task, None, False)
    assert planner.snapshot()["kinds"]["security"]["success_rate"] == 0.0


def test_learning_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "routing.sqlite3"
    agents = _fleet(("security", "development"))
    first = CoordinationPlanner(CAP, store_path=path, clock=clock)
    for _ in range(5):
        _route_and_learn(first, agents, CVE, fail_kind="security")
    before = first.explain(CVE)
    snap = first.snapshot()
    first.close()

    second = CoordinationPlanner(CAP, store_path=path, clock=clock)
    assert second.explain(CVE)["kinds"] == before["kinds"]
    assert second.select(_task(CVE), agents).kind == "development"
    after = second.snapshot()
    assert after["first_tries"] == snap["first_tries"] == 5
    assert after["decisions"] == snap["decisions"] + 1
    second.close()


def test_decisions_without_outcomes_are_saved_on_close(tmp_path: Path) -> None:
    path = tmp_path / "routing.sqlite3"
    first = CoordinationPlanner(CAP, store_path=path)
    first.select(_task(CVE), _fleet(("security",)))
    first.close()
    second = CoordinationPlanner(CAP, store_path=path)
    second.explain(CVE)  # read-only: closing must not write anything back
    second.close()
    third = CoordinationPlanner(CAP, store_path=path)
    assert third.snapshot()["decisions"] == 1
    assert third.store.counters()["decisions"] == 1
    third.close()


# --- accuracy, metrics, explain --------------------------------------------------------------


def test_snapshot_accuracy_fallback_rate_and_confidence(clock: Clock) -> None:
    p = CoordinationPlanner(CAP, config=_config("threshold: 0.7"), clock=clock)
    agents = _fleet(("security", "general"))
    first = _route_and_learn(p, agents, CVE, True)  # security, 0.8
    second = _route_and_learn(p, agents, "count words", False)  # general by fallback, 0.6
    assert (first.confidence, second.confidence) == (pytest.approx(0.8), pytest.approx(0.6))
    retried = _task(CVE)
    d1 = p.select(retried, agents)
    _end(retried, d1.agent.id if d1.agent else "", AttemptOutcome.FAILED)
    p.record_outcome(retried, d1.agent, False)
    d2 = p.select(retried, agents)
    _end(retried, d2.agent.id if d2.agent else "", AttemptOutcome.SUCCEEDED)
    p.record_outcome(retried, d2.agent, True)
    snap = p.snapshot()
    assert snap["decisions"] == 4
    assert snap["first_tries"] == 3 and snap["first_try_successes"] == 1
    assert snap["accuracy"] == pytest.approx(1 / 3)
    assert snap["fallbacks"] == 1 and snap["fallback_rate"] == pytest.approx(0.25)
    confidences = [c or 0.0 for c in (first.confidence, second.confidence, d1.confidence,
                                        d2.confidence)]
    assert d1.confidence is not None and d1.confidence > 0.8  # security has succeeded once
    assert snap["average_confidence"] == pytest.approx(sum(confidences) / 4)
    assert snap["outcomes_stored"] == 4
    p.close()


def test_metrics_are_pushed(clock: Clock) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    p = CoordinationPlanner(CAP, config=_config("threshold: 0.7"), metrics=metrics, clock=clock)
    agents = _fleet(("security", "general"))
    _route_and_learn(p, agents, CVE, True)
    _route_and_learn(p, agents, "count words", False)
    value = registry.get_sample_value
    assert value("coordinator_routing_decisions_total",
                 {"kind": "security", "fallback": "false"}) == 1
    assert value("coordinator_routing_decisions_total",
                 {"kind": "general", "fallback": "true"}) == 1
    assert value("coordinator_routing_fallbacks_total", {"reason": "below_threshold"}) == 1
    assert value("coordinator_routing_confidence_count") == 2
    assert value("coordinator_routing_confidence_sum") == pytest.approx(1.4)
    snap = p.export_metrics()
    assert value("coordinator_routing_accuracy_ratio") == pytest.approx(0.5)
    assert value("coordinator_routing_fallback_ratio") == pytest.approx(0.5)
    assert value("coordinator_routing_confidence_average") == pytest.approx(0.7)
    assert value("coordinator_routing_kind_success_ratio", {"kind": "security"}) == 1.0
    assert value("coordinator_routing_kind_success_ratio", {"kind": "general"}) == 0.0
    assert snap["accuracy"] == pytest.approx(0.5)
    p.close()


def test_kind_labels_are_bounded(clock: Clock) -> None:
    registry = CollectorRegistry()
    config = parse_routing_config("kinds: {general: {}}\nmax_kind_labels: 2")
    p = CoordinationPlanner(CAP, config=config, metrics=Metrics(registry), clock=clock)
    for kind in ("alpha", "beta", "gamma"):
        _route_and_learn(p, [_agent(kind, kind)], "count words", True)
    p.export_metrics()
    value = registry.get_sample_value
    assert value("coordinator_routing_decisions_total", {"kind": "alpha", "fallback": "false"})
    assert value("coordinator_routing_decisions_total", {"kind": "other", "fallback": "false"})
    assert value("coordinator_routing_decisions_total",
                 {"kind": "beta", "fallback": "false"}) is None
    assert value("coordinator_routing_kind_success_ratio", {"kind": "other"}) == 1.0
    p.close()


def test_explain_without_agents(planner: CoordinationPlanner) -> None:
    result = planner.explain(CVE)
    assert result["kind"] == "security"
    assert result["analysis"]["domains"] == ["security", "development"]
    assert result["analysis"]["domain_match"]["security"] == 1.0
    assert set(result["kinds"]) == set(KINDS)
    assert result["kinds"]["security"]["confidence"] == pytest.approx(0.8)
    assert result["alternatives"][0] == "development"
    assert "agent" not in result
    json.dumps(result)


def test_explain_with_agents_has_no_side_effects(planner: CoordinationPlanner) -> None:
    agents = [_agent("sec-busy", "security", in_flight=2), _agent("sec", "security")]
    result = planner.explain(CVE, agents)
    assert result["kind"] == "security" and result["agent"] == "sec"
    assert set(result["kinds"]) == {"security"}
    assert planner.snapshot()["decisions"] == 0
    none = planner.explain(CVE, agents, required_capabilities=["gpu"])
    assert none["kind"] is None and none["agent"] is None
    assert none["reason"] == "no_matching_agent"
    assert planner.explain(CVE, kind="cicd")["kind"] == "cicd"


# --- fallback chains ------------------------------------------------------------------------


def _fail_current(planner: CoordinationPlanner, task: TaskRecord,
                  agents: list[AgentRecord], outcome: AttemptOutcome) -> FallbackStep:
    decision = planner.select(task, agents)
    assert decision.agent is not None
    _end(task, decision.agent.id, outcome)
    planner.record_outcome(task, decision.agent, False)
    return planner.next_step(task)


def test_fallback_chain_retry_then_alternative_then_escalate(clock: Clock) -> None:
    registry = CollectorRegistry()
    config = _config("retry: {max_retries: 2, backoff_base_s: 1, backoff_max_s: 1.5, "
                     "max_alternatives: 1}")
    p = CoordinationPlanner(CAP, config=config, metrics=Metrics(registry), clock=clock)
    agents = _fleet(("security", "development", "cicd"), per_kind=3)
    task = _task(CVE, max_retries=7)

    steps = [_fail_current(p, task, agents, AttemptOutcome.FAILED) for _ in range(3)]
    assert [(s.action, s.kind) for s in steps] == [
        (FallbackAction.RETRY, "security"), (FallbackAction.RETRY, "security"),
        (FallbackAction.ALTERNATIVE, "development")]
    assert [s.delay_s for s in steps] == [1.0, 1.5, 0.0]  # exponential, capped
    assert [e["kind"] for e in task.routing["chain"]] == ["security"] * 3

    # The next decision follows the chain, even though security still scores first.
    step = _fail_current(p, task, agents, AttemptOutcome.TIMEOUT)
    assert task.routing["kind"] == "development"
    assert task.routing["chain"][-1]["reason"] == "fallback_chain"
    assert step == FallbackStep(FallbackAction.RETRY, "development", 1.0, step.reason)
    # No alternative is left (max_alternatives: 1): the rest of the task's budget (8
    # attempts) goes to development, then the chain escalates.
    rest = [_fail_current(p, task, agents, AttemptOutcome.FAILED) for _ in range(4)]
    assert [(s.action, s.kind) for s in rest[:3]] == [(FallbackAction.RETRY, "development")] * 3
    assert "no other kind is left" in rest[2].reason
    step = rest[3]
    assert step.action is FallbackAction.ESCALATE and step.kind is None
    assert "retries" in step.reason and len(task.attempts) == 8
    assert task.routing["escalated"] == step.reason
    assert registry.get_sample_value("coordinator_escalations_total") == 1
    assert registry.get_sample_value("coordinator_routing_fallbacks_total",
                                     {"reason": "alternative"}) == 1
    p.close()


def test_the_task_budget_bounds_the_chain(planner: CoordinationPlanner) -> None:
    agents = _fleet(("security", "development"))
    task = _task(CVE, max_retries=1)
    assert _fail_current(planner, task, agents, AttemptOutcome.FAILED).action is (
        FallbackAction.RETRY)
    step = _fail_current(planner, task, agents, AttemptOutcome.FAILED)
    assert step.action is FallbackAction.ESCALATE
    assert "retries" in step.reason
    assert not planner.should_retry(task)


def test_explicit_kind_has_no_alternatives(planner: CoordinationPlanner) -> None:
    agents = _fleet(("security", "development"))
    task = _task(CVE, kind="security", max_retries=5)
    assert _fail_current(planner, task, agents, AttemptOutcome.FAILED).action is (
        FallbackAction.RETRY)
    steps = [_fail_current(planner, task, agents, AttemptOutcome.FAILED) for _ in range(5)]
    # Never another kind: the task's own retries all go to security, then it escalates.
    assert [(s.action, s.kind) for s in steps[:4]] == [(FallbackAction.RETRY, "security")] * 4
    assert "no other kind" in steps[3].reason
    assert steps[4].action is FallbackAction.ESCALATE


def test_undeliverable_is_retried_at_once(planner: CoordinationPlanner) -> None:
    task = _task(CVE)
    step = _fail_current(planner, task, _fleet(("security",)), AttemptOutcome.UNDELIVERABLE)
    assert step == FallbackStep(FallbackAction.RETRY, "security", 0.0, step.reason)


def test_should_retry(planner: CoordinationPlanner) -> None:
    task = TaskRecord(id="t", description="d", max_retries=1)
    assert planner.should_retry(task)
    _end(task, "a", AttemptOutcome.FAILED)
    assert planner.should_retry(task)
    _end(task, "b", AttemptOutcome.FAILED)
    assert not planner.should_retry(task)
    _end(task, "c", AttemptOutcome.UNDELIVERABLE)
    assert not planner.should_retry(task)


# --- a custom router still replaces the learned choice ------------------------------------


def test_custom_router_is_used() -> None:
    seen: list[tuple[str, list[str]]] = []
    outcomes: list[bool] = []

    class LastRouter:
        def choose(self, task: TaskRecord, candidates: Sequence[AgentRecord]) -> RoutingDecision:
            seen.append((task.id, [a.id for a in candidates]))
            return RoutingDecision(candidates[-1], "custom", {"score": 1.0})

        def record_outcome(self, task: TaskRecord, agent: AgentRecord | None,
                           success: bool) -> None:
            outcomes.append(success)

    planner = CoordinationPlanner(CAP, router=LastRouter())
    task = _task()
    decision = planner.select(task, [_agent("a"), _agent("b", liveness=AgentLiveness.DEAD),
                                     _agent("c")])
    assert decision.agent is not None and decision.agent.id == "c"
    assert seen == [(task.id, ["a", "c"])]
    assert task.routing == {"agent_id": "c", "reason": "custom", "score": 1.0}
    _end(task, "c", AttemptOutcome.SUCCEEDED)
    planner.record_outcome(task, decision.agent, True)
    assert outcomes == [True]
    planner.close()


def test_a_lost_agent_is_retried_without_backoff(planner: CoordinationPlanner) -> None:
    agents = _fleet(("security", "development"))
    step = _fail_current(planner, _task(CVE), agents, AttemptOutcome.AGENT_LOST)
    assert (step.action, step.delay_s) == (FallbackAction.RETRY, 0.0)
    step = _fail_current(planner, _task(CVE), agents, AttemptOutcome.TIMEOUT)
    assert step.action is FallbackAction.RETRY and step.delay_s > 0


def test_drop_caches_forgets_every_description_of_a_flood(planner: CoordinationPlanner) -> None:
    agents = [_agent("a", kind="development"), _agent("b", kind="research")]
    for i in range(300):
        planner.select(_task(description=f"fix the python build {i} for release r{i}"), agents)
    analyzer, prior = planner.analyzer, planner.learner.text_prior
    assert len(analyzer._stems) >= 300  # a number per task, as in a flood
    planner.drop_caches()
    assert not analyzer._stems and not prior._cache and not prior._stems
    # Routing is unchanged: the caches refill on use.
    assert planner.select(_task(description="fix the python build"), agents).agent is not None
