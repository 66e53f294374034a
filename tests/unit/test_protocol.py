"""Wire codec: every message type round-trips; bad input is rejected with the right reason."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from coordinator_agent.exceptions import ProtocolError, RejectedMessage
from coordinator_agent.wire import protocol
from coordinator_agent.wire.constants import PROTOCOL_VERSION

# One realistic, fully populated payload per message type.
SAMPLES: dict[str, protocol.Model] = {
    "agent.hello": protocol.AgentHello(
        kind="development", capabilities=["python", "gpu"], max_concurrency=4, version="1.2.3"
    ),
    "agent.status": protocol.AgentStatus(
        kind="development", capabilities=["python"], max_concurrency=2, state="busy",
        in_flight=2, load=0.75,
    ),
    "agent.metrics": protocol.AgentMetrics(values={"cpu": 0.5, "mem.rss": 1024.0}),
    "agent.goodbye": protocol.AgentGoodbye(reason="shutting down"),
    "task.progress": protocol.TaskProgress(
        task_id="t-1", attempt=1, progress=0.5, message="half way"
    ),
    "task.result": protocol.TaskResult(
        task_id="t-1", attempt=2, success=True, output={"words": 3, "list": [1, "a", None]},
        error=None, duration_s=1.25,
    ),
    "task.assign": protocol.TaskAssign(
        task_id="t-1", attempt=1, description="count the words", input={"op": "stats"},
        timeout_s=30.0,
    ),
    "task.cancel": protocol.TaskCancel(task_id="t-1", attempt=3, reason="timeout"),
    "agent.drain": protocol.AgentDrain(reason="maintenance"),
    "task.submit": protocol.TaskSubmit(
        task_id="job:42", description="do it", kind="development",
        required_capabilities=["python"], input=[1, 2, 3], timeout_s=10.0, max_retries=3,
        reply_to="amq.gen-abc",
    ),
    "task.accepted": protocol.TaskAccepted(task_id="job:42", status="pending", duplicate=True),
    "task.completed": protocol.TaskCompleted(
        task_id="job:42", status="succeeded", output={"ok": True}, error=None,
        attempts=[
            protocol.AttemptSummary(attempt=1, agent_id="agent-1", outcome="failed",
                                    error="boom", duration_s=0.5),
            protocol.AttemptSummary(attempt=2, agent_id="agent-2", outcome="succeeded"),
        ],
    ),
    "batch": protocol.Batch(items=[
        {"id": "i-1", "type": "task.result",
         "payload": {"task_id": "t-1", "attempt": 1, "success": True, "output": [1]}},
        {"id": "i-2", "type": "task.progress", "correlation_id": "s-1",
         "payload": {"task_id": "t-2", "attempt": 1, "progress": 0.0, "message": "started"}},
    ]),
}


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(protocol.PAYLOAD_TYPES) == protocol.MESSAGE_TYPES
    for type_name, payload in SAMPLES.items():
        assert isinstance(payload, protocol.PAYLOAD_TYPES[type_name])


@pytest.mark.parametrize("type_name", sorted(protocol.PAYLOAD_TYPES))
def test_round_trip(type_name: str) -> None:
    payload = SAMPLES[type_name]
    envelope = protocol.make_envelope(payload, sender="agent-1", correlation_id="corr-1")
    assert envelope.type == type_name
    assert envelope.v == PROTOCOL_VERSION

    decoded = protocol.decode(protocol.encode(envelope))

    assert decoded.type == type_name
    assert decoded.v == PROTOCOL_VERSION
    assert decoded.id == envelope.id
    assert decoded.sender == "agent-1"
    assert decoded.sent_at == envelope.sent_at
    assert decoded.correlation_id == "corr-1"
    assert type(decoded.payload) is protocol.PAYLOAD_TYPES[type_name]
    assert decoded.payload.model_dump() == payload.model_dump()


def test_round_trip_minimal_payload_fills_defaults() -> None:
    envelope = protocol.make_envelope(protocol.AgentHello(kind="k"), sender="a", message_id="m-1")
    decoded = protocol.decode(protocol.encode(envelope))
    assert decoded.id == "m-1"
    assert decoded.correlation_id is None
    assert decoded.payload == protocol.AgentHello(
        kind="k", capabilities=[], max_concurrency=1, version=""
    )


def test_new_message_ids_are_unique_identifiers() -> None:
    ids = {protocol.new_message_id() for _ in range(100)}
    assert len(ids) == 100
    envelope = protocol.make_envelope(protocol.AgentGoodbye(), sender="a")
    # A generated id must itself pass the Identifier constraint on the way back in.
    assert protocol.decode(protocol.encode(envelope)).id == envelope.id


def test_encoded_form_is_plain_json() -> None:
    envelope = protocol.make_envelope(SAMPLES["task.progress"], sender="agent-1")
    raw = orjson.loads(protocol.encode(envelope))
    assert raw == {
        "v": 1, "id": envelope.id, "type": "task.progress", "sender": "agent-1",
        "sent_at": envelope.sent_at, "correlation_id": None,
        "payload": {"task_id": "t-1", "attempt": 1, "progress": 0.5, "message": "half way"},
    }


# --- rejections -----------------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    return {
        "v": 1,
        "id": "msg-1",
        "type": "task.assign",
        "sender": "coord",
        "sent_at": 1_700_000_000.0,
        "correlation_id": None,
        "payload": {"task_id": "t-1", "attempt": 1, "description": "d", "timeout_s": 5.0},
    }


def _reject(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(data)
    assert isinstance(info.value, RejectedMessage)
    return info.value


def test_valid_base_message_decodes() -> None:
    # Guard for the rejection tests below: they each change one thing in this message.
    assert protocol.decode(orjson.dumps(_valid())).payload.task_id == "t-1"


@pytest.mark.parametrize("body", [b"not json", b"{", b"\xff\xfe\x00", b""])
def test_not_json_is_malformed(body: bytes) -> None:
    error = _reject(body)
    assert error.reason == "malformed"
    assert "JSON" in error.detail


@pytest.mark.parametrize("body", [b"[]", b'[{"v": 1}]', b"null", b'"text"', b"42"])
def test_non_object_is_malformed(body: bytes) -> None:
    error = _reject(body)
    assert error.reason == "malformed"
    assert "object" in error.detail


def test_missing_type_is_malformed() -> None:
    data = _valid()
    del data["type"]
    error = _reject(orjson.dumps(data))
    assert error.reason == "malformed"


def test_missing_type_detail_names_type() -> None:
    # decode() has a dedicated message for this case; it should be the one reported.
    data = _valid()
    del data["type"]
    error = _reject(orjson.dumps(data))
    assert error.detail == "envelope has no 'type'"


@pytest.mark.parametrize("type_value", ["task.nope", "agent.hello.v2", ""])
def test_unknown_type(type_value: str) -> None:
    data = _valid()
    data["type"] = type_value
    error = _reject(orjson.dumps(data))
    assert error.reason == "unknown_type"
    assert repr(type_value) in error.detail


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unsupported_version(version: object) -> None:
    data = _valid()
    data["v"] = version
    error = _reject(orjson.dumps(data))
    assert error.reason == "unsupported_version"
    assert repr(version) in error.detail


def test_extra_field_in_envelope() -> None:
    data = _valid()
    data["signature"] = "abc"
    error = _reject(orjson.dumps(data))
    assert error.reason == "malformed"
    assert "signature" in error.detail


def test_extra_field_in_payload() -> None:
    data = _valid()
    data["payload"]["priority"] = 10
    error = _reject(orjson.dumps(data))
    assert error.reason == "malformed"
    assert "payload.priority" in error.detail


def test_payload_of_another_type_is_rejected() -> None:
    data = _valid()
    data["payload"] = {"kind": "development"}  # an agent.hello payload under task.assign
    error = _reject(orjson.dumps(data))
    assert error.reason == "malformed"


def test_over_long_description() -> None:
    data = _valid()
    data["payload"]["description"] = "x" * 8193
    error = _reject(orjson.dumps(data))
    assert error.reason == "malformed"
    assert "payload.description" in error.detail
    # The limit itself is fine.
    data["payload"]["description"] = "x" * 8192
    assert len(protocol.decode(orjson.dumps(data)).payload.description) == 8192


def test_empty_description_rejected() -> None:
    data = _valid()
    data["payload"]["description"] = ""
    assert _reject(orjson.dumps(data)).reason == "malformed"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "has space"),
        ("id", "semi;colon"),
        ("id", "slash/id"),
        ("id", ""),
        ("id", "x" * 129),
        ("sender", "agent\n1"),
        ("sender", "ägent"),
        ("correlation_id", "a*b"),
    ],
)
def test_bad_identifier_in_envelope(field: str, value: str) -> None:
    data = _valid()
    data[field] = value
    error = _reject(orjson.dumps(data))
    assert error.reason == "malformed"
    assert field in error.detail


@pytest.mark.parametrize("task_id", ["t 1", "t#1", "../etc", ""])
def test_bad_identifier_in_payload(task_id: str) -> None:
    data = _valid()
    data["payload"]["task_id"] = task_id
    error = _reject(orjson.dumps(data))
    assert error.reason == "malformed"
    assert "payload.task_id" in error.detail


def test_allowed_identifier_characters() -> None:
    data = _valid()
    data["id"] = "A-z_0.9:x@y"
    data["payload"]["task_id"] = "x" * 128
    decoded = protocol.decode(orjson.dumps(data))
    assert decoded.id == "A-z_0.9:x@y"
    assert decoded.payload.task_id == "x" * 128


@pytest.mark.parametrize(
    ("type_name", "payload"),
    [
        ("task.progress", {"task_id": "t", "attempt": 1, "progress": 1.5}),
        ("task.progress", {"task_id": "t", "attempt": 0, "progress": 0.5}),
        ("agent.status", {"kind": "k", "load": -0.1}),
        ("agent.status", {"kind": "k", "state": "sleeping"}),
        ("agent.hello", {"kind": "k", "max_concurrency": 0}),
        ("agent.hello", {"kind": "k", "capabilities": ["ok", "not ok"]}),
        ("agent.hello", {"kind": "k", "capabilities": [f"c{i}" for i in range(65)]}),
        ("task.submit", {"description": "d", "max_retries": 21}),
        ("task.submit", {"description": "d", "timeout_s": 0}),
        ("task.completed", {"task_id": "t", "status": "pending"}),
        ("agent.goodbye", {"reason": "x" * 1025}),
    ],
)
def test_bounds_are_enforced(type_name: str, payload: dict[str, Any]) -> None:
    data = _valid()
    data["type"] = type_name
    data["payload"] = payload
    assert _reject(orjson.dumps(data)).reason == "malformed"


def test_models_are_frozen() -> None:
    hello = protocol.AgentHello(kind="k")
    with pytest.raises(ValueError, match="frozen"):
        hello.kind = "other"  # type: ignore[misc]
