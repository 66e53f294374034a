"""Replication: the leader logs every durable change; every coordinator applies the log.

The durability pipeline of an HA coordinator, in one place:

- **Record.** In HA mode a task write (``TaskStore.save``) is not a file write: it is appended
  to the log as the whole task record, typed by the transition, with the term's epoch, and held
  in the store's memory until it comes back. So are routing outcomes (what the learner's
  update takes) and drained agents.
- **Barrier (group commit).** ``LogWriter`` puts every event of one loop turn into one message
  with one confirm. Every external effect (the ack of the message that caused a change, a
  directive or notice the outbox publishes, an HTTP 2xx) first awaits ``barrier()``: the
  confirm of the last event appended so far. Batches publish in order on one channel, so that
  covers every earlier one; a batch that ever failed fails every later barrier (the leader's
  memory is then ahead of the log, and it must not lead on).
  A record that justifies no effect (a notice marked sent, ``UNAWAITED``) sends no batch of its
  own: it rides with the next one, or leaves after ``UNAWAITED_FLUSH_S``, or at once when a
  barrier comes to wait for it.
- **Apply.** Every coordinator, the leader too, reads the log from the offset its store holds
  and applies each run of batches (what one loop turn delivers, ``LogReader``) in one SQLite
  transaction together with the new offset (exactly-once apply). The file therefore only ever
  holds a prefix of the log: a leader killed between a write and its confirm leaves nothing
  behind that the log lacks. ``EpochFence`` drops the decisions of a deposed leader once a
  higher epoch's ``epoch.started`` marker is in the log.
- **Takeover barrier.** ``begin_term`` appends ``epoch.started(E)`` and returns once the reader
  has applied it: the store then holds everything the previous leader logged.
- **Snapshots.** At start, before reading the log, a replica restores the newest snapshot if it
  is newer than its store (``ha/restore.py``), so a fresh standby reads only the log after it.
  The leader, which applies the log like everyone, publishes one on the schedule of
  ``ha/snapshot.py``, never two at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from coordinator_agent.coordinator.store import Row, TaskStore, task_row
from coordinator_agent.coordinator.tasks import TaskRecord, TaskStatus
from coordinator_agent.exceptions import StoreError, TransportError
from coordinator_agent.ha.log import (
    Event,
    LogCodec,
    LogReader,
    LogWriter,
    Retention,
    declare,
    tail_offset,
    writer_channel,
)
from coordinator_agent.ha.restore import restore_latest
from coordinator_agent.ha.snapshot import (
    SnapshotRetention,
    SnapshotSchedule,
    declare_snapshots,
    publish_snapshot,
)
from coordinator_agent.wire import coalesce
from coordinator_agent.wire.messaging import BROKER_ERRORS

log = logging.getLogger(__name__)

EPOCH_STARTED = "epoch.started"
ROUTING_OUTCOME = "routing.outcome"
AGENT_DRAINED = "agent.drained"
#: Records that justify no external effect: a notice marked sent only spares a new leader
#: sending it again (clients keep the first). They ride with the next batch (``LogWriter``).
UNAWAITED = frozenset({"task.notice_sent"})
#: How often a reader looks for the stream's tail (for the lag gauge).
TAIL_PROBE_S = 2.0
#: Pause before applying a batch again after the store refused it.
APPLY_RETRY_S = 0.5
#: At stop, how long each step (a background task's end, the reader's last run, the
#: connection's close) may take before it is left behind: a broker that stops answering must
#: not keep a stopping coordinator alive.
STOP_STEP_S = 5.0
#: How long a start that the broker fails is tried again (``Replication._prepare``) ...
START_RETRY_S = 60.0
#: ... when it failed this way: the connection lost (aiormq says "closed" with a RuntimeError
#: when a channel is opened on it), not a refusal (a stream's arguments changed, access
#: refused) nor a disk error, which no retry mends.
CONNECTION_LOST = (aiormq.exceptions.AMQPConnectionError, ConnectionError, RuntimeError,
                   TimeoutError)

#: The leader's own task rows kept for its reader, at most (then it opens them like any).
OWN_ROWS_REMEMBERED = 10_000

#: What a task event's record must have for the store to hold it.
_TASK_KEYS = frozenset({"id", "status", "updated_at"})

#: Takes a logged routing outcome: the learner's own replayable update, as plain data.
Outcome = Callable[[dict[str, Any]], None]


def task_event_type(task: TaskRecord) -> str:
    """The transition a task write records (the data is the whole record either way)."""
    if task.status.terminal:
        return "task.notice_sent" if task.notified else "task.finished"
    if task.status is TaskStatus.PENDING:
        return "task.attempt_finished" if task.attempts else "task.accepted"
    return "task.assigned"


class EpochFence:
    """Which events a reader applies: a deposed leader's decisions are dropped once a higher
    epoch has started. Every replica reads the same order, so every replica agrees."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch  # the highest epoch whose start marker has been read
        self.dropped = 0

    def admit(self, event: Event) -> bool:
        if event.type == EPOCH_STARTED:
            if event.epoch >= self.epoch:
                self.epoch = event.epoch
                return True
        elif event.epoch >= self.epoch:
            return True
        self.dropped += 1
        return False


