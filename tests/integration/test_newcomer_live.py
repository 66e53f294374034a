"""A newcomer's rough edges on a live system: the API, the CLI and the client against a real
coordinator on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from pathlib import Path

import aio_pika
import aiohttp
import aiormq
import pytest

from coordinator_agent.agent.examples import example_handler
from coordinator_agent.agent.worker import WorkerAgent
from coordinator_agent.cli import demo
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.exceptions import SubmissionTooLarge, WaitTimeout
from coordinator_agent.settings import Settings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring

from .conftest import OPERATOR, StartWorker
from .helpers import spawn, subprocess_env, task_is, wait_until
from .test_cli_live import cli


def base(coordinator: CoordinatorAgent) -> str:
    return f"http://127.0.0.1:{coordinator.monitoring.port}"


def auth_failures(coordinator: CoordinatorAgent, reason: str) -> float:
    value = coordinator.metrics.registry.get_sample_value(
        "coordinator_api_auth_failures_total", {"reason": reason})
    return value or 0.0


async def test_a_wrong_token_is_invalid_not_missing_and_is_logged_without_it_and_counted(
    coordinator: CoordinatorAgent, caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "not-the-operators-token-3f9a1c"
    task = {"description": "Count the words"}
    caplog.set_level(logging.INFO)
    async with aiohttp.ClientSession() as session:
        async with session.post(base(coordinator) + "/api/tasks", json=task) as response:
            assert response.status == 401
            assert "required" in (await response.json())["error"]
        async with session.post(base(coordinator) + "/api/tasks", json=task,
                                headers={"Authorization": f"Bearer {wrong}"}) as response:
            assert response.status == 401
            error = (await response.json())["error"]
    assert error.startswith("invalid token") and "missing" not in error
    assert auth_failures(coordinator, "invalid") == 1
    assert auth_failures(coordinator, "missing") == 1
    refused = [r.getMessage() for r in caplog.records if "refused POST /api/tasks" in
               r.getMessage()]
    assert any("invalid bearer token" in line for line in refused), refused
    assert wrong not in caplog.text
    async with aiohttp.ClientSession() as session, session.get(
            base(coordinator) + "/metrics") as response:
        assert 'coordinator_api_auth_failures_total{reason="invalid"} 1.0' in (
            await response.text())


async def test_agent_metrics_are_shown_by_the_api(
    coordinator: CoordinatorAgent, start_worker: StartWorker,
) -> None:
    worker = await start_worker("agent-1", "general")
    await worker.send(protocol.AgentMetrics(values={"cpu_percent": 12.5, "queue_depth": 3}))
    await wait_until(lambda: bool(coordinator.state.agents.get("agent-1")
                                  and coordinator.state.agents["agent-1"].metrics), 10,
                     "the agent's metrics to arrive")
    async with aiohttp.ClientSession() as session, session.get(
            base(coordinator) + "/api/agents") as response:
        agents = {a["id"]: a for a in (await response.json())["agents"]}
    assert agents["agent-1"]["metrics"] == {"cpu_percent": 12.5, "queue_depth": 3.0}


async def test_an_operator_drains_an_agent_over_http_and_from_the_command_line(
    coordinator: CoordinatorAgent, settings: Settings, keyring: Keyring, tmp_path: Path,
) -> None:
    # An SDK agent serving with run(), and the CLI's example agent in a process of its own.
    sdk = WorkerAgent("agent-1", "general", example_handler, settings=settings, keyring=keyring)
    serving = asyncio.create_task(sdk.run())
    process = spawn(["worker", "--id", "agent-2", "--kind", "general"],
                    subprocess_env(settings), tmp_path / "agent-2.log")
    try:
        await wait_until(lambda: {"agent-1", "agent-2"} <= set(coordinator.state.agents), 30,
                         "both agents to say hello")
        operator = keyring.get(OPERATOR)
        assert operator is not None and operator.api_token is not None
        token = {"Authorization": f"Bearer {operator.api_token.get_secret_value()}"}
        async with aiohttp.ClientSession() as session:
            url = base(coordinator) + "/api/agents/{}/drain"
            async with session.post(url.format("agent-1")) as response:
                assert response.status == 401
            async with session.post(url.format("nobody"), headers=token) as response:
                assert response.status == 404
                assert (await response.json())["error"] == "no such agent"
            async with session.post(url.format("agent-1"), headers=token,
                                    json={"reason": 42}) as response:
                assert response.status == 422
            async with session.post(url.format("agent-1"), headers=token,
                                    json={"reason": "maintenance"}) as response:
                assert response.status == 202, await response.text()
                assert (await response.json())["agent_id"] == "agent-1"
        # No new work from the moment it is asked; then the agent drains and says goodbye.
        assert not coordinator.state.agents["agent-1"].assignable
        await asyncio.wait_for(serving, 15)
        await wait_until(lambda: coordinator.state.agents["agent-1"].liveness.value == "left",
                         15, "agent-1 to say goodbye")

        code, out, err = await cli(settings, "drain", "agent-2", "--reason", "upgrade",
                                   "--json", "--url", base(coordinator), "--principal", OPERATOR)
        assert code == 0, err
        assert json.loads(out)["agent_id"] == "agent-2"
        assert await asyncio.to_thread(process.wait, 30) == 0, "the worker process drains, exits"
        await wait_until(lambda: coordinator.state.agents["agent-2"].liveness.value == "left",
                         15, "agent-2 to say goodbye")
        async with aiohttp.ClientSession() as session, session.post(
                url.format("agent-2"), headers=token) as response:
            assert response.status == 409  # it has left: nothing to drain
        code, _, err = await cli(settings, "drain", "ghost", "--url", base(coordinator),
                                 "--principal", OPERATOR)
        assert code == 1 and "HTTP 404 (no such agent)" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if not serving.done():
            sdk.request_stop()
            await serving


async def test_a_task_for_an_unknown_kind_says_why_it_waits(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings,
) -> None:
    await start_worker("agent-1", "general")
    task_id = await client.submit("Scan for secrets", kind="nosuchkind", timeout_s=300)
    await wait_until(lambda: task_id in coordinator.state.tasks, 10, "the task to be accepted")
    async with aiohttp.ClientSession() as session:
        async with session.get(base(coordinator) + f"/api/tasks/{task_id}") as response:
            view = await response.json()
        async with session.get(base(coordinator) + "/api/tasks?limit=5") as response:
            listed = {t["id"]: t for t in (await response.json())["tasks"]}
    assert view["status"] == "pending"
    assert view["waiting"]["reason"] == "no_matching_agent"
    assert view["waiting"]["text"].startswith("no agent of kind 'nosuchkind' is known")
    assert listed[task_id]["waiting"]["reason"] == "no_matching_agent"

    code, out, err = await cli(settings, "route", "Scan for secrets", "--kind", "nosuchkind",
                               "--url", base(coordinator))
    assert code == 1, (out, err)
    assert "no known agent can take it" in out and "no_matching_agent" not in out
    code, out, _ = await cli(settings, "route", "Scan for secrets", "--kind", "nosuchkind",
                             "--json", "--url", base(coordinator))
    assert code == 1 and json.loads(out)["reason"] == "no_matching_agent"
    code, _, _ = await cli(settings, "route", "Count words", "--url", base(coordinator))
    assert code == 0


async def test_submit_wait_timeout_names_the_task_and_prints_json(
    coordinator: CoordinatorAgent, settings: Settings,
) -> None:
    code, out, err = await cli(settings, "submit", "nobody can run this", "--kind", "nosuchkind",
                               "--wait", "--wait-timeout", "1.5", "--json",
                               "--principal", OPERATOR)
    assert code == 3, err
    answer = json.loads(out)
    assert answer["timed_out"] is True and answer["status"] in ("accepted", "submitted")
    task_id = answer["task_id"]
    assert task_id in coordinator.state.tasks
    assert f"no result for task {task_id} within 1.5s" in err
    assert f"GET /api/tasks/{task_id}" in err and "/ID" not in err


async def test_submit_refuses_an_oversized_task_before_sending_it(
    coordinator: CoordinatorAgent, settings: Settings,
) -> None:
    before = coordinator.state.totals["submitted"]
    code, out, err = await cli(settings, "submit", "too big", "--input",
                               json.dumps({"data": "z" * 5000}), "--principal", OPERATOR,
                               extra_env={"COORDINATOR_LIMITS__MAX_MESSAGE_BYTES": "2048"})
    assert code == 2 and out == ""
    assert err.startswith("coordinator-agent: task is ") and "over the limit of 2048 bytes" in err
    assert "limits.max_message_bytes" in err and "configuration error" not in err
    await asyncio.sleep(0.5)
    assert coordinator.state.totals["submitted"] == before


async def test_the_client_refuses_oversized_input_and_wait_names_the_task(
    coordinator: CoordinatorAgent, client: CoordinatorClient, settings: Settings,
) -> None:
    limit = settings.limits.max_message_bytes
    before = coordinator.state.totals["submitted"]
    with pytest.raises(SubmissionTooLarge) as info:
        await client.submit("Count the words", input="x" * (2 * 1024 * 1024))
    assert info.value.limit == limit and str(limit) in str(info.value)
    assert info.value.size > limit
    # Just under the limit goes through: the check counts what the coordinator counts.
    fits = await client.submit("Count the words", input="y" * (limit // 2), kind="nosuchkind")
    await wait_until(lambda: fits in coordinator.state.tasks, 10, "the task that fits")
    assert coordinator.state.totals["submitted"] == before + 1
    with pytest.raises(WaitTimeout) as waited:
        await client.wait(fits, 0.3)
    assert isinstance(waited.value, TimeoutError)  # existing `except TimeoutError` still works
    assert waited.value.task_id == fits and fits in str(waited.value)


@pytest.mark.parametrize("command", [["run"], ["demo", "--forever", "--agents", "1"]],
                         ids=["run", "make-run"])
async def test_a_taken_monitoring_port_is_one_line_naming_the_port_and_the_option(
    settings: Settings, keyring: Keyring, cleanup_namespace: None, command: list[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator_agent", *command, "--monitoring-port", str(port),
            env=subprocess_env(settings, COORDINATOR_LOG_LEVEL="WARNING"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    assert process.returncode == 2, text
    assert text.strip().splitlines() == [
        f"coordinator-agent: configuration error: monitoring port {port} on 127.0.0.1 is "
        "already in use (is another coordinator running?): choose another with "
        "--monitoring-port or COORDINATOR_MONITORING_PORT (0 picks a free one)"
    ], text
    assert out == b""


async def test_a_closed_client_deletes_its_reply_queue_and_its_result_stays_in_the_api(
    settings: Settings, keyring: Keyring, coordinator: CoordinatorAgent,
    start_worker: StartWorker,
) -> None:
    await start_worker("agent-1", "general", capabilities=["sleep"])
    client = CoordinatorClient(settings, keyring, OPERATOR)
    await client.start()
    task_id = await client.submit("Wait a moment", required_capabilities=["sleep"],
                                  input={"op": "sleep", "seconds": 1.0})
    await wait_until(task_is(coordinator, task_id, "running"), 10, "the task to run")
    await client.close()
    assert client.messages.consumer_cancels == 0  # it cancelled its own consumer first
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(client.reply_queue, passive=True)
    # The result had nowhere to go: the coordinator keeps it, for the API.
    await wait_until(task_is(coordinator, task_id, "succeeded"), 15, "the task to succeed")
    await wait_until(lambda: getattr(coordinator.state.find_task(task_id), "notified", False),
                     10, "the coordinator to settle the notice")
    operator = keyring.get(OPERATOR)
    assert operator is not None and operator.api_token is not None
    token = {"Authorization": f"Bearer {operator.api_token.get_secret_value()}"}
    async with aiohttp.ClientSession() as http, http.get(
            f"{base(coordinator)}/api/tasks/{task_id}", headers=token) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "succeeded"


async def test_a_one_shot_demo_deletes_its_client_reply_queue(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # The demo names its own coordinator, keyring and client; record the client it makes so
    # the real broker can be asked, afterwards, for that client's reply queue.
    made: list[CoordinatorClient] = []

    class Recorded(CoordinatorClient):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(demo, "CoordinatorClient", Recorded)
    try:
        code = await demo.run_demo(settings, agents=1, tasks=3, as_json=True, forever=False,
                                   rate=1.0)
        assert code == 0, capsys.readouterr()
        assert json.loads(capsys.readouterr().out)["succeeded"] == 3
        assert len(made) == 1 and made[0].reply_queue.startswith("ca.client.demo-operator.")
        connection = await aio_pika.connect(settings.broker_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(made[0].reply_queue, passive=True)
    finally:  # the old behaviour left it for its expiry: do not leave it on the shared broker
        if made:
            connection = await aio_pika.connect(settings.broker_url.get_secret_value())
            async with connection:
                await (await connection.channel()).queue_delete(made[0].reply_queue)
