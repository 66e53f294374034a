"""A flood of tasks: the coordinator's memory goes back down once it has drained."""

from __future__ import annotations

import asyncio

from .conftest import MakeFleet
from .harness import Fleet, record, submit_many, wait_all_terminal

FLOOD = 2500
#: Past the router's bounded memory of recent outcomes (``bandit.neighbour_memory``, 2,000
#: when a fleet turns it on; off in the packaged configuration): the baseline is a coordinator
#: whose learning state has stopped growing, so what the flood leaves behind is told apart
#: from what any 2,000 tasks would have taught it.
WARM_UP = 2200
#: RSS after the drain may exceed the baseline by this much.
TOLERANCE_KIB = 5 * 1024


async def wait_drained(fleet: Fleet, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        _, status = await fleet.http("/api/status")
        if sum(status["tasks_open"].values()) == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, status["tasks_open"]
        await asyncio.sleep(0.5)


async def test_memory_returns_to_baseline_after_a_flood_drains(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(agents=3, concurrency=16)
    fleet.held.update(fleet.agent_ids)  # no agents yet: the flood piles up as open tasks
    await fleet.start_coordinator()
    async with fleet.client() as client:
        warm = await submit_many(client, WARM_UP, "warm-up", {"op": "noop"})
        fleet.held.clear()
        fleet.start_agents()
        await wait_all_terminal(fleet, warm, 60)
        await asyncio.sleep(2.0)
        baseline = fleet.coordinator_rss_kib()

        fleet.held.update(fleet.agent_ids)
        for agent_id in fleet.agent_ids:
            fleet.agents[agent_id].kill()
        ids = await submit_many(client, FLOOD, "flood", {"op": "noop", "pad": "p" * 4096})
        await asyncio.sleep(1.0)
        peak = fleet.coordinator_rss_kib()
        fleet.held.clear()  # the supervisor brings the agents back
        await wait_all_terminal(fleet, ids, 150)
        await wait_drained(fleet, 60)  # every notice sent: nothing of the flood is open
        await asyncio.sleep(3.0)  # the sweep notices the drain and compacts
        after = fleet.coordinator_rss_kib()
    per_task = (peak - baseline) * 1024 / FLOOD
    record("memory_flood", tasks=FLOOD, rss_baseline_mib=round(baseline / 1024, 1),
           rss_peak_mib=round(peak / 1024, 1), rss_after_mib=round(after / 1024, 1),
           bytes_per_open_task=round(per_task))
    grown = peak - baseline
    assert grown > 0
    # Baseline: after the warm-up. After the drain: back within the tolerance
    # (RELIABILITY.md, "Memory"), the replay guard's ids (kept for replay_window_s) included.
    assert after - baseline <= TOLERANCE_KIB, (baseline, peak, after)
