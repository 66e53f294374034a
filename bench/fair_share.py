"""Fair shares under a flood: one operator floods 20,000 tasks while another submits 50.

Processes as in a deployment, on this machine and its RabbitMQ (127.0.0.1): the coordinator
(``python -m coordinator_agent run``) and two agents (this file with ``--agent``: an SDK worker
whose task sleeps ``--work`` seconds, so that capacity is a known number of slots; no progress
messages). Both operators submit over ``POST /api/tasks`` with their own tokens; the flooder
obeys ``429`` + ``Retry-After``.

Phases, all in one run:

1. **idle**: the light operator submits 50 tasks, one every ``--spacing`` seconds, on an idle
   fleet. Its turnaround (submit to finished, the coordinator's own timestamps) is the baseline.
2. **flood**: the flooder offers 20,000 tasks as fast as the coordinator takes them (past its
   backlog limit it is refused and retries later); once every slot is busy and a backlog has
   built, the light operator submits 50 more the same way. Target: their p99 turnaround within
   2x the idle p99.
3. **flood alone**: nobody else waits; slot utilisation (tasks in flight / slots, sampled from
   the agents' view) should be full: target >= 0.95 of the slots busy.

The coordinator's resident memory (VmRSS) is printed before and at the peak of the flood, with
the number of tasks it held; admission control (``fleet.default_principal.max_backlog``) is what
bounds it.

``--via amqp``: both operators submit over AMQP (CoordinatorClient) instead. The flooder publishes
as fast as the broker confirms, without waiting for answers, so its submissions pile up in the
broker; refused ones are offered again after their ``retry_after_s``. The light operator's
turnaround is then measured by the client, from the publish to the ``task.completed`` notice, so
time spent waiting in the broker counts. ``--shared-queue`` sends both through the one shared
tasks queue instead of each operator's submission lane (how every submission went before lanes).

    .venv/bin/python bench/fair_share.py [--via http|amqp] [--shared-queue] [--flood 20000]
                                         [--light 50] [--work 0.25]   (1-5 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    BROKER_URL,
    PYTHON,
    Children,
    clean_environ,
    empty_config,
    percentile,
    ratio,
    table,
    verdict,
)

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.settings import load_settings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace

AGENTS = ("fair-agent-1", "fair-agent-2")
FLOODER, LIGHT = "flooder", "light"


# --- the agent (a child process) ----------------------------------------------------------------


def run_agent(agent_id: str, concurrency: int, work_s: float) -> None:
    from coordinator_agent.agent.worker import TaskContext, WorkerAgent
    from coordinator_agent.settings import load_settings

    async def sleep_handler(task: TaskContext) -> Any:
        await asyncio.sleep(work_s)
        return None

    async def main() -> None:
        settings = load_settings()
        keyring = Keyring.load(settings.keyring_path)
        worker = WorkerAgent(agent_id, "general", sleep_handler, settings=settings,
                             keyring=keyring, max_concurrency=concurrency)
        await worker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await worker.stop(timeout=2)

    asyncio.run(main())


# --- measuring ----------------------------------------------------------------------------------


class AnsweringClient(CoordinatorClient):
    """A client that can wait for a submission's first answer (accepted or a notice)."""

    def __init__(self, *args: Any, shared_queue: bool = False) -> None:
        super().__init__(*args)
        self.answers: dict[str, asyncio.Future[protocol.Model]] = {}
        if shared_queue:  # what every submission did before lanes: the one tasks queue
            self._lane_missing_until = float("inf")

    async def _on_reply(self, envelope: protocol.Envelope, message: Any) -> None:
        await super()._on_reply(envelope, message)
        future = self.answers.pop(getattr(envelope.payload, "task_id", ""), None)
        if future is not None and not future.done():
            future.set_result(envelope.payload)

    def answer(self, task_id: str) -> asyncio.Future[protocol.Model]:
        future = self.answers.get(task_id)
        if future is None:
            future = self.answers[task_id] = asyncio.get_running_loop().create_future()
        return future


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, children: Children) -> None:
        self.args = args
        self.workdir = workdir
        self.children = children
        self.name = f"fair-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tokens: dict[str, str] = {}
        self.flood_accepted = 0
        self.flood_refused = 0
        self.peak_rss = 0.0
        self.peak_open = 0
        self.clients: dict[str, AnsweringClient] = {}

    def start(self) -> None:
        keyring = Keyring()
        for agent_id in AGENTS:
            keyring.generate(agent_id, "agent")
        for operator in (FLOODER, LIGHT):
            principal = keyring.generate(operator, "operator")
            assert principal.api_token is not None
            self.tokens[operator] = principal.api_token.get_secret_value()
        keyring_path = self.workdir / "keyring.json"
        keyring.save(keyring_path)
        config = empty_config(self.workdir)
        os.environ["COORDINATOR_CONFIG"] = str(config)  # for the AMQP clients' load_settings
        self.client_settings = load_settings(
            name=self.name, broker_url=BROKER_URL, keyring_path=keyring_path,
            data_dir=self.workdir / "data", monitoring_port=0, log_level="WARNING")
        self.keyring = keyring
        env = clean_environ(
            COORDINATOR_CONFIG=str(config),
            COORDINATOR_NAME=self.name,
            COORDINATOR_BROKER_URL=BROKER_URL,
            COORDINATOR_KEYRING_PATH=str(keyring_path),
            COORDINATOR_DATA_DIR=str(self.workdir / "data"),
            COORDINATOR_MONITORING_PORT=str(self.port),
            COORDINATOR_LOG_LEVEL="WARNING",
            COORDINATOR_FLEET__DEFAULT_PRINCIPAL__MAX_BACKLOG=str(self.args.max_backlog),
            COORDINATOR_FLEET__RETRY_AFTER_S="1",
        )
        self.coordinator = self.children.spawn(
            "coordinator", [PYTHON, "-m", "coordinator_agent", "run"], env=env, cwd=self.workdir)
        for agent_id in AGENTS:
            self.children.spawn(
                agent_id, [PYTHON, __file__, "--agent", agent_id, "--concurrency",
                           str(self.args.concurrency), "--work", str(self.args.work)],
                env=env, cwd=self.workdir)

    async def get(self, http: aiohttp.ClientSession, path: str) -> Any:
        async with http.get(self.base + path) as response:
            return await response.json()

    async def ready(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.children.check_alive()
            with contextlib.suppress(aiohttp.ClientError):
                agents = (await self.get(http, "/api/agents"))["agents"]
                if sum(a["liveness"] == "healthy" for a in agents) == len(AGENTS):
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError("the coordinator and its agents did not come up within 60 s")

    async def submit(self, http: aiohttp.ClientSession, who: str, description: str
                     ) -> tuple[int, float]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        async with http.post(self.base + "/api/tasks", json={"description": description},
                             headers=headers) as response:
            body = await response.json()
            if response.status == 202:
                return 202, 0.0
            if response.status == 429:
                return 429, float(response.headers.get("Retry-After", "1"))
            raise RuntimeError(f"submit answered {response.status}: {body}")

    async def light_amqp(self, label: str) -> tuple[list[str], list[float]]:
        """Over AMQP the clock starts at the publish: time in the broker's queue counts."""
        client = self.clients[LIGHT]

        async def one(i: int) -> tuple[str, float]:
            started = time.monotonic()
            task_id = await client.submit(f"light {label} {i}")
            await client.wait(task_id, 600)
            return task_id, time.monotonic() - started

        runs = []
        for i in range(self.args.light):
            runs.append(asyncio.create_task(one(i)))
            await asyncio.sleep(self.args.spacing)
        done = await asyncio.gather(*runs)
        return [task_id for task_id, _ in done], [seconds for _, seconds in done]

    async def light_round(self, http: aiohttp.ClientSession, label: str) -> dict[str, Any]:
        """50 tasks, one every spacing seconds; then their turnaround and queue wait."""
        ids = []
        client_turnaround: list[float] = []
        headers = {"Authorization": f"Bearer {self.tokens[LIGHT]}"}
        if self.args.via == "amqp":
            ids, client_turnaround = await self.light_amqp(label)
        for i in range(self.args.light if self.args.via == "http" else 0):
            async with http.post(self.base + "/api/tasks", headers=headers,
                                 json={"description": f"light {label} {i}"}) as response:
                body = await response.json()
                assert response.status == 202, body
                ids.append(body["task_id"])
            await asyncio.sleep(self.args.spacing)
        views: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while len(views) < len(ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: light tasks not done within 120 s")
            for task_id in ids:
                if task_id in views:
                    continue
                view = await self.get(http, f"/api/tasks/{task_id}")
                if view["status"] in ("succeeded", "failed", "cancelled"):
                    views[task_id] = view
            await asyncio.sleep(0.1)
        turnaround = client_turnaround or [v["updated_at"] - v["created_at"]
                                           for v in views.values()]
        after = [v["updated_at"] - v["attempts"][0]["started_at"] - (
            v["attempts"][0]["duration_s"] or 0) for v in views.values()]
        wait = [v["attempts"][0]["started_at"] - v["created_at"] for v in views.values()]
        failed = [v for v in views.values() if v["status"] != "succeeded"]
        if failed:
            raise RuntimeError(f"{label}: {len(failed)} light tasks did not succeed")
        return {"p50": percentile(turnaround, 50), "p99": percentile(turnaround, 99),
                "wait_p50": percentile(wait, 50), "wait_p99": percentile(wait, 99),
                "overhead_p50": percentile(after, 50), "cpu": self.cpu_share()}

    def cpu_share(self) -> float:
        """The coordinator's CPU (share of one core) since the last call."""
        fields = Path(f"/proc/{self.coordinator.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        now = time.monotonic()
        last_ticks, last_at = getattr(self, "_cpu_mark", (ticks, now))
        self._cpu_mark = (ticks, now)
        return (ticks - last_ticks) / (now - last_at) if now > last_at else float("nan")

    async def flood(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Offer tasks until ``--flood`` were accepted, obeying 429 + Retry-After."""
        async def one_lane(lane: int) -> None:
            while self.flood_accepted < self.args.flood and not stop.is_set():
                code, retry_after = await self.submit(http, FLOODER, f"flood {lane}")
                if code == 202:
                    self.flood_accepted += 1
                else:
                    self.flood_refused += 1
                    await asyncio.sleep(retry_after)

        if self.args.via == "amqp":
            await self.flood_amqp(stop)
            return
        await asyncio.gather(*(one_lane(i) for i in range(8)))

    async def flood_amqp(self, stop: asyncio.Event) -> None:
        """Publish as fast as the broker confirms (the answers come later); a refused task is
        offered again after its Retry-After. Submissions wait in the broker meanwhile."""
        client = self.clients[FLOODER]
        retry: asyncio.Queue[None] = asyncio.Queue()
        offered = 0

        async def answered(task_id: str) -> None:
            reply = await client.answer(task_id)
            if isinstance(reply, protocol.TaskAccepted):
                self.flood_accepted += 1
                return
            self.flood_refused += 1
            await asyncio.sleep(getattr(reply, "retry_after_s", None) or 1.0)
            retry.put_nowait(None)

        async def one_lane() -> None:
            nonlocal offered
            while self.flood_accepted < self.args.flood and not stop.is_set():
                if offered >= self.args.flood:
                    await retry.get()  # only what was refused is offered again
                else:
                    offered += 1
                task_id = uuid.uuid4().hex
                watcher = asyncio.create_task(answered(task_id))
                self._watchers.add(watcher)
                watcher.add_done_callback(self._watchers.discard)
                await client.submit("flood", task_id=task_id)

        self._watchers: set[asyncio.Task[None]] = set()
        lanes = [asyncio.create_task(one_lane()) for _ in range(8)]
        await stop.wait()
        for task in [*lanes, *self._watchers]:
            task.cancel()
        await asyncio.gather(*lanes, *self._watchers, return_exceptions=True)

    async def sample(self, http: aiohttp.ClientSession, seconds: float) -> list[float]:
        """Slot utilisation (in flight / slots), sampled every 50 ms, and the memory peak."""
        slots = self.args.concurrency * len(AGENTS)
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            agents = (await self.get(http, "/api/agents"))["agents"]
            samples.append(sum(a["in_flight"] for a in agents) / slots)
            self.memory()
            await asyncio.sleep(0.05)
        return samples

    def memory(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_mb(self.coordinator.pid))

    async def run(self) -> dict[str, Any]:
        if self.args.via == "amqp":
            for who in (FLOODER, LIGHT):
                self.clients[who] = AnsweringClient(self.client_settings, self.keyring, who,
                                                    shared_queue=self.args.shared_queue)
                await self.clients[who].start()
        try:
            return await self._run()
        finally:
            for client in self.clients.values():
                await client.close()

    async def _run(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            await self.ready(http)
            await self.light_round(http, "warm-up")
            rss_idle = rss_mb(self.coordinator.pid)
            self.cpu_share()
            idle = await self.light_round(http, "idle")

            stop = asyncio.Event()
            flood = asyncio.create_task(self.flood(http, stop))
            # Let the backlog build and every slot fill before the light operator comes.
            while self.flood_accepted < min(self.args.flood, 2000):
                self.children.check_alive()
                await asyncio.sleep(0.1)
            sampler = asyncio.create_task(self.sample(http, 3600))
            ingesting = await self.light_round(http, "flood-intake")
            # Then with the flooder's backlog at its limit: admission control refuses the rest.
            while self.flood_refused == 0 and self.flood_accepted < self.args.flood:
                self.children.check_alive()
                await asyncio.sleep(0.1)
            flooded = await self.light_round(http, "flood")
            sampler.cancel()
            alone = await self.sample(http, self.args.alone)
            status = await self.get(http, "/api/status")
            open_tasks = sum(status["tasks_open"].values())
            stop.set()
            await flood
        return {"idle": idle, "intake": ingesting, "flood": flooded, "alone": alone,
                "rss_idle": rss_idle, "open_tasks": open_tasks}


def report(bench: Bench, result: dict[str, Any], args: argparse.Namespace) -> bool:
    idle, intake, flood = result["idle"], result["intake"], result["flood"]
    slots = args.concurrency * len(AGENTS)
    alone = result["alone"]
    utilisation = sum(alone) / len(alone) if alone else float("nan")
    # The target is the steady flood: the backlog at its limit, the flood served as slots free.
    # The intake burst before it is shown too: there the coordinator also ingests ~1,000
    # submissions/s, and the result path (not the queue) slows on a shared machine.
    ratio_p99 = ratio(flood["p99"], idle["p99"])
    ratio_intake = ratio(intake["p99"], idle["p99"])
    via = args.via + (", one shared tasks queue" if args.shared_queue else "")
    print(f"\nfair share ({via}): {args.light} light tasks, idle vs. during a flood offering "
          f"{args.flood} tasks; {slots} slots, {args.work * 1000:.0f} ms of work per task\n")
    def row(label: str, r: dict[str, Any]) -> tuple[Any, ...]:
        return (label, r["p50"] * 1000, r["p99"] * 1000, r["wait_p50"] * 1000,
                r["wait_p99"] * 1000, r["overhead_p50"] * 1000, r["cpu"])

    print(table(("light operator (ms)", "p50", "p99", "queue wait p50", "queue wait p99",
                 "result path p50", "coord. CPU"), [
        row("idle fleet (baseline)", idle),
        row("flood, while it is ingested", intake),
        row("flood, backlog at its limit", flood),
    ]))
    start = ("publish (client clock) to the completed notice" if args.via == "amqp"
             else "submit to finished")
    print(f"(turnaround = {start}; queue wait = accepted to assigned; result path = "
          "assigned to finished minus the agent's own time; CPU in cores)")
    ok_share = ratio_p99 <= 2.0
    ok_full = utilisation >= 0.95
    print(f"\np99 turnaround during the flood / idle: {ratio_p99:.2f}  (target <= 2.0: "
          f"{verdict(ok_share)}); while the flood is ingested: {ratio_intake:.2f}")
    print(f"flood alone: mean slot utilisation {utilisation:.3f} over {len(alone)} samples "
          f"(target >= 0.95: {verdict(ok_full)})")
    print(f"flooder: {bench.flood_accepted} accepted, {bench.flood_refused} refused "
          f"(429 / rejected; backlog limit {args.max_backlog})")
    print(f"coordinator RSS: {result['rss_idle']:.0f} MB idle, {bench.peak_rss:.0f} MB at the "
          f"peak of the flood; {result['open_tasks']} tasks open at the end")
    return ok_share and ok_full


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fair-share-"))
    children = Children(workdir)
    bench = Bench(args, workdir, children)
    ok = False
    try:
        bench.start()
        result = await bench.run()
        ok = report(bench, result, args)
        if args.json:
            print(json.dumps({**result, "flood_accepted": bench.flood_accepted,
                              "flood_refused": bench.flood_refused,
                              "peak_rss_mb": bench.peak_rss}))
    except BaseException:
        print(children.tails(), file=sys.stderr)
        raise
    finally:
        children.stop_all()
        from pydantic import SecretStr
        with contextlib.suppress(Exception):
            await delete_namespace(SecretStr(BROKER_URL), bench.name, AGENTS, (FLOODER, LIGHT))
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok or not args.strict else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=20_000)
    parser.add_argument("--light", type=int, default=50)
    parser.add_argument("--work", type=float, default=0.25, help="seconds of work per task")
    parser.add_argument("--concurrency", type=int, default=8, help="slots per agent")
    parser.add_argument("--spacing", type=float, default=0.05,
                        help="seconds between the light operator's submissions")
    parser.add_argument("--alone", type=float, default=5.0,
                        help="seconds of the flood alone, to measure utilisation")
    parser.add_argument("--max-backlog", type=int, default=10_000)
    parser.add_argument("--via", choices=("http", "amqp"), default="http",
                        help="how both operators submit (amqp: the turnaround includes the time "
                        "a submission waits in the broker)")
    parser.add_argument("--shared-queue", action="store_true",
                        help="amqp: submit through the one shared tasks queue, not each "
                        "operator's lane (the behaviour before lanes, for comparison)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--agent", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent:
        run_agent(args.agent, args.concurrency, args.work)
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
