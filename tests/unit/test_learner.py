"""Learner: a description is read once (text prior, contexts, features) and the reading is
shared by its decisions and by the learning of its attempts, without changing what is
believed or learned."""

from __future__ import annotations

from coordinator_agent.routing.bandit import CONTEXT_PREFIX
from coordinator_agent.routing.config import default_routing_config
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.routing.updates import LearningUpdate

KINDS = ("development", "security", "cicd", "documentation", "inventory", "general")
NOW = 1_767_225_600.0
DESCRIPTIONS = ("Deploy the billing service to staging", "Write release notes for the API",
                "Memory leak in the gateway after the upgrade", "noop")


def _planner() -> CoordinationPlanner:
    return CoordinationPlanner(32, config=default_routing_config(), clock=lambda: NOW)


def _update(planner: CoordinationPlanner, description: str, n: int, *,
            keywords: tuple[str, ...] | None = None) -> LearningUpdate:
    analysis = planner.analyzer.analyze(description)
    return LearningUpdate(task_id=f"t-{n}", attempt=1, at=NOW + n, description=description,
                          kind=KINDS[n % len(KINDS)], success=n % 3 != 0,
                          keywords=analysis.keywords if keywords is None else keywords,
                          first_try=True, model_probability=0.6, confidence=0.55)


def _beliefs(planner: CoordinationPlanner, description: str) -> list[object]:
    analysis = planner.analyzer.analyze(description)
    return [(s.kind, s.belief, s.calibrated, s.contexts, s.local)
            for s in planner.learner.scores(description, analysis, KINDS, NOW + 100)]


def test_a_cached_reading_believes_and_learns_what_a_fresh_one_does() -> None:
    warm, cold = _planner(), _planner()
    for n in range(60):
        description = DESCRIPTIONS[n % len(DESCRIPTIONS)]
        update = _update(warm, description, n)
        assert warm.learner.apply_outcome(update) == cold.learner.apply_outcome(update)
        cold.learner.drop_caches()  # every outcome read afresh
        assert _beliefs(warm, description) == _beliefs(cold, description)
        cold.learner.drop_caches()
    assert len(warm.learner._readings) == len(DESCRIPTIONS)
    assert sorted(warm.learner.model.rows()) == sorted(cold.learner.model.rows())
    assert warm.learner.surprise.state() == cold.learner.surprise.state()


def test_the_readings_are_bounded_like_the_analyses() -> None:
    planner = _planner()
    planner.analyzer.cache_size = 3
    for n in range(10):
        _beliefs(planner, f"Deploy service number {n} to staging")
    assert len(planner.learner._readings) == 3
    planner.learner.drop_caches()
    assert not planner.learner._readings
    planner.analyzer.cache_size = 0
    _beliefs(planner, DESCRIPTIONS[0])
    assert not planner.learner._readings, "no cache: nothing kept"


def test_a_reading_belongs_to_its_analysis() -> None:
    """A new analysis of the same text (the analyser's cache let it go) is read again."""
    planner = _planner()
    description = DESCRIPTIONS[0]
    _beliefs(planner, description)
    first = planner.learner._readings[description]
    planner.analyzer.drop_caches()
    _beliefs(planner, description)
    again = planner.learner._readings[description]
    assert again is not first and again.analysis is planner.analyzer.analyze(description)
    assert again.feats == first.feats


def test_recorded_keywords_are_learned_and_the_analysis_watched() -> None:
    """An update whose recorded keywords are not the analysis' (the analyser changed since
    the decision): the weights learn the recorded ones, the surprise sums watch the
    analysis' features, as when each was computed apart."""
    planner = _planner()
    description = DESCRIPTIONS[0]
    analysis = planner.analyzer.analyze(description)
    recorded = ("deploy", "legacy", "ledger")
    assert recorded != analysis.keywords
    rows = planner.learner.apply_outcome(_update(planner, description, 1, keywords=recorded))
    contexts = planner.learner.contexts(analysis, planner.learner.text_prior.probabilities(
        description))
    learned = [name for _, name, *_ in rows]
    assert learned == [CONTEXT_PREFIX + c for c in contexts] + list(recorded)
    watched = {name for name, _ in planner.learner.features(analysis.keywords, contexts)}
    assert set(planner.learner.surprise.state()) == watched
