"""Discovery and liveness: how fast a new agent gets work, and a dead one's work moves on.

For each fleet size (default 10, 100 and 1,000 registered agents), with the real Consul and
RabbitMQ on loopback and a CoordinatorAgent (Consul enabled, a name of its own) in this process:

* the background fleet: one child process plays every agent. It registers them all in Consul
  with the real ``ConsulRegistry.register_agent`` (timed; 32 calls in flight), then sends a hello
  each and ``agent.status`` heartbeats sealed with each agent's own key (generated at run time),
  exactly as ``WorkerAgent.send`` publishes them, on one connection, spread evenly over the
  heartbeat interval; and it refreshes each agent's TTL check as ``WorkerAgent`` does (every
  ttl_s / 3 x U(0.8, 1) after its registration). Nothing is assigned to them (kind ``fleet``).
* registration -> first assignment (``--probes`` times): a task of kind ``probe`` is pending;
  a fresh real ``WorkerAgent`` of kind ``probe`` (registry on, a new id each time) starts in this
  process. Measured from ``start()`` being called to the coordinator assigning the task (the
  attempt's start in the task record); also to its hello being handled, to the worker's handler
  starting, and to the coordinator seeing the agent passing in Consul. The probe then stops
  gracefully; the next one starts once everything it sent has been handled.
* SIGKILL -> reassignment (``--deaths`` times): a real agent in a subprocess
  (``coordinator-agent worker``, registry on) runs ``--hold`` tasks of op ``sleep``
  (it reports them in flight); an idle rescuer ``WorkerAgent`` of the same kind is up; at a
  random moment the subprocess is killed with SIGKILL. Measured from the kill to the agent being
  declared dead (its attempts end), to every task having a new attempt on the rescuer, and to the
  rescuer's handler having started all of them. ``--lanes`` kills are in flight at once,
  staggered over the detection window (default 2; ``--lanes 1`` for strictly one at a time).

What bounds them: a new agent is assignable as soon as its hello is handled (Consul plays no
part); a dead one is found after ``liveness.dead_after x liveness.heartbeat_interval_s`` of AMQP
silence (+ up to one 0.25 s sweep), and its tasks wait the routing retry backoff before they
are dispatched again. Consul's TTL is far longer and plays no part in either.

Also measured: 1,000 registrations, Consul's CPU per TTL refresh with that many services on the
one agent (so the fleet's refresh load can be priced at any TTL), CPU of each party with the
fleet idle, and how far the status lane lags. The shipped heartbeat (2 s) and liveness multiples
are used. ``registry.ttl_s`` is 120 s here, not the shipped 30 s: with 1,000 services on one
Consul agent a refresh costs it ~10 ms of CPU, and at 30 s the fleet would keep about one core
of this shared 2-core machine busy (the figure is printed). The fleet registers under a Consul
service name of its own, so other users of the shared dev Consul neither wake this
coordinator's blocking query nor pay for this fleet's entries in theirs.

Everything the run registers in Consul is deregistered and its queues deleted at the end, also on
error, Ctrl-C and SIGTERM (anything of this run's id still listed in Consul is swept too).

    .venv/bin/python bench/discovery.py                      # 10, 100, 1000 agents (~5 min)
    .venv/bin/python bench/discovery.py --quick              # smoke run (~1 min)
    .venv/bin/python bench/discovery.py --fleets 1000 --probes 30 --deaths 16 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from _common import (
    BROKER_URL,
    PYTHON,
    ROOT,
    Children,
    broker_cpu_seconds,
    clean_environ,
    empty_config,
    group_cpu_seconds,
    percentile,
    restore_env,
    table,
)
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from coordinator_agent.agent.worker import TaskContext, WorkerAgent
from coordinator_agent.coordinator.liveness import AgentLiveness, RegistryHealth
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.coordinator.sweep import SWEEP_INTERVAL_S
from coordinator_agent.coordinator.tasks import AttemptOutcome, TaskRecord
from coordinator_agent.exceptions import DiscoveryError
from coordinator_agent.registry import AgentService, ConsulRegistry, RegisteredAgent
from coordinator_agent.settings import RegistrySettings, Settings, load_settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace, lane_for
from coordinator_agent.wire.security import SecurityManager

REGISTRY_URL = "http://127.0.0.1:8500"
THIS_FILE = Path(__file__).resolve()
#: Registrations in flight at once while the fleet registers (a fleet starting together).
REGISTER_CONCURRENCY = 32
POLL_S = 0.01
#: Heartbeats due within this much of each other go out in one batch.
HEARTBEAT_TICK_S = 0.02
#: TTL refreshes timed one after the other to price one in Consul CPU.
REFRESH_SAMPLE = 100
#: The shipped registry.ttl_s, priced even when the run uses another.
DEFAULT_TTL_S = RegistrySettings().ttl_s


#: `coordinator-agent worker ARGS` (the CLI's own entry point), in a process the kernel kills
#: if this one dies without its clean-up (SIGKILL): PR_SET_PDEATHSIG.
WORKER_BOOT = ("import ctypes, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
               "from coordinator_agent.cli.main import main; sys.exit(main(sys.argv[1:]))")


# --- small helpers ----------------------------------------------------------------------------


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition()``; returns the time.time() at which it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(POLL_S)
    return time.time()


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values) if values else float("nan"),
            "min": min(values) if values else float("nan")}


def consul_pid() -> int | None:
    """The shared Consul dev agent (the one on the default HTTP port, started without one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "consul":
                continue
            cmdline = (entry / "cmdline").read_bytes().split(b"\x00")
        except OSError:
            continue
        if b"agent" in cmdline and b"-http-port" not in cmdline:
            found.append(int(entry.name))
    return found[0] if len(found) == 1 else None


def pid_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = raw[raw.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoopLag:
    """How late this event loop wakes a 50 ms sleeper: the coordinator's responsiveness."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.05)
            self.samples.append(time.perf_counter() - before - 0.05)

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def status_latency(metrics: CollectorRegistry) -> dict[str, float]:
    """Cumulative coordinator_message_latency_seconds{agent.status}: bucket -> count, sum."""
    found: dict[str, float] = {}
    for metric in metrics.collect():
        if metric.name != "coordinator_message_latency_seconds":
            continue
        for sample in metric.samples:
            if sample.labels.get("message_type") != "agent.status":
                continue
            if sample.name.endswith("_bucket"):
                found[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_sum"):
                found["sum"] = sample.value
            elif sample.name.endswith("_count"):
                found["count"] = sample.value
    return found


def latency_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean and p99 (a bucket's upper bound) of heartbeats handled between two readings:
    sent -> handled by the coordinator, i.e. how far the status lane lags."""
    count = after.get("count", 0) - before.get("count", 0)
    if count <= 0:
        return {"count": 0, "mean_ms": float("nan"), "p99_le_ms": float("nan")}
    p99 = float("inf")
    for le in sorted((k for k in after if k not in ("sum", "count")), key=float):
        if after[le] - before.get(le, 0) >= 0.99 * count:
            p99 = float(le)
            break
    return {"count": count, "mean_ms": (after["sum"] - before.get("sum", 0)) / count * 1000,
            "p99_le_ms": p99 * 1000}


def lane_text(lane: dict[str, float]) -> str:
    return (f"heartbeats sent -> handled: mean {lane['mean_ms']:.1f} ms, p99 <= "
            f"{lane['p99_le_ms']:g} ms")


def retry_backoff(coordinator: CoordinatorAgent) -> float | None:
    """The first retry's delay after a lost agent (routing retry.backoff_base_s), if any."""
    retry = getattr(getattr(coordinator.planner, "config", None), "retry", None)
    value = getattr(retry, "backoff_base_s", None)
    return float(value) if value is not None else None


class CountingRegistry:
    """The coordinator's ConsulRegistry, counting the blocking queries that returned."""

    def __init__(self, inner: ConsulRegistry) -> None:
        self.inner = inner
        self.watch_returns = 0
        self.watch_entries = 0

    async def watch_agents(self, coordinator: str, index: int) -> tuple[int, list[RegisteredAgent]]:
        new_index, agents = await self.inner.watch_agents(coordinator, index)
        self.watch_returns += 1
        self.watch_entries += len(agents)
        return new_index, agents

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --- the background fleet (child process) -----------------------------------------------------


def sealed(settings: Settings, security: SecurityManager,
           payload: protocol.Model) -> tuple[str, aio_pika.Message]:
    """(routing key, message) exactly as WorkerAgent.send -> MessageHandler.publish build them."""
    message_type = protocol.TYPE_OF_PAYLOAD[type(payload)]
    lane = lane_for(settings.name, message_type)
    durable = lane == c.tasks_key(settings.name)
    envelope = protocol.make_envelope(payload, sender=security.principal_id)
    body, headers = security.seal(envelope, settings.name)
    return lane, aio_pika.Message(
        body, headers=headers, message_id=envelope.id, type=envelope.type,
        content_type=c.CONTENT_TYPE,
        delivery_mode=(aio_pika.DeliveryMode.PERSISTENT if durable
                       else aio_pika.DeliveryMode.NOT_PERSISTENT),
        expiration=None if durable else settings.security.message_ttl_s,
    )


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, default=str), encoding="utf-8")


