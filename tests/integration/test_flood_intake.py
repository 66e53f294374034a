"""A flood on a real RabbitMQ. Answered, then acked (intake.py): a flood in an operator's lane
can have at most a lane's prefetch of answers on their way, however slowly the broker confirms
them, and every submission still gets exactly one answer. Read-ahead (readahead.py): past its
read-ahead, a flood is not read (lane) or admitted (HTTP) while another operator has work, and
is read again once that work is done. The sweep (sweep.py) looks at the fleet once per
constraint, not once per pending task, and still fails what nobody can run."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import LANE_PREFETCH, CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring

from .conftest import OTHER_OPERATOR, StartWorker
from .helpers import task_is, wait_until

FLOOD = 200
#: How long each answer takes to be confirmed here: a broker slow to confirm (a shared,
#: overloaded one), so that answers pile up unless intake waits for them.
SLOW_CONFIRM_S = 0.2


@pytest.fixture
def coordinator_name() -> str:
    return f"fair-intake-{uuid.uuid4().hex[:8]}"


class AnswersInFlight:
    """Counts the coordinator's answers to clients being published at once (a spy around the
    real publish: every message still goes through the broker, only later)."""

    def __init__(self, coordinator: CoordinatorAgent) -> None:
        self.now = 0
        self.most = 0
        real = coordinator.messages.publish

        async def publish(payload: protocol.Model, **kwargs: Any) -> protocol.Envelope:
            if not isinstance(payload, protocol.TaskAccepted | protocol.TaskCompleted):
                return await real(payload, **kwargs)
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                await asyncio.sleep(SLOW_CONFIRM_S)
                return await real(payload, **kwargs)
            finally:
                self.now -= 1

        coordinator.messages.publish = publish  # type: ignore[method-assign]


async def test_a_flood_has_at_most_a_lane_of_answers_on_their_way(
    coordinator: CoordinatorAgent, client: CoordinatorClient,
) -> None:
    spy = AnswersInFlight(coordinator)
    await coordinator.messages.pause_consuming()
    flood = [await client.submit(f"flood {i}", input={"op": "noop"}) for i in range(FLOOD)]
    await coordinator.messages.resume_consuming()
    await wait_until(lambda: all(t in client.accepted for t in flood), 120,
                     "every submission answered")
    # Acked only once answered: the lane's prefetch is the bound. Acked at once, the reads
    # run ahead of the slow answers and hundreds pile up on the connection.
    assert 1 <= spy.most <= LANE_PREFETCH, spy.most
    assert all(coordinator.state.tasks.get(t) is not None for t in flood)


async def test_past_the_backlog_limit_every_submission_is_accepted_or_rejected(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    limited = settings.model_copy(update={"fleet": settings.fleet.model_copy(update={
        "default_principal": settings.fleet.default_principal.model_copy(
            update={"max_backlog": 20}),
        "retry_after_s": 3.0})})
    coordinator = CoordinatorAgent(limited, keyring, registry=CollectorRegistry())
    await coordinator.start()
    try:
        coordinator.accepting = False  # no dispatch: the backlog only grows
        async with CoordinatorClient(limited, keyring, "operator-1") as client:
            spy = AnswersInFlight(coordinator)
            ids = [await client.submit(f"flood {i}") for i in range(60)]
            await wait_until(lambda: all(t in client.accepted or t in client.completed
                                         for t in ids), 60, "every submission answered")
            accepted = [t for t in ids if t in client.accepted]
            rejected = [client.completed[t] for t in ids if t in client.completed]
            assert len(accepted) == 20
            assert len(rejected) == 40
            assert all(r.status == "rejected" and r.retry_after_s == 3.0 for r in rejected)
            assert not set(accepted) & {r.task_id for r in rejected}
            assert spy.most <= LANE_PREFETCH
    finally:
        await coordinator.stop()


async def test_the_sweep_fails_pending_tasks_no_agent_can_run_and_keeps_the_rest(
    coordinator: CoordinatorAgent, client: CoordinatorClient, start_worker: StartWorker,
) -> None:
    await start_worker("agent-1", "general")
    await wait_until(lambda: "agent-1" in coordinator.state.agents, 20, "the agent's hello")
    coordinator.accepting = False  # nothing is dispatched: every task stays pending
    nobody = [await client.submit(f"nobody {i}", kind="absent", timeout_s=1) for i in range(3)]
    someone = [await client.submit(f"someone {i}", timeout_s=1) for i in range(3)]
    for task_id in nobody:
        await wait_until(task_is(coordinator, task_id, "failed"), 20, "the unrunnable failed")
        failed = coordinator.state.find_task(task_id)
        assert failed is not None and "no agent can run it" in (failed.error or "")
    # The general agent could run these: they wait for dispatch, past their timeout too.
    await asyncio.sleep(1.5)  # past their 1 s, and a few sweeps
    assert all(coordinator.state.tasks[t].status.value == "pending" for t in someone)
    coordinator.accepting = True
    coordinator.dispatcher.wake.set()
    for task_id in someone:
        await wait_until(task_is(coordinator, task_id, "succeeded"), 20, "the runnable done")


READ_AHEAD = 20


async def read_ahead_coordinator(settings: Settings, keyring: Keyring) -> CoordinatorAgent:
    """No agents yet: every backlog only grows."""
    tuned = settings.model_copy(update={"scheduling": settings.scheduling.model_copy(
        update={"read_ahead": READ_AHEAD})})
    coordinator = CoordinatorAgent(tuned, keyring, registry=CollectorRegistry())
    await coordinator.start()
    return coordinator


async def test_a_flood_lane_is_not_read_past_its_read_ahead_while_another_operator_waits(
    settings: Settings, keyring: Keyring, client: CoordinatorClient, start_worker: StartWorker,
    cleanup_namespace: None,
) -> None:
    coordinator = await read_ahead_coordinator(settings, keyring)
    try:
        async with CoordinatorClient(settings, keyring, OTHER_OPERATOR) as other:
            light = await other.submit("light", input={"op": "noop"})
            await wait_until(lambda: light in coordinator.state.tasks, 20, "the light task")
            flood = [await client.submit(f"flood {i}", input={"op": "noop"})
                     for i in range(FLOOD)]
            backlog = coordinator.dispatcher.pending.backlog
            await wait_until(lambda: backlog(client.principal_id) >= READ_AHEAD, 20,
                             "the flood read up to its read-ahead")
            await asyncio.sleep(1.0)  # time enough to read the whole flood, were it read
            # Deliveries already in hand when the read-ahead was reached may still go in.
            assert backlog(client.principal_id) <= READ_AHEAD + LANE_PREFETCH
            assert coordinator.read_ahead.holding.get(client.principal_id, 0) >= 1
            # The light task runs (the dispatcher serves it first), and then nobody else has
            # work: the flood is read to the end, and every task of it completes.
            await start_worker("agent-1", max_concurrency=8)
            await wait_until(task_is(coordinator, light, "succeeded"), 30, "the light task")
            for task_id in flood:
                await wait_until(task_is(coordinator, task_id, "succeeded"), 60, "the flood")
            held = coordinator.metrics.registry.get_sample_value(
                "coordinator_intake_held_total")
            assert held is not None and held >= 1
    finally:
        await coordinator.stop()


async def test_http_submissions_past_the_read_ahead_wait_while_another_operator_waits(
    settings: Settings, keyring: Keyring, client: CoordinatorClient, cleanup_namespace: None,
) -> None:
    coordinator = await read_ahead_coordinator(settings, keyring)
    try:
        token = keyring.principals[OTHER_OPERATOR].api_token
        assert token is not None
        url = f"http://127.0.0.1:{coordinator.monitoring.port}/api/tasks"
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
        async with aiohttp.ClientSession() as http:
            for i in range(READ_AHEAD):  # alone: admitted at once, however many
                async with http.post(url, json={"description": f"f{i}"},
                                     headers=headers) as resp:
                    assert resp.status == 202
            light = await client.submit("light")  # another operator has work now
            await wait_until(lambda: light in coordinator.state.tasks, 20, "the light task")

            async def post() -> int:
                async with http.post(url, json={"description": "one more"},
                                     headers=headers) as resp:
                    return resp.status

            held = asyncio.create_task(post())
            await asyncio.sleep(1.0)
            assert not held.done()  # held, not refused
            assert coordinator.read_ahead.holding == {OTHER_OPERATOR: 1}
            coordinator.desk.cancel(light, client.principal_id)  # its work is gone
            assert await asyncio.wait_for(held, 10) == 202
    finally:
        await coordinator.stop()
