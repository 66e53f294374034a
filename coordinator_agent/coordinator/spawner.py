"""The agent spawner: as many agents of each kind as the work needs, within bounds.

Every ``spawner.interval_s`` it counts, per configured kind, the tasks that want that kind
(pending ones that name it, or were routed to it before, plus those running on its agents) and
wants ``ceil(demand / slots)`` agents, clamped to the kind's ``min``/``max`` and, over all kinds,
to ``max_agents``. That number is exported as ``coordinator_desired_agents{kind}``, whatever the
backend. Then:

* ``kubernetes``: nothing else; KEDA scales each agent Deployment on the metric
  (``deploy/k8s/scaledobjects.yaml``), to zero and back.
A kind whose oldest pending task has waited longer than ``wait_threshold_s`` wants one agent
more than it has, even when its backlog is small (long tasks).

* ``local``: the spawner runs the agents itself as child processes. Each gets a key of its own
  (a new principal in the coordinator's keyring, and a keyring file holding only that key); a
  process that dies is restarted with the same id and key after a backoff that doubles per crash;
  an agent above the wanted number that has been idle for ``idle_timeout_s`` is retired: no new
  work, ``agent.drain``, and once its tasks are done, SIGTERM (the worker's graceful stop), then
  SIGKILL after ``stop_timeout_s``. Its key is removed from the keyring when it has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.tasks import TaskStatus
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.settings import SpawnedKind, SpawnerSettings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring

log = logging.getLogger(__name__)


class ProcessState(enum.StrEnum):
    RUNNING = "running"
    RESTARTING = "restarting"  # crashed; waits out its backoff
    RETIRING = "retiring"  # drained: takes no new work, stops when its tasks are done
    STOPPING = "stopping"  # SIGTERM sent


@dataclass
class SpawnedAgent:
    agent_id: str
    kind: str
    key_file: Path
    process: asyncio.subprocess.Process | None = None
    state: ProcessState = ProcessState.RUNNING
    restarts: int = 0
    started_at: float = field(default_factory=time.time)
    last_busy: float = field(default_factory=time.time)
    stop_at: float | None = None

    def view(self) -> dict[str, Any]:
        return {"backend": "local", "pid": self.process.pid if self.process else None,
                "state": self.state.value, "restarts": self.restarts,
                "started_at": self.started_at}


class AgentSpawner:
    def __init__(self, config: SpawnerSettings, state: StateManager, metrics: Metrics, *,
                 name: str, broker_url: str, keyring_path: Path, data_dir: Path,
                 adopt_keyring: Callable[[Keyring], None],
                 send_drain: Callable[[str, protocol.AgentDrain], Any],
                 retiring: set[str]) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.name = name
        self.broker_url = broker_url
        self.keyring_path = keyring_path
        self.key_dir = data_dir / f"{name}.spawned"
        self.adopt_keyring = adopt_keyring
        self.send_drain = send_drain
        #: The dispatcher's set of agents that get no new work.
        self.retiring = retiring
        self.agents: dict[str, SpawnedAgent] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def local(self) -> bool:
        return self.config.backend == "local"

    # --- what is wanted -----------------------------------------------------------------------

    def desired(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        demand = dict.fromkeys(self.config.kinds, 0)
        oldest = dict.fromkeys(self.config.kinds, now)
        for task in self.state.tasks.values():
            if task.status is TaskStatus.PENDING and task.workflow is None:
                kind = task.kind or task.routing.get("kind") or self.config.default_kind
                if kind in demand:
                    demand[kind] += 1
                    oldest[kind] = min(oldest[kind], task.updated_at)
        serving = dict.fromkeys(self.config.kinds, 0)
        for agent in self.state.agents.values():
            if agent.kind in demand:
                demand[agent.kind] += len(agent.in_flight)
                serving[agent.kind] += not agent.liveness.gone
        wanted = {}
        for kind, spec in self.config.kinds.items():
            want = math.ceil(demand[kind] / spec.slots)
            if now - oldest[kind] > self.config.wait_threshold_s:
                want = max(want, serving[kind] + 1)  # the wait grows: one more than it has
            wanted[kind] = min(spec.max, max(spec.min, want))
        # The global cap: the minimums first, then in turn one more for each kind that wants it.
        budget = self.config.max_agents
        granted = {kind: min(self.config.kinds[kind].min, wanted[kind]) for kind in wanted}
        budget -= sum(granted.values())
        while budget > 0 and any(granted[k] < wanted[k] for k in wanted):
            for kind in sorted(wanted, key=lambda k: granted[k]):
                if budget > 0 and granted[kind] < wanted[kind]:
                    granted[kind] += 1
                    budget -= 1
        return granted

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.step(time.time())
            except Exception:
                log.exception("spawner step failed")
            await asyncio.sleep(self.config.interval_s)

    async def step(self, now: float) -> None:
        desired = self.desired(now)
        for kind, count in desired.items():
            self.metrics.desired_agents.labels(kind).set(count)
        if not self.local or self._stopping:
            return
        for spawned in self.agents.values():
            record = self.state.agents.get(spawned.agent_id)
            if record is None or not record.heard or record.in_flight:
                spawned.last_busy = now  # busy, or still starting: not idle yet
        for kind, want in desired.items():
            serving = [a for a in self.agents.values() if a.kind == kind
                       and a.state in (ProcessState.RUNNING, ProcessState.RESTARTING)]
            total = sum(a.state is not ProcessState.STOPPING for a in self.agents.values())
            for _ in range(min(want - len(serving), self.config.max_agents - total)):
                await self._start_new(kind)
            surplus = len(serving) - want
            idle = sorted((a for a in serving if a.state is ProcessState.RUNNING
                           and now - a.last_busy >= self.config.idle_timeout_s),
                          key=lambda a: a.last_busy)
            for spawned in idle[:max(0, surplus)]:
                await self._retire(spawned, now)
        for spawned in list(self.agents.values()):
            await self._finish_retiring(spawned, now)
        for kind in self.config.kinds:
            self.metrics.spawned_agents.labels(kind).set(
                sum(a.kind == kind for a in self.agents.values()))

    # --- starting -----------------------------------------------------------------------------

    async def _start_new(self, kind: str) -> None:
        agent_id = f"{kind}-{uuid.uuid4().hex[:8]}"
        key_file = self._issue_key(agent_id)
        spawned = SpawnedAgent(agent_id, kind, key_file)
        self.agents[agent_id] = spawned
        await self._launch(spawned)
        log.info("spawned agent %s (%s), pid %s", agent_id, kind,
                 spawned.process.pid if spawned.process else "-")

    def _command(self, spawned: SpawnedAgent, spec: SpawnedKind) -> list[str]:
        if spec.command:
            return [part.format(agent_id=spawned.agent_id, kind=spawned.kind)
                    for part in spec.command]
        return [sys.executable, "-m", "coordinator_agent", "worker", "--kind", spawned.kind,
                "--concurrency", str(spec.slots)]

    async def _launch(self, spawned: SpawnedAgent) -> None:
        spec = self.config.kinds[spawned.kind]
        env = {**os.environ,
               "COORDINATOR_NAME": self.name,
               "COORDINATOR_BROKER_URL": self.broker_url,
               "COORDINATOR_AGENT_ID": spawned.agent_id,
               "COORDINATOR_AGENT_KIND": spawned.kind,
               "COORDINATOR_KEYRING_PATH": str(spawned.key_file)}
        log_path = self.key_dir / f"{spawned.agent_id}.log"
        with log_path.open("ab") as output:
            spawned.process = await asyncio.create_subprocess_exec(
                *self._command(spawned, spec), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=output, stderr=output, start_new_session=True)
        spawned.state = ProcessState.RUNNING
        spawned.started_at = spawned.last_busy = time.time()
        watcher = asyncio.create_task(self._watch(spawned, spawned.process),
                                      name=f"spawned-{spawned.agent_id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, spawned: SpawnedAgent, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if spawned.process is not process:
            return
        if spawned.state in (ProcessState.RETIRING, ProcessState.STOPPING) or self._stopping:
            log.info("spawned agent %s exited (%s) after its drain", spawned.agent_id, code)
            self._forget(spawned)
            return
        # A crash: the same id and key again, after a backoff that grows with each crash.
        delay = min(self.config.max_restart_backoff_s,
                    self.config.restart_backoff_s * 2 ** spawned.restarts)
        spawned.restarts += 1
        spawned.state = ProcessState.RESTARTING
        self.metrics.spawner_restarts.labels(spawned.kind).inc()
        log.warning("spawned agent %s exited with %s; restart %d in %.1fs", spawned.agent_id,
                    code, spawned.restarts, delay)
        await asyncio.sleep(delay)
        if spawned.state is ProcessState.RESTARTING and not self._stopping:
            await self._launch(spawned)

    # --- stopping -----------------------------------------------------------------------------

    async def _retire(self, spawned: SpawnedAgent, now: float) -> None:
        spawned.state = ProcessState.RETIRING
        self.retiring.add(spawned.agent_id)  # the dispatcher gives it nothing new
        log.info("retiring idle spawned agent %s", spawned.agent_id)
        with contextlib.suppress(Exception):
            await self.send_drain(spawned.agent_id, protocol.AgentDrain(reason="idle: scaled in"))

    async def _finish_retiring(self, spawned: SpawnedAgent, now: float) -> None:
        record = self.state.agents.get(spawned.agent_id)
        if spawned.state is ProcessState.RETIRING and (record is None or not record.in_flight):
            self._signal(spawned, signal.SIGTERM)  # the worker's graceful stop: goodbye, exit
            spawned.state = ProcessState.STOPPING
            spawned.stop_at = now + self.config.stop_timeout_s
        elif (spawned.state is ProcessState.STOPPING and spawned.stop_at is not None
              and now > spawned.stop_at):
            log.warning("spawned agent %s did not stop in time: killing it", spawned.agent_id)
            self._signal(spawned, signal.SIGKILL)

    @staticmethod
    def _signal(spawned: SpawnedAgent, sig: signal.Signals) -> None:
        process = spawned.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    def _forget(self, spawned: SpawnedAgent) -> None:
        self.agents.pop(spawned.agent_id, None)
        self.retiring.discard(spawned.agent_id)
        self._revoke_key(spawned)

    async def stop(self) -> None:
        """The coordinator stops: every spawned agent stops gracefully (SIGTERM), then goes."""
        self._stopping = True
        for spawned in self.agents.values():
            spawned.state = ProcessState.STOPPING
            self._signal(spawned, signal.SIGTERM)
        processes = [a.process for a in self.agents.values() if a.process is not None]
        if processes:
            done = asyncio.gather(*(p.wait() for p in processes))
            try:
                await asyncio.wait_for(done, self.config.stop_timeout_s)
            except TimeoutError:
                for spawned in self.agents.values():
                    self._signal(spawned, signal.SIGKILL)
        for watcher in list(self._watchers):
            watcher.cancel()
        for spawned in list(self.agents.values()):
            self._forget(spawned)

    # --- keys ---------------------------------------------------------------------------------

    def _issue_key(self, agent_id: str) -> Path:
        """A principal of its own in the coordinator's keyring; a file with that key alone."""
        keyring = Keyring.load_or_create(self.keyring_path)
        keyring.generate(agent_id, "agent")
        keyring.save(self.keyring_path)
        self.adopt_keyring(keyring)
        self.key_dir.mkdir(parents=True, exist_ok=True)
        key_file = self.key_dir / f"{agent_id}.keyring.json"
        keyring.subset(agent_id).save(key_file)
        return key_file

    def _revoke_key(self, spawned: SpawnedAgent) -> None:
        with contextlib.suppress(FileNotFoundError):
            spawned.key_file.unlink()
        keyring = Keyring.load_or_create(self.keyring_path)
        if keyring.principals.pop(spawned.agent_id, None) is not None:
            keyring.save(self.keyring_path)
            self.adopt_keyring(keyring)

    def describe(self) -> dict[str, dict[str, Any]]:
        """For ``agents``: what the spawner knows of each agent it runs."""
        return {agent_id: spawned.view() for agent_id, spawned in self.agents.items()}
