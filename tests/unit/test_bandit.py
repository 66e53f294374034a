"""policy: bandit — the learned probability of success, Thompson sampling with a budget, the
decision log with propensities, offline replay, phases, and what survives a restart."""

from __future__ import annotations

import collections
import itertools
import random
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from coordinator_agent.cli.routing import _bandit_table
from coordinator_agent.coordinator.state import AgentRecord
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.routing.bandit import BanditModel, Calibrator, KindBelief, features
from coordinator_agent.routing.config import (
    BanditSettings,
    Exploration,
    Phases,
    RoutingConfig,
    default_routing_config,
    parse_routing_config,
)
from coordinator_agent.routing.decisions import read_log
from coordinator_agent.routing.phases import split_phases
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.routing.policy import ThompsonPolicy
from coordinator_agent.routing.replay import replay
from coordinator_agent.routing.surprise import SurpriseDetector
from coordinator_agent.routing.text_prior import TextPrior

KINDS = ("development", "security", "cicd", "documentation", "inventory", "general")
NOW = 1_767_225_600.0
_ids = itertools.count()


def _config(**bandit: object) -> RoutingConfig:
    base = default_routing_config()
    return base.model_copy(update={"bandit": base.bandit.model_copy(update=bandit)})


def _fleet(kinds: Sequence[str] = KINDS) -> list[AgentRecord]:
    return [AgentRecord(f"{kind}-1", kind, frozenset({"python"}), 64) for kind in kinds]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _route(planner: CoordinationPlanner, agents: list[AgentRecord], description: str,
           success: bool | dict[str, bool], *, kind: str | None = None) -> TaskRecord:
    task = TaskRecord(id=f"t-{next(_ids)}", description=description, kind=kind)
    decision = planner.select(task, agents)
    assert decision.agent is not None and decision.kind is not None
    ok = success if isinstance(success, bool) else success.get(decision.kind, False)
    task.attempts.append(Attempt(1, decision.agent.id, 0.0, 1.0, outcome=(
        AttemptOutcome.SUCCEEDED if ok else AttemptOutcome.FAILED)))
    planner.record_outcome(task, decision.agent, ok)
    return task


# --- the model --------------------------------------------------------------------------------


def test_the_text_prior_the_bandit_reads_is_a_smoothed_distribution() -> None:
    # The prior's own behaviour is tested in test_text_prior.py; this is the bandit's contract.
    prior = TextPrior(default_routing_config())
    probs = prior.probabilities("Scan the repository for a vulnerability")
    assert set(probs) == set(KINDS) and abs(sum(probs.values()) - 1) < 1e-9
    assert all(0 < p < 1 for p in probs.values())
    assert max(probs, key=probs.__getitem__) == "security"


def test_successes_raise_and_failures_lower_the_probability() -> None:
    model = BanditModel(prior_strength=2.0, window=1e6, half_life_s=1e9)
    feats = features(["deploy", "staging"], "cicd")
    start = model.belief("cicd", 0.5, feats, NOW).probability
    assert start == pytest.approx(0.5)
    for _ in range(20):
        model.update("cicd", 0.5, feats, True, NOW)
    high = model.belief("cicd", 0.5, feats, NOW)
    assert high.probability > 0.85 and high.successes > 0
    for _ in range(40):
        model.update("cicd", 0.5, feats, False, NOW)
    assert model.belief("cicd", 0.5, feats, NOW).probability < 0.45
    # Another kind learned nothing.
    assert model.belief("security", 0.5, feats, NOW).probability == pytest.approx(0.5)


def test_count_decay_follows_a_drop_within_a_window() -> None:
    def after_drop(window: float) -> int:
        model = BanditModel(prior_strength=2.0, window=window, half_life_s=1e12)
        feats = features(["deploy"], "cicd")
        rng = random.Random(3)
        for _ in range(300):
            model.update("cicd", 0.5, feats, rng.random() < 0.9, NOW)
        for n in range(1, 500):
            model.update("cicd", 0.5, feats, rng.random() < 0.3, NOW)
            if model.belief("cicd", 0.5, feats, NOW).probability < 0.5:
                return n
        return 500

    assert after_drop(40) < 40 < after_drop(1e9)


