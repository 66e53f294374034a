"""Priorities, fleet-wide limits and admission control on a real RabbitMQ, with SDK agents."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring

from .conftest import OPERATOR, OTHER_OPERATOR, StartWorker
from .helpers import wait_until

MakeCoordinator = Callable[..., Awaitable[CoordinatorAgent]]


@pytest.fixture
async def make_coordinator(settings: Settings, keyring: Keyring, cleanup_namespace: None
                           ) -> AsyncIterator[MakeCoordinator]:
    """A coordinator with extra settings (scheduling, fleet)."""
    started: list[CoordinatorAgent] = []

    async def make(**update: object) -> CoordinatorAgent:
        tuned = settings.model_copy(update={
            key: type(getattr(settings, key)).model_validate(value)
            for key, value in update.items()})
        agent = CoordinatorAgent(tuned, keyring, registry=CollectorRegistry())
        await agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        await agent.stop()


async def test_mixed_priorities_are_served_high_first(
    make_coordinator: MakeCoordinator, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    coordinator = await make_coordinator(scheduling={"aging_s": 0})
    ids = {}
    for priority in ("low", "medium", "high", 1, "high", "low"):
        task_id = await client.submit(f"noop {priority}", priority=priority,
                                      input={"op": "noop"})
        ids[task_id] = priority
    await wait_until(lambda: len(coordinator.dispatcher.pending) == len(ids), 10, "all queued")
    # Pending tasks carry their band; the task view shows it.
    first = coordinator.get_task(next(iter(ids))).public_view()
    assert first["priority"] == 2
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{coordinator.monitoring.port}/api/tasks/{next(iter(ids))}"
    ) as response:
        view = await response.json()
    assert view["priority"] == 2
    assert view["queue"]["band"] == 2 and view["queue"]["waited_s"] >= 0
    await start_worker("agent-1", max_concurrency=1)  # one slot: the order is the queue's
    results = await asyncio.gather(*(client.wait(t, 20) for t in ids))
    assert {r.status for r in results} == {"succeeded"}
    started = sorted(ids, key=lambda t: coordinator.get_task(t).attempts[0].started_at)
    assert [ids[t] for t in started] == ["high", "high", "medium", "low", "low", 1]


async def test_priority_from_urgency_words_and_shown_in_route(
    make_coordinator: MakeCoordinator, client: CoordinatorClient
) -> None:
    coordinator = await make_coordinator()
    urgent = await client.submit("fix this outage immediately", input={"op": "noop"})
    await wait_until(lambda: coordinator.state.find_task(urgent) is not None, 10, "accepted")
    assert coordinator.get_task(urgent).priority == 9
    explained = coordinator.explain_route("whenever you have time, tidy up", kind=None,
                                          required_capabilities=[])
    assert explained["priority"] == "low"
    assert explained["held"] is None


async def test_a_kind_limit_holds_across_agents_and_is_visible(
    make_coordinator: MakeCoordinator, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    coordinator = await make_coordinator(fleet={"kinds": {"general": {"max_running": 2}}})
    await start_worker("agent-1", max_concurrency=4)
    await start_worker("agent-2", max_concurrency=4)
    await wait_until(lambda: coordinator.state.count_by_liveness()["healthy"] == 2, 5, "agents")
    ids = [await client.submit(f"sleep {i}", kind="general",
                               input={"op": "sleep", "seconds": 0.3}) for i in range(8)]
    peak = 0
    held_seen = False

    async def watch() -> None:
        nonlocal peak, held_seen
        while True:
            running = sum(len(a.in_flight) for a in coordinator.state.agents.values())
            peak = max(peak, running)
            held_seen = held_seen or any(
                coordinator.get_task(t).routing.get("held") == "general at its limit of 2 running"
                for t in ids if coordinator.state.find_task(t) is not None)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(client.wait(t, 30) for t in ids))
    watcher.cancel()
    assert {r.status for r in results} == {"succeeded"}
    assert peak == 2, f"{peak} ran at once; the limit is 2"
    assert held_seen
    # Both agents had work: the limit is the fleet's, not each agent's.
    assert {r.attempts[-1].agent_id for r in results} == {"agent-1", "agent-2"}
    held = coordinator.metrics.registry.get_sample_value(
        "coordinator_limit_held_total", {"limit": "kind_running"})
    assert held is not None and held > 0
    # route says so while the kind is at its limit.
    busy = [await client.submit(f"busy {i}", kind="general",
                                input={"op": "sleep", "seconds": 1}) for i in range(2)]
    await wait_until(lambda: all(coordinator.get_task(t).status.value == "running"
                                 for t in busy if coordinator.state.find_task(t)), 10, "running")
    explained = coordinator.explain_route("anything", kind="general", required_capabilities=[])
    assert explained["held"] == "general at its limit of 2 running"


async def test_limits_apply_to_the_children_of_a_workflow(
    make_coordinator: MakeCoordinator, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    coordinator = await make_coordinator(fleet={"kinds": {"general": {"max_running": 1}}})
    await start_worker("agent-1", max_concurrency=4)
    parent = await client.submit("four parts", subtasks=[
        {"description": f"part {i}", "kind": "general", "input": {"op": "sleep", "seconds": 0.2}}
        for i in range(4)])
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(coordinator.state.agents["agent-1"].in_flight)
                       if "agent-1" in coordinator.state.agents else 0)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    done = await client.wait(parent, 30)
    watcher.cancel()
    assert done.status == "succeeded"
    assert peak == 1


async def test_a_principal_rate_limit_spaces_its_tasks(
    make_coordinator: MakeCoordinator, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    coordinator = await make_coordinator(
        fleet={"principals": {OPERATOR: {"rate": "10/s", "burst": 1}}})
    await start_worker("agent-1", max_concurrency=8)
    ids = [await client.submit(f"noop {i}", input={"op": "noop"}) for i in range(5)]
    results = await asyncio.gather(*(client.wait(t, 20) for t in ids))
    assert {r.status for r in results} == {"succeeded"}
    starts = sorted(coordinator.get_task(t).attempts[0].started_at for t in ids)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.09, gaps  # one token every 100 ms (a little timer slack)


async def test_admission_control_over_http_and_amqp(
    make_coordinator: MakeCoordinator, keyring: Keyring, client: CoordinatorClient,
    settings: Settings,
) -> None:
    coordinator = await make_coordinator(
        fleet={"default_principal": {"max_backlog": 3}, "retry_after_s": 2.5})
    token = keyring.principals[OTHER_OPERATOR].api_token
    assert token is not None
    url = f"http://127.0.0.1:{coordinator.monitoring.port}/api/tasks"
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
    async with aiohttp.ClientSession() as http:
        codes = []
        for i in range(4):  # no agent: they stay pending
            async with http.post(url, json={"description": f"t{i}"}, headers=headers) as resp:
                codes.append(resp.status)
                body = await resp.json()
                retry_after = resp.headers.get("Retry-After")
        assert codes == [202, 202, 202, 429]
        assert retry_after == "3"
        assert "has 3 tasks waiting, its limit is 3" in body["error"]
    # Another principal has a backlog of its own; past it, the AMQP client hears why.
    ids = [await client.submit(f"a{i}") for i in range(4)]
    rejected = await client.wait(ids[-1], 10)
    assert rejected.status == "rejected"
    assert rejected.retry_after_s == 2.5
    assert "limit is 3" in (rejected.error or "")
    refused = coordinator.metrics.registry.get_sample_value(
        "coordinator_admission_refused_total")
    assert refused == 2


async def test_a_kind_that_fills_up_is_not_routed_again_in_the_same_pass(
    make_coordinator: MakeCoordinator, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    """A backlog for a kind with one slot, while another kind has free slots: each pass places
    one task, then gives up on the kind, instead of routing every waiting task of it again."""
    coordinator = await make_coordinator()
    await start_worker("agent-1", "narrow", max_concurrency=1)
    await start_worker("agent-2", "general", max_concurrency=4)  # slots the backlog cannot use
    await wait_until(lambda: sum(a.assignable for a in coordinator.state.agents.values()) == 2,
                     10, "both agents")
    tasks = 30
    ids = await client.submit_many(
        [{"description": "noop", "kind": "narrow", "input": {"op": "noop"}}] * tasks)
    done = await asyncio.gather(*(client.wait(task_id, 60) for task_id in ids))
    assert [d.status for d in done] == ["succeeded"] * tasks
    decisions = coordinator.metrics.registry.get_sample_value(
        "coordinator_dispatch_decision_seconds_count")
    # One decision per task placed, and about one more per pass for the kind found full;
    # routing every waiting task on every pass would take about tasks * (tasks + 1) / 2.
    assert decisions is not None and tasks <= decisions <= 3 * tasks
