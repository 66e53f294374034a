"""Composite tasks: the pure decisions, the engine's bookkeeping (with a stand-in coordinator),
the new task.submit fields and TaskRecord persistence."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from coordinator_agent.coordinator.composition import (
    Action,
    Child,
    ChildResult,
    ChildStatus,
    ErrorPolicy,
    child_id,
    coalition_cover,
    combine,
    failure_action,
    parse_decomposition,
    step_input,
    to_start,
)
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord, TaskStatus
from coordinator_agent.coordinator.workflows import WorkflowEngine
from coordinator_agent.exceptions import PlanningError, ProtocolError
from coordinator_agent.settings import Liveness
from coordinator_agent.wire import protocol

# --- a stand-in for the coordinator's side of the engine --------------------------------------


class Host:
    """What CoordinatorAgent does around the engine, minus the broker: children are stored and
    'queued', finishing a task tells the engine, cancelling finishes it as cancelled."""

    def __init__(self, state: StateManager, max_merged_bytes: int = 64 * 1024) -> None:
        self.state = state
        self.queued: list[str] = []
        self.cancelled: list[str] = []
        self.engine = WorkflowEngine(state, create_child=self.create_child, finish=self.finish,
                                     cancel=self.cancel, max_merged_bytes=max_merged_bytes)

    def create_child(self, child: TaskRecord) -> None:
        self.state.add_task(child)
        self.queued.append(child.id)

    def finish(self, task: TaskRecord, status: TaskStatus, *, output: Any = None,
               error: str | None = None) -> None:
        task.move(status)
        task.output, task.error = output, error
        self.state.save(task)
        if task.parent_id is not None or task.workflow is not None:
            self.engine.on_finished(task)

    def cancel(self, task_id: str, reason: str) -> None:
        task = self.state.get_task(task_id)
        if not task.status.terminal:
            self.cancelled.append(task_id)
            self.finish(task, TaskStatus.CANCELLED, error=reason)

    def submit(self, task_id: str = "job", **fields: Any) -> TaskRecord:
        spec = protocol.TaskSubmit(description="the parent", **fields)
        task = TaskRecord(id=task_id, description=spec.description, input=spec.input,
                          timeout_s=30.0, max_retries=0, submitted_by="operator-1")
        composite = self.engine.prepare(task, spec)
        self.state.add_task(task)
        if composite:
            self.engine.launch(task)
        return task

    def run(self, task_id: str, output: Any = None, *, error: str | None = None,
            agent_id: str = "agent-1") -> TaskRecord:
        """The child's agent reports: success with ``output``, or failure with ``error``."""
        task = self.state.get_task(task_id)
        assert task.status is TaskStatus.PENDING, task_id
        now = time.time()
        attempt = Attempt(1, agent_id, now, now + 30)
        task.attempts.append(attempt)
        task.move(TaskStatus.ASSIGNED)
        attempt.end(AttemptOutcome.FAILED if error else AttemptOutcome.SUCCEEDED, error)
        self.finish(task, TaskStatus.FAILED if error else TaskStatus.SUCCEEDED,
                    output=None if error else output, error=error)
        return task

    def task(self, task_id: str) -> TaskRecord:
        return self.state.get_task(task_id)

    def open_ids(self) -> list[str]:
        return [t for t in self.queued if not self.task(t).status.terminal]


@pytest.fixture
def host(state: StateManager) -> Host:
    return Host(state)


def _subtasks(*ops: str) -> list[dict[str, Any]]:
    return [{"description": f"part {i}", "input": {"op": op, "n": i}}
            for i, op in enumerate(ops, start=1)]


# --- coalition cover --------------------------------------------------------------------------


def test_cover_is_the_smallest_set_and_splits_capabilities() -> None:
    agents = [("a-x", ["x"]), ("b-y", ["y"]), ("c-z", ["z", "unrelated"]), ("d-xy", ["x", "y"])]
    cover = coalition_cover(["x", "y", "z"], agents)
    assert cover == [("d-xy", frozenset({"x", "y"})), ("c-z", frozenset({"z"}))]


