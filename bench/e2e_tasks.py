"""End-to-end no-op tasks: submit -> assign -> result -> completed, against two baselines.

Processes as in a deployment, all on this machine and its RabbitMQ (127.0.0.1):

* ours:   ``python -m coordinator_agent run`` (coordinator), ``python -m coordinator_agent
          worker`` (one agent, example handler, input {"op": "noop"}), and a CoordinatorClient
          in this process.
* raw:    bench/raw_responder.py (aio-pika: consume with manual acks, publish a confirmed reply)
          and an aio-pika request/reply client in this process. The floor for two broker hops.
* raw4:   the same over our four hops and queue types (a relay in the coordinator's place:
          quorum submission queue, classic agent queue, quorum results queue, classic reply
          queue; every forward confirmed before its ack). The floor the broker alone sets
          for our design, with none of its work.
* celery: ``celery -A bench.celery_app worker --pool=prefork -c 2`` with the amqp broker and the
          rpc:// result backend, the client in this process.

For each system and round: (a) burst: submit N tasks as fast as possible, each with its
client's bulk path (ours: ``submit_many``, batch messages of 64; raw: concurrent publishes;
Celery: ``delay()`` in a loop), and wait for every completion -> tasks/s; (b) sequential: M
tasks one at a time, submit -> completed -> p50/p99 latency. Rounds interleave the systems
(rotating the order) so that noise on the shared machine hits all of them; the medians of the
rounds are reported.

    .venv/bin/python bench/e2e_tasks.py [--tasks 2000] [--latency-tasks 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import aio_pika
from _common import (
    BROKER_URL,
    PYTHON,
    ROOT,
    Children,
    Goal,
    broker_cpu_seconds,
    clean_environ,
    delete_queues,
    empty_config,
    group_cpu_seconds,
    median,
    percentile,
    ratio,
    restore_env,
    table,
    verdict,
)
from aio_pika.abc import AbstractIncomingMessage
from pydantic import SecretStr

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.settings import load_settings
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace

#: Design-doc targets, checked against Celery measured in the same run.
TARGET_THROUGHPUT_VS_CELERY = 1.25
TARGET_P50_VS_CELERY = 1.0
TARGET_P99_VS_CELERY = 1.5
#: The coordinator's own CPU per task in the burst, an absolute bound.
TARGET_COORDINATOR_CPU_MS = 0.8

NOOP_INPUT = {"op": "noop"}
WARM_UP_TASKS = 30
STARTUP_TIMEOUT_S = 90.0
CONSUL_URL = "http://127.0.0.1:8500"
LATENCY_TASK_TIMEOUT_S = 30.0


class Profiler:
    """py-spy (if installed) on the coordinator and agent processes during one phase."""

    def __init__(self, children: Children, out_dir: Path | None) -> None:
        self.children = children
        self.out_dir = out_dir
        exe = Path(PYTHON).parent / "py-spy"
        self.exe = str(exe) if exe.exists() else shutil.which("py-spy")
        if out_dir is not None and self.exe is None:
            print("  --profile: py-spy is not installed (pip install py-spy); not profiling")

    @contextlib.asynccontextmanager
    async def phase(self, phase: str, names: tuple[str, ...]) -> Any:
        if self.out_dir is None or self.exe is None or not names:
            yield
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        procs = []
        for name in names:
            out = self.out_dir / f"{name}-{phase}.txt"
            procs.append(await asyncio.create_subprocess_exec(
                self.exe, "record", "--pid", str(self.children.pid(name)), "--rate", "250",
                "--nonblocking", "--format", "raw", "--output", str(out),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            ))
        await asyncio.sleep(0.5)  # let py-spy attach
        try:
            yield
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            print(f"  profiles of {', '.join(names)} ({phase}) in {self.out_dir}", flush=True)


def cpu_snapshot(children: Children, names: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds so far of the named children (with their process groups), of this process
    (the client) and of the broker."""
    snap = {name: group_cpu_seconds([children.pid(name)]) for name in names}
    snap["client"] = time.process_time()
    snap["broker"] = broker_cpu_seconds()
    return snap


