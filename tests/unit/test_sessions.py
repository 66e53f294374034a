"""Agent sessions and crashes, on the real coordinator parts with in-memory fakes for the rest.

A hello with a new session ends what the coordinator held for the agent's earlier process:
started attempts are ``crashed`` (a retry spent, never that agent again), the others
``withdrawn`` (free). A task that keeps crashing agents is quarantined.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from coordinator_agent.coordinator.dispatch import Dispatcher
from coordinator_agent.coordinator.heartbeats import AgentReports
from coordinator_agent.coordinator.results import TaskResults
from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.tasks import TaskRecord, TaskStatus
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.planner import CoordinationPlanner
from coordinator_agent.wire import protocol


class RecordingOutbox:
    """Stands in for the outbox: remembers what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def assignment(self, task: TaskRecord, attempt: Any) -> None:
        self.sent.append(("assign", (task.id, attempt.number, attempt.session)))

    def cancel_attempt(self, task: TaskRecord, attempt: Any, reason: str) -> None:
        self.sent.append(("cancel", (task.id, reason)))

    def completed(self, task: TaskRecord) -> None:
        self.sent.append(("completed", task.id))

    def quarantined(self, task: TaskRecord) -> None:
        self.sent.append(("quarantined", task.id))


def _run_now(coro: Coroutine[Any, Any, None]) -> None:
    """Spawn stand-in: the publishes are the recording outbox's, so they finish at once."""
    with contextlib.suppress(StopIteration):
        coro.send(None)
    coro.close()


@pytest.fixture
def parts(
    state: StateManager,
) -> Iterator[tuple[AgentReports, Dispatcher, RecordingOutbox]]:
    metrics = Metrics()
    outbox = RecordingOutbox()
    planner = CoordinationPlanner(32, metrics=metrics)
    dispatcher = Dispatcher(state, planner, outbox, metrics,  # type: ignore[arg-type]
                            max_in_flight_per_agent=32, spawn=_run_now)
    results = TaskResults(state, planner, dispatcher, outbox, metrics,  # type: ignore[arg-type]
                          max_output_bytes=65536)
    dispatcher.active = True
    yield AgentReports(state, dispatcher, results, metrics), dispatcher, outbox
    planner.close()


HELLO = protocol.AgentHello(kind="general", max_concurrency=4)
BEAT = protocol.AgentStatus(kind="general", max_concurrency=4)


def _submit(state: StateManager, dispatcher: Dispatcher, task_id: str, **kw: Any) -> TaskRecord:
    task = TaskRecord(id=task_id, description=f"task {task_id}", **kw)
    state.add_task(task)
    dispatcher.enqueue(task_id)
    return task


async def test_a_restart_crashes_what_had_started_and_withdraws_what_had_not(
    state: StateManager, parts: tuple[AgentReports, Dispatcher, RecordingOutbox],
) -> None:
    reports, dispatcher, _ = parts
    reports.seen("a1", HELLO, 100.0, session="s1")
    started = _submit(state, dispatcher, "started")
    queued = _submit(state, dispatcher, "queued")
    dispatcher.dispatch()
    assert {a.session for t in (started, queued) for a in t.attempts} == {"s1"}
    reports.results.on_progress("a1", protocol.TaskProgress(task_id="started", attempt=1,
                                                            progress=0.0))
    # The new process's heartbeat overtakes its hello (they travel on different lanes).
    reports.seen("a1", BEAT, 101.0, session="s2")
    reports.seen("a1", HELLO, 101.1, session="s2")
    assert started.attempts[0].outcome.value == "crashed"
    assert queued.attempts[0].outcome.value == "withdrawn"
    assert queued.retries_left == queued.max_retries + 1  # withdrawn: no retry spent
    assert state.agents["a1"].session == "s2"
    # The same hello again (a redelivery) changes nothing for the new session's work.
    dispatcher.dispatch()
    assert queued.current_attempt is not None and queued.current_attempt.session == "s2"
    reports.seen("a1", HELLO, 101.2, session="s2")
    assert queued.current_attempt is not None


async def test_a_task_never_goes_back_to_an_agent_it_crashed_and_is_quarantined(
    state: StateManager, parts: tuple[AgentReports, Dispatcher, RecordingOutbox],
) -> None:
    reports, dispatcher, outbox = parts
    for agent_id in ("a1", "a2"):
        reports.seen(agent_id, HELLO, 100.0, session=f"{agent_id}-1")
    poison = _submit(state, dispatcher, "poison", max_retries=5)
    crashed_on = []
    for generation in (2, 3):
        dispatcher.dispatch()
        attempt = poison.current_attempt
        assert attempt is not None and attempt.agent_id not in crashed_on
        reports.results.on_progress(attempt.agent_id, protocol.TaskProgress(
            task_id="poison", attempt=attempt.number, progress=0.0))
        crashed_on.append(attempt.agent_id)
        reports.seen(attempt.agent_id, HELLO, 100.0 + generation,
                     session=f"{attempt.agent_id}-{generation}")
    await asyncio.sleep(0)
    # Both agents crashed once; no other could run it: quarantined with retries to spare.
    assert sorted(crashed_on) == ["a1", "a2"]
    assert poison.status is TaskStatus.FAILED
    assert poison.error is not None and poison.error.startswith("crashed its agent 2 times")
    assert ("quarantined", "poison") in outbox.sent


async def test_a_started_report_overtaken_by_its_result_changes_nothing(
    state: StateManager, parts: tuple[AgentReports, Dispatcher, RecordingOutbox],
) -> None:
    # "started" travels on the status lane, unconfirmed; the result on the tasks lane may
    # be handled first. The finished task keeps its progress and its attempt's record.
    reports, dispatcher, outbox = parts
    reports.seen("a1", HELLO, 100.0, session="s1")
    task = _submit(state, dispatcher, "quick")
    dispatcher.dispatch()
    reports.results.on_result("a1", protocol.TaskResult(task_id="quick", attempt=1,
                                                        success=True, output=None))
    assert task.status is TaskStatus.SUCCEEDED and task.progress == 1.0
    started = task.attempts[0].started
    reports.results.on_progress("a1", protocol.TaskProgress(task_id="quick", attempt=1,
                                                            progress=0.0, message="started"))
    assert task.status is TaskStatus.SUCCEEDED and task.progress == 1.0
    assert task.attempts[0].started == started
    assert ("completed", "quick") in outbox.sent
