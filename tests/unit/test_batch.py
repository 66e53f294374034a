"""Batch messages (PROTOCOL.md §9.13): each item checked on its own, with the reasons a message
sent alone would get; the capability label; splitting by item count and sealed size."""

from __future__ import annotations

import orjson
import pytest

from coordinator_agent.exceptions import ProtocolError
from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire.security import fernet_token_bytes

RESULT = protocol.TaskResult(task_id="t-1", attempt=1, success=True, output={"n": 1})


def _decode(items: list[object]) -> protocol.Envelope:
    return protocol.decode(orjson.dumps({
        "v": 1, "id": "b-1", "type": "batch", "sender": "agent-1", "sent_at": 1.0,
        "payload": {"items": items}}).replace(b'"NAN"', b"NaN").replace(
            b'"BIG"', str(2**64).encode()))


def test_items_become_the_envelopes_they_stand_for() -> None:
    item = batch.item_of(RESULT, correlation_id="s-1", item_id="i-1")
    opened = list(batch.open_items(_decode([item])))
    assert len(opened) == 1 and opened[0].error is None
    envelope = opened[0].envelope
    assert envelope is not None
    assert (envelope.id, envelope.type, envelope.sender, envelope.sent_at,
            envelope.correlation_id) == ("i-1", "task.result", "agent-1", 1.0, "s-1")
    assert envelope.payload == RESULT


def test_a_bad_item_is_refused_alone_with_the_reason_a_single_message_gets() -> None:
    good = batch.item_of(RESULT, item_id="good")
    items: list[object] = [
        good,
        {"id": "no-payload", "type": "task.result"},
        {"id": "extra", "type": "task.result", "payload": good["payload"], "sender": "x"},
        {"id": "nested", "type": "batch", "payload": {"items": [good]}},
        {"id": "hello", "type": "agent.hello", "payload": {"kind": "k"}},
        {"id": "unknown", "type": "task.bogus", "payload": {}},
        {"id": "nan", "type": "task.result",
         "payload": {"task_id": "t", "attempt": 1, "success": True, "output": "NAN"}},
        {"id": "big", "type": "task.result",
         "payload": {"task_id": "t", "attempt": 1, "success": True, "output": "BIG"}},
        "not an object",
        {"type": "task.result", "payload": good["payload"]},  # no id
        batch.item_of(RESULT, item_id="good-too"),
    ]
    opened = list(batch.open_items(_decode(items)))
    assert [i.index for i in opened] == list(range(len(items)))
    assert [i.id for i in opened if i.error is None] == ["good", "good-too"]
    reasons = {i.id or str(i.index): (i.error.reason, i.error.detail)
               for i in opened if i.error is not None}
    assert reasons["no-payload"][0] == "malformed"
    assert "sender" in reasons["extra"][1]
    assert "may not travel in a batch" in reasons["nested"][1]
    assert "may not travel in a batch" in reasons["hello"][1]
    assert reasons["unknown"][0] == "unknown_type"
    assert "finite" in reasons["nan"][1]
    assert "64-bit" in reasons["big"][1]
    assert reasons["8"][1] == "item 8: an item must be a JSON object"
    assert reasons["9"][0] == "malformed"
    for item in opened:
        if item.error is not None:
            assert item.error.detail.startswith(f"item {item.index}: ")
            assert item.error.sender == "agent-1"


@pytest.mark.parametrize("items", [[], [{}] * (batch.MAX_BATCH_ITEMS + 1)])
def test_an_empty_or_oversized_batch_is_malformed_as_a_whole(items: list[object]) -> None:
    with pytest.raises(ProtocolError) as refused:
        _decode(items)
    assert refused.value.reason == "malformed"


def test_the_capability_label_says_how_many_items_an_agent_takes() -> None:
    assert batch.capability(16) == "batch:16"
    for wrong in (1, 0, batch.MAX_BATCH_ITEMS + 1):
        with pytest.raises(ValueError, match="between 2 and 64"):
            batch.capability(wrong)
    assert batch.limit_of(["gpu", "batch:16"]) == 16
    assert batch.limit_of(["gpu"]) == 1
    assert batch.limit_of(["batch:999", "batch:x", "batch:", "batch:99999999"]) == \
        batch.MAX_BATCH_ITEMS


def test_split_keeps_order_within_the_item_limit_and_the_sealed_size() -> None:
    items = [batch.item_of(protocol.TaskResult(task_id=f"t-{i}", attempt=1, success=True,
                                               output="x" * 900)) for i in range(40)]
    by_count = batch.split(items, limit=16, max_bytes=1_000_000)
    assert [len(b) for b in by_count] == [16, 16, 8]
    max_bytes = 8_000
    by_size = batch.split(items, limit=64, max_bytes=max_bytes)
    assert [i for b in by_size for i in b] == items
    assert len(by_size) > 1
    for chunk in by_size:
        envelope = protocol.make_envelope(protocol.Batch(items=chunk), sender="agent-1")
        assert fernet_token_bytes(len(protocol.encode(envelope))) <= max_bytes
    # An item too large even alone still goes (alone): the receiver refuses it as oversized.
    assert batch.split(items[:2], limit=64, max_bytes=100) == [[items[0]], [items[1]]]


def test_a_batch_encodes_as_pydantic_would_dump_it() -> None:
    assign = protocol.TaskAssign(task_id="t-2", attempt=2, description="noop",
                                 input={"op": "noop", "n": [1, 2.5, None, True]}, timeout_s=60.0)
    items = [batch.item_of(RESULT, correlation_id="s-1"), batch.item_of(assign),
             batch.item_of(protocol.TaskAccepted(task_id="t-3", status="pending"))]
    envelope = protocol.make_envelope(protocol.Batch(items=items), sender="coordinator")
    dumped = orjson.dumps({
        "v": envelope.v, "id": envelope.id, "type": envelope.type, "sender": envelope.sender,
        "sent_at": envelope.sent_at, "correlation_id": envelope.correlation_id,
        "payload": envelope.payload.model_dump(mode="json")})
    assert protocol.encode(envelope) == dumped
    assert protocol.decode(dumped).payload == envelope.payload
