"""Snapshots on a real RabbitMQ stream: written in chunks, restored newest-complete, checked."""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel
from cryptography.fernet import Fernet

from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.ha import replication, snapshot
from coordinator_agent.ha.log import (
    Event,
    LogCodec,
    LogReader,
    LogWriter,
    Retention,
    declare,
)
from coordinator_agent.ha.restore import restore_latest
from coordinator_agent.ha.snapshot import (
    SnapshotRetention,
    declare_snapshots,
    publish_entry,
    publish_snapshot,
    seal_entry,
)
from coordinator_agent.wire.constants import log_queue, snapshot_queue
from coordinator_agent.wire.messaging import close_connection
from tests.integration.ha.test_log import events

CODEC = LogCodec([Fernet.generate_key().decode()])
RETENTION = SnapshotRetention(max_bytes=200 * 1024**2, segment_bytes=8 * 1024**2)


@pytest.fixture
async def name(broker_url: str, channel: AbstractChannel) -> AsyncIterator[str]:
    name = f"t-snap-{uuid.uuid4().hex[:8]}"
    await declare_snapshots(channel, name, RETENTION)
    yield name
    connection = await aio_pika.connect(broker_url)
    cleanup = await connection.channel()
    await cleanup.queue_delete(snapshot_queue(name))
    await cleanup.queue_delete(log_queue(name))
    await close_connection(connection)


@pytest.fixture
async def standby(name: str, tmp_path: Path,
                  broker_url: str) -> AsyncIterator[replication.Replication]:
    """A replica that restores snapshots, over an empty store; not started."""
    store = TaskStore(tmp_path / "standby" / "store.db")
    replica = replication.Replication(
        broker_url, name, CODEC, store, epoch=lambda: 0,
        snapshots=(RETENTION, snapshot.SnapshotSchedule(10**6, 10**9, 3600)))
    yield replica
    await replica.stop()
    store.close()


