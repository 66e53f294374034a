"""ReplayGuard: ids remembered for the window (and at most a third longer), none confused."""

from __future__ import annotations

import uuid

from coordinator_agent.wire.replay import ReplayGuard


def test_an_id_is_remembered_for_the_window_then_forgotten() -> None:
    guard = ReplayGuard(window_s=90)  # generations of 30 s
    assert guard.check_and_remember("a", now=1000.0)
    assert not guard.check_and_remember("a", now=1050.0)
    assert not guard.check_and_remember("a", now=1089.9)
    assert guard.check_and_remember("b", now=1089.9)
    assert len(guard) == 2
    # Within window_s of its sighting an id is a replay; after window_s + span it is forgotten.
    assert not guard.check_and_remember("b", now=1089.9 + 89.9)
    assert guard.check_and_remember("a", now=1000.0 + 90 + 30)
    # Much later everything old is dropped; only the id just checked remains.
    assert guard.check_and_remember("c", now=5000.0)
    assert len(guard) == 1


def test_many_ids_none_lost_none_confused() -> None:
    guard = ReplayGuard(window_s=180)
    ids = [f"agent-1/{uuid.uuid4().hex}" for _ in range(20_000)]
    for n, message_id in enumerate(ids):
        assert guard.check_and_remember(message_id, now=1000.0 + n * 0.001)
    assert len(guard) == len(ids)
    assert not any(guard.check_and_remember(message_id, now=1030.0) for message_id in ids)
    # Flat tables: at most 16 bytes per id (tables at most half full, grown by doubling).
    assert guard.memory_bytes() <= 32 * len(ids)
    # Once the window has passed, the tables are dropped whole.
    assert guard.check_and_remember("late", now=1000.0 + 20 + 180 + 60 + 1)
    assert len(guard) == 1