def test_predict_and_update_is_the_belief_before_and_the_update() -> None:
    """One pass gives what ``belief`` said just before the outcome and what ``update`` does,
    to the last bit; also across a rebase of the reference time."""
    rng = random.Random(8)
    fused = BanditModel(prior_strength=4.0, window=50.0, half_life_s=3600.0)
    plain = BanditModel(prior_strength=4.0, window=50.0, half_life_s=3600.0)
    words = ["deploy", "stage", "rollback", "cach", "test", "doc"]
    now = NOW
    for i in range(300):
        feats = features(rng.sample(words, rng.randint(0, 4)), ["k:cicd", f"v:{i % 3}"])
        prior, success = rng.uniform(0.2, 0.9), rng.random() < 0.6
        # Every 100th outcome comes 70 half-lives later: the model rebases its scale.
        now += 70 * 3600.0 if i % 100 == 99 else rng.uniform(0.0, 60.0)
        expected = plain.belief("cicd", prior, feats, now).probability
        rows = plain.update("cicd", prior, feats, success, now)
        assert fused.predict_and_update("cicd", prior, feats, success, now) == (expected, rows)
    assert list(fused.rows()) == list(plain.rows())


def test_time_decay_fades_evidence_back_to_the_prior() -> None:
    model = BanditModel(prior_strength=2.0, window=1e6, half_life_s=3600.0)
    feats = features(["deploy"], "cicd")
    for _ in range(30):
        model.update("cicd", 0.4, feats, True, NOW)
    fresh = model.belief("cicd", 0.4, feats, NOW).probability
    later = model.belief("cicd", 0.4, feats, NOW + 20 * 3600).probability
    assert fresh > 0.8 and later == pytest.approx(0.4, abs=0.01)


def test_seed_time_constant_is_configurable() -> None:
    config = parse_routing_config("kinds: {a: {}}\nlearning: {time_constant_s: 2592000}\n")
    assert config.learning.decay_half_life_s == pytest.approx(2592000 * 0.6931471805599453)


def test_calibrator_learns_a_monotone_map_and_starts_as_the_identity() -> None:
    calibrator = Calibrator()
    assert calibrator.apply(0.3) == pytest.approx(0.3)
    rng = random.Random(1)
    for _ in range(3000):  # the model is timid: what it calls 0.6 succeeds 80 % of the time
        p = rng.choice([0.2, 0.4, 0.6])
        calibrator.update(p, rng.random() < {0.2: 0.15, 0.4: 0.5, 0.6: 0.8}[p])
    mapped = [calibrator.apply(p) for p in (0.2, 0.4, 0.6)]
    assert mapped == sorted(mapped)
    assert mapped[2] == pytest.approx(0.8, abs=0.05) and mapped[0] == pytest.approx(0.15, abs=0.05)
    again = Calibrator()
    again.load(calibrator.state())
    assert again.apply(0.6) == calibrator.apply(0.6)


# --- the policy -------------------------------------------------------------------------------


def _belief(kind: str, mean: float, std: float) -> KindBelief:
    return KindBelief(kind, 0.5, mean, std, 0.0, 0.0)


def test_propensity_matches_the_frequency_of_choices() -> None:
    policy = ThompsonPolicy(BanditSettings(exploration_scale=1.0, exploration_budget=1.0,
                                           max_exploration_gap=1.0), "general")
    beliefs = [_belief("a", 0.5, 0.6), _belief("b", 0.2, 1.0), _belief("c", 0.0, 0.3)]
    dist = policy.distribution(beliefs)
    assert sum(dist.values()) == pytest.approx(1.0)
    rng = random.Random(5)
    counts = collections.Counter()
    for _ in range(20_000):
        policy.explore_share = 0.0  # keep the budget out of this measurement
        choice = policy.choose(beliefs, rng)
        assert choice.propensity == pytest.approx(dist[choice.kind], abs=1e-6)
        counts[choice.kind] += 1
    for kind, p in dist.items():
        assert counts[kind] / 20_000 == pytest.approx(p, abs=0.015)


