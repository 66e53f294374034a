"""Processes die: an agent killed mid-task, and the coordinator itself killed with SIGKILL."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

from prometheus_client import CollectorRegistry

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import AttemptOutcome, TaskStatus
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring

from .conftest import StartWorker
from .helpers import spawn, subprocess_env, task_is, wait_until


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
