"""The status lane read in batches (wire/batches.py, coordinator/status_lane.py), on the real
broker: bad heartbeats among good ones are still refused with their reason, counted and
dead-lettered; other types on the lane go the ordinary way; every message is acked exactly
once (a second ack of a tag would close the channel); a repeat heartbeat moves the deadline."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings, load_settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import coordinator_topology
from coordinator_agent.wire.security import SecurityManager

from .conftest import OPERATOR
from .helpers import wait_until


@pytest.fixture
def coordinator_name(request: pytest.FixtureRequest) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:36].strip("-")
    return f"status-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def settings(
    broker_url: str, coordinator_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Heartbeats every 30 s: the backlog queued before the start is not "behind" (which would
    shed repeat heartbeats unread, backlog.py), so every message here takes the full path."""
    monkeypatch.setenv("COORDINATOR_CONFIG", str(tmp_path / "absent.yaml"))
    (tmp_path / "absent.yaml").write_text("{}\n")
    return load_settings(
        name=coordinator_name, broker_url=broker_url, data_dir=tmp_path,
        keyring_path=tmp_path / "keyring.json", monitoring_port=0,
        liveness={"heartbeat_interval_s": 30},
        limits={"task_timeout_s": 15, "publish_timeout_s": 5, "drain_timeout_s": 5},
    )


def sealed(security: SecurityManager, settings: Settings, payload: protocol.Model, *,
           sender: str | None = None, amqp_type: str | None = None,
           correlation_id: str | None = None) -> aio_pika.Message:
    """As WorkerAgent.send publishes it; ``sender`` and ``amqp_type`` may lie."""
    envelope = protocol.make_envelope(payload, sender=sender or security.principal_id,
                                      correlation_id=correlation_id)
    body, headers = security.seal(envelope, settings.name)
    headers[c.HEADER_SENDER] = security.principal_id
    return aio_pika.Message(body, headers=headers, message_id=envelope.id,
                            type=amqp_type or envelope.type, content_type=c.CONTENT_TYPE,
                            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)


def status(in_flight: int = 0) -> protocol.AgentStatus:
    return protocol.AgentStatus(kind="general", capabilities=["text"], max_concurrency=8,
                                in_flight=in_flight, load=in_flight / 8)


def counter(coordinator: CoordinatorAgent, name: str, label: str) -> float:
    metric = getattr(coordinator.metrics, name)
    return float(metric.labels(label)._value.get())


