"""The replica's pure parts: epoch fencing of the log, the event types, exactly-once apply with
the offset, and the leader's writes held until its own log reader applies them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet

from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import Attempt, TaskRecord, TaskStatus
from coordinator_agent.exceptions import StoreUnavailable, TransportError
from coordinator_agent.ha.log import Event, LogCodec, LogWriter
from coordinator_agent.ha.replication import (
    EPOCH_STARTED,
    EpochFence,
    Replication,
    task_event_type,
)


def event(epoch: int, kind: str = "task.assigned", n: int = 0) -> Event:
    return Event(f"{kind}-{epoch}-{n}", epoch, kind, {})


def test_a_deposed_leaders_decisions_are_dropped_once_a_higher_epoch_has_started() -> None:
    fence = EpochFence()
    log = [event(5, EPOCH_STARTED), event(5, n=1), event(5, n=2),
           event(9, EPOCH_STARTED),
           event(5, n=3),            # the old leader, after the new term began: dropped
           event(9, n=4),
           event(7, EPOCH_STARTED),  # a lower term starting late: dropped
           event(7, n=5), event(9, n=6)]
    admitted = [e.id for e in log if fence.admit(e)]
    assert admitted == ["epoch.started-5-0", "task.assigned-5-1", "task.assigned-5-2",
                        "epoch.started-9-0", "task.assigned-9-4", "task.assigned-9-6"]
    assert fence.epoch == 9 and fence.dropped == 3


def test_every_replica_reaches_the_same_verdict_from_the_same_log() -> None:
    log = [event(e, EPOCH_STARTED if n % 4 == 0 else "task.finished", n)
           for n, e in enumerate([3, 3, 4, 3, 4, 4, 2, 4, 6, 4, 6])]
    verdicts = [[fence.admit(e) for e in log] for fence in (EpochFence(), EpochFence())]
    assert verdicts[0] == verdicts[1]
    # A replica restarted with the fence it stored goes on exactly as one that never stopped.
    whole = EpochFence()
    first = [whole.admit(e) for e in log]
    half = EpochFence()
    head = [half.admit(e) for e in log[:5]]
    resumed = EpochFence(half.epoch)
    assert head + [resumed.admit(e) for e in log[5:]] == first


def task(status: TaskStatus, *, attempts: int = 0, notified: bool = False) -> TaskRecord:
    record = TaskRecord(id="t1", description="d", submitted_by="op", timeout_s=5.0)
    record.status = status
    record.notified = notified
    record.attempts = [Attempt(number=n + 1, agent_id="agent-1", started_at=0.0, deadline=5.0)
                       for n in range(attempts)]
    return record


def test_events_are_typed_by_the_transition() -> None:
    assert task_event_type(task(TaskStatus.PENDING)) == "task.accepted"
    assert task_event_type(task(TaskStatus.ASSIGNED, attempts=1)) == "task.assigned"
    assert task_event_type(task(TaskStatus.PENDING, attempts=1)) == "task.attempt_finished"
    assert task_event_type(task(TaskStatus.SUCCEEDED, attempts=1)) == "task.finished"
    assert task_event_type(task(TaskStatus.SUCCEEDED, attempts=1, notified=True)) == \
        "task.notice_sent"


def record_dict(status: TaskStatus, **kw: Any) -> dict[str, Any]:
    return dict(orjson.loads(orjson.dumps(task(status, **kw))))


def test_the_store_applies_a_log_entry_with_its_offset_in_one_transaction(
        tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "s.sqlite3")
    assert store.log_offset() is None
    store.apply_log([("e1", record_dict(TaskStatus.PENDING))], 7, 3)
    assert store.log_offset() == 7 and store.meta("fence_epoch") == "3"
    assert [t.id for t in store.open_tasks()] == ["t1"]
    store.apply_log([("e2", record_dict(TaskStatus.SUCCEEDED, attempts=1, notified=True))],
                    8, 3)
    assert store.log_offset() == 8 and list(store.open_tasks()) == []
    stored = store.get("t1")
    assert stored is not None and stored.status is TaskStatus.SUCCEEDED
    # A bad record rolls the whole entry back: neither the state nor the offset moves.
    with pytest.raises(KeyError):
        store.apply_log([("e3", {"id": "t2"})], 9, 3)
    assert store.log_offset() == 8 and store.get("t2") is None
    store.close()


def test_a_leaders_writes_stay_in_memory_until_its_log_reader_applies_them(
        tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "s.sqlite3")
    logged: list[tuple[str, bytes]] = []

    def log(record: TaskRecord, data: bytes) -> str:
        logged.append((f"e{len(logged)}", data))
        return logged[-1][0]
    store.replicate(log)
    store.save(task(TaskStatus.PENDING))
    assert store.unapplied == 1 and list(store.open_tasks()) == []  # the file: a log prefix
    got = store.get("t1")
    assert got is not None and got.status is TaskStatus.PENDING  # reads see the write
    event_id, data = logged[0]
    store.apply_log([(event_id, orjson.loads(data))], 0, 1)
    assert store.unapplied == 0 and [t.id for t in store.open_tasks()] == ["t1"]
    # Deposed: a standby's store takes no writes, and unapplied ones are void.
    store.replicate(None)
    with pytest.raises(StoreUnavailable):
        store.save(task(TaskStatus.ASSIGNED))
    store.close()


async def test_a_reader_skips_a_fenced_batch_but_moves_the_offset(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "s.sqlite3")
    codec = LogCodec([Fernet.generate_key().decode()])
    replication = Replication("amqp://unused", "n", codec, store, epoch=lambda: 0)
    old = record_dict(TaskStatus.PENDING)
    await replication._apply([Event("m9", 9, EPOCH_STARTED, {})], 0)
    await replication._apply([Event("x", 5, "task.accepted", old)], 1)
    assert store.get("t1") is None and store.log_offset() == 1
    assert replication.fence.dropped == 1
    # A replica restarted from this store keeps the fence.
    again = Replication("amqp://unused", "n", codec, store, epoch=lambda: 0)
    assert again.fence.epoch == 9
    store.close()


class _Underlay:
    """A broker stand-in for the writer: each publish waits for the test to confirm or refuse."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.refuse = False
        self.published = 0

    async def basic_publish(self, body: bytes, **kwargs: Any) -> None:
        await self.gate.wait()
        if self.refuse:
            raise ConnectionError("nacked")
        self.published += 1


