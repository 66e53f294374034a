"""Submission lanes on a real RabbitMQ: one operator's backlog does not queue ahead of another's."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace

from .conftest import OPERATOR, OTHER_OPERATOR
from .helpers import wait_until

FLOOD = 600  # well past the tasks queue's prefetch (256): under FIFO, hundreds would go first


async def test_a_waiting_flood_does_not_queue_ahead_of_another_operator(
    coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring,
    client: CoordinatorClient,
) -> None:
    # The coordinator stops reading while the flood is published: a backlog on the broker.
    await coordinator.messages.pause_consuming()
    flood = [await client.submit(f"flood {i}", input={"op": "noop"}) for i in range(FLOOD)]
    async with CoordinatorClient(settings, keyring, OTHER_OPERATOR) as other:
        light = await other.submit("light", input={"op": "noop"})
        await coordinator.messages.resume_consuming()
        await wait_until(lambda: all(coordinator.state.tasks.get(t) is not None
                                     for t in [*flood, light]), 60, "every submission accepted")
    accepted = sorted([*flood, light], key=lambda t: coordinator.state.tasks[t].created_at)
    rank = accepted.index(light)
    # One shared FIFO queue would accept it last (rank 600); its own lane, among the first.
    assert rank < FLOOD // 2, rank


async def test_an_operator_without_a_lane_submits_through_the_tasks_queue(
    settings: Settings, keyring: Keyring,
) -> None:
    later = "operator-later"
    coordinator = CoordinatorAgent(settings, keyring, registry=CollectorRegistry())
    assert coordinator.lanes == sorted([OPERATOR, OTHER_OPERATOR])
    await coordinator.start()
    try:
        # Added after the start (a keyring reload): no lane until a restart, still served.
        grown = Keyring(dict(keyring.principals))
        grown.generate(later, "operator")
        coordinator.keyrings.adopt(grown)
        async with CoordinatorClient(settings, grown, later) as client:
            task_id = await client.submit("late operator", input={"op": "noop"})
            await wait_until(lambda: coordinator.state.tasks.get(task_id) is not None, 30,
                             "the submission accepted")
            assert client._lane_missing_until > 0  # it was told there is no lane, and fell back
    finally:
        await coordinator.stop()
        await delete_namespace(settings.broker_url, settings.name, (), [OPERATOR, OTHER_OPERATOR])


async def test_a_client_started_before_its_coordinator_moves_to_its_lane_once_it_exists(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    # Started together (a deployment, the benchmarks): the client's first submission finds no
    # lane yet and goes to the tasks queue; its later ones must not stay there for long.
    async with CoordinatorClient(settings, keyring, OPERATOR) as client:
        early = await client.submit("before the coordinator", input={"op": "noop"})
        told_at = time.monotonic()
        assert client._lane_missing_until > told_at  # no lane: the tasks queue, for now
        coordinator = CoordinatorAgent(settings, keyring, registry=CollectorRegistry())
        await coordinator.start()  # declares the lanes
        try:
            submitted = [early]
            while True:  # a submission every 0.1 s until one goes through the lane
                submitted.append(await client.submit("after the coordinator",
                                                     input={"op": "noop"}))
                if client._lane_missing_until <= time.monotonic():
                    break  # the lane took it: the broker did not return it
                assert time.monotonic() < told_at + 5, "still on the tasks queue after 5 s"
                await asyncio.sleep(0.1)
            await wait_until(lambda: all(coordinator.state.tasks.get(t) is not None
                                         for t in submitted), 30, "every submission accepted")
        finally:
            await coordinator.stop()
