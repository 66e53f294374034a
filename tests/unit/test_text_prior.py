"""TextPrior: P(kind | description) from the routing config's words, phrases and examples."""

from __future__ import annotations

import math

import pytest

from coordinator_agent.cli.routing import cold_start
from coordinator_agent.exceptions import ConfigError
from coordinator_agent.routing.config import (
    RoutingConfig,
    default_routing_config,
    parse_routing_config,
)
from coordinator_agent.routing.text_prior import TextPrior

DEFAULT_KINDS = ("development", "security", "cicd", "documentation", "inventory")


@pytest.fixture(scope="module")
def prior() -> TextPrior:
    return TextPrior(default_routing_config())


def small_config(extra: str = "") -> RoutingConfig:
    return parse_routing_config(
        "kinds:\n"
        "  alpha: {keywords: [apple]}\n"
        "  beta: {keywords: [banana]}\n"
        "  general: {}\n" + extra, "test.yaml")


@pytest.mark.parametrize("description", [
    "Okta: enforce phishing-resistant MFA for the admin group",
    "", "hello world", "zzzz qqqq", "???", "a " * 5000,
    "NullPointerException at com.acme.Foo.bar(Foo.java:12)",
])
def test_probabilities_cover_every_kind_and_sum_to_one(prior: TextPrior,
                                                       description: str) -> None:
    probabilities = prior.probabilities(description)
    assert set(probabilities) == set(default_routing_config().kinds)
    assert all(0.0 < p < 1.0 for p in probabilities.values())
    assert math.isclose(sum(probabilities.values()), 1.0, rel_tol=1e-12)


def test_unknown_words_give_a_spread_that_leans_to_the_fallback(prior: TextPrior) -> None:
    probabilities = prior.probabilities("florp blivet quux")
    specific = {probabilities[k] for k in DEFAULT_KINDS}
    # Nothing in the text favours one kind over another: they are equal, not ordered by name...
    assert len(specific) == 1
    # ...and the fallback kind, which means "none of them", is ahead without being certain.
    assert probabilities["general"] > specific.pop()
    assert probabilities["general"] < 0.5
    assert prior.best("florp blivet quux") == "general"


def test_equal_evidence_is_a_tie_and_a_tie_goes_to_the_fallback_not_a_name() -> None:
    config = small_config("prior: {lead_bonus: 0, fallback_score: 0}\n")
    prior = TextPrior(config)
    probabilities = prior.probabilities("apple banana")
    assert probabilities["alpha"] == probabilities["beta"]
    assert prior.best("apple banana") == "general"
    # Renaming the kinds does not change who wins.
    renamed = TextPrior(parse_routing_config(
        "kinds:\n  zeta: {keywords: [apple]}\n  aardvark: {keywords: [banana]}\n"
        "  general: {}\nprior: {lead_bonus: 0, fallback_score: 0}\n"))
    assert renamed.best("apple banana") == "general"
    assert prior.best("banana") == "beta"
    assert renamed.best("banana") == "aardvark"


def test_the_first_word_settles_otherwise_equal_evidence() -> None:
    prior = TextPrior(small_config())
    assert prior.best("apple and banana") == "alpha"
    assert prior.best("banana and apple") == "beta"


@pytest.mark.parametrize(("description", "kind"), [
    # Words that belong to another kind's vocabulary in isolation.
    ("Memory leak in the websocket gateway, RSS grows every hour", "development"),
    ("Goroutine leak in the exporter", "development"),
    ("Leaked Slack token posted in a public channel, revoke it", "security"),
    ("Pen test finding: IDOR on the invoices endpoint", "security"),
    ("Schedule the yearly penetration test of the public website", "security"),
    ("Flaky unit test in the billing module", "development"),
    ("Release notes for 4.2", "documentation"),
    ("Cut the 4.2 release branch and deploy it to staging", "cicd"),
    ("Build fails: error[E0502] cannot borrow self.buf as mutable", "development"),
    # No vocabulary word at all in the seed formula's sense: names and stack traces.
    ("ArgoCD app OutOfSync after the values change", "cicd"),
    ("Okta SSO loop for contractors", "security"),
    ("Snipe-IT: register the new monitors with serials", "inventory"),
    ("TypeError: Cannot read properties of undefined (reading 'map') in List.tsx", "development"),
    ("Confluence page on the onboarding process is stale", "documentation"),
    ("Which servers still run Ubuntu 18.04?", "inventory"),
])
def test_misleading_words_and_names_route_right(prior: TextPrior, description: str,
                                                kind: str) -> None:
    assert prior.best(description) == kind


def test_a_phrase_takes_its_words_out_of_the_vote(prior: TextPrior) -> None:
    matched = prior.matched("Memory leak in the cache")
    assert "memory leak" in matched["development"]
    assert "leak" not in matched.get("security", [])


