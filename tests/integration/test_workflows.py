"""Composite tasks on a real RabbitMQ with real SDK agents: fan-out under each error policy,
a chain of hand-offs, a planner and a synthesizer, a coalition, and a coordinator killed
mid-fan-out."""

from __future__ import annotations

import hashlib
import signal
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from coordinator_agent.agent.examples import (
    canonical_json,
    decompose,
    example_handler,
    synthesize,
    text_stats,
)
from coordinator_agent.agent.worker import TaskContext
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.coordinator.tasks import TaskStatus
from coordinator_agent.settings import Settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol

from .conftest import StartWorker
from .helpers import spawn, subprocess_env, wait_until

TEXTS = ["The first part. It is short!", "A second text, with more words than the first one.",
         "Third."]


async def submit(client: CoordinatorClient, **fields: Any) -> str:
    """task.submit with any fields (the client's ``submit`` covers the ordinary ones only)."""
    task_id = fields.pop("task_id", None) or uuid.uuid4().hex
    spec = protocol.TaskSubmit(task_id=task_id, reply_to=client.reply_queue, **fields)
    await client.messages.publish(spec, peer=client.coordinator_id,
                                  exchange=c.COORDINATOR_EXCHANGE,
                                  routing_key=c.tasks_key(client.coordinator_id))
    return task_id


def stats_subtask(text: str) -> dict[str, Any]:
    return {"description": "text statistics", "input": {"op": "stats", "text": text}}


FAILING = {"description": "this one fails", "input": {"op": "fail", "message": "boom"}}
SLOW = {"description": "slow", "input": {"op": "sleep", "seconds": 5}}


async def two_agents(coordinator: CoordinatorAgent, start_worker: StartWorker) -> None:
    await start_worker("agent-1")
    await start_worker("agent-2")
    await wait_until(lambda: coordinator.state.count_by_liveness()["healthy"] == 2, 5, "agents")


