"""How many agents the spawner wants (coordinator/spawner.py): demand per kind, min and max,
the global cap, and the metric KEDA reads. The processes themselves are tested on the real
broker (tests/integration/test_spawner.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator_agent.coordinator.spawner import AgentSpawner
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.tasks import TaskRecord
from coordinator_agent.exceptions import ConfigError
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.settings import SpawnerSettings, load_settings


def spawner(state: StateManager, tmp_path: Path, **config: object) -> AgentSpawner:
    return AgentSpawner(
        SpawnerSettings.model_validate({"backend": "kubernetes", **config}), state, Metrics(),
        name="c", broker_url="amqp://x", keyring_path=tmp_path / "k.json", data_dir=tmp_path,
        adopt_keyring=lambda _: None, send_drain=lambda *_: None, retiring=set())


def pending(state: StateManager, count: int, kind: str | None) -> None:
    for _ in range(count):
        state.add_task(TaskRecord(id=f"t{len(state.tasks)}", description="d", kind=kind))


def test_demand_over_slots_within_min_and_max(state: StateManager, tmp_path: Path) -> None:
    s = spawner(state, tmp_path, kinds={"security": {"min": 1, "max": 4, "slots": 2},
                                        "cicd": {"max": 3, "slots": 4}})
    assert s.desired() == {"security": 1, "cicd": 0}  # the minimum, with no work at all
    pending(state, 5, "security")
    pending(state, 1, "cicd")
    assert s.desired() == {"security": 3, "cicd": 1}
    pending(state, 50, "security")
    assert s.desired()["security"] == 4  # the kind's max


def test_running_tasks_count_and_unnamed_work_goes_to_the_default_kind(
    state: StateManager, tmp_path: Path,
) -> None:
    s = spawner(state, tmp_path, kinds={"general": {"max": 10, "slots": 2}},
                default_kind="general")
    agent = AgentRecord("general-1", "general", frozenset(), 2)
    agent.in_flight.update({"a", "b"})
    state.agents[agent.id] = agent
    pending(state, 3, None)
    assert s.desired() == {"general": 3}  # (2 running + 3 pending) / 2 slots


def test_a_growing_wait_asks_for_one_more_agent(state: StateManager, tmp_path: Path) -> None:
    s = spawner(state, tmp_path, wait_threshold_s=30,
                kinds={"slow": {"max": 5, "slots": 8}})
    agent = AgentRecord("slow-1", "slow", frozenset(), 8)
    agent.in_flight.update({"a", "b"})
    state.agents[agent.id] = agent
    pending(state, 1, "slow")
    now = state.tasks["t0"].updated_at
    assert s.desired(now + 10) == {"slow": 1}  # (2 + 1) / 8 slots
    assert s.desired(now + 31) == {"slow": 2}  # waited too long: one more than it has


def test_the_global_cap_is_shared_fairly(state: StateManager, tmp_path: Path) -> None:
    s = spawner(state, tmp_path, max_agents=5, kinds={
        "a": {"min": 1, "max": 10, "slots": 1}, "b": {"max": 10, "slots": 1},
        "c": {"max": 10, "slots": 1}})
    for kind in "abc":
        pending(state, 10, kind)
    wanted = s.desired()
    assert sum(wanted.values()) == 5
    assert sorted(wanted.values()) == [1, 2, 2]


async def test_the_desired_count_is_the_metric_keda_reads(
    state: StateManager, tmp_path: Path,
) -> None:
    s = spawner(state, tmp_path, kinds={"security": {"max": 4, "slots": 2}})
    await s.step(0.0)
    gauge = s.metrics.registry.get_sample_value
    assert gauge("coordinator_desired_agents", {"kind": "security"}) == 0  # scaled to zero
    pending(state, 3, "security")
    await s.step(1.0)
    assert gauge("coordinator_desired_agents", {"kind": "security"}) == 2  # and back
    assert not s.agents  # the kubernetes backend starts nothing itself


def test_max_below_min_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be at least min"):
        load_settings(spawner={"kinds": {"k": {"min": 3, "max": 1}}})
