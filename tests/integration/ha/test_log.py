"""The replicated event log on a real RabbitMQ stream: batching, order, offsets, dedupe, seal."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel
from cryptography.fernet import Fernet
from pydantic import SecretStr

from coordinator_agent.exceptions import TransportError
from coordinator_agent.ha.log import (
    TAIL_FIRST_S,
    TAIL_READ_S,
    UNAWAITED_FLUSH_S,
    Event,
    LogCodec,
    LogReader,
    LogWriter,
    Retention,
    declare,
    tail_offset,
    writer_channel,
)
from coordinator_agent.ha.snapshot import SnapshotRetention, declare_snapshots
from coordinator_agent.wire.constants import log_queue, namespace_queues
from coordinator_agent.wire.messaging import close_connection, delete_namespace

KEY = Fernet.generate_key().decode()


@pytest.fixture
async def stream(broker_url: str, channel: AbstractChannel) -> AsyncIterator[str]:
    name = f"t-log-{uuid.uuid4().hex[:8]}"
    await declare(channel, name, Retention(max_age="1h", max_bytes=100 * 1024**2))
    yield name
    connection = await aio_pika.connect(broker_url)
    await (await connection.channel()).queue_delete(log_queue(name))
    await close_connection(connection)


def events(count: int, epoch: int = 1, prefix: str = "e") -> list[Event]:
    return [Event(f"{prefix}{i}", epoch, "task.accepted", {"task_id": f"t{i}", "n": i})
            for i in range(count)]


async def read_all(channel: AbstractChannel, name: str, until: int, *, from_offset: int = 0,
                   codec: LogCodec | None = None) -> tuple[list[tuple[Event, int]], LogReader]:
    seen: list[tuple[Event, int]] = []
    reader = LogReader(channel, name, codec or LogCodec([KEY]),
                       lambda batch, offset: seen.extend((e, offset) for e in batch))
    await reader.start(from_offset)
    await reader.wait_for_offset(until, timeout=20)
    await reader.stop()
    return seen, reader


async def test_one_turn_of_appends_is_one_batch_and_comes_back_in_order(
    channel: AbstractChannel, stream: str,
) -> None:
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    appended = events(2_000)
    confirmations = [writer.append(e) for e in appended]  # all in one loop turn
    await asyncio.gather(*confirmations)
    assert writer.events == 2_000 and writer.batches == 2  # batch_max 1000
    single = events(1, prefix="single-")
    await writer.append(single[0])  # alone on an idle loop: its own batch, sent at once
    assert writer.batches == 3
    seen, _ = await read_all(channel, stream, until=3)
    assert [e for e, _ in seen] == appended + single


async def test_what_an_append_wakes_joins_its_batch(
    channel: AbstractChannel, stream: str,
) -> None:
    """A submission's record wakes the dispatcher, whose assignment record follows a turn
    later: both go out in one batch, with one confirm, as the leader's do."""
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    accepted, assigned = events(2)
    woken = asyncio.Event()
    second: list[asyncio.Future[None]] = []

    async def dispatcher() -> None:
        await woken.wait()  # resumes on the turn after the one that set it
        second.append(writer.append(assigned))

    waiting = asyncio.create_task(dispatcher())
    await asyncio.sleep(0)  # the dispatcher is parked on its event
    first = writer.append(accepted)
    woken.set()
    await asyncio.gather(first, waiting)
    await second[0]
    assert writer.batches == 1 and writer.events == 2
    seen, _ = await read_all(channel, stream, until=1)
    assert [(e.id, offset) for e, offset in seen] == [("e0", 0), ("e1", 0)]


