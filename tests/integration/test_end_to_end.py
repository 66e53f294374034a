"""Coordinator + SDK agents + client on a real RabbitMQ: the happy paths, API and metrics."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

from coordinator_agent.agent.examples import text_stats
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.wire.keyring import Keyring

from .conftest import OPERATOR, StartWorker
from .helpers import wait_until


async def test_two_agents_complete_tasks_end_to_end(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await start_worker("agent-1", max_concurrency=2)
    await start_worker("agent-2", max_concurrency=2)
    await wait_until(lambda: coordinator.state.count_by_liveness()["healthy"] == 2, 5,
                     "two healthy agents")

    texts = [f"Task number {i}. It has two sentences!" for i in range(20)]
    ids = [await client.submit(f"stats {i}", input={"op": "stats", "text": t})
           for i, t in enumerate(texts)]
    results = await asyncio.gather(*(client.wait(task_id, 20) for task_id in ids))

    assert [r.status for r in results] == ["succeeded"] * 20
    for result, text in zip(results, texts, strict=True):
        assert result.output == text_stats(text)
    by_agent = Counter(r.attempts[-1].agent_id for r in results)
    assert set(by_agent) == {"agent-1", "agent-2"}, by_agent
    assert coordinator.state.totals["succeeded"] == 20
    assert all(client.accepted[task_id].status == "pending" for task_id in ids)


async def test_required_capabilities_and_kind_route_to_matching_agent(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await start_worker("agent-1", "general", capabilities=["text"])
    await start_worker("agent-2", "crypto", capabilities=["hash"])
    await wait_until(lambda: len(coordinator.state.agents) == 2, 5, "agents")

    hashed = await client.submit("hash it", required_capabilities=["hash"],
                                 input={"op": "hash", "data": "x", "rounds": 3})
    by_kind = await client.submit("count words", kind="general")
    first, second = await client.wait(hashed, 10), await client.wait(by_kind, 10)
    assert first.attempts[-1].agent_id == "agent-2"
    assert second.attempts[-1].agent_id == "agent-1"


async def test_failing_task_is_retried_then_fails_with_the_whole_chain(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await start_worker("agent-1")
    await start_worker("agent-2")
    await wait_until(lambda: len(coordinator.state.agents) == 2, 5, "agents")

    task_id = await client.submit("always fails", input={"op": "fail", "message": "boom"},
                                  max_retries=2)
    result = await client.wait(task_id, 15)

    assert result.status == "failed"
    assert len(result.attempts) == 3
    assert all(a.outcome == "failed" and "boom" in (a.error or "") for a in result.attempts)
    # The retry went to the other agent before coming back.
    assert result.attempts[0].agent_id != result.attempts[1].agent_id


async def test_resubmitting_the_same_task_id_is_idempotent(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await start_worker("agent-1")
    task_id = await client.submit("once", task_id="fixed-id-1")
    first = await client.wait(task_id, 10)
    await client.submit("once", task_id="fixed-id-1")
    await wait_until(lambda: len(client.notices) >= 2, 5, "a second completion notice")

    assert first.status == "succeeded"
    assert client.accepted["fixed-id-1"].duplicate is True
    assert coordinator.state.totals["submitted"] == 1
    assert client.notices[0] == client.notices[1]


async def test_http_api_metrics_and_probes(
    coordinator: CoordinatorAgent, start_worker: StartWorker, keyring: Keyring
) -> None:
    await start_worker("agent-1")
    await wait_until(lambda: len(coordinator.state.agents) == 1, 5, "agent")
    base = f"http://127.0.0.1:{coordinator.monitoring.port}"
    token = keyring.principals[OPERATOR].api_token
    assert token is not None
    auth = {"Authorization": f"Bearer {token.get_secret_value()}"}

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.post(f"{base}/api/tasks", json={"description": "x"}) as r:
            assert r.status == 401
        async with http.post(f"{base}/api/tasks", json={"description": "x"},
                             headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with http.post(f"{base}/api/tasks", json={"nope": 1}, headers=auth) as r:
            assert r.status == 422
            fields = {p["field"] for p in (await r.json())["problems"]}
            assert {"description", "nope"} <= fields
        async with http.post(f"{base}/api/tasks", headers=auth,
                             json={"description": "Count these words please"}) as r:
            assert r.status == 202
            task_id = (await r.json())["task_id"]
        await wait_until(lambda: coordinator.state.get_task(task_id).status.terminal, 10,
                         "task done")
        async with http.get(f"{base}/api/tasks/{task_id}") as r:
            task = await r.json()
            assert task["status"] == "succeeded" and task["output"]["words"] == 4
            assert "reply_to" not in task
        async with http.get(f"{base}/api/tasks/does-not-exist") as r:
            assert r.status == 404
        async with http.get(f"{base}/api/agents") as r:
            agents = (await r.json())["agents"]
            assert [a["id"] for a in agents] == ["agent-1"]
            assert agents[0]["liveness"] == "healthy"
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
    for name in ("coordinator_message_latency_seconds_bucket", "coordinator_active_agents 1.0",
                 'coordinator_operations_total{operation_type="task_submit"}',
                 'coordinator_tasks_total{outcome="succeeded"} 1.0'):
        assert name in text, name
    for secret in (token.get_secret_value(), "guest:guest"):
        assert secret not in text
