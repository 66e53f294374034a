"""The replicated log's cost and a fresh standby's catch-up time, on the real broker.

    .venv/bin/python bench/log_catchup.py                   # 1,000,000 events
    .venv/bin/python bench/log_catchup.py --events 100000 --per-turn 50

Writes ``--events`` events (about 150 bytes of JSON each, as a task's state change) through
``LogWriter``, ``--per-turn`` of them per event-loop turn (one AMQP message each), then starts a
fresh ``LogReader`` at offset 0 and times it to the tail, applying every event into an in-memory
dict as a standby's store would. The baseline, in the same run, is raw aio-pika publishing the same
number of messages with confirms (the unbatched cost of one publish per event is that figure
times ``--per-turn``). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import aio_pika
from cryptography.fernet import Fernet

from coordinator_agent.ha.log import (
    Event,
    LogCodec,
    LogReader,
    LogWriter,
    Retention,
    declare,
    log_queue,
)

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


def event(i: int) -> Event:
    return Event(uuid.uuid4().hex, 7, "task.finished", {
        "task_id": f"task-{i:09d}", "status": "succeeded", "attempt": 1,
        "agent_id": "agent-0042", "at": 1764400000.123})


async def raw_publish(channel: aio_pika.abc.AbstractChannel, queue: str, count: int,
                      body: bytes) -> float:
    started = time.perf_counter()
    pending = []
    for _ in range(count):
        pending.append(channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue))
        if len(pending) >= 100:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return time.perf_counter() - started


async def main(events: int, per_turn: int) -> dict[str, float]:
    name = f"bench-log-{uuid.uuid4().hex[:8]}"
    codec = LogCodec([Fernet.generate_key().decode()])
    connection = await aio_pika.connect(BROKER_URL, client_properties={
        "connection_name": "bench/log_catchup"})
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, name, Retention(max_age="1h", max_bytes=5 * 1024**3))
        writer = LogWriter(channel, name, codec, batch_max=per_turn)
        started = time.perf_counter()
        in_flight: list[asyncio.Future[None]] = []
        for i in range(events):
            in_flight.append(writer.append(event(i)))
            if len(in_flight) >= per_turn * 32:  # bound the unconfirmed batches, as a leader would
                await asyncio.gather(*in_flight)
                in_flight = []
        await asyncio.gather(*in_flight)
        write_s = time.perf_counter() - started
        batches = writer.batches

        state: dict[str, str] = {}

        def apply(batch: list[Event], offset: int) -> None:
            for e in batch:
                state[e.data["task_id"]] = e.data["status"]

        reader_channel = await connection.channel()
        reader = LogReader(reader_channel, name, codec, apply, prefetch=500)
        started = time.perf_counter()
        await reader.start(0)
        await reader.wait_for_offset(batches, timeout=600)
        catchup_s = time.perf_counter() - started
        await reader.stop()
        assert reader.applied_events == events and len(state) == events

        raw_queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
        await channel.declare_queue(raw_queue, durable=True,
                                    arguments={"x-queue-type": "stream"})
        body = codec.seal([event(0) for _ in range(per_turn)])
        raw_s = await raw_publish(channel, raw_queue, batches, body)
        await channel.queue_delete(raw_queue)
        await channel.queue_delete(log_queue(name))
    finally:
        await connection.close()
    return {
        "events": events,
        "events_per_message": per_turn,
        "append_events_per_s": round(events / write_s),
        "append_s": round(write_s, 2),
        "raw_publish_same_messages_s": round(raw_s, 2),
        "append_vs_raw_publish": round(raw_s / write_s, 2),
        "catchup_s": round(catchup_s, 2),
        "catchup_events_per_s": round(events / catchup_s),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--per-turn", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.events, args.per_turn)), indent=2))
