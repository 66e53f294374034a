"""Consul stops mid-run: the coordinator carries on over AMQP heartbeats, reports a degraded
registry, logs the outage once, and picks the watch (and every registration) up again when Consul
is back. Runs against a private Consul so the shared one stays up for other tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.liveness import RegistryHealth
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.registry import coordinator_service_id

from ..conftest import StartWorker
from ..helpers import wait_until
from .conftest import REGISTRY, check_status, in_catalogue
from .consul_agent import PrivateConsul

# --- Consul itself goes away -----------------------------------------------------------------


@pytest.fixture
def private_consul(tmp_path: Path) -> Iterator[PrivateConsul]:
    consul = PrivateConsul(tmp_path / "consul.log")
    consul.start()
    yield consul
    consul.stop()


@pytest.fixture
def registry_url(private_consul: PrivateConsul) -> str:
    return private_consul.url


async def readiness(coordinator: CoordinatorAgent) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{coordinator.monitoring.port}/readyz"
        async with http.get(url) as response:
            return response.status, await response.json()


def registry_errors(coordinator: CoordinatorAgent) -> float:
    (family,) = [m for m in coordinator.metrics.registry.collect()
                 if m.name == "coordinator_registry_errors"]
    return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))


async def run_tasks(client: CoordinatorClient, count: int, label: str) -> None:
    task_ids = [await client.submit(f"{label} {i}", input={"op": "noop"}) for i in range(count)]
    results = [await client.wait(t, 15) for t in task_ids]
    assert [r.status for r in results] == ["succeeded"] * count


async def test_consul_stopped_mid_run_tasks_keep_flowing_and_the_watch_comes_back(
    private_consul: PrivateConsul, coordinator: CoordinatorAgent, start_worker: StartWorker,
    client: CoordinatorClient, caplog: pytest.LogCaptureFixture,
) -> None:
    await start_worker("agent-1")
    await start_worker("agent-2")
    url = private_consul.url
    await wait_until(lambda: coordinator.registry_state == "ok", 5, "registry ok")
    await run_tasks(client, 10, "before")

    with caplog.at_level(logging.INFO):
        await asyncio.to_thread(private_consul.stop)  # not on the loop the fleet runs on
        await wait_until(lambda: coordinator.registry_state == "degraded", 10, "degraded")
        await run_tasks(client, 20, "during")  # heartbeats alone keep the fleet going
        status, body = await readiness(coordinator)
        assert status == 200
        assert (body["ready"], body["registry"], body["status"]) == (True, "degraded",
                                                                     "degraded")
        metrics = coordinator.metrics.registry
        await wait_until(lambda: registry_errors(coordinator) >= 3, 10,
                         "several failed registry calls")
        assert metrics.get_sample_value("coordinator_registry_up") == 0
        outage_warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                           and r.getMessage().startswith("service registry:")]
        assert len(outage_warnings) == 1  # once per episode, not once per poll

        await asyncio.to_thread(private_consul.start)
        await wait_until(lambda: coordinator.registry_state == "ok", 15, "watch resumed")
    assert any("service registry: back after" in r.getMessage() for r in caplog.records)
    # The restarted (dev) Consul forgot everything: agents and coordinator registered again.
    await wait_until(lambda: all(check_status(url, a) == "passing"
                                 for a in ("agent-1", "agent-2")), 10, "agents re-registered")
    await wait_until(lambda: in_catalogue(url, REGISTRY.coordinator_service,
                                          coordinator_service_id(coordinator.settings.name)),
                     10, "coordinator re-registered")
    await wait_until(lambda: all(coordinator.state.agents[a].registry is RegistryHealth.PASSING
                                 for a in ("agent-1", "agent-2")), 10, "watch sees them")
    await run_tasks(client, 5, "after")
    assert (await readiness(coordinator))[1]["status"] == "ready"
