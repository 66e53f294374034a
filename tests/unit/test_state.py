"""StateManager: agent records, liveness sweep, task bookkeeping and persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator_agent.coordinator.state import AgentLiveness, AgentRecord, StateManager
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord, TaskStatus
from coordinator_agent.exceptions import UnknownTask
from coordinator_agent.settings import Liveness
from coordinator_agent.wire import protocol

T0 = 1_000.0
# With the liveness fixture: heartbeat 2 s, suspect after 2.5 x, dead after 5 x.
SUSPECT_AT = T0 + 2.0 * 2.5
DEAD_AT = T0 + 2.0 * 5.0


def _hello(**kw: object) -> protocol.AgentHello:
    return protocol.AgentHello(kind="development", capabilities=["python"], max_concurrency=2,
                               version="1.0", **kw)  # type: ignore[arg-type]


def _status(state: str = "ready", **kw: object) -> protocol.AgentStatus:
    return protocol.AgentStatus(kind="development", capabilities=["python"], max_concurrency=2,
                                state=state, **kw)  # type: ignore[arg-type]


# --- agents ---------------------------------------------------------------------------------


def test_observe_agent_creates_record(state: StateManager) -> None:
    record, became_assignable = state.observe_agent("a1", _hello(), now=T0)
    assert became_assignable
    assert state.agents["a1"] is record
    assert record.kind == "development"
    assert record.capabilities == frozenset({"python"})
    assert record.max_concurrency == 2
    assert record.version == "1.0"
    assert record.first_seen == record.last_seen == T0
    assert record.liveness is AgentLiveness.HEALTHY
    assert record.assignable


def test_heartbeat_creates_record_after_coordinator_restart(state: StateManager) -> None:
    record, became_assignable = state.observe_agent(
        "a1", _status("busy", in_flight=2, load=0.9), now=T0
    )
    assert became_assignable
    assert record.reported_state == "busy"
    assert record.reported_in_flight == 2
    assert record.reported_load == 0.9
    assert record.assignable


def test_heartbeat_updates_existing_record(state: StateManager) -> None:
    first, _ = state.observe_agent("a1", _hello(), now=T0)
    status = protocol.AgentStatus(kind="gpu", capabilities=["cuda"], max_concurrency=8)
    second, became_assignable = state.observe_agent("a1", status, now=T0 + 1)
    assert second is first
    assert not became_assignable  # it already was
    assert second.kind == "gpu"
    assert second.capabilities == frozenset({"cuda"})
    assert second.max_concurrency == 8
    assert second.last_seen == T0 + 1
    assert second.first_seen == T0


def test_liveness_sweep_thresholds(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)

    assert state.sweep_liveness(SUSPECT_AT - 0.01) == []
    assert record.liveness is AgentLiveness.HEALTHY

    assert state.sweep_liveness(SUSPECT_AT) == []
    assert record.liveness is AgentLiveness.SUSPECT
    assert not record.assignable

    assert state.sweep_liveness(DEAD_AT - 0.01) == []
    assert record.liveness is AgentLiveness.SUSPECT

    assert state.sweep_liveness(DEAD_AT) == [record]
    assert record.liveness is AgentLiveness.DEAD
    assert not record.assignable

    # Reported once only.
    assert state.sweep_liveness(DEAD_AT + 100) == []
    assert record.liveness is AgentLiveness.DEAD


def test_thresholds_follow_configuration(store: TaskStore) -> None:
    state = StateManager(store, Liveness(heartbeat_interval_s=10, suspect_after=2, dead_after=3))
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    state.sweep_liveness(T0 + 19.9)
    assert record.liveness is AgentLiveness.HEALTHY
    state.sweep_liveness(T0 + 20)
    assert record.liveness is AgentLiveness.SUSPECT
    assert state.sweep_liveness(T0 + 29.9) == []
    assert state.sweep_liveness(T0 + 30) == [record]


def test_silent_healthy_agent_goes_straight_to_dead(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    assert state.sweep_liveness(DEAD_AT + 1) == [record]
    assert record.liveness is AgentLiveness.DEAD


def test_suspect_agent_recovers_only_after_recover_after_beats(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    state.sweep_liveness(SUSPECT_AT)
    assert record.liveness is AgentLiveness.SUSPECT

    # One heartbeat is not enough (hysteresis: recover_after = 2 by default).
    again, became_assignable = state.observe_agent("a1", _status(), now=SUSPECT_AT + 0.5)
    assert again is record
    assert not became_assignable
    assert (record.liveness, record.liveness_reason) == (AgentLiveness.SUSPECT, "recovering")
    _, became_assignable = state.observe_agent("a1", _status(), now=SUSPECT_AT + 1.5)
    assert became_assignable
    assert record.liveness is AgentLiveness.HEALTHY
    assert record.assignable
    # The silence clock restarted with the heartbeat.
    assert state.sweep_liveness(SUSPECT_AT + 2) == []
    assert record.liveness is AgentLiveness.HEALTHY


def test_a_new_silence_restarts_the_recovery_count(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    state.sweep_liveness(SUSPECT_AT)
    state.observe_agent("a1", _status(), now=SUSPECT_AT + 0.5)  # 1 of 2
    gap = SUSPECT_AT + 0.5 + 2.0 * 2.5
    state.sweep_liveness(gap)  # silent again: the count starts over
    state.observe_agent("a1", _status(), now=gap + 0.1)
    assert record.liveness is AgentLiveness.SUSPECT
    state.observe_agent("a1", _status(), now=gap + 0.2)
    assert record.liveness is AgentLiveness.HEALTHY


def test_dead_agent_that_returns_gets_fresh_record_and_keeps_tasks(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    record.in_flight.add("t-1")
    record.completed = 5
    state.sweep_liveness(DEAD_AT)
    assert record.liveness is AgentLiveness.DEAD

    back, became_assignable = state.observe_agent("a1", _hello(), now=DEAD_AT + 5)
    assert back is not record
    assert became_assignable
    assert back.liveness is AgentLiveness.HEALTHY
    assert back.first_seen == DEAD_AT + 5
    assert back.in_flight == {"t-1"}
    assert state.agents["a1"] is back


def test_draining_agent_is_not_assignable(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    _, became_assignable = state.observe_agent("a1", _status("draining"), now=T0 + 1)
    assert not became_assignable
    assert record.liveness is AgentLiveness.DRAINING
    assert record.reported_state == "draining"
    assert not record.assignable
    # A draining agent is not marked suspect by the sweep, but it does die.
    state.sweep_liveness(T0 + 1 + 2.0 * 2.5)
    assert record.liveness is AgentLiveness.DRAINING
    assert state.sweep_liveness(T0 + 1 + 2.0 * 5.0) == [record]


def test_agent_that_starts_draining_is_not_assignable(state: StateManager) -> None:
    record, became_assignable = state.observe_agent("a1", _status("draining"), now=T0)
    assert not became_assignable
    assert not record.assignable


def test_a_requested_drain_outlasts_a_heartbeat_sent_before_it_was_read(
        state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    record.drain_requested = True  # the operator's request (CoordinatorAgent.drain_agent)
    state.observe_agent("a1", _status("ready"), now=T0 + 1)  # sent before the agent read it
    assert not record.assignable
    assert record.public_view(T0 + 1)["state"] == "draining"
    # A new process of the agent starts afresh.
    state.observe_agent("a1", _hello(), now=T0 + 2)
    assert record.assignable


def test_reported_draining_blocks_assignment_even_if_healthy() -> None:
    record = AgentRecord("a1", "k", frozenset(), 1, reported_state="draining")
    assert record.liveness is AgentLiveness.HEALTHY
    assert not record.assignable


def test_agent_left_and_forget_departed(state: StateManager) -> None:
    state.observe_agent("a1", _hello(), now=T0)
    busy, _ = state.observe_agent("a2", _hello(), now=T0)
    busy.in_flight.add("t-1")
    state.observe_agent("a3", _hello(), now=T0)

    assert state.agent_left("a1") is state.agents["a1"]
    assert state.agents["a1"].liveness is AgentLiveness.LEFT
    assert state.agent_left("nobody") is None
    state.agent_left("a2")

    # LEFT agents are skipped by the sweep (not reported as dying).
    died = state.sweep_liveness(DEAD_AT)
    assert [a.id for a in died] == ["a3"]

    state.forget_departed(T0 + 100, keep_s=600)
    assert set(state.agents) == {"a1", "a2", "a3"}
    state.forget_departed(T0 + 601, keep_s=600)
    # a2 still holds a task, so it is kept.
    assert set(state.agents) == {"a2"}


def test_count_by_liveness(state: StateManager) -> None:
    state.observe_agent("a1", _hello(), now=T0)
    state.observe_agent("a2", _status("draining"), now=T0)
    state.observe_agent("a3", _hello(), now=T0)
    state.agent_left("a3")
    counts = state.count_by_liveness()
    assert counts == {"healthy": 1, "suspect": 0, "dead": 0, "draining": 1, "left": 1,
                      "registered": 0}


def test_free_slots_respect_cap() -> None:
    record = AgentRecord("a1", "k", frozenset(), max_concurrency=4)
    assert record.free_slots(32) == 4
    assert record.free_slots(2) == 2
    record.in_flight.update({"t1", "t2", "t3"})
    assert record.free_slots(32) == 1
    assert record.free_slots(2) == -1


def test_agent_public_view() -> None:
    record = AgentRecord("a1", "k", frozenset({"b", "a"}), 2, last_seen=T0)
    view = record.public_view(now=T0 + 1.5)
    assert view["capabilities"] == ["a", "b"]
    assert view["last_seen_s"] == 1.5
    assert view["liveness"] == "healthy"


# --- tasks ----------------------------------------------------------------------------------


def _task(task_id: str, status: TaskStatus = TaskStatus.PENDING, **kw: object) -> TaskRecord:
    task = TaskRecord(id=task_id, description="d", **kw)  # type: ignore[arg-type]
    task.status = status
    return task


def test_add_and_find_task(state: StateManager) -> None:
    task = _task("t-1")
    state.add_task(task)
    assert state.totals["submitted"] == 1
    assert state.tasks["t-1"] is task
    assert state.find_task("t-1") is task
    assert state.get_task("t-1") is task
    assert state.store.get("t-1") == task
    assert state.find_task("nope") is None
    with pytest.raises(UnknownTask) as info:
        state.get_task("nope")
    assert info.value.task_id == "nope"


def test_finished_and_notified_task_leaves_active_set(state: StateManager) -> None:
    task = _task("t-1")
    state.add_task(task)
    task.status = TaskStatus.SUCCEEDED
    state.save(task)
    assert "t-1" in state.tasks  # not yet notified
    task.notified = True
    state.save(task)
    assert "t-1" not in state.tasks
    assert state.recent["t-1"] is task
    assert state.find_task("t-1") is task


def test_recent_is_bounded(state: StateManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StateManager, "RECENT_TASKS", 3)
    for i in range(5):
        task = _task(f"t-{i}", TaskStatus.FAILED, notified=True)
        state.add_task(task)
    assert list(state.recent) == ["t-2", "t-3", "t-4"]
    assert state.tasks == {}
    # Older ones are still found through the store.
    found = state.find_task("t-0")
    assert found is not None
    assert found.status is TaskStatus.FAILED


def test_is_assigned(state: StateManager) -> None:
    task = _task("t-1", TaskStatus.ASSIGNED)
    task.attempts.append(Attempt(1, "a1", 0.0, 10.0))
    state.add_task(task)
    assert state.is_assigned("a1", "t-1")
    assert not state.is_assigned("a2", "t-1")
    assert not state.is_assigned("a1", "t-unknown")


def test_pending_and_status_counts(state: StateManager) -> None:
    state.add_task(_task("p1"))
    state.add_task(_task("p2"))
    state.add_task(_task("r1", TaskStatus.RUNNING))
    assert sorted(t.id for t in state.pending()) == ["p1", "p2"]
    counts = state.status_counts()
    assert counts["pending"] == 2
    assert counts["running"] == 1
    assert counts["succeeded"] == 0


def test_save_and_restore_across_restart(store_path: Path, liveness: Liveness) -> None:
    store = TaskStore(store_path)
    try:
        state = StateManager(store, liveness)
        running = _task("running", TaskStatus.RUNNING, input={"x": [1, 2]})
        running.attempts.append(Attempt(1, "a1", 5.0, 65.0))
        state.add_task(running)
        state.add_task(_task("pending"))
        unnotified = _task("done-unnotified", TaskStatus.SUCCEEDED, output={"ok": True})
        state.add_task(unnotified)
        state.add_task(_task("done-notified", TaskStatus.FAILED, notified=True))
    finally:
        store.close()

    reopened = TaskStore(store_path)
    try:
        fresh = StateManager(reopened, liveness)
        restored = fresh.restore()
        assert {t.id for t in restored} == {"running", "pending", "done-unnotified"}
        assert set(fresh.tasks) == {"running", "pending", "done-unnotified"}
        assert fresh.tasks["running"] == running
        assert fresh.tasks["running"].attempts[0].outcome is AttemptOutcome.RUNNING
        assert fresh.tasks["done-unnotified"].output == {"ok": True}
        # The finished one is not active but still findable (and still assigned-to-a1 works).
        done = fresh.find_task("done-notified")
        assert done is not None
        assert done.status is TaskStatus.FAILED
        assert fresh.is_assigned("a1", "running")
    finally:
        reopened.close()


def test_a_heartbeat_overtaken_by_the_goodbye_does_not_bring_the_agent_back(
    state: StateManager,
) -> None:
    record, _ = state.observe_agent("a1", _hello(), now=T0)
    state.agent_left("a1")
    late, became_assignable = state.observe_agent("a1", _status(), now=T0 + 0.1)
    assert late is record and not became_assignable
    assert record.liveness is AgentLiveness.LEFT
    back, became_assignable = state.observe_agent("a1", _hello(), now=T0 + 1)
    assert became_assignable and back.liveness is AgentLiveness.HEALTHY


# --- repeat heartbeats: only the deadline moves ------------------------------------------------


def test_a_repeat_heartbeat_moves_the_deadline_and_nothing_else(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _status(in_flight=1, load=0.5), now=T0,
                                    sent_at=T0)
    version = state.fleet_version
    # Heard again, saying the same, just before it would have turned suspect.
    again, became = state.observe_agent("a1", _status(in_flight=1, load=0.5),
                                        now=SUSPECT_AT - 0.1, sent_at=SUSPECT_AT - 0.1)
    assert again is record and not became
    assert record.last_seen == SUSPECT_AT - 0.1
    assert record.last_sent_at == SUSPECT_AT - 0.1
    assert state.last_heard_at == SUSPECT_AT - 0.1
    assert state.fleet_version == version  # routing regroups nobody
    # Its first deadline passes without a verdict; silence counts from the repeat.
    assert state.sweep_liveness(SUSPECT_AT + 0.1) == []
    assert record.liveness is AgentLiveness.HEALTHY
    later = SUSPECT_AT - 0.1 + 2.0 * 2.5
    state.sweep_liveness(later)
    assert record.liveness is AgentLiveness.SUSPECT


def test_a_repeat_heartbeat_counts_the_beats_missing_before_it(state: StateManager) -> None:
    state.observe_agent("a1", _status(), now=T0, sent_at=T0)
    state.observe_agent("a1", _status(), now=T0 + 6.0, sent_at=T0 + 6.0)  # 2 intervals lost
    assert state.missing_heartbeats == 2


@pytest.mark.parametrize("changed", [
    {"in_flight": 2}, {"load": 0.25}, {"state": "busy"}, {"state": "draining"},
    {"max_concurrency": 3}, {"capabilities": ["python", "rust"]}, {"kind": "review"},
])
def test_a_heartbeat_that_says_something_new_is_applied(
    state: StateManager, changed: dict[str, object]
) -> None:
    state.observe_agent("a1", _status(), now=T0, sent_at=T0)
    fields = {"kind": "development", "capabilities": ["python"], "max_concurrency": 2,
              "state": "ready", "in_flight": 0, "load": 0.0, **changed}
    record, _ = state.observe_agent("a1", protocol.AgentStatus(**fields),  # type: ignore[arg-type]
                                    now=T0 + 2.0, sent_at=T0 + 2.0)
    assert record.kind == fields["kind"]
    assert record.capabilities == frozenset(fields["capabilities"])  # type: ignore[arg-type]
    assert record.max_concurrency == fields["max_concurrency"]
    assert record.reported_state == fields["state"]
    assert record.reported_in_flight == fields["in_flight"]
    assert record.reported_load == fields["load"]
    assert record.assignable is (fields["state"] != "draining")


def test_a_repeat_heartbeat_of_a_suspect_agent_is_judged(state: StateManager) -> None:
    record, _ = state.observe_agent("a1", _status(), now=T0, sent_at=T0)
    state.sweep_liveness(SUSPECT_AT)
    assert record.liveness is AgentLiveness.SUSPECT
    # recover_after on-time beats bring it back, each judged (hysteresis), not skipped.
    beats = [SUSPECT_AT + 0.1 * i for i in range(1, state.liveness.recover_after + 1)]
    for now in beats[:-1]:
        state.observe_agent("a1", _status(), now=now, sent_at=now)
        assert record.liveness is AgentLiveness.SUSPECT
    state.observe_agent("a1", _status(), now=beats[-1], sent_at=beats[-1])
    assert record.liveness is AgentLiveness.HEALTHY
