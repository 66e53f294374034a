"""The conformance kit against the real broker: the Python agent and client pass it, and an agent
or a client that breaks a rule fails exactly that rule (a checker that cannot fail is no check).

The kit plays the coordinator, so no coordinator runs in these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from coordinator_agent.agent.examples import example_handler
from coordinator_agent.agent.worker import TaskContext, WorkerAgent
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.conformance import (
    AgentConformance,
    ClientConformance,
    Harness,
    Report,
    Verdict,
)
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.exceptions import ConfigError
from coordinator_agent.settings import Settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import coordinator_topology

from .conftest import OPERATOR
from .helpers import spawn, subprocess_env

#: The kit judges heartbeat gaps against the interval: at the suite's 0.2 s, a loaded CI machine
#: would fail a healthy agent now and then. One second keeps the run short and the verdict fair.
HEARTBEAT_S = 1.0


def verdicts(report: Report) -> dict[str, Verdict]:
    return {r.rule: r.verdict for r in report.results}


def slower_heartbeat(settings: Settings) -> Settings:
    liveness = settings.liveness.model_copy(update={"heartbeat_interval_s": HEARTBEAT_S})
    return settings.model_copy(update={"liveness": liveness})


async def test_the_python_worker_process_passes_conformance_agent(
    settings: Settings, keyring: Keyring, cleanup_namespace: None, tmp_path: Path,
) -> None:
    assert keyring.get("agent-1") is not None  # the fixture writes the keyring file both read
    env = subprocess_env(slower_heartbeat(settings))
    worker = spawn(["worker", "--id", "agent-1", "--concurrency", "2"], env,
                   tmp_path / "worker.log")
    try:
        kit = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator_agent", "conformance", "agent", "--id", "agent-1",
            "--kind", "general", "--json", env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(kit.communicate(), 180)
        assert out.strip(), err.decode()[-2000:]
        report = json.loads(out)
        # The drain rule has the worker say goodbye and exit on its own.
        await asyncio.wait_for(asyncio.to_thread(worker.wait), 30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    statuses = {r["rule"]: r["status"] for r in report["rules"]}
    assert statuses == dict.fromkeys(statuses, "pass"), (
        report, err.decode()[-2000:])
    assert set(statuses) == {"hello", "heartbeat", "concurrency", "progress", "duplicate",
                             "cancel", "deadline", "forged", "replayed", "expired",
                             "wrong_epoch", "batch", "own_tasks", "drain"}
    assert report["passed"] is True and kit.returncode == 0
    assert worker.returncode == 0


async def stubborn_handler(task: TaskContext) -> Any:
    """The example agent, except that it will not be stopped: a cancel is ignored."""
    inner = asyncio.ensure_future(example_handler(task))
    while True:
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            continue


async def test_an_agent_that_ignores_cancel_fails_the_cancel_rule(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    settings = slower_heartbeat(settings)
    harness = Harness(settings, keyring, "agent-1")
    await harness.start()
    agent = WorkerAgent("agent-1", "general", stubborn_handler, settings=settings,
                        keyring=keyring, max_concurrency=2)
    serving = asyncio.create_task(agent.run())  # as an agent process runs: drain ends it
    try:
        report = await AgentConformance(harness, "agent-1", kind="general", wait_s=10).run()
        await asyncio.wait_for(serving, 10)
    finally:
        if not serving.done():
            agent.request_stop()
            await serving
        await harness.close()
    found = verdicts(report)
    # Ignoring cancellation breaks two rules: cancel, and the time limit (asyncio's too).
    assert found["cancel"] is Verdict.FAIL, report.as_text()
    assert found["deadline"] is Verdict.FAIL, report.as_text()
    assert "in_flight still counted it" in next(
        r.detail for r in report.results if r.rule == "cancel")
    # The rest of what it does right is still seen as right.
    for rule in ("hello", "heartbeat", "concurrency", "progress", "duplicate", "forged",
                 "replayed", "expired", "wrong_epoch", "own_tasks", "drain"):
        assert found[rule] is Verdict.PASS, (rule, report.as_text())
    assert not report.passed


async def careless_handler(task: TaskContext) -> Any:
    """The example agent, except that its progress jumps back, and it reports on a task that
    was never assigned to it (TaskContext is public: nothing stops an agent from lying)."""
    if isinstance(task.input, dict) and task.input.get("op") == "sleep":
        await task.report(0.9, "too early")
        stranger = TaskContext("never-assigned", 1, "", None, 1.0, task._agent)
        await stranger.report(0.5)
    return await example_handler(task)


async def certify(agent: WorkerAgent, settings: Settings, keyring: Keyring
                  ) -> tuple[Any, Harness]:
    """Run the agent conformance kit against the agent; its report and the (closed) harness,
    which keeps what it saw."""
    harness = Harness(settings, keyring, agent.agent_id)
    await harness.start()
    serving = asyncio.create_task(agent.run())
    try:
        report = await AgentConformance(harness, "agent-1", wait_s=10).run()
        await asyncio.wait_for(serving, 10)
    finally:
        if not serving.done():
            agent.request_stop()
            await serving
        await harness.close()
    return report, harness


@contextlib.asynccontextmanager
async def client_kit(settings: Settings, keyring: Keyring, **options: Any
                     ) -> AsyncIterator[tuple[Harness, asyncio.Task[Any]]]:
    """The client conformance kit running in the background for OPERATOR (``options``: its
    own), and its harness, closed on the way out."""
    harness = Harness(settings, keyring, OPERATOR)
    await harness.start()
    try:
        yield harness, asyncio.create_task(ClientConformance(harness, OPERATOR, **options).run())
    finally:
        await harness.close()


async def test_an_agent_that_lies_fails_concurrency_progress_and_own_tasks(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    settings = slower_heartbeat(settings)
    agent = WorkerAgent("agent-1", "general", careless_handler, settings=settings,
                        keyring=keyring, max_concurrency=3)
    agent.max_concurrency = 1  # announces 1, runs up to 3 at once
    report, _ = await certify(agent, settings, keyring)
    found = verdicts(report)
    failed = {rule for rule, verdict in found.items() if verdict is Verdict.FAIL}
    assert failed == {"concurrency", "progress", "own_tasks"}, report.as_text()
    text = report.as_text()
    assert "2 tasks ran at once, max_concurrency is 1" in text
    assert "went backwards" in text and "never-assigned" in text


class EpochBlindAgent(WorkerAgent):
    """An agent that never fences: it acts on a deposed leader's directives."""

    def _fence(self, envelope: protocol.Envelope, directive: protocol.Directive) -> None:
        return None