def file_exists(path: Path) -> bool:
    return path.exists()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def fleet_settings(cfg: dict[str, Any]) -> Settings:
    return load_settings(
        name=cfg["name"], broker_url=BROKER_URL, registry_url=cfg["registry_url"],
        keyring_path=cfg["keyring"], data_dir=cfg["data_dir"], monitoring_port=0,
        log_level="WARNING", liveness=cfg["liveness"], registry=cfg["registry"],
    )


async def fleet_child(cfg: dict[str, Any]) -> None:
    """Play the background fleet: register every agent in Consul (timed), then hellos,
    heartbeats spread over the interval on one connection, and each agent's TTL refreshes."""
    settings = fleet_settings(cfg)
    keyring = Keyring.load(Path(cfg["keyring"]))
    agent_ids: list[str] = cfg["agents"]
    managers = [SecurityManager.from_settings(settings, keyring.subset(a), a) for a in agent_ids]
    interval = settings.liveness.heartbeat_interval_s
    period = settings.registry.ttl_s / 3
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out: dict[str, Any] = {"heartbeats": 0, "late_heartbeats": 0, "hellos": 0,
                           "publish_errors": 0, "lag_max_s": 0.0, "register_errors": 0,
                           "refreshes": 0, "refresh_errors": 0}
    refresh_latency: list[float] = []
    status = protocol.AgentStatus(kind="fleet", capabilities=[], max_concurrency=4,
                                  state="ready", in_flight=0, load=0.0)
    hello = protocol.AgentHello(kind="fleet", capabilities=[], max_concurrency=4,
                                version="bench")
    registry = ConsulRegistry(cfg["registry_url"], settings.registry)
    connection: aio_pika.abc.AbstractConnection | None = None
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()

    async def refresher(agent_id: str) -> None:
        while True:  # as WorkerAgent._registry_loop: every ttl/3, with jitter
            await asyncio.sleep(period * random.uniform(0.8, 1.0))
            before = time.perf_counter()
            try:
                await registry.refresh_agent(agent_id)
                out["refreshes"] += 1
                refresh_latency.append(time.perf_counter() - before)
            except DiscoveryError:
                out["refresh_errors"] += 1  # never re-registers: clean-up stays simple

    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def register(agent_id: str) -> None:
        service = AgentService(agent_id=agent_id, kind="fleet", coordinator=settings.name,
                               max_concurrency=4, version="bench",
                               queue=c.agent_queue(settings.name, agent_id))
        async with gate:
            for _ in range(5):
                try:
                    await registry.register_agent(service)
                    break
                except DiscoveryError:
                    out["register_errors"] += 1
                    await asyncio.sleep(1.0)
        tasks.append(asyncio.create_task(refresher(agent_id)))

    try:
        began, wall = time.perf_counter(), time.time()
        await asyncio.gather(*(register(a) for a in agent_ids))
        out["register_s"] = time.perf_counter() - began
        write_json(Path(cfg["registered"]), {"started_at": wall, "seconds": out["register_s"],
                                             "errors": out["register_errors"]})

        connection = await aio_pika.connect(
            BROKER_URL, timeout=10,
            client_properties={"connection_name": f"{settings.name}/bench-fleet"})
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE, ensure=False)

        async def publish(batch: list[tuple[str, aio_pika.Message]]) -> None:
            results = await asyncio.gather(
                *(exchange.publish(m, key, mandatory=True, timeout=10) for key, m in batch),
                return_exceptions=True)
            out["publish_errors"] += sum(isinstance(r, BaseException) for r in results)

        for i in range(0, len(managers), 200):
            await publish([sealed(settings, m, hello) for m in managers[i:i + 200]])
        out["hellos"] = len(managers)

        async def heartbeats() -> None:
            n = len(managers)
            begin = loop.time()
            sequence = 0  # heartbeat number `sequence` is agent (sequence % n)'s, due at:
            while True:
                now = loop.time()
                batch = []
                while begin + sequence * interval / n <= now:
                    lag = now - begin - sequence * interval / n
                    out["lag_max_s"] = max(out["lag_max_s"], lag)
                    out["late_heartbeats"] += lag > interval / 2
                    batch.append(sealed(settings, managers[sequence % n], status))
                    sequence += 1
                if batch:
                    await publish(batch)
                    out["heartbeats"] += len(batch)
                due = begin + sequence * interval / n
                await asyncio.sleep(max(HEARTBEAT_TICK_S, due - loop.time()))

        async def orphaned() -> None:
            parent = os.getppid()
            while True:
                await asyncio.sleep(1.0)
                if os.getppid() != parent:
                    break
            out["orphaned"] = True  # the bench died without stopping us: undo our part
            stop.set()

        tasks.append(asyncio.create_task(heartbeats()))
        tasks.append(asyncio.create_task(orphaned()))
        await stop.wait()
        if out.get("orphaned"):
            for agent_id in agent_ids:
                with contextlib.suppress(DiscoveryError):
                    await registry.deregister_agent(agent_id)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out["elapsed_s"] = time.monotonic() - started
        out["refresh_latency_p50_s"] = percentile(refresh_latency, 50)
        out["refresh_latency_p99_s"] = percentile(refresh_latency, 99)
        write_json(Path(cfg["stats"]), out)
        with contextlib.suppress(Exception):
            await registry.close()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


