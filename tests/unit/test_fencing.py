"""Fencing (PROTOCOL.md §10.7): directives carry the leader's epoch; agents refuse lower ones."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from coordinator_agent.agent.examples import example_handler
from coordinator_agent.agent.worker import WorkerAgent
from coordinator_agent.exceptions import RejectedMessage
from coordinator_agent.settings import load_settings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring


def payload_json(model: protocol.Model) -> dict[str, object]:
    envelope = protocol.make_envelope(model, sender="coordinator")
    return dict(orjson.loads(protocol.encode(envelope))["payload"])


def test_a_coordinator_without_ha_sends_no_epoch_field() -> None:
    for directive in (protocol.TaskAssign(task_id="t", attempt=1, description="d", timeout_s=1.0),
                      protocol.TaskCancel(task_id="t"), protocol.AgentDrain()):
        assert "epoch" not in payload_json(directive)
        decoded = protocol.decode(protocol.encode(protocol.make_envelope(directive, sender="c")))
        assert decoded.payload == directive


def test_a_leader_sends_its_epoch_and_it_is_bounded() -> None:
    assert payload_json(protocol.AgentDrain(epoch=57))["epoch"] == 57
    for bad in (-1, 2**63, True, "5"):
        with pytest.raises(ValueError):
            protocol.AgentDrain.model_validate({"epoch": bad})


@pytest.fixture
def worker(tmp_path: Path, clean_env: Path) -> WorkerAgent:
    ring = Keyring()
    ring.generate("agent-1", "agent")
    return WorkerAgent("agent-1", "general", example_handler, settings=load_settings(),
                       keyring=ring)


def fence(worker: WorkerAgent, directive: protocol.Directive) -> None:
    worker._fence(protocol.make_envelope(directive, sender="coordinator"), directive)


def test_the_agent_keeps_the_highest_epoch_and_refuses_lower_ones(worker: WorkerAgent) -> None:
    fence(worker, protocol.AgentDrain())  # no epoch: 0, accepted while nothing higher was seen
    fence(worker, protocol.TaskCancel(task_id="t", epoch=41))
    fence(worker, protocol.TaskCancel(task_id="t", epoch=41))  # the same term: accepted
    fence(worker, protocol.TaskCancel(task_id="t", epoch=57))
    assert worker.max_epoch == 57
    for stale in (protocol.AgentDrain(epoch=41), protocol.AgentDrain()):
        with pytest.raises(RejectedMessage) as refused:
            fence(worker, stale)
        assert refused.value.reason == "stale_epoch"
    assert worker.stale_directives == 2 and worker.max_epoch == 57


class _Published:
    """Stands in for the transport: records what the outbox would publish."""

    def __init__(self) -> None:
        self.payloads: list[protocol.Model] = []

    async def publish(self, payload: protocol.Model, **_: object) -> None:
        self.payloads.append(payload)


async def test_every_directive_the_leader_sends_carries_its_epoch() -> None:
    from typing import Any, cast

    from coordinator_agent.coordinator.outbox import Outbox

    published = _Published()
    outbox = Outbox("c", cast(Any, None), cast(Any, published), spawn=lambda _: None)
    await outbox.to_agent("a", protocol.AgentDrain(reason="idle: scaled in"))  # no HA: no field
    outbox.epoch = lambda: 42
    await outbox.to_agent("a", protocol.AgentDrain(reason="idle: scaled in"))  # built without one
    await outbox.to_agent("a", protocol.AgentDrain(reason="x", epoch=42))
    epochs = [getattr(p, "epoch", None) for p in published.payloads]
    assert epochs == [None, 42, 42]
    assert "epoch" not in payload_json(published.payloads[0])