async def test_bad_heartbeats_in_a_batch_are_dead_lettered_and_the_rest_acked_once(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    agent = SecurityManager.from_settings(settings, keyring.subset("agent-1"), "agent-1")
    other = SecurityManager.from_settings(settings, keyring.subset("agent-2"), "agent-2")
    operator = SecurityManager.from_settings(settings, keyring.subset(OPERATOR), OPERATOR)
    progress = protocol.TaskProgress(task_id="never-assigned", attempt=1, progress=0.5)
    replayable = sealed(agent, settings, status(1))
    good = [sealed(agent, settings, status(i % 8)) for i in range(60)]
    good.append(sealed(agent, settings, status(7)))  # the last word: in_flight 7
    bad: list[tuple[str, aio_pika.Message]] = [
        ("invalid_token", aio_pika.Message(b"not a token", type="agent.status",
                                           headers={c.HEADER_SENDER: "agent-1"})),
        ("unknown_sender", aio_pika.Message(replayable.body, type="agent.status")),
        ("sender_mismatch", sealed(agent, settings, status(), sender="agent-2")),
        ("invalid_token", aio_pika.Message(sealed(other, settings, status()).body,
                                           type="agent.status",
                                           headers={c.HEADER_SENDER: "agent-1"})),
        ("forbidden", sealed(operator, settings, status())),
        ("replayed", aio_pika.Message(replayable.body, type="agent.status",
                                      headers=dict(replayable.headers))),
        # Other types on the lane go the ordinary way, whatever the type property says.
        ("not_assigned", sealed(agent, settings, progress)),
        ("not_assigned", sealed(agent, settings, progress, amqp_type="agent.status")),
    ]
    metrics_report = sealed(agent, settings, protocol.AgentMetrics(values={"cpu": 0.25}))
    # Interleaved, and all queued before the coordinator starts: they arrive in large batches.
    messages = [replayable, *good]
    for i, (_, hostile) in enumerate(bad):
        messages.insert(1 + i * len(good) // len(bad), hostile)
    messages.insert(len(messages) // 2, metrics_report)
    expected = Counter(reason for reason, _ in bad)
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await coordinator_topology(settings.name)(channel)
        exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE)
        for message in messages:
            await exchange.publish(message, c.status_key(settings.name))
        received = len(good) + 1

        coordinator = CoordinatorAgent(settings, keyring, registry=CollectorRegistry())
        await coordinator.start()
        try:
            await wait_until(
                lambda: counter(coordinator, "messages_received", "agent.status") == received
                and sum(counter(coordinator, "messages_rejected", r) for r in expected)
                == sum(expected.values()), 20, "every message handled or rejected")
            for reason, count in expected.items():
                assert counter(coordinator, "messages_rejected", reason) == count, reason
            assert counter(coordinator, "messages_received", "agent.metrics") == 1
            record = coordinator.state.agents["agent-1"]
            assert record.reported_in_flight == 7  # applied in delivery order
            assert record.metrics == {"cpu": 0.25}
            assert "agent-2" not in coordinator.state.agents  # the impostor changed nothing
            lanes = coordinator.messages.batched_lanes
            assert len(lanes) == 1
            assert lanes[0].batches < len(messages)
            # While rejected ones were being dead-lettered, the batches were acked one by one;
            # once they are settled, a batch of good ones is acked with one frame.
            await wait_until(lambda: lanes[0].outstanding == 0, 10, "dead letters settled")
            acked_together = lanes[0].multiple_acked
            for i in range(20):
                await exchange.publish(sealed(agent, settings, status(i % 8)),
                                       c.status_key(settings.name))
            await wait_until(
                lambda: counter(coordinator, "messages_received", "agent.status")
                == received + 20, 20, "the later heartbeats handled")
            assert lanes[0].multiple_acked > acked_together
            # A tag acked twice, or never, would have cost the channel: still the first one.
            assert coordinator.messages.connections_made == 1
            assert coordinator.messages.consumer_cancels == 0
        finally:
            await coordinator.stop()

        # Stopped: anything left unacked would be back in the queue now.
        status_queue = await channel.declare_queue(c.status_queue(settings.name), passive=True)
        assert status_queue.declaration_result.message_count == 0
        dead_letters = await channel.get_queue(c.dead_letter_queue(settings.name))
        seen: Counter[str] = Counter()
        while (parked := await dead_letters.get(fail=False, no_ack=True)) is not None:
            seen[str((parked.headers or {})[c.HEADER_REJECT_REASON])] += 1
        assert seen == expected


async def test_a_repeat_heartbeat_moves_the_deadline_without_regrouping(
    coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring,
) -> None:
    agent = SecurityManager.from_settings(settings, keyring.subset("agent-1"), "agent-1")
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE)

        async def beat(in_flight: int) -> None:
            before = counter(coordinator, "messages_received", "agent.status")
            await exchange.publish(sealed(agent, settings, status(in_flight),
                                          correlation_id="session-1"),
                                   c.status_key(settings.name))
            await wait_until(lambda: counter(coordinator, "messages_received", "agent.status")
                             == before + 1, 10, "the heartbeat handled")

        await beat(2)
        record = coordinator.state.agents["agent-1"]
        first_seen, version = record.last_seen, coordinator.state.fleet_version
        time.sleep(0.01)  # a later clock reading, not a timed assertion
        await beat(2)  # the same report again
        assert record.last_seen > first_seen
        assert coordinator.state.fleet_version == version
        assert record.session == "session-1"
        await beat(3)  # something new: applied
        assert record.reported_in_flight == 3
