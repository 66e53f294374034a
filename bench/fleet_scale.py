"""Fleet scale: a real coordinator tracking N simulated agents that heartbeat every 10 s.

For each fleet size N (default 1,000 / 5,000 / 10,000 / 20,000, the last being 2x the target):

* a keyring with N agent principals, one real worker and one operator is written like
  ``coordinator-agent keys generate`` writes it (``Keyring.generate`` + ``save``, mode 0600);
* a real ``coordinator-agent run`` process and a real ``coordinator-agent worker`` start;
* **baseline** (same run, same coordinator, before the fleet exists): sequential no-op tasks
  on the worker, p50/p99;
* the fleet starts: ``--generators`` child processes each own a slice of the N agents. Every
  simulated agent seals, with its own key, an ``agent.hello`` (tasks lane, persistent) and then
  an ``agent.status`` every interval (status lane, not persistent, with the token lifetime as
  expiration and the hello's id as correlation id), exactly as ``WorkerAgent`` publishes them,
  its phase spread evenly over the interval;
* sampled every 2 s: coordinator CPU (% of one core) and RSS from /proc, agents by liveness from
  ``/api/status``, the status queue's depth, heartbeats handled from ``/metrics``;
* with the fleet: sequential tasks again (the ratio to the baseline is printed), the time a
  brand-new agent takes to get work (a task is queued for a kind only it has; the clock runs from
  its hello until the assignment reaches its queue);
* then ``--decisions`` tasks for the worker at once (after the window, so that their CPU does not
  count as the fleet's), and the routing decisions' p99 with the fleet: from the window's start
  until after that burst, wall time (``coordinator_dispatch_decision_seconds``) and the
  coordinator's own CPU time (``coordinator_dispatch_decision_cpu_seconds``), each the upper
  bound of the histogram bucket that holds it. "Since start" adds the decisions before the
  fleet, the process's first among them.

Discovery at this size: the simulated agents announce themselves over AMQP only (hello and
heartbeats), and the coordinator runs without a registry (``registry_url`` unset). The design
for a large fleet is one Consul agent per node (docs/DISCOVERY.md), each holding only its own
node's services, so the coordinator's share of discovery is one blocking query on the catalogue;
liveness always comes from the AMQP heartbeats. The benchmark therefore does not register N
services in the one development Consul agent, which would measure that agent, not the
coordinator.

Heartbeats "dropped" are those the generators sent that the coordinator neither handled nor
still holds in its status queue at the end of the window: the queue's TTL dropped them, or the
coordinator shed them (it says so in ``coordinator_status_shed_total`` when it does).

    .venv/bin/python bench/fleet_scale.py [--agents 1000,5000,10000,20000] [--window 60]
        [--code DIR]   # run the coordinator and worker from another copy of the package
        [--ha]         # the coordinator with its replicated log (leads alone)

``--code`` lets one machine measure the code before a change against the code after it, with
the same load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from _common import (
    BROKER_URL,
    PYTHON,
    ROOT,
    Children,
    clean_environ,
    empty_config,
    percentile,
    queue_depth,
    ratio,
    restore_env,
    table,
    verdict,
)

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.settings import Settings, load_settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import agent_topology, delete_namespace, lane_for
from coordinator_agent.wire.security import SecurityManager

INTERVAL_S = 10.0
SAMPLE_S = 2.0
WORKER = "fleet-worker"
OPERATOR = "fleet-operator"
SIM_KIND = "sim"
TARGET_CPU = 30.0
TARGET_RSS_MB = 300.0
TARGET_NEW_AGENT_S = 1.0
TARGET_DECISION_MS = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def sim_ids(n: int) -> list[str]:
    return [f"sim-{i:05d}" for i in range(n)]


# --- the load generator (a child process) ---------------------------------------------------


def heartbeat(security: SecurityManager, name: str, session: str | None,
              payload: protocol.Model) -> tuple[aio_pika.Message, str, protocol.Envelope]:
    """One message sealed and shaped exactly as WorkerAgent.send publishes it."""
    message_type = protocol.TYPE_OF_PAYLOAD[type(payload)]
    lane = lane_for(name, message_type)
    durable = lane == c.tasks_key(name)
    envelope = protocol.make_envelope(payload, sender=security.principal_id,
                                      correlation_id=session)
    body, headers = security.seal(envelope, name)
    message = aio_pika.Message(
        body, headers=headers, message_id=envelope.id, type=envelope.type,
        correlation_id=session, content_type=c.CONTENT_TYPE,
        delivery_mode=(aio_pika.DeliveryMode.PERSISTENT if durable
                       else aio_pika.DeliveryMode.NOT_PERSISTENT),
        expiration=None if durable else security.ttl_s,
    )
    return message, lane, envelope


async def generate(args: argparse.Namespace) -> None:
    """Heartbeat for agents [first, first+count) until SIGTERM; report progress as JSON lines."""
    settings = load_settings(name=args.name, broker_url=BROKER_URL,
                             keyring_path=Path(args.keyring))
    keyring = Keyring.load(Path(args.keyring))
    ids = sim_ids(args.first + args.count)[args.first:]
    managers = [SecurityManager.from_settings(settings, keyring.subset(i), i) for i in ids]
    sessions: list[str | None] = [None] * len(ids)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    connection = await aio_pika.connect(BROKER_URL, timeout=10)
    # Without publisher confirms (the SDK waits for each one): the same messages for a fraction
    # of the generator's and the broker's CPU, which this shared machine does not have to spare.
    channel = await connection.channel(publisher_confirms=False)
    exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE, ensure=False)
    in_flight = asyncio.Semaphore(512)
    sent = errors = 0
    late_max = 0.0
    pending: set[asyncio.Task[None]] = set()

    async def publish(*messages: tuple[aio_pika.Message, str]) -> None:
        nonlocal sent, errors
        try:
            for message, lane in messages:  # a hello goes out before its first heartbeat
                await exchange.publish(message, lane, mandatory=False, timeout=30)
                if lane != c.tasks_key(args.name):
                    sent += 1
        except Exception:
            errors += 1
        finally:
            in_flight.release()

    def status() -> protocol.AgentStatus:
        return protocol.AgentStatus(kind=SIM_KIND, capabilities=["sim"], max_concurrency=4,
                                    state="ready", in_flight=0, load=0.0)

    n = len(ids)
    started = time.monotonic()
    step = args.interval / n
    index = 0  # the next agent due, in phase order
    cycle = 0
    last_report = started
    while not stop.is_set():
        now = time.monotonic()
        while not stop.is_set():
            due = started + cycle * args.interval + index * step
            if due > now:
                break
            late_max = max(late_max, now - due)
            security = managers[index]
            batch = []
            if sessions[index] is None:
                hello = protocol.AgentHello(kind=SIM_KIND, capabilities=["sim"],
                                            max_concurrency=4, version="fleet-sim")
                message, lane, envelope = heartbeat(security, args.name, None, hello)
                sessions[index] = envelope.id
                batch.append((message, lane))
            message, lane, _ = heartbeat(security, args.name, sessions[index], status())
            batch.append((message, lane))
            await in_flight.acquire()
            task = asyncio.create_task(publish(*batch))
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
            if index == n:
                index, cycle = 0, cycle + 1
        if now - last_report >= 2.0:
            last_report = now
            print(json.dumps({"sent": sent, "errors": errors, "late_max_s": round(late_max, 3)}),
                  flush=True)
            late_max = 0.0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    if pending:
        await asyncio.wait(pending, timeout=10)
    print(json.dumps({"sent": sent, "errors": errors, "late_max_s": round(late_max, 3),
                      "final": True}), flush=True)
    await connection.close()


# --- the measuring side -----------------------------------------------------------------------


def proc_cpu_rss(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of one process."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2:].split()
    tck = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tck
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    return cpu, rss


def scrape(port: int) -> dict[str, float]:
    """The /metrics figures this bench reads, summed over labels it does not care about."""
    text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10).decode()
    wanted = {
        'coordinator_messages_received_total{message_type="agent.status"}': "status_handled",
        "coordinator_status_shed_total": "shed",
        "coordinator_heartbeats_missing_total": "missing",
        "coordinator_status_lag_seconds": "lag",
        "coordinator_liveness_paused": "paused",
        "coordinator_dispatch_decision_seconds_count": "decisions",
        "coordinator_dispatch_decision_seconds_sum": "decision_s",
    }
    out: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    cpu_buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        slow = re.fullmatch(r'coordinator_dispatch_decision_slow_total\{cause="(\w+)"\}', name)
        if slow:
            out[f"slow_{slow.group(1)}"] = float(value)
        for prefix, key in wanted.items():
            if name == prefix or (name.startswith(prefix) and "{" not in prefix
                                  and name[len(prefix):len(prefix) + 1] in ("{", "")):
                out[key] = out.get(key, 0.0) + float(value)
        for histogram, into in (("coordinator_dispatch_decision_seconds_bucket", buckets),
                                ("coordinator_dispatch_decision_cpu_seconds_bucket",
                                 cpu_buckets)):
            if name.startswith(histogram):
                le = re.search(r'le="([^"]+)"', name)
                if le:
                    into.append((float(le.group(1)), float(value)))
    out["_buckets"] = json.dumps(sorted(buckets))  # type: ignore[assignment]
    out["_cpu_buckets"] = json.dumps(sorted(cpu_buckets))  # type: ignore[assignment]
    return out


def window_buckets(first: dict[str, Any], last: dict[str, Any], key: str
                   ) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets over the window: the last scrape minus the first."""
    before = dict(json.loads(first.get(key, "[]")))
    return [(bound, count - before.get(bound, 0.0))
            for bound, count in json.loads(last.get(key, "[]"))]


