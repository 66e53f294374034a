"""Fixtures that start real coordinators, SDK agents and clients on a real RabbitMQ.

Each test gets its own coordinator name, hence its own queues, and removes them afterwards.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.agent.examples import example_handler
from coordinator_agent.agent.worker import TaskHandler, WorkerAgent
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings, load_settings
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace

AGENT_IDS = ("agent-1", "agent-2", "agent-3")
OPERATOR = "operator-1"
OTHER_OPERATOR = "operator-2"


@pytest.fixture
def coordinator_name(request: pytest.FixtureRequest) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    ring = Keyring()
    for agent_id in AGENT_IDS:
        ring.generate(agent_id, "agent")
    ring.generate(OPERATOR, "operator")
    ring.generate(OTHER_OPERATOR, "operator")
    ring.generate("coordinator", "coordinator")  # seals the HA log (docs/HA.md)
    ring.save(tmp_path / "keyring.json")
    return ring


@pytest.fixture
def settings(
    broker_url: str, coordinator_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    # Keep the repository's config file out of the way: tests set what they need.
    monkeypatch.setenv("COORDINATOR_CONFIG", str(tmp_path / "absent.yaml"))
    (tmp_path / "absent.yaml").write_text("{}\n")
    return load_settings(
        name=coordinator_name,
        broker_url=broker_url,
        data_dir=tmp_path,
        keyring_path=tmp_path / "keyring.json",
        monitoring_port=0,
        liveness={"heartbeat_interval_s": 0.2, "suspect_after": 2.5, "dead_after": 5},
        limits={"task_timeout_s": 15, "publish_timeout_s": 5, "drain_timeout_s": 5},
    )


@pytest.fixture
async def cleanup_namespace(settings: Settings, keyring: Keyring) -> AsyncIterator[None]:
    yield
    # Every principal's queues: a test, or a command it runs (the demo), may add its own to
    # the keyring or to its file.
    principals = list(keyring.principals.values())
    with contextlib.suppress(Exception):
        principals += Keyring.load(settings.keyring_path).principals.values()
    agents = {*AGENT_IDS, *(p.id for p in principals if p.role == "agent")}
    operators = {p.id for p in principals if p.role == "operator"}
    await delete_namespace(settings.broker_url, settings.name, sorted(agents), sorted(operators))


@pytest.fixture
async def coordinator(
    settings: Settings, keyring: Keyring, cleanup_namespace: None
) -> AsyncIterator[CoordinatorAgent]:
    agent = CoordinatorAgent(settings, keyring, registry=CollectorRegistry())
    await agent.start()
    yield agent
    await agent.stop()


StartWorker = Callable[..., Awaitable[WorkerAgent]]


@pytest.fixture
async def start_worker(settings: Settings, keyring: Keyring,
                       cleanup_namespace: None) -> AsyncIterator[StartWorker]:
    # Depends on the clean-up so that it runs after the workers stop: a worker still running
    # would declare the coordinator's queues again.
    workers: list[WorkerAgent] = []

    async def start(
        agent_id: str, kind: str = "general", *, handler: TaskHandler = example_handler,
        capabilities: list[str] | None = None, max_concurrency: int = 4,
    ) -> WorkerAgent:
        worker = WorkerAgent(agent_id, kind, handler, settings=settings, keyring=keyring,
                             capabilities=capabilities, max_concurrency=max_concurrency)
        await worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.stop(timeout=2)


@pytest.fixture
async def client(settings: Settings, keyring: Keyring,
                 cleanup_namespace: None) -> AsyncIterator[CoordinatorClient]:
    async with CoordinatorClient(settings, keyring, OPERATOR) as c:
        yield c
