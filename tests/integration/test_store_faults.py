"""When the task store cannot write: nothing is accepted, announced or acked ahead of it.

The failure is real: SQLite's ``max_page_count`` caps the store's file at its current size, so
a write that needs a new page fails with SQLITE_FULL, exactly as on a full disk.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aiohttp

from coordinator_agent.agent.worker import TaskContext
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.keyring import Keyring

from .conftest import OPERATOR, StartWorker
from .helpers import wait_until

BLOB = "x" * 9000  # larger than a page: any write of it needs new pages


def fill_store(coordinator: CoordinatorAgent) -> None:
    db = coordinator.state.store._db
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")


def free_store(coordinator: CoordinatorAgent) -> None:
    coordinator.state.store._db.execute("PRAGMA max_page_count = 1073741823")


STARTED = asyncio.Event()


async def blob_handler(task: TaskContext) -> Any:
    STARTED.set()
    await asyncio.sleep(float(task.input.get("seconds", 0)))
    return {"blob": BLOB}


async def post_task(coordinator: CoordinatorAgent, keyring: Keyring,
                    body: bytes) -> tuple[int, dict[str, Any]]:
    token = keyring.principals[OPERATOR].api_token
    assert token is not None
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{coordinator.monitoring.port}/api/tasks", data=body,
            headers={"Authorization": f"Bearer {token.get_secret_value()}",
                     "Content-Type": "application/json"}) as response:
        return response.status, await response.json()


async def dead_letter_reasons(settings: Settings) -> list[str]:
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(c.dead_letter_queue(settings.name), ensure=True)
        reasons = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            reasons.append(str((message.headers or {}).get(c.HEADER_REJECT_REASON)))
        return reasons


async def test_a_full_store_refuses_submissions_and_holds_results(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings, keyring: Keyring,
) -> None:
    STARTED.clear()
    await start_worker("agent-1", handler=blob_handler)
    running = await client.submit("runs across the outage", input={"seconds": 1.0})
    await asyncio.wait_for(STARTED.wait(), 10)  # the agent runs it

    fill_store(coordinator)
    try:
        # Over AMQP: refused, the client is told why, the submission dead-lettered with it.
        refused = await client.submit("no room for me", input={"blob": BLOB, "seconds": 0})
        notice = await client.wait(refused, 10)
        assert notice.status == "rejected"
        assert notice.error is not None and "not writable" in notice.error
        assert refused not in client.accepted  # no task.accepted, duplicate or otherwise
        assert coordinator.state.find_task(refused) is None
        # Over HTTP: 503, and nothing to find afterwards.
        status, body = await post_task(
            coordinator, keyring, b'{"description": "no room", "input": {"blob": "%s"}}'
            % BLOB.encode())
        assert status == 503, body
        assert "not writable" in body["error"]
        # The running task's result cannot be stored: it is held, not acked, not announced.
        await asyncio.sleep(2.0)
        assert coordinator.readiness()["store_writable"] is False
        assert coordinator.state.store.get(running).status.value in ("assigned", "running")
        assert coordinator.state.tasks[running].status.value in ("assigned", "running")
        assert running not in client.completed
    finally:
        free_store(coordinator)

    result = await client.wait(running, 10)
    assert result.status == "succeeded"
    assert result.output == {"blob": BLOB}
    await wait_until(lambda: coordinator.readiness()["store_writable"], 5, "store writable")
    await asyncio.sleep(0.5)
    assert [n.task_id for n in client.notices].count(running) == 1
    assert "store_unavailable" in await dead_letter_reasons(settings)
    # And new work is accepted again.
    again = await client.submit("after the outage", input={"seconds": 0})
    assert (await client.wait(again, 10)).status == "succeeded"


async def test_an_input_the_store_cannot_hold_is_refused_not_half_accepted(
    coordinator: CoordinatorAgent, keyring: Keyring,
) -> None:
    body = b'{"task_id": "huge-int", "description": "too big", "input": {"n": %d}}' % (2**70)
    status, answer = await post_task(coordinator, keyring, body)
    assert status == 422, answer
    again, _ = await post_task(coordinator, keyring, body)
    assert again == 422  # never "duplicate, pending"
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{coordinator.monitoring.port}/api/tasks/huge-int") as response:
        assert response.status == 404
    assert "huge-int" not in coordinator.state.tasks
