"""The broker-only lease on the real RabbitMQ: one leader, handover on resign, on SIGKILL and on
SIGSTOP (the paused leader steps down when continued), epochs that only grow, one token."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest

from coordinator_agent.ha import broker_lease
from coordinator_agent.ha.broker_lease import BrokerLease
from coordinator_agent.ha.election import Campaign
from coordinator_agent.wire.messaging import close_connection

from .test_election import ROOT, Recorder, next_event, wait_until

#: Heartbeat 2 s: a 1 s heartbeat gives false alarms on this loaded machine.
TTL_S = 4.0


@pytest.fixture
async def name(broker_url: str) -> AsyncIterator[str]:
    name = f"ha-ops-lease-{uuid.uuid4().hex[:8]}"
    yield name
    connection = await aio_pika.connect(broker_url)
    channel = await connection.channel()
    for queue in (f"ca.{name}.leader", f"ca.{name}.epochs"):
        await channel.queue_delete(queue, if_unused=False, if_empty=False)
    await close_connection(connection)


async def tokens_left(broker_url: str, name: str) -> int:
    connection = await aio_pika.connect(broker_url)
    try:
        queue = await (await connection.channel()).declare_queue(f"ca.{name}.leader",
                                                                 passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await close_connection(connection)


async def test_three_elect_one_a_resignation_hands_over_and_one_token_remains(
        broker_url: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The holder swaps its token every half second: the consumer_timeout workaround must not
    # hand leadership over nor multiply tokens.
    monkeypatch.setattr(broker_lease, "TOKEN_REFRESH_S", 0.5)
    campaigns: dict[str, Campaign] = {}
    recorder = Recorder(campaigns)
    for i in range(3):
        holder = f"candidate-{i}"
        campaigns[holder] = Campaign(BrokerLease(broker_url, name, holder, ttl_s=TTL_S),
                                     **recorder.hooks(holder))
    runs = [asyncio.create_task(c.run()) for c in campaigns.values()]
    try:
        await wait_until(recorder.elected, 20)
        await asyncio.sleep(TTL_S)  # renewals and token swaps keep it: nobody else is elected
        (leader, _, epoch), = recorder.elected()
        assert [c.leading for c in campaigns.values()].count(True) == 1
        resigned_at = time.monotonic()
        await campaigns[leader].resign()
        await wait_until(lambda: len(recorder.elected()) == 2, 10)
        successor, elected_at, new_epoch = recorder.elected()[1]
        assert successor != leader and new_epoch > epoch
        assert elected_at - resigned_at < TTL_S / 2, "a release hands over without a timeout"
    finally:
        for campaign in campaigns.values():
            await campaign.close()
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
    await asyncio.sleep(0.5)
    assert await tokens_left(broker_url, name) == 1


def campaigner(url: str, name: str, holder: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.ha.campaigner", url, name, holder, str(TTL_S)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def leader_process(broker_url: str, name: str) -> Iterator[subprocess.Popen[str]]:
    process = campaigner(broker_url, name, "zombie")
    yield process
    process.send_signal(signal.SIGCONT)
    process.kill()
    process.wait(10)
    if process.stdout is not None:
        process.stdout.close()


async def standby_after(broker_url: str, name: str, leader: subprocess.Popen[str],
                        action: Any, within: float) -> tuple[list[tuple[str, Any]], Campaign,
                                                             asyncio.Task[None], dict[str, Any]]:
    assert next_event(leader, 20)["event"] == "started"
    elected = next_event(leader, 20)
    assert elected["event"] == "elected"
    events: list[tuple[str, Any]] = []

    async def record(term: Any) -> None:
        events.append(("elected", term.epoch))

    async def deposed(reason: str) -> None:
        events.append(("deposed", reason))

    standby = Campaign(BrokerLease(broker_url, name, "standby", ttl_s=TTL_S),
                       on_elected=record, on_deposed=deposed)
    run = asyncio.create_task(standby.run())
    await asyncio.sleep(1.0)  # the standby is waiting on the queue
    assert not events, "elected while the leader holds the token"
    action()
    await wait_until(lambda: events, within)
    assert events[0][0] == "elected" and events[0][1] > elected["epoch"]
    return events, standby, run, elected


async def test_a_killed_leader_is_replaced_at_once(
        broker_url: str, name: str, leader_process: subprocess.Popen[str]) -> None:
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        leader_process.kill()

    _, standby, run, _ = await standby_after(broker_url, name, leader_process, kill, 10)
    try:
        # The kernel closes the dead process's connection: no heartbeat wait.
        assert time.monotonic() - killed_at[0] < TTL_S
        assert standby.leading
    finally:
        await standby.close()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_paused_leader_is_replaced_and_steps_down_when_continued(
        broker_url: str, name: str, leader_process: subprocess.Popen[str]) -> None:
    stopped_at: list[float] = []

    def stop() -> None:
        stopped_at.append(time.monotonic())
        leader_process.send_signal(signal.SIGSTOP)

    # The broker drops the silent connection after two to three missed heartbeats.
    _, standby, run, _ = await standby_after(broker_url, name, leader_process, stop,
                                             3 * TTL_S + 5)
    try:
        leader_process.send_signal(signal.SIGCONT)
        deposed = next_event(leader_process, 10)
        assert deposed["event"] == "deposed"
        assert deposed["reason"] in {"no renewal within the lease", "the session expired"}
        assert standby.leading
    finally:
        await standby.close()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