def histogram_p99(buckets: list[tuple[float, float]]) -> float:
    """The upper bound of the bucket holding the 99th percentile (seconds); NaN if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= 0.99 * total:
            return bound
    return float("inf")


class Run:
    """One fleet size: a coordinator, a worker, the generators, the samples."""

    def __init__(self, n: int, args: argparse.Namespace, workdir: Path) -> None:
        self.n = n
        self.args = args
        self.workdir = workdir
        self.name = f"scale-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.children = Children(workdir)
        self.samples: list[dict[str, Any]] = []
        self.sent: dict[int, int] = {}
        self.client: CoordinatorClient | None = None
        self.settings: Settings | None = None
        #: The sample taken after the decision burst (only its decision figures are read).
        self.after_burst: dict[str, Any] | None = None
        self.burst_s = float("nan")  # from the burst's first submit until its last result

    def env(self) -> dict[str, str]:
        extra = {"PYTHONPATH": str(Path(self.args.code).resolve())} if self.args.code else {}
        env: dict[str, str] = clean_environ(
            COORDINATOR_CONFIG=str(empty_config(self.workdir)),
            COORDINATOR_NAME=self.name,
            COORDINATOR_BROKER_URL=BROKER_URL,
            COORDINATOR_KEYRING_PATH=str(self.workdir / "keyring.json"),
            COORDINATOR_DATA_DIR=str(self.workdir / "data"),
            COORDINATOR_MONITORING_PORT=str(self.port),
            COORDINATOR_LOG_LEVEL="INFO",
            COORDINATOR_LIVENESS__HEARTBEAT_INTERVAL_S=str(self.args.interval),
            # --ha: the replicated log on, the lease on the broker (no registry here, above).
            **({"COORDINATOR_HA__ENABLED": "true"} if self.args.ha else {}),
            **extra,
        )
        return env

    async def start(self) -> None:
        keyring = Keyring()
        for agent_id in sim_ids(self.n):
            keyring.generate(agent_id, "agent")
        keyring.generate(WORKER, "agent")
        keyring.generate(OPERATOR, "operator")
        keyring.generate("late-joiner", "agent")
        keyring.save(self.workdir / "keyring.json")
        env = self.env()
        os.environ["COORDINATOR_CONFIG"] = env["COORDINATOR_CONFIG"]
        self.children.spawn("coordinator", [PYTHON, "-m", "coordinator_agent", "run"],
                            env=env, cwd=self.workdir)
        self.children.spawn("worker", [PYTHON, "-m", "coordinator_agent", "worker", "--id",
                                       WORKER, "--concurrency", "4"], env=env, cwd=self.workdir)
        self.settings = load_settings(
            name=self.name, broker_url=BROKER_URL, keyring_path=self.workdir / "keyring.json",
            data_dir=self.workdir / "client", monitoring_port=0, log_level="WARNING",
            liveness={"heartbeat_interval_s": self.args.interval},
        )
        self.client = CoordinatorClient(self.settings, keyring.subset(OPERATOR), OPERATOR)
        await self.client.start()

    async def decision_burst(self, m: int, timeout: float = 120.0) -> float:
        """``m`` tasks for the worker at once (its 4 slots take them a few at a time): that
        many routing decisions with the fleet, for a p99 that is not just the slowest of a
        few sequential tasks."""
        assert self.client is not None
        started = time.perf_counter()
        ids = await self.client.submit_many(
            [{"description": "noop", "kind": "general", "input": {"op": "echo"}}] * m)
        done = await asyncio.gather(*(self.client.wait(i, timeout) for i in ids))
        failed = [d for d in done if d.status != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} of the {m} burst tasks did not succeed")
        return time.perf_counter() - started

    async def task_latencies(self, m: int, timeout: float = 60.0) -> list[float]:
        assert self.client is not None
        out = []
        for _ in range(m):
            started = time.perf_counter()
            task_id = await self.client.submit("noop", kind="general", input={"op": "echo"})
            done = await self.client.wait(task_id, timeout)
            if done.status != "succeeded":
                raise RuntimeError(f"task {task_id} ended {done.status}: {done.error}")
            out.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
        return out

    def start_generators(self) -> list[str]:
        k = max(1, min(self.args.generators, self.n // 500 or 1))
        names = []
        for g in range(k):
            first, last = self.n * g // k, self.n * (g + 1) // k
            name = f"generator-{g}"
            self.children.spawn(name, [
                PYTHON, str(Path(__file__).resolve()), "--generate", "--name", self.name,
                "--keyring", str(self.workdir / "keyring.json"), "--first", str(first),
                "--count", str(last - first), "--interval", str(self.args.interval),
            ], env=clean_environ(COORDINATOR_CONFIG=str(empty_config(self.workdir))),
                cwd=ROOT)
            names.append(name)
        return names

    def generator_totals(self, names: list[str]) -> tuple[int, float]:
        """(heartbeats sent, worst lateness of the generators in their last report)."""
        sent, late = 0, 0.0
        for name in names:
            lines = [ln for ln in (self.workdir / f"{name}.log").read_text().splitlines()
                     if ln.startswith("{")]
            if lines:
                last = json.loads(lines[-1])
                sent += int(last["sent"])
                late = max(late, float(last["late_max_s"]))
        return sent, late

    async def sample(self, channel: aio_pika.abc.AbstractChannel, since: float,
                     names: list[str]) -> dict[str, Any]:
        pid = self.children.pid("coordinator")
        cpu, rss = proc_cpu_rss(pid)
        row: dict[str, Any] = {"t": round(time.monotonic() - since, 1), "cpu_s": cpu,
                               "rss_mb": rss}
        try:
            status = json.loads(http_get(f"http://127.0.0.1:{self.port}/api/status", 10))
            row.update(status.get("agents", {}))
            row["behind"] = status.get("liveness", {}).get("behind")
            row["metrics"] = scrape(self.port)
        except OSError as exc:
            row["error"] = str(exc)
        row["depth"] = await queue_depth(channel, c.status_queue(self.name))
        row["sent"], row["gen_late_s"] = self.generator_totals(names)
        self.samples.append(row)
        return row

    async def new_agent(self) -> float:
        """Seconds from a new agent's hello until a task queued for its kind reaches it."""
        assert self.client is not None and self.settings is not None
        kind = f"late-{uuid.uuid4().hex[:6]}"
        task_id = await self.client.submit("noop", kind=kind, input={"op": "echo"},
                                           timeout_s=300)
        keyring = Keyring.load(self.workdir / "keyring.json").subset("late-joiner")
        security = SecurityManager.from_settings(self.settings, keyring, "late-joiner")
        connection = await aio_pika.connect(BROKER_URL, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await agent_topology(self.name, "late-joiner")(channel)
            queue = await channel.get_queue(c.agent_queue(self.name, "late-joiner"))
            got: asyncio.Future[float] = asyncio.get_running_loop().create_future()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await message.ack()
                if message.type == "task.assign" and not got.done():
                    got.set_result(time.perf_counter())

            await queue.consume(on_message)
            await asyncio.sleep(0.5)  # the task is queued and the consumer is ready
            hello = protocol.AgentHello(kind=kind, capabilities=[], max_concurrency=1,
                                        version="fleet-late")
            message, lane, _ = heartbeat(security, self.name, None, hello)
            exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE, ensure=False)
            started = time.perf_counter()
            await exchange.publish(message, lane, mandatory=True, timeout=30)
            try:
                return await asyncio.wait_for(got, 60) - started
            except TimeoutError:
                print(f"    task {task_id} never reached the new agent")
                return float("inf")
            finally:
                # It sends no heartbeats: say goodbye, or it would count as suspect, then dead.
                message, lane, _ = heartbeat(security, self.name, None,
                                             protocol.AgentGoodbye(reason="measured"))
                await exchange.publish(message, lane, mandatory=True, timeout=30)

    async def run(self) -> dict[str, Any]:
        await self.start()
        assert self.client is not None
        await self.task_latencies(1, timeout=120)  # waits for the coordinator and the worker
        baseline = await self.task_latencies(self.args.tasks)
        connection = await aio_pika.connect(BROKER_URL, timeout=10)
        async with connection:
            channel = await connection.channel()
            fleet_started = time.monotonic()
            names = self.start_generators()
            converged: float | None = None
            max_bad = {"suspect": 0, "dead": 0}
            limit = fleet_started + self.args.interval * 3 + 60
            while time.monotonic() < limit:
                await asyncio.sleep(SAMPLE_S)
                self.children.check_alive()
                row = await self.sample(channel, fleet_started, names)
                print(f"    up   {row}"[:220], flush=True)
                for key, worst in max_bad.items():
                    max_bad[key] = max(worst, int(row.get(key, 0)))
                if row.get("healthy", 0) >= self.n + 1:
                    converged = time.monotonic() - fleet_started
                    break
            window_start = self.samples[-1]
            latencies_task = asyncio.create_task(self.task_latencies(self.args.tasks, 120))
            new_agent_s = float("nan")
            window_end = time.monotonic() + self.args.window
            steady: list[dict[str, Any]] = []
            while time.monotonic() < window_end:
                await asyncio.sleep(SAMPLE_S)
                self.children.check_alive()
                row = await self.sample(channel, fleet_started, names)
                steady.append(row)
                print(f"    run  {self._brief(row)}", flush=True)
                if new_agent_s != new_agent_s and time.monotonic() > window_end - \
                        self.args.window / 2:
                    new_agent_s = await self.new_agent()
            try:
                with_fleet = await asyncio.wait_for(latencies_task, 180)
                if self.args.decisions:  # after the window: its CPU is not the fleet's
                    self.burst_s = await self.decision_burst(self.args.decisions)
                    self.after_burst = await self.sample(channel, fleet_started, names)
                    print(f"    burst {self._brief(self.after_burst)}", flush=True)
            except Exception as exc:
                print(f"    tasks with the fleet failed: {exc!r}")
                with_fleet = []
            last = steady[-1] if steady else window_start
        for name in names:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.children.pid(name), signal.SIGTERM)
        await asyncio.sleep(2)
        return self.summary(baseline, with_fleet, converged, new_agent_s, window_start, last,
                            steady, max_bad, names)

    @staticmethod
    def _brief(row: dict[str, Any]) -> str:
        m = row.get("metrics", {})
        return (f"t={row['t']:6.1f}s healthy={row.get('healthy')} suspect={row.get('suspect')} "
                f"dead={row.get('dead')} depth={row['depth']} lag={m.get('lag', '-')} "
                f"shed={m.get('shed', '-')} rss={row['rss_mb']:.0f}MB "
                f"gen_late={row['gen_late_s']}")

    def summary(self, baseline: list[float], with_fleet: list[float], converged: float | None,
                new_agent_s: float, first: dict[str, Any], last: dict[str, Any],
                steady: list[dict[str, Any]], max_bad: dict[str, int],
                names: list[str]) -> dict[str, Any]:
        wall = last["t"] - first["t"]
        cpu_pct = 100.0 * (last["cpu_s"] - first["cpu_s"]) / wall if wall > 0 else float("nan")
        for row in steady:
            for key, worst in max_bad.items():
                max_bad[key] = max(worst, int(row.get(key, 0)))
        fm, lm = first.get("metrics", {}), last.get("metrics", {})
        handled = lm.get("status_handled", 0.0) - fm.get("status_handled", 0.0)
        sent = last["sent"] - first["sent"]
        in_queue = last["depth"] - first["depth"]
        log_text = (self.workdir / "coordinator.log").read_text(errors="replace")
        # Decisions: with the fleet, from the window's start until after the burst.
        dm = (self.after_burst or last).get("metrics", {})
        buckets = json.loads(dm.get("_buckets", "[]"))
        in_window = window_buckets(fm, dm, "_buckets")
        read = handled + lm.get("shed", 0.0) - fm.get("shed", 0.0)
        return {
            "agents": self.n,
            "window_s": wall,
            "cpu_pct": cpu_pct,
            # CPU per status message read or shed: what the machine's contention changes least.
            "cpu_ms_per_status": 1000 * (last["cpu_s"] - first["cpu_s"]) / read if read else
            float("nan"),
            "rss_mb": max(r["rss_mb"] for r in [first, *steady]),
            "converged_s": converged if converged is not None else float("inf"),
            "min_healthy": min((int(r.get("healthy", 0)) for r in steady), default=0),
            "max_suspect": max_bad["suspect"],
            "max_dead": max_bad["dead"],
            "worker_ok": bool(with_fleet),
            "sent": sent,
            "handled": handled,
            "dropped": max(0.0, sent - handled - in_queue),
            "shed": lm.get("shed", 0.0) - fm.get("shed", 0.0),
            "missing": lm.get("missing", 0.0) - fm.get("missing", 0.0),
            "max_depth": max((r["depth"] for r in steady), default=0),
            "max_lag_s": max((r.get("metrics", {}).get("lag", 0.0) for r in steady), default=0),
            "paused_samples": sum(1 for r in steady if r.get("behind")),
            "gen_late_s": max((r["gen_late_s"] for r in steady), default=0.0),
            "p50_base_ms": 1000 * percentile(baseline, 50),
            "p99_base_ms": 1000 * percentile(baseline, 99),
            "p50_fleet_ms": 1000 * percentile(with_fleet, 50),
            "p99_fleet_ms": 1000 * percentile(with_fleet, 99),
            "new_agent_s": new_agent_s,
            # Since the start (the first decision of the process included), then with the
            # fleet only: wall time, and the coordinator's own CPU time in the decision.
            "decision_p99_all_ms": 1000 * histogram_p99(buckets),
            "decisions": in_window[-1][1] if in_window else 0.0,
            "burst_s": self.burst_s,
            # Wall time spent in decisions over that span, in all.
            "decision_total_ms": 1000 * (dm.get("decision_s", 0.0) - fm.get("decision_s", 0.0)),
            "decision_p99_ms": 1000 * histogram_p99(in_window),
            "decision_cpu_p99_ms": 1000 * histogram_p99(window_buckets(fm, dm, "_cpu_buckets")),
            # Decisions over 1 ms of wall time in the window, by cause (routing/decision_cost.py).
            "slow_decisions": {key[5:]: dm[key] - fm.get(key, 0.0) for key in sorted(dm)
                               if key.startswith("slow_") and dm[key] > fm.get(key, 0.0)},
            "dead_lines": log_text.count(" is dead") + len(re.findall(r"\d+ agent\(s\) dead",
                                                                       log_text)),
            "log_lines": log_text.count("\n"),
        }

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        self.children.stop_all()
        with contextlib.suppress(Exception):
            await delete_namespace(Settings().broker_url, self.name, [WORKER, "late-joiner"],
                                   (OPERATOR,))


