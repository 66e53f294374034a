"""The learning router with real agents of several kinds over the real broker."""

from __future__ import annotations

import asyncio
import itertools
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client import CollectorRegistry

from coordinator_agent.agent.worker import TaskContext
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring

from .conftest import StartWorker
from .helpers import wait_until

CVE = "Scan repository for CVE-2024-12345 vulnerability"
DEPLOY = "Deploy release 2.3 to staging"
REFACTOR = "Refactor the payment module"


async def fleet(start_worker: StartWorker, coordinator: CoordinatorAgent, **handlers: Any) -> None:
    for agent_id, kind in (("agent-1", "development"), ("agent-2", "security"),
                           ("agent-3", "cicd")):
        if kind in handlers:
            await start_worker(agent_id, kind, handler=handlers[kind])
        else:
            await start_worker(agent_id, kind)
    await wait_until(lambda: sum(a.assignable for a in coordinator.state.agents.values()) == 3,
                     5, "three agents")


async def run(client: CoordinatorClient, coordinator: CoordinatorAgent, description: str,
              **fields: Any) -> tuple[Any, dict[str, Any]]:
    task_id = await client.submit(description, input={"op": "noop"}, **fields)
    result = await client.wait(task_id, 20)
    return result, coordinator.state.get_task(task_id).routing


async def test_descriptions_go_to_the_kind_that_matches(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    await fleet(start_worker, coordinator)
    expected = {CVE: ("security", "agent-2"), DEPLOY: ("cicd", "agent-3"),
                REFACTOR: ("development", "agent-1")}
    for description, (kind, agent) in expected.items():
        result, routing = await run(client, coordinator, description)
        assert result.status == "succeeded"
        assert (routing["kind"], result.attempts[0].agent_id) == (kind, agent), description
        assert routing["confidence"] >= routing["threshold"]
        assert routing["fallback_used"] is False
        assert {a["kind"] for a in routing["alternatives"]} <= {"development", "security",
                                                                "cicd"}

    # The same explanation over HTTP, with the agent it would pick, and nothing submitted.
    submitted = coordinator.state.totals["submitted"]
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{coordinator.monitoring.port}"
        async with http.get(f"{base}/api/route", params={"description": CVE}) as response:
            explained = await response.json()
        async with http.get(f"{base}/api/route") as response:
            assert response.status == 400
        async with http.get(f"{base}/api/routing") as response:
            stats = await response.json()
    assert (explained["kind"], explained["agent"]) == ("security", "agent-2")
    parts = explained["kinds"]["security"]["parts"]
    assert parts["domain"] == 1.0 and explained["kinds"]["security"]["confidence"] > 0.6
    assert coordinator.state.totals["submitted"] == submitted
    assert stats["decisions"] == 3 and stats["accuracy"] == 1.0
    assert stats["kinds"]["security"]["success_rate"] > 0.5


async def test_confidence_rises_with_repeated_success(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    await fleet(start_worker, coordinator)
    confidences = []
    for _ in range(20):
        result, routing = await run(client, coordinator, CVE)
        assert result.status == "succeeded" and routing["kind"] == "security"
        confidences.append(routing["confidence"])
    assert all(b >= a for a, b in itertools.pairwise(confidences)), confidences
    assert confidences[-1] > confidences[0] + 0.1, confidences
    assert confidences[-1] <= 1.0
    # Steps shrink as evidence piles up: it approaches a bound instead of jumping to it.
    assert confidences[1] - confidences[0] > confidences[-1] - confidences[-2]
    metrics = coordinator.metrics.registry
    coordinator.refresh_gauges()
    assert metrics.get_sample_value("coordinator_routing_accuracy_ratio") == 1.0
    assert metrics.get_sample_value("coordinator_routing_kind_success_ratio",
                                    {"kind": "security"}) == 1.0


async def test_repeated_failures_make_the_router_switch_kind(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    async def broken_scanner(task: TaskContext) -> Any:
        raise RuntimeError("scanner database is corrupt")

    await fleet(start_worker, coordinator, security=broken_scanner)
    first_kinds = []
    for _ in range(6):
        result, routing = await run(client, coordinator, CVE, max_retries=0)
        first_kinds.append(routing["chain"][0]["kind"])
        if first_kinds[-1] != "security":
            assert result.status == "succeeded"
    assert first_kinds[0] == "security"
    switched = first_kinds.index(next(k for k in first_kinds if k != "security"))
    assert all(k != "security" for k in first_kinds[switched:]), first_kinds
    stats = coordinator.planner.snapshot()
    assert stats["kinds"]["security"]["success_rate"] < 0.5


async def test_a_timed_out_agents_task_falls_back_to_the_next_kind(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    async def hung_scanner(task: TaskContext) -> Any:
        await asyncio.sleep(60)

    await fleet(start_worker, coordinator, security=hung_scanner)
    result, routing = await run(client, coordinator, CVE, timeout_s=0.5, max_retries=3)
    assert result.status == "succeeded"
    kinds = [entry["kind"] for entry in routing["chain"]]
    # The SDK gives up on its own at the deadline and says so (the coordinator's own deadline
    # is the backstop for agents that say nothing).
    first, second, third = result.attempts
    assert "timed out" in (first.error or "") and "timed out" in (second.error or "")
    assert third.outcome == "succeeded"
    # The retry policy gives security one more try, then the chain moves to the next kind.
    assert kinds[:2] == ["security", "security"] and kinds[2] != "security", kinds
    assert routing["chain"][2]["reason"] == "fallback_chain"
    assert coordinator.metrics.registry.get_sample_value(
        "coordinator_routing_fallbacks_total", {"reason": "alternative"}) == 1


async def test_hedge_races_the_top_two_kinds_and_keeps_the_first_good_result(
    settings: Settings, keyring: Keyring, start_worker: StartWorker, client: CoordinatorClient,
    cleanup_namespace: None, tmp_path: Path,
) -> None:
    default = files("coordinator_agent.routing").joinpath("data/routing.yaml")
    config = yaml.safe_load(default.read_text())
    config["hedge"] = {"enabled": True, "margin": 1.0}  # every decision is "close"
    (tmp_path / "routing.yaml").write_text(yaml.safe_dump(config))
    hedged = settings.model_copy(update={"routing_config": tmp_path / "routing.yaml"})
    coordinator = CoordinatorAgent(hedged, keyring, registry=CollectorRegistry())
    await coordinator.start()
    try:
        async def slow_scanner(task: TaskContext) -> Any:
            await asyncio.sleep(3)
            return "slow"

        await start_worker("agent-1", "development")
        await start_worker("agent-2", "security", handler=slow_scanner)
        await wait_until(lambda: len(coordinator.state.agents) == 2, 5, "two agents")
        task_id = await client.submit(CVE, input={"op": "echo", "value": "fast"})
        result = await client.wait(task_id, 10)
        parent = coordinator.state.get_task(task_id)
        children = [coordinator.state.get_task(c) for c in parent.child_ids]
    finally:
        await coordinator.stop()
    assert result.status == "succeeded"
    assert {c.kind for c in children} == {"security", "development"}
    winner = next(c for c in children if c.status.value == "succeeded")
    assert winner.kind == "development" and result.output == winner.output
    loser = next(c for c in children if c is not winner)
    assert loser.status.value == "cancelled"
