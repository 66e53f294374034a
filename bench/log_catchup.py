"""A fresh standby's catch-up on the real broker: snapshot + tail against the whole log.

    .venv/bin/python bench/log_catchup.py                       # 1,000,000 events
    .venv/bin/python bench/log_catchup.py --events 200000 --snapshot-every 20000

Writes a log of ``--events`` task events through ``LogWriter`` (5 per task: accepted, assigned,
attempt finished, finished, notice sent; the accepted one carries the task, ~400 bytes). A
replica applies it into a SQLite store (one transaction per log entry, with the offset, as a
standby does) and writes a snapshot every ``--snapshot-every`` events, as configured by default.
Then ``--tail`` more events are written that no snapshot covers (default: one short of a full
interval, the worst case). Two fresh standbys then join, in the same run:

- **baseline**: no snapshot, reads the whole log from offset 0;
- **with snapshots**: ``restore_latest`` (the newest snapshot into its store file), then
  ``LogReader.resume`` from the store's offset to the tail.

Both must end with the same store (task count and statuses are compared). Also printed: the
append rate against raw aio-pika publishing the same messages with confirms. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection
from cryptography.fernet import Fernet

from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.ha.log import Event, LogCodec, LogReader, LogWriter, Retention, declare
from coordinator_agent.ha.restore import restore_latest
from coordinator_agent.ha.snapshot import (
    SnapshotRetention,
    SnapshotSchedule,
    declare_snapshots,
    publish_snapshot,
    snapshot_queue,
)
from coordinator_agent.settings import HASettings

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
LIFECYCLE = ("task.accepted", "task.assigned", "attempt.finished", "task.finished", "notice.sent")


def event(i: int) -> Event:
    """The i-th event of the log: event i % 5 of task i // 5."""
    task, step = divmod(i, len(LIFECYCLE))
    task_id = f"task-{task:09d}"
    data: dict[str, Any] = {"task_id": task_id, "at": 1764400000.0 + i / 1000}
    if step == 0:
        data["task"] = {
            "id": task_id, "description": f"Summarise the incident report number {task} for the "
            "on-call team, in three bullet points", "kind": "summarise",
            "required_capabilities": ["text", "summarise"], "submitted_by": "ops-team",
            "timeout_s": 60.0, "max_retries": 2, "priority": 5, "reply_to": "ca.reply.ops",
            "input": {"url": f"https://reports.example/{task}"}, "status": "pending"}
    elif step == 1:
        data.update(agent_id=f"agent-{task % 16:04d}", attempt=1, status="assigned")
    elif step == 2:
        data.update(attempt=1, outcome="succeeded", status="running")
    elif step == 3:
        data.update(status="succeeded", output={"summary": "three bullets", "tokens": 212})
    else:
        data.update(notified=True, status="succeeded")
    return Event(f"e{i}", 7, LIFECYCLE[step], data)


