"""Task analysis: keywords, category, complexity, domains and urgency from the configured words."""

from __future__ import annotations

import pytest

from coordinator_agent.routing.analysis import TaskAnalyzer, stem
from coordinator_agent.routing.config import (
    Complexity,
    default_routing_config,
    parse_routing_config,
)


@pytest.fixture(scope="module")
def analyzer() -> TaskAnalyzer:
    return TaskAnalyzer(default_routing_config())


@pytest.mark.parametrize(
    ("words", "key"),
    [
        (["deploy", "deploying", "deployed", "deploys", "deployment"], "deploy"),
        (["release", "released", "releases", "releasing"], "releas"),
        (["vulnerability", "vulnerabilities"], "vulnerability"),
        (["scan", "scanning", "scanned", "scans"], "scan"),
        (["test", "tests", "testing", "tested"], "test"),
        (["server", "servers"], "server"),
    ],
)
def test_stem_maps_forms_of_a_word_to_one_key(words: list[str], key: str) -> None:
    assert {stem(w) for w in words} == {key}


@pytest.mark.parametrize("word", ["status", "access", "analysis", "k8s", "api", "string"])
def test_stem_leaves_other_words_alone(word: str) -> None:
    assert stem(word) == word


def test_tokens_drop_stopwords_numbers_and_repeats(analyzer: TaskAnalyzer) -> None:
    tokens = analyzer.tokens("Scan the repo for CVE-2024-12345, then scan it again; v2 and 2.3")
    assert tokens == ["scan", "repo", "cve", "again", "v2"]


def test_hyphenated_words_count_whole_and_in_parts(analyzer: TaskAnalyzer) -> None:
    tokens = analyzer.tokens("end-to-end tests")
    assert "end-to-end" in tokens and "end" in tokens and "test" in tokens


@pytest.mark.parametrize(
    ("description", "domain", "category"),
    [
        ("Scan repository for CVE-2024-12345 vulnerability", "security", "analysis"),
        ("Deploy release 2.3 to staging", "cicd", "operation"),
        ("Refactor the payment module", "development", "modification"),
        ("Write the README section on installation", "documentation", "creation"),
        ("List all servers and their installed software licenses", "inventory", "query"),
    ],
)
def test_examples_find_their_domain(
    analyzer: TaskAnalyzer, description: str, domain: str, category: str
) -> None:
    analysis = analyzer.analyze(description)
    assert analysis.domains[0] == domain
    assert analysis.domain_match[domain] == 1.0
    assert analysis.category == category


def test_domain_match_is_relative_to_the_best(analyzer: TaskAnalyzer) -> None:
    analysis = analyzer.analyze("Scan repository for CVE-2024-12345 vulnerability")
    # security: scan, cve, vulnerability; development: repository.
    assert analysis.domains == ("security", "development")
    assert analysis.domain_match == {"security": 1.0, "development": pytest.approx(1 / 3)}


def test_keywords_put_vocabulary_first_and_leave_out_urgency(analyzer: TaskAnalyzer) -> None:
    analysis = analyzer.analyze("URGENT: payment service fails, please patch the exploit asap")
    assert analysis.keywords[:2] == ("patch", "exploit")
    assert "payment" in analysis.keywords and "servic" in analysis.keywords
    assert "urgent" not in analysis.keywords and "asap" not in analysis.keywords
    assert analysis.urgency == "critical"


def test_keywords_are_capped() -> None:
    config = parse_routing_config(
        "kinds: {dev: {keywords: [zebra]}}\nlearning: {max_keywords: 3}"
    )
    analysis = TaskAnalyzer(config).analyze("alpha beta gamma delta zebra epsilon")
    assert analysis.keywords == ("zebra", "alpha", "beta")


@pytest.mark.parametrize(
    ("description", "complexity"),
    [
        ("Fix a typo in the readme", Complexity.LOW),
        ("Refactor the payment module", Complexity.MEDIUM),
        ("Redesign the architecture of the distributed billing platform", Complexity.HIGH),
        # Many distinct words count as one hint towards high.
        ("Update payment billing invoice ledger checkout cart order pricing shipping refund",
         Complexity.HIGH),
    ],
)
def test_complexity(analyzer: TaskAnalyzer, description: str, complexity: Complexity) -> None:
    assert analyzer.analyze(description).complexity is complexity