def test_cover_none_when_the_agents_together_lack_a_capability() -> None:
    assert coalition_cover(["x", "q"], [("a", ["x"]), ("b", ["y"])]) is None
    assert coalition_cover([], [("a", ["x"])]) is None
    assert coalition_cover(["x"], []) is None


def test_cover_is_exact_where_greedy_is_not() -> None:
    agents = [("big", ["a", "b", "d", "e"]), ("left", ["a", "b", "c"]), ("right", ["d", "e", "f"])]
    exact = coalition_cover("abcdef", agents)
    assert exact is not None and sorted(a for a, _ in exact) == ["left", "right"]
    greedy = coalition_cover("abcdef", agents, exact_limit=0)  # beyond the exact limit
    assert greedy is not None and len(greedy) == 3
    brought = [caps for _, caps in greedy]
    assert frozenset().union(*brought) == frozenset("abcdef")
    assert sum(len(c) for c in brought) == 6  # disjoint: each capability asked of one agent
    assert all(brought)


def test_cover_is_deterministic_whatever_the_agent_order() -> None:
    agents = [(f"agent-{i}", caps) for i, caps in
              enumerate([["a"], ["b"], ["a", "b"], ["c"], ["c", "d"], ["d"], ["a", "d"]])]
    expected = coalition_cover("abcd", agents)
    for seed in range(10):
        shuffled = agents[:]
        random.Random(seed).shuffle(shuffled)
        assert coalition_cover("abcd", shuffled) == expected
    assert expected is not None and len(expected) == 2


# --- pure decisions ---------------------------------------------------------------------------


def test_combiner_is_deterministic_and_ordered() -> None:
    results = [ChildResult(i, f"job.{i}", "succeeded", {"n": i}, f"agent-{i % 2}", (f"job.{i}",))
               for i in range(1, 6)]
    results[2] = ChildResult(3, "job.3-r2", "failed", None, "agent-1", ("job.3", "job.3-r2"),
                             error="boom", skipped=True)
    expected = combine(results, source="subtasks")
    for seed in range(5):
        shuffled = results[:]
        random.Random(seed).shuffle(shuffled)
        assert orjson.dumps(combine(shuffled, source="subtasks")) == orjson.dumps(expected)
    assert [r["index"] for r in expected["results"]] == [1, 2, 3, 4, 5]
    assert expected["results"][2] == {"index": 3, "task_id": "job.3-r2", "status": "failed",
                                      "output": None}
    assert expected["provenance"]["skipped"] == [
        {"index": 3, "task_id": "job.3-r2", "error": "boom"}]
    assert expected["provenance"]["children"][2]["runs"] == ["job.3", "job.3-r2"]


@pytest.mark.parametrize(
    ("policy", "runs", "cancelled", "action"),
    [
        (ErrorPolicy.SKIP, 1, False, Action.SKIP),
        (ErrorPolicy.SKIP, 1, True, Action.SKIP),
        (ErrorPolicy.FAIL, 1, False, Action.ABORT),
        (ErrorPolicy.RETRY, 1, False, Action.RESUBMIT),
        (ErrorPolicy.RETRY, 2, False, Action.RESUBMIT),
        (ErrorPolicy.RETRY, 3, False, Action.ABORT),  # two re-submissions used up
        (ErrorPolicy.RETRY, 1, True, Action.ABORT),  # an operator's cancel is deliberate
    ],
)
def test_failure_action(policy: ErrorPolicy, runs: int, cancelled: bool, action: Action) -> None:
    assert failure_action(policy, runs, 2, cancelled=cancelled) is action


def test_to_start_respects_concurrency_in_index_order() -> None:
    children = [Child(1, ChildStatus.RUNNING), Child(2, ChildStatus.SUCCEEDED), Child(3),
                Child(4), Child(5)]
    assert [c.index for c in to_start(children, 3)] == [3, 4]
    assert to_start(children, 1) == []


def test_step_input_chains_outputs() -> None:
    assert step_input(1, {"op": "a"}, {"parent": 1}, None) == {"op": "a"}
    assert step_input(1, None, {"parent": 1}, None) == {"parent": 1}
    assert step_input(2, {"op": "b"}, {"parent": 1}, {"out": 1}) == {
        "input": {"op": "b"}, "previous": {"out": 1}}
    assert step_input(3, None, {"parent": 1}, [1, 2]) == {"input": None, "previous": [1, 2]}


