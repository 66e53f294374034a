"""Routing configuration: the packaged vocabulary, loading a file, errors naming the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from coordinator_agent.exceptions import ConfigError
from coordinator_agent.routing.config import (
    Balance,
    Complexity,
    RoutingConfig,
    default_routing_config,
    load_routing_config,
    parse_routing_config,
)


def test_packaged_default_covers_the_required_kinds() -> None:
    config = load_routing_config()
    assert {"development", "security", "cicd", "documentation", "inventory"} <= set(config.kinds)
    for kind in ("development", "security", "cicd", "documentation", "inventory"):
        assert config.kinds[kind].keywords, kind
    assert config.threshold == 0.6
    assert config.fallback_kind == "general"
    assert config.fallback_kind in config.kinds
    w = config.weights
    assert (w.base, w.pattern, w.domain, w.complexity, w.workload) == (0.5, 0.4, 0.2, 0.1, 0.1)
    assert config.balance is Balance.LEAST_LOADED
    assert set(config.categories) >= {"analysis", "creation", "modification", "operation"}
    assert config.urgency.critical and config.complexity.high and config.complexity.low


def test_default_is_read_from_the_package_data_file() -> None:
    resource = resources.files("coordinator_agent.routing").joinpath("data", "routing.yaml")
    assert resource.is_file()
    assert parse_routing_config(resource.read_text(encoding="utf-8")) == default_routing_config()


def test_yaml_booleans_do_not_sneak_into_word_lists() -> None:
    # YAML 1.1 reads a bare `on` or `no` as a boolean; the packaged file quotes them.
    stopwords = default_routing_config().stopwords
    assert "on" in stopwords and "no" in stopwords


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(
        "kinds:\n"
        "  research:\n"
        "    keywords: [Paper, Survey]\n"
        "    complexity: [high]\n"
        "threshold: 0.7\n"
        "fallback_kind: research\n"
        "balance: two_choices\n"
        "retry: {max_retries: 3, backoff_base_s: 1, backoff_max_s: 4}\n",
        encoding="utf-8",
    )
    config = load_routing_config(path)
    assert list(config.kinds) == ["research"]
    assert config.kinds["research"].keywords == ["paper", "survey"]  # lower-cased
    assert config.kinds["research"].complexity == [Complexity.HIGH]
    assert config.threshold == 0.7
    assert config.balance is Balance.TWO_CHOICES
    assert config.retry.max_retries == 3
    assert config.learning.half_life_s == 7 * 86_400  # untouched sections keep defaults


def test_kind_without_complexity_handles_all_levels() -> None:
    config = parse_routing_config("kinds: {ops: {keywords: [deploy]}}")
    assert set(config.kinds["ops"].complexity) == set(Complexity)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("kinds: {}", "kinds"),
        ("kinds: {a: {}}\nthreshold: 1.5", "threshold"),
        ("kinds: {a: {keywords: [two words]}}", "kinds.a.keywords"),
        ("kinds: {a: {keywords: ['']}}", "kinds.a.keywords"),
        ("kinds: {a: {keywords: deploy}}", "kinds.a.keywords"),
        ("kinds: {a: {complexity: [extreme]}}", "kinds.a.complexity"),
        ("kinds: {'bad kind': {}}", "kinds"),
        ("kinds: {a: {}}\nweights: {pattern: -0.1}", "weights.pattern"),
        ("kinds: {a: {}}\nbalance: random", "balance"),
        ("kinds: {a: {}}\nthreshhold: 0.5", "threshhold"),
        ("kinds: {a: {}}\nlearning: {half_life_s: 0}", "learning.half_life_s"),
        ("kinds: {a: {}}\nretry: {backoff_base_s: 10, backoff_max_s: 1}", "backoff_max_s"),
        ("kinds: {a: {}}\nstopwords: [yes]", "stopwords"),
    ],
)
def test_invalid_config_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routing_config(text, "test.yaml")
    message = str(info.value)
    assert "test.yaml" in message
    assert field in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_routing_config(tmp_path / "nope.yaml")


def test_not_yaml_or_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kinds: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_routing_config(bad)
    bad.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_routing_config(bad)


def test_config_is_immutable() -> None:
    config = default_routing_config()
    with pytest.raises(ValueError, match="frozen"):
        config.threshold = 0.1  # type: ignore[misc]
    assert isinstance(config, RoutingConfig)
