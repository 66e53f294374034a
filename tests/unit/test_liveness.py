"""Liveness from two signals (AMQP heartbeats and registry health), and the registry helpers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from coordinator_agent.coordinator.liveness import AgentLiveness, RegistryHealth, judge
from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.exceptions import ConfigError, DiscoveryError, NotRegistered
from coordinator_agent.registry import (
    AgentService,
    ConsulRegistry,
    Episode,
    InMemoryRegistry,
    RegisteredAgent,
    registry_from_settings,
)
from coordinator_agent.settings import Liveness, RegistrySettings, load_settings
from coordinator_agent.wire import protocol

CONFIG = Liveness(heartbeat_interval_s=2, suspect_after=2.5, dead_after=5, recover_after=2)
SUSPECT_S = 5.0  # 2 s x 2.5
DEAD_S = 10.0  # 2 s x 5
T0 = 1_000.0


def verdict(
    current: AgentLiveness = AgentLiveness.HEALTHY, *, heard: bool = True, silent_s: float = 0.0,
    registry: RegistryHealth | None = None, draining: bool = False, beats: int = 5,
) -> tuple[AgentLiveness, str]:
    v = judge(current, heard=heard, silent_s=silent_s, registry=registry,
              reported_draining=draining, beats_since_suspect=beats, config=CONFIG)
    return v.liveness, v.reason


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, (AgentLiveness.HEALTHY, "ok")),
        ({"registry": RegistryHealth.PASSING}, (AgentLiveness.HEALTHY, "ok")),
        ({"heard": False, "registry": RegistryHealth.PASSING},
         (AgentLiveness.REGISTERED, "not_heard")),
        ({"silent_s": SUSPECT_S - 0.01}, (AgentLiveness.HEALTHY, "ok")),
        ({"silent_s": SUSPECT_S}, (AgentLiveness.SUSPECT, "silent")),
        # Consul passing does not save an agent that stopped heartbeating.
        ({"silent_s": SUSPECT_S, "registry": RegistryHealth.PASSING},
         (AgentLiveness.SUSPECT, "silent")),
        ({"silent_s": DEAD_S, "registry": RegistryHealth.PASSING},
         (AgentLiveness.DEAD, "silent")),
        # Critical in Consul but heartbeating: no new work, but not dead (tasks may finish).
        ({"registry": RegistryHealth.CRITICAL}, (AgentLiveness.SUSPECT, "registry_critical")),
        # Missing from the registry (e.g. a restarted dev Consul forgot it): shown, not judged.
        ({"registry": RegistryHealth.ABSENT}, (AgentLiveness.HEALTHY, "ok")),
        # Both signals agree: dead before the heartbeat limit alone would say so.
        ({"registry": RegistryHealth.CRITICAL, "silent_s": SUSPECT_S},
         (AgentLiveness.DEAD, "silent_and_critical")),
        ({"draining": True}, (AgentLiveness.DRAINING, "draining")),
        ({"registry": RegistryHealth.WARNING}, (AgentLiveness.DRAINING, "draining")),
        ({"draining": True, "silent_s": SUSPECT_S}, (AgentLiveness.DRAINING, "draining")),
        ({"draining": True, "silent_s": DEAD_S}, (AgentLiveness.DEAD, "silent")),
        # Hysteresis: a suspect agent needs recover_after on-time beats.
        ({"current": AgentLiveness.SUSPECT, "beats": 1}, (AgentLiveness.SUSPECT, "recovering")),
        ({"current": AgentLiveness.SUSPECT, "beats": 2}, (AgentLiveness.HEALTHY, "ok")),
    ],
)
def test_judge(kwargs: dict[str, object], expected: tuple[AgentLiveness, str]) -> None:
    assert verdict(**kwargs) == expected  # type: ignore[arg-type]


def _hello() -> protocol.AgentHello:
    return protocol.AgentHello(kind="security", capabilities=["scan"], max_concurrency=2)


def _listing(agent_id: str, health: RegistryHealth = RegistryHealth.PASSING) -> RegisteredAgent:
    return RegisteredAgent(AgentService(agent_id, "security", "c", ("scan",), 3, "9.9", "q"),
                           health)


@pytest.fixture
def state(tmp_path: Path) -> StateManager:
    return StateManager(TaskStore(tmp_path / "s.sqlite3"), CONFIG)


def test_agent_only_in_the_registry_is_listed_but_never_assignable(state: StateManager) -> None:
    died, woke = state.observe_registry([_listing("a1")], T0)
    record = state.agents["a1"]
    assert (died, woke) == ([], False)
    assert (record.liveness, record.heard, record.registry) == (
        AgentLiveness.REGISTERED, False, RegistryHealth.PASSING)
    assert (record.kind, record.capabilities, record.max_concurrency) == (
        "security", frozenset({"scan"}), 3)
    assert not record.assignable
    # Time passing does not make it dead (it never spoke) nor assignable.
    state.sweep_liveness(T0 + 100)
    assert record.liveness is AgentLiveness.REGISTERED
    # Its hello makes it healthy at once.
    _, became_assignable = state.observe_agent("a1", _hello(), T0 + 101)
    assert became_assignable and record.liveness is AgentLiveness.HEALTHY
    # Dropped from the registry before ever speaking: forgotten.
    state.observe_registry([_listing("a2")], T0)
    state.observe_registry([], T0)
    assert "a2" not in state.agents


def test_registry_critical_takes_a_heartbeating_agent_out_of_rotation(
    state: StateManager,
) -> None:
    record, _ = state.observe_agent("a1", _hello(), T0)
    state.observe_registry([_listing("a1")], T0)
    assert record.assignable
    died, _ = state.observe_registry([_listing("a1", RegistryHealth.CRITICAL)], T0 + 1)
    assert died == []
    assert (record.liveness, record.liveness_reason) == (AgentLiveness.SUSPECT,
                                                         "registry_critical")
    # Passing again, but the hysteresis asks for on-time beats first.
    _, woke = state.observe_registry([_listing("a1")], T0 + 2)
    assert not woke and record.liveness is AgentLiveness.SUSPECT
    state.observe_agent("a1", _hello(), T0 + 2.5)
    state.observe_agent("a1", _hello(), T0 + 3)
    assert record.liveness is AgentLiveness.HEALTHY


def test_critical_and_silent_is_dead_sooner_than_silence_alone(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), T0)
    state.observe_registry([_listing("a1")], T0)
    assert state.sweep_liveness(T0 + SUSPECT_S) == []
    critical = [_listing("a1", RegistryHealth.CRITICAL)]
    died, _ = state.observe_registry(critical, T0 + SUSPECT_S + 0.1)
    assert died == [record]
    assert record.liveness_reason == "silent_and_critical"


def test_an_agent_gone_from_the_registry_is_shown_absent_and_keeps_working(
    state: StateManager,
) -> None:
    record, _ = state.observe_agent("a1", _hello(), T0)
    state.observe_registry([_listing("a1")], T0)
    state.observe_registry([], T0 + 1)
    assert record.registry is RegistryHealth.ABSENT
    assert record.assignable


def test_an_agent_that_never_registered_runs_on_heartbeats_alone(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), T0)
    state.observe_registry([], T0)
    assert record.registry is None
    assert record.assignable


def test_an_unreachable_registry_is_no_signal(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), T0)
    state.observe_registry([_listing("a1", RegistryHealth.CRITICAL)], T0)
    assert record.liveness is AgentLiveness.SUSPECT
    state.registry_lost()
    state.observe_agent("a1", _hello(), T0 + 1)
    state.observe_agent("a1", _hello(), T0 + 2)
    assert record.liveness is AgentLiveness.HEALTHY  # judged on heartbeats alone
    view = record.public_view(T0 + 2)
    assert view["signals"] == {"amqp": {"heard": True, "last_seen_s": 0.0},
                               "consul": "critical"}


def test_agent_service_survives_a_trip_through_consul_fields() -> None:
    service = AgentService("a-1", "cicd", "coord", ("deploy", "k8s"), 8, "1.0", "ca.c.agent.a-1")
    raw = {"ID": service.agent_id, "Tags": service.tags(), "Meta": service.meta()}
    assert AgentService.from_consul(raw) == service
    # Garbage meta from someone else's registration does not crash the watch.
    odd = AgentService.from_consul({"ID": "x", "Tags": None, "Meta": {"max_concurrency": "lots"}})
    assert (odd.max_concurrency, odd.capabilities, odd.kind) == (1, (), "")


def test_episode_logs_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    episode = Episode("service registry")
    with caplog.at_level(logging.INFO, logger="coordinator_agent.registry"):
        assert episode.failed(DiscoveryError("watch", "refused"), 1.0)
        assert not episode.failed(DiscoveryError("watch", "refused"), 2.0)
        assert not episode.failed(DiscoveryError("watch", "refused"), 3.0)
        assert episode.degraded
        assert episode.succeeded(4.0)
        assert not episode.succeeded(5.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "refused" in messages[0] and "back after 3.0s (3 failed calls)" in messages[1]


async def test_in_memory_registry_behaves_like_a_registry() -> None:
    registry = InMemoryRegistry()
    service = AgentService("a1", "general", "c")
    with pytest.raises(NotRegistered):
        await registry.refresh_agent("a1")
    await registry.register_agent(service)
    index, listed = await registry.watch_agents("c", 0)
    assert listed == [RegisteredAgent(service, RegistryHealth.PASSING)]
    await registry.mark_draining("a1")
    later, listed = await registry.watch_agents("c", index)
    assert later > index and listed[0].health is RegistryHealth.WARNING
    registry.available = False
    with pytest.raises(DiscoveryError):
        await registry.watch_agents("c", later)


def test_registry_settings_and_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_CONFIG", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text("{}\n")
    assert registry_from_settings(load_settings()) is None
    settings = load_settings(registry_url="https://consul.internal:8501",
                             registry_token="s3cret-token")
    registry = registry_from_settings(settings)
    assert isinstance(registry, ConsulRegistry)
    assert registry.url == "https://consul.internal:8501"
    assert "s3cret" not in repr(registry) and "s3cret" not in repr(settings)
    with pytest.raises(ConfigError, match="registry_url"):
        load_settings(registry_url="consul:8500")
    with pytest.raises(ConfigError, match="ttl_s"):
        load_settings(registry={"ttl_s": 1})
    # The default refresh period (ttl / 3) keeps 1,000 agents at 25 calls/s on one Consul
    # agent: each costs it ~10 us per service it holds (bench/discovery.py), ~0.25 of a core.
    assert 1000 / (RegistrySettings().ttl_s / 3) <= 25
