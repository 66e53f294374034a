"""Discovery tests run with the suite's settings plus a real Consul (``registry_url``)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator_agent.registry import ConsulRegistry
from coordinator_agent.settings import RegistrySettings, Settings

from ..conftest import AGENT_IDS

REGISTRY = RegistrySettings(ttl_s=3, deregister_critical_after_s=60, watch_wait_s=5,
                            check_interval_s=1, call_timeout_s=2)


@pytest.fixture
def registry_url(consul_url: str) -> str:
    return consul_url


@pytest.fixture
async def settings(settings: Settings, registry_url: str) -> AsyncIterator[Settings]:
    """The suite's settings with discovery on, against ``registry_url``."""
    with_consul = settings.model_copy(update={"registry_url": registry_url,
                                              "registry": REGISTRY})
    yield with_consul
    # Agents killed on purpose leave critical services behind: remove them.
    registry = ConsulRegistry(registry_url, REGISTRY)
    try:
        for agent_id in AGENT_IDS:
            await quietly(registry.deregister_agent(agent_id))
        await quietly(registry.deregister_coordinator(settings.name))
    finally:
        await registry.close()


async def quietly(call: Any) -> None:
    try:
        await call
    except Exception:
        return


def consul_get(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=5) as response:
        return json.loads(response.read())


def check_status(url: str, service_id: str, service: str = REGISTRY.agent_service) -> str | None:
    """The status of the service's own check in Consul's catalogue, None when not listed."""
    nodes = consul_get(url, f"/v1/health/service/{service}", filter=f'Service.ID == "{service_id}"')
    if not nodes:
        return None
    (check,) = [c for c in nodes[0]["Checks"] if c["ServiceID"] == service_id]
    return str(check["Status"])


def in_catalogue(url: str, service: str, service_id: str) -> bool:
    nodes = consul_get(url, f"/v1/health/service/{service}", filter=f'Service.ID == "{service_id}"')
    return bool(nodes)