class _Channel:
    def __init__(self) -> None:
        self.underlay = _Underlay()

    async def get_underlay_channel(self) -> _Underlay:
        return self.underlay


def leading(tmp_path: Path) -> tuple[TaskStore, Replication, _Channel, LogWriter]:
    """A leader's replication over a broker stand-in: the store's writes become log events."""
    store = TaskStore(tmp_path / "s.sqlite3")
    codec = LogCodec([Fernet.generate_key().decode()])
    replication = Replication("amqp://unused", "n", codec, store, epoch=lambda: 4)
    channel = _Channel()
    writer = replication._writer = LogWriter(channel, "n", codec)  # type: ignore[arg-type]
    replication.writing = True
    store.replicate(replication.record_task)
    return store, replication, channel, writer


async def test_effects_wait_for_the_confirm_and_a_refused_batch_ends_the_term(
        tmp_path: Path) -> None:
    store, replication, channel, _ = leading(tmp_path)

    store.save(task(TaskStatus.PENDING))
    store.save(task(TaskStatus.ASSIGNED, attempts=1))  # the same turn: one batch
    barrier = asyncio.ensure_future(replication.barrier())
    await asyncio.sleep(0.05)
    assert not barrier.done()  # nothing may take effect before the broker confirms
    channel.underlay.gate.set()
    await asyncio.wait_for(barrier, 1)
    assert channel.underlay.published == 1

    channel.underlay.refuse = True
    store.save(task(TaskStatus.SUCCEEDED, attempts=1))
    with pytest.raises(TransportError):
        await asyncio.wait_for(replication.barrier(), 1)
    with pytest.raises(TransportError):  # and every later one: memory is ahead of the log
        await replication.barrier()
    store.close()


async def test_a_cancelled_wait_does_not_cancel_the_batch_for_the_others(
        tmp_path: Path) -> None:
    """Every event of a batch and every barrier shares the batch's one confirm: a waiter
    cancelled meanwhile (its handler stopped) is cancelled once the confirm resolves, and the
    others still see the confirm."""
    store, replication, channel, writer = leading(tmp_path)

    store.save(task(TaskStatus.PENDING))
    first = writer.append(event(4, n=1))
    assert first is writer.append(event(4, n=2))  # one future for the batch's events
    cancelled = asyncio.ensure_future(replication.barrier())
    other = asyncio.ensure_future(replication.barrier())
    await asyncio.sleep(0.05)
    cancelled.cancel()
    await asyncio.sleep(0.05)
    assert not cancelled.done() and not first.cancelled()  # held until the confirm
    channel.underlay.gate.set()
    await asyncio.wait_for(other, 1)  # confirmed, not cancelled
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert first.done() and first.exception() is None
    assert channel.underlay.published == 1 and replication.failed is None
    store.close()


async def test_a_notice_marked_sent_waits_for_a_batch_until_a_barrier_needs_it(
        tmp_path: Path) -> None:
    """Nothing waits for ``task.notice_sent``: it sends no batch of its own (it rides with the
    next one), but a barrier that comes to cover it sends it at once, not after a timer."""
    store, replication, channel, writer = leading(tmp_path)
    channel.underlay.gate.set()

    store.save(task(TaskStatus.SUCCEEDED, attempts=1, notified=True))
    for _ in range(5):
        await asyncio.sleep(0)
    assert writer.unsent == 1 and channel.underlay.published == 0
    barrier = asyncio.ensure_future(replication.barrier())
    for _ in range(4):  # its own turn, then the two a batch waits for what it woke
        await asyncio.sleep(0)
    assert writer.unsent == 0
    await asyncio.wait_for(barrier, 1)
    assert channel.underlay.published == 1
    store.save(task(TaskStatus.SUCCEEDED, attempts=1))  # awaited: sent without a barrier
    for _ in range(3):
        await asyncio.sleep(0)
    assert writer.unsent == 0
    store.close()