def test_ties_are_not_broken_by_name() -> None:
    policy = ThompsonPolicy(BanditSettings(exploration="greedy"), "general")
    beliefs = [_belief("zeta", 0.3, 0.5), _belief("alpha", 0.3, 0.5)]
    rng = random.Random(1)
    picks = collections.Counter(policy.choose(beliefs, rng).kind for _ in range(2000))
    assert 800 < picks["zeta"] < 1200
    assert policy.distribution(beliefs) == {"zeta": 0.5, "alpha": 0.5}


def test_exploration_is_bounded_by_gap_and_budget() -> None:
    settings = BanditSettings(exploration_scale=1.0, exploration_budget=0.1,
                              max_exploration_gap=0.2)
    policy = ThompsonPolicy(settings, "general")
    # c is 0.5 below the best: never drawn.
    beliefs = [_belief("a", 0.0, 1.0), _belief("b", -0.1, 1.0), _belief("c", -3.0, 1.0)]
    rng = random.Random(2)
    choices = [policy.choose(beliefs, rng) for _ in range(5000)]
    assert not any(c.kind == "c" for c in choices)
    explored = sum(c.explored for c in choices[1000:]) / 4000
    assert explored <= 0.1 + 0.02
    greedy = ThompsonPolicy(settings.model_copy(update={"exploration_budget": 0.0}), "general")
    assert all(greedy.choose(beliefs, rng).kind == "a" for _ in range(200))


def test_fallback_only_when_no_kind_is_credible() -> None:
    policy = ThompsonPolicy(BanditSettings(credible=0.4), "general")
    rng = random.Random(0)
    low = [_belief("a", -2.0, 0.1), _belief("general", -3.0, 0.1)]
    assert policy.choose(low, rng).kind == "general"
    assert policy.distribution(low) == {"a": 0.0, "general": 1.0}
    credible = [_belief("a", 0.5, 0.1), _belief("general", -3.0, 0.1)]
    assert policy.choose(credible, rng).kind == "a"


# --- the planner ------------------------------------------------------------------------------


def test_hard_constraints_are_never_violated() -> None:
    planner = CoordinationPlanner(8, config=_config(exploration_scale=3.0,
                                                    exploration_budget=1.0,
                                                    max_exploration_gap=1.0),
                                  rng=random.Random(4))
    agents = [*_fleet(), AgentRecord("gpu-1", "development", frozenset({"gpu"}), 64)]
    for _ in range(200):
        task = TaskRecord(id=f"t-{next(_ids)}", description="Deploy the service",
                          required_capabilities=["gpu"])
        decision = planner.select(task, agents)
        assert decision.agent is not None and decision.agent.id == "gpu-1"
        explicit = TaskRecord(id=f"t-{next(_ids)}", description="Deploy the service",
                              kind="documentation")
        assert planner.select(explicit, agents).kind == "documentation"
    planner.close()


def test_router_learns_a_misleading_keyword() -> None:
    """'auth token' points the text at security, but these bugs succeed on development."""
    clock = Clock()
    planner = CoordinationPlanner(8, config=_config(), clock=clock, rng=random.Random(7))
    agents = _fleet()
    outcomes = {"development": True}
    services = ["billing", "orders", "search", "login", "checkout", "profile"]
    for i in range(150):
        clock.now += 60
        _route(planner, agents,
               f"Auth token header missing in the {services[i % 6]} service requests", outcomes)
    explained = planner.explain("Auth token header missing in the orders service requests")
    assert explained["kind"] == "development"
    dev = explained["kinds"]["development"]["parts"]
    sec = explained["kinds"]["security"]["parts"]
    assert sec["prior"] > dev["prior"]  # the text still points at security ...
    assert dev["probability"] > 0.8 and dev["successes"] > 0  # ... the evidence does not
    assert sec["probability"] < 0.3
    planner.close()