# --- clean-up ---------------------------------------------------------------------------------


@dataclass
class Cleanup:
    """Everything to undo, whatever happens: idempotent, each step on its own."""

    uid: str
    registry: ConsulRegistry
    workers: list[WorkerAgent] = field(default_factory=list)
    coordinators: list[CoordinatorAgent] = field(default_factory=list)
    children: list[Children] = field(default_factory=list)
    services: set[str] = field(default_factory=set)
    namespaces: dict[str, set[str]] = field(default_factory=dict)
    registries: list[ConsulRegistry] = field(default_factory=list)

    async def run(self) -> None:
        for worker in self.workers:
            await self._step(f"stop {worker.agent_id}", worker.stop(timeout=1))
        self.workers.clear()
        for children in self.children:
            await self._step("stop child processes", asyncio.to_thread(children.stop_all))
        self.children.clear()
        for coordinator in self.coordinators:
            await self._step("stop the coordinator", coordinator.stop())
        self.coordinators.clear()
        await self._step("deregister from Consul", self.deregister_all())
        for name, agents in list(self.namespaces.items()):
            await self._step(f"delete queues of {name}", asyncio.wait_for(
                delete_namespace(SecretStr(BROKER_URL), name, sorted(agents)), 60))
            del self.namespaces[name]
        for registry in [*self.registries, self.registry]:
            await self._step("close a Consul client", registry.close())
        self.registries.clear()

    async def deregister_all(self) -> None:
        await deregister(self.registry, self.services)
        self.services.clear()
        # Anything else of this run (e.g. registered by a killed agent we did not track).
        async with aiohttp.ClientSession() as session, session.get(
                f"{REGISTRY_URL}/v1/agent/services", timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            listed = await response.json()
        await deregister(self.registry, [sid for sid in listed if self.uid in sid])

    @staticmethod
    async def _step(what: str, step: Awaitable[Any]) -> None:
        """One step, bounded; its failure (even a cancellation) does not stop the others."""
        try:
            await asyncio.wait_for(step, 60)
        except (Exception, asyncio.CancelledError) as exc:
            print(f"  clean-up: {what} failed: {exc!r}", flush=True)


async def deregister(registry: ConsulRegistry, ids: Iterable[str]) -> float:
    """Deregister every id (REGISTER_CONCURRENCY at a time); returns seconds taken."""
    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def one(service_id: str) -> None:
        async with gate:
            with contextlib.suppress(DiscoveryError):
                await registry.deregister_agent(service_id)

    started = time.perf_counter()
    await asyncio.gather(*(one(s) for s in list(ids)))
    return time.perf_counter() - started


# --- one fleet size ---------------------------------------------------------------------------


@dataclass
class DeathRound:
    k: int
    doomed: str
    rescuer_id: str
    proc: Any
    tasks: list[TaskRecord]
    rescuer: WorkerAgent | None = None
    #: task id -> when the rescuer's handler started it.
    handled: dict[str, float] = field(default_factory=dict)


@dataclass
class Options:
    fleets: list[int]
    probes: int = 15
    deaths: int = 10
    hold: int = 4
    heartbeat_s: float = 2.0
    suspect_after: float = 2.5
    dead_after: float = 5.0
    ttl_s: float = 120.0
    steady_s: float = 4.0
    lanes: int = 2


class FleetRun:
    def __init__(self, n: int, opts: Options, uid: str, workdir: Path, cleanup: Cleanup) -> None:
        self.n, self.opts, self.cleanup = n, opts, cleanup
        self.prefix = f"dsc-{uid}-n{n}"
        self.name = f"bench-{self.prefix}"
        self.dir = workdir / f"n{n}"
        self.dir.mkdir()
        self.fleet_ids = [f"{self.prefix}-fleet-{i}" for i in range(n)]
        self.probe_ids = [f"{self.prefix}-probe-{j}" for j in range(opts.probes)]
        self.doomed_ids = [f"{self.prefix}-doomed-{k}" for k in range(opts.deaths)]
        self.rescue_ids = [f"{self.prefix}-rescue-{k}" for k in range(opts.deaths)]
        self.keyring = Keyring()
        for agent_id in [*self.fleet_ids, *self.probe_ids, *self.doomed_ids, *self.rescue_ids]:
            self.keyring.generate(agent_id, "agent")
        self.keyring_path = self.dir / "keyring.json"
        self.keyring.save(self.keyring_path)
        self.liveness = {"heartbeat_interval_s": opts.heartbeat_s,
                         "suspect_after": opts.suspect_after, "dead_after": opts.dead_after}
        # Its own Consul service name: other users of the shared dev Consul (tests registering
        # under the default name) neither wake this coordinator's blocking query nor pay for
        # this fleet's entries in theirs.
        self.registry_cfg = {"ttl_s": opts.ttl_s, "agent_service": f"bench-dsc-{uid}"}
        self.settings = load_settings(
            name=self.name, broker_url=BROKER_URL, registry_url=REGISTRY_URL,
            data_dir=self.dir, keyring_path=self.keyring_path, monitoring_port=0,
            log_level="WARNING", liveness=self.liveness, registry=self.registry_cfg,
            limits={"task_timeout_s": 300, "drain_timeout_s": 5},
        )
        self.registry = ConsulRegistry(REGISTRY_URL, self.settings.registry)
        cleanup.registries.append(self.registry)
        self.children = Children(self.dir)
        cleanup.children.append(self.children)
        cleanup.namespaces[self.name] = set(self.probe_ids + self.doomed_ids + self.rescue_ids)
        self.coordinator: CoordinatorAgent | None = None
        self.counting: CountingRegistry | None = None
        self.lag = LoopLag()
        self.result: dict[str, Any] = {"agents": n}

    @property
    def coord(self) -> CoordinatorAgent:
        assert self.coordinator is not None
        return self.coordinator

    def agent_is(self, agent_id: str, *states: AgentLiveness) -> bool:
        agent = self.coord.state.agents.get(agent_id)
        return agent is not None and agent.liveness in states

    def ready(self, agent_id: str) -> bool:
        """Heard, healthy, and passing in Consul as the coordinator sees it."""
        agent = self.coord.state.agents.get(agent_id)
        return (agent is not None and agent.assignable
                and agent.registry is RegistryHealth.PASSING)

    def submit(self, task_id: str, kind: str, task_input: Any) -> TaskRecord:
        spec = protocol.TaskSubmit(task_id=task_id, description=f"discovery bench {kind}",
                                   kind=kind, input=task_input, timeout_s=300)
        task, _ = self.coord.submit(spec, submitted_by="bench", default_id=task_id)
        return task

    # --- phases -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        n = self.n
        print(f"\n{n} agents: coordinator {self.name}", flush=True)
        self.counting = CountingRegistry(self.registry)
        self.metrics = CollectorRegistry()
        self.coordinator = CoordinatorAgent(
            self.settings, self.keyring, registry=self.metrics,
            service_registry=self.counting)
        self.cleanup.coordinators.append(self.coordinator)
        self.instrument(self.coordinator)
        await self.coordinator.start()
        self.lag.start()
        try:
            await self.bring_up_fleet()
            await self.steady()
            await self.probes()
            await self.deaths()
            await self.tear_down_fleet()
        finally:
            await self.lag.stop()
        return self.result

    def instrument(self, coordinator: CoordinatorAgent) -> None:
        """Wrap three methods of this coordinator's StateManager (this instance only) to see
        when an agent's hello and goodbye are handled, which status it sent last, and how long
        applying a registry answer takes. Nothing else changes."""
        state = coordinator.state
        observe_agent, observe_registry = state.observe_agent, state.observe_registry
        agent_left = state.agent_left
        self.hello_at: dict[str, float] = {}
        self.left_at: dict[str, float] = {}
        self.last_status: dict[str, str] = {}
        #: agent.status that arrived after the agent's goodbye and brought it back (see report).
        self.revivals: list[str] = []
        self.registry_apply: list[tuple[int, float]] = []

        def timed_observe_agent(agent_id: str, info: Any, now: float) -> Any:
            if isinstance(info, protocol.AgentHello):
                self.hello_at.setdefault(agent_id, time.time())
            else:
                previous = state.agents.get(agent_id)
                if previous is not None and previous.liveness is AgentLiveness.LEFT:
                    self.revivals.append(f"{agent_id} (state {info.state!r})")
                self.last_status[agent_id] = info.state
            return observe_agent(agent_id, info, now)

        def timed_agent_left(agent_id: str) -> Any:
            self.left_at.setdefault(agent_id, time.time())
            return agent_left(agent_id)

        def timed_observe_registry(entries: list[RegisteredAgent], now: float) -> Any:
            before = time.perf_counter()
            try:
                return observe_registry(entries, now)
            finally:
                self.registry_apply.append((len(entries), time.perf_counter() - before))

        state.observe_agent = timed_observe_agent  # type: ignore[method-assign]
        state.observe_registry = timed_observe_registry  # type: ignore[method-assign]
        state.agent_left = timed_agent_left  # type: ignore[method-assign]

    async def bring_up_fleet(self) -> None:
        """The fleet process registers every agent (timed), then hellos and heartbeats."""
        n = self.n
        self.cleanup.services.update(self.fleet_ids)
        registered_file = self.dir / "registered.json"
        cfg = {"name": self.name, "registry_url": REGISTRY_URL, "keyring": str(self.keyring_path),
               "data_dir": str(self.dir), "liveness": self.liveness,
               "registry": self.registry_cfg, "agents": self.fleet_ids,
               "stats": str(self.dir / "fleet-stats.json"), "registered": str(registered_file)}
        cfg_path = self.dir / "fleet.json"
        write_json(cfg_path, cfg)
        assert self.counting is not None
        pids = {"consul": consul_pid()}
        self.fleet_proc = self.children.spawn(
            "fleet", [PYTHON, str(THIS_FILE), "--fleet-child", str(cfg_path)],
            env=child_env(), cwd=ROOT)
        # CPU from here until the registrations are done: for the bench process, mostly the
        # coordinator's blocking queries (every change returns the whole list); for the fleet
        # process, its start-up and the registration calls.
        before = self._cpu(pids)
        await wait_for(lambda: file_exists(registered_file) or self.fleet_proc.poll() is not None,
                       max(60, n / 5), f"the fleet process to register {n} agents")
        after = self._cpu(pids)
        if self.fleet_proc.poll() is not None:
            raise RuntimeError(f"the fleet process exited:\n{self.children.tail('fleet')}")
        registration = read_json(registered_file)
        listed = await wait_for(
            lambda: all(a in self.coord.state.agents for a in self.fleet_ids), 60,
            f"the coordinator to list all {n} agents from Consul")
        window = registration["seconds"]
        self.result["register"] = {
            "seconds": window, "per_s": n / window, "errors": registration["errors"],
            "listed_s": listed - registration["started_at"],
            "watch_returns": self.counting.watch_returns,
            "cpu_s": {k: after[k] - before[k] for k in after},
        }
        cpu = self.result["register"]["cpu_s"]
        print(f"  the fleet process registered {n} agents in Consul in {window:.2f}s "
              f"({n / window:.0f}/s, {REGISTER_CONCURRENCY} calls in flight, "
              f"{registration['errors']} errors); the coordinator listed all of them "
              f"{listed - registration['started_at']:.2f}s after the first call, after "
              f"{self.counting.watch_returns} blocking-query returns; CPU s meanwhile: "
              f"coordinator {cpu['bench']:.1f}, Consul {cpu['consul']:.1f}, "
              f"fleet process {cpu['fleet']:.1f} (incl. start-up)", flush=True)
        started = time.time()
        healthy = await wait_for(
            lambda: all(self.agent_is(a, AgentLiveness.HEALTHY) for a in self.fleet_ids), 120,
            f"all {n} fleet agents healthy") - started
        self.result["fleet_healthy_s"] = healthy
        print(f"  all {n} healthy in the coordinator {healthy:.2f}s after that (hello, then "
              f"heartbeats every {self.opts.heartbeat_s:g}s)", flush=True)

    async def steady(self) -> None:
        """Load of the idle fleet: CPU of each party, blocking queries that returned."""
        assert self.counting is not None
        pids = {"consul": consul_pid()}
        before = self._cpu(pids)
        watches = self.counting.watch_returns
        self.lag.take()
        lane = status_latency(self.metrics)
        started = time.perf_counter()
        await asyncio.sleep(self.opts.steady_s)
        elapsed = time.perf_counter() - started
        after = self._cpu(pids)
        load: dict[str, Any] = {k: (after[k] - before[k]) / elapsed for k in before}
        load["status_lane"] = latency_between(lane, status_latency(self.metrics))
        load["watch_returns_per_s"] = (self.counting.watch_returns - watches) / elapsed
        load["loop_lag_p99_ms"] = percentile(self.lag.take(), 99) * 1000
        self.result["steady"] = load
        print(f"  idle fleet over {elapsed:.1f}s, CPU cores: bench process (coordinator) "
              f"{load['bench']:.2f}, fleet process {load['fleet']:.2f}, RabbitMQ "
              f"{load['broker']:.2f}, Consul {load['consul']:.3f}; blocking queries returned "
              f"{load['watch_returns_per_s']:.1f}/s; loop lag p99 {load['loop_lag_p99_ms']:.1f} ms;"
              f" {lane_text(load['status_lane'])}", flush=True)
        await self.refresh_cost(pids)

    async def refresh_cost(self, pids: dict[str, int | None]) -> None:
        """Consul's CPU per TTL refresh with this many services on the agent: REFRESH_SAMPLE
        refreshes of fleet agents, one after the other (the fleet's own go on meanwhile)."""
        sample = [self.fleet_ids[i % self.n] for i in range(REFRESH_SAMPLE)]
        random.shuffle(sample)
        latencies = []
        before = pid_cpu_seconds(pids["consul"])
        started = time.perf_counter()
        for agent_id in sample:
            t = time.perf_counter()
            await self.registry.refresh_agent(agent_id)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        consul = pid_cpu_seconds(pids["consul"]) - before
        # What the fleet's own refreshes cost meanwhile, at the rate they run at, is taken off.
        background = self.result["steady"]["consul"] * elapsed
        per_refresh = (max(0.0, consul - background) / len(sample) if consul == consul
                       else float("nan"))  # NaN: the shared Consul's process was not found
        cost = {"refreshes": len(sample), "consul_cpu_ms": per_refresh * 1000,
                "latency_p50_ms": percentile(latencies, 50) * 1000,
                "latency_p99_ms": percentile(latencies, 99) * 1000}
        priced = []
        for ttl in sorted({self.opts.ttl_s, DEFAULT_TTL_S}):
            nominal = self.n / (ttl / 3)
            rate = nominal / 0.9  # every ttl/3 x U(0.8, 1): a mean period of 0.9 ttl/3
            cost[f"ttl_{ttl:g}s"] = {"refreshes_per_s_nominal": nominal,
                                     "refreshes_per_s": rate, "consul_cores": rate * per_refresh}
            priced.append(f"ttl_s={ttl:g}: {nominal:.1f}/s nominal, {rate:.1f}/s with jitter "
                          f"= {rate * per_refresh:.2f} Consul cores")
        self.result["refresh_cost"] = cost
        print(f"  TTL refresh: {per_refresh * 1000:.2f} ms of Consul CPU each, with {self.n}+ "
              f"services on the agent (latency p50 {cost['latency_p50_ms']:.1f} ms); the fleet "
              f"at {'; at '.join(priced)}", flush=True)

    def _cpu(self, pids: dict[str, int | None]) -> dict[str, float]:
        return {"bench": time.process_time(), "fleet": group_cpu_seconds([self.fleet_proc.pid]),
                "broker": broker_cpu_seconds(), "consul": pid_cpu_seconds(pids["consul"])}

    async def probes(self) -> None:
        to_hello, to_assign, to_handler, to_passing, flaps = [], [], [], [], []
        self.lag.take()
        lane = status_latency(self.metrics)
        for j, agent_id in enumerate(self.probe_ids):
            sample = await self.probe_once(j, agent_id)
            to_hello.append(sample["hello"])
            to_assign.append(sample["assigned"])
            to_handler.append(sample["handler"])
            to_passing.append(sample["consul_passing"])
            if sample["not_healthy"]:
                flaps.append(f"{agent_id}: {sample['not_healthy']}")
        self.result["probe"] = {"hello_s": stats(to_hello), "assigned_s": stats(to_assign),
                                "handler_s": stats(to_handler),
                                "consul_passing_s": stats(to_passing), "flaps": flaps,
                                "loop_lag_p99_ms": percentile(self.lag.take(), 99) * 1000,
                                "status_lane": latency_between(lane, status_latency(self.metrics))}
        a, h = stats(to_assign), stats(to_handler)
        print(f"  registration -> first assignment, {len(to_assign)} probes: p50 "
              f"{a['p50'] * 1000:.1f} ms, p99 {a['p99'] * 1000:.1f} ms, max "
              f"{a['max'] * 1000:.1f} ms (hello handled: p50 "
              f"{stats(to_hello)['p50'] * 1000:.1f} ms; handler started: p50 "
              f"{h['p50'] * 1000:.1f} ms); "
              f"passing in Consul as the coordinator sees it: p50 "
              f"{stats(to_passing)['p50'] * 1000:.0f} ms; "
              f"{lane_text(self.result['probe']['status_lane'])}", flush=True)
        for flap in flaps:
            print(f"    not assignable after its hello: {flap}", flush=True)

    async def probe_once(self, j: int, agent_id: str) -> dict[str, Any]:
        task_id = f"{self.prefix}-probe-task-{j}"
        task = self.submit(task_id, "probe", {"op": "noop"})
        await asyncio.sleep(0.05)
        if task.attempts:
            raise RuntimeError(f"{task_id} was assigned before its probe started: {task.attempts}")
        handled: dict[str, float] = {}

        async def handler(ctx: TaskContext) -> Any:
            handled.setdefault(ctx.task_id, time.time())
            return None

        worker = WorkerAgent(agent_id, "probe", handler, settings=self.settings,
                             keyring=self.keyring, max_concurrency=1)
        self.cleanup.services.add(agent_id)
        self.cleanup.workers.append(worker)
        not_healthy: list[str] = []

        def watch_liveness() -> bool:
            agent = self.coord.state.agents.get(agent_id)
            if agent is not None and agent.heard and agent.liveness is not AgentLiveness.HEALTHY:
                label = f"{agent.liveness.value}({agent.liveness_reason})"
                if not not_healthy or not_healthy[-1] != label:
                    not_healthy.append(label)
            return agent is not None and agent.registry is RegistryHealth.PASSING

        started = time.time()
        await worker.start()
        await wait_for(lambda: task_id in handled, 30, f"{task_id} to reach {agent_id}")
        passing = await wait_for(watch_liveness, 10, f"{agent_id} passing in Consul")
        # A moment more: a suspect/recovering spell after its registration would show now.
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            watch_liveness()
            await asyncio.sleep(POLL_S)
        attempt = task.attempts[0]
        if attempt.agent_id != agent_id:
            raise RuntimeError(f"{task_id} went to {attempt.agent_id}, not {agent_id}")
        await worker.stop(timeout=2)
        self.cleanup.workers.remove(worker)
        # Everything it sent has been handled: its goodbye (tasks lane) and its last status,
        # "draining" (status lane, which may lag behind). Until then a late "ready" heartbeat
        # could bring it back and take the next probe's task.
        await wait_for(lambda: agent_id in self.left_at
                       and self.last_status.get(agent_id) == "draining", 30,
                       f"{agent_id}'s goodbye and last status to be handled")
        # And the registry answer without it is applied (with n agents, that costs the
        # coordinator O(n)): the next probe does not start in this one's wake.
        await wait_for(lambda: getattr(self.coord.state.agents.get(agent_id), "registry",
                                       RegistryHealth.ABSENT) is RegistryHealth.ABSENT, 30,
                       f"{agent_id} gone from Consul")
        return {"hello": self.hello_at[agent_id] - started,
                "assigned": attempt.started_at - started, "handler": handled[task_id] - started,
                "consul_passing": passing - started, "not_healthy": not_healthy}

    def spawn_doomed(self, k: int) -> Any:
        agent_id = self.doomed_ids[k]
        own_keys = self.dir / f"{agent_id}.keyring.json"
        self.keyring.subset(agent_id).save(own_keys)
        self.cleanup.services.add(agent_id)
        env = child_env(
            COORDINATOR_NAME=self.name, COORDINATOR_BROKER_URL=BROKER_URL,
            COORDINATOR_REGISTRY_URL=REGISTRY_URL, COORDINATOR_KEYRING_PATH=str(own_keys),
            COORDINATOR_DATA_DIR=str(self.dir), COORDINATOR_LOG_LEVEL="WARNING",
            COORDINATOR_LIVENESS__HEARTBEAT_INTERVAL_S=str(self.opts.heartbeat_s),
            COORDINATOR_LIVENESS__SUSPECT_AFTER=str(self.opts.suspect_after),
            COORDINATOR_LIVENESS__DEAD_AFTER=str(self.opts.dead_after),
            COORDINATOR_REGISTRY__TTL_S=str(self.opts.ttl_s),
            COORDINATOR_LIMITS__DRAIN_TIMEOUT_S="1",  # a clean-up's SIGTERM ends it at once
            COORDINATOR_REGISTRY__AGENT_SERVICE=self.registry_cfg["agent_service"],
        )
        return self.children.spawn(
            agent_id, [PYTHON, "-c", WORKER_BOOT, "worker", "--id", agent_id,
                       "--kind", f"hold-{k}", "--concurrency", str(self.opts.hold)],
            env=env, cwd=ROOT)

    async def deaths(self) -> None:
        """Kill after kill, in ``lanes`` concurrent lanes staggered over the detection window
        (with 2, a second agent is killed while the first one's silence is being waited out);
        every kill is timed on its own."""
        lane_count = max(1, min(self.opts.lanes, self.opts.deaths))
        samples: dict[int, dict[str, float]] = {}
        lane = status_latency(self.metrics)
        window = self.opts.dead_after * self.opts.heartbeat_s

        async def run_lane(first: int) -> None:
            await asyncio.sleep(first * window / lane_count)
            for k in range(first, self.opts.deaths, lane_count):
                rnd = await self.prepare_death(k)
                samples[k] = sample = await self.kill_and_measure(rnd)
                print(f"    kill {k + 1}: dead after {sample['dead']:.2f}s, {self.opts.hold} "
                      f"tasks reassigned after {sample['assigned']:.2f}s, all started after "
                      f"{sample['handler']:.2f}s (silent {sample['silent']:.2f}s when killed)",
                      flush=True)

        lanes = [asyncio.create_task(run_lane(i)) for i in range(lane_count)]
        try:
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
        dead = [samples[k]["dead"] for k in sorted(samples)]
        assigned = [samples[k]["assigned"] for k in sorted(samples)]
        handler = [samples[k]["handler"] for k in sorted(samples)]
        backoff = retry_backoff(self.coord)
        self.result["retry_backoff_s"] = backoff
        self.result["death"] = {"dead_s": stats(dead), "assigned_s": stats(assigned),
                                "handler_s": stats(handler), "lanes": lane_count,
                                "status_lane": latency_between(lane, status_latency(self.metrics))}
        a, d = stats(assigned), stats(dead)
        print(f"  SIGKILL -> reassignment, {len(assigned)} kills: p50 {a['p50']:.2f}s, p99 "
              f"{a['p99']:.2f}s, max {a['max']:.2f}s; -> declared dead: p50 {d['p50']:.2f}s, "
              f"max {d['max']:.2f}s (bound: dead_after x heartbeat = {window:g}s of silence + "
              f"<= {SWEEP_INTERVAL_S:g}s to the sweep, then the retry backoff of "
              f"{backoff if backoff is not None else '?'}s); "
              f"{lane_text(self.result['death']['status_lane'])}", flush=True)

    async def prepare_death(self, k: int) -> DeathRound:
        """Doomed agent k (a subprocess) holds its tasks; an idle rescuer of the same kind is
        up; both are healthy and passing in Consul as the coordinator sees them."""
        proc = self.spawn_doomed(k)
        doomed, rescuer_id, kind = self.doomed_ids[k], self.rescue_ids[k], f"hold-{k}"
        await wait_for(lambda: self.ready(doomed), 60, f"{doomed} up and passing in Consul")
        task_ids = [f"{self.prefix}-hold-{k}-{i}" for i in range(self.opts.hold)]
        tasks = [self.submit(t, kind, {"op": "sleep", "seconds": 240}) for t in task_ids]
        rnd = DeathRound(k, doomed, rescuer_id, proc, tasks)
        await wait_for(lambda: self.holds(rnd), 30, f"{doomed} to run its {len(tasks)} tasks")

        async def rescue(ctx: TaskContext) -> Any:
            rnd.handled.setdefault(ctx.task_id, time.time())
            return {"rescued": True}

        rnd.rescuer = WorkerAgent(rescuer_id, kind, rescue, settings=self.settings,
                                  keyring=self.keyring, max_concurrency=len(tasks))
        self.cleanup.services.add(rescuer_id)
        self.cleanup.workers.append(rnd.rescuer)
        await rnd.rescuer.start()
        await wait_for(lambda: self.ready(rescuer_id), 30, f"{rescuer_id} up and passing")
        return rnd

    def holds(self, rnd: DeathRound) -> bool:
        agent = self.coord.state.agents.get(rnd.doomed)
        return (agent is not None and agent.reported_in_flight == len(rnd.tasks)
                and all(t.current_attempt is not None
                        and t.current_attempt.agent_id == rnd.doomed for t in rnd.tasks))

    async def kill_and_measure(self, rnd: DeathRound) -> dict[str, float]:
        if not self.holds(rnd) or not self.ready(rnd.rescuer_id):
            raise RuntimeError(f"kill {rnd.k + 1}: {rnd.doomed} no longer holds its tasks, or "
                               f"{rnd.rescuer_id} is not assignable")
        # A crash comes at any moment: not in step with the agent's heartbeats.
        await asyncio.sleep(random.uniform(0, self.opts.heartbeat_s))
        silent = time.time() - self.coord.state.agents[rnd.doomed].last_seen
        killed = time.time()
        os.kill(rnd.proc.pid, signal.SIGKILL)
        bound = self.opts.dead_after * self.opts.heartbeat_s
        await wait_for(lambda: all(any(a.agent_id == rnd.rescuer_id for a in t.attempts)
                                   for t in rnd.tasks), bound + 20,
                       f"the tasks of {rnd.doomed} to move to {rnd.rescuer_id}")
        await wait_for(lambda: len(rnd.handled) == len(rnd.tasks), 10,
                       f"{rnd.rescuer_id} to start them")
        firsts = [t.attempts[0] for t in rnd.tasks]
        # Started on the killed agent: crashed; still queued there: withdrawn (no retry spent).
        lost = (AttemptOutcome.CRASHED, AttemptOutcome.WITHDRAWN)
        if any(a.outcome not in lost for a in firsts):
            raise RuntimeError(f"unexpected first outcomes: {[a.outcome for a in firsts]}")
        ended = [a.ended_at for a in firsts if a.ended_at is not None]
        new = [a.started_at for t in rnd.tasks for a in t.attempts
               if a.agent_id == rnd.rescuer_id]
        assert rnd.rescuer is not None
        await rnd.rescuer.stop(timeout=2)
        self.cleanup.workers.remove(rnd.rescuer)
        await asyncio.to_thread(rnd.proc.wait, 10)
        with contextlib.suppress(DiscoveryError):  # killed: it could not deregister itself
            await self.registry.deregister_agent(rnd.doomed)
        return {"dead": min(ended) - killed, "assigned": max(new) - killed,
                "handler": max(rnd.handled.values()) - killed, "silent": silent}

    async def tear_down_fleet(self) -> None:
        await asyncio.to_thread(self.children.stop_all)  # SIGTERM: the fleet writes its stats
        fleet = read_json(self.dir / "fleet-stats.json")
        took = await deregister(self.registry, self.fleet_ids)
        self.cleanup.services.difference_update(self.fleet_ids)
        period = self.opts.ttl_s / 3
        fleet["refreshes_per_s"] = fleet["refreshes"] / fleet["elapsed_s"]
        fleet["refreshes_per_s_nominal"] = self.n / period
        fleet["refreshes_per_s_with_jitter"] = self.n / (period * 0.9)
        fleet["deregister_s"] = took
        self.result["fleet"] = fleet
        assert self.counting is not None
        self.result["watch_returns"] = self.counting.watch_returns
        self.result["watch_entries"] = self.counting.watch_entries
        applied = [seconds for _, seconds in self.registry_apply]
        self.result["registry_apply"] = {
            "count": len(applied), "entries_max": max((e for e, _ in self.registry_apply),
                                                      default=0),
            "p50_ms": percentile(applied, 50) * 1000, "max_ms": max(applied, default=0) * 1000}
        self.result["revivals"] = list(self.revivals)
        if self.revivals:
            print(f"  {len(self.revivals)} agent.status arrived after the agent's goodbye and "
                  f"brought it back: {', '.join(self.revivals[:5])}", flush=True)
        ra = self.result["registry_apply"]
        print(f"  the coordinator applied {ra['count']} registry answers (up to "
              f"{ra['entries_max']} entries): p50 {ra['p50_ms']:.2f} ms, max {ra['max_ms']:.1f} "
              "ms each in StateManager.observe_registry (parsing not included)", flush=True)
        print(f"  fleet: {fleet['heartbeats']} heartbeats (latest {fleet['lag_max_s'] * 1000:.0f}"
              f" ms behind schedule), {fleet['publish_errors']} publish errors; "
              f"{fleet['refreshes']} TTL refreshes = {fleet['refreshes_per_s']:.1f}/s "
              f"(nominal n / (ttl/3) = {fleet['refreshes_per_s_nominal']:.1f}/s), "
              f"{fleet['refresh_errors']} errors, p99 {fleet['refresh_latency_p99_s'] * 1000:.1f}"
              f" ms; deregistered {self.n} in {took:.2f}s", flush=True)
        await self.coord.stop()
        self.cleanup.coordinators.remove(self.coord)
        await self.registry.close()


def child_env(**extra: str) -> dict[str, str]:
    return clean_environ(COORDINATOR_CONFIG=os.environ["COORDINATOR_CONFIG"], **extra)


# --- driver -----------------------------------------------------------------------------------


async def run(fleets: Iterable[int] = (10, 100, 1000), probes: int = 15, deaths: int = 10,
              hold: int = 4, heartbeat_s: float = 2.0, dead_after: float = 5.0,
              ttl_s: float = 120.0, steady_s: float = 4.0, lanes: int = 2) -> dict[str, Any]:
    opts = Options(fleets=list(fleets), probes=probes, deaths=deaths, hold=hold,
                   heartbeat_s=heartbeat_s, dead_after=dead_after, ttl_s=ttl_s,
                   steady_s=steady_s, lanes=lanes)
    uid = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-discovery-{uid}-"))
    saved_config = os.environ.get("COORDINATOR_CONFIG")
    os.environ["COORDINATOR_CONFIG"] = str(empty_config(workdir))
    # The in-process coordinator and agents log to a file, not over the figures.
    package_log = logging.getLogger("coordinator_agent")
    handler = logging.FileHandler(workdir / "bench.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    saved_log = (package_log.level, package_log.propagate)
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    settings = load_settings(
        liveness={"heartbeat_interval_s": heartbeat_s, "dead_after": dead_after},
        registry={"ttl_s": ttl_s})
    load_at_start = os.getloadavg()
    print_settings(opts, settings)
    print(f"  revision {revision()}; {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.2f}' for x in load_at_start)}", flush=True)
    started = time.monotonic()
    cleanup = Cleanup(uid, ConsulRegistry(REGISTRY_URL, settings.registry))
    results: list[dict[str, Any]] = []
    failed = True
    # SIGTERM cancels this task, as Ctrl-C does: the clean-up below then runs with the event
    # loop and every connection still up (a KeyboardInterrupt raised inside the loop would
    # have asyncio cancel everything at once, the clean-up's own connections included).
    loop, this = asyncio.get_running_loop(), asyncio.current_task()
    assert this is not None
    terminated: list[bool] = []
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, lambda: (terminated.append(True), this.cancel()))
    try:
        await check_services()
        for n in opts.fleets:
            results.append(await FleetRun(n, opts, uid, workdir, cleanup).run())
        failed = False
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        if failed:
            print("  stopping: cleaning up (deregistering, deleting queues)", flush=True)
        await cleanup.run()
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous_sigterm)
        package_log.removeHandler(handler)
        handler.close()
        package_log.setLevel(saved_log[0])
        package_log.propagate = saved_log[1]
        restore_env("COORDINATOR_CONFIG", saved_config)
        if failed:
            print(f"  logs kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "benchmark": "discovery", "seconds": round(time.monotonic() - started, 1),
        "revision": revision(), "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "settings": {"heartbeat_interval_s": heartbeat_s, "suspect_after": opts.suspect_after,
                     "dead_after": dead_after, "sweep_interval_s": SWEEP_INTERVAL_S,
                     "ttl_s": ttl_s, "watch_wait_s": settings.registry.watch_wait_s,
                     "retry_backoff_s": next((r.get("retry_backoff_s") for r in results), None),
                     "agent_service": f"bench-dsc-{uid}",
                     "hold": hold, "kill_lanes": lanes,
                     "register_concurrency": REGISTER_CONCURRENCY},
        "fleets": results,
    }
    report(summary)
    return summary


