"""Group commit (store.py): a SIGKILL right after the coordinator has announced something loses
none of it.

The coordinator commits one SQLite transaction per event-loop turn. Whatever announces a write
(the ``task.accepted`` reply, the ack, the ``task.completed`` notice) waits for that commit, so a
process killed the moment a client heard of a task leaves the task in the file. The ground
truth is the store file itself, read after the kill.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator_agent.wire.messaging import delete_namespace

from ..faults.harness import OPERATOR, Fleet, read_store
from .helpers import wait_until

NOOP = {"op": "sleep", "seconds": 0}


@pytest.fixture
async def fleet(broker_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    fleet = Fleet(tmp_path / "fleet", broker_url, f"t-group-commit-{uuid.uuid4().hex[:8]}",
                  ["agent-1"], concurrency=16)
    try:
        yield fleet
    finally:
        await fleet.stop()
        await delete_namespace(fleet.settings.broker_url, fleet.name, fleet.agent_ids,
                               operators=[OPERATOR])


async def test_every_task_a_client_heard_accepted_survives_a_sigkill(fleet: Fleet) -> None:
    await fleet.start_coordinator()  # no agent: the tasks stay pending
    async with fleet.client() as client:
        ids = await asyncio.gather(*(client.submit(f"kept {i}", input=NOOP)
                                     for i in range(300)))
        await wait_until(lambda: len(client.accepted) == len(ids), timeout=60,
                         what="every task.accepted")
        fleet.kill_coordinator()  # at once: no graceful stop, no final commit
    stored = read_store(fleet.store_path)
    assert sorted(t for t in ids if t not in stored) == []
    assert {stored[t]["status"] for t in ids} == {"pending"}


async def test_every_task_a_client_heard_completed_is_finished_in_the_file(fleet: Fleet) -> None:
    await fleet.start_coordinator()
    fleet.start_agents()
    await fleet.wait_agents_healthy(30)
    async with fleet.client() as client:
        ids = await asyncio.gather(*(client.submit(f"done {i}", input=NOOP)
                                     for i in range(300)))
        # Killed mid-burst, the moment some notices are in: each one was sent after its commit.
        await wait_until(lambda: len(client.completed) >= 50, timeout=60,
                         what="the first task.completed notices")
        fleet.kill_coordinator()
        heard = {task_id: notice.status for task_id, notice in client.completed.items()}
    stored = read_store(fleet.store_path)
    assert set(heard) <= set(ids)
    assert {t: stored.get(t, {}).get("status") for t in heard} == heard
    # Accepted ones the kill caught in flight are still open in the file, none is missing.
    assert sorted(t for t in ids if t in client.accepted and t not in stored) == []