def test_decisions_are_logged_with_propensity_and_outcome(tmp_path: Path) -> None:
    path = tmp_path / "routing.sqlite3"
    planner = CoordinationPlanner(8, config=_config(), store_path=path, rng=random.Random(1))
    agents = _fleet()
    task = _route(planner, agents, "Deploy the billing service to staging", True)
    routed = _route(planner, agents, "Rotate the leaked credentials", False)
    pending = TaskRecord(id="open", description="Write the README")
    assert planner.select(pending, agents).agent is not None  # no outcome yet
    assert 0 < task.routing["propensity"] <= 1
    planner.close()
    db = sqlite3.connect(path)
    rows = {d.task_id: d for d in read_log(db, with_outcome=False)}
    db.close()
    assert rows[task.id].outcome is True and rows[routed.id].outcome is False
    assert rows["open"].outcome is None
    assert rows[task.id].propensity == pytest.approx(task.routing["propensity"], abs=1e-6)
    assert set(rows[task.id].candidates) == set(KINDS)
    assert rows[task.id].candidates[task.routing["kind"]]["p"] == pytest.approx(
        task.routing["confidence"], abs=1e-4)


def test_learning_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "routing.sqlite3"
    clock = Clock()
    first = CoordinationPlanner(8, config=_config(), store_path=path, clock=clock,
                                rng=random.Random(1))
    agents = _fleet()
    for _ in range(30):
        _route(first, agents, "Write release notes for the billing service",
               {"documentation": True})
    before = first.explain("Write release notes for the billing service")["kinds"]
    first.close()
    second = CoordinationPlanner(8, config=_config(), store_path=path, clock=clock,
                                 rng=random.Random(1))
    after = second.explain("Write release notes for the billing service")["kinds"]
    second.close()
    assert after == before
    assert after["documentation"]["parts"]["successes"] > 0


def test_average_confidence_per_kind_and_policy_in_snapshot() -> None:
    planner = CoordinationPlanner(8, config=_config(), rng=random.Random(1))
    _route(planner, _fleet(), "Deploy to staging", True, kind="cicd")
    snap = planner.snapshot()
    assert snap["policy"] == "bandit"
    assert set(snap["average_confidence_by_kind"]) == {"cicd"}
    assert 0 < snap["average_confidence_by_kind"]["cicd"] < 1
    planner.close()


# --- replay -----------------------------------------------------------------------------------


#: Every kind keeps a chance (credible 0): off-policy estimates need the logging policy to be
#: able to take what a target takes.
_EXPLORING = {"exploration_scale": 1.5, "exploration_budget": 1.0, "max_exploration_gap": 1.0,
              "credible": 0.0}
_REPLAY_TEXTS = {"deploy": "Deploy the {} service to staging",
                 "docs": "Write the README of the {} service"}


def _exploring_log(path: Path, truth: dict[str, dict[str, float]], tasks: int, *,
                   seed: int, outcome_seed: int, prefix: str) -> None:
    """A decision log of an exploring bandit on deploy and docs tasks (half each) whose
    first-try success per kind is ``truth`` (0.1 for a kind it does not list)."""
    clock = Clock()
    planner = CoordinationPlanner(8, config=_config(**_EXPLORING), store_path=path, clock=clock,
                                  rng=random.Random(seed))
    agents = _fleet()
    rng = random.Random(outcome_seed)
    for i in range(tasks):
        clock.now += 60
        category = "deploy" if rng.random() < 0.5 else "docs"
        task = TaskRecord(id=f"{prefix}-{i}",
                          description=_REPLAY_TEXTS[category].format(i % 7))
        decision = planner.select(task, agents)
        assert decision.agent is not None and decision.kind is not None
        ok = rng.random() < truth[category].get(decision.kind, 0.1)
        task.attempts.append(Attempt(1, decision.agent.id, 0.0, 1.0, outcome=(
            AttemptOutcome.SUCCEEDED if ok else AttemptOutcome.FAILED)))
        planner.record_outcome(task, decision.agent, ok)
    planner.close()


