"""DescriptionClusters: similar descriptions share a cluster, different ones do not, the state
is a deterministic function of what was learned, and it survives the store."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, cast

from coordinator_agent.routing.clusters import MAX_POSTINGS, DescriptionClusters
from coordinator_agent.routing.config import default_routing_config
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.routing.updates import LearningUpdate

#: As in real tickets, a few services (names shared by every sort of ticket) and more sorts of
#: tickets (templates), each in the coarse group (the kind the text points at) it belongs to.
SERVICES = [("billing", "api"), ("session", "store"), ("checkout", "page")]
TEMPLATES = {
    "faq": ("add", "faq", "entri"),
    "release": ("releas", "note", "hotfix"),
    "guide": ("updat", "onboard", "guid"),
    "readme": ("write", "readm"),
    "pagination": ("add", "pagin", "list"),
    "export": ("implement", "bulk", "export"),
    "async": ("port", "client", "async"),
    "retry": ("refactor", "retri", "logic"),
}
GROUPS = {t: "documentation" for t in ("faq", "release", "guide", "readme")} | {
    t: "development" for t in ("pagination", "export", "async", "retry")}


def _tickets(n: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(sorted(TEMPLATES))
        out.append((template, (*TEMPLATES[template], *rng.choice(SERVICES))))
    return out


def test_tickets_of_one_template_share_a_cluster_across_services() -> None:
    clusters = DescriptionClusters(threshold=0.5, max_clusters=100)
    seen: dict[int, Counter[str]] = {}
    for template, words in _tickets(300, seed=1):
        cluster, row = clusters.learn(words, GROUPS[template])
        assert cluster is not None and row is not None and row[0] == cluster
        assert row[1] == GROUPS[template]
        seen.setdefault(cluster, Counter())[template] += 1
    # A service name is shared by every template: it must not glue templates together. Online,
    # the first few tickets (whose words' frequencies are not known yet) may go astray.
    pure = sum(counts.most_common(1)[0][1] for counts in seen.values())
    assert pure >= 0.9 * 300
    main = {t: max((c for c in seen if seen[c].most_common(1)[0][0] == t),
                   key=clusters.members) for t in TEMPLATES}
    for template, cluster in main.items():
        assert seen[cluster][template] >= 0.5 * 300 / len(TEMPLATES) * 0.8, template
    # Assignment reads only, and finds the template's main cluster for a new service.
    before = sorted(clusters.rows())
    assert clusters.assign(("add", "faq", "entri", "checkout", "page"),
                           "documentation") == main["faq"]
    # Another coarse group never finds it, nor do words no cluster has.
    assert clusters.assign(("add", "faq", "entri", "checkout", "page"), "security") is None
    assert clusters.assign(("totally", "unrelated", "word"), "documentation") is None
    assert sorted(clusters.rows()) == before


def test_the_threshold_decides_how_fine_the_clusters_are() -> None:
    coarse = DescriptionClusters(threshold=0.05, max_clusters=100)
    fine = DescriptionClusters(threshold=0.95, max_clusters=100)
    for template, words in _tickets(200, seed=2):
        coarse.learn(words, GROUPS[template])
        fine.learn(words, GROUPS[template])
    assert len(coarse) < len(TEMPLATES) < len(fine)


def test_the_cap_on_clusters_holds_and_a_disabled_instance_does_nothing() -> None:
    capped = DescriptionClusters(threshold=0.99, max_clusters=3)
    for _, words in _tickets(100, seed=3):
        capped.learn(words)
    assert len(capped) == 3
    off = DescriptionClusters(threshold=0.0, max_clusters=100)
    assert off.learn(("add", "faq")) == (None, None)
    assert off.assign(("add", "faq")) is None and len(off) == 0


def test_same_descriptions_in_the_same_order_build_the_same_clusters_and_rows_reload() -> None:
    a = DescriptionClusters(threshold=0.4, max_clusters=100)
    b = DescriptionClusters(threshold=0.4, max_clusters=100)
    tickets = _tickets(200, seed=4)
    assert [a.learn(w)[0] for _, w in tickets] == [b.learn(w)[0] for _, w in tickets]
    reloaded = DescriptionClusters(threshold=0.4, max_clusters=100)
    reloaded.load(a.rows())
    assert sorted(reloaded.rows()) == sorted(a.rows())
    assert reloaded.tasks == a.tasks
    for _, words in _tickets(50, seed=5):
        assert reloaded.assign(words) == a.assign(words)
        assert reloaded.idf(words[0]) == a.idf(words[0])


def test_a_word_in_too_many_clusters_finds_no_candidates_alone() -> None:
    clusters = DescriptionClusters(threshold=0.9, max_clusters=1000)
    for i in range(MAX_POSTINGS + 1):
        clusters.learn((f"unique{i}", "common"))
    # "common" alone is in every cluster: too common to look clusters up by.
    assert clusters.assign(("common",)) is None
    assert clusters.assign(("unique3", "common")) == 3


def test_the_second_ticket_of_a_sort_joins_the_first_ones_cluster() -> None:
    clusters = DescriptionClusters(threshold=0.5, max_clusters=100)
    # Service names every sort of ticket uses, so they are known and common.
    for service in SERVICES:
        for template in ("pagination", "export"):
            clusters.learn((*TEMPLATES[template], *service), "documentation")
    first, _ = clusters.learn(("add", "faq", "entri", "billing", "api"), "documentation")
    second, _ = clusters.learn(("add", "faq", "entri", "session", "store"), "documentation")
    assert first is not None and first == second and clusters.members(first) == 2
    other, _ = clusters.learn(("rotat", "vault", "secret", "session", "store"), "documentation")
    assert other is not None and other != first and clusters.members(other) == 1


# --- the learner: the cluster as a finer context ------------------------------------------------

SERVICE_NAMES = ("billing API", "session store", "checkout page", "login flow", "search backend",
                 "orders service")
FAQ = "Update the onboarding guide for the {}"
NOTES = "Write the release notes for the {}"


def _after_a_drift_on_faq(cluster_threshold: float) -> tuple[Any, float]:
    """A planner that learned: FAQ tickets and release notes (both point the text at
    documentation: one coarse context) succeed on documentation, then FAQ tickets fail there
    while release notes keep succeeding."""
    config = default_routing_config()
    config = config.model_copy(update={"bandit": config.bandit.model_copy(
        update={"cluster_threshold": cluster_threshold})})
    planner = CoordinationPlanner(8, config=config)
    at = 1_767_225_600.0
    n = 0

    def teach(template: str, service: str, success: bool) -> None:
        nonlocal n, at
        n += 1
        at += 60.0
        description = template.format(service)
        keywords = tuple(planner.analyzer.analyze(description).keywords)
        planner.apply_outcome(LearningUpdate(
            task_id=f"t-{n}", attempt=1, at=at, description=description, kind="documentation",
            success=success, keywords=keywords, first_try=True))

    for i in range(24):
        teach(FAQ if i % 2 else NOTES, SERVICE_NAMES[i % 5], True)
    for i in range(16):
        teach(FAQ, SERVICE_NAMES[i % 5], False)
        teach(NOTES, SERVICE_NAMES[i % 5], True)
    return planner, at


def _cluster_of(planner: Any, description: str) -> int | None:
    analysis = planner.analyzer.analyze(description)
    scores = planner.learner.scores(description, analysis, ["documentation"], 0.0)
    assert scores[0].contexts[0] == "k:documentation"
    return cast(int | None, scores[0].cluster)


def test_each_sort_of_ticket_gets_its_cluster_and_the_cluster_learns_its_own_drift() -> None:
    planner, at = _after_a_drift_on_faq(0.4)
    # Whatever the service, the sort of ticket finds its cluster.
    faq = _cluster_of(planner, FAQ.format("checkout page"))
    notes = _cluster_of(planner, NOTES.format("checkout page"))
    assert faq is not None and notes is not None and faq != notes

    def cluster_weight(cluster: int) -> float:
        [belief] = planner.learner.model.beliefs({"documentation": 0.5}, [(f"@c:{cluster}", 1.0)],
                                                 at)
        return float(belief.mean)

    # The FAQ cluster's own weight for documentation turned negative (its recent failures),
    # the release notes' stayed positive: the coarse context could only average the two.
    assert cluster_weight(faq) < -0.2 < 0.2 < cluster_weight(notes)
    [belief] = planner.learner.model.beliefs({"documentation": 0.5}, [("@k:documentation", 1.0)],
                                             at)
    assert cluster_weight(faq) < belief.mean < cluster_weight(notes)
    # The explanation names the fine context.
    explained = planner.explain(FAQ.format("checkout page"))
    assert explained["contexts"]["cluster"] == faq
    assert explained["contexts"]["cluster_tasks"] >= 20
    assert explained["kinds"]["documentation"]["parts"]["cluster"] == faq
    planner.close()


def test_without_clusters_there_is_no_fine_context() -> None:
    planner, _ = _after_a_drift_on_faq(0.0)
    assert _cluster_of(planner, FAQ.format("checkout page")) is None
    assert not [row for row in planner.learner.model.rows() if row[1].startswith("@c:")]
    assert planner.store.clusters() == []
    planner.close()


def test_the_drifted_group_lists_only_kinds_failing_more_than_predicted() -> None:
    from coordinator_agent.routing.surprise import SurpriseDetector

    surprise = SurpriseDetector(20)
    for i in range(12):
        surprise.observe("@c:3", "documentation", 0.9, success=i % 4 == 0)  # 25 % vs 90 %
        surprise.observe("@c:3", "general", 0.5, success=i % 2 == 0)  # as predicted
    assert surprise.falling("@c:3", 1.0) == ["documentation"]
    assert surprise.falling("@c:3", 100.0) == []
    assert surprise.falling("@c:4", 1.0) == []
