"""Discovery through a real Consul, and liveness from Consul plus AMQP heartbeats.

Bounds these tests hold the code to (with the test settings: heartbeat 0.2 s, TTL 3 s):
- a new agent is assignable as soon as its hello is handled (under 1 s from start);
- it is in Consul's catalogue, passing, within 3 s;
- an agent killed with SIGKILL is dead in the coordinator within dead_after x heartbeat + 1 s,
  and critical in Consul within its TTL + 3 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.liveness import AgentLiveness, RegistryHealth
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.exceptions import NotRegistered
from coordinator_agent.registry import (
    AgentService,
    ConsulRegistry,
    RegisteredAgent,
    coordinator_service_id,
)
from coordinator_agent.settings import Settings

from ..conftest import StartWorker
from ..helpers import spawn, subprocess_env, task_is, wait_until
from .conftest import REGISTRY, check_status, consul_get, in_catalogue, quietly


async def test_register_watch_drain_expire_deregister_round_trip(
    consul_url: str, coordinator_name: str
) -> None:
    registry = ConsulRegistry(consul_url, REGISTRY)
    service = AgentService("rt-agent-" + uuid.uuid4().hex[:6], "security", coordinator_name,
                           ("sbom", "scan"), 4, "1.2.3", "ca.x.agent.rt")
    try:
        await registry.register_agent(service)
        index, listed = await registry.watch_agents(coordinator_name, 0)
        assert listed == [RegisteredAgent(service, RegistryHealth.PASSING)]
        _, others = await registry.watch_agents(f"{coordinator_name}-other", 0)
        assert others == []  # filtered server-side by the coordinator named in the meta

        # A blocking query returns as soon as the check changes, not at the end of its wait.
        watch = asyncio.create_task(registry.watch_agents(coordinator_name, index))
        await asyncio.sleep(0.3)
        assert not watch.done()
        await registry.mark_draining(service.agent_id)
        changed, listed = await asyncio.wait_for(watch, 3)
        assert changed > index and listed[0].health is RegistryHealth.WARNING

        # No refresh for a TTL: critical.
        started = time.monotonic()
        index = changed
        while listed[0].health is not RegistryHealth.CRITICAL:
            assert time.monotonic() - started < REGISTRY.ttl_s + 3, "TTL check never expired"
            index, listed = await registry.watch_agents(coordinator_name, index)
        await registry.refresh_agent(service.agent_id)
        _, listed = await registry.watch_agents(coordinator_name, 0)
        assert listed[0].health is RegistryHealth.PASSING

        await registry.deregister_agent(service.agent_id)
        assert (await registry.watch_agents(coordinator_name, 0))[1] == []
        with pytest.raises(NotRegistered):
            await registry.refresh_agent(service.agent_id)
    finally:
        await quietly(registry.deregister_agent(service.agent_id))
        await registry.close()


async def test_coordinator_registers_itself_with_an_http_check_and_leaves_on_stop(
    coordinator: CoordinatorAgent, consul_url: str,
) -> None:
    service_id = coordinator_service_id(coordinator.settings.name)
    service = REGISTRY.coordinator_service
    await wait_until(lambda: check_status(consul_url, service_id, service) == "passing", 10,
                     "Consul's HTTP check on /healthz to pass")
    (check,) = [c for c in consul_get(consul_url, "/v1/agent/checks")
                .values() if c["ServiceID"] == service_id]
    assert check["Type"] == "http"
    assert "HTTP GET" in check["Output"] and "/healthz" in check["Output"]
    assert coordinator.registry_state == "ok"
    await coordinator.stop()
    assert check_status(consul_url, service_id, service) is None


async def test_a_new_agent_is_in_consul_and_gets_work_at_once(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    consul_url: str,
) -> None:
    task_id = await client.submit("waiting for a probe", kind="probe", input={"op": "noop"})
    started = time.time()
    await start_worker("agent-1", "probe", capabilities=["scan"])
    result = await client.wait(task_id, 10)
    assert result.status == "succeeded"
    first_assignment = coordinator.state.get_task(task_id).attempts[0].started_at
    assert first_assignment - started < 1.0

    await wait_until(lambda: in_catalogue(consul_url, REGISTRY.agent_service, "agent-1"), 3,
                     "agent-1 in Consul's catalogue")
    node = consul_get(consul_url, f"/v1/health/service/{REGISTRY.agent_service}",
                      filter='Service.ID == "agent-1"')[0]
    # Its batch limit is announced like a capability (PROTOCOL.md §9.13).
    assert set(node["Service"]["Tags"]) == {"kind:probe", "cap:scan", "cap:batch:16"}
    assert node["Service"]["Meta"]["coordinator"] == coordinator.settings.name
    assert node["Service"]["Meta"]["max_concurrency"] == "4"
    await wait_until(
        lambda: coordinator.state.agents["agent-1"].registry is RegistryHealth.PASSING, 3,
        "the coordinator's watch to see agent-1 passing")

    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{coordinator.monitoring.port}/api/agents"
        async with http.get(url) as response:
            (agent,) = (await response.json())["agents"]
    assert (agent["liveness"], agent["liveness_reason"]) == ("healthy", "ok")
    assert agent["signals"]["consul"] == "passing"
    assert agent["signals"]["amqp"]["heard"] is True


async def test_an_agent_killed_with_sigkill_turns_critical_and_its_task_moves(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings, consul_url: str, tmp_path: Path,
) -> None:
    env = subprocess_env(settings, COORDINATOR_REGISTRY_URL=consul_url,
                         COORDINATOR_REGISTRY__TTL_S=str(REGISTRY.ttl_s))
    doomed = spawn(["worker", "--id", "agent-1", "--concurrency", "1"], env,
                   tmp_path / "agent-1.log")
    try:
        await wait_until(lambda: check_status(consul_url, "agent-1") == "passing", 15,
                         "agent-1 registered and passing in Consul")
        task_id = await client.submit("slow", input={"op": "sleep", "seconds": 1.5})
        await wait_until(task_is(coordinator, task_id, "running"), 10,
                         "the task running on agent-1")
        await start_worker("agent-2")
        doomed.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        liveness = settings.liveness
        dead_bound = liveness.heartbeat_interval_s * liveness.dead_after + 1.0
        await wait_until(
            lambda: coordinator.state.agents["agent-1"].liveness is AgentLiveness.DEAD,
            dead_bound, "agent-1 dead in the coordinator")
        await wait_until(lambda: check_status(consul_url, "agent-1") == "critical",
                         REGISTRY.ttl_s + 3 - (time.monotonic() - killed),
                         "agent-1 critical in Consul")
        await wait_until(
            lambda: coordinator.state.agents["agent-1"].registry is RegistryHealth.CRITICAL, 3,
            "the coordinator to see agent-1 critical")
        result = await client.wait(task_id, 20)
    finally:
        doomed.kill()
        doomed.wait()
    assert result.status == "succeeded"
    assert [(a.agent_id, a.outcome) for a in result.attempts] == [
        ("agent-1", "crashed"), ("agent-2", "succeeded")]


async def test_passing_in_consul_but_silent_on_amqp_gets_no_new_work(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    consul_url: str,
) -> None:
    quiet = await start_worker("agent-1")
    await start_worker("agent-2")
    agents = coordinator.state.agents
    await wait_until(lambda: all(agents[a].registry is RegistryHealth.PASSING
                                 for a in ("agent-1", "agent-2")), 5, "both passing in Consul")
    assert quiet._heartbeat is not None
    quiet._heartbeat.cancel()  # the process lives on and keeps its Consul check passing
    await wait_until(lambda: not agents["agent-1"].assignable, 3, "agent-1 out of rotation")
    assert agents["agent-1"].liveness_reason == "silent"

    task_ids = [await client.submit(f"t{i}", input={"op": "noop"}) for i in range(6)]
    results = [await client.wait(t, 10) for t in task_ids]
    assert {r.attempts[-1].agent_id for r in results} == {"agent-2"}
    assert check_status(consul_url, "agent-1") == "passing"
    assert agents["agent-1"].registry is RegistryHealth.PASSING


async def test_an_agent_known_only_to_consul_is_listed_but_gets_no_work(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    consul_url: str,
) -> None:
    registry = ConsulRegistry(consul_url, REGISTRY)
    try:
        await registry.register_agent(AgentService("agent-3", "general", coordinator.settings.name))
        await wait_until(lambda: "agent-3" in coordinator.state.agents, 5, "agent-3 listed")
        assert coordinator.state.agents["agent-3"].liveness is AgentLiveness.REGISTERED
        task_id = await client.submit("needs a real agent", input={"op": "noop"})
        await asyncio.sleep(0.5)
        assert coordinator.state.get_task(task_id).attempts == []
        await start_worker("agent-2")
        result = await client.wait(task_id, 10)
        assert [a.agent_id for a in result.attempts] == ["agent-2"]
    finally:
        await registry.deregister_agent("agent-3")
        await registry.close()
    await wait_until(lambda: "agent-3" not in coordinator.state.agents, 5,
                     "agent-3 forgotten once deregistered")


