"""The change detector (routing/drift.py) and how the learner uses it."""

from __future__ import annotations

import random

from coordinator_agent.routing.analysis import TaskAnalyzer
from coordinator_agent.routing.config import default_routing_config
from coordinator_agent.routing.drift import ChangeDetector
from coordinator_agent.routing.learner import Learner
from coordinator_agent.routing.patterns import PatternStore

NOW = 1_767_225_600.0


def _detector(threshold: float = 4.0) -> ChangeDetector:
    return ChangeDetector(threshold=threshold, shift=2.0, memory=20)


def test_no_alarm_while_outcomes_match_the_belief() -> None:
    def trips(threshold: float) -> int:
        detector = _detector(threshold)
        rng = random.Random(7)
        return sum(detector.observe("k:cicd", "cicd", 0.85, rng.random() < 0.85)
                   for _ in range(2000))

    # Page's test: false alarms are rare (a few hundred first tries apart at threshold 4) and
    # get rarer fast as the threshold rises.
    assert trips(4.0) <= 10
    assert trips(8.0) <= 1
    assert _detector().statistic("k:cicd", "general") == 0.0


def test_a_drop_trips_within_a_few_failures_and_flags_the_group() -> None:
    detector = _detector()
    for _ in range(50):
        detector.observe("deploy", "cicd", 0.85, True)
    assert detector.flagged(["deploy"]) == set()
    failures = 0
    while not detector.observe("deploy", "cicd", 0.85, False):
        failures += 1
        assert failures < 10
    assert 2 <= failures + 1 <= 4  # each failure at 0.85 adds about 1.3
    assert detector.flagged(["deploy", "other"]) == {"cicd"}
    assert detector.flagged(["other"]) == set()
    assert detector.statistic("deploy", "cicd") == 0.0  # restarted after the alarm


def test_votes_require_several_features_to_agree() -> None:
    detector = _detector(threshold=2.0)
    for _ in range(3):
        detector.observe("a", "cicd", 0.9, False)
    assert detector.flagged(["a", "b"], votes=1) == {"cicd"}
    assert detector.flagged(["a", "b"], votes=2) == set()
    for _ in range(3):
        detector.observe("b", "cicd", 0.9, False)
    assert detector.flagged(["a", "b"], votes=2) == {"cicd"}


def test_a_flag_fades_after_its_memory_and_a_disabled_detector_never_flags() -> None:
    detector = _detector()
    while not detector.observe("g", "cicd", 0.9, False):
        pass
    for _ in range(200):  # later first tries on the group, of another kind
        detector.observe("g", "general", 0.6, True)
    assert detector.flagged(["g"]) == set()
    off = ChangeDetector(threshold=0.0, shift=2.0, memory=20)
    for _ in range(20):
        assert not off.observe("g", "cicd", 0.9, False)
    assert off.flagged(["g"]) == set()


def test_a_flagged_task_lowers_the_drifted_kind_and_raises_the_others() -> None:
    base = default_routing_config()
    config = base.model_copy(update={"bandit": base.bandit.model_copy(
        update={"drift_threshold": 2.0, "drift_votes": 1, "drift_prior": 0.6})})
    learner = Learner(config, TaskAnalyzer(config), PatternStore(":memory:"))
    description = "Deploy the payments service to production with the Helm chart"
    analysis = learner.analyzer.analyze(description)
    kinds = ("cicd", "general", "development")
    before = {s.kind: s.belief.prior for s in learner.scores(description, analysis, kinds, NOW)}
    assert max(before, key=before.__getitem__) == "cicd"
    for _ in range(4):
        learner.observe(description, analysis, "cicd", 0.85, False)
    after = {s.kind: s.belief.prior for s in learner.scores(description, analysis, kinds, NOW)}
    assert after["cicd"] < before["cicd"]
    assert after["general"] >= 0.6 and after["development"] >= 0.6
    assert max(after, key=after.__getitem__) != "cicd"