def revision() -> str:
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "coordinator_agent"],
                               cwd=ROOT, check=False, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{found or 'unknown'}{' (coordinator_agent modified)' if dirty else ''}"


def print_settings(opts: Options, settings: Settings) -> None:
    live, reg = settings.liveness, settings.registry
    print(f"discovery and liveness: fleets {', '.join(map(str, opts.fleets))}; {opts.probes} "
          f"probes and {opts.deaths} kills each (each kill: {opts.hold} sleep tasks in flight)",
          flush=True)
    print(f"  liveness: heartbeat_interval_s={live.heartbeat_interval_s:g} "
          f"suspect_after={live.suspect_after:g} dead_after={live.dead_after:g} "
          f"recover_after={live.recover_after} (sweep every {SWEEP_INTERVAL_S:g}s)", flush=True)
    print(f"  registry: {REGISTRY_URL} ttl_s={reg.ttl_s:g} (refresh every ttl_s/3 = "
          f"{reg.ttl_s / 3:g}s x U(0.8, 1)) watch_wait_s={reg.watch_wait_s:g} "
          f"deregister_critical_after_s={reg.deregister_critical_after_s}", flush=True)
    print(f"  death detection is bounded by dead_after x heartbeat_interval_s = "
          f"{live.dead_after * live.heartbeat_interval_s:g}s of AMQP silence (+ <= "
          f"{SWEEP_INTERVAL_S:g}s to the next sweep); Consul's TTL ({reg.ttl_s:g}s) is longer "
          "and plays no part in it", flush=True)


