"""Status (heartbeat) ingestion: how fast the coordinator drains a backlog of agent.status.

For each round:

* ours: K agent.status messages, sealed by SecurityManager for a few agent principals exactly as
  WorkerAgent.send publishes them (same exchange, routing key, headers and properties), are
  published into the coordinator's status queue while no coordinator runs. Then a
  CoordinatorAgent (in this process) is started; the time from ``start()`` until it has handled
  all K (messages_received{agent.status} + messages_rejected) gives msgs/s.
* raw:  the same number of messages of the same size, headers and properties are published into
  a classic queue declared like the status queue, then a plain aio-pika consumer (its own
  connection, manual acks, prefetch equal to the coordinator's) drains it; timed from connect.

Rounds alternate which goes first; medians are reported with the ratio ours/raw (target >= 0.8).

    .venv/bin/python bench/status_ingest.py [--messages 20000] [--agents 4] [--rounds 3]

The coordinator is imported in-process: ``PYTHONPATH=DIR`` measures another copy of the package
with this same benchmark (the first line says which copy ran).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from _common import (
    BROKER_URL,
    Goal,
    broker_cpu_seconds,
    delete_queues,
    empty_config,
    median,
    queue_depth,
    ratio,
    restore_env,
    table,
    verdict,
)
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import CollectorRegistry

import coordinator_agent
from coordinator_agent.cli.loop import new_event_loop
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings, load_settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import coordinator_topology, delete_namespace
from coordinator_agent.wire.security import SecurityManager

TARGET_RATIO = 0.8
PUBLISH_BATCH = 500
#: How often the coordinator's counters are read: the end of a drain is known to within this.
POLL_S = 0.02
#: The status queue drops messages older than this (x-message-ttl): fill + drain must fit.
QUEUE_TTL_S = c.STATUS_MESSAGE_TTL_MS / 1000
#: The coordinator's heartbeat interval here. The queue is filled before the coordinator starts,
#: so every heartbeat is seconds old when read; at the shipped 2 s interval the coordinator
#: would read that as being behind (backlog.py) and shed repeat heartbeats unread. A long
#: interval keeps every message on the full path (decrypt, validate, apply), which is what
#: this benchmark measures; shed ones are counted and reported (0 expected).
HEARTBEAT_INTERVAL_S = 120.0


def drain_timeout(k: int) -> float:
    return max(30.0, k / 100.0)


# --- filling ----------------------------------------------------------------------------------


def sealed_heartbeats(
    settings: Settings, keyring: Keyring, agent_ids: list[str], k: int
) -> list[aio_pika.Message]:
    """K agent.status messages as WorkerAgent.send would publish them (round-robin senders)."""
    managers = [SecurityManager.from_settings(settings, keyring.subset(agent_id), agent_id)
                for agent_id in agent_ids]
    messages = []
    for i in range(k):
        security = managers[i % len(managers)]
        in_flight = i % 64
        payload = protocol.AgentStatus(
            kind="general", capabilities=["text", "hash"], max_concurrency=64, state="ready",
            in_flight=in_flight, load=in_flight / 64,
        )
        envelope = protocol.make_envelope(payload, sender=security.principal_id)
        body, headers = security.seal(envelope, settings.name)
        messages.append(aio_pika.Message(
            body, headers=headers, message_id=envelope.id, type=envelope.type,
            content_type=c.CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            expiration=settings.security.message_ttl_s,
        ))
    return messages


def lookalikes(templates: list[aio_pika.Message]) -> list[aio_pika.Message]:
    """Messages of the same sizes, headers and properties with opaque bodies (for the baseline)."""
    return [
        aio_pika.Message(
            os.urandom(len(m.body)), headers=dict(m.headers), message_id=uuid.uuid4().hex,
            type=m.type, content_type=m.content_type, delivery_mode=m.delivery_mode,
            expiration=m.expiration,
        )
        for m in templates
    ]


async def publish_all(
    channel: AbstractChannel, exchange_name: str, routing_key: str,
    messages: list[aio_pika.Message],
) -> float:
    """Publish with confirms, PUBLISH_BATCH at a time; returns seconds taken."""
    exchange = (channel.default_exchange if exchange_name == ""
                else await channel.get_exchange(exchange_name, ensure=False))
    started = time.perf_counter()
    for i in range(0, len(messages), PUBLISH_BATCH):
        await asyncio.wait_for(asyncio.gather(*(
            exchange.publish(m, routing_key, mandatory=True, timeout=30)
            for m in messages[i:i + PUBLISH_BATCH]
        )), 60)
    return time.perf_counter() - started


async def wait_for_depth(channel: AbstractChannel, queue: str, k: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (depth := await queue_depth(channel, queue)) < k:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue} holds {depth} of the {k} messages published")
        await asyncio.sleep(0.05)


# --- the two consumers ------------------------------------------------------------------------


async def drain_ours(
    settings: Settings, keyring: Keyring, k: int, profile: cProfile.Profile | None
) -> tuple[float, dict[str, float]]:
    registry = CollectorRegistry()
    coordinator = CoordinatorAgent(settings, keyring, registry=registry)

    metrics = coordinator.metrics
    counted = (metrics.messages_received, metrics.messages_rejected, metrics.status_shed)

    def handled() -> float:
        # Only the three counters (a pass over the whole registry costs ~1-2 ms, polled every
        # POLL_S on the coordinator's own loop, which would be charged to the coordinator).
        count = 0.0
        for counter in counted:
            for metric in counter.collect():
                count += sum(s.value for s in metric.samples if s.name.endswith("_total")
                             and (metric.name != "coordinator_messages_received"
                                  or s.labels.get("message_type") == "agent.status"))
        return count

    async def drain() -> float:
        started = time.perf_counter()
        if profile is not None:
            profile.enable()
        try:
            await coordinator.start()
            deadline = time.monotonic() + drain_timeout(k)
            while handled() < k:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator handled {handled():.0f} of {k} within "
                                       f"{drain_timeout(k):g}s")
                await asyncio.sleep(POLL_S)
            return time.perf_counter() - started
        finally:
            if profile is not None:
                profile.disable()
            await coordinator.stop()

    def in_own_loop() -> float:
        # The event loop the coordinator ships with (its event_loop setting: uvloop where
        # installed), in a thread of its own; the raw baseline keeps asyncio's loop.
        loop = new_event_loop(settings.event_loop)
        try:
            return loop.run_until_complete(drain())
        finally:
            loop.close()

    elapsed = await asyncio.to_thread(in_own_loop)
    rejected = {
        s.labels.get("reason", "shed"): s.value for metric in registry.collect()
        if metric.name in ("coordinator_messages_rejected", "coordinator_status_shed")
        for s in metric.samples if s.name.endswith("_total") and s.value
    }
    return k / elapsed, rejected


async def drain_raw(queue_name: str, k: int, prefetch: int) -> float:
    done = asyncio.Event()
    count = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal count
        await message.ack()
        count += 1
        if count >= k:
            done.set()

    started = time.perf_counter()
    connection = await aio_pika.connect(
        BROKER_URL, timeout=10, client_properties={"connection_name": "bench-raw-status"}
    )
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=False)
        tag = await queue.consume(on_message)
        try:
            await asyncio.wait_for(done.wait(), drain_timeout(k))
        except TimeoutError:
            raise RuntimeError(f"raw consumer got {count} of {k}") from None
        elapsed = time.perf_counter() - started
        await queue.cancel(tag)
    return k / elapsed


async def declare_raw_queue(channel: AbstractChannel, name: str) -> None:
    """A classic queue with the status queue's arguments."""
    await channel.declare_queue(name, durable=True, arguments={
        "x-queue-type": "classic",
        "x-message-ttl": c.STATUS_MESSAGE_TTL_MS,
        "x-max-length": c.STATUS_QUEUE_MAX_LENGTH,
        "x-overflow": "drop-head",
    })


