"""Pure parts of the reliability promises (docs/RELIABILITY.md): the store, outages, memory.

The store failures here are real SQLite failures: ``max_page_count`` caps the file at its current
size, so a write that needs a new page fails with SQLITE_FULL, as on a full disk.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from coordinator_agent.coordinator.memory import FloodWatch
from coordinator_agent.coordinator.outage import OutageClock
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord, TaskStatus
from coordinator_agent.exceptions import StoreUnavailable, UnstorableTask
from coordinator_agent.settings import Limits, Liveness

BLOB = "x" * 9000  # more than a page


def fill(store: TaskStore) -> None:
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def free(store: TaskStore) -> None:
    store._db.execute("PRAGMA max_page_count = 1073741823")


def _task(task_id: str = "t-1", **fields: object) -> TaskRecord:
    return TaskRecord(id=task_id, description="d", **fields)  # type: ignore[arg-type]


# --- durable first ------------------------------------------------------------------------------


def test_a_task_the_store_refuses_is_not_in_memory(state: StateManager) -> None:
    fill(state.store)
    with pytest.raises(StoreUnavailable):
        state.add_task(_task(input={"blob": BLOB}))
    assert "t-1" not in state.tasks
    assert state.totals["submitted"] == 0
    assert state.store.get("t-1") is None
    assert state.store.healthy is False


def test_an_input_the_store_cannot_serialise_is_refused_and_the_store_stays_healthy(
    state: StateManager,
) -> None:
    with pytest.raises(UnstorableTask, match="t-1"):
        state.add_task(_task(input={"n": 2**70}))
    assert "t-1" not in state.tasks
    assert state.store.healthy is True


def test_a_failed_save_puts_memory_back_to_what_the_store_holds(state: StateManager) -> None:
    agent = AgentRecord("a1", "general", frozenset(), 4)
    state.agents["a1"] = agent
    task = _task()
    state.add_task(task)
    task.attempts.append(Attempt(1, "a1", 1.0, 100.0))
    task.move(TaskStatus.ASSIGNED)
    agent.in_flight.add(task.id)
    state.save(task)
    rolled_back: list[TaskRecord] = []
    state.on_rollback = rolled_back.append

    fill(state.store)
    task.attempts[0].end(AttemptOutcome.SUCCEEDED)
    task.move(TaskStatus.SUCCEEDED)
    task.output = {"blob": BLOB}
    agent.in_flight.discard(task.id)
    with pytest.raises(StoreUnavailable):
        state.save(task)

    current = state.tasks["t-1"]
    assert current is not task
    assert current.status is TaskStatus.ASSIGNED  # what the store says, not what memory tried
    assert current.output is None
    assert agent.in_flight == {"t-1"}  # the slot follows the stored attempt
    assert rolled_back == [current]
    assert state.store.probe() is False
    free(state.store)
    assert state.store.probe() is True


# --- attempts that never ran, crashes -----------------------------------------------------------


def test_withdrawn_attempts_cost_no_retry_and_crashes_are_counted_per_agent() -> None:
    task = _task(max_retries=2)
    task.attempts = [Attempt(1, "a1", 0, 1, outcome=AttemptOutcome.WITHDRAWN),
                     Attempt(2, "a2", 0, 1, outcome=AttemptOutcome.CRASHED, started=True),
                     Attempt(3, "a3", 0, 1, outcome=AttemptOutcome.UNDELIVERABLE)]
    assert task.retries_left == 2
    assert task.crashes == 1
    assert task.crashed_agents == frozenset({"a2"})
    assert task.executions == 1


def test_old_records_without_the_new_attempt_fields_still_load() -> None:
    data = _task().to_dict()
    data["attempts"] = [{"number": 1, "agent_id": "a1", "started_at": 0.0, "deadline": 1.0,
                         "outcome": "agent_lost", "ended_at": None, "error": None,
                         "duration_s": None}]
    loaded = TaskRecord.from_dict(data)
    assert loaded.attempts[0].started is False and loaded.attempts[0].session is None


# --- outages ------------------------------------------------------------------------------------


@pytest.fixture
def clock(state: StateManager, liveness: Liveness) -> tuple[OutageClock, list[bool]]:
    broker = [True]
    return OutageClock(state, lambda: broker[0], liveness), broker


def _heard(state: StateManager, *ids: str, at: float) -> None:
    for agent_id in ids:
        state.agents[agent_id] = AgentRecord(agent_id, "general", frozenset(), 4, last_seen=at)


def test_everyone_silent_at_once_is_an_outage_one_silent_agent_is_not(
    state: StateManager, clock: tuple[OutageClock, list[bool]],
) -> None:
    outage, _ = clock
    _heard(state, "a1", "a2", at=100.0)
    assert outage.check(103.0) is False  # suspect_after x interval = 5 s
    assert outage.check(106.0) is True
    assert outage.cause == "every agent silent at once"
    state.agents["a2"].last_seen = 106.5
    assert outage.check(107.0) is False  # one spoke: over


def test_a_single_agent_alone_is_never_taken_for_the_broker(
    state: StateManager, clock: tuple[OutageClock, list[bool]],
) -> None:
    outage, _ = clock
    _heard(state, "a1", at=100.0)
    assert outage.check(200.0) is False


def test_an_outage_moves_deadlines_and_last_seen_by_its_length(
    state: StateManager, clock: tuple[OutageClock, list[bool]],
) -> None:
    outage, broker = clock
    _heard(state, "a1", "a2", at=100.0)
    task = _task()
    state.add_task(task)
    task.attempts.append(Attempt(1, "a1", 100.0, 130.0))
    task.move(TaskStatus.ASSIGNED)
    state.save(task)
    broker[0] = False
    assert outage.check(101.0) is True
    broker[0] = True
    state.agents["a2"].last_seen = 120.5  # its first heartbeat after the outage
    assert outage.check(121.0) is False
    assert task.attempts[0].deadline == pytest.approx(150.0)
    assert state.store.get("t-1").attempts[0].deadline == pytest.approx(150.0)  # type: ignore[union-attr]
    assert state.agents["a1"].last_seen == pytest.approx(120.0)


def test_silence_that_outlasts_the_cap_is_the_agents_after_all(
    state: StateManager, clock: tuple[OutageClock, list[bool]],
) -> None:
    outage, _ = clock
    _heard(state, "a1", "a2", at=100.0)
    assert outage.check(106.0) is True
    assert outage.check(100.0 + outage.collective_silence_max_s + 1) is False
    assert state.agents["a1"].last_seen == 100.0  # not moved: they are judged now


# --- memory -------------------------------------------------------------------------------------


def test_memory_is_compacted_once_a_flood_drains() -> None:
    compacted: list[int] = []
    watch = FloodWatch(lambda: compacted.append(1), min_peak=1000)
    assert watch.observe(500) is False  # a small peak is not worth it
    assert watch.observe(5000) is False
    assert watch.observe(2000) is False
    assert watch.observe(1000) is False  # a quarter of the peak, but still draining
    assert watch.observe(1000) is True  # the drain paused: nothing is held up now
    assert watch.observe(900) is False  # next at a quarter of 1000
    assert watch.observe(200) is False
    assert watch.observe(210) is True  # not falling (a few more came in)
    assert watch.observe(0) is False
    assert watch.observe(0) is True  # the last pass, on an empty table
    assert watch.observe(0) is False  # and then the next flood starts afresh
    assert compacted == [1, 1, 1]


def test_a_burst_that_is_still_draining_is_not_stalled_by_a_compaction() -> None:
    # A pass holds the event loop for tens of ms: none while the open tasks keep falling.
    compacted: list[int] = []
    watch = FloodWatch(lambda: compacted.append(1), min_peak=1000)
    assert watch.observe(2000) is False
    for left in (1500, 900, 450, 300, 120, 40, 5):
        assert watch.observe(left) is False
    assert compacted == []
    assert watch.observe(0) is False  # the last ones finished since the last look
    assert watch.observe(0) is True  # drained: one pass
    assert compacted == [1]


def test_a_started_process_freezes_its_start_up_heap_and_collects_young_objects_less_often(
) -> None:
    # In a process of its own: freezing the test runner's heap would outlive this test.
    script = """
import gc
from coordinator_agent.coordinator.memory import YOUNG_THRESHOLD, settle_heap
before = gc.get_freeze_count()
settle_heap()
assert gc.get_freeze_count() > before + 10_000, (before, gc.get_freeze_count())
assert gc.get_threshold()[0] == YOUNG_THRESHOLD > 700, gc.get_threshold()
garbage = []
garbage.append(garbage)  # a cycle: still collected, frozen heap or not
del garbage
assert gc.collect() >= 1
print("settled")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "settled"


def test_the_default_open_task_limit_fits_a_small_machine() -> None:
    # RELIABILITY.md: about 4.5 KiB of coordinator memory per open task (measured by the
    # fault suite's flood); the default must keep that under ~100 MiB.
    assert Limits().max_pending_tasks * 4.5 * 1024 <= 100 * 1024 * 1024
