"""Coalesced writes on a real RabbitMQ connection (wire/coalesce.py)."""

from __future__ import annotations

import asyncio

import aiormq

from coordinator_agent.wire import coalesce


async def test_a_turns_publishes_leave_in_one_write_as_soon_as_the_writer_has_them(
    broker_url: str,
) -> None:
    connection = await coalesce.connect(broker_url)
    try:
        writer = connection._factory.writer  # type: ignore[attr-defined]
        assert writer is not None and writer._queue is not None  # it watches aiormq's queue
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("", exclusive=True)
        underlay = await channel.get_underlay_channel()
        frames, writes, late = writer.frames, writer.writes, writer.late_writes
        await asyncio.gather(*(underlay.basic_publish(
            b"x" * 300, exchange="", routing_key=queue.name,
            properties=aiormq.spec.Basic.Properties(delivery_mode=2), wait=False)
            for _ in range(200)))  # every one confirmed
        assert writer.frames - frames == 200
        assert writer.writes - writes <= 2  # together, not one write per publish
        # None waited for a callback at the end of a turn: each left in its writer's step.
        assert writer.late_writes == late
        declared = await channel.declare_queue(queue.name, passive=True)
        assert declared.declaration_result.message_count == 200
    finally:
        await connection.close()