# --- driver -----------------------------------------------------------------------------------


async def run(
    *, messages: int = 20000, agents: int = 4, rounds: int = 3,
    profile_path: Path | None = None,
) -> dict[str, Any]:
    uid = uuid.uuid4().hex[:8]
    name = f"bench-{uid}"
    raw_queue = f"bench-{uid}.raw-status"
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-status-{uid}-"))
    saved_config = os.environ.get("COORDINATOR_CONFIG")
    os.environ["COORDINATOR_CONFIG"] = str(empty_config(workdir))
    keyring = Keyring()
    agent_ids = [f"bench-agent-{i}" for i in range(agents)]
    for agent_id in agent_ids:
        keyring.generate(agent_id, "agent")
    settings = load_settings(
        name=name, broker_url=BROKER_URL, data_dir=workdir, keyring_path=workdir / "none.json",
        monitoring_port=0, log_level="WARNING",
        liveness={"heartbeat_interval_s": HEARTBEAT_INTERVAL_S},
    )
    # In-process coordinator: keep its INFO lines out of the figures' way.
    logging.getLogger("coordinator_agent").setLevel(logging.WARNING)
    # CPU time, not wall time: on a shared machine a wall-clock profile charges the
    # preemptions (often right at a send that wakes the broker) to whatever ran.
    profile = cProfile.Profile(time.process_time) if profile_path is not None else None
    ours: list[float] = []
    raw: list[float] = []
    fill_rates: list[float] = []
    cpu: dict[str, list[float]] = {"ours": [], "raw": []}
    body_size = 0
    probe = new_event_loop(settings.event_loop)
    loop_kind = type(probe).__module__.split(".")[0]
    probe.close()
    print(f"status ingest: {messages} agent.status from {agents} agents, {rounds} round(s), "
          f"prefetch {settings.prefetch}; coordinator {name} on {loop_kind}'s event loop "
          f"(raw: asyncio's), heartbeat interval {HEARTBEAT_INTERVAL_S:g}s; code from "
          f"{Path(coordinator_agent.__file__).parent.parent}", flush=True)
    connection = await aio_pika.connect(
        BROKER_URL, timeout=10, client_properties={"connection_name": "bench-status-fill"}
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        await coordinator_topology(name)(channel)
        await declare_raw_queue(channel, raw_queue)
        status_queue = c.status_queue(name)
        for round_no in range(rounds):
            for which in (("ours", "raw") if round_no % 2 == 0 else ("raw", "ours")):
                # Seal right before filling: the Fernet TTL and the queue TTL start now.
                batch = sealed_heartbeats(settings, keyring, agent_ids, messages)
                body_size = len(batch[0].body)
                if which == "ours":
                    await (await channel.get_queue(status_queue, ensure=False)).purge()
                    took = await publish_all(channel, c.COORDINATOR_EXCHANGE,
                                             c.status_key(name), batch)
                    await wait_for_depth(channel, status_queue, messages, 30)
                    cpu_before = (time.process_time(), broker_cpu_seconds())
                    rate, rejected = await drain_ours(
                        settings, keyring, messages, profile if round_no == 0 else None
                    )
                    ours.append(rate)
                    extra = f" (rejected or shed: {rejected})" if rejected else ""
                else:
                    await (await channel.get_queue(raw_queue, ensure=False)).purge()
                    took = await publish_all(channel, "", raw_queue, lookalikes(batch))
                    await wait_for_depth(channel, raw_queue, messages, 30)
                    cpu_before = (time.process_time(), broker_cpu_seconds())
                    rate = await drain_raw(raw_queue, messages, settings.prefetch)
                    raw.append(rate)
                    extra = ""
                # Includes the coordinator's stop() (or the raw connection's close): small.
                consumer_us = (time.process_time() - cpu_before[0]) * 1e6 / messages
                broker_us = (broker_cpu_seconds() - cpu_before[1]) * 1e6 / messages
                cpu[which].append(consumer_us)
                fill_rates.append(messages / took)
                if took + messages / rate > QUEUE_TTL_S * 0.9:
                    extra += " (warning: close to the status queue's TTL; messages may expire)"
                print(f"  round {round_no + 1} {which:4s} {rate:8.0f} msgs/s "
                      f"(filled at {messages / took:.0f}/s; CPU per message: consumer "
                      f"{consumer_us:.0f} us, broker {broker_us:.0f} us){extra}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
        try:
            await asyncio.wait_for(delete_namespace(settings.broker_url, name), 30)
            await asyncio.wait_for(delete_queues([raw_queue]), 30)
        except Exception as exc:
            print(f"  clean-up failed: {exc!r}", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
        restore_env("COORDINATOR_CONFIG", saved_config)
    if profile is not None and profile_path is not None:
        profile.dump_stats(profile_path)
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
        print(f"  cProfile of the first coordinator drain in {profile_path}")
    summary = {
        "ours": median(ours), "raw": median(raw), "ratio": ratio(median(ours), median(raw)),
        "messages": messages, "body_bytes": body_size, "prefetch": settings.prefetch,
        "fill_rate": median(fill_rates), "rounds": {"ours": ours, "raw": raw},
        "consumer_cpu_us": {k: median(v) for k, v in cpu.items()},
    }
    report(summary)
    return summary


def report(summary: dict[str, Any]) -> None:
    print(f"\nstatus ingestion: {summary['messages']} agent.status of {summary['body_bytes']} "
          f"bytes, prefetch {summary['prefetch']} (median of rounds)")
    cpu = summary["consumer_cpu_us"]
    print(table(["consumer", "msgs/s", "CPU us/msg"],
                [["coordinator_agent", summary["ours"], cpu["ours"]],
                 ["raw aio-pika (classic queue, acks)", summary["raw"], cpu["raw"]]]))
    paired = [ratio(o, r) for o, r in zip(summary["rounds"]["ours"], summary["rounds"]["raw"],
                                           strict=True)]
    print(f"ours/raw x{summary['ratio']:.2f} (ratio of medians; per round: "
          f"{', '.join(f'x{p:.2f}' for p in paired)}); target >= {TARGET_RATIO}: "
          f"{verdict(summary['ratio'] >= TARGET_RATIO)}")


def targets(summary: dict[str, Any]) -> list[Goal]:
    return [Goal("P1 status ingestion, ours/raw aio-pika", f"{summary['ours']:,.0f} msgs/s",
                 f"{summary['raw']:,.0f} msgs/s", summary["ratio"], f">= x{TARGET_RATIO}",
                 summary["ratio"] >= TARGET_RATIO)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000, help="K status messages")
    parser.add_argument("--agents", type=int, default=4, help="fake agent principals")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="cProfile the first coordinator drain (pstats file)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    if args.quick:
        args.messages, args.rounds = 2000, 1
    summary = asyncio.run(run(messages=args.messages, agents=args.agents, rounds=args.rounds,
                              profile_path=args.profile))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