async def guarded(children: Children, awaitable: Any) -> Any:
    """Await ``awaitable``, failing as soon as one of the child processes exits."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            children.check_alive()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def burst_timeout(n: int) -> float:
    return max(60.0, n / 25.0)


class System(Protocol):
    label: str
    #: Names of this system's child processes (Children.spawn names).
    processes: tuple[str, ...]

    async def start(self) -> None: ...
    async def warm_up(self) -> None: ...
    async def burst(self, n: int, batch: int) -> tuple[float, float]: ...
    async def sequential(self, m: int) -> list[float]: ...
    async def close(self) -> None: ...
    async def cleanup(self) -> None: ...


# --- ours -------------------------------------------------------------------------------------


class Ours:
    label = "coordinator_agent"

    def __init__(
        self, children: Children, workdir: Path, uid: str, *, agent_concurrency: int,
        in_flight_cap: int, event_loop: str = "auto", ha: bool = False,
        source: Path | None = None, client_batch: bool = False, agent_batch_limit: int = 16,
    ) -> None:
        self.children = children
        #: Another source tree's coordinator and agent (``--base-tree``): a before/after in one
        #: run. Its processes and files are named apart; it gets no setting it may not know.
        self.source = source
        prefix = "base-" if source is not None else ""
        if source is not None:
            self.label = "coordinator_agent (base)"
            workdir = workdir / "base"
            workdir.mkdir(parents=True, exist_ok=True)
            uid = f"{uid}b"
        self.processes = (f"{prefix}coordinator", f"{prefix}agent")
        self.workdir = workdir
        self.name = f"bench-{uid}"
        self.agent_id = "bench-agent-1"
        self.operator = "bench-operator"
        self.agent_concurrency = agent_concurrency
        self.in_flight_cap = in_flight_cap
        self.cli = [PYTHON, "-m", "coordinator_agent"]
        #: The coordinator's and agent's ``event_loop`` setting (auto: uvloop where installed).
        self.event_loop = event_loop
        #: ha.enabled: the coordinator campaigns for its lease in Consul and leads alone.
        self.ha = ha
        #: Submit the burst with ``submit_many`` (batch messages; a base tree gets them too, so
        #: its coordinator must take them), and the agent's ``--batch-limit`` (1: no batches).
        self.client_batch = client_batch
        self.agent_batch_limit = agent_batch_limit
        self.client: CoordinatorClient | None = None
        self.reply_queue: str | None = None

    async def start(self) -> None:
        keyring = Keyring()
        keyring.generate(self.agent_id, "agent")
        keyring.generate(self.operator, "operator")
        keyring_path = self.workdir / "keyring.json"
        keyring.save(keyring_path)
        config = empty_config(self.workdir)
        os.environ["COORDINATOR_CONFIG"] = str(config)  # for load_settings in this process
        env = clean_environ(
            COORDINATOR_CONFIG=str(config),
            COORDINATOR_NAME=self.name,
            COORDINATOR_BROKER_URL=BROKER_URL,
            COORDINATOR_KEYRING_PATH=str(keyring_path),
            COORDINATOR_DATA_DIR=str(self.workdir / "data"),
            COORDINATOR_MONITORING_PORT="0",
            COORDINATOR_LOG_LEVEL="WARNING",
            COORDINATOR_LIMITS__MAX_IN_FLIGHT_PER_AGENT=str(self.in_flight_cap),
        )
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        else:
            env["COORDINATOR_EVENT_LOOP"] = self.event_loop
        if self.ha:
            # The shared Consul (make services); names of this run's own, so nobody else's
            # agents or leases mix with it. The agent registers there too, as with HA deployed.
            env.update(COORDINATOR_REGISTRY_URL=CONSUL_URL, COORDINATOR_HA__ENABLED="true",
                       COORDINATOR_REGISTRY__AGENT_SERVICE=f"{self.name}-agents",
                       COORDINATOR_REGISTRY__COORDINATOR_SERVICE=f"{self.name}-coordinators")
        self.children.spawn(self.processes[0], [*self.cli, "run"], env=env, cwd=self.workdir)
        self.children.spawn(
            self.processes[1],
            [*self.cli, "worker", "--id", self.agent_id, "--concurrency",
             str(self.agent_concurrency),
             *(("--batch-limit", str(self.agent_batch_limit)) if self.source is None else ())],
            env=env, cwd=self.workdir,
        )
        settings = load_settings(
            name=self.name, broker_url=BROKER_URL, keyring_path=keyring_path,
            data_dir=self.workdir / "data", monitoring_port=0, log_level="WARNING",
        )
        self.client = CoordinatorClient(settings, keyring.subset(self.operator), self.operator)
        self.reply_queue = self.client.reply_queue
        await self.client.start()

    async def warm_up(self) -> None:
        # The first task also waits for the coordinator to start and the agent to say hello.
        await self._one(STARTUP_TIMEOUT_S)
        for _ in range(WARM_UP_TASKS):
            await self._one(LATENCY_TASK_TIMEOUT_S)

    async def _one(self, timeout: float) -> None:
        assert self.client is not None
        task_id = await self.client.submit("noop", input=NOOP_INPUT)
        done = await self.client.wait(task_id, timeout)
        if done.status != "succeeded":
            raise RuntimeError(f"task {task_id} ended {done.status}: {done.error}")

    async def burst(self, n: int, batch: int) -> tuple[float, float]:
        client = self.client
        assert client is not None
        started = time.perf_counter()
        ids: list[str] = []
        for i in range(0, n, batch):
            if self.client_batch:
                ids += await asyncio.wait_for(client.submit_many(
                    [{"description": "noop", "input": NOOP_INPUT}] * min(batch, n - i)),
                    burst_timeout(n))
                continue
            ids += await asyncio.wait_for(asyncio.gather(*(
                client.submit("noop", input=NOOP_INPUT) for _ in range(min(batch, n - i))
            )), burst_timeout(n))
        submitted = time.perf_counter() - started
        remaining = burst_timeout(n) - submitted
        results = await asyncio.wait_for(
            asyncio.gather(*(client.wait(task_id) for task_id in ids)), max(10.0, remaining)
        )
        elapsed = time.perf_counter() - started
        failed = [r for r in results if r.status != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} tasks did not succeed: {failed[0]}")
        # Completed tasks are not looked at again; keep the client's memory flat across rounds.
        for task_id in ids:
            client.completed.pop(task_id, None)
            client.accepted.pop(task_id, None)
        client.notices.clear()
        return n / elapsed, n / submitted

    async def sequential(self, m: int) -> list[float]:
        client = self.client
        assert client is not None
        latencies = []
        for _ in range(m):
            started = time.perf_counter()
            task_id = await client.submit("noop", input=NOOP_INPUT)
            done = await client.wait(task_id, LATENCY_TASK_TIMEOUT_S)
            latencies.append(time.perf_counter() - started)
            if done.status != "succeeded":
                raise RuntimeError(f"task {task_id} ended {done.status}: {done.error}")
        client.completed.clear()
        client.accepted.clear()
        client.notices.clear()
        return latencies

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def cleanup(self) -> None:
        await delete_namespace(SecretStr(BROKER_URL), self.name, [self.agent_id],
                               [self.operator])
        if self.reply_queue:
            await delete_queues([self.reply_queue])


# --- raw aio-pika request/reply ---------------------------------------------------------------


class Raw:
    """Plain aio-pika request/reply: two hops (client -> responder -> client), or with
    ``four_hops`` our four (client -> relay -> responder -> relay -> client) on our queue
    types (bench/raw_responder.py): the floor the broker alone sets for our design."""

    label = "raw aio-pika"
    processes: tuple[str, ...] = ("raw-responder",)

    def __init__(self, children: Children, uid: str, prefetch: int, *,
                 four_hops: bool = False) -> None:
        self.children = children
        self.four_hops = four_hops
        prefix = "raw4" if four_hops else "raw"
        self.queue = f"bench-{uid}.{prefix}-requests"
        self.prefetch = prefetch
        if four_hops:
            self.label = "raw aio-pika, our 4 hops"
            self.processes = ("raw4-relay", "raw4-responder")
            self.agent_queue = f"bench-{uid}.raw4-agent"
            self.results = f"bench-{uid}.raw4-results"
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._reply_to = ""
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        script = str(ROOT / "bench" / "raw_responder.py")
        prefetch = ("--prefetch", str(self.prefetch))
        if self.four_hops:
            self.children.spawn("raw4-relay", [PYTHON, script, self.queue, *prefetch,
                                               "--relay-to", self.agent_queue,
                                               "--results", self.results],
                                env=clean_environ(), cwd=ROOT)
            self.children.spawn("raw4-responder", [PYTHON, script, self.agent_queue, *prefetch],
                                env=clean_environ(), cwd=ROOT)
        else:
            self.children.spawn("raw-responder", [PYTHON, script, self.queue, *prefetch],
                                env=clean_environ(), cwd=ROOT)
        self._connection = await aio_pika.connect(
            BROKER_URL, timeout=10, client_properties={"connection_name": "bench-raw-client"}
        )
        channel = await self._connection.channel(publisher_confirms=True)
        await channel.declare_queue(self.queue, durable=True,
                                    arguments={"x-queue-type": "quorum"} if self.four_hops
                                    else None)
        replies = await channel.declare_queue("", exclusive=True, auto_delete=True)
        self._reply_to = replies.name
        await replies.consume(self._on_reply, no_ack=True)
        self._exchange = channel.default_exchange

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def _request(self) -> asyncio.Future[bytes]:
        assert self._exchange is not None
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        await self._exchange.publish(
            aio_pika.Message(
                b'{"op":"noop"}', correlation_id=correlation_id, reply_to=self._reply_to,
                content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.queue, timeout=10,
        )
        return future

    async def warm_up(self) -> None:
        await asyncio.wait_for(await self._request(), STARTUP_TIMEOUT_S)
        for _ in range(WARM_UP_TASKS):
            await asyncio.wait_for(await self._request(), LATENCY_TASK_TIMEOUT_S)

    async def burst(self, n: int, batch: int) -> tuple[float, float]:
        started = time.perf_counter()
        futures: list[asyncio.Future[bytes]] = []
        for i in range(0, n, batch):
            futures += await asyncio.wait_for(asyncio.gather(*(
                self._request() for _ in range(min(batch, n - i))
            )), burst_timeout(n))
        submitted = time.perf_counter() - started
        await asyncio.wait_for(asyncio.gather(*futures),
                               max(10.0, burst_timeout(n) - submitted))
        return n / (time.perf_counter() - started), n / submitted

    async def sequential(self, m: int) -> list[float]:
        latencies = []
        for _ in range(m):
            started = time.perf_counter()
            await asyncio.wait_for(await self._request(), LATENCY_TASK_TIMEOUT_S)
            latencies.append(time.perf_counter() - started)
        return latencies

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def cleanup(self) -> None:
        await delete_queues([self.queue, *((self.agent_queue, self.results)
                                           if self.four_hops else ())])


# --- Celery -----------------------------------------------------------------------------------


class CeleryBaseline:
    label = "celery"
    processes = ("celery-worker",)

    def __init__(self, children: Children, uid: str) -> None:
        self.children = children
        self.uid = uid
        self.queue = f"bench-{uid}.celery"
        # Celery's client is synchronous and not thread-safe: one dedicated thread for it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-client")
        self._app: Any = None
        self._noop: Any = None
        self._stop = threading.Event()  # ends a blocked get() once the benchmark gives up

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        os.environ["BENCH_CELERY_QUEUE"] = self.queue  # read by celery_app at import
        import celery_app

        celery_app.app.conf.task_default_queue = self.queue
        self._app, self._noop = celery_app.app, celery_app.noop
        self.children.spawn(
            "celery-worker",
            [PYTHON, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool=prefork",
             "-c", "2", "--loglevel=WARNING", "-Q", self.queue, "-n", f"bench-{self.uid}@%h"],
            env=clean_environ(BENCH_CELERY_QUEUE=self.queue), cwd=ROOT,
        )

    def _get(self, result: Any, deadline: float) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout

        while True:
            if self._stop.is_set():
                raise RuntimeError("benchmark stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"celery task {result.id} not done in time")
            try:
                return result.get(timeout=min(0.5, remaining))
            except CeleryTimeout:
                continue

    def _one_sync(self, timeout: float) -> None:
        self._get(self._noop.delay(), time.monotonic() + timeout)

    async def warm_up(self) -> None:
        await self._call(self._one_sync, STARTUP_TIMEOUT_S)
        for _ in range(WARM_UP_TASKS):
            await self._call(self._one_sync, LATENCY_TASK_TIMEOUT_S)

    def _burst_sync(self, n: int) -> tuple[float, float]:
        deadline = time.monotonic() + burst_timeout(n)
        started = time.perf_counter()
        results = [self._noop.delay() for _ in range(n)]
        submitted = time.perf_counter() - started
        for result in results:
            self._get(result, deadline)
        return n / (time.perf_counter() - started), n / submitted

    async def burst(self, n: int, batch: int) -> tuple[float, float]:
        result: tuple[float, float] = await self._call(self._burst_sync, n)
        return result

    def _sequential_sync(self, m: int) -> list[float]:
        latencies = []
        for _ in range(m):
            started = time.perf_counter()
            self._get(self._noop.delay(), time.monotonic() + LATENCY_TASK_TIMEOUT_S)
            latencies.append(time.perf_counter() - started)
        return latencies

    async def sequential(self, m: int) -> list[float]:
        result: list[float] = await self._call(self._sequential_sync, m)
        return result

    async def close(self) -> None:
        self._stop.set()
        if self._app is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(self._app.close), 10)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def cleanup(self) -> None:
        # task_default_queue also names a direct exchange of the same name.
        await delete_queues([self.queue], exchanges=[self.queue])


# --- driver -----------------------------------------------------------------------------------


async def run(
    *, tasks: int = 2000, latency_tasks: int = 300, rounds: int = 3, batch: int = 250,
    agent_concurrency: int = 64, in_flight_cap: int = 64, systems: tuple[str, ...] = (),
    keep_logs: bool = False, profile_dir: Path | None = None, event_loop: str = "auto",
    ha: bool = False, base_tree: Path | None = None, client_batch: bool = True,
    agent_batch_limit: int = 16,
) -> dict[str, Any]:
    uid = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{uid}-"))
    saved_config = os.environ.get("COORDINATOR_CONFIG")
    children = Children(workdir)
    profiler = Profiler(children, profile_dir)
    available: dict[str, System] = {
        "ours": Ours(children, workdir, uid, agent_concurrency=agent_concurrency,
                     in_flight_cap=in_flight_cap, event_loop=event_loop, ha=ha,
                     client_batch=client_batch, agent_batch_limit=agent_batch_limit),
        **({"base": Ours(children, workdir, uid, agent_concurrency=agent_concurrency,
                         in_flight_cap=in_flight_cap, ha=ha, source=base_tree,
                         client_batch=client_batch)}
           if base_tree is not None else {}),
        "raw": Raw(children, uid, prefetch=agent_concurrency),
        "raw4": Raw(children, uid, prefetch=agent_concurrency, four_hops=True),
        "celery": CeleryBaseline(children, uid),
    }
    chosen = [k for k in available if not systems or k in systems]
    measured: dict[str, dict[str, list[float]]] = {
        k: {"throughput": [], "submit_rate": [], "p50": [], "p99": [], "cpu_ms_server": [],
            "cpu_ms_client": [], "cpu_ms_broker": []} for k in chosen
    }
    print(f"e2e: {tasks} burst tasks, {latency_tasks} sequential, {rounds} round(s); "
          f"coordinator bench-{uid}; agent concurrency {agent_concurrency}, "
          f"in-flight cap {in_flight_cap}; event loop {event_loop}{'; ha.enabled' if ha else ''}; "
          f"agent batch limit {agent_batch_limit}"
          f"{'; client batch submit (submit_many)' if client_batch else '; single submits'}; "
          f"logs in {workdir}", flush=True)
    failed = False
    try:
        for key in chosen:
            await available[key].start()
        for key in chosen:
            await guarded(children, available[key].warm_up())
        for round_no in range(rounds):
            order = chosen[round_no % len(chosen):] + chosen[:round_no % len(chosen)]
            for key in order:
                system = available[key]
                children.check_alive()
                profiled: tuple[str, ...] = ()
                if key == "ours" and round_no == 0:
                    profiled = ("coordinator", "agent")
                async with profiler.phase("burst", profiled):
                    cpu_before = cpu_snapshot(children, system.processes)
                    throughput, submit_rate = await guarded(children,
                                                            system.burst(tasks, batch))
                    cpu_after = cpu_snapshot(children, system.processes)
                cpu_ms = {k: (cpu_after[k] - cpu_before[k]) * 1000 / tasks for k in cpu_after}
                async with profiler.phase("sequential", profiled):
                    latencies = await guarded(children, system.sequential(latency_tasks))
                p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
                m = measured[key]
                m["throughput"].append(throughput)
                m["submit_rate"].append(submit_rate)
                m["p50"].append(p50)
                m["p99"].append(p99)
                m["cpu_ms_server"].append(sum(cpu_ms[p] for p in system.processes))
                m["cpu_ms_client"].append(cpu_ms["client"])
                m["cpu_ms_broker"].append(cpu_ms["broker"])
                for process in system.processes:  # per process: cpu_ms_coordinator, ...
                    m.setdefault(f"cpu_ms_{process}", []).append(cpu_ms[process])
                detail = ", ".join(f"{k} {v:.2f}" for k, v in cpu_ms.items())
                print(f"  round {round_no + 1} {system.label:18s} burst {throughput:7.0f} "
                      f"tasks/s (submitted at {submit_rate:6.0f}/s)  p50 {p50:6.2f} ms  "
                      f"p99 {p99:6.2f} ms\n      burst CPU ms/task: {detail}", flush=True)
    except BaseException:
        failed = True
        print(children.tails(), flush=True)
        raise
    finally:
        for system in available.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(system.close(), 15)
        await asyncio.to_thread(children.stop_all)
        for system in available.values():
            try:
                await asyncio.wait_for(system.cleanup(), 30)
            except Exception as exc:
                print(f"  clean-up of {system.label} failed: {exc!r}", flush=True)
        if keep_logs or failed:
            print(f"  logs kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        restore_env("COORDINATOR_CONFIG", saved_config)
    summary = {
        key: {metric: median(values) for metric, values in m.items()} | {"rounds": m}
        for key, m in measured.items()
    }
    report(summary)
    return summary


def report(summary: dict[str, Any]) -> None:
    labels = {"ours": "coordinator_agent", "base": "coordinator_agent (base tree)",
              "raw": "raw aio-pika", "raw4": "raw aio-pika, our 4 hops",
              "celery": "celery 5 (rpc://)"}
    print("\nend-to-end no-op tasks (median of rounds)")
    print(table(
        ["system", "burst tasks/s", "submit/s", "p50 ms", "p99 ms", "CPU ms/task: server",
         "client", "broker"],
        [[labels[k], s["throughput"], s["submit_rate"], s["p50"], s["p99"], s["cpu_ms_server"],
          s["cpu_ms_client"], s["cpu_ms_broker"]] for k, s in summary.items()],
    ))
    print("(CPU per task during the burst; server = coordinator + agent, the raw responder, or "
          "the Celery worker with its pool; broker = RabbitMQ, shared, so an upper bound)")
    ours = summary.get("ours")
    if ours is None:
        return
    for key, name in (("celery", "celery"), ("raw", "raw"), ("raw4", "raw, our 4 hops"),
                      ("base", "base")):
        other = summary.get(key)
        if other is None:
            continue
        print(f"ours/{name}: throughput x{ratio(ours['throughput'], other['throughput']):.2f}, "
              f"p50 x{ratio(ours['p50'], other['p50']):.2f}, "
              f"p99 x{ratio(ours['p99'], other['p99']):.2f}")
    celery = summary.get("celery")
    if celery is not None:
        tput = ratio(ours["throughput"], celery["throughput"])
        p50 = ratio(ours["p50"], celery["p50"])
        print(f"target throughput >= {TARGET_THROUGHPUT_VS_CELERY} x celery: "
              f"{verdict(tput >= TARGET_THROUGHPUT_VS_CELERY)} (x{tput:.2f})")
        print(f"target p50 <= celery's: {verdict(p50 <= TARGET_P50_VS_CELERY)} (x{p50:.2f})")


def floor_note(summary: dict[str, Any]) -> str | None:
    """The broker's floor for our design against Celery, measured in the same run: what the
    four hops cost with none of our work (raw4), so the sequential goals can be read."""
    floor, celery = summary.get("raw4"), summary.get("celery")
    if floor is None or celery is None:
        return None
    return (f"the broker alone over our four hops (raw4, none of our work): p50 "
            f"{floor['p50']:.2f} ms = x{ratio(floor['p50'], celery['p50']):.2f} of Celery's, "
            f"p99 x{ratio(floor['p99'], celery['p99']):.2f}, burst "
            f"x{ratio(floor['throughput'], celery['throughput']):.2f}")


def targets(summary: dict[str, Any]) -> list[Goal]:
    ours, celery = summary.get("ours"), summary.get("celery")
    goals: list[Goal] = []
    if ours is not None and celery is not None:
        tput = ratio(ours["throughput"], celery["throughput"])
        p50 = ratio(ours["p50"], celery["p50"])
        p99 = ratio(ours["p99"], celery["p99"])
        goals += [
            Goal("P2 burst throughput, ours/Celery", f"{ours['throughput']:,.0f} tasks/s",
                 f"{celery['throughput']:,.0f} tasks/s", tput,
                 f">= x{TARGET_THROUGHPUT_VS_CELERY}", tput >= TARGET_THROUGHPUT_VS_CELERY),
            Goal("P2 sequential p50, ours/Celery", f"{ours['p50']:.2f} ms",
                 f"{celery['p50']:.2f} ms", p50, f"<= x{TARGET_P50_VS_CELERY}",
                 p50 <= TARGET_P50_VS_CELERY),
            Goal("P2 sequential p99, ours/Celery", f"{ours['p99']:.2f} ms",
                 f"{celery['p99']:.2f} ms", p99, f"<= x{TARGET_P99_VS_CELERY}",
                 p99 <= TARGET_P99_VS_CELERY),
        ]
    if ours is not None and "cpu_ms_coordinator" in ours:
        cpu = ours["cpu_ms_coordinator"]
        server = (f"{celery['cpu_ms_server']:.2f} ms (Celery worker)" if celery is not None
                  else "-")
        goals.append(Goal("CPU per task: the coordinator, burst", f"{cpu:.2f} ms", server, cpu,
                          f"<= {TARGET_COORDINATOR_CPU_MS} ms", cpu <= TARGET_COORDINATOR_CPU_MS))
    return goals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="burst size N")
    parser.add_argument("--latency-tasks", type=int, default=300, help="sequential tasks M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=250, help="concurrent submits per batch")
    parser.add_argument("--agent-concurrency", type=int, default=64)
    parser.add_argument("--in-flight-cap", type=int, default=64,
                        help="coordinator limits.max_in_flight_per_agent (default config: 32)")
    parser.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="the coordinator's and agent's event_loop setting (auto: uvloop "
                             "where installed, as shipped)")
    parser.add_argument("--ha", action="store_true",
                        help="the coordinator with ha.enabled (campaigns in the Consul at "
                             f"{CONSUL_URL}; leads alone)")
    parser.add_argument("--base-tree", type=Path, metavar="DIR",
                        help="also run the coordinator and agent of another source tree (e.g. "
                             "`git archive REV | tar -x -C DIR`), as 'base': before/after in "
                             "one run (the client is this tree's)")
    parser.add_argument("--client-batch", action="store_true", default=True,
                        help="ours (and a base tree) submit the burst with submit_many, the "
                             "client's bulk path: batch messages of up to 64 tasks "
                             "(docs/PROTOCOL.md §9.13); the default")
    parser.add_argument("--single-submits", dest="client_batch", action="store_false",
                        help="ours submits the burst with one submit() per task, --batch at a "
                             "time (a base tree that predates batch messages needs this)")
    parser.add_argument("--agent-batch-limit", type=int, default=16,
                        help="ours' agent: --batch-limit (1: assignments and reports one by "
                             "one, as before batches)")
    parser.add_argument("--only", action="append",
                        choices=["ours", "base", "raw", "raw4", "celery"],
                        help="run only these systems (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy the coordinator and agent in round 1 (raw stacks to DIR)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    if args.quick:
        args.tasks, args.latency_tasks, args.rounds = 200, 50, 1
    summary = asyncio.run(run(
        tasks=args.tasks, latency_tasks=args.latency_tasks, rounds=args.rounds,
        batch=args.batch, agent_concurrency=args.agent_concurrency,
        in_flight_cap=args.in_flight_cap, systems=tuple(args.only or ()),
        keep_logs=args.keep_logs, profile_dir=args.profile, event_loop=args.event_loop,
        ha=args.ha, base_tree=args.base_tree, client_batch=args.client_batch,
        agent_batch_limit=args.agent_batch_limit,
    ))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