def report(rows: list[dict[str, Any]], label: str) -> None:
    print(f"\nfleet scale ({label}), heartbeats every {rows[0]['interval']:g} s:")
    print(table(
        ["agents", "CPU % core", "RSS MB", "up in s", "min healthy", "max suspect", "max dead",
         "sent", "handled", "dropped~", "missing", "shed", "max depth", "lag s"],
        [[r["agents"], r["cpu_pct"], r["rss_mb"], r["converged_s"], r["min_healthy"],
          r["max_suspect"], r["max_dead"], r["sent"], r["handled"], r["dropped"],
          r.get("missing", float("nan")), r["shed"], r["max_depth"], r["max_lag_s"]]
         for r in rows]))
    print(table(
        ["agents", "CPU ms per status msg", "projected % core at N / interval"],
        [[r["agents"], r["cpu_ms_per_status"],
          r["cpu_ms_per_status"] * r["agents"] / r["interval"] / 10] for r in rows]))
    print("  dropped~: sent - handled - still queued over the window (the generators report every"
          " 2 s, so +-2 s of heartbeats); missing: the coordinator's own count of gaps")
    print(table(
        ["agents", "task p50 ms", "base p50", "x", "task p99 ms", "base p99", "x",
         "new agent s", "'is dead' lines", "log lines"],
        [[r["agents"], r["p50_fleet_ms"], r["p50_base_ms"],
          ratio(r["p50_fleet_ms"], r["p50_base_ms"]), r["p99_fleet_ms"], r["p99_base_ms"],
          ratio(r["p99_fleet_ms"], r["p99_base_ms"]), r["new_agent_s"],
          r["dead_lines"], r["log_lines"]] for r in rows]))
    print(table(
        ["agents", "burst s", "decisions", "in all ms", "decision p99 ms", "CPU p99 ms",
         "since start p99 ms"],
        [[r["agents"], r.get("burst_s", float("nan")), r.get("decisions", 0),
          r.get("decision_total_ms", float("nan")), r["decision_p99_ms"],
          r.get("decision_cpu_p99_ms", float("nan")), r.get("decision_p99_all_ms", float("nan"))]
         for r in rows]))
    for r in rows:
        slow = ", ".join(f"{cause} {n:.0f}" for cause, n in r.get("slow_decisions", {}).items())
        exported = r.get("decision_cpu_p99_ms") == r.get("decision_cpu_p99_ms")  # not NaN
        print(f"  {r['agents']:,} agents: decisions over 1 ms by cause: "
              f"{slow or ('none' if exported else 'not exported by this coordinator')}")
    print("  decisions: with the fleet (the sequential tasks, the new agent's and the burst's);"
          " p99 is the upper bound of the histogram bucket holding it, wall time then the"
          " coordinator's CPU time; 'since start' adds the baseline's and the process's first")
    for r in rows:
        if r["agents"] == 10_000:
            print(f"  10,000 agents: CPU < {TARGET_CPU:g}%: {verdict(r['cpu_pct'] < TARGET_CPU)}"
                  f"; RSS < {TARGET_RSS_MB:g} MB: {verdict(r['rss_mb'] < TARGET_RSS_MB)}"
                  f"; new agent < 1 s: {verdict(r['new_agent_s'] < TARGET_NEW_AGENT_S)}"
                  f"; decision p99 <= {TARGET_DECISION_MS:g} ms: "
                  f"{verdict(r['decision_p99_ms'] <= TARGET_DECISION_MS)}"
                  f"; none suspect/dead: {verdict(r['max_suspect'] + r['max_dead'] == 0)}")
        if r["agents"] > 10_000:
            print(f"  {r['agents']:,} agents: none suspect/dead: "
                  f"{verdict(r['max_suspect'] + r['max_dead'] == 0)} (shed {r['shed']:.0f}, "
                  f"behind in {r['paused_samples']} samples)")
        if r["gen_late_s"] > 2.0:
            print(f"  note: at {r['agents']:,} the generators ran up to {r['gen_late_s']:.1f} s "
                  "late (the machine, not the coordinator, limited the offered load)")


