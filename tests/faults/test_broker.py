"""The broker misbehaves: connections closed, the node restarted, hung (SIGSTOP), queues deleted.

One fleet lives through the faults in turn, as a real one would; each phase counts its own
tasks. Every fault is done to the suite's own node (harness.FaultNode), never the shared broker.
"""

from __future__ import annotations

import asyncio
import time

import aio_pika
import aiohttp

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.wire import constants as c

from .conftest import MakeFleet
from .harness import FaultNode, Fleet, record, submit_many, tally, wait_all_terminal

WORK = {"op": "sleep", "seconds": 0.05}


async def test_broker_faults_in_turn(make_fleet: MakeFleet, fault_node: FaultNode) -> None:
    fleet = make_fleet(agents=3, concurrency=8)
    await fleet.start_coordinator()
    fleet.start_agents()
    await fleet.wait_agents_healthy(30)
    fleet.watch_readiness()
    async with fleet.client() as client:
        await _connection_closes(fleet, fault_node, client)
        await _hung_broker(fleet, fault_node, client)
        await _deleted_queues(fleet, fault_node, client)
        await _broker_restart(fleet, fault_node, client)


async def _recovery_s(fleet: Fleet, ids: list[str], timeout: float = 30) -> float:
    """From now (the fault's end) until /readyz is 200 and tasks complete again."""
    after = time.monotonic()
    done_before = tally(fleet, ids).terminal
    while time.monotonic() - after < timeout:
        if await fleet.ready() and (tally(fleet, ids).terminal > done_before
                                    or done_before == len(ids)):
            return time.monotonic() - after
        await asyncio.sleep(0.1)
    raise AssertionError(f"the fleet did not recover within {timeout}s")


def _check(phase: str, fleet: Fleet, ids: list[str], notices: list[object]) -> None:
    truth = tally(fleet, ids, notices)
    assert truth.lost == [], (phase, truth.summary())
    assert truth.completed_twice == [], (phase, truth.summary())
    assert truth.succeeded == len(ids), (phase, truth.summary())


async def _connection_closes(fleet: Fleet, node: FaultNode, client: CoordinatorClient) -> None:
    ids: list[str] = []
    submitting = asyncio.create_task(submit_many(client, 400, "closes", WORK, ids))
    recoveries = []
    for _ in range(3):
        await asyncio.sleep(1.0)
        await asyncio.to_thread(node.close_connections)
        recoveries.append(round(await _recovery_s(fleet, list(ids)), 2))
    await submitting
    await wait_all_terminal(fleet, ids, 90)
    await asyncio.sleep(0.5)
    truth = tally(fleet, ids, client.notices)
    record("connection_closes", tasks=len(ids), closes=3, lost=len(truth.lost),
           completed_twice=len(truth.completed_twice), executed_twice=len(truth.executed_twice),
           attempts=dict(truth.attempts_by_outcome), recovered_s=recoveries)
    _check("connection closes", fleet, ids, client.notices)
    assert max(recoveries) <= 10.0, recoveries


async def _hung_broker(fleet: Fleet, node: FaultNode, client: CoordinatorClient) -> None:
    ids = await submit_many(client, 300, "hung", {"op": "sleep", "seconds": 0.1})
    await asyncio.sleep(1.0)
    node.pause()
    paused = time.monotonic()
    try:
        await asyncio.sleep(8.0)  # dead_after x heartbeat is 2.5 s: three times over
    finally:
        node.resume()
    resumed = time.monotonic()
    recovered = await _recovery_s(fleet, ids)
    await wait_all_terminal(fleet, ids, 90)
    await asyncio.sleep(0.5)
    truth = tally(fleet, ids, client.notices)
    unready = fleet.first_readiness(False, paused)
    ready = fleet.first_readiness(True, resumed)
    record("hung_broker", tasks=len(ids), paused_s=8,
           unready_after_s=None if unready is None else round(unready, 2),
           ready_after_resume_s=None if ready is None else round(ready, 2),
           recovered_s=round(recovered, 2), lost=len(truth.lost),
           completed_twice=len(truth.completed_twice), executed_twice=len(truth.executed_twice),
           attempts=dict(truth.attempts_by_outcome))
    assert unready is not None and unready <= 2.0, unready
    _check("hung broker", fleet, ids, client.notices)
    # No agent was declared dead and no task spent a retry: one attempt each, run once.
    assert dict(truth.attempts_by_outcome) == {"succeeded": len(ids)}, truth.summary()
    assert truth.executed_twice == [], truth.summary()
    assert recovered <= 10.0, recovered


async def _deleted_queues(fleet: Fleet, node: FaultNode, client: CoordinatorClient) -> None:
    queues = {"tasks": c.tasks_queue(fleet.name), "status": c.status_queue(fleet.name),
              "agent": c.agent_queue(fleet.name, "agent-1")}
    figures: dict[str, float | None] = {}
    unready: dict[str, float | None] = {}
    connection = await aio_pika.connect(node.url)
    async with connection:
        for label, queue in queues.items():
            before = await _reconnects(fleet)
            channel = await connection.channel()
            await channel.queue_delete(queue)
            deleted = time.monotonic()
            back = await _wait_back(fleet, connection, before, queue if label == "agent" else None)
            figures[label] = None if back is None else round(back - deleted, 3)
            seen = fleet.first_readiness(False, deleted - 0.05)
            unready[label] = None if seen is None else round(seen, 3)
            ids = await submit_many(client, 100, f"after deleting {queue}", WORK)
            await wait_all_terminal(fleet, ids, 60)
            _check(f"deleted {label} queue", fleet, ids, client.notices)
    record("deleted_queues", redeclared_after_s=figures, readiness_false_seen_after_s=unready)
    for label, took in figures.items():
        assert took is not None and took <= 1.0, (label, took)


async def _broker_restart(fleet: Fleet, node: FaultNode, client: CoordinatorClient) -> None:
    ids = await submit_many(client, 400, "restart", WORK)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(node.ctl, "stop_app")
    await asyncio.to_thread(node.ctl, "start_app")
    recovered = await _recovery_s(fleet, ids)
    await wait_all_terminal(fleet, ids, 90)
    await asyncio.sleep(0.5)
    truth = tally(fleet, ids, client.notices)
    record("broker_restart", tasks=len(ids), lost=len(truth.lost),
           completed_twice=len(truth.completed_twice), executed_twice=len(truth.executed_twice),
           attempts=dict(truth.attempts_by_outcome), recovered_s=round(recovered, 2))
    _check("broker restart", fleet, ids, client.notices)
    assert recovered <= 10.0, recovered


async def _reconnects(fleet: Fleet) -> float:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{fleet.port}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("coordinator_broker_reconnects_total "):
            return float(line.split()[1])
    return 0.0


async def _wait_back(fleet: Fleet, connection: aio_pika.abc.AbstractConnection, before: float,
                     agent_queue: str | None) -> float | None:
    """When the coordinator had reconnected (or the agent's queue existed again)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if agent_queue is not None:
            channel = await connection.channel()
            try:
                await channel.declare_queue(agent_queue, passive=True)
                return time.monotonic()
            except aio_pika.exceptions.ChannelClosed:
                pass  # not there yet (the failed passive declare closed that channel)
        elif await _reconnects(fleet) > before:
            return time.monotonic()
        await asyncio.sleep(0.02)
    return None