def test_child_ids_derive_from_the_parent_and_stay_identifiers() -> None:
    assert child_id("job", "1") == "job.1"
    long_parent = "p" * 128
    derived = child_id(long_parent, "12-r2")
    assert len(derived) <= 128 and derived.endswith(".12-r2")
    assert derived == child_id(long_parent, "12-r2") != child_id("q" * 128, "12-r2")
    protocol.TaskAssign(task_id=derived, attempt=1, description="d", timeout_s=1)


def test_decomposition_is_validated_as_untrusted_input() -> None:
    specs = parse_decomposition("job", {"subtasks": [{"description": "a", "kind": "k"}]})
    assert specs[0].description == "a" and specs[0].kind == "k"
    bad_outputs: list[Any] = [
        None, "text", [], {"subtasks": []}, {"subtasks": [{"description": "a"}] * 65},
        {"subtasks": [{"description": "a", "evil": "SECRET-VALUE"}]},
        {"subtasks": [{"description": ""}]}, {"subtasks": [{"description": "a", "kind": "a b"}]},
        {"subtasks": [{"description": "a"}], "more": 1},
    ]
    for output in bad_outputs:
        with pytest.raises(PlanningError) as info:
            parse_decomposition("job", output)
        assert info.value.task_id == "job"
        assert "SECRET-VALUE" not in str(info.value)


# --- the new task.submit fields ---------------------------------------------------------------