async def check_services() -> None:
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"{REGISTRY_URL}/v1/status/leader", timeout=aiohttp.ClientTimeout(total=5)
        ) as response:
            leader = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise RuntimeError(f"no Consul at {REGISTRY_URL} ({exc!r}): run "
                           "`bash scripts/services.sh consul`") from None
    if not leader:
        raise RuntimeError(f"Consul at {REGISTRY_URL} has no leader yet")
    connection = await aio_pika.connect(BROKER_URL, timeout=10)
    await connection.close()


def report(summary: dict[str, Any]) -> None:
    s = summary["settings"]
    bound = s["dead_after"] * s["heartbeat_interval_s"]
    rows = []
    for fleet in summary["fleets"]:
        a, d = fleet["probe"]["assigned_s"], fleet["death"]["assigned_s"]
        rows.append([fleet["agents"], a["n"], a["p50"] * 1000, a["p99"] * 1000, a["max"] * 1000,
                     d["n"], d["p50"], d["p99"], d["max"]])
    print(f"\ndiscovery and liveness ({summary['seconds']:.0f}s; heartbeat "
          f"{s['heartbeat_interval_s']:g}s, dead_after {s['dead_after']:g} -> death detection "
          f"bound {bound:g}s + {s['sweep_interval_s']:g}s sweep, then a retry backoff of "
          f"{s['retry_backoff_s']}s; TTL {s['ttl_s']:g}s)")
    print(table(["agents", "probes", "start->assigned p50 ms", "p99 ms", "max ms",
                 "kills", "kill->reassigned p50 s", "p99 s", "max s"], rows))
    load_rows = []
    for fleet in summary["fleets"]:
        reg, steady, fl, cost = (fleet["register"], fleet["steady"], fleet["fleet"],
                                 fleet["refresh_cost"])
        default = cost.get(f"ttl_{DEFAULT_TTL_S:g}s", {})
        load_rows.append([fleet["agents"], reg["seconds"], reg["per_s"],
                          fl["refreshes_per_s_nominal"], fl["refreshes_per_s"],
                          cost["consul_cpu_ms"], default.get("consul_cores", float("nan")),
                          steady["bench"], steady["fleet"],
                          steady["status_lane"]["mean_ms"]])
    print(table(["agents", "register s", "reg/s", f"refresh/s (ttl {s['ttl_s']:g}s / 3)",
                 "measured", "Consul CPU ms/refresh", f"Consul cores at ttl {DEFAULT_TTL_S:g}s",
                 "coordinator cores", "fleet cores", "heartbeat lag ms"], load_rows))
    print(json.dumps(summary, default=str, separators=(",", ":")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleets", default="10,100,1000",
                        help="comma-separated fleet sizes (registered agents)")
    parser.add_argument("--probes", type=int, default=15, help="new agents per fleet size")
    parser.add_argument("--deaths", type=int, default=10, help="SIGKILLs per fleet size")
    parser.add_argument("--hold", type=int, default=4, help="tasks in flight on a killed agent")
    parser.add_argument("--heartbeat", type=float, default=2.0,
                        help="liveness.heartbeat_interval_s (agents and coordinator)")
    parser.add_argument("--dead-after", type=float, default=5.0, help="liveness.dead_after")
    parser.add_argument("--ttl", type=float, default=120.0,
                        help="registry.ttl_s (shipped default: 30; see the docstring)")
    parser.add_argument("--steady", type=float, default=4.0,
                        help="seconds of idle fleet over which load is measured")
    parser.add_argument("--lanes", type=int, default=2,
                        help="kills in flight at once, staggered (1: one after the other)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fleets 10,100; 3 probes, 2 kills")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--fleet-child", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.fleet_child:
        asyncio.run(fleet_child(read_json(args.fleet_child)))
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    if args.quick:
        args.fleets, args.probes, args.deaths = "10,100", 3, 2
    fleets = [int(x) for x in args.fleets.split(",") if x.strip()]
    summary = asyncio.run(run(fleets, args.probes, args.deaths, args.hold, args.heartbeat,
                              args.dead_after, args.ttl, args.steady, args.lanes))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
