"""The operator's desk on a real RabbitMQ: cancel (a whole workflow), redirect, and escalation
(retry on a chosen agent, resolve from the CLI, fail with a reason), as clients see it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import EscalationSettings, Settings
from coordinator_agent.wire.keyring import Keyring

from .conftest import OPERATOR, StartWorker
from .helpers import task_is, wait_until
from .test_cli_live import cli
from .test_status_page import by_id, chromium_binary, parse, run_chromium


@pytest.fixture
async def desk_coordinator(settings: Settings, keyring: Keyring, cleanup_namespace: None
                           ) -> AsyncIterator[CoordinatorAgent]:
    tuned = settings.model_copy(update={"escalation": EscalationSettings(
        default="fail", kinds={"general": "desk"}, overdue_after_s=0.5)})
    agent = CoordinatorAgent(tuned, keyring, registry=CollectorRegistry())
    await agent.start()
    yield agent
    await agent.stop()


class Operator:
    """POSTs to the operator API with a bearer token."""

    def __init__(self, coordinator: CoordinatorAgent, keyring: Keyring) -> None:
        token = keyring.principals[OPERATOR].api_token
        assert token is not None
        self.base = f"http://127.0.0.1:{coordinator.monitoring.port}"
        self.headers = {"Authorization": f"Bearer {token.get_secret_value()}"}

    async def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.post(
                self.base + path, json=body or {}, headers=self.headers) as response:
            return response.status, await response.json()

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(self.base + path) as response:
            assert response.status == 200
            return await response.json()


async def test_cancel_a_running_workflow_with_its_children(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring,
) -> None:
    await start_worker("agent-1", max_concurrency=4)
    subtasks = [{"description": f"part {i}", "input": {"op": "sleep", "seconds": 20}}
                for i in range(3)]
    parent = await client.submit("three long parts", subtasks=subtasks)
    await wait_until(lambda: (task := coordinator.state.find_task(parent)) is not None
                     and len(task.child_ids) == 3 and all(
                         task_is(coordinator, c, "running")() for c in task.child_ids),
                     15, "three running children")
    children = coordinator.get_task(parent).child_ids
    operator = Operator(coordinator, keyring)
    code, view = await operator.post(f"/api/tasks/{parent}/cancel", {"reason": "not needed"})
    assert code == 200, view
    assert view["status"] == "cancelled"
    done = await client.wait(parent, 10)
    assert done.status == "cancelled"
    assert done.error == f"cancelled by {OPERATOR}: not needed"
    for child in children:
        task = coordinator.get_task(child)
        assert task.status.value == "cancelled", child
        assert task.attempts[-1].outcome.value == "cancelled"
    # The agent was told: its slots free up well before the 20 s sleeps would end.
    await wait_until(lambda: not coordinator.state.agents["agent-1"].in_flight, 5, "free agent")
    # Cancelling again, or an unknown task, is refused clearly.
    code, body = await operator.post(f"/api/tasks/{parent}/cancel")
    assert code == 409 and "already cancelled" in body["error"]
    assert (await operator.post("/api/tasks/nope/cancel"))[0] == 404
    async with aiohttp.ClientSession() as http, http.post(
            f"{operator.base}/api/tasks/{parent}/cancel") as unauthenticated:
        assert unauthenticated.status == 401


async def test_redirect_a_running_task_to_another_kind_from_the_cli(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring, settings: Settings,
) -> None:
    await start_worker("agent-1", "slow")
    await start_worker("agent-2", "general")
    task_id = await client.submit("take your time", kind="slow", max_retries=0,
                                  input={"op": "sleep", "seconds": 5})
    await wait_until(task_is(coordinator, task_id, "running"), 10, "running on the slow kind")
    code, out, err = await cli(settings, "redirect", task_id, "--kind", "general", "--url",
                               Operator(coordinator, keyring).base, "--principal", OPERATOR,
                               "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "general"
    done = await client.wait(task_id, 15)
    assert done.status == "succeeded"
    assert [(a.agent_id, a.outcome) for a in done.attempts] == [
        ("agent-1", "redirected"), ("agent-2", "succeeded")]  # and it cost no retry
    task = coordinator.get_task(task_id)
    assert task.desk[0]["action"] == "redirected"
    assert task.desk[0]["by"] == OPERATOR


async def test_escalate_retry_on_an_agent_then_resolve_from_the_cli(
    desk_coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring, settings: Settings,
) -> None:
    coordinator = desk_coordinator
    await start_worker("agent-1", "general")
    await start_worker("agent-2", "general")
    task_id = await client.submit("this will not work", kind="general", max_retries=1,
                                  input={"op": "fail", "message": "no luck"})
    escalated = await client.wait(task_id, 20)
    # The client sees it waiting for a person, with the chain of attempts.
    assert escalated.status == "escalated"
    assert [a.outcome for a in escalated.attempts] == ["failed", "failed"]
    assert "no luck" in (escalated.error or "")
    assert coordinator.get_task(task_id).status.value == "escalated"
    operator = Operator(coordinator, keyring)
    listed = await operator.get("/api/escalations")
    assert [t["id"] for t in listed["tasks"]] == [task_id]

    # Retry on a chosen agent: one more attempt, there; it fails, so it escalates again.
    code, view = await operator.post(f"/api/tasks/{task_id}/retry", {"agent_id": "agent-2"})
    assert code == 200, view
    await wait_until(lambda: len(coordinator.get_task(task_id).attempts) == 3
                     and task_is(coordinator, task_id, "escalated")(), 15, "escalated again")
    assert coordinator.get_task(task_id).attempts[-1].agent_id == "agent-2"

    # The overdue gauge (overdue_after_s 0.5 here) and the counters, as Prometheus sees them.
    await asyncio.sleep(0.6)
    async with aiohttp.ClientSession() as http, http.get(
            f"{operator.base}/metrics") as response:
        metrics = await response.text()
    assert "coordinator_escalated_overdue 1.0" in metrics
    assert 'coordinator_desk_actions_total{action="escalated"} 2.0' in metrics
    assert 'coordinator_tasks_active{status="escalated"} 1.0' in metrics

    # Resolve it by hand, from the CLI.
    url = operator.base
    code, out, err = await cli(settings, "escalated", "--url", url)
    assert code == 0, err
    assert task_id in out and "general" in out
    code, out, err = await cli(settings, "resolve", task_id, "--output", '{"fixed": true}',
                               "--url", url, "--principal", OPERATOR, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "succeeded"
    final = await client.wait(task_id, 10)
    assert final.status == "succeeded"
    assert final.output == {"fixed": True}
    code, _, err = await cli(settings, "resolve", task_id, "--output", "x", "--url", url,
                             "--principal", OPERATOR)
    assert code == 1 and "only an escalated task" in err


async def test_fail_an_escalated_task_and_kinds_that_still_fail_as_before(
    desk_coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring, tmp_path: Path,
) -> None:
    coordinator = desk_coordinator
    await start_worker("agent-1", "general")
    await start_worker("agent-2", "other")
    to_desk = await client.submit("fails", kind="general", max_retries=0,
                                  input={"op": "fail"})
    as_before = await client.wait(await client.submit(
        "fails elsewhere", kind="other", max_retries=0, input={"op": "fail"}), 20)
    assert as_before.status == "failed"  # the policy is per kind: "other" fails as before
    assert (await client.wait(to_desk, 20)).status == "escalated"
    operator = Operator(coordinator, keyring)
    code, body = await operator.post(f"/api/tasks/{to_desk}/fail", {})
    assert code == 422, body  # a reason is required
    assert body["problems"][0]["field"] == "reason"
    # The status page shows it at the desk, with its actions.
    chromium_binary()
    dom = parse(await run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom",
                                   operator.base + "/"))
    desk = by_id(dom, "desk")
    rows = {n.attrs.get("data-task-id"): n for n in desk.walk()
            if n.tag == "tr" and n.attrs.get("data-task-id")}
    assert set(rows) == {to_desk}, desk.text()
    assert [n.text() for n in rows[to_desk].walk() if n.tag == "button"] == [
        "Retry", "Resolve", "Fail"]
    assert "asked to fail" in rows[to_desk].text()
    code, view = await operator.post(f"/api/tasks/{to_desk}/fail", {"reason": "not fixable"})
    assert code == 200, view
    final = await client.wait(to_desk, 10, final=True)
    assert final.status == "failed"
    assert final.error == f"failed by {OPERATOR}: not fixable"


async def evaluate_in_chromium(tmp_path: Path, url: str, expression: str) -> Any:
    """Open ``url`` in headless Chromium and run ``expression`` there (DevTools protocol)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={tmp_path / 'chromium-cdp'}", f"--remote-debugging-port={port}",
        url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    try:
        async with aiohttp.ClientSession() as http:
            page = None
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                        pages = [t for t in await response.json() if t.get("type") == "page"]
                        if pages:
                            page = pages[0]
                            break
                await asyncio.sleep(0.1)
            assert page is not None, "chromium's DevTools endpoint never answered"
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                # Until the page has loaded, its context may be replaced under the call: retry.
                for call in range(1, 51):
                    await ws.send_json({"id": call, "method": "Runtime.evaluate", "params": {
                        "expression": expression, "awaitPromise": True,
                        "returnByValue": True}})
                    async with asyncio.timeout(60):
                        message = await ws.receive_json()
                        while message.get("id") != call:
                            message = await ws.receive_json()
                    if "result" in message:
                        return message["result"]["result"].get("value")
                    await asyncio.sleep(0.2)
                raise AssertionError(f"chromium could not run the script: {message}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def test_resolve_an_escalated_task_from_the_status_page(
    desk_coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring, tmp_path: Path,
) -> None:
    await start_worker("agent-1", "general")
    task_id = await client.submit("fails", kind="general", max_retries=0, input={"op": "fail"})
    assert (await client.wait(task_id, 20)).status == "escalated"
    token = keyring.principals[OPERATOR].api_token
    assert token is not None
    # What an operator does: paste the token, type the output, press Resolve.
    script = """(async () => {
      const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
      for (let i = 0; i < 200; i++) {
        const row = document.querySelector('#desk tr[data-task-id="TASK"]');
        if (row) {
          document.getElementById("desk-token").value = "TOKEN";
          row.querySelectorAll("td.act input")[1].value = '{"fixed": "from the page"}';
          [...row.querySelectorAll("button")].find((b) => b.textContent === "Resolve").click();
          for (let j = 0; j < 200; j++) {
            const said = document.getElementById("desk-result").textContent;
            if (said) return said;
            await sleep(50);
          }
          return "no answer";
        }
        await sleep(50);
      }
      return "no row";
    })()""".replace("TASK", task_id).replace("TOKEN", token.get_secret_value())
    base = f"http://127.0.0.1:{desk_coordinator.monitoring.port}/"
    said = await evaluate_in_chromium(tmp_path, base, script)
    assert said == f"resolve {task_id}: now succeeded", said
    final = await client.wait(task_id, 10, final=True)
    assert final.status == "succeeded"
    assert final.output == {"fixed": "from the page"}
    assert desk_coordinator.get_task(task_id).desk[-1]["by"] == OPERATOR


async def test_a_desk_action_the_store_refuses_answers_503_and_changes_nothing(
    desk_coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring,
) -> None:
    coordinator = desk_coordinator
    await start_worker("agent-1", "general")
    task_id = await client.submit("fails", kind="general", max_retries=0, input={"op": "fail"})
    assert (await client.wait(task_id, 20)).status == "escalated"
    operator = Operator(coordinator, keyring)
    store = coordinator.state.store
    # A real SQLite failure, as on a full disk: the file may not grow by a page.
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        code, body = await operator.post(f"/api/tasks/{task_id}/resolve",
                                         {"output": {"blob": "x" * 20_000}})
        assert code == 503, body
        assert "not writable" in body["error"]
        assert coordinator.get_task(task_id).status.value == "escalated"
    finally:
        store._db.execute("PRAGMA max_page_count = 1073741823")
    code, view = await operator.post(f"/api/tasks/{task_id}/resolve", {"output": {"ok": True}})
    assert code == 200, view
    final = await client.wait(task_id, 10, final=True)
    assert final.status == "succeeded" and final.output == {"ok": True}