async def test_a_batch_is_confirmed_to_its_waiters_in_the_step_the_broker_confirm_lands(
    channel: AbstractChannel, stream: str,
) -> None:
    """The broker's confirm wakes the task that published the batch, which resolves the
    batch's Confirm in that same step: no task of its own around the publish (``wait_for``),
    whose end and the wake-up after it were two more loop turns before a barrier returned."""
    loop = asyncio.get_running_loop()
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    before = set(underlay.confirmations)
    confirm = writer.append(events(1)[0])
    while not set(underlay.confirmations) - before:  # the batch's frame is queued
        await asyncio.sleep(0)
    (tag,) = set(underlay.confirmations) - before
    turns_after: list[int] = []

    def count_turns(turns: int) -> None:
        if confirm.done():
            turns_after.append(turns)
        else:
            loop.call_soon(count_turns, turns + 1)

    # Called in the step after the broker's confirm, after the publishing task's wake-up.
    underlay.confirmations[tag].add_done_callback(lambda _: count_turns(0))
    await confirm
    while not turns_after:
        await asyncio.sleep(0)
    assert turns_after == [0]


async def test_a_tail_probe_ends_while_the_log_is_written_and_finds_its_tail(
    broker_url: str, channel: AbstractChannel, stream: str,
) -> None:
    """Under steady writes entries never stop arriving: the probe still returns, after at most
    TAIL_READ_S of reading (one that read on took every entry twice and reported nothing)."""
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    for number in range(3):
        await writer.append(events(1, prefix=f"before{number}-")[0])
    writing = asyncio.Event()

    async def steady() -> None:
        for number in range(1_000):
            await writer.append(events(1, prefix=f"steady{number}-")[0])
            writing.set()
            await asyncio.sleep(0.01)

    writer_task = asyncio.create_task(steady())
    connection = await aio_pika.connect(broker_url)
    try:
        await writing.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        tail = await asyncio.wait_for(tail_offset(await connection.channel(), stream),
                                      TAIL_FIRST_S + TAIL_READ_S + 2)
        assert loop.time() - started < TAIL_FIRST_S + TAIL_READ_S + 1
        assert not writer_task.done()  # it was written all along
        assert tail is not None and tail >= 3
        writer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer_task
        await writer.flush()
        quiet = await tail_offset(await connection.channel(), stream)
        assert quiet is not None and quiet >= writer.batches - 1 >= tail
    finally:
        writer_task.cancel()
        await close_connection(connection)


async def test_an_event_no_effect_waits_for_rides_with_the_next_batch(
    channel: AbstractChannel, stream: str,
) -> None:
    """A task's notice marked sent, then the next submission: one batch, one confirm."""
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    notice_sent, accepted = events(2)
    unawaited = writer.append(notice_sent, awaited=False)
    for _ in range(5):  # well past the two turns an awaited event waits
        await asyncio.sleep(0)
    assert writer.unsent == 1 and not unawaited.done()
    await writer.append(accepted)
    assert unawaited.done() and writer.batches == 1 and writer.events == 2
    seen, _ = await read_all(channel, stream, until=1)
    assert [(e.id, offset) for e, offset in seen] == [("e0", 0), ("e1", 0)]


async def test_an_event_no_effect_waits_for_leaves_alone_after_a_while_or_when_hastened(
    channel: AbstractChannel, stream: str,
) -> None:
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    first, second = events(2)
    await asyncio.wait_for(asyncio.shield(writer.append(first, awaited=False)),
                           UNAWAITED_FLUSH_S + 10)
    assert writer.batches == 1
    confirm = writer.append(second, awaited=False)
    writer.hasten()  # a barrier came to wait for it: sent in two turns, not after the timer
    for _ in range(3):
        await asyncio.sleep(0)
    assert writer.unsent == 0
    await confirm
    seen, _ = await read_all(channel, stream, until=2)
    assert [e.id for e, _ in seen] == ["e0", "e1"]


async def test_a_reader_acks_once_per_half_prefetch_and_is_never_starved(
    channel: AbstractChannel, stream: str,
) -> None:
    """Entries one at a time (a quiet leader's log): the credit goes back once per half a
    prefetch, not with an ack per entry, and delivery never stops for the lack of it."""
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    seen: list[str] = []
    reader = LogReader(channel, stream, LogCodec([KEY]),
                       lambda batch, _: seen.extend(e.id for e in batch), prefetch=8)
    await reader.start(0)
    try:
        for number in range(20):  # beyond two prefetches, each entry applied before the next
            await writer.append(events(1, prefix=f"one{number}-")[0])
            await reader.wait_for_offset(number + 1, timeout=20)
    finally:
        await reader.stop()
    assert seen == [f"one{number}-0" for number in range(20)]
    assert reader.acks == 20 // 4