async def main_async(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.agents.split(",")]
    rows = []
    saved = os.environ.get("COORDINATOR_CONFIG")
    try:
        for n in sizes:
            workdir = Path(tempfile.mkdtemp(prefix=f"fleet-{n}-"))
            run = Run(n, args, workdir)
            print(f"  {n:,} agents ({run.name}, logs in {workdir})", flush=True)
            try:
                row = await run.run()
            except Exception as exc:
                print(f"  {n:,} agents: failed: {exc!r}\n{run.children.tails()}")
                continue  # its logs stay in the work directory
            finally:
                await run.close()
            if args.keep_log:  # the coordinator's log only: the keyring goes with the rest
                shutil.copy(workdir / "coordinator.log", f"{args.keep_log}-{n}.log")
            shutil.rmtree(workdir, ignore_errors=True)  # logs, and a keyring of throwaway keys
            row["interval"] = args.interval
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        restore_env("COORDINATOR_CONFIG", saved)
    if rows:
        report(rows, args.label or (f"code from {args.code}" if args.code else "this checkout"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", default="1000,5000,10000,20000")
    parser.add_argument("--interval", type=float, default=INTERVAL_S)
    parser.add_argument("--window", type=float, default=60.0, help="steady window, seconds")
    parser.add_argument("--tasks", type=int, default=40, help="sequential tasks per latency run")
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--code", default=None, help="run the coordinator from this copy")
    parser.add_argument("--decisions", type=int, default=200,
                        help="tasks submitted at once after the sequential ones (0: none)")
    parser.add_argument("--label", default=None)
    parser.add_argument("--ha", action="store_true",
                        help="the coordinator with ha.enabled (its lease on the broker)")
    parser.add_argument("--keep-log", default=None, metavar="PREFIX",
                        help="copy the coordinator's log to PREFIX-N.log before cleaning up")
    # The generator child's own arguments.
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--keyring", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.generate:
        asyncio.run(generate(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