def test_a_phrase_is_matched_with_its_stopwords_not_reduced_to_one_word() -> None:
    config = parse_routing_config(
        "kinds:\n"
        "  alpha: {keywords: [apple], phrases: [do we have, how to]}\n"
        "  beta: {keywords: [banana]}\n"
        "  general: {}\n"
        "stopwords: [do, we, to, the, in]\n", "test.yaml")
    prior = TextPrior(config)
    assert prior.matched("Do we have spare monitors?")["alpha"] == ["do we have"]
    assert prior.matched("How to rotate the key")["alpha"] == ["how to"]
    # Without "do we" and "to", "have" and "how" are just words nobody listed.
    assert "alpha" not in prior.matched("Users have to log in twice")
    assert "alpha" not in prior.matched("How the cache fails")
    assert prior.best("Users have to log in twice") == "general"


def test_camel_case_names_count_once_and_unknown_ones_by_their_parts(prior: TextPrior) -> None:
    assert prior.matched("ArgoCD")["cicd"] == ["argocd"]
    # Not a listed term as a whole: its parts speak ("exception").
    assert "exception" in prior.matched("FooBarException thrown")["development"]


def test_results_are_cached_but_never_shared(prior: TextPrior) -> None:
    first = prior.probabilities("Deploy 1.2 to prod")
    first["cicd"] = 0.0
    again = prior.probabilities("Deploy 1.2 to prod")
    assert again["cicd"] > 0.5


def test_the_cache_is_bounded() -> None:
    prior = TextPrior(small_config("prior: {cache_size: 3}\n"))
    for i in range(10):
        prior.probabilities(f"apple {i} pie")
    assert len(prior._cache) == 3


def test_examples_teach_words_the_lists_do_not_have() -> None:
    config = parse_routing_config(
        "kinds:\n"
        "  alpha: {examples: ['the widget wobbles again', 'widget wobbles on start']}\n"
        "  beta: {examples: ['the gizmo hums', 'gizmo humming loudly']}\n"
        "  general: {}\n")
    prior = TextPrior(config)
    assert prior.best("why does my widget wobble") == "alpha"
    assert prior.best("a humming gizmo") == "beta"


def test_the_seed_keywords_still_feed_the_prior() -> None:
    prior = TextPrior(small_config())
    assert prior.best("an apple a day") == "alpha"
    assert prior.scores("an apple a day")["alpha"] > 0


def test_a_kind_missing_from_kinds_but_named_fallback_is_still_scored() -> None:
    config = parse_routing_config("kinds: {alpha: {keywords: [apple]}}\nfallback_kind: other\n")
    probabilities = TextPrior(config).probabilities("pear")
    assert set(probabilities) == {"alpha", "other"}


def test_route_cold_start_takes_the_prior_only_when_nothing_is_learned(prior: TextPrior) -> None:
    explained = {"kind": "general", "kinds": {"security": {"parts": {"evidence": 0.0}},
                                             "general": {"parts": {"evidence": 0.0}}}}
    decided = cold_start(explained, prior, "Rotate the Vault root token")
    assert decided["kind"] == "security"
    assert decided["text_prior"]["probabilities"]["security"] > 0.5
    assert "cold start" in decided["reason"]
    learned = {**explained, "kinds": {"security": {"parts": {"evidence": 2.5}}}}
    assert cold_start(learned, prior, "Rotate the Vault root token") is learned


@pytest.mark.parametrize(("text", "field"), [
    ("kinds: {a: {phrases: [leak]}}", "kinds.a.phrases"),
    ("kinds: {a: {phrases: [one two three four five]}}", "kinds.a.phrases"),
    ("kinds: {a: {terms: [two words]}}", "kinds.a.terms"),
    ("kinds: {a: {hints: [two words]}}", "kinds.a.hints"),
    ("kinds: {a: {examples: [short]}}", "kinds.a.examples"),
    ("kinds: {a: {examples: [same ticket here, Same ticket  here]}}", "kinds.a.examples"),
    ("kinds: {a: {examples: [same ticket here]}, b: {examples: [same ticket here]}}",
     "listed under both 'a' and 'b'"),
    ("kinds: {a: {examples: not-a-list}}", "kinds.a.examples"),
    ("kinds: {a: {}}\nprior: {term_weight: -1}", "prior.term_weight"),
    ("kinds: {a: {}}\nprior: {example_smoothing: 0}", "prior.example_smoothing"),
    ("kinds: {a: {}}\nprior: {cache_size: -1}", "prior.cache_size"),
    ("kinds: {a: {}}\nprior: {weight: 1}", "prior.weight"),
])
def test_invalid_prior_config_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routing_config(text, "test.yaml")
    assert "test.yaml" in str(info.value)
    assert field in str(info.value)


def test_packaged_kinds_are_described_by_examples() -> None:
    config = default_routing_config()
    for kind in DEFAULT_KINDS:
        spec = config.kinds[kind]
        assert len(spec.examples) >= 10, kind
        assert spec.terms and spec.phrases and spec.hints, kind
