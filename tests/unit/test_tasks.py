"""Task state machine, attempts, retry accounting, serialisation."""

from __future__ import annotations

import itertools

import orjson
import pytest

from coordinator_agent.coordinator.tasks import (
    TERMINAL,
    TRANSITIONS,
    Attempt,
    AttemptOutcome,
    TaskRecord,
    TaskStatus,
)
from coordinator_agent.exceptions import IllegalTransition, StateError

ALLOWED = [(src, dst) for src, targets in TRANSITIONS.items() for dst in sorted(targets)]
FORBIDDEN = [
    (src, dst) for src, dst in itertools.product(TaskStatus, TaskStatus)
    if dst not in TRANSITIONS[src]
]


def _task(status: TaskStatus = TaskStatus.PENDING, **kw: object) -> TaskRecord:
    task = TaskRecord(id="t-1", description="d", **kw)  # type: ignore[arg-type]
    task.status = status
    return task


def test_table_covers_every_status() -> None:
    assert set(TRANSITIONS) == set(TaskStatus)
    assert ALLOWED and FORBIDDEN
    assert len(ALLOWED) + len(FORBIDDEN) == len(TaskStatus) ** 2


def test_expected_lifecycle_is_allowed() -> None:
    task = _task()
    for step in (TaskStatus.ASSIGNED, TaskStatus.RUNNING, TaskStatus.PENDING,
                 TaskStatus.ASSIGNED, TaskStatus.SUCCEEDED):
        task.move(step)
        assert task.status is step


@pytest.mark.parametrize(("src", "dst"), ALLOWED, ids=lambda s: s.value)
def test_allowed_transition(src: TaskStatus, dst: TaskStatus) -> None:
    task = _task(src)
    task.updated_at = 0.0
    task.move(dst)
    assert task.status is dst
    assert task.updated_at > 0.0


@pytest.mark.parametrize(("src", "dst"), FORBIDDEN, ids=lambda s: s.value)
def test_forbidden_transition(src: TaskStatus, dst: TaskStatus) -> None:
    task = _task(src)
    task.updated_at = 0.0
    with pytest.raises(IllegalTransition) as info:
        task.move(dst)
    assert isinstance(info.value, StateError)
    assert (info.value.task_id, info.value.current, info.value.target) == (
        "t-1", src.value, dst.value
    )
    assert f"{src.value} -> {dst.value}" in str(info.value)
    # Nothing changed.
    assert task.status is src
    assert task.updated_at == 0.0


def test_no_self_transitions() -> None:
    for status in TaskStatus:
        assert status not in TRANSITIONS[status]


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_states_have_no_exits(status: TaskStatus) -> None:
    assert status.terminal
    assert TRANSITIONS[status] == frozenset()
    task = _task(status)
    for target in TaskStatus:
        with pytest.raises(IllegalTransition):
            task.move(target)


def test_terminal_property() -> None:
    assert {s for s in TaskStatus if s.terminal} == {
        TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED
    }


def test_pending_cannot_jump_to_running() -> None:
    with pytest.raises(IllegalTransition):
        _task().move(TaskStatus.RUNNING)


def test_pending_may_succeed_directly_for_a_late_result_of_an_earlier_attempt() -> None:
    task = _task()
    task.move(TaskStatus.SUCCEEDED)
    assert task.status is TaskStatus.SUCCEEDED


# --- attempts and retries -------------------------------------------------------------------


def _attempt(n: int, agent: str, outcome: AttemptOutcome = AttemptOutcome.RUNNING) -> Attempt:
    return Attempt(n, agent, started_at=100.0 + n, deadline=200.0 + n, outcome=outcome)


def test_retries_left_counts_every_real_attempt() -> None:
    task = _task(max_retries=2)
    assert task.retries_left == 3
    task.attempts.append(_attempt(1, "a", AttemptOutcome.FAILED))
    assert task.retries_left == 2
    task.attempts.append(_attempt(2, "b", AttemptOutcome.TIMEOUT))
    assert task.retries_left == 1
    task.attempts.append(_attempt(3, "c", AttemptOutcome.AGENT_LOST))
    assert task.retries_left == 0


def test_undeliverable_attempts_cost_no_retry() -> None:
    task = _task(max_retries=1)
    task.attempts.append(_attempt(1, "a", AttemptOutcome.UNDELIVERABLE))
    task.attempts.append(_attempt(2, "b", AttemptOutcome.UNDELIVERABLE))
    assert task.retries_left == 2
    task.attempts.append(_attempt(3, "c", AttemptOutcome.FAILED))
    assert task.retries_left == 1
    task.attempts.append(_attempt(4, "d"))  # running counts too
    assert task.retries_left == 0