def test_submit_accepts_each_composition() -> None:
    fan_out = protocol.TaskSubmit(description="d", subtasks=_subtasks("stats", "hash"),
                                  max_concurrency=2, on_subtask_error="retry",
                                  subtask_retries=3, merge="synthesizer", merge_input={"op": "s"})
    assert fan_out.composite and fan_out.subtasks is not None and len(fan_out.subtasks) == 2
    assert protocol.TaskSubmit(description="d", decompose=True, merge="combine").composite
    assert protocol.TaskSubmit(description="d", steps=_subtasks("a")).composite
    assert not protocol.TaskSubmit(description="d").composite


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"subtasks": _subtasks("a"), "steps": _subtasks("b")}, "mutually exclusive"),
        ({"subtasks": _subtasks("a"), "decompose": True}, "mutually exclusive"),
        ({"steps": _subtasks("a"), "decompose": True}, "mutually exclusive"),
        ({"subtasks": _subtasks("a"), "kind": "k"}, "per sub-task or step"),
        ({"steps": _subtasks("a"), "required_capabilities": ["x"]}, "per sub-task or step"),
        ({"steps": _subtasks("a"), "max_concurrency": 2}, "only apply to a fan-out"),
        ({"on_subtask_error": "skip"}, "only apply to a fan-out"),
        ({"subtasks": _subtasks("a"), "merge_input": 1}, 'needs merge="synthesizer"'),
        ({"subtasks": _subtasks("a"), "subtask_retries": 1}, "needs on_subtask_error"),
        ({"subtasks": []}, "at least 1"),
        ({"subtasks": _subtasks(*["a"] * 65)}, "at most 64"),
        ({"steps": _subtasks(*["a"] * 65)}, "at most 64"),
        ({"subtasks": _subtasks("a"), "max_concurrency": 0}, "greater than or equal to 1"),
        ({"subtasks": _subtasks("a"), "max_concurrency": 65}, "less than or equal to 64"),
        ({"subtasks": _subtasks("a"), "on_subtask_error": "ignore"}, "'skip', 'fail' or"),
        ({"subtasks": [{"description": "a", "extra": 1}]}, "Extra inputs"),
        ({"subtasks": [{"description": "a", "timeout_s": 0}]}, "greater than 0"),
    ],
)
def test_submit_rejects_bad_compositions(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        protocol.TaskSubmit(description="d", **fields)


def test_a_bad_composition_on_the_wire_says_why() -> None:
    body = orjson.dumps({
        "v": 1, "id": "m1", "type": "task.submit", "sender": "ops", "sent_at": 1.0,
        "payload": {"description": "d", "subtasks": [{"description": "a"}],
                    "steps": [{"description": "b"}]},
    })
    with pytest.raises(ProtocolError) as info:
        protocol.decode(body)
    assert info.value.reason == "malformed"
    assert "subtasks and steps are mutually exclusive" in str(info.value)


# --- TaskRecord persistence -------------------------------------------------------------------


def test_task_record_round_trip_with_workflow_and_old_rows(store: TaskStore) -> None:
    host = Host(StateManager(store, Liveness()))
    parent = host.submit(subtasks=_subtasks("a", "b"))
    loaded = store.get("job")
    assert loaded is not None
    assert loaded.workflow == orjson.loads(orjson.dumps(parent.workflow))
    assert loaded.child_ids == ["job.1", "job.2"] and loaded.parent_id is None
    child = store.get("job.1")
    assert child is not None and child.parent_id == "job"

    old_row = orjson.loads(orjson.dumps(TaskRecord(id="old", description="d")))
    for new_field in ("parent_id", "child_ids", "workflow"):
        del old_row[new_field]
    old = TaskRecord.from_dict(old_row)
    assert (old.parent_id, old.child_ids, old.workflow) == (None, [], None)


def test_public_view_shows_children_without_specs(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a", "b"), merge="synthesizer",
                         merge_input={"secret": 1})
    view = parent.public_view()
    flow = view["workflow"]
    assert "specs" not in flow and "merge_input" not in flow
    assert [(c["index"], c["task_id"], c["status"]) for c in flow["children"]] == [
        (1, "job.1", "running"), (2, "job.2", "running")]
    orjson.dumps(view)


# --- the engine: fan-out ----------------------------------------------------------------------


def test_fan_out_runs_up_to_max_concurrency_and_combines(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a", "b", "c"), max_concurrency=2,
                         input={"shared": True})
    assert parent.status is TaskStatus.RUNNING and parent.attempts == []
    assert host.queued == ["job.1", "job.2"]
    child = host.task("job.1")
    assert (child.parent_id, child.submitted_by, child.reply_to) == ("job", "operator-1", None)
    assert child.input == {"op": "a", "n": 1}
    host.run("job.2", {"out": 2}, agent_id="agent-2")
    assert host.queued == ["job.1", "job.2", "job.3"]
    assert parent.progress == pytest.approx(1 / 3, abs=1e-3)
    host.run("job.3", {"out": 3})
    host.run("job.1", {"out": 1})
    assert parent.status is TaskStatus.SUCCEEDED
    assert [(r["index"], r["task_id"], r["status"], r["output"])
            for r in parent.output["results"]] == [
        (1, "job.1", "succeeded", {"out": 1}), (2, "job.2", "succeeded", {"out": 2}),
        (3, "job.3", "succeeded", {"out": 3})]
    provenance = parent.output["provenance"]
    assert provenance["source"] == "subtasks" and provenance["skipped"] == []
    assert provenance["children"][1]["agent_id"] == "agent-2"


def test_subtask_without_input_gets_the_parents(host: Host) -> None:
    host.submit(subtasks=[{"description": "a"}], input={"shared": True})
    assert host.task("job.1").input == {"shared": True}


def test_skip_merges_what_succeeded_with_provenance(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a", "fail", "c"), on_subtask_error="skip")
    host.run("job.2", error="RuntimeError: boom")
    host.run("job.1", 1)
    host.run("job.3", 3)
    assert parent.status is TaskStatus.SUCCEEDED
    assert [r["status"] for r in parent.output["results"]] == ["succeeded", "failed", "succeeded"]
    assert parent.output["provenance"]["skipped"] == [
        {"index": 2, "task_id": "job.2", "error": "RuntimeError: boom"}]


def test_skip_with_nothing_succeeding_fails(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("fail"), on_subtask_error="skip")
    host.run("job.1", error="boom")
    assert parent.status is TaskStatus.FAILED and "every sub-task failed" in (parent.error or "")


def test_fail_cancels_running_and_pending_siblings(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a", "fail", "c", "d"), max_concurrency=3)
    assert host.queued == ["job.1", "job.2", "job.3"]
    host.run("job.2", error="RuntimeError: boom")
    assert parent.status is TaskStatus.FAILED
    assert parent.error == "sub-task 2 (job.2) failed: RuntimeError: boom"
    assert sorted(host.cancelled) == ["job.1", "job.3"]
    assert host.queued == ["job.1", "job.2", "job.3"]  # the 4th never started
    statuses = [c["status"] for c in (parent.workflow or {})["children"]]
    assert statuses == ["cancelled", "failed", "cancelled", "cancelled"]
    # A late result of a cancelled sibling changes nothing.
    host.engine.on_finished(host.task("job.1"))
    assert parent.status is TaskStatus.FAILED


def test_retry_resubmits_then_fails(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a", "fail"), on_subtask_error="retry",
                         subtask_retries=2)
    host.run("job.1", 1)
    host.run("job.2", error="boom 1")
    host.run("job.2-r2", error="boom 2")
    assert parent.status is TaskStatus.RUNNING
    host.run("job.2-r3", error="boom 3")
    assert parent.status is TaskStatus.FAILED
    assert parent.error == "sub-task 2 (job.2-r3) failed after 3 runs (job.2, job.2-r2, " \
        "job.2-r3): boom 3"


def test_retry_resubmission_that_succeeds_is_merged(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a", "flaky"), on_subtask_error="retry")
    host.run("job.2", error="flaked")
    host.run("job.2-r2", {"second": "time"})
    host.run("job.1", 1)
    assert parent.status is TaskStatus.SUCCEEDED
    assert parent.output["results"][1] == {"index": 2, "task_id": "job.2-r2",
                                           "status": "succeeded", "output": {"second": "time"}}
    assert parent.output["provenance"]["children"][1]["runs"] == ["job.2", "job.2-r2"]


def test_operator_cancelling_the_parent_cancels_its_children(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a", "b"))
    host.cancel("job", "cancelled by operator")
    assert parent.status is TaskStatus.CANCELLED
    assert sorted(host.cancelled) == ["job", "job.1", "job.2"]
    assert {host.task(t).status for t in ("job.1", "job.2")} == {TaskStatus.CANCELLED}


def test_merged_output_is_bounded(state: StateManager) -> None:
    host = Host(state, max_merged_bytes=200)
    parent = host.submit(subtasks=_subtasks("a", "b"))
    host.run("job.1", "x" * 150)
    host.run("job.2", "y" * 150)
    assert parent.status is TaskStatus.FAILED
    assert "exceeds the 200-byte limit" in (parent.error or "")


# --- the engine: planner and synthesizer ------------------------------------------------------


def test_decomposition_then_synthesis(host: Host) -> None:
    parent = host.submit(decompose=True, merge="synthesizer", merge_input={"op": "synthesize"},
                         input={"op": "decompose", "text": "a b c"})
    planner = host.task("job.plan")
    assert (planner.kind, planner.input) == ("planner", {"op": "decompose", "text": "a b c"})
    host.run("job.plan", {"subtasks": [{"description": "one", "input": 1},
                                       {"description": "two", "kind": "general"}]},
             agent_id="planner-1")
    assert host.queued == ["job.plan", "job.1", "job.2"]
    assert host.task("job.2").kind == "general"
    assert host.task("job.2").input == {"op": "decompose", "text": "a b c"}
    host.run("job.1", {"n": 1})
    host.run("job.2", {"n": 2})
    synthesizer = host.task("job.merge")
    assert synthesizer.kind == "synthesizer"
    assert synthesizer.input["input"] == {"op": "synthesize"}
    merged = synthesizer.input["previous"]
    assert [r["output"] for r in merged["results"]] == [{"n": 1}, {"n": 2}]
    assert merged["provenance"]["planner"] == {"task_id": "job.plan", "agent_id": "planner-1"}
    assert parent.status is TaskStatus.RUNNING
    host.run("job.merge", {"total": 3})
    assert parent.status is TaskStatus.SUCCEEDED and parent.output == {"total": 3}


def test_a_bad_decomposition_fails_the_parent(host: Host) -> None:
    parent = host.submit(decompose=True)
    host.run("job.plan", {"subtasks": "not a list"})
    assert parent.status is TaskStatus.FAILED
    assert (parent.error or "").startswith("planner output rejected: subtasks")
    assert host.queued == ["job.plan"]


def test_a_failed_synthesizer_fails_the_parent(host: Host) -> None:
    parent = host.submit(subtasks=_subtasks("a"), merge="synthesizer")
    host.run("job.1", 1)
    host.run("job.merge", error="no")
    assert parent.status is TaskStatus.FAILED
    assert parent.error == "synthesizer task job.merge failed: no"


# --- the engine: steps ------------------------------------------------------------------------


def test_steps_pass_outputs_along(host: Host) -> None:
    parent = host.submit(steps=[{"description": "implement", "kind": "dev"},
                                {"description": "audit", "kind": "audit", "input": {"s": 2}},
                                {"description": "deploy"}], input={"repo": "x"})
    assert host.queued == ["job.1"] and host.task("job.1").input == {"repo": "x"}
    host.run("job.1", {"built": 1}, agent_id="dev-1")
    assert host.task("job.2").input == {"input": {"s": 2}, "previous": {"built": 1}}
    assert host.task("job.2").kind == "audit"
    host.run("job.2", {"audited": True}, agent_id="audit-1")
    assert host.task("job.3").input == {"input": None, "previous": {"audited": True}}
    host.run("job.3", "deployed", agent_id="ops-1")
    assert parent.status is TaskStatus.SUCCEEDED
    assert parent.output["output"] == "deployed"
    assert [(s["index"], s["task_id"], s["agent_id"], s["status"])
            for s in parent.output["steps"]] == [
        (1, "job.1", "dev-1", "succeeded"), (2, "job.2", "audit-1", "succeeded"),
        (3, "job.3", "ops-1", "succeeded")]
    assert parent.output["steps"][0]["kind"] == "dev"  # the agent is unknown: the step's kind


def test_a_failed_step_fails_the_chain(host: Host) -> None:
    parent = host.submit(steps=_subtasks("a", "fail", "c"))
    host.run("job.1", 1)
    host.run("job.2", error="broken")
    assert parent.status is TaskStatus.FAILED
    assert parent.error == "step 2 of 3 (job.2) failed: broken"
    assert host.queued == ["job.1", "job.2"]


# --- the engine: races and coalitions ---------------------------------------------------------


def _pending_task(task_id: str = "job", **fields: Any) -> TaskRecord:
    return TaskRecord(id=task_id, description="hedged", input={"op": "x"}, timeout_s=9.0,
                      max_retries=1, submitted_by="operator-1", **fields)


def test_race_keeps_the_first_success_and_cancels_the_other(host: Host) -> None:
    task = _pending_task(required_capabilities=["text"])
    host.state.add_task(task)
    assert host.engine.hedge(task, ["fast", "careful"])
    assert task.status is TaskStatus.RUNNING
    racers = [host.task(t) for t in host.queued]
    assert [(r.kind, r.input, r.required_capabilities, r.timeout_s) for r in racers] == [
        ("fast", {"op": "x"}, ["text"], 9.0), ("careful", {"op": "x"}, ["text"], 9.0)]
    host.run("job.2", {"answer": 42})
    assert task.status is TaskStatus.SUCCEEDED and task.output == {"answer": 42}
    assert host.cancelled == ["job.1"]
    assert not host.engine.hedge(task, ["a", "b"])  # only a pending, never-assigned task


def test_race_fails_only_when_every_racer_failed(host: Host) -> None:
    task = _pending_task()
    host.state.add_task(task)
    assert host.engine.hedge(task, ["fast", "careful", "fast"])
    assert len(host.queued) == 2
    host.run("job.1", error="nope")
    assert task.status is TaskStatus.RUNNING
    host.run("job.2", error="nor me")
    assert task.status is TaskStatus.FAILED
    assert task.error == "every racer failed: job.1 (fast): nope; job.2 (careful): nor me"


def test_hedge_needs_two_kinds(host: Host) -> None:
    task = _pending_task()
    host.state.add_task(task)
    assert not host.engine.hedge(task, ["only", "only"])
    assert task.status is TaskStatus.PENDING and task.workflow is None


def _agent(agent_id: str, caps: list[str], kind: str = "general") -> AgentRecord:
    return AgentRecord(agent_id, kind, frozenset(caps), 4)


def test_coalition_splits_capabilities_across_agents(host: Host) -> None:
    task = _pending_task(kind="general", required_capabilities=["text", "hash", "text"])
    host.state.add_task(task)
    agents = [_agent("agent-1", ["text"]), _agent("agent-2", ["hash", "zip"]),
              _agent("agent-3", ["text", "hash"], kind="other")]  # the wrong kind
    assert host.engine.try_coalition(task, agents)
    children = [host.task(t) for t in host.queued]
    assert sorted(c.required_capabilities for c in children) == [["hash"], ["text"]]
    assert {c.kind for c in children} == {"general"}
    assert {(c.description, orjson.dumps(c.input)) for c in children} == {
        ("hedged", b'{"op":"x"}')}
    for child in children:
        host.run(child.id, {"by": child.required_capabilities})
    assert task.status is TaskStatus.SUCCEEDED
    assert task.output["provenance"]["source"] == "coalition"
    assert task.output["provenance"]["coalition"] == [
        {"agent_id": "agent-1", "capabilities": ["text"]},
        {"agent_id": "agent-2", "capabilities": ["hash"]}]


def test_no_coalition_without_a_cover_or_for_a_kind_nobody_has(host: Host) -> None:
    agents = [_agent("agent-1", ["text"]), _agent("agent-2", ["hash"])]
    uncovered = _pending_task("t1", required_capabilities=["text", "gpu"])
    wrong_kind = _pending_task("t2", kind="special", required_capabilities=["text", "hash"])
    one_cap = _pending_task("t3", required_capabilities=["gpu"])
    for task in (uncovered, wrong_kind, one_cap):
        host.state.add_task(task)
        assert not host.engine.try_coalition(task, agents)
        assert task.status is TaskStatus.PENDING and task.workflow is None
    dead = _agent("agent-3", ["gpu"])
    dead.liveness = dead.liveness.__class__("dead")
    assert not host.engine.try_coalition(uncovered, [*agents, dead])


# --- restarts ---------------------------------------------------------------------------------


def test_a_restarted_engine_carries_on(store_path: Path, liveness: Liveness) -> None:
    first = Host(StateManager(TaskStore(store_path), liveness))
    parent = first.submit(subtasks=_subtasks("a", "b", "c"), max_concurrency=1)
    first.run("job.1", 1)
    # Finished while the coordinator was down: the parent has not heard of it yet.
    lost = first.task("job.2")
    lost.move(TaskStatus.SUCCEEDED)
    lost.output = 2
    first.state.save(lost)
    first.state.store.close()
    assert parent.status is TaskStatus.RUNNING

    state = StateManager(TaskStore(store_path), liveness)
    state.restore()
    second = Host(state)
    second.engine.resume()
    assert second.queued == ["job.3"]
    second.run("job.3", 3)
    restored = second.task("job")
    assert restored.status is TaskStatus.SUCCEEDED
    assert [r["output"] for r in restored.output["results"]] == [1, 2, 3]
    state.store.close()


def test_a_parent_accepted_but_not_started_is_started_on_resume(
    store_path: Path, liveness: Liveness
) -> None:
    first = Host(StateManager(TaskStore(store_path), liveness))
    spec = protocol.TaskSubmit(description="d", steps=_subtasks("a"))
    task = TaskRecord(id="job", description="d", submitted_by="operator-1")
    assert first.engine.prepare(task, spec)
    first.state.add_task(task)  # the crash comes here, before launch
    first.state.store.close()

    state = StateManager(TaskStore(store_path), liveness)
    state.restore()
    second = Host(state)
    second.engine.resume()
    assert second.queued == ["job.1"]
    assert second.task("job").status is TaskStatus.RUNNING
    state.store.close()


def test_a_child_lost_between_intent_and_creation_is_recreated(
    store_path: Path, liveness: Liveness
) -> None:
    store = TaskStore(store_path)
    first = Host(StateManager(store, liveness))
    first.submit(steps=_subtasks("a", "b"))
    first.run("job.1", {"one": 1})
    store._db.execute("DELETE FROM tasks WHERE id = 'job.2'")  # as if the crash came first
    store.close()

    state = StateManager(TaskStore(store_path), liveness)
    state.restore()
    second = Host(state)
    second.engine.resume()
    assert second.queued == ["job.2"]
    assert second.task("job.2").input == {"input": {"op": "b", "n": 2}, "previous": {"one": 1}}
    state.store.close()


# --- the example ops that demonstrate planner and synthesizer agents ---------------------------


class _Agent:
    async def send(self, payload: protocol.Model) -> None:
        return None


def _ctx(input: Any, description: str = "the description") -> Any:
    from coordinator_agent.agent.worker import TaskContext

    return TaskContext("t-1", 1, description, input, 5.0, _Agent())  # type: ignore[arg-type]


async def test_decompose_op_answers_a_valid_decomposition() -> None:
    from coordinator_agent.agent.examples import example_handler, text_stats

    text = "one two three four five six seven"
    answer = await example_handler(_ctx({"op": "decompose", "text": text, "parts": 3,
                                         "kind": "general"}))
    specs = parse_decomposition("job", answer)
    parts = [s.input["text"] for s in specs]  # type: ignore[index]
    assert parts == ["one two", "three four", "five six seven"]
    assert {s.kind for s in specs} == {"general"}
    assert sum(text_stats(p)["words"] for p in parts) == 7
    tiny = await example_handler(_ctx({"op": "decompose", "parts": 100}, description="a b"))
    assert len(tiny["subtasks"]) == 2
    assert len((await example_handler(_ctx({"op": "decompose", "text": ""})))["subtasks"]) == 1


async def test_synthesize_op_merges_the_fan_in_deterministically() -> None:
    from coordinator_agent.agent.examples import example_handler, text_stats

    results = [ChildResult(i, f"job.{i}", "succeeded", text_stats(t))
               for i, t in enumerate(["a b. a", "b c!", "c"], start=1)]
    results.append(ChildResult(4, "job.4", "failed", None, skipped=True))
    merged = combine(results, source="planner")
    answer = await example_handler(_ctx({"input": {"op": "synthesize"}, "previous": merged}))
    assert answer["parts"] == 3 and answer["indexes"] == [1, 2, 3]
    assert answer["totals"]["words"] == 6 and answer["totals"]["sentences"] == 4
    assert answer["top_words"] == [{"word": "a", "count": 2}, {"word": "b", "count": 2},
                                   {"word": "c", "count": 2}]
    reordered = {**merged, "results": merged["results"][::-1]}
    again = await example_handler(_ctx({"input": {"op": "synthesize"}, "previous": reordered}))
    assert again["totals"] == answer["totals"] and again["top_words"] == answer["top_words"]
    with pytest.raises(ValueError, match="merged results"):
        await example_handler(_ctx({"input": {"op": "synthesize"}, "previous": "junk"}))
    junk = {"results": [1, {"status": "succeeded", "output": {"x": True, "top_words": [3]}}]}
    assert (await example_handler(_ctx({"input": {"op": "synthesize"}, "previous": junk}))
            )["totals"] == {}


async def test_hand_off_ops_use_the_previous_output() -> None:
    import hashlib

    from coordinator_agent.agent.examples import canonical_json, example_handler, text_stats

    previous = {"b": 1, "a": [1, 2]}
    hashed = await example_handler(_ctx({"input": {"op": "hash"}, "previous": previous}))
    assert hashed["sha256"] == hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()
    assert canonical_json(previous) == '{"a":[1,2],"b":1}'
    stats = await example_handler(_ctx({"input": {"op": "stats"}, "previous": "two words"}))
    assert stats == text_stats("two words")
    echoed = await example_handler(_ctx({"input": {"op": "echo"}, "previous": 5}))
    assert echoed == {"input": {"op": "echo"}, "previous": 5}
    plain = await example_handler(_ctx({"op": "hash"}, description="d"))
    assert plain["sha256"] == hashlib.sha256(b"d").hexdigest()
