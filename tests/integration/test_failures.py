"""Processes die: an agent killed mid-task or by its own handler, and the coordinator itself
killed with SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from prometheus_client import CollectorRegistry

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import AttemptOutcome, TaskStatus
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring

from .conftest import AGENT_IDS, StartWorker
from .helpers import spawn, subprocess_env, task_is, wait_until

#: The SDK agent of the fault suite: ``{"op": "crash"}`` SIGKILLs it first thing in the handler.
FAULT_AGENT = Path(__file__).parents[1] / "faults" / "fault_agent.py"


async def test_agent_killed_mid_task_its_task_completes_on_another_agent(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings, tmp_path: Path,
) -> None:
    doomed = spawn(["worker", "--id", "agent-1", "--concurrency", "1"],
                   subprocess_env(settings), tmp_path / "agent-1.log")
    try:
        await wait_until(lambda: "agent-1" in coordinator.state.agents, 15, "agent-1 hello")
        task_id = await client.submit("slow", input={"op": "sleep", "seconds": 2})
        await wait_until(task_is(coordinator, task_id, "running"), 10, "task running on agent-1")
        await start_worker("agent-2")
        doomed.send_signal(signal.SIGKILL)
        result = await client.wait(task_id, 20)
    finally:
        doomed.kill()
        doomed.wait()

    assert result.status == "succeeded"
    assert [(a.agent_id, a.outcome) for a in result.attempts] == [
        ("agent-1", AttemptOutcome.CRASHED.value), ("agent-2", AttemptOutcome.SUCCEEDED.value)]
    assert coordinator.state.agents["agent-1"].liveness.value == "dead"


async def test_a_handler_that_kills_its_agent_at_once_is_charged_with_the_crash(
    coordinator: CoordinatorAgent, client: CoordinatorClient, settings: Settings, tmp_path: Path,
) -> None:
    # The "started" report is written to the socket, not confirmed, before the handler runs:
    # a handler that kills the process at once must still find it sent, or the attempt would
    # end "withdrawn" (no fault of the task) and the task would kill the next agent too.
    for agent_id in AGENT_IDS:
        with (tmp_path / f"{agent_id}.log").open("ab") as log:
            agent = subprocess.Popen(
                [sys.executable, str(FAULT_AGENT), "--id", agent_id, "--concurrency", "1",
                 "--journal", str(tmp_path / "journal.log")],
                env=subprocess_env(settings), stdout=log, stderr=log)
        try:
            await wait_until(lambda a=agent_id: a in coordinator.state.agents  # type: ignore[misc]
                             and coordinator.state.agents[a].assignable, 15, f"{agent_id} hello")
            task_id = await client.submit("poison", kind="general", input={"op": "crash"},
                                          max_retries=0)
            assert await asyncio.to_thread(agent.wait, 15) == -signal.SIGKILL
            result = await client.wait(task_id, 20)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        assert result.status == "failed", result
        assert [(a.agent_id, a.outcome) for a in result.attempts] == [
            (agent_id, AttemptOutcome.CRASHED.value)], result.attempts
        assert "crashed its agent 1 times" in (result.error or "")


async def test_coordinator_sigkill_then_restart_every_task_ends_exactly_once(
    settings: Settings, keyring: Keyring, start_worker: StartWorker, client: CoordinatorClient,
    cleanup_namespace: None, tmp_path: Path,
) -> None:
    env = subprocess_env(settings, COORDINATOR_MONITORING_PORT="0")
    log = tmp_path / "coordinator.log"
    first = spawn(["run"], env, log)
    restarted = None
    try:
        await start_worker("agent-1", max_concurrency=2)
        await start_worker("agent-2", max_concurrency=2)
        ids = [await client.submit(f"work {i}", input={"op": "sleep", "seconds": 0.4})
               for i in range(24)]
        await wait_until(lambda: len(client.completed) >= 4, 30, "some tasks done")
        first.send_signal(signal.SIGKILL)
        first.wait()
        in_flight = len(ids) - len(client.completed)
        assert in_flight > 0, "the crash should leave tasks unfinished"

        restarted = spawn(["run"], env, log)
        await wait_until(lambda: len(client.completed) == len(ids), 60,
                         f"all tasks done after restart ({len(client.completed)}/{len(ids)})")
    finally:
        for process in (first, restarted):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(20)

    assert {client.completed[t].status for t in ids} == {"succeeded"}
    notices = defaultdict(list)
    for notice in client.notices:
        notices[notice.task_id].append(notice)
    for task_id in ids:  # a repeated notice (outbox re-send) must say exactly the same thing
        assert all(n == notices[task_id][0] for n in notices[task_id]), task_id

    store = TaskStore(settings.store_path)
    try:
        for task_id in ids:
            task = store.get(task_id)
            assert task is not None and task.status is TaskStatus.SUCCEEDED
            successes = [a for a in task.attempts if a.outcome is AttemptOutcome.SUCCEEDED]
            assert len(successes) == 1, task.attempts
            assert task.notified
    finally:
        store.close()

    # A coordinator started on the same store finds nothing left to do.
    again = CoordinatorAgent(settings, keyring, registry=CollectorRegistry())
    assert again.state.restore() == []
    again.state.store.close()
