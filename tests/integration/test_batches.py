"""Batch messages on a real RabbitMQ (PROTOCOL.md §9.13): assignments batched per agent, agent
reports and client submissions in batches, one bad item refused alone, nothing lost with HA."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.agent.examples import example_handler
from coordinator_agent.agent.worker import WorkerAgent
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings, load_settings
from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.keyring import Keyring

from .conftest import OPERATOR
from .helpers import wait_until

BURST = 24


@pytest.fixture
def coordinator_name(request: pytest.FixtureRequest) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    return f"batch-{slug}-{uuid.uuid4().hex[:6]}"


def _worker(settings: Settings, keyring: Keyring, agent_id: str, kind: str, *,
            batch_limit: int, concurrency: int = BURST) -> WorkerAgent:
    return WorkerAgent(agent_id, kind, example_handler, settings=settings, keyring=keyring,
                       max_concurrency=concurrency, batch_limit=batch_limit)


@pytest.fixture
async def workers(settings: Settings, keyring: Keyring) -> AsyncIterator[list[WorkerAgent]]:
    started: list[WorkerAgent] = []
    yield started
    for worker in started:
        await worker.stop(timeout=2)


async def _start(coordinator: CoordinatorAgent, workers: list[WorkerAgent],
                 worker: WorkerAgent) -> WorkerAgent:
    await worker.start()
    workers.append(worker)
    await wait_until(lambda: worker.agent_id in coordinator.state.agents
                     and coordinator.state.agents[worker.agent_id].assignable, 15,
                     f"{worker.agent_id} assignable")
    return worker


async def test_a_batch_capable_agent_gets_assignments_in_batches_beside_an_old_one(
    coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring,
    client: CoordinatorClient, workers: list[WorkerAgent],
) -> None:
    new = await _start(coordinator, workers, _worker(settings, keyring, "agent-1", "batched",
                                                     batch_limit=8))
    old = await _start(coordinator, workers, _worker(settings, keyring, "agent-2", "single",
                                                     batch_limit=1))
    assert "batch:8" in new.announced and not any(
        label.startswith(batch.CAPABILITY_PREFIX) for label in old.announced)
    assert batch.limit_of(coordinator.state.agents["agent-1"].capabilities) == 8
    # One sealed message: every task is ready in the same turn, for agents with free slots.
    specs: list[dict[str, Any]] = [
        {"description": f"batched {i}", "kind": "batched", "input": {"op": "noop"}}
        for i in range(BURST)]
    specs += [{"description": f"single {i}", "kind": "single", "input": {"op": "noop"}}
              for i in range(BURST)]
    ids = await client.submit_many(specs)
    assert len(set(ids)) == 2 * BURST
    outcomes = [await client.wait(task_id, 30) for task_id in ids]
    assert [o.status for o in outcomes] == ["succeeded"] * (2 * BURST)
    # The batch-capable agent was sent batches of at most its limit; the old one none.
    sent = coordinator.outbox.assignments
    assert sent.batches >= BURST // 8 and sent.batched >= BURST
    assert new.coordinator_batches and not old.coordinator_batches
    assert new.completed == BURST and old.completed == BURST
    # Its reports went back in batches too (it had seen the coordinator's); the old one's not.
    assert new._reports.batches > 0 and old._reports.batches == 0
    # This test's client got its replies in batches (it submitted one); an old client would not.
    assert coordinator.outbox.replies.batches > 0
    assert {a.agent_id for o in outcomes[:BURST] for a in o.attempts} == {"agent-1"}
    assert {a.agent_id for o in outcomes[BURST:] for a in o.attempts} == {"agent-2"}
    rejected = [sample for sample in coordinator.metrics.messages_rejected.collect()[0].samples
                if sample.name.endswith("_total") and sample.value]
    assert rejected == []


async def _dead_letters(settings: Settings) -> list[dict[str, Any]]:
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(c.dead_letter_queue(settings.name), ensure=True)
        found = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            found.append(dict(message.headers or {}))
        return found


async def test_a_bad_item_is_dead_lettered_alone_and_the_rest_complete(
    coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring,
    client: CoordinatorClient, workers: list[WorkerAgent],
) -> None:
    await _start(coordinator, workers, _worker(settings, keyring, "agent-1", "general",
                                               batch_limit=16))
    good = [protocol.TaskSubmit(task_id=f"good-{i}", description=f"good {i}",
                                input={"op": "noop"}, reply_to=client.reply_queue)
            for i in range(3)]
    items = [batch.item_of(good[0]),
             # No description: malformed, on its own.
             {"id": "bad-item", "type": "task.submit",
              "payload": {"task_id": "bad", "reply_to": client.reply_queue}},
             batch.item_of(good[1]),
             # A type that never travels in a batch.
             {"id": "hello-item", "type": "agent.hello", "payload": {"kind": "x"}},
             batch.item_of(good[2])]
    await client.messages.publish_batch(
        items, peer=settings.name, exchange=c.COORDINATOR_EXCHANGE,
        routing_key=c.submit_key(settings.name, OPERATOR))
    outcomes = [await client.wait(spec.task_id or "", 30) for spec in good]
    assert [o.status for o in outcomes] == ["succeeded"] * 3
    assert coordinator.state.find_task("bad") is None
    rejected = coordinator.metrics.messages_rejected.labels("malformed")
    await wait_until(lambda: rejected._value.get() == 2, 10, "both bad items counted")
    letters = await _dead_letters(settings)
    by_item = {h.get(c.HEADER_REJECT_ITEM): h for h in letters}
    assert set(by_item) == {1, 3}, letters
    assert by_item[1][c.HEADER_REJECT_REASON] == "malformed"
    assert by_item[1][c.HEADER_REJECT_ITEM_ID] == "bad-item"
    assert "description" in str(by_item[1][c.HEADER_REJECT_DETAIL])
    assert "may not travel in a batch" in str(by_item[3][c.HEADER_REJECT_DETAIL])
    # A replayed item (its id seen before) is refused, the new one in the same batch is not.
    again = protocol.TaskSubmit(task_id="good-new", description="new", input={"op": "noop"},
                                reply_to=client.reply_queue)
    await client.messages.publish_batch(
        [items[0], batch.item_of(again)], peer=settings.name, exchange=c.COORDINATOR_EXCHANGE,
        routing_key=c.submit_key(settings.name, OPERATOR))
    assert (await client.wait("good-new", 30)).status == "succeeded"
    replayed = coordinator.metrics.messages_rejected.labels("replayed")
    await wait_until(lambda: replayed._value.get() == 1, 10, "the replayed item counted")


async def test_client_batch_submit_gives_one_id_acceptance_and_result_per_task(
    coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring,
    client: CoordinatorClient, workers: list[WorkerAgent],
) -> None:
    await _start(coordinator, workers, _worker(settings, keyring, "agent-1", "general",
                                               batch_limit=16, concurrency=8))
    count = 150  # three batches: at most 64 items each
    ids = await client.submit_many(
        [{"description": f"task {i}", "input": {"op": "echo", "i": i}} for i in range(count)]
        + [{"description": "named", "task_id": "my-own-id", "input": {"op": "noop"}}])
    assert len(ids) == count + 1 and len(set(ids)) == count + 1 and ids[-1] == "my-own-id"
    outcomes = {task_id: await client.wait(task_id, 60) for task_id in ids}
    assert all(o.status == "succeeded" for o in outcomes.values())
    assert set(client.accepted) == set(ids)
    assert sorted(n.task_id for n in client.notices) == sorted(ids)  # one result each
    received = coordinator.metrics.batch_items.labels("received")
    assert received._sum.get() >= count  # they came in batches, not one by one
    # A client that sends batches is answered in batches too.
    assert coordinator.outbox.replies.batches > 0 and coordinator.outbox.replies.batched >= count
    # Resubmitting a batch: duplicates of the same tasks, no new ones.
    # (Finished tasks may leave memory meanwhile: no task may appear, some may go.)
    before = set(coordinator.state.tasks)
    await client.submit_many([{"description": "named", "task_id": "my-own-id",
                               "input": {"op": "noop"}}])
    await wait_until(lambda: client.accepted["my-own-id"].duplicate, 10, "the duplicate")
    assert set(coordinator.state.tasks) <= before


@pytest.fixture
async def ha_coordinator(
    settings: Settings, keyring: Keyring, tmp_path: Path, cleanup_namespace: None,
) -> AsyncIterator[CoordinatorAgent]:
    ha_settings = load_settings(
        name=settings.name, broker_url=settings.broker_url.get_secret_value(),
        data_dir=tmp_path / "ha", keyring_path=settings.keyring_path, monitoring_port=0,
        liveness=settings.liveness.model_dump(), limits=settings.limits.model_dump(),
        ha={"enabled": True})
    coordinator = CoordinatorAgent(ha_settings, keyring, registry=CollectorRegistry())
    await coordinator.start()
    try:
        await wait_until(lambda: coordinator.leadership.leading and coordinator.accepting, 30,
                         "leading")
        yield coordinator
    finally:
        await coordinator.stop()
        connection = await aio_pika.connect(settings.broker_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(c.log_queue(settings.name))
            await channel.queue_delete(c.snapshot_queue(settings.name))


async def test_nothing_is_lost_with_ha_and_a_submitted_batch_is_one_log_append(
    ha_coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring,
    client: CoordinatorClient, workers: list[WorkerAgent],
) -> None:
    coordinator = ha_coordinator
    assert coordinator.replication is not None
    writer = coordinator.replication._writer
    assert writer is not None
    # No agent yet: the batch's items are the only thing that changes the log.
    await wait_until(lambda: not writer._batch, 10, "the log idle")
    before = writer.batches
    ids = await client.submit_many([{"description": f"ha {i}", "input": {"op": "noop"}}
                                    for i in range(40)])
    await wait_until(lambda: all(coordinator.state.tasks.get(t) is not None for t in ids), 15,
                     "every task accepted")
    await wait_until(lambda: set(ids) <= set(client.accepted), 15, "every task.accepted")
    assert writer.batches - before == 1
    await _start(coordinator, workers, _worker(settings, keyring, "agent-1", "general",
                                               batch_limit=16, concurrency=16))
    outcomes = [await client.wait(task_id, 60) for task_id in ids]
    assert [o.status for o in outcomes] == ["succeeded"] * len(ids)
    assert sorted(n.task_id for n in client.notices) == sorted(ids)
    assert coordinator.outbox.assignments.batches > 0
    for task_id in ids:  # in the store, as the log applied it
        stored = coordinator.state.store.get(task_id)
        assert stored is not None and stored.status.value == "succeeded"
