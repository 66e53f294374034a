"""Every broker connection is closed from the broker side mid-run: all consumers come back and
every task completes."""

from __future__ import annotations

import asyncio

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings

from .conftest import StartWorker
from .helpers import close_broker_connections, wait_until


async def test_broker_side_close_of_all_connections_mid_run(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings,
) -> None:
    workers = [await start_worker("agent-1", max_concurrency=3),
               await start_worker("agent-2", max_concurrency=3)]
    await wait_until(lambda: len(coordinator.state.agents) == 2, 5, "agents")
    handlers = [coordinator.messages, client.messages, *(w.messages for w in workers)]

    ids = [await client.submit(f"wait {i}", input={"op": "sleep", "seconds": 0.3})
           for i in range(30)]
    await wait_until(lambda: coordinator.state.totals["succeeded"] >= 3, 10, "some progress")

    closed = await asyncio.to_thread(close_broker_connections, f"{settings.name}/")
    assert closed == len(handlers)
    await wait_until(lambda: all(h.connections_made >= 2 and h.connected for h in handlers), 20,
                     "every connection re-established")
    assert coordinator.messages.active_consumers == 2 + len(coordinator.lanes)  # + operators' lanes
    assert all(w.messages.active_consumers == 1 for w in workers)
    assert client.messages.active_consumers == 1

    results = await asyncio.gather(*(client.wait(task_id, 60) for task_id in ids))
    assert [r.status for r in results] == ["succeeded"] * 30
    assert coordinator.metrics.broker_reconnects._value.get() >= 1

    # New work after the reconnect flows too (consumers really are back, not just declared).
    after = await client.submit("after the reconnect", input={"op": "noop"})
    assert (await client.wait(after, 10)).status == "succeeded"
