"""A coordinator that falls behind never reads its own backlog as its agents' silence.

Three hundred simulated agents, each with its own key, heartbeat on the real broker from a
thread of their own (so they keep beating while the coordinator's event loop is stuck). The
coordinator's loop is then blocked for longer than ``dead_after`` heartbeats, as a long GC
pause or a starved CPU would: its status queue fills behind it. Asserted on outcomes only: no
agent was ever declared suspect or dead, and the coordinator said that it was behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.coordinator.liveness import AgentLiveness
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings, load_settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace, lane_for
from coordinator_agent.wire.security import SecurityManager

from .helpers import wait_until

AGENTS = 300
INTERVAL_S = 2.0  # suspect after 5 s of silence, dead after 10 s
STALL_S = 12.0


class KeptCounter(Counter[str]):
    """The state's liveness changes, kept although the sweep clears them after logging."""

    def clear(self) -> None:
        return None


class Fleet(threading.Thread):
    """Heartbeats for every agent, every interval, sealed with each agent's own key."""

    def __init__(self, settings: Settings, keyring: Keyring, ids: list[str]) -> None:
        super().__init__(name="fleet", daemon=True)
        self.settings = settings
        self.managers = [SecurityManager.from_settings(settings, keyring.subset(i), i)
                         for i in ids]
        self.stop = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._beat())
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    async def _beat(self) -> None:
        name = self.settings.name
        connection = await aio_pika.connect(self.settings.broker_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE, ensure=False)
            while not self.stop.is_set():
                started = time.monotonic()
                for security in self.managers:
                    payload = protocol.AgentStatus(kind="sim", max_concurrency=1)
                    envelope = protocol.make_envelope(payload, sender=security.principal_id)
                    body, headers = security.seal(envelope, name)
                    await exchange.publish(aio_pika.Message(
                        body, headers=headers, message_id=envelope.id, type=envelope.type,
                        content_type=c.CONTENT_TYPE, expiration=security.ttl_s,
                        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                    ), lane_for(name, envelope.type))
                    self.sent += 1
                await asyncio.sleep(max(0.0, INTERVAL_S - (time.monotonic() - started)))


@pytest.fixture
def fleet_settings(broker_url: str, coordinator_name: str, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("COORDINATOR_CONFIG", str(tmp_path / "absent.yaml"))
    (tmp_path / "absent.yaml").write_text("{}\n")
    return load_settings(
        name=coordinator_name, broker_url=broker_url, data_dir=tmp_path,
        keyring_path=tmp_path / "keyring.json", monitoring_port=0,
        liveness={"heartbeat_interval_s": INTERVAL_S, "suspect_after": 2.5, "dead_after": 5},
    )


@pytest.fixture
async def lagging(fleet_settings: Settings) -> AsyncIterator[tuple[CoordinatorAgent, Fleet]]:
    ids = [f"sim-{i:03d}" for i in range(AGENTS)]
    keyring = Keyring()
    for agent_id in ids:
        keyring.generate(agent_id, "agent")
    keyring.save(fleet_settings.keyring_path)
    coordinator = CoordinatorAgent(fleet_settings, keyring, registry=CollectorRegistry())
    coordinator.state.changes = KeptCounter()
    fleet = Fleet(fleet_settings, keyring, ids)
    await coordinator.start()
    try:
        fleet.start()
        yield coordinator, fleet
    finally:
        fleet.stop.set()
        await asyncio.to_thread(fleet.join, 30)
        await coordinator.stop()
        await delete_namespace(fleet_settings.broker_url, fleet_settings.name)


async def test_no_agent_is_declared_dead_while_the_coordinator_lags(
    lagging: tuple[CoordinatorAgent, Fleet],
) -> None:
    coordinator, fleet = lagging
    state = coordinator.state

    def all_healthy() -> bool:
        counts = state.count_by_liveness()
        return counts[AgentLiveness.HEALTHY.value] == AGENTS

    await wait_until(all_healthy, 60, f"{AGENTS} agents healthy")
    # The coordinator's loop stops for longer than dead_after heartbeats; the fleet beats on.
    sent_before = fleet.sent
    time.sleep(STALL_S)  # blocks this (the coordinator's) event loop on purpose
    assert fleet.error is None
    assert fleet.sent > sent_before, "the fleet kept beating during the stall"

    backlog = coordinator.reports.backlog
    await wait_until(lambda: backlog.episodes >= 1, 30, "the coordinator to see it is behind")
    assert coordinator.status_view()["liveness"]["episodes"] >= 1
    await wait_until(lambda: not backlog.behind, 120, "the coordinator to catch up")
    # A whole dead_after window after catching up, with the fleet still beating.
    await asyncio.sleep(INTERVAL_S * 5 + 1)

    assert fleet.error is None
    assert state.changes[AgentLiveness.DEAD.value] == 0
    assert state.changes[AgentLiveness.SUSPECT.value] == 0
    assert all_healthy(), state.count_by_liveness()
