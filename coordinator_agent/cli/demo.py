"""``coordinator-agent demo``: a coordinator, agent processes and real tasks, then a summary.

Keys are generated at run time. A one-shot demo uses its own temporary keyring, store and
coordinator name so it never disturbs a running deployment; ``--forever`` (``make run``) uses
the configured ones and keeps a steady trickle of tasks going until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from coordinator_agent.cli.progress import ProgressBar
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace

log = logging.getLogger(__name__)

OPERATOR = "demo-operator"
#: Agents of several kinds, so the router's choices show; every example agent can run every op.
AGENT_PROFILES = [
    ("development", "text,hash,sleep"),
    ("security", "text,hash,sleep"),
    ("cicd", "text,hash,sleep"),
    ("general", "text,hash,sleep"),
]
SENTENCES = [
    "The coordinator routes each task to the agent most likely to succeed.",
    "Agents announce their capabilities and report their load with every heartbeat.",
    "Every message is signed and encrypted with the key of the principal that sent it.",
    "A task that times out is retried on another agent before it is declared failed.",
]


def demo_task(index: int) -> dict[str, Any]:
    """Real, small work (text statistics, hash chains, short waits) described the way people
    describe work, so the router sends each to the kind whose vocabulary it matches."""
    turn = index % 3
    if turn == 0:
        text = SENTENCES[index % len(SENTENCES)]
        return {"description": f"Refactor the payment module #{index}: code statistics",
                "required_capabilities": ["text"], "input": {"op": "stats", "text": text}}
    if turn == 1:
        return {"description": f"Scan dependencies for CVE-2024-{1000 + index} vulnerability",
                "required_capabilities": ["hash"],
                "input": {"op": "hash", "data": f"block-{index}", "rounds": 2000}}
    return {"description": f"Deploy release 2.{index} to staging",
            "required_capabilities": ["sleep"],
            "input": {"op": "sleep", "seconds": round(random.uniform(0.05, 0.3), 3)}}


def _prepare(settings: Settings, agents: int, forever: bool) -> tuple[Settings, Keyring, Path]:
    if forever:
        workdir = settings.data_dir
        demo_settings = settings
        keyring = Keyring.load_or_create(settings.keyring_path)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="coordinator-demo-"))
        demo_settings = settings.model_copy(update={
            "name": f"demo-{uuid.uuid4().hex[:8]}",
            "data_dir": workdir,
            "keyring_path": workdir / "keyring.json",
            "monitoring_port": 0,
        })
        keyring = Keyring()
    keyring.ensure(OPERATOR, "operator")
    for i in range(1, agents + 1):
        keyring.ensure(f"demo-agent-{i}", "agent")
    keyring.save(demo_settings.keyring_path)
    return demo_settings, keyring, workdir


async def _start_agents(settings: Settings, count: int) -> list[asyncio.subprocess.Process]:
    env = {
        **os.environ,
        "COORDINATOR_NAME": settings.name,
        "COORDINATOR_BROKER_URL": settings.broker_url.get_secret_value(),
        "COORDINATOR_KEYRING_PATH": str(settings.keyring_path),
        "COORDINATOR_LIVENESS__HEARTBEAT_INTERVAL_S": str(settings.liveness.heartbeat_interval_s),
        "COORDINATOR_LOG_LEVEL": "WARNING",
    }
    processes = []
    for i in range(1, count + 1):
        kind, capabilities = AGENT_PROFILES[(i - 1) % len(AGENT_PROFILES)]
        processes.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator_agent", "worker", "--id", f"demo-agent-{i}",
            "--kind", kind, "--capabilities", capabilities, "--concurrency", "2", env=env,
            # Own session: Ctrl-C reaches the demo only, which then stops agents gracefully.
            start_new_session=True,
        ))
    return processes


async def _stop_agents(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _wait_for_agents(coordinator: CoordinatorAgent, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(a.assignable for a in coordinator.state.agents.values()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(coordinator.state.agents)} of {count} agents "
                               f"announced themselves within {timeout:g}s")
        await asyncio.sleep(0.1)


async def run_demo(
    settings: Settings, *, agents: int, tasks: int, as_json: bool, forever: bool, rate: float
) -> int:
    demo_settings, keyring, workdir = _prepare(settings, agents, forever)
    coordinator = CoordinatorAgent(demo_settings, keyring)
    client = CoordinatorClient(demo_settings, keyring, OPERATOR)  # its close deletes its queue

    async def clean_up() -> None:
        """A one-shot demo leaves nothing behind: its files, its queues."""
        if forever:
            return
        shutil.rmtree(workdir, ignore_errors=True)
        agent_ids = [p.id for p in keyring.principals.values() if p.role == "agent"]
        with contextlib.suppress(Exception):
            await delete_namespace(demo_settings.broker_url, demo_settings.name, agent_ids,
                                   [OPERATOR])

    try:
        await coordinator.start()
    except BaseException:
        # A second `make run` finds the monitoring port taken: close what had started (the
        # queues it declared too), so the one-line error is all that is printed.
        with contextlib.suppress(Exception):
            await coordinator.stop()
        await clean_up()
        raise
    processes = await _start_agents(demo_settings, agents)
    try:
        await _wait_for_agents(coordinator, agents, 60)
        await client.start()
        if forever:
            await _trickle(coordinator, client, rate)
            return 0
        summary = await _batch(coordinator, client, tasks, as_json)
    finally:
        await client.close()
        await _stop_agents(processes)
        await coordinator.stop()
        await clean_up()
    print(json.dumps(summary))
    return 0 if summary["succeeded"] == tasks else 1


async def _batch(
    coordinator: CoordinatorAgent, client: CoordinatorClient, tasks: int, as_json: bool
) -> dict[str, Any]:
    started = time.monotonic()
    ids = [await client.submit(**demo_task(i)) for i in range(tasks)]
    bar = ProgressBar(tasks, "tasks", enabled=not as_json)
    pending = {asyncio.ensure_future(client.wait(task_id, 120)) for task_id in ids}
    results: list[protocol.TaskCompleted] = []
    while pending:
        done, pending = await asyncio.wait(pending, timeout=0.25)
        results.extend(f.result() for f in done if f.exception() is None)
        failed = sum(r.status != "succeeded" for r in results)
        bar.update(len(results), failed)
        if done and any(f.exception() is not None for f in done):
            break
    for future in pending:
        future.cancel()
    per_agent: dict[str, int] = {}
    per_kind: dict[str, int] = {}
    for result in results:
        if result.status == "succeeded" and result.attempts:
            agent = result.attempts[-1].agent_id
            per_agent[agent] = per_agent.get(agent, 0) + 1
            kind = _routed_kind(coordinator, result.task_id)
            per_kind[kind] = per_kind.get(kind, 0) + 1
    duration = time.monotonic() - started
    succeeded = sum(r.status == "succeeded" for r in results)
    return {
        "coordinator": coordinator.settings.name,
        "agents": len(coordinator.state.agents),
        "submitted": tasks,
        "succeeded": succeeded,
        "failed": tasks - succeeded,
        "duration_s": round(duration, 3),
        "tasks_per_s": round(tasks / duration, 1) if duration else None,
        "per_agent": dict(sorted(per_agent.items())),
        "per_kind": dict(sorted(per_kind.items())),
        "retried": coordinator.state.totals["retried"],
    }


def _routed_kind(coordinator: CoordinatorAgent, task_id: str) -> str:
    task = coordinator.state.find_task(task_id)
    return str(task.routing.get("kind", "-")) if task is not None else "-"


async def _trickle(coordinator: CoordinatorAgent, client: CoordinatorClient, rate: float) -> None:
    """make run: a task every 1/rate seconds, a line per result, until Ctrl-C."""
    port = coordinator.monitoring.port
    print(f"coordinator {coordinator.settings.name} running; metrics and API on "
          f"http://{coordinator.settings.monitoring_host}:{port}  (Ctrl-C to stop)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def report(task_id: str) -> None:
        with contextlib.suppress(TimeoutError):
            done = await client.wait(task_id, 120)
            agent = done.attempts[-1].agent_id if done.attempts else "-"
            kind = _routed_kind(coordinator, task_id)
            print(f"{task_id[:8]} {done.status:<9} {kind:<12} on {agent:<13} "
                  f"{json.dumps(done.output)[:70] if done.output is not None else done.error}",
                  flush=True)

    reporters: set[asyncio.Task[None]] = set()
    for index in itertools.count():
        if stop.is_set():
            break
        task_id = await client.submit(**demo_task(index))
        reporter = asyncio.create_task(report(task_id))
        reporters.add(reporter)
        reporter.add_done_callback(reporters.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1 / rate)
    for reporter in reporters:
        reporter.cancel()
    print("stopping...", flush=True)