async def test_an_agent_that_ignores_epochs_fails_wrong_epoch_only(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    settings = slower_heartbeat(settings)
    harness = Harness(settings, keyring, "agent-1")
    await harness.start()
    agent = EpochBlindAgent("agent-1", "general", example_handler, settings=settings,
                            keyring=keyring, max_concurrency=2)
    serving = asyncio.create_task(agent.run())  # the stale drain ends it early
    try:
        report = await AgentConformance(harness, "agent-1", wait_s=10).run()
        await asyncio.wait_for(serving, 10)
    finally:
        if not serving.done():
            agent.request_stop()
            await serving
        await harness.close()
    found = verdicts(report)
    assert found["wrong_epoch"] is Verdict.FAIL, report.as_text()
    detail = next(r.detail for r in report.results if r.rule == "wrong_epoch")
    assert "the epoch-999 assignment ran" in detail and "drained on the stale" in detail
    for rule in ("hello", "heartbeat", "concurrency", "progress", "duplicate", "cancel",
                 "deadline", "forged", "replayed", "expired"):
        assert found[rule] is Verdict.PASS, (rule, report.as_text())


async def test_no_agent_fails_every_rule_and_passes_none_and_others_lose_nothing(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    # Someone else's submission and dead letter wait in the queues the kit reads.
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        await coordinator_topology(settings.name)(channel)
        await (await channel.get_exchange(c.COORDINATOR_EXCHANGE)).publish(
            aio_pika.Message(b"someone's work", headers={c.HEADER_SENDER: OPERATOR}),
            c.tasks_key(settings.name))
        await (await channel.get_exchange(c.dead_letter_exchange(settings.name))).publish(
            aio_pika.Message(b"someone's dead letter", message_id="not-the-kits"), "")
    harness = Harness(settings, keyring, "agent-2")
    await harness.start()
    try:
        report = await AgentConformance(harness, "agent-2", wait_s=1).run()
    finally:
        await harness.close()
    assert not report.passed
    assert {r.verdict for r in report.results} == {Verdict.FAIL}
    assert "never said hello" in report.as_text()
    assert harness.left_alone >= 1
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        for queue in (c.tasks_queue(settings.name), c.dead_letter_queue(settings.name)):
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.message_count == 1, queue


async def test_the_kit_refuses_the_name_of_a_running_coordinator(
    coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring,
) -> None:
    harness = Harness(settings, keyring, "agent-1")
    with pytest.raises(ConfigError, match="is consuming its queues"):
        await harness.start()
    assert coordinator.ready


async def test_the_python_client_passes_conformance_client(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    async with (client_kit(settings, keyring, tasks=2, wait_s=20) as (_, kit),
                CoordinatorClient(settings, keyring, OPERATOR) as client):
        first = await client.submit("one", task_id="conformance-one", input={"n": 1})
        second = await client.submit("two", input=[1, 2])
        outcomes = await asyncio.gather(client.wait(first, 30), client.wait(second, 30))
        report = await asyncio.wait_for(kit, 60)
        notices = list(client.notices)
    assert report.passed, report.as_text()
    assert all(v is Verdict.PASS for v in verdicts(report).values())
    assert [(o.status, o.output) for o in outcomes] == [
        ("succeeded", {"echo": {"n": 1}}), ("succeeded", {"echo": [1, 2]})]
    # It heard the duplicate and the notice about a task it never submitted, and kept the first.
    assert len(notices) >= 5


async def test_the_python_clients_batch_submit_passes_conformance_client(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    async with (client_kit(settings, keyring, tasks=3, wait_s=20) as (harness, kit),
                CoordinatorClient(settings, keyring, OPERATOR) as client):
        ids = await client.submit_many([{"description": f"task {i}", "input": {"n": i}}
                                        for i in range(3)])
        outcomes = await asyncio.gather(*(client.wait(t, 30) for t in ids))
        report = await asyncio.wait_for(kit, 60)
    assert report.passed, report.as_text()
    assert all(v is Verdict.PASS for v in verdicts(report).values())
    assert [(o.status, o.output) for o in outcomes] == [
        ("succeeded", {"echo": {"n": i}}) for i in range(3)]
    # One sealed message carried the three submissions.
    assert [b.types for b in harness.batches] == [("task.submit",) * 3]


async def test_the_submit_command_passes_conformance_client_though_it_leaves_early(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    """`submit --wait` exits once it has the outcome: the kit must not count that against it."""
    async with client_kit(settings, keyring, wait_s=30) as (_, kit):
        submit = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator_agent", "submit", "from the CLI", "--input",
            '{"op": "echo"}', "--wait", "--wait-timeout", "30", "--json",
            "--principal", OPERATOR, env=subprocess_env(settings), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(submit.communicate(), 60)
        report = await asyncio.wait_for(kit, 60)
    assert submit.returncode == 0, err.decode()[-2000:]
    assert json.loads(out)["output"] == {"echo": {"op": "echo"}}
    assert report.passed, report.as_text()


async def test_a_client_without_task_id_or_reply_queue_fails_those_rules(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    async with client_kit(settings, keyring, wait_s=20) as (harness, kit):
        # A hand-made client: no task_id, no reply_to, and sent as transient telemetry would be.
        key = harness.peer_key(OPERATOR)
        body = key.encrypt(orjson.dumps({
            "v": 1, "id": "hand-made-1", "type": "task.submit", "sender": OPERATOR,
            "sent_at": time.time(), "correlation_id": None,
            "payload": {"description": "no way back"}}))
        connection = await aio_pika.connect(settings.broker_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE)
            await exchange.publish(aio_pika.Message(
                body, headers={c.HEADER_SENDER: OPERATOR}, message_id="hand-made-1",
                content_type=c.CONTENT_TYPE), c.tasks_key(settings.name))
        report = await asyncio.wait_for(kit, 60)
    found = verdicts(report)
    assert found["submission"] is Verdict.FAIL  # delivery_mode 1
    assert found["task_id"] is Verdict.FAIL
    assert found["reply_queue"] is Verdict.FAIL
    assert "delivery_mode" in report.as_text() and "no reply_to" in report.as_text()
    assert not report.passed


class BatchDroppingAgent(WorkerAgent):
    """Announces batch:N but acts only on single messages: every batched item is dropped."""

    async def _on_message(self, envelope: protocol.Envelope, message: Any) -> None:
        if message.type == "batch":
            return None
        return await super()._on_message(envelope, message)


async def test_an_agent_that_announces_batches_but_drops_them_fails_the_batch_rule(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    settings = slower_heartbeat(settings)
    agent = BatchDroppingAgent("agent-1", "general", example_handler, settings=settings,
                               keyring=keyring, max_concurrency=2, batch_limit=4)
    report, _ = await certify(agent, settings, keyring)
    found = verdicts(report)
    assert found["batch"] is Verdict.FAIL, report.as_text()
    detail = next(r.detail for r in report.results if r.rule == "batch")
    assert "0 result(s), expected one success" in detail
    for rule in ("hello", "heartbeat", "concurrency", "progress", "duplicate", "cancel",
                 "deadline", "forged", "replayed", "expired", "wrong_epoch", "own_tasks",
                 "drain"):
        assert found[rule] is Verdict.PASS, (rule, report.as_text())


async def test_an_agent_without_batches_gets_not_applicable_for_the_batch_rule(
    settings: Settings, keyring: Keyring, cleanup_namespace: None,
) -> None:
    settings = slower_heartbeat(settings)
    agent = WorkerAgent("agent-1", "general", example_handler, settings=settings,
                        keyring=keyring, max_concurrency=2, batch_limit=1)
    report, harness = await certify(agent, settings, keyring)
    found = verdicts(report)
    assert found.pop("batch") is Verdict.NOT_APPLICABLE, report.as_text()
    assert set(found.values()) == {Verdict.PASS}, report.as_text()
    assert not harness.batches  # and it never sent one
