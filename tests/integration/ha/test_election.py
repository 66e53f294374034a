"""Campaigns against a real Consul: one leader, fast handover, a paused leader steps down."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator_agent.ha.election import Campaign
from coordinator_agent.ha.lease import ConsulLease, Term

from ..discovery.consul_agent import PrivateConsul
from .test_lease import TTL_S, consul  # noqa: F401  (the private Consul fixture)

ROOT = Path(__file__).resolve().parents[3]


class Recorder:
    def __init__(self, campaign_of: dict[str, Campaign]) -> None:
        self.events: list[tuple[str, str, float, Any]] = []
        self.campaign_of = campaign_of

    def hooks(self, holder: str) -> dict[str, Any]:
        async def elected(term: Term) -> None:
            self.events.append(("elected", holder, time.monotonic(), term.epoch))

        async def deposed(reason: str) -> None:
            self.events.append(("deposed", holder, time.monotonic(), reason))

        return {"on_elected": elected, "on_deposed": deposed}

    def elected(self) -> list[tuple[str, float, int]]:
        return [(h, t, e) for kind, h, t, e in self.events if kind == "elected"]


@pytest.fixture
async def three(consul: PrivateConsul) -> AsyncIterator[tuple[dict[str, Campaign], Recorder]]:  # noqa: F811
    campaigns: dict[str, Campaign] = {}
    recorder = Recorder(campaigns)
    for i in range(3):
        holder = f"coordinator-{i}"
        campaigns[holder] = Campaign(ConsulLease(consul.url, "election", holder, ttl_s=TTL_S),
                                     **recorder.hooks(holder))
    runs = [asyncio.create_task(c.run()) for c in campaigns.values()]
    yield campaigns, recorder
    for campaign in campaigns.values():
        await campaign.close()
    for run in runs:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)


async def wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_three_campaigns_elect_one_and_a_resignation_hands_over_at_once(
    three: tuple[dict[str, Campaign], Recorder],
) -> None:
    campaigns, recorder = three
    await wait_until(recorder.elected, 10)
    await asyncio.sleep(TTL_S)  # renewals keep it: nobody else is elected meanwhile
    (leader, _, epoch), = recorder.elected()
    assert [c.leading for c in campaigns.values()].count(True) == 1
    resigned_at = time.monotonic()
    await campaigns[leader].resign()
    await wait_until(lambda: len(recorder.elected()) == 2, 5)
    successor, elected_at, new_epoch = recorder.elected()[1]
    assert successor != leader and new_epoch > epoch
    assert elected_at - resigned_at < 1.0  # a release has no lock-delay


def campaigner(url: str, holder: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.ha.campaigner", url, "paused", holder,
         str(TTL_S)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def next_event(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            return dict(json.loads(line))
    raise AssertionError("no event from the campaigner")


@pytest.fixture
def paused_leader(consul: PrivateConsul) -> Iterator[subprocess.Popen[str]]:  # noqa: F811
    process = campaigner(consul.url, "zombie")
    yield process
    process.send_signal(signal.SIGCONT)
    process.terminate()
    process.wait(10)
    if process.stdout is not None:
        process.stdout.close()


async def test_a_paused_leader_is_replaced_and_steps_down_when_continued(
    consul: PrivateConsul, paused_leader: subprocess.Popen[str],  # noqa: F811
) -> None:
    assert next_event(paused_leader, 10)["event"] == "started"
    elected = next_event(paused_leader, 10)
    assert elected["event"] == "elected"
    paused_leader.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    events: list[tuple[str, int]] = []

    async def record(term: Term) -> None:
        events.append(("elected", term.epoch))

    async def ignore(reason: str) -> None:
        events.append(("deposed", 0))

    standby = Campaign(ConsulLease(consul.url, "paused", "standby", ttl_s=TTL_S),
                       on_elected=record, on_deposed=ignore)
    run = asyncio.create_task(standby.run())
    try:
        await wait_until(lambda: events, 3 * TTL_S)
        took = time.monotonic() - stopped_at
        assert events[0][0] == "elected" and events[0][1] > elected["epoch"]
        assert took < TTL_S + 1.0, took
        paused_leader.send_signal(signal.SIGCONT)
        deposed = next_event(paused_leader, 5)
        assert deposed["event"] == "deposed"
        assert deposed["reason"] in {"no renewal within the lease", "the session expired"}
        assert standby.leading
    finally:
        await standby.close()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