class Replica:
    """A standby's store: every log entry applied in one transaction with its offset."""

    def __init__(self, path: Path) -> None:
        TaskStore(path).close()  # the schema, meta table included
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")

    def apply(self, batch: list[Event], offset: int) -> None:
        inserts, updates = [], []
        for e in batch:
            d = e.data
            if e.type == "task.accepted":
                inserts.append((d["task_id"], "pending", 1, d["at"], orjson.dumps(d["task"])))
            else:
                patch = {k: v for k, v in d.items() if k not in ("task_id", "at")}
                done = int(e.type == "notice.sent")
                updates.append((d["status"], 1 - done, d["at"], orjson.dumps(patch), d["task_id"]))
        db = self.db
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?)", inserts)
        db.executemany("UPDATE tasks SET status=?, open=?, updated_at=?, "
                       "data=json_patch(data, ?) WHERE id=?", updates)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('log_offset', ?)", (offset,))
        db.execute("COMMIT")

    def summary(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status"))


async def write(channel: AbstractChannel, name: str, codec: LogCodec, first: int, count: int,
                per_turn: int) -> tuple[float, int]:
    writer = LogWriter(channel, name, codec, batch_max=per_turn)
    started = time.perf_counter()
    in_flight: list[asyncio.Future[None]] = []
    for i in range(first, first + count):
        in_flight.append(writer.append(event(i)))
        if len(in_flight) >= per_turn * 32:  # bound the unconfirmed batches, as a leader would
            await asyncio.gather(*in_flight)
            in_flight = []
    await asyncio.gather(*in_flight)
    return time.perf_counter() - started, writer.batches


async def follow(connection: AbstractConnection, name: str, codec: LogCodec, replica: Replica,
                 applied: int | None, last: int, schedule: SnapshotSchedule | None = None,
                 snapshots: SnapshotRetention | None = None) -> LogReader:
    """Apply the log after offset ``applied`` until event number ``last`` is in the replica."""
    channel = await connection.channel(publisher_confirms=True)
    pending: list[asyncio.Task[Any]] = []
    reached = asyncio.Event()
    last_id = f"e{last}"

    def apply(batch: list[Event], offset: int) -> None:
        replica.apply(batch, offset)
        if batch[-1].id == last_id:
            reached.set()
        if schedule is None or snapshots is None:
            return
        schedule.record(len(batch), 0)
        if schedule.due() and not any(not t.done() for t in pending):
            schedule.taken()
            path = Path(replica.db.execute("PRAGMA database_list").fetchone()[2])
            pending.append(asyncio.ensure_future(
                publish_snapshot(channel, name, codec, path, snapshots)))

    reader = LogReader(channel, name, codec, apply, prefetch=500)
    await reader.resume(applied)
    await asyncio.wait_for(reached.wait(), 900)
    await reader.stop()
    for task in pending:
        await task
    await channel.close()
    return reader


async def main(events: int, per_turn: int, every: int, tail: int) -> dict[str, Any]:
    name = f"bench-catchup-{uuid.uuid4().hex[:8]}"
    codec = LogCodec([Fernet.generate_key().decode()])
    ha = HASettings(snapshot_every_events=every)
    snapshots = SnapshotRetention(ha.snapshots_max_bytes)
    work = Path(tempfile.mkdtemp(prefix="ha-ops-bench-"))
    connection = await aio_pika.connect(BROKER_URL, client_properties={
        "connection_name": "bench/log_catchup"})
    out: dict[str, Any] = {"events": events, "events_per_message": per_turn,
                           "snapshot_every_events": every, "tail_events": tail}
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, name, Retention(max_age="1h", max_bytes=5 * 1024**3))
        await declare_snapshots(channel, name, snapshots)
        head = events - tail
        write_s, batches = await write(channel, name, codec, 0, head, per_turn)

        # The replica that snapshots, as a standby does in service (not part of the figures).
        started = time.perf_counter()
        schedule = SnapshotSchedule(every, ha.log_max_bytes // 4, ha.snapshot_interval_s)
        await follow(connection, name, codec, Replica(work / "replica.db"), None, head - 1,
                     schedule, snapshots)
        out["replica_apply_and_snapshot_s"] = round(time.perf_counter() - started, 2)
        tail_s, tail_batches = await write(channel, name, codec, head, tail, per_turn)
        out["append_events_per_s"] = round(events / (write_s + tail_s))

        baseline = Replica(work / "baseline.db")
        started = time.perf_counter()
        await follow(connection, name, codec, baseline, None, events - 1)
        out["baseline_from_offset_0_s"] = round(time.perf_counter() - started, 2)

        started = time.perf_counter()
        store = work / "standby.db"
        restore_channel = await connection.channel(publisher_confirms=True)
        info = await restore_latest(restore_channel, name, codec, store)
        await restore_channel.close()
        restored_s = time.perf_counter() - started
        assert info is not None, "no snapshot was written"
        standby = Replica(store)
        before = sum(standby.summary().values())
        reader = await follow(connection, name, codec, standby, info.log_offset, events - 1)
        catchup_s = time.perf_counter() - started
        assert standby.summary() == baseline.summary(), "the standby differs from the baseline"
        assert reader.gaps == 0
        out.update({
            "snapshot_store_mb": round(info.store_bytes / 1e6, 1),
            "snapshot_sealed_mb": round(info.sealed_bytes / 1e6, 1),
            "tasks_in_snapshot": before,
            "with_snapshot_restore_s": round(restored_s, 2),
            "with_snapshot_tail_events": reader.applied_events,
            "with_snapshot_catchup_s": round(catchup_s, 2),
        })
        out["speedup_vs_baseline"] = round(out["baseline_from_offset_0_s"] / catchup_s, 1)

        raw_queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
        await channel.declare_queue(raw_queue, durable=True, arguments={"x-queue-type": "stream"})
        body = codec.seal([event(i) for i in range(per_turn)])
        raw_s = await raw_publish(channel, raw_queue, batches + tail_batches, body)
        out["append_vs_raw_publish"] = round(raw_s / (write_s + tail_s), 2)
        await channel.queue_delete(raw_queue)
        for queue in (f"ca.{name}.log", snapshot_queue(name)):
            await channel.queue_delete(queue)
    finally:
        await connection.close()
        await asyncio.to_thread(shutil.rmtree, work, True)
    return out


async def raw_publish(channel: AbstractChannel, queue: str, count: int, body: bytes) -> float:
    started = time.perf_counter()
    pending = []
    for _ in range(count):
        pending.append(channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue))
        if len(pending) >= 100:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return time.perf_counter() - started


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--per-turn", type=int, default=100)
    parser.add_argument("--snapshot-every", type=int,
                        default=HASettings().snapshot_every_events)
    parser.add_argument("--tail", type=int, default=None,
                        help="events after the last snapshot (default: snapshot-every - 1)")
    args = parser.parse_args()
    tail = args.snapshot_every - 1 if args.tail is None else args.tail
    print(json.dumps(asyncio.run(main(args.events, args.per_turn, args.snapshot_every, tail)),
                     indent=2))