async def test_a_reader_starts_at_its_own_offset(channel: AbstractChannel, stream: str) -> None:
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    for batch_number in range(5):
        await asyncio.gather(*(writer.append(e)
                               for e in events(10, prefix=f"b{batch_number}-")))
    seen, reader = await read_all(channel, stream, until=5, from_offset=3)
    assert {e.id.split("-")[0] for e, _ in seen} == {"b3", "b4"}
    assert max(offset for _, offset in seen) == 4 and reader.next_offset == 5


async def test_a_repeated_batch_is_applied_once(channel: AbstractChannel, stream: str) -> None:
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    batch = events(20)
    await asyncio.gather(*(writer.append(e) for e in batch))
    await asyncio.gather(*(writer.append(e) for e in batch))  # as a retry after a lost confirm
    seen, reader = await read_all(channel, stream, until=2)
    assert [e for e, _ in seen] == batch
    assert reader.applied_events == 20


async def test_an_entry_not_sealed_with_the_key_is_skipped_and_counted(
    channel: AbstractChannel, stream: str,
) -> None:
    forger = LogWriter(channel, stream, LogCodec([Fernet.generate_key().decode()]))
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    await forger.append(events(1, epoch=99, prefix="forged-")[0])
    genuine = events(3)
    await asyncio.gather(*(writer.append(e) for e in genuine))
    seen, reader = await read_all(channel, stream, until=2)
    assert [e for e, _ in seen] == genuine
    assert reader.rejected == 1


async def test_a_rotated_keyring_still_reads_old_entries(
    channel: AbstractChannel, stream: str,
) -> None:
    await LogWriter(channel, stream, LogCodec([KEY])).append(events(1)[0])
    rotated = LogCodec([Fernet.generate_key().decode(), KEY])  # newest first
    seen, _ = await read_all(channel, stream, until=1, codec=rotated)
    assert [e.id for e, _ in seen] == ["e0"]


def test_the_codec_never_shows_its_keys() -> None:
    assert KEY not in repr(LogCodec([KEY]))
    with pytest.raises(ValueError, match="at least one key"):
        LogCodec([])


async def test_an_event_the_log_cannot_hold_fails_its_append_and_no_other(
    channel: AbstractChannel, stream: str,
) -> None:
    writer = LogWriter(channel, stream, LogCodec([KEY]))
    bad = Event("bad", 1, "task.accepted", {"input": 2**70})  # JSON, but beyond 64 bits
    with pytest.raises(TransportError, match="log append of 1 events failed"):
        await writer.append(bad)
    await writer.append(events(1)[0])
    seen, _ = await read_all(channel, stream, until=1)
    assert [e.id for e, _ in seen] == ["e0"]


async def test_an_append_to_a_deleted_log_fails_instead_of_counting_as_confirmed(
    broker_url: str, stream: str,
) -> None:
    connection = await aio_pika.connect(broker_url)
    try:
        writer = LogWriter(await writer_channel(connection), stream, LogCodec([KEY]))
        await writer.append(events(1)[0])  # the stream takes it
        await (await connection.channel()).queue_delete(log_queue(stream))
        with pytest.raises(TransportError, match="log append of 1 events failed"):
            await writer.append(events(1, prefix="lost-")[0])
    finally:
        await close_connection(connection)


async def test_the_namespace_clean_up_removes_the_log_and_snapshot_streams(
    broker_url: str, channel: AbstractChannel,
) -> None:
    # Streams outlive their coordinators: a clean-up that forgot them would leave segment files
    # on the broker's disk for every test and benchmark run.
    name = f"t-ns-{uuid.uuid4().hex[:8]}"
    await declare(channel, name, Retention(max_age="1h", max_bytes=100 * 1024**2))
    await declare_snapshots(channel, name, SnapshotRetention(max_bytes=100 * 1024**2))
    await delete_namespace(SecretStr(broker_url), name)
    connection = await aio_pika.connect(broker_url)
    try:
        for queue in namespace_queues(name):
            probe = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await probe.declare_queue(queue, passive=True)
    finally:
        await close_connection(connection)