def fill(path: Path, tasks: range, offset: int, pad: int = 200) -> None:
    """Write tasks and the log offset into a store file, as a standby's apply would."""
    TaskStore(path).close()  # the schema
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.executemany("INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?)",
                   [(f"t{i}", "completed", 0, float(i), uuid.uuid4().bytes * (pad // 16))
                    for i in tasks])
    db.execute("INSERT OR REPLACE INTO meta VALUES ('log_offset', ?)", (offset,))
    db.execute("COMMIT")
    db.close()


def content(path: Path) -> tuple[int | None, int]:
    store = TaskStore(path)
    try:
        return store.log_offset(), sum(store.counts().values())
    finally:
        store.close()


async def test_restores_the_newest_complete_snapshot_in_many_chunks(
        channel: AbstractChannel, name: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 64 * 1024)  # many chunks from a small store
    leader = tmp_path / "leader" / "store.db"
    fill(leader, range(2000), offset=41)
    first = await publish_snapshot(channel, name, CODEC, leader, RETENTION)
    fill(leader, range(2000, 5000), offset=97)
    second = await publish_snapshot(channel, name, CODEC, leader, RETENTION)
    assert (first.log_offset, second.log_offset) == (41, 97)
    assert second.chunks > 5

    # A third writer dies midway: chunks without a manifest must be ignored.
    dead = uuid.uuid4().hex
    await publish_entry(channel, name, seal_entry(CODEC, {"kind": "chunk", "id": dead, "seq": 0},
                                                  b"junk"), dead, "chunk")
    # And someone without the coordinator's key cannot slip a manifest in.
    forged = LogCodec([Fernet.generate_key().decode()])
    await publish_entry(channel, name, seal_entry(forged, {"kind": "manifest", "id": dead}),
                        dead, "manifest")

    fresh = tmp_path / "standby" / "store.db"
    restored = await restore_latest(channel, name, CODEC, fresh)
    assert restored is not None and restored.id == second.id
    assert content(fresh) == (97, 5000)
    assert not list(fresh.parent.glob(".restore-*")), "spool files left behind"


async def test_keeps_a_local_store_that_is_as_new(
        channel: AbstractChannel, name: str, tmp_path: Path) -> None:
    leader = tmp_path / "leader.db"
    fill(leader, range(100), offset=10)
    await publish_snapshot(channel, name, CODEC, leader, RETENTION)
    local = tmp_path / "standby.db"
    fill(local, range(300), offset=12)
    assert await restore_latest(channel, name, CODEC, local) is None
    assert content(local) == (12, 300)


async def test_no_snapshot_yet(channel: AbstractChannel, name: str, tmp_path: Path) -> None:
    assert await restore_latest(channel, name, CODEC, tmp_path / "s.db") is None
    assert not (tmp_path / "s.db").exists()


async def test_a_store_without_a_log_offset_is_refused(
        channel: AbstractChannel, name: str, tmp_path: Path) -> None:
    TaskStore(tmp_path / "plain.db").close()
    with pytest.raises(ValueError, match="no log offset"):
        await publish_snapshot(channel, name, CODEC, tmp_path / "plain.db", RETENTION)


async def test_resume_finds_its_entry_or_counts_a_gap(
        channel: AbstractChannel, name: str) -> None:
    # Tiny segments and byte limit: retention drops the first segments while we write.
    await declare(channel, name, Retention(max_age="1h", max_bytes=300_000,
                                           segment_bytes=60_000))
    writer = LogWriter(channel, name, CODEC, batch_max=50)
    for i in range(150):
        for e in events(50, prefix=f"b{i}-"):
            writer.append(e)
        await writer.flush()

    # A run of entries is applied at once: (the offset of its last entry, the batch number of
    # each of its events), one per ``apply``. Every entry here is one batch of 50 events.
    Run = tuple[int, list[int]]

    def batch_of(event: Event) -> int:
        return int(event.id.split("-")[0][1:])

    async def read(applied: int | None) -> tuple[list[Run], LogReader]:
        runs: list[Run] = []
        reader = LogReader(channel, name, CODEC, lambda batch, offset: runs.append(
            (offset, [batch_of(e) for e in batch])))
        await reader.resume(applied)
        while not runs or reader.applied_events < 50 * 10:
            await reader.wait_for_offset(reader.next_offset + 1, timeout=30)
        await reader.stop()
        return runs, reader

    from_start, reader = await read(None)
    assert from_start[0][1][0] > 0, "retention should have dropped the first entries"
    assert reader.gaps == 1
    batches = [b for _, run in from_start for b in run]
    assert batches == sorted(batches) and len(batches) == 50 * len(set(batches))

    offset, run = from_start[1]  # an entry still in the stream: the last of the second run
    tail, reader = await read(offset)
    assert reader.gaps == 0
    assert tail[0][1][0] == run[-1] + 1, "resumes right after the entry it names, skipping it"


async def test_a_replica_whose_start_the_broker_fails_tries_again_and_restores(
        channel: AbstractChannel, name: str, tmp_path: Path, standby: replication.Replication,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    leader = tmp_path / "leader" / "store.db"
    fill(leader, range(50), offset=12)
    await publish_snapshot(channel, name, CODEC, leader, RETENTION)
    # The broker's answer to an append on a stream whose writer is not up yet (coordinators
    # starting together): it closes the connection. Once, on the first try.
    tries: list[int] = []

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        if len(tries) == 1:
            error = aiormq.exceptions.ConnectionInternalError("INTERNAL_ERROR")
            connection = standby._connection
            assert connection is not None and connection.transport is not None
            await connection.transport.connection.close(error)
            raise error
        return await restore_latest(*args, **kwargs)

    monkeypatch.setattr(replication, "restore_latest", failing_once)
    with caplog.at_level(logging.WARNING, logger="coordinator_agent.ha.replication"):
        await standby.start()
    assert len(tries) == 2
    assert any("trying again" in r.getMessage() for r in caplog.records)
    assert standby.store.log_offset() == 12 and sum(standby.store.counts().values()) == 50


async def test_a_replica_start_the_broker_refuses_fails_at_once(
        standby: replication.Replication, monkeypatch: pytest.MonkeyPatch) -> None:
    # A refusal (a stream declared with other arguments, access refused) is not mended by
    # trying again: the start fails on the first try, not after a minute of them.
    tries: list[int] = []

    async def refused(*args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        raise aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED")

    monkeypatch.setattr(replication, "restore_latest", refused)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await standby.start()
    assert tries == [1]
