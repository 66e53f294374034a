"""The leadership lease against a real Consul (a private dev agent with a 1 s minimum TTL)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from coordinator_agent.ha.lease import ConsulLease

from ..discovery.consul_agent import PrivateConsul

TTL_S = 2.0


@pytest.fixture
def consul(tmp_path: Path) -> Iterator[PrivateConsul]:
    agent = PrivateConsul(tmp_path / "consul.log", ("-hcl", 'session_ttl_min = "1s"'))
    agent.start()
    deadline = time.monotonic() + 15
    while not _node_registered(agent.url):  # a session needs its node in the catalogue
        assert time.monotonic() < deadline, "the private Consul never registered its node"
        time.sleep(0.1)
    yield agent
    agent.stop()


def _node_registered(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/v1/catalog/nodes", timeout=3) as response:
        return bool(json.loads(response.read()))


@pytest.fixture
async def leases(consul: PrivateConsul) -> AsyncIterator[list[ConsulLease]]:
    made = [ConsulLease(consul.url, "ha-test", f"coordinator-{i}", ttl_s=TTL_S) for i in range(3)]
    yield made
    for lease in made:
        await lease.release()
        await lease.close()


async def test_exactly_one_of_three_candidates_acquires(leases: list[ConsulLease]) -> None:
    terms = await asyncio.gather(*(lease.acquire() for lease in leases))
    winners = [t for t in terms if t is not None]
    assert len(winners) == 1
    assert [lease.held for lease in leases].count(True) == 1
    entry = await leases[0].current()
    assert entry is not None and entry["ModifyIndex"] == winners[0].epoch


async def test_a_release_hands_over_at_once_with_a_higher_epoch(
    leases: list[ConsulLease],
) -> None:
    first, second, _ = leases
    term = await first.acquire()
    assert term is not None and await second.acquire() is None
    await first.release()
    started = time.monotonic()
    taken = await second.acquire()
    assert taken is not None and taken.epoch > term.epoch
    assert time.monotonic() - started < 0.5  # no lock-delay on a release
    assert not first.held and second.held


async def test_a_holder_that_stops_renewing_loses_the_lock_within_the_ttl(
    leases: list[ConsulLease],
) -> None:
    first, second, _ = leases
    term = await first.acquire()
    assert term is not None
    started = time.monotonic()
    while await second.acquire() is None:  # `first` is silent, as if paused or partitioned
        assert time.monotonic() - started < 3 * TTL_S, "the lock never expired"
        await asyncio.sleep(0.1)
    waited = time.monotonic() - started
    assert waited <= TTL_S + 0.5, waited
    assert not first.held  # it stopped believing it leads before anyone else could
    assert second.term is not None and second.term.epoch > term.epoch
    assert await first.renew() is False  # on waking, it learns its session is gone


async def test_renewals_keep_the_lock_past_the_ttl(leases: list[ConsulLease]) -> None:
    first, second, _ = leases
    assert await first.acquire() is not None
    for _ in range(int(3 * TTL_S / (TTL_S / 3))):
        await asyncio.sleep(TTL_S / 3)
        assert await first.renew()
        assert await second.acquire() is None
    assert first.held


async def test_a_candidate_that_waited_keeps_the_lock_it_takes_for_a_whole_ttl(
    leases: list[ConsulLease],
) -> None:
    """Its session was created when it first tried; taking the lock renews it, so the lock does
    not go with a session timer that started long before the acquire."""
    first, second, _ = leases
    assert await first.acquire() is not None
    assert await second.acquire() is None  # its session exists from now on
    await asyncio.sleep(TTL_S * 0.75)
    await first.release()
    assert await second.acquire() is not None
    await asyncio.sleep(TTL_S * 0.75)  # past the first session timer, not renewed since
    entry = await second.current()
    assert entry is not None and entry.get("Session") == second.session_id
    assert await second.renew()


async def test_a_standby_blocking_query_wakes_on_a_handover(leases: list[ConsulLease]) -> None:
    first, second, _ = leases
    assert await first.acquire() is not None
    entry = await second.current()
    assert entry is not None
    watch = asyncio.create_task(second.current(index=int(entry["ModifyIndex"]), wait_s=10))
    await asyncio.sleep(0.2)
    assert not watch.done()
    await first.release()
    changed = await asyncio.wait_for(watch, 5)
    assert changed is not None and not changed.get("Session")


def test_a_ttl_too_short_for_its_margin_is_refused() -> None:
    with pytest.raises(ValueError, match="must exceed twice margin_s"):
        ConsulLease("http://127.0.0.1:1", "x", "y", ttl_s=0.5, margin_s=0.3)