@pytest.mark.parametrize(
    ("description", "urgency"),
    [
        ("Outage: restart the gateway immediately", "critical"),
        ("Important: rotate the certificate today", "high"),
        ("Tidy the wiki whenever there is time", "low"),
        ("Refactor the payment module", "normal"),
    ],
)
def test_urgency(analyzer: TaskAnalyzer, description: str, urgency: str) -> None:
    assert analyzer.analyze(description).urgency == urgency


def test_category_ties_go_to_the_first_word(analyzer: TaskAnalyzer) -> None:
    assert analyzer.analyze("list and install packages").category == "query"
    assert analyzer.analyze("install and list packages").category == "operation"
    assert analyzer.analyze("zebra").category == "general"


def test_vocabulary_comes_from_configuration() -> None:
    config = parse_routing_config(
        "kinds:\n"
        "  research: {keywords: [paper, survey]}\n"
        "  security: {keywords: [firewall]}\n"
        "categories: {study: [read]}\n"
        "urgency: {critical: [deadline]}\n"
    )
    analysis = TaskAnalyzer(config).analyze("Read the survey papers before the deadline")
    assert analysis.domains == ("research",)
    assert analysis.category == "study"
    assert analysis.urgency == "critical"
    # The default vocabulary is not consulted: "scan" means nothing here.
    assert TaskAnalyzer(config).analyze("scan for vulnerabilities").domains == ()


def test_long_descriptions_are_truncated() -> None:
    config = parse_routing_config("kinds: {sec: {keywords: [exploit]}}\n"
                                  "learning: {max_description_chars: 100}")
    analyzer = TaskAnalyzer(config)
    assert analyzer.analyze("exploit " + "x" * 200).domains == ("sec",)
    assert analyzer.analyze("y" * 200 + " exploit").domains == ()


def test_empty_description(analyzer: TaskAnalyzer) -> None:
    analysis = analyzer.analyze("")
    assert analysis.keywords == ()
    assert analysis.domains == ()
    assert analysis.category == "general"
    assert analysis.complexity is Complexity.MEDIUM
    assert analysis.urgency == "normal"
    assert analysis.to_dict() == {"keywords": [], "category": "general", "complexity": "medium",
                                  "domains": [], "urgency": "normal"}


CACHED = (
    "URGENT: payment service fails, please patch the exploit asap",
    "Scan repository for CVE-2024-12345 vulnerability",
    "Write release notes for the billing service",
    "noop",
)


def test_cached_analyses_equal_fresh_ones() -> None:
    cached = TaskAnalyzer(default_routing_config())
    fresh = TaskAnalyzer(default_routing_config())
    fresh.cache_size = 0
    for _ in range(3):  # misses, then hits, in a changing order
        for description in (*CACHED, *reversed(CACHED)):
            assert cached.analyze(description) == fresh.analyze(description)
    assert len(cached._analyses) == len(CACHED)
    assert not fresh._analyses


def test_the_analysis_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    analyzer = TaskAnalyzer(default_routing_config())
    analyzer.cache_size = 3
    first = analyzer.analyze("deploy the api")
    analyzer.analyze("scan the repo")
    analyzer.analyze("write the docs")
    assert analyzer.analyze("deploy the api") is first  # a hit: now the most recent
    analyzer.analyze("rotate the keys")  # full: "scan the repo" (least recent) goes
    assert list(analyzer._analyses) == ["write the docs", "deploy the api", "rotate the keys"]
    for n in range(50):
        analyzer.analyze(f"task number {n} of many")
    assert len(analyzer._analyses) == 3
    analyzer.drop_caches()
    assert not analyzer._analyses
    assert analyzer.analyze("deploy the api") == first


def test_the_cache_key_is_the_text_the_analyser_reads() -> None:
    analyzer = TaskAnalyzer(default_routing_config())
    head = "deploy the billing service " * 200
    long_one, longer_one = head + " security audit", head + " write the docs"
    assert len(head) > analyzer.max_chars
    assert analyzer.analyze(long_one) is analyzer.analyze(longer_one)  # one entry, one key
    assert len(analyzer._analyses) == 1
    assert max(len(key) for key in analyzer._analyses) == analyzer.max_chars