async def test_fan_out_skip_merges_what_succeeded(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await two_agents(coordinator, start_worker)
    task_id = await submit(client, description="three parts, one bad", max_retries=0,
                           subtasks=[stats_subtask(TEXTS[0]), FAILING, stats_subtask(TEXTS[2])],
                           on_subtask_error="skip")
    result = await client.wait(task_id, 20)

    assert result.status == "succeeded", result.error
    assert client.accepted[task_id].status == "running"
    assert isinstance(result.output, dict)
    results = result.output["results"]
    assert [(r["index"], r["task_id"], r["status"]) for r in results] == [
        (1, f"{task_id}.1", "succeeded"), (2, f"{task_id}.2", "failed"),
        (3, f"{task_id}.3", "succeeded")]
    assert results[0]["output"] == text_stats(TEXTS[0])
    assert results[2]["output"] == text_stats(TEXTS[2])
    assert results[1]["output"] is None
    skipped = result.output["provenance"]["skipped"]
    assert [(s["index"], s["task_id"]) for s in skipped] == [(2, f"{task_id}.2")]
    assert "boom" in skipped[0]["error"]
    assert {ch["agent_id"] for ch in result.output["provenance"]["children"]} <= {
        "agent-1", "agent-2"}
    assert result.attempts == []  # the parent itself never ran on an agent


async def test_fan_out_fail_cancels_the_siblings(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await two_agents(coordinator, start_worker)
    task_id = await submit(client, description="one bad apple", max_retries=0,
                           subtasks=[SLOW, FAILING, SLOW, stats_subtask(TEXTS[0])],
                           max_concurrency=3, on_subtask_error="fail")
    result = await client.wait(task_id, 20)

    assert result.status == "failed"
    assert (result.error or "").startswith(f"sub-task 2 ({task_id}.2) failed: RuntimeError: boom")
    for sibling in (f"{task_id}.1", f"{task_id}.3"):
        task = coordinator.state.find_task(sibling)
        assert task is not None and task.status is TaskStatus.CANCELLED, sibling
        assert task.attempts[-1].outcome.value == "cancelled"
    assert coordinator.state.find_task(f"{task_id}.4") is None  # never started
    parent = coordinator.state.get_task(task_id)
    assert [ch["status"] for ch in parent.public_view()["workflow"]["children"]] == [
        "cancelled", "failed", "cancelled", "cancelled"]
    # The agents were told: the slow siblings stop well before their 5 s.
    await wait_until(lambda: coordinator.state.agents["agent-1"].in_flight == set()
                     and coordinator.state.agents["agent-2"].in_flight == set(), 3, "idle")


async def test_fan_out_retry_resubmits_then_fails(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await two_agents(coordinator, start_worker)
    task_id = await submit(client, description="keeps failing", max_retries=1,
                           subtasks=[stats_subtask(TEXTS[0]), FAILING],
                           on_subtask_error="retry", subtask_retries=2)
    result = await client.wait(task_id, 30)

    assert result.status == "failed"
    runs = [f"{task_id}.2", f"{task_id}.2-r2", f"{task_id}.2-r3"]
    assert (result.error or "").startswith(
        f"sub-task 2 ({runs[-1]}) failed after 3 runs ({', '.join(runs)}): RuntimeError: boom")
    for run in runs:  # each run had its own attempts (max_retries=1: two each)
        task = coordinator.state.find_task(run)
        assert task is not None and task.status is TaskStatus.FAILED
        assert [a.outcome.value for a in task.attempts] == ["failed", "failed"]
    first = coordinator.state.find_task(f"{task_id}.1")
    assert first is not None and first.status is TaskStatus.SUCCEEDED


async def test_fan_out_retry_merges_a_resubmission_that_succeeds(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    seen: dict[str, int] = defaultdict(int)

    async def flaky(task: TaskContext) -> Any:
        seen[task.description] += 1
        if task.description == "flaky" and seen[task.description] == 1:
            raise RuntimeError("first time unlucky")
        return await example_handler(task)

    await start_worker("agent-1", handler=flaky)
    await wait_until(lambda: "agent-1" in coordinator.state.agents, 5, "agent")
    task_id = await submit(client, description="flaky fan-out", max_retries=0,
                           subtasks=[stats_subtask(TEXTS[0]),
                                     {**stats_subtask(TEXTS[1]), "description": "flaky"}],
                           on_subtask_error="retry")
    result = await client.wait(task_id, 20)

    assert result.status == "succeeded", result.error
    assert isinstance(result.output, dict)
    second = result.output["results"][1]
    assert (second["task_id"], second["output"]) == (f"{task_id}.2-r2", text_stats(TEXTS[1]))
    assert result.output["provenance"]["children"][1]["runs"] == [f"{task_id}.2",
                                                                  f"{task_id}.2-r2"]


async def test_three_steps_hand_their_outputs_along(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await start_worker("agent-1", "analyst", capabilities=["text"])
    await start_worker("agent-2", "crypto", capabilities=["hash"])
    await start_worker("agent-3", "reporter")
    await wait_until(lambda: len(coordinator.state.agents) == 3, 5, "agents")
    task_id = await submit(client, description="analyse, digest, report", steps=[
        {"description": "analyse", "required_capabilities": ["text"],
         "input": {"op": "stats", "text": TEXTS[1]}},
        {"description": "digest the analysis", "kind": "crypto", "input": {"op": "hash"}},
        {"description": "report", "kind": "reporter", "input": {"op": "echo"}},
    ])
    result = await client.wait(task_id, 20)

    assert result.status == "succeeded", result.error
    assert isinstance(result.output, dict)
    digest = hashlib.sha256(canonical_json(text_stats(TEXTS[1])).encode()).hexdigest()
    assert result.output["output"] == {"input": {"op": "echo"},
                                       "previous": {"sha256": digest, "rounds": 1}}
    assert [(s["index"], s["task_id"], s["kind"], s["agent_id"], s["status"])
            for s in result.output["steps"]] == [
        (1, f"{task_id}.1", "analyst", "agent-1", "succeeded"),
        (2, f"{task_id}.2", "crypto", "agent-2", "succeeded"),
        (3, f"{task_id}.3", "reporter", "agent-3", "succeeded")]


async def test_planner_decomposes_and_synthesizer_merges(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await start_worker("agent-1", "planner")
    await start_worker("agent-2", "synthesizer")
    await start_worker("agent-3", "general")
    await wait_until(lambda: len(coordinator.state.agents) == 3, 5, "agents")
    text = " ".join(TEXTS)
    task_id = await submit(client, description="count the words of a long text",
                           decompose=True, merge="synthesizer", merge_input={"op": "synthesize"},
                           input={"op": "decompose", "text": text, "parts": 3, "kind": "general"},
                           max_concurrency=2)
    result = await client.wait(task_id, 20)

    assert result.status == "succeeded", result.error
    parts = [s["input"]["text"] for s in decompose(text, 3)["subtasks"]]
    expected = synthesize({"results": [
        {"index": i, "status": "succeeded", "output": text_stats(part)}
        for i, part in enumerate(parts, start=1)]})
    assert result.output == expected
    assert isinstance(result.output, dict)
    assert result.output["totals"]["words"] == text_stats(text)["words"]
    assert result.output["parts"] == 3
    runners = {t: coordinator.state.get_task(t).attempts[-1].agent_id
               for t in (f"{task_id}.plan", f"{task_id}.1", f"{task_id}.2", f"{task_id}.3",
                         f"{task_id}.merge")}
    assert runners == {f"{task_id}.plan": "agent-1", f"{task_id}.1": "agent-3",
                       f"{task_id}.2": "agent-3", f"{task_id}.3": "agent-3",
                       f"{task_id}.merge": "agent-2"}


async def test_coalition_of_two_agents_with_disjoint_capabilities(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient
) -> None:
    await start_worker("agent-1", capabilities=["text"])
    await start_worker("agent-2", capabilities=["hash"])
    await wait_until(lambda: coordinator.state.count_by_liveness()["healthy"] == 2, 5, "agents")
    task_id = await client.submit("needs both", required_capabilities=["text", "hash"],
                                  input={"op": "stats", "text": TEXTS[0]})
    result = await client.wait(task_id, 20)

    assert result.status == "succeeded", result.error
    assert isinstance(result.output, dict)
    assert [r["output"] for r in result.output["results"]] == [text_stats(TEXTS[0])] * 2
    provenance = result.output["provenance"]
    assert provenance["source"] == "coalition"
    assert sorted((m["agent_id"], m["capabilities"]) for m in provenance["coalition"]) == [
        ("agent-1", ["text"]), ("agent-2", ["hash"])]
    ran_on = {ch["task_id"]: ch["agent_id"] for ch in provenance["children"]}
    for child_id, agent_id in ran_on.items():
        child = coordinator.state.get_task(child_id)
        assert child.required_capabilities == (["text"] if agent_id == "agent-1" else ["hash"])
    assert sorted(ran_on.values()) == ["agent-1", "agent-2"]


async def test_coordinator_killed_mid_fan_out_still_completes_the_parent(
    settings: Settings, start_worker: StartWorker, client: CoordinatorClient,
    cleanup_namespace: None, tmp_path: Path,
) -> None:
    env = subprocess_env(settings, COORDINATOR_MONITORING_PORT="0")
    log = tmp_path / "coordinator.log"
    first = spawn(["run"], env, log)
    restarted = None
    try:
        workers = [await start_worker("agent-1", max_concurrency=2),
                   await start_worker("agent-2", max_concurrency=2)]
        subtasks = [{"description": f"part {i}", "input": {"op": "sleep", "seconds": 0.5}}
                    for i in range(8)]
        task_id = await submit(client, description="eight slow parts", subtasks=subtasks,
                               max_concurrency=3)
        await wait_until(lambda: sum(w.completed for w in workers) >= 2, 30,
                         "some sub-tasks done")
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert task_id not in client.completed, "the crash should come mid-fan-out"

        restarted = spawn(["run"], env, log)
        result = await client.wait(task_id, 60)
    finally:
        for process in (first, restarted):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(20)

    assert result.status == "succeeded", result.error
    assert isinstance(result.output, dict)
    assert [(r["index"], r["task_id"], r["status"], r["output"])
            for r in result.output["results"]] == [
        (i, f"{task_id}.{i}", "succeeded", {"slept_s": 0.5}) for i in range(1, 9)]
    assert all(n == result for n in client.notices if n.task_id == task_id)