def test_replay_estimates_a_policy_whose_value_is_known(tmp_path: Path) -> None:
    """Log an exploring bandit on a simulated fleet, then evaluate 'always general' (every kind
    below a credibility of 0.99), whose true first-try success is known exactly."""
    truth = {"deploy": {"cicd": 0.9, "general": 0.6}, "docs": {"documentation": 0.85,
                                                               "general": 0.3}}
    path = tmp_path / "routing.sqlite3"
    _exploring_log(path, truth, 1500, seed=11, outcome_seed=12, prefix="r")
    target = _config(credible=0.99)
    result = replay(path, target)
    assert result["decisions"] == 1500
    true_value = (0.6 + 0.3) / 2
    low, high = result["ips"]["ci95"]
    assert low - 0.03 <= true_value <= high + 0.03
    assert abs(result["doubly_robust"]["estimate"] - true_value) < 0.06
    # The logging policy evaluated on its own log: the estimate is its logged success.
    same = replay(path, _config(**_EXPLORING))
    assert abs(same["ips"]["estimate"] - same["logged"]["estimate"]) < 0.08


def _small_exploring_log(path: Path, tasks: int, seed: int) -> None:
    """A short log on two categories whose best kinds nearly always succeed: large weights on
    a few successes, so IPS and DR can exceed 1."""
    truth = {"deploy": {"cicd": 0.98, "general": 0.6},
             "docs": {"documentation": 0.98, "general": 0.3}}
    _exploring_log(path, truth, tasks, seed=seed, outcome_seed=seed + 100, prefix="s")


def test_replay_estimates_and_intervals_stay_probabilities_on_a_small_log(
    tmp_path: Path,
) -> None:
    from coordinator_agent.cli.routing import replay_summary

    path = tmp_path / "routing.sqlite3"
    _small_exploring_log(path, 60, seed=4)
    result = replay(path, _config(credible=0.5, exploration=Exploration.GREEDY))
    assert result["decisions"] == 60
    # The unbiased mean of the IPS terms is above 1 on this log; what is reported is not.
    assert result["ips"]["unclipped_estimate"] > 1.0 and result["ips"]["clipped"]
    for key in ("logged", "ips", "self_normalised_ips", "doubly_robust"):
        r = result[key]
        assert 0.0 <= r["estimate"] <= 1.0, key
        assert all(0.0 <= x <= 1.0 for x in (*r["ci95"], *r["bootstrap95"])), key
        assert r["ci95"][0] <= r["estimate"] <= r["ci95"][1], key
    # Self-normalised: sum w r / sum w, a probability without clipping.
    assert not result["self_normalised_ips"]["clipped"]
    # 38 effective decisions of 60: too few to trust, and the output says so.
    assert result["effective_sample_size"] < 100 and result["fragile"]
    text = replay_summary({"target_config": "greedy.yaml", "store": str(path), **result})
    assert "target greedy.yaml   policy bandit" in text
    assert "too small to trust" in text and "SNIPS" in text
    rates = [float(x) for x in re.findall(r"(-?[0-9.]+)%", text)]
    assert rates and max(rates) <= 100.0 and min(rates) >= 0.0


def test_replay_seed_moves_only_the_bootstrap(tmp_path: Path) -> None:
    path = tmp_path / "routing.sqlite3"
    _small_exploring_log(path, 60, seed=4)
    target = _config(credible=0.5, exploration=Exploration.GREEDY)
    runs = [replay(path, target, seed=seed) for seed in (0, 1)]
    keys = ("logged", "ips", "self_normalised_ips", "doubly_robust")
    for key in keys:
        assert runs[0][key]["estimate"] == runs[1][key]["estimate"]
        assert runs[0][key]["ci95"] == runs[1][key]["ci95"]
    assert any(runs[0][k]["bootstrap95"] != runs[1][k]["bootstrap95"] for k in keys)
    assert [r["bootstrap_seed"] for r in runs] == [0, 1]


