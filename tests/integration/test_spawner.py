"""The local spawner on a real RabbitMQ: a burst of 40 tasks of a kind with no agent running
spawns agents up to the cap, the tasks complete (one agent is killed and restarted on the way),
and after the idle timeout the spawned agents drain and exit, their keys revoked."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings, SpawnerSettings
from coordinator_agent.wire.keyring import Keyring

from .helpers import wait_until

CAP = 3


@pytest.fixture
async def spawning_coordinator(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[CoordinatorAgent]:
    # Spawned workers read their settings like any worker: the test's liveness, from the env.
    liveness = settings.liveness
    monkeypatch.setenv("COORDINATOR_LIVENESS__HEARTBEAT_INTERVAL_S",
                       str(liveness.heartbeat_interval_s))
    monkeypatch.setenv("COORDINATOR_LIVENESS__SUSPECT_AFTER", str(liveness.suspect_after))
    monkeypatch.setenv("COORDINATOR_LIVENESS__DEAD_AFTER", str(liveness.dead_after))
    monkeypatch.setenv("COORDINATOR_LOG_LEVEL", "WARNING")
    tuned = settings.model_copy(update={"spawner": SpawnerSettings.model_validate({
        "backend": "local", "kinds": {"burst": {"min": 0, "max": CAP, "slots": 2}},
        "interval_s": 0.3, "idle_timeout_s": 2, "restart_backoff_s": 0.5, "stop_timeout_s": 15,
    })})
    coordinator = CoordinatorAgent(tuned, keyring, registry=CollectorRegistry())
    await coordinator.start()
    yield coordinator
    await coordinator.stop()


async def test_a_burst_spawns_agents_up_to_the_cap_and_they_go_when_idle(
    spawning_coordinator: CoordinatorAgent, client: CoordinatorClient, settings: Settings,
) -> None:
    coordinator = spawning_coordinator
    spawner = coordinator.spawner
    assert not spawner.agents and not coordinator.state.agents
    peak = 0
    seen: dict[str, int] = {}  # agent id -> pid

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(spawner.agents))
            for agent_id, spawned in spawner.agents.items():
                if spawned.process is not None:
                    seen.setdefault(agent_id, spawned.process.pid)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    ids = [await client.submit(f"burst {i}", kind="burst",
                               input={"op": "sleep", "seconds": 0.4}) for i in range(40)]
    await wait_until(lambda: len(spawner.agents) == CAP, 30, f"{CAP} spawned agents")
    await wait_until(lambda: sum(a.kind == "burst" and a.liveness.value == "healthy"
                                 for a in coordinator.state.agents.values()) == CAP, 30,
                     "the spawned agents connected")
    views = {v["id"]: v for v in coordinator.agents_view()}
    assert all(views[a]["spawned"]["state"] == "running" for a in spawner.agents)
    desired = coordinator.metrics.registry.get_sample_value(
        "coordinator_desired_agents", {"kind": "burst"})
    assert desired == CAP

    # A crash: the agent comes back, same id, after its backoff.
    victim = next(iter(spawner.agents.values()))
    assert victim.process is not None
    os.kill(victim.process.pid, signal.SIGKILL)
    await wait_until(lambda: victim.restarts == 1 and victim.state.value == "running", 15,
                     "the killed agent restarted")

    results = await asyncio.gather(*(client.wait(t, 90) for t in ids))
    assert [r.status for r in results] == ["succeeded"] * 40
    used = {r.attempts[-1].agent_id for r in results}
    assert used <= set(seen) and len(used) >= 2, (used, seen)
    assert peak == CAP, f"peak {peak}, cap {CAP}"

    # Idle: drained, stopped, forgotten, keys revoked.
    await wait_until(lambda: not spawner.agents, 45, "the spawned agents to go")
    watcher.cancel()
    for pid in seen.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    keyring = Keyring.load(settings.keyring_path)
    assert not set(seen) & set(keyring.principals)
    assert not list((settings.data_dir / f"{settings.name}.spawned").glob("*.keyring.json"))
    assert coordinator.metrics.registry.get_sample_value(
        "coordinator_spawner_restarts_total", {"kind": "burst"}) == 1
    assert coordinator.metrics.registry.get_sample_value(
        "coordinator_desired_agents", {"kind": "burst"}) == 0
