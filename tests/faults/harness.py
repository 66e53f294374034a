"""The fault suite's tools: a private broker node, a fleet of real processes, the ground truth.

- ``FaultNode`` drives the suite's own RabbitMQ node (``scripts/faults-broker.sh``): pause it
  (SIGSTOP), close its connections, restart it, delete queues. Never the shared broker.
- ``Fleet`` runs ``coordinator-agent run`` and ``fault_agent.py`` processes against it, restarts
  agents that die (as a supervisor would), and watches ``/readyz``.
- ``tally`` counts, from the coordinator's SQLite store and the agents' journal, what was lost,
  completed twice (conflicting completions) and executed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.exceptions import TransportError
from coordinator_agent.settings import Settings, load_settings
from coordinator_agent.wire.keyring import Keyring

ROOT = Path(__file__).resolve().parents[2]
NODE_SCRIPT = ROOT / "scripts" / "faults-broker.sh"
AGENT_SCRIPT = Path(__file__).with_name("fault_agent.py")
OPERATOR = "operator-1"


class FaultNode:
    """The suite's own RabbitMQ node (other ports, name, data and logs)."""

    def __init__(self) -> None:
        self.name = os.environ.get("FAULTS_NODENAME", "faults@localhost")
        self.port = int(os.environ.get("FAULTS_AMQP_PORT", "5682"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _script(self, verb: str, timeout: float) -> str:
        done = subprocess.run(["bash", str(NODE_SCRIPT), verb], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0 and verb != "status":
            raise RuntimeError(f"faults-broker.sh {verb} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def start(self) -> None:
        self._script("start", 150)

    def stop(self) -> None:
        self._script("stop", 120)

    def pid(self) -> int:
        return int(self._script("pid", 10))

    def pause(self) -> None:
        os.kill(self.pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid(), signal.SIGCONT)

    def ctl(self, *args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", "-n", self.name, *args], capture_output=True,
                       text=True, timeout=90, check=True)

    def close_connections(self) -> None:
        self.ctl("close_all_connections", "fault suite: closed by the broker")

    def restart_app(self) -> None:
        self.ctl("stop_app")
        self.ctl("start_app")

    def delete_queue(self, queue: str) -> None:
        self.ctl("delete_queue", queue)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Fleet:
    """A coordinator and its agents as real processes, as an operator would run them."""

    root: Path
    broker_url: str
    name: str
    agent_ids: list[str]
    concurrency: int = 4
    #: Extra COORDINATOR_* variables for every process.
    env_overrides: dict[str, str] = field(default_factory=dict)
    coordinator: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    #: Agents the supervisor leaves down (a test stopped them on purpose).
    held: set[str] = field(default_factory=set)
    readiness: list[tuple[float, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.journal = self.root / "journal.log"
        self.journal.touch()
        ring = Keyring()
        for agent_id in self.agent_ids:
            ring.generate(agent_id, "agent")
        ring.generate(OPERATOR, "operator")
        self.keyring_path = self.root / "keyring.json"
        ring.save(self.keyring_path)
        self.keyring = ring
        (self.root / "config.yaml").write_text("{}\n")
        self.env = {
            **os.environ,
            "COORDINATOR_CONFIG": str(self.root / "config.yaml"),
            "COORDINATOR_NAME": self.name,
            "COORDINATOR_BROKER_URL": self.broker_url,
            "COORDINATOR_KEYRING_PATH": str(self.keyring_path),
            "COORDINATOR_DATA_DIR": str(self.root),
            "COORDINATOR_MONITORING_HOST": "127.0.0.1",
            "COORDINATOR_MONITORING_PORT": str(self.port),
            "COORDINATOR_LIVENESS__HEARTBEAT_INTERVAL_S": "0.5",
            "COORDINATOR_LIVENESS__SUSPECT_AFTER": "2.5",
            "COORDINATOR_LIVENESS__DEAD_AFTER": "5",
            "COORDINATOR_LIMITS__TASK_TIMEOUT_S": "60",
            "COORDINATOR_LIMITS__PUBLISH_TIMEOUT_S": "5",
            "COORDINATOR_LIMITS__DRAIN_TIMEOUT_S": "3",
            "COORDINATOR_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            "PYTHONMALLOC": "malloc",  # as the image sets it (deploy/Dockerfile)
            **self.env_overrides,
        }
        self._supervisor: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def settings(self) -> Settings:
        return load_settings(name=self.name, broker_url=self.broker_url,
                             keyring_path=self.keyring_path, data_dir=self.root)

    @property
    def store_path(self) -> Path:
        return self.root / f"{self.name}.sqlite3"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.root / log_name).open("ab") as log:
            return subprocess.Popen([sys.executable, *args], env=self.env, stdout=log,
                                    stderr=log, cwd=ROOT)

    # --- the coordinator ------------------------------------------------------------------------

    async def start_coordinator(self, timeout: float = 30.0) -> None:
        self.coordinator = self._spawn(["-m", "coordinator_agent", "run"], "coordinator.log")
        await self.wait_ready(timeout)

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.send_signal(signal.SIGKILL)
        self.coordinator.wait()

    def coordinator_rss_kib(self) -> int:
        assert self.coordinator is not None
        for line in Path(f"/proc/{self.coordinator.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    async def http(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{self.port}{path}",
                timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status, await response.json(content_type=None)

    async def ready(self) -> bool:
        try:
            status, _ = await self.http("/readyz")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return status == 200

    async def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while not await self.ready():
            if self.coordinator is not None and self.coordinator.poll() is not None:
                raise AssertionError(f"coordinator exited: {self.log_tail('coordinator.log')}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"coordinator not ready within {timeout}s")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    def watch_readiness(self) -> None:
        """Sample /readyz every 0.1 s into ``readiness`` until ``stop``."""
        async def watch() -> None:
            while True:
                self.readiness.append((time.monotonic(), await self.ready()))
                await asyncio.sleep(0.1)
        self._watcher = asyncio.create_task(watch())

    def first_readiness(self, value: bool, after: float) -> float | None:
        """Seconds from ``after`` to the first sample with ``value``."""
        for at, ready in self.readiness:
            if at >= after and ready is value:
                return at - after
        return None

    # --- agents -------------------------------------------------------------------------------

    def start_agent(self, agent_id: str) -> None:
        self.agents[agent_id] = self._spawn(
            [str(AGENT_SCRIPT), "--id", agent_id, "--concurrency", str(self.concurrency),
             "--journal", str(self.journal)], f"{agent_id}.log")

    def start_agents(self) -> None:
        for agent_id in self.agent_ids:
            self.start_agent(agent_id)
        self._supervisor = asyncio.create_task(self._supervise())

    def kill_agent(self, agent_id: str) -> None:
        self.agents[agent_id].send_signal(signal.SIGKILL)

    async def _supervise(self) -> None:
        """Restart an agent process that died, like systemd or Kubernetes would."""
        while True:
            await asyncio.sleep(0.1)
            for agent_id, proc in list(self.agents.items()):
                if proc.poll() is not None and agent_id not in self.held:
                    self.restarts[agent_id] += 1
                    self.start_agent(agent_id)

    async def wait_agents_healthy(self, timeout: float) -> float:
        started = time.monotonic()
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                _, body = await self.http("/api/agents")
                healthy = {a["id"] for a in body["agents"] if a["liveness"] == "healthy"}
                if healthy >= set(self.agent_ids) - self.held:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"agents not all healthy within {timeout}s")
            await asyncio.sleep(0.1)

    # --- clean-up -----------------------------------------------------------------------------

    async def stop(self) -> None:
        for task in (self._supervisor, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # SIGKILL: the scenario is over and its namespace is thrown away with the node, so a
        # graceful drain would only cost the suite time.
        procs = [*self.agents.values(), *([self.coordinator] if self.coordinator else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() \
            else ""

    def client(self) -> CoordinatorClient:
        return CoordinatorClient(self.settings, self.keyring, OPERATOR)


# --- ground truth -------------------------------------------------------------------------------


@dataclass
class Tally:
    submitted: int
    terminal: int
    succeeded: int
    failed: int
    lost: list[str]
    completed_twice: list[str]
    executed_twice: list[str]
    #: Executions per task, from the agents' journal.
    executions: Counter[str]
    attempts_by_outcome: Counter[str]
    #: The stored task records, by id.
    tasks: dict[str, dict[str, Any]]

    def summary(self) -> str:
        return (f"submitted={self.submitted} terminal={self.terminal} "
                f"succeeded={self.succeeded} failed={self.failed} lost={len(self.lost)} "
                f"completed_twice={len(self.completed_twice)} "
                f"executed_twice={len(self.executed_twice)} "
                f"attempts={dict(self.attempts_by_outcome)}")


def read_store(path: Path) -> dict[str, dict[str, Any]]:
    """Every stored task, read directly from the coordinator's SQLite file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {task_id: orjson.loads(data)
                for task_id, data in db.execute("SELECT id, data FROM tasks")}
    finally:
        db.close()


def read_journal(path: Path) -> Counter[str]:
    executions: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        if line.strip():
            executions[line.split()[0]] += 1
    return executions


def tally(fleet: Fleet, task_ids: list[str], notices: list[Any] | None = None) -> Tally:
    tasks = read_store(fleet.store_path)
    executions = read_journal(fleet.journal)
    terminal = {"succeeded", "failed", "cancelled"}
    lost = [t for t in task_ids if tasks.get(t, {}).get("status") not in terminal]
    twice = {t for t in task_ids if t in tasks and sum(
        a["outcome"] == "succeeded" for a in tasks[t]["attempts"]) > 1}
    if notices is not None:  # two task.completed notices that disagree
        seen: dict[str, tuple[str, bytes]] = {}
        for notice in notices:
            key = (notice.status, orjson.dumps(notice.output))
            if seen.setdefault(notice.task_id, key) != key:
                twice.add(notice.task_id)
    outcomes: Counter[str] = Counter(a["outcome"] for t in task_ids if t in tasks
                                     for a in tasks[t]["attempts"])
    return Tally(
        submitted=len(task_ids),
        terminal=sum(tasks.get(t, {}).get("status") in terminal for t in task_ids),
        succeeded=sum(tasks.get(t, {}).get("status") == "succeeded" for t in task_ids),
        failed=sum(tasks.get(t, {}).get("status") == "failed" for t in task_ids),
        lost=lost, completed_twice=sorted(twice),
        executed_twice=sorted(t for t in task_ids if executions[t] > 1),
        executions=executions, attempts_by_outcome=outcomes, tasks=tasks)


async def wait_all_terminal(fleet: Fleet, task_ids: list[str], timeout: float) -> float:
    """Poll the store until every task is terminal; returns the seconds it took."""
    started = time.monotonic()
    wanted = set(task_ids)
    done: set[str] = set()
    while True:
        with contextlib.suppress(sqlite3.Error):
            done = {t for t, task in (await asyncio.to_thread(read_store, fleet.store_path)).items()
                    if task["status"] in ("succeeded", "failed", "cancelled")}
            if wanted <= done:
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            left = len(wanted - done)
            raise AssertionError(f"{left} of {len(wanted)} tasks not terminal after {timeout}s;"
                                 f" coordinator log:\n{fleet.log_tail('coordinator.log')}")
        await asyncio.sleep(0.5)


async def submit_many(client: CoordinatorClient, count: int, label: str,
                      spec: dict[str, Any], ids: list[str] | None = None) -> list[str]:
    """Submit ``count`` tasks, each confirmed by the broker before the next.

    Like any careful client, a submission the broker did not confirm is sent again with the
    same task id (the coordinator answers a repeat as a duplicate). ``ids``, when given, fills
    up as the submissions are confirmed.
    """
    ids = [] if ids is None else ids
    for i in range(count):
        task_id = uuid.uuid4().hex
        for _ in range(60):
            try:
                await client.submit(f"{label} {i}", input=spec, task_id=task_id)
                break
            except TransportError:
                await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"could not submit {task_id} for 30 s")
        ids.append(task_id)
    return ids


#: Where each scenario's figures go (RELIABILITY.md quotes them); one JSON line per scenario.
FIGURES = ROOT / "var" / "faults" / "figures.jsonl"


def record(scenario: str, **figures: Any) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("ab") as out:
        out.write(orjson.dumps({"scenario": scenario, "at": time.time(), **figures}) + b"\n")
    print(f"[faults] {scenario}: {figures}")
