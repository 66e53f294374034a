"""`keys rotate` while everything runs: the coordinator reloads the keyring, keeps talking to an
agent that still has only its old key, and follows the agent once it switches to the new one."""

from __future__ import annotations

from coordinator_agent.agent.examples import example_handler
from coordinator_agent.agent.worker import WorkerAgent
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring

from .conftest import StartWorker
from .helpers import wait_until


async def test_rotation_rolls_out_without_failed_messages(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings,
) -> None:
    old_agent = await start_worker("agent-1")
    first = await client.submit("before rotation")
    assert (await client.wait(first, 10)).status == "succeeded"

    rotated = Keyring.load(settings.keyring_path)
    rotated.rotate("agent-1")
    rotated.save(settings.keyring_path)
    await wait_until(lambda: len(coordinator.keyring.principals["agent-1"].keys) == 2, 5,
                     "coordinator reloads the keyring")

    during = await client.submit("agent still on its old key")
    assert (await client.wait(during, 10)).status == "succeeded"

    await old_agent.stop(timeout=2)
    new_agent = WorkerAgent("agent-1", "general", example_handler, settings=settings,
                            keyring=rotated)
    await new_agent.start()
    try:
        after = await client.submit("agent on its new key")
        result = await client.wait(after, 10)
    finally:
        await new_agent.stop(timeout=2)
    assert result.status == "succeeded"
    assert sum(coordinator.metrics.messages_rejected.labels(r)._value.get()
               for r in ("invalid_token", "unknown_sender")) == 0
