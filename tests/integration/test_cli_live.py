"""The read commands of the CLI against a live coordinator, as separate processes."""

from __future__ import annotations

import asyncio
import json
import sys

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings

from .conftest import OPERATOR, StartWorker
from .helpers import subprocess_env

HOSTILE = "\x1b[2J<b>bold</b>\nsecond line"


async def cli(settings: Settings, *args: str, timeout: float = 60,
              extra_env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m coordinator_agent ARGS` without blocking the coordinator's event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator_agent", *args,
        env=subprocess_env(settings, COORDINATOR_LOG_LEVEL="WARNING", **(extra_env or {})),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"coordinator-agent {' '.join(args)} ran over {timeout}s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_agents_status_and_watch_show_the_live_system(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings,
) -> None:
    await start_worker("agent-1", "general", capabilities=["text"])
    await start_worker("agent-2", "hasher", capabilities=["hash"])
    ok = await client.submit("Count the words in this sentence", kind="general")
    hostile = await client.submit(HOSTILE, kind="hasher", input={"op": "hash", "data": "x"})
    failed = await client.submit("fail on purpose", kind="general", max_retries=0,
                                 input={"op": "fail", "message": "asked to"})
    for task_id, expected in ((ok, "succeeded"), (hostile, "succeeded"), (failed, "failed")):
        assert (await client.wait(task_id, 30)).status == expected
    url = f"http://127.0.0.1:{coordinator.monitoring.port}"

    code, out, err = await cli(settings, "agents", "--json", "--url", url)
    assert code == 0, err
    agents = {a["id"]: a for a in json.loads(out)}
    assert set(agents) == {"agent-1", "agent-2"}
    assert agents["agent-2"]["kind"] == "hasher"
    assert all(a["liveness"] == "healthy" for a in agents.values())

    code, out, err = await cli(settings, "agents", "--url", url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "LIVENESS", "SIGNALS"]
    assert [line.split()[0] for line in lines[1:]] == ["agent-1", "agent-2"]
    assert "healthy" in lines[1] and lines[1].endswith(" 1/1")  # done/failed
    assert lines[2].endswith(" 1/0")

    code, out, err = await cli(settings, "status", "--url", url)
    assert code == 0, err
    assert out.startswith(f"coordinator  {settings.name} · ready · broker up · up ")
    assert "2 healthy" in out
    assert "3 submitted · 2 succeeded · 1 failed" in out

    code, out, err = await cli(settings, "status", "--json", "--url", url)
    assert code == 0, err
    assert json.loads(out)["totals"] == coordinator.status_view()["totals"]

    code, out, err = await cli(settings, "watch", "--once", "--url", url)
    assert code == 0, err
    assert "\x1b" not in out, "no terminal escapes when stdout is not a terminal"
    assert f"{settings.name} · ready" in out and "AGENTS (2)" in out
    assert "LATEST TASKS (3)" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "agent-1" in rows and "agent-2" in rows
    assert rows[ok].split()[1] == "succeeded" and rows[failed].split()[1] == "failed"
    assert rows[hostile].split()[1] == "succeeded"
    assert "\\x1b[2J<b>bold</b>\\nsecond line" in rows[hostile]
    assert "(least_loaded)" in rows[ok] or "conf" in rows[ok]

    code, out, err = await cli(settings, "watch", "--once", "--json", "--tasks", "2",
                               "--url", url)
    assert code == 0, err
    frame = json.loads(out)
    assert frame["status"]["name"] == settings.name
    assert {a["id"] for a in frame["agents"]} == {"agent-1", "agent-2"}
    assert len(frame["tasks"]) == 2 and frame["rates"] is None


async def test_submit_wait_from_the_command_line(
    coordinator: CoordinatorAgent, start_worker: StartWorker, settings: Settings,
) -> None:
    await start_worker("agent-1", "general", capabilities=["text"])
    code, out, err = await cli(settings, "submit", "Count these four words", "--wait",
                               "--principal", OPERATOR, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "succeeded" and result["output"]["words"] == 4
    assert "waiting for" not in err, "no spinner when stderr is not a terminal"

    code, out, err = await cli(settings, "submit", "fail", "--input", '{"op": "fail"}',
                               "--wait", "--principal", OPERATOR)
    assert code == 1
    assert ": failed" in out.splitlines()[0] and "error: " in out


async def test_fan_out_and_steps_from_the_command_line(
    coordinator: CoordinatorAgent, start_worker: StartWorker, settings: Settings,
) -> None:
    await start_worker("agent-1", "general")
    await start_worker("agent-2", "general")
    code, out, err = await cli(settings, "submit", "three counts", "--subtask", "one two",
                               "--subtask", "three four five", "--subtask", "six",
                               "--wait", "--json", "--principal", OPERATOR)
    assert code == 0, err
    merged = json.loads(out)["output"]
    assert [r["output"]["words"] for r in merged["results"]] == [2, 3, 1]

    code, out, err = await cli(settings, "submit", "chain", "--step", "alpha beta",
                               "--step", "gamma", "--wait", "--json", "--principal", OPERATOR)
    assert code == 0, err
    chained = json.loads(out)["output"]
    assert [s["status"] for s in chained["steps"]] == ["succeeded", "succeeded"]

    spec = {"steps": [{"description": "alpha beta"},
                      {"description": "digest of step 1", "input": {"op": "hash"}}],
            "max_retries": 0}
    code, out, err = await cli(settings, "submit", "chain", "--spec", json.dumps(spec),
                               "--wait", "--json", "--principal", OPERATOR)
    assert code == 0, err
    assert len(json.loads(out)["output"]["steps"]) == 2

    code, out, err = await cli(settings, "submit", "bad", "--subtask", "a", "--step", "b",
                               "--principal", OPERATOR)
    assert code != 0 and "mutually exclusive" in err
