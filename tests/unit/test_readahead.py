"""Read-ahead (coordinator/readahead.py): who is held, and when a held intake goes on."""

from __future__ import annotations

import asyncio

from coordinator_agent.coordinator.readahead import ReadAhead
from coordinator_agent.coordinator.scheduling import SchedulingQueue


def backlog(queue: SchedulingQueue, principal: str, n: int) -> None:
    for i in range(n):
        queue.add(f"{principal}-{i}", principal, 5, 0.0)


def test_a_principal_alone_is_never_held_however_large_its_backlog() -> None:
    queue = SchedulingQueue()
    backlog(queue, "flood", 50)
    assert not ReadAhead(10, queue, dict).holds("flood")


def test_past_its_read_ahead_a_principal_is_held_while_another_has_work() -> None:
    queue = SchedulingQueue()
    backlog(queue, "flood", 10)
    running: dict[str, int] = {}
    gate = ReadAhead(10, queue, lambda: running)
    backlog(queue, "light", 1)
    assert gate.holds("flood")  # another principal has a task pending
    assert not gate.holds("light")  # under its own read-ahead
    queue.discard("light-0")
    assert not gate.holds("flood")
    running["light"] = 1
    gate._running_at = float("-inf")  # counted again (it is cached for a moment)
    assert gate.holds("flood")  # another principal has a task running
    queue.discard("flood-0")
    assert not gate.holds("flood")  # back under its read-ahead: taken in again


def test_without_a_read_ahead_nobody_is_held() -> None:
    queue = SchedulingQueue()
    backlog(queue, "flood", 100)
    backlog(queue, "light", 1)
    assert not ReadAhead(None, queue, dict).holds("flood")


async def test_a_held_intake_goes_on_when_the_others_are_done_and_counts_once() -> None:
    queue = SchedulingQueue()
    backlog(queue, "flood", 5)
    backlog(queue, "light", 1)
    held: list[str] = []
    gate = ReadAhead(5, queue, dict, on_hold=held.append)
    turn = asyncio.create_task(gate.turn("flood"))
    await asyncio.sleep(0.2)
    assert not turn.done()
    assert gate.holding == {"flood": 1}
    queue.discard("light-0")
    await asyncio.wait_for(turn, 2)
    assert held == ["flood"]
    assert gate.holding == {}


async def test_a_held_intake_waits_at_most_its_limit() -> None:
    queue = SchedulingQueue()
    backlog(queue, "flood", 5)
    backlog(queue, "light", 1)
    gate = ReadAhead(5, queue, dict)
    await asyncio.wait_for(gate.turn("flood", max_wait_s=0.2), 2)
    assert gate.holds("flood")  # still held: it went on because of the limit