def test_propensities_are_honest_on_a_simulated_log(tmp_path: Path) -> None:
    """For a kind the policy can always pick, E[1{picked} / propensity] = 1."""
    clock = Clock()
    planner = CoordinationPlanner(8, config=_config(exploration_scale=1.5,
                                                    exploration_budget=1.0,
                                                    max_exploration_gap=1.0, credible=0.0),
                                  store_path=tmp_path / "r.sqlite3", clock=clock,
                                  rng=random.Random(3))
    agents = _fleet(("cicd", "general", "development"))
    rng = random.Random(4)
    for i in range(1500):
        clock.now += 60
        _route(planner, agents, f"Deploy the {i % 5} service",
               {"cicd": rng.random() < 0.8, "general": rng.random() < 0.5})
    planner.close()
    db = sqlite3.connect(tmp_path / "r.sqlite3")
    rows = list(read_log(db))
    db.close()
    # (development always fails: it is picked rarely, with tiny propensities, a heavy tail.)
    for kind in ("cicd", "general"):
        assert sum(1 / r.propensity for r in rows if r.kind == kind) / len(rows) == \
            pytest.approx(1.0, abs=0.15)


def test_replay_of_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    from coordinator_agent.exceptions import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        replay(tmp_path / "none.sqlite3", default_routing_config())


# --- phases -----------------------------------------------------------------------------------


def test_a_multi_phase_description_becomes_steps() -> None:
    prior = TextPrior(default_routing_config())
    steps = split_phases("Implement rate limiting with a security audit, then deploy", prior,
                         Phases())
    assert steps is not None
    assert [kind for _, kind in steps] == ["development", "security", "cicd"]
    assert split_phases("Fix the login bug with the new API", prior, Phases()) is None
    assert split_phases("Implement rate limiting with a security audit, then deploy", prior,
                        Phases(enabled=False, separators=[])) is None


@pytest.mark.parametrize(("description", "steps"), [
    # A tool or means after "with" stays in its clause, which is then read whole.
    ("Rotate the Vault root token, then redeploy payments-api with ArgoCD, finally write the "
     "runbook", [("Rotate the Vault root token", "security"),
                 ("redeploy payments-api with ArgoCD", "cicd"),
                 ("write the runbook", "documentation")]),
    ("Deploy the api with Helm, then update the runbook",
     [("Deploy the api with Helm", "cicd"), ("update the runbook", "documentation")]),
    ("Provision the staging cluster with Terraform, then run a security scan",
     [("Provision the staging cluster with Terraform", "cicd"),
      ("run a security scan", "security")]),
    ("Roll out the checkout redesign with a feature flag, then document it in the changelog",
     [("Roll out the checkout redesign with a feature flag", "cicd"),
      ("document it in the changelog", "documentation")]),
    ("Migrate the orders table with Alembic, then deploy",
     [("Migrate the orders table with Alembic", "development"), ("deploy", "cicd")]),
    ("Rotate the TLS certificates with cert-manager, then redeploy the ingress",
     [("Rotate the TLS certificates with cert-manager", "security"),
      ("redeploy the ingress", "cicd")]),
    # Work of the clause's own kind is part of that work, not a step.
    ("Fix the login bug with a regression test, then deploy",
     [("Fix the login bug with a regression test", "development"), ("deploy", "cicd")]),
    ("Refactor the payment client with a code review, then deploy to production",
     [("Refactor the payment client with a code review", "development"),
      ("deploy to production", "cicd")]),
    # Work of another kind after "with" is a step of its own.
    ("Implement rate limiting with a security audit, then deploy",
     [("Implement rate limiting", "development"), ("a security audit", "security"),
      ("deploy", "cicd")]),
    ("Implement rate limiting, with a security audit, then deploy",
     [("Implement rate limiting", "development"), ("a security audit", "security"),
      ("deploy", "cicd")]),
    ("Implement the SSO login with a penetration test, then release it",
     [("Implement the SSO login", "development"), ("a penetration test", "security"),
      ("release it", "cicd")]),
    ("Build the image with a Trivy scan, then push it to the registry",
     [("Build the image", "cicd"), ("a Trivy scan", "security"),
      ("push it to the registry", "cicd")]),
    ("Add the export endpoint with documentation, then deploy",
     [("Add the export endpoint", "development"), ("documentation", "documentation"),
      ("deploy", "cicd")]),
])
def test_with_starts_a_step_only_before_work_of_another_kind(
    description: str, steps: list[tuple[str, str]],
) -> None:
    prior = TextPrior(default_routing_config())
    assert split_phases(description, prior, Phases()) == steps


