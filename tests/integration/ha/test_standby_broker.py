"""Coordinator processes with ``ha.enabled`` and no Consul: the broker alone elects.

Real `coordinator-agent run` processes on the real RabbitMQ, no registry configured.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring

from ..conftest import StartWorker
from .test_standby import Coordinators, until

#: Heartbeat ttl / 2 = 2 s: a 1 s heartbeat gives false alarms on a loaded machine.
LEASE_TTL_S = 4.0


@pytest.fixture
def coordinators(settings: Settings, keyring: Keyring, tmp_path: Path,
                 cleanup_namespace: None) -> Iterator[Coordinators]:
    assert settings.registry_url is None
    group = Coordinators(settings, None, tmp_path, lease_ttl_s=LEASE_TTL_S)
    yield group
    group.stop_all()


async def test_without_consul_one_leads_and_a_killed_leader_is_replaced(
    coordinators: Coordinators, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    await coordinators.leader_and_standby()
    worker = await start_worker("agent-1", max_concurrency=4)
    first = coordinators.status("a")
    assert first is not None and first["epoch"] > 0
    warmup = await client.submit("warm up", input={"op": "echo"})
    assert (await client.wait(warmup, 30)).status == "succeeded"

    killed_at = time.monotonic()
    coordinators.processes["a"].send_signal(signal.SIGKILL)
    coordinators.processes["a"].wait()
    task_id = await client.submit("after the kill", input={"op": "echo"})
    assert (await client.wait(task_id, 30)).status == "succeeded"
    await until(lambda: coordinators.leader() == "b", 10, "b leads")
    # The dead process's connection closes with it: the token moves at once, no heartbeat wait.
    assert time.monotonic() - killed_at < LEASE_TTL_S + 10
    second = coordinators.status("b")
    assert second is not None and second["epoch"] > first["epoch"]
    assert worker.max_epoch == second["epoch"] and worker.stale_directives == 0


async def test_without_consul_a_paused_leader_is_replaced_and_wakes_a_standby(
    coordinators: Coordinators, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    await coordinators.leader_and_standby()
    worker = await start_worker("agent-1", max_concurrency=4)

    coordinators.processes["a"].send_signal(signal.SIGSTOP)
    # The broker drops the silent connection after two to three missed heartbeats (2 s each).
    await until(lambda: coordinators.roles().get("b") == "leader", 3 * LEASE_TTL_S + 10,
                "b leads")
    ids = [await client.submit(f"while a sleeps {i}", input={"op": "echo"}) for i in range(4)]
    await asyncio.sleep(1)
    coordinators.processes["a"].send_signal(signal.SIGCONT)
    await until(lambda: coordinators.roles().get("a") == "standby", 15, "a wakes a standby")
    for task_id in ids:
        assert (await client.wait(task_id, 30)).status == "succeeded"
    a, b = coordinators.status("a"), coordinators.status("b")
    assert a is not None and b is not None and b["epoch"] > a["epoch"]
    assert a["totals"]["submitted"] == 0
    assert Counter(n.task_id for n in client.notices) == Counter(ids)
    assert worker.max_epoch == b["epoch"]