class Replication:
    def __init__(self, url: str, name: str, codec: LogCodec, store: TaskStore, *,
                 epoch: Callable[[], int], on_outcome: Outcome | None = None,
                 retention: Retention | None = None,
                 snapshots: tuple[SnapshotRetention, SnapshotSchedule] | None = None) -> None:
        self.url = url
        self.name = name
        self.codec = codec
        self.store = store
        self.epoch = epoch
        self.on_outcome = on_outcome
        self.retention = retention or Retention()
        #: Where snapshots go and when; None: this replica neither restores nor writes any.
        self.snapshots = snapshots
        self._snapshot: asyncio.Task[None] | None = None
        self._applied_bytes = 0
        self.fence = EpochFence(int(store.meta("fence_epoch") or 0))
        #: Terms this process led: its learner took their routing outcomes already.
        self.own_epochs: set[int] = set()
        self.writing = False
        self.failed: TransportError | None = None
        self.tail: int | None = None
        self.applied_events = 0
        self._last: asyncio.Future[None] | None = None
        self._event_prefix = uuid.uuid4().hex[:20]
        self._event_count = 0
        #: This leader's task writes as store rows, by event id, until the reader applies them.
        self._own_rows: dict[str, Row] = {}
        self._markers: dict[str, asyncio.Future[None]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._writer: LogWriter | None = None
        self._reader: LogReader | None = None
        self._probe: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Replication(name={self.name!r}, writing={self.writing})"

    async def start(self) -> None:
        # Coalesced: an append and the reader's acks of one writer step leave in one write.
        self._connection = await coalesce.connect_robust(self.url, client_properties={
            "connection_name": f"{self.name}/log"})
        writes = await self._prepare(self._connection)
        self._writer = LogWriter(writes, self.name, self.codec)
        self._reader = LogReader(await self._connection.channel(), self.name, self.codec,
                                 self._apply, known=self._writer.sent)
        # From the entry the store holds, which must still be there (else a gap is counted).
        await self._reader.resume(self.store.log_offset())
        self._probe = asyncio.create_task(self._probe_tail(), name="log-tail")

    async def _prepare(self, connection: AbstractRobustConnection) -> AbstractChannel:
        """Declare the streams and restore the newest snapshot; returns the writer's channel.

        Tried again while the connection is lost, for up to ``START_RETRY_S``: coordinators
        starting together can append to a stream that another has just declared before the
        stream's writer is up, and RabbitMQ answers that by closing the connection
        (INTERNAL_ERROR). Each try starts over; a snapshot is replaced only by a whole one.
        """
        deadline = time.monotonic() + START_RETRY_S
        delay = 0.5
        while True:
            writes: AbstractChannel | None = None
            try:
                # On a connection the broker has just closed: an error, or a wait for the
                # reconnect.
                writes = await writer_channel(connection)
                await declare(writes, self.name, self.retention)
                if self.snapshots is not None and self.store.path != ":memory:":
                    await declare_snapshots(writes, self.name, self.snapshots[0])
                    if await restore_latest(writes, self.name, self.codec,
                                            Path(self.store.path)):
                        self.store.reopen()
                        self.fence = EpochFence(int(self.store.meta("fence_epoch") or 0))
                return writes
            except CONNECTION_LOST as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("log: the broker failed the start (%r); trying again in %.1f s",
                            exc, delay)
                if writes is not None:
                    with contextlib.suppress(*BROKER_ERRORS, TimeoutError):
                        await asyncio.wait_for(writes.close(), STOP_STEP_S)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def stop(self) -> None:
        if self._writer is not None and self._reader is not None:
            log.info("log: %d events appended in %d batches; %d applied in %d runs, up to "
                     "offset %d", self._writer.events, self._writer.batches,
                     self.applied_events, self._reader.runs, self._reader.next_offset - 1)
        for task in (self._snapshot, self._probe):
            if task is not None:
                task.cancel()
                await _bounded(_settled(task), f"the end of {task.get_name()}")
        if self._writer is not None:
            await self._writer.flush()  # each publish is bounded by its own timeout
        if self._reader is not None:
            await _bounded(self._reader.stop(), "the log reader's last run")
        if self._connection is not None:
            await _bounded(self._connection.close(), "closing the log connection")

    # --- the leader's side ----------------------------------------------------------------------

    def record_task(self, task: TaskRecord, data: bytes) -> str:
        """The store's write of ``task`` (``data``, serialised at the write: the record may
        change again before the batch is sealed); returns the event's id."""
        event_id = self._append(task_event_type(task), orjson.Fragment(data))
        if self.writing:  # the row the reader applies when this comes back (no re-encoding)
            self._own_rows[event_id] = task_row(task, data)
            while len(self._own_rows) > OWN_ROWS_REMEMBERED:
                self._own_rows.pop(next(iter(self._own_rows)))
        return event_id

    def record_outcome(self, update: dict[str, Any]) -> None:
        """A learning update, exactly as the leader's learner took it (no clock, no draw)."""
        self._append(ROUTING_OUTCOME, update)

    def record_drained(self, agent_id: str, reason: str) -> None:
        self._append(AGENT_DRAINED, {"agent_id": agent_id, "reason": reason})

    def _append(self, kind: str, data: Any) -> str:
        # Unique without a urandom call per event: this process's random prefix and a count.
        self._event_count += 1
        event_id = f"{self._event_prefix}{self._event_count:x}"
        if not self.writing or self._writer is None:
            return event_id  # a standby decides nothing
        future = self._writer.append(Event(event_id, self.epoch(), kind, data),
                                     awaited=kind not in UNAWAITED)
        if future is not self._last:  # the batch's one future: one callback per batch
            future.add_done_callback(self._confirmed)
            self._last = future
        return event_id

    def _confirmed(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None and self.failed is None:
            self.failed = error if isinstance(error, TransportError) else TransportError(
                str(error))
            log.error("the log refused a batch (%s): this process must not lead on", error)

    async def barrier(self) -> None:
        """Until every event recorded so far is confirmed; raises TransportError otherwise."""
        last = self._last
        if last is not None and not last.done():
            if self._writer is not None:
                self._writer.hasten()  # it may hold only events that nothing waited for
            with contextlib.suppress(Exception):
                await last  # a batch's Confirm: waiting cannot cancel it for the others
        if self.failed is not None:
            raise TransportError(f"the log is not writable: {self.failed}")

    async def begin_term(self, epoch: int, timeout: float) -> None:
        """Mark the new term in the log, and return once the store holds all before it.

        TimeoutError when the marker is not confirmed within ``timeout``, or the reader makes
        no progress towards it for ``timeout`` (a standby far behind may take longer: it is
        given the time as long as it applies)."""
        assert self._writer is not None and self._reader is not None
        self.own_epochs.add(epoch)
        self.failed = None
        marker = Event(uuid.uuid4().hex, epoch, EPOCH_STARTED, {})
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._markers[marker.id] = applied
        try:
            # Shielded, so the wait ends on time: the batch's Confirm refuses cancellation.
            await asyncio.wait_for(asyncio.shield(self._writer.append(marker)), timeout)
            offset, stalled = self._reader.next_offset, 0.0
            while not applied.done():
                await asyncio.wait([applied], timeout=1.0)
                if self._reader.next_offset != offset:
                    offset, stalled = self._reader.next_offset, 0.0
                    continue
                stalled += 1.0
                if stalled >= timeout:
                    raise TimeoutError(f"the log reader stalled at offset {offset}")
        finally:
            self._markers.pop(marker.id, None)
        self.writing = True
        self.store.replicate(self.record_task)

    def end_term(self) -> None:
        """Deposed: writes not yet back from the log are void (the log decides), and the
        store takes none until the next term."""
        self.writing = False
        self.store.replicate(None)

    # --- every coordinator's side ---------------------------------------------------------------

    @property
    def lag(self) -> int:
        """Log entries (batches) not yet applied: 0 when caught up, or before the tail is known."""
        if self._reader is None or self.tail is None:
            return 0
        return max(0, self.tail + 1 - self._reader.next_offset)

    async def _apply(self, events: list[Event], offset: int) -> None:
        rows: list[tuple[str, dict[str, Any] | Row]] = []
        outcomes: list[dict[str, Any]] = []
        markers: list[str] = []
        for event in events:
            if not self.fence.admit(event):
                continue
            if event.type == EPOCH_STARTED:
                markers.append(event.id)
            elif event.type.startswith("task."):
                own = self._own_rows.pop(event.id, None)
                data = event.data
                if isinstance(data, orjson.Fragment):  # our own, taken back unopened
                    data = orjson.loads(orjson.dumps(data)) if own is None else None
                if own is not None:
                    rows.append((event.id, own))
                elif isinstance(data, dict) and data.keys() >= _TASK_KEYS:
                    rows.append((event.id, data))
                else:  # sealed with our key, so a bug, not an attack: say so, go on
                    log.error("log entry %d: task event %s without a task record; skipped",
                              offset, event.id)
            elif event.type == ROUTING_OUTCOME and event.epoch not in self.own_epochs:
                outcomes.append(event.data)  # our own learner took ours already
        while True:
            try:
                self.store.apply_log(rows, offset, self.fence.epoch)
                break
            except StoreError as exc:  # held, not skipped: the offset must not pass it
                log.warning("log entry %d not applied yet: %s", offset, exc)
                await asyncio.sleep(APPLY_RETRY_S)
        self.applied_events += len(rows)
        if self.tail is None or offset > self.tail:
            self.tail = offset
        self._schedule_snapshot(len(rows))
        for data in outcomes:
            self._learn(data)
        for marker in markers:
            waiter = self._markers.get(marker)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _schedule_snapshot(self, events: int) -> None:
        """The leader snapshots its store (a log prefix like every replica's) when due."""
        if self.snapshots is None or self._reader is None or self._connection is None:
            return
        retention, schedule = self.snapshots
        schedule.record(events, self._reader.applied_bytes - self._applied_bytes)
        self._applied_bytes = self._reader.applied_bytes
        if not self.writing or self._snapshot is not None or not schedule.due():
            return
        schedule.taken()
        self._snapshot = asyncio.create_task(self._publish_snapshot(retention), name="snapshot")

    async def _publish_snapshot(self, retention: SnapshotRetention) -> None:
        assert self._connection is not None
        try:
            # A channel of its own: megabytes of snapshot never wait in line with log batches.
            async with await writer_channel(self._connection) as channel:
                await publish_snapshot(channel, self.name, self.codec, self.store.path,
                                       retention)
        except Exception:  # the next one is due on the same schedule; the log is unaffected
            log.exception("snapshot not written")
        finally:
            self._snapshot = None

    def _learn(self, data: dict[str, Any]) -> None:
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(data)
        except Exception:  # the learner is advisory: never stop applying the log for it
            log.exception("routing outcome from the log not learned")

    async def _probe_tail(self) -> None:
        """Find the stream's last entry now and then: AMQP 0-9-1 has no tail offset query.
        On its own connection, so a probe's trouble never touches the writer or the reader."""
        while True:
            with contextlib.suppress(Exception):
                connection = await aio_pika.connect(self.url, client_properties={
                    "connection_name": f"{self.name}/log-tail"})
                async with connection:
                    while True:
                        offset = await tail_offset(await connection.channel(), self.name)
                        if offset is not None and (self.tail is None or offset > self.tail):
                            self.tail = offset
                        await asyncio.sleep(TAIL_PROBE_S)
            await asyncio.sleep(TAIL_PROBE_S)


async def _bounded(step: Awaitable[Any], what: str) -> None:
    """One step of stopping, given at most ``STOP_STEP_S``: a hang is said and left behind
    (never awaited again: a cancelled step can hang in its own clean-up), an error is said."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=STOP_STEP_S)
    if not done:
        task.cancel()
        log.warning("stopping: %s took over %.0f s; left behind", what, STOP_STEP_S)
    elif not task.cancelled() and task.exception() is not None:
        log.debug("stopping: %s failed: %r", what, task.exception())


async def _settled(task: asyncio.Task[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