def test_the_work_words_that_make_a_with_clause_a_step_are_configurable() -> None:
    prior = TextPrior(default_routing_config())
    text = "Implement rate limiting with a security audit, then deploy"
    # Without "audit" among the work words, the with-clause stays in its clause, which the
    # text prior is not clearly sure of: it joins "deploy", one step, and the task stays whole.
    assert split_phases(text, prior, Phases(work_words=["review"])) is None
    # A bare tool name never names work, whatever its kind.
    assert split_phases("Implement the exporter with ArgoCD, then write the runbook", prior,
                        Phases()) == [("Implement the exporter with ArgoCD", "development"),
                                      ("write the runbook", "documentation")]


def test_phases_show_in_route_and_can_be_switched_off() -> None:
    planner = CoordinationPlanner(8, config=default_routing_config())
    text = "Implement rate limiting with a security audit, then deploy"
    assert [s["kind"] for s in planner.explain(text)["workflow"]] == [
        "development", "security", "cicd"]
    off = default_routing_config().model_copy(update={"phases": Phases(enabled=False)})
    assert CoordinationPlanner(8, config=off).explain(text)["workflow"] is None


def test_explain_names_the_fallback_kind_when_no_kind_is_credible() -> None:
    planner = CoordinationPlanner(8, config=_config(credible=0.95), rng=random.Random(1))
    explained = planner.explain("Deploy the billing service", _fleet())
    assert explained["kind"] == "general" and explained["fallback_used"] is True
    task = TaskRecord(id="f", description="Deploy the billing service")
    decision = planner.select(task, _fleet())
    assert decision.kind == "general" and decision.fallback_used
    assert task.routing["propensity"] == 1.0
    planner.close()


# --- surprise: exploration widens when the best kind fails more than predicted -----------------


def test_surprise_is_zero_while_outcomes_match_the_belief() -> None:
    detector = SurpriseDetector(window=20)
    rng = random.Random(5)
    for _ in range(400):
        detector.observe("k:cicd", "cicd", 0.8, rng.random() < 0.8)
    assert abs(detector.z("k:cicd", "cicd")) < 3.0
    assert detector.z("k:cicd", "general") == 0.0  # no evidence: no surprise
    assert detector.spread("k:other", "cicd") == 1.0


def test_a_drop_makes_the_best_kind_surprising_and_widens_exploration() -> None:
    detector = SurpriseDetector(window=20)
    for _ in range(15):
        detector.observe("k:cicd", "cicd", 0.8, False)
    assert detector.z("k:cicd", "cicd") < -5.0
    assert detector.spread("k:cicd", "cicd") > 5.0
    # Doing better than believed is not a reason to explore.
    for _ in range(15):
        detector.observe("k:docs", "documentation", 0.3, True)
    assert detector.spread("k:docs", "documentation") == 1.0
    assert SurpriseDetector(window=0).spread("k:cicd", "cicd") == 1.0


def test_a_shortfall_well_past_chance_shifts_that_kind_on_that_feature() -> None:
    detector = SurpriseDetector(window=20)
    for _ in range(6):
        detector.observe("docs-word", "documentation", 0.8, False)
        detector.observe("k:documentation", "documentation", 0.8, True)
    r, v = detector.state()["docs-word"]["documentation"]
    assert r / v ** 0.5 < -2.5
    shifts = detector.shortfalls(["k:documentation", "docs-word"], 2.5)
    assert shifts == {"documentation": pytest.approx(r / (1 + v))}
    assert shifts["documentation"] < -1.0
    # Within chance, on other features, or doing better than believed: no shift.
    assert detector.shortfalls(["docs-word"], 10.0) == {}
    assert detector.shortfalls(["k:documentation", "other"], 2.5) == {}
    for _ in range(6):
        detector.observe("k:general", "general", 0.3, True)
    assert detector.shortfalls(["k:general"], 0.5) == {}