def test_zero_retries_means_single_attempt() -> None:
    task = _task(max_retries=0)
    assert task.retries_left == 1
    task.attempts.append(_attempt(1, "a", AttemptOutcome.FAILED))
    assert task.retries_left == 0


def test_current_attempt_and_lookup() -> None:
    task = _task()
    assert task.current_attempt is None
    assert task.attempt(1) is None
    first = _attempt(1, "a")
    task.attempts.append(first)
    assert task.current_attempt is first
    first.end(AttemptOutcome.FAILED, "boom")
    assert task.current_attempt is None
    assert first.outcome is AttemptOutcome.FAILED
    assert first.error == "boom"
    assert first.ended_at is not None
    second = _attempt(2, "b")
    task.attempts.append(second)
    assert task.current_attempt is second
    assert task.attempt(1) is first
    assert task.attempt(2) is second
    assert task.attempt(0) is None
    assert task.attempt(3) is None
    assert task.attempt(-1) is None


def test_was_assigned_to() -> None:
    task = _task()
    assert not task.was_assigned_to("a")
    task.attempts.append(_attempt(1, "a", AttemptOutcome.FAILED))
    assert task.was_assigned_to("a")
    assert not task.was_assigned_to("b")


# --- serialisation --------------------------------------------------------------------------


def _full_task() -> TaskRecord:
    task = TaskRecord(
        id="job:1", description="count", kind="development", required_capabilities=["python"],
        input={"op": "stats", "nested": [1, 2.5, None, "x"]}, timeout_s=12.5, max_retries=3,
        reply_to="amq.gen-1", submitted_by="op-1", output={"words": 3}, error="earlier",
        progress=0.5, created_at=10.0, updated_at=20.0, notified=True,
        routing={"agent_id": "a", "reason": "least_loaded", "candidates": 2},
    )
    task.status = TaskStatus.SUCCEEDED
    first = _attempt(1, "a", AttemptOutcome.FAILED)
    first.ended_at, first.error, first.duration_s = 150.0, "boom", 49.0
    task.attempts = [first, _attempt(2, "b", AttemptOutcome.SUCCEEDED)]
    return task


def test_to_dict_from_dict_round_trip() -> None:
    task = _full_task()
    restored = TaskRecord.from_dict(task.to_dict())
    assert restored == task
    assert restored.status is TaskStatus.SUCCEEDED
    assert all(isinstance(a, Attempt) for a in restored.attempts)
    assert restored.attempts[0].outcome is AttemptOutcome.FAILED


def test_round_trip_through_json() -> None:
    task = _full_task()
    restored = TaskRecord.from_dict(orjson.loads(orjson.dumps(task.to_dict())))
    assert restored == task
    assert type(restored.status) is TaskStatus
    assert type(restored.attempts[1].outcome) is AttemptOutcome


def test_labels_round_trip_and_an_unlabelled_record_reads_as_before_them() -> None:
    task = _full_task()
    task.labels = ["bug", "component:gateway"]
    assert TaskRecord.from_dict(orjson.loads(orjson.dumps(task.to_dict()))) == task
    plain = _full_task()
    # Absent, not empty: the records of unlabelled tasks are what the version before wrote.
    assert "labels" not in plain.to_dict()
    assert TaskRecord.from_dict(plain.to_dict()).labels == []
    assert plain.public_view()["labels"] == [] and task.public_view()["labels"] == task.labels


def test_to_dict_is_a_copy() -> None:
    task = _full_task()
    data = task.to_dict()
    data["attempts"][0]["agent_id"] = "changed"
    data["routing"]["reason"] = "changed"
    assert task.attempts[0].agent_id == "a"
    assert task.routing["reason"] == "least_loaded"


def test_from_dict_does_not_mutate_input() -> None:
    data = _full_task().to_dict()
    snapshot = orjson.dumps(data)
    TaskRecord.from_dict(data)
    assert orjson.dumps(data) == snapshot


def test_from_dict_rejects_unknown_status() -> None:
    data = _full_task().to_dict()
    data["status"] = "exploded"
    with pytest.raises(ValueError, match="exploded"):
        TaskRecord.from_dict(data)


def test_public_view_hides_reply_queue() -> None:
    view = _full_task().public_view()
    assert "reply_to" not in view
    assert "notified" not in view
    assert view["id"] == "job:1"
    assert view["status"] == "succeeded"
    assert len(view["attempts"]) == 2
