"""Batches: several messages of one sender in one sealed ``batch`` message (PROTOCOL.md §9.13).

A batch pays one seal, one publish, one confirm and one ack for all of its items. Each item is
an envelope without the fields it shares with the batch (``v``, ``sender``, ``sent_at``) and is
checked on its own, as a message of its own would be: a bad item is refused with its reason and
the others are handled. Only the work messages that come in bursts travel in batches.

An agent takes batches only once it has announced it: the capability ``batch:N`` (N items at
most) in its ``agent.hello`` and ``agent.status``; a client, once it has submitted a batch
naming its reply queue. Old single messages are always accepted too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson

from coordinator_agent.exceptions import ProtocolError, RejectedMessage
from coordinator_agent.wire import protocol
from coordinator_agent.wire.security import fernet_token_bytes

BATCH_TYPE = "batch"
#: The message types that may be items of a batch; everything else travels alone.
BATCHABLE = frozenset({"task.assign", "task.progress", "task.result", "task.submit",
                       "task.accepted", "task.completed"})
#: The fields of an item: an envelope's own ones (the rest it takes from the batch).
ITEM_FIELDS = frozenset({"id", "type", "correlation_id", "payload"})
#: An agent's announcement: ``batch:N``, N from 2 to ``MAX_BATCH_ITEMS``.
CAPABILITY_PREFIX = "batch:"
MAX_BATCH_ITEMS = protocol.MAX_BATCH_ITEMS


def capability(limit: int) -> str:
    """The capability label that announces batches of at most ``limit`` items."""
    if not 2 <= limit <= MAX_BATCH_ITEMS:
        raise ValueError(f"a batch limit is between 2 and {MAX_BATCH_ITEMS}, not {limit}")
    return f"{CAPABILITY_PREFIX}{limit}"


def limit_of(capabilities: Iterable[str]) -> int:
    """Most items per batch this agent takes: 1 (no batches) unless it announced ``batch:N``."""
    best = 1
    for label in capabilities:
        if label.startswith(CAPABILITY_PREFIX):
            digits = label[len(CAPABILITY_PREFIX):]
            if digits.isdigit() and len(digits) <= 3:
                best = max(best, min(int(digits), MAX_BATCH_ITEMS))
    return best


@dataclass(frozen=True, slots=True)
class Item:
    """One item of a batch: its envelope, or why it is refused (then ``envelope`` is None)."""

    index: int
    id: str | None
    envelope: protocol.Envelope | None = None
    error: RejectedMessage | None = None


def open_items(batch: protocol.Envelope) -> Iterator[Item]:
    """The items of a decoded batch, each validated as a message of its own would be."""
    assert isinstance(batch.payload, protocol.Batch)
    for index, raw in enumerate(batch.payload.items):
        item_id = (raw.get("id") if isinstance(raw, dict)
                   else raw.id if isinstance(raw, protocol.OutOfRange) else None)
        item_id = item_id if isinstance(item_id, str) and len(item_id) <= 128 else None
        try:
            envelope = _item_envelope(batch, raw)
        except RejectedMessage as exc:
            exc.detail = f"item {index}: {exc.detail}"
            exc.sender, exc.message_id = batch.sender, item_id
            yield Item(index, item_id, error=exc)
            continue
        yield Item(index, envelope.id, envelope)


def _item_envelope(batch: protocol.Envelope, raw: object) -> protocol.Envelope:
    if isinstance(raw, protocol.OutOfRange):
        raise ProtocolError("malformed", f"invalid payload: {raw.why}")
    if not isinstance(raw, dict):
        raise ProtocolError("malformed", "an item must be a JSON object")
    extra = set(raw) - ITEM_FIELDS
    if extra:
        raise ProtocolError("malformed", f"invalid fields: {', '.join(sorted(extra))[:200]}")
    item_type = raw.get("type")
    if isinstance(item_type, str) and item_type in protocol.MESSAGE_TYPES \
            and item_type not in BATCHABLE:
        raise ProtocolError("malformed", f"{item_type} may not travel in a batch")
    # The item as the envelope it stands for, checked by the one codec every message goes
    # through: the same rules and the same reasons as a message sent alone.
    whole = {"v": batch.v, "id": raw.get("id"), "type": item_type, "sender": batch.sender,
             "sent_at": batch.sent_at, "correlation_id": raw.get("correlation_id"),
             "payload": raw.get("payload")}
    return protocol.decode(orjson.dumps(whole))


def item_of(payload: protocol.Model, *, correlation_id: str | None = None,
            item_id: str | None = None) -> dict[str, object]:
    """A batch item from a validated payload (what the sender builds)."""
    item: dict[str, object] = {"id": item_id or protocol.new_message_id(),
                               "type": protocol.TYPE_OF_PAYLOAD[type(payload)],
                               "payload": payload.model_dump(mode="json")}
    if correlation_id is not None:
        item["correlation_id"] = correlation_id
    return item


def item_bytes(item: dict[str, object]) -> int:
    """An item's share of a batch's plaintext (its JSON and a comma)."""
    return len(orjson.dumps(item)) + 1


#: A batch envelope's plaintext without its items (a generous bound: ids of 128 characters).
ENVELOPE_OVERHEAD_BYTES = 512


def split(items: list[dict[str, object]], *, limit: int, max_bytes: int
          ) -> list[list[dict[str, object]]]:
    """Items in order, in batches of at most ``limit`` items whose sealed message stays within
    ``max_bytes`` (an item too large even alone gets a batch of its own: the receiver refuses it
    as ``oversized``, as it would the single message)."""
    batches: list[list[dict[str, object]]] = []
    current: list[dict[str, object]] = []
    size = ENVELOPE_OVERHEAD_BYTES
    for item in items:
        grows = item_bytes(item)
        if current and (len(current) >= limit
                        or fernet_token_bytes(size + grows) > max_bytes):
            batches.append(current)
            current, size = [], ENVELOPE_OVERHEAD_BYTES
        current.append(item)
        size += grows
    if current:
        batches.append(current)
    return batches