def test_a_kind_failing_on_one_sort_of_task_is_shifted_down_there() -> None:
    agents = _fleet()
    docs = "Write the onboarding guide for the billing API in the docs portal"
    kept: dict[float, int] = {}
    for threshold in (2.5, 0.0):
        clock = Clock()
        planner = CoordinationPlanner(64, config=_config(surprise_shift=threshold), clock=clock,
                                      rng=random.Random(3))
        for _ in range(30):
            _route(planner, agents, docs, {"documentation": True})
            clock.now += 60
        # documentation starts failing on it while it is believed best
        kept[threshold] = sum(_route(planner, agents, docs, {"general": True})
                              .routing["kind"] == "documentation" for _ in range(16))
        kinds = planner.explain(docs, agents)["kinds"]
        parts = kinds["documentation"]["parts"]
        if threshold:
            assert parts["shortfall"] < -0.5
            header, row = _bandit_table(kinds, ["documentation"]).splitlines()[:2]
            assert "SHORTFALL" in header and f"{parts['shortfall']:+.2f}" in row
        else:
            assert parts["shortfall"] == 0.0
    # It is passed over sooner than with the weights alone.
    assert kept[2.5] < kept[0.0]


def test_planner_explores_more_after_its_best_kind_starts_failing() -> None:
    clock = Clock()
    # The widening alone: with the shortfall shift on, cicd would soon no longer be the best.
    planner = CoordinationPlanner(64, config=_config(surprise_shift=0), clock=clock,
                                  rng=random.Random(3))
    agents = _fleet()
    description = "Deploy the payments service to production with the Helm chart"
    for _ in range(30):
        _route(planner, agents, description, {"cicd": True})
        clock.now += 60
    def spread() -> float:
        rows = planner.explain(description, agents)["kinds"]
        return max(row["parts"]["exploration"] for kind, row in rows.items() if kind != "cicd")

    before = spread()
    widest = before
    for _ in range(6):  # cicd starts failing while it is still believed best
        _route(planner, agents, description, {"cicd": False, "general": True})
        clock.now += 60
        widest = max(widest, spread())
    assert widest > 2 * before
    picks = collections.Counter(_route(planner, agents, description,
                                       {"cicd": False, "general": True}).routing["kind"]
                                for _ in range(60))
    assert picks["general"] > 30


def _small_log(path: Path) -> None:
    """A real decision log of a few routed tasks."""
    planner = CoordinationPlanner(8, config=_config(), store_path=path, rng=random.Random(5))
    for i in range(6):
        _route(planner, _fleet(), f"Deploy the {i} service to staging", i % 3 != 0)
    planner.close()


@pytest.mark.parametrize(("column", "value", "problem"), [
    ("candidates", "not json", "candidates"),
    ("candidates", "null", "candidates"),
    ("candidates", '"abc"', "candidates"),
    ("propensity", "abc", "propensity"),
    ("propensity", 0.0, "propensity"),
    ("propensity", -1.0, "propensity"),
    ("propensity", 2.0, "propensity"),
    ("at", "yesterday", "time"),
    ("description", b"\xff\x00", "description"),
    ("labels", b"\xff\x00", "labels"),
])
def test_replay_of_a_corrupted_log_row_is_a_clear_error(
    tmp_path: Path, column: str, value: object, problem: str
) -> None:
    from coordinator_agent.exceptions import ConfigError

    path = tmp_path / "r.sqlite3"
    _small_log(path)
    db = sqlite3.connect(path)
    row_id = db.execute("SELECT MIN(id) FROM decisions").fetchone()[0]
    db.execute(f"UPDATE decisions SET {column} = ? WHERE id = ?", (value, row_id))
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=rf"row {row_id} .*{problem}"):
        replay(path, default_routing_config())


def test_replay_of_a_file_that_is_no_store_is_a_clear_error(tmp_path: Path) -> None:
    from coordinator_agent.exceptions import ConfigError

    junk = tmp_path / "junk.sqlite3"
    junk.write_text("hello\n")
    with pytest.raises(ConfigError, match="not a SQLite"):
        replay(junk, default_routing_config())
    with pytest.raises(ConfigError, match="is a directory"):
        replay(tmp_path, default_routing_config())
