"""Processes die: the coordinator (SIGKILL), agents (SIGKILL), and a task that kills its agent.

Ground truth is the coordinator's SQLite store and the agents' journal (harness.tally).
"""

from __future__ import annotations

import asyncio
import random
import time

import aio_pika

from coordinator_agent.wire import constants as c

from .conftest import MakeFleet
from .harness import record, submit_many, tally, wait_all_terminal

SLEEP = {"op": "sleep", "seconds": 0.05}


async def test_coordinator_sigkill_twice_loses_nothing_and_completes_once(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet(agents=3, concurrency=8)
    await fleet.start_coordinator()
    fleet.start_agents()
    await fleet.wait_agents_healthy(30)
    restarts = []
    async with fleet.client() as client:
        submitting = asyncio.create_task(submit_many(client, 500, "coordinator-kill", SLEEP))
        for _ in range(2):
            await asyncio.sleep(2.0)
            fleet.kill_coordinator()
            killed = time.monotonic()
            await fleet.start_coordinator()
            restarts.append(round(time.monotonic() - killed, 2))
        ids = await submitting
        took = await wait_all_terminal(fleet, ids, 120)
        await asyncio.sleep(1.0)  # the last notices
        truth = tally(fleet, ids, client.notices)
    record("coordinator_sigkill", tasks=len(ids), lost=len(truth.lost),
           completed_twice=len(truth.completed_twice), executed_twice=len(truth.executed_twice),
           ready_again_s=restarts, drained_s=round(took, 1))
    assert truth.lost == [], truth.summary()
    assert truth.completed_twice == [], truth.summary()
    assert truth.succeeded == len(ids), truth.summary()
    # A coordinator crash runs nothing again: resent assignments are the same attempt.
    assert truth.executed_twice == [], truth.summary()


async def test_agents_sigkilled_only_started_work_runs_again(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(agents=4, concurrency=4)
    await fleet.start_coordinator()
    fleet.start_agents()
    await fleet.wait_agents_healthy(30)
    rng = random.Random(11)
    async with fleet.client() as client:
        ids = await submit_many(client, 500, "agent-kill", {"op": "sleep", "seconds": 0.1})
        for _ in range(5):
            await asyncio.sleep(1.5)
            fleet.kill_agent(rng.choice(fleet.agent_ids))
        took = await wait_all_terminal(fleet, ids, 120)
        recovered = await fleet.wait_agents_healthy(15)
        truth = tally(fleet, ids, client.notices)
    record("agent_sigkill", tasks=len(ids), kills=5, lost=len(truth.lost),
           completed_twice=len(truth.completed_twice), executed_twice=len(truth.executed_twice),
           attempts=dict(truth.attempts_by_outcome), drained_s=round(took, 1),
           agents_healthy_after_s=round(recovered, 2))
    assert truth.lost == [], truth.summary()
    assert truth.completed_twice == [], truth.summary()
    assert truth.succeeded == len(ids), truth.summary()
    # Twice only what was running when its agent died (at least once); never three times.
    for task_id in truth.executed_twice:
        outcomes = [a["outcome"] for a in truth.tasks[task_id]["attempts"]]
        assert "crashed" in outcomes, (task_id, outcomes)
        assert truth.executions[task_id] == 2, (task_id, outcomes)


async def test_an_agent_restart_does_not_rerun_what_was_only_queued(
    make_fleet: MakeFleet,
) -> None:
    """Assignments delivered to a frozen process, then the process killed: withdrawn, run once."""
    fleet = make_fleet(agents=2, concurrency=4)
    await fleet.start_coordinator()
    fleet.start_agents()
    await fleet.wait_agents_healthy(30)
    async with fleet.client() as client:
        fleet.held.add("agent-1")
        frozen = fleet.agents["agent-1"]
        frozen.send_signal(19)  # SIGSTOP: it receives assignments and starts none
        ids = await submit_many(client, 8, "queued", {"op": "sleep", "seconds": 0.2})
        await asyncio.sleep(0.5)
        frozen.kill()
        frozen.wait()
        fleet.held.discard("agent-1")  # the supervisor starts a new process
        await wait_all_terminal(fleet, ids, 60)
        truth = tally(fleet, ids, client.notices)
    queued = [t for t in ids if truth.tasks[t]["attempts"][0]["agent_id"] == "agent-1"]
    record("agent_restart_queued", tasks=len(ids), queued_on_killed=len(queued),
           executed_twice=len(truth.executed_twice),
           attempts=dict(truth.attempts_by_outcome))
    assert queued, "the frozen agent was given nothing: the scenario did not happen"
    assert truth.succeeded == len(ids), truth.summary()
    assert truth.executed_twice == [], truth.summary()
    for task_id in queued:
        first = truth.tasks[task_id]["attempts"][0]
        assert first["outcome"] == "withdrawn", first
        assert not first["started"]


async def test_a_poison_task_crashes_each_agent_once_then_is_quarantined(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet(agents=4, concurrency=2)
    await fleet.start_coordinator()
    fleet.start_agents()
    await fleet.wait_agents_healthy(30)
    async with fleet.client() as client:
        poison = await client.submit("poison", input={"op": "crash"}, max_retries=2)
        ids = await submit_many(client, 300, "ordinary", {"op": "sleep", "seconds": 0.02})
        await wait_all_terminal(fleet, [poison, *ids], 90)
        recovered = await fleet.wait_agents_healthy(10)
        truth = tally(fleet, [poison, *ids], client.notices)
    # Crashes per agent, from the journal: the poison's executions and which agent ran them.
    lines = [line.split() for line in fleet.journal.read_text().splitlines()]
    crashes_by_agent = {agent: sum(1 for t, _, a, _ in lines if t == poison and a == agent)
                        for agent in fleet.agent_ids}
    task = truth.tasks[poison]
    dead_letters = await _dead_letter_reasons(fleet.broker_url, fleet.name)
    record("poison_task", ordinary=len(ids), crashes=sum(crashes_by_agent.values()),
           max_crashes_per_agent=max(crashes_by_agent.values()),
           attempts=len(task["attempts"]), error=task["error"],
           ordinary_failed=truth.failed - 1, agents_healthy_after_s=round(recovered, 2))
    assert task["status"] == "failed"
    assert f"crashed its agent {sum(crashes_by_agent.values())} times" in task["error"]
    assert max(crashes_by_agent.values()) <= 1, crashes_by_agent
    assert sum(crashes_by_agent.values()) <= 3  # max_retries + 1
    assert "poison_task" in dead_letters
    assert truth.succeeded == len(ids), truth.summary()


async def _dead_letter_reasons(url: str, name: str) -> list[str]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(c.dead_letter_queue(name), ensure=True)
        reasons = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            reasons.append(str((message.headers or {}).get(c.HEADER_REJECT_REASON)))
        return reasons
