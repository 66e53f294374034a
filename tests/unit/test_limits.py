"""Fleet-wide limits and admission control (coordinator/limits.py), with the settings they read."""

from __future__ import annotations

import pytest

from coordinator_agent.coordinator.limits import FleetLimiter, TokenBucket
from coordinator_agent.exceptions import ConfigError, SubmissionRefused
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.settings import FleetLimits, load_settings


def limiter(**config: object) -> FleetLimiter:
    return FleetLimiter(FleetLimits.model_validate(config), Metrics())


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket.full(2.0, 3, now=0.0)
    for _ in range(3):
        assert bucket.ready(0.0)
        bucket.take(0.0)
    assert not bucket.ready(0.0)
    assert bucket.wait_s(0.0) == pytest.approx(0.5)
    assert bucket.ready(0.5)
    assert bucket.ready(100.0) and bucket.tokens == 3.0  # never more than the burst


def test_kind_running_limit_holds_across_agents_and_says_why() -> None:
    limits = limiter(kinds={"security": {"max_running": 2}})
    limits.begin({"security": 1}, {"alice": 1}, 1)
    assert limits.kind_hold("security", 0.0) is None
    limits.started("security", "alice", 0.0)
    assert limits.kind_hold("security", 0.0) == (
        "kind_running", "security at its limit of 2 running")
    assert limits.describe("security", 0.0) == "security at its limit of 2 running"
    assert limits.kind_hold("general", 0.0) is None


def test_principal_rate_is_a_token_bucket() -> None:
    limits = limiter(principals={"alice": {"rate": "60/min", "burst": 2}})
    limits.begin({}, {}, 0)
    for _ in range(2):
        assert limits.principal_hold("alice", 0.0) is None
        limits.started("general", "alice", 0.0)
    assert limits.principal_hold("alice", 0.0) == ("principal_rate", "alice at its rate of 60/min")
    assert limits.next_token_at == pytest.approx(1.0)
    assert limits.principal_hold("alice", 1.0) is None
    assert limits.principal_hold("bob", 0.0) is None  # the default: no rate


def test_global_in_flight_cap() -> None:
    limits = limiter(max_in_flight=3)
    limits.begin({}, {}, 2)
    assert limits.room() == 1
    limits.started("general", "alice", 0.0)
    assert limits.room() == 0
    assert limits.describe("general", 0.0) == "fleet at its limit of 3 in flight"
    assert limiter().room() is None


def test_admission_refuses_past_the_backlog_with_a_retry_hint() -> None:
    limits = limiter(default_principal={"max_backlog": 10}, retry_after_s=7,
                     principals={"batch": {"max_backlog": 100}})
    limits.admit("alice", 9)
    with pytest.raises(SubmissionRefused, match="alice has 10 tasks waiting, its limit is 10") \
            as refused:
        limits.admit("alice", 10)
    assert refused.value.retry_after_s == 7
    limits.admit("batch", 99)
    sample = limits.metrics.registry.get_sample_value("coordinator_admission_refused_total")
    assert sample == 1


def test_held_decisions_are_counted_by_limit() -> None:
    limits = limiter()
    limits.held("kind_running")
    limits.held("kind_running")
    assert limits.metrics.registry.get_sample_value(
        "coordinator_limit_held_total", {"limit": "kind_running"}) == 2


@pytest.mark.parametrize("rate", ["5/s", "300/min", "1000/h", "0.5/s"])
def test_rates_in_settings(rate: str) -> None:
    assert FleetLimits.model_validate({"kinds": {"k": {"rate": rate}}}).kinds["k"].per_second


@pytest.mark.parametrize("rate", ["5", "5/day", "-1/s", "x/s"])
def test_bad_rates_are_refused_clearly(rate: str) -> None:
    with pytest.raises(ConfigError, match="rate must look like 5/s"):
        load_settings(fleet={"kinds": {"security": {"rate": rate}}})


def test_bad_weights_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="weights must be positive"):
        load_settings(scheduling={"weights": {"alice": 0}})
