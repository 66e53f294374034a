"""Takeover time of a killed leader, and the cost of HA on a burst, on the real broker.

    .venv/bin/python bench/failover.py                      # 20 kills, bursts of 500
    .venv/bin/python bench/failover.py --kills 5 --burst 200

Starts a private Consul dev agent (``session_ttl_min = "1s"``, its own ports), then:

1. **Burst, HA off.** One ``coordinator-agent run`` and two ``worker`` processes; ``--burst``
   noop tasks submitted at once; tasks per second from the first submit to the last completion.
2. **Burst, HA on, alone.** One coordinator with ``ha.enabled`` and no standby: what the log
   itself costs (every change through the stream and back into the store before it counts).
3. **Burst, HA on.** Three coordinators of one name with ``ha.enabled`` (2 s lease, every state
   change through the replicated log, two standbys applying it), the same two agents' kind, the
   same burst. ``burst_ha_on_over_off`` is the ratio of the two, from the same run.
4. **Kills.** With a trickle of tasks running (``--rate`` per second), ``--kills`` times: find the
   leader, SIGKILL it, submit a probe task at once, and time from the kill to the probe's first
   assignment by the new leader (its attempt's ``started_at``). The killed coordinator is started
   again, so three stay in the race. At the end every submitted task is waited for: tasks with no
   ``task.completed`` are *lost*, tasks with two different notices are *completed twice*.

Prints a table and JSON. Loopback only; every process it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench._common import (
    BROKER_URL,
    PYTHON,
    Children,
    clean_environ,
    empty_config,
    median,
    percentile,
    table,
)
from coordinator_agent.client import CoordinatorClient
from coordinator_agent.settings import load_settings
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace

AGENTS = ("agent-1", "agent-2")
OPERATOR = "operator-1"
LEASE_TTL_S = 2.0
NOOP = {"op": "echo"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


class Fleet:
    """Coordinators (by label, each with its own port and data dir) and agents of one name."""

    def __init__(self, children: Children, workdir: Path, name: str, consul_url: str | None,
                 keyring_path: Path, config: Path) -> None:
        self.children = children
        self.workdir = workdir
        self.name = name
        self.consul_url = consul_url
        self.keyring_path = keyring_path
        self.config = config
        self.ports: dict[str, int] = {}
        self.runs: dict[str, int] = defaultdict(int)
        self.pids: dict[str, int] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return clean_environ(
            COORDINATOR_CONFIG=str(self.config), COORDINATOR_NAME=self.name,
            COORDINATOR_BROKER_URL=BROKER_URL, COORDINATOR_KEYRING_PATH=str(self.keyring_path),
            COORDINATOR_LOG_LEVEL="WARNING", **extra)

    def start_coordinator(self, label: str) -> None:
        port = self.ports.setdefault(label, free_port())
        data = self.workdir / f"{self.name}-{label}"
        data.mkdir(exist_ok=True)
        extra = {"COORDINATOR_MONITORING_PORT": str(port), "COORDINATOR_DATA_DIR": str(data)}
        if self.consul_url is not None:
            extra |= {"COORDINATOR_REGISTRY_URL": self.consul_url,
                      "COORDINATOR_HA__ENABLED": "true",
                      "COORDINATOR_HA__LEASE_TTL_S": str(LEASE_TTL_S)}
        self.runs[label] += 1
        proc = self.children.spawn(f"{self.name}-{label}-{self.runs[label]}",
                                   [PYTHON, "-m", "coordinator_agent", "run"],
                                   env=self.env(**extra), cwd=self.workdir)
        self.pids[label] = proc.pid
        self.procs.append(proc)

    def start_agents(self) -> None:
        for agent in AGENTS:
            self.procs.append(self.children.spawn(
                f"{self.name}-{agent}",
                [PYTHON, "-m", "coordinator_agent", "worker", "--id", agent, "--concurrency", "8"],
                env=self.env(COORDINATOR_DATA_DIR=str(self.workdir)), cwd=self.workdir))

    def stop(self) -> None:
        """Stop this fleet's processes (the next burst has the machine to itself)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def status(self, label: str) -> dict[str, Any] | None:
        try:
            return dict(get_json(f"http://127.0.0.1:{self.ports[label]}/api/status"))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def leader(self) -> str | None:
        for label in self.ports:
            status = self.status(label)
            if status is not None and status.get("role") == "leader":
                return label
        return None

    def task(self, label: str, task_id: str) -> dict[str, Any] | None:
        try:
            return dict(get_json(f"http://127.0.0.1:{self.ports[label]}/api/tasks/{task_id}"))
        except (OSError, urllib.error.URLError, ValueError):
            return None


async def until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def burst(client: CoordinatorClient, n: int) -> float:
    started = time.perf_counter()
    ids = await asyncio.gather(*(client.submit("noop", input=NOOP) for _ in range(n)))
    done = await asyncio.wait_for(asyncio.gather(*(client.wait(t) for t in ids)), 300)
    elapsed = time.perf_counter() - started
    failed = [d for d in done if d.status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} burst tasks did not succeed: {failed[0]}")
    return n / elapsed


def client_for(name: str, keyring: Keyring, keyring_path: Path, workdir: Path
               ) -> CoordinatorClient:
    settings = load_settings(name=name, broker_url=BROKER_URL, keyring_path=keyring_path,
                             data_dir=workdir, monitoring_port=0, log_level="WARNING")
    return CoordinatorClient(settings, keyring.subset(OPERATOR), OPERATOR)


async def warm(client: CoordinatorClient) -> None:
    task_id = await client.submit("warm up", input=NOOP)
    done = await client.wait(task_id, 60)
    if done.status != "succeeded":
        raise RuntimeError(f"warm-up task ended {done.status}")


async def kills(fleet: Fleet, client: CoordinatorClient, count: int, rate: float
                ) -> dict[str, Any]:
    submitted: list[str] = []
    stop = asyncio.Event()

    async def trickle() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                submitted.append(await client.submit("load", input=NOOP))
            await asyncio.sleep(1 / rate)

    load = asyncio.create_task(trickle())
    takeovers: list[float] = []
    try:
        for i in range(count):
            leader = await until(fleet.leader, 30, "a leader")
            await until(lambda: all(fleet.status(lb) for lb in fleet.ports), 60,
                        "every coordinator answering")
            await asyncio.sleep(1.0)  # some load runs on this leader
            killed_at = time.time()
            with contextlib.suppress(ProcessLookupError):
                os.kill(fleet.pids[leader], signal.SIGKILL)
            probe = await client.submit(f"probe {i}", input=NOOP)
            submitted.append(probe)
            await client.wait(probe, 60)
            new = await until(fleet.leader, 30, "the new leader")
            view = await asyncio.to_thread(fleet.task, new, probe)
            if view is None or not view.get("attempts"):
                raise RuntimeError(f"the new leader {new} does not know probe {probe}")
            takeovers.append(view["attempts"][0]["started_at"] - killed_at)
            print(f"  kill {i + 1}/{count}: {leader} -> {new}, "
                  f"first assignment after {takeovers[-1]:.2f}s", flush=True)
            fleet.start_coordinator(leader)  # back in the race, as a standby
    finally:
        stop.set()
        await load

    async def finished(task_id: str) -> bool:
        try:
            await client.wait(task_id, 30)
        except TimeoutError:
            return False
        return True

    lost = sum(1 for done in await asyncio.gather(*map(finished, submitted)) if not done)
    # Completed twice: two notices that disagree (a repeat of the same outcome is allowed).
    notices: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for notice in client.notices:
        notices[notice.task_id].add(notice.model_dump_json())
        counts[notice.task_id] += 1
    twice = sum(1 for outcomes in notices.values() if len(outcomes) > 1)
    repeated = sum(1 for n in counts.values() if n > 1)
    return {"kills": count, "takeover_p50_s": median(takeovers),
            "takeover_p99_s": percentile(takeovers, 99), "takeover_max_s": max(takeovers),
            "tasks_submitted": len(submitted), "tasks_lost": lost,
            "tasks_completed_twice": twice, "tasks_notified_again_identically": repeated}


def start_consul(children: Children, workdir: Path) -> str:
    binary = shutil.which("consul")
    if binary is None:
        raise SystemExit("no consul binary on PATH (`make services` installs it)")
    http, lan, wan, server = (free_port() for _ in range(4))
    children.spawn("consul", [binary, "agent", "-dev", "-bind", "127.0.0.1",
                              "-client", "127.0.0.1", "-http-port", str(http),
                              "-dns-port", "-1", "-grpc-port", "-1",
                              "-serf-lan-port", str(lan), "-serf-wan-port", str(wan),
                              "-server-port", str(server), "-node", f"bench-{http}",
                              "-hcl", 'session_ttl_min = "1s"'],
                   env=clean_environ(), cwd=workdir)
    return f"http://127.0.0.1:{http}"


async def main(kill_count: int, burst_size: int, rate: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    children = Children(workdir)
    keyring = Keyring()
    for agent in AGENTS:
        keyring.generate(agent, "agent")
    keyring.generate(OPERATOR, "operator")
    keyring_path = workdir / "keyring.json"
    keyring.save(keyring_path)
    config = empty_config(workdir)
    os.environ["COORDINATOR_CONFIG"] = str(config)  # for load_settings in this process
    names = [f"bench-single-{uuid.uuid4().hex[:6]}", f"bench-ha-{uuid.uuid4().hex[:6]}",
             f"bench-alone-{uuid.uuid4().hex[:6]}"]
    results: dict[str, Any] = {}
    try:
        consul_url = start_consul(children, workdir)
        await until(lambda: _consul_ready(consul_url), 30, "the private Consul")

        single = Fleet(children, workdir, names[0], None, keyring_path, config)
        single.start_coordinator("solo")
        single.start_agents()
        async with client_for(names[0], keyring, keyring_path, workdir) as client:
            await warm(client)
            results["burst_tasks_per_s_ha_off"] = await burst(client, burst_size)
        single.stop()

        alone = Fleet(children, workdir, names[2], consul_url, keyring_path, config)
        alone.start_coordinator("a")  # HA on, no standby: the log's own cost
        alone.start_agents()
        async with client_for(names[2], keyring, keyring_path, workdir) as client:
            await warm(client)
            results["burst_tasks_per_s_ha_on_alone"] = await burst(client, burst_size)
        alone.stop()

        ha = Fleet(children, workdir, names[1], consul_url, keyring_path, config)
        for label in ("a", "b", "c"):
            ha.start_coordinator(label)
        ha.start_agents()
        async with client_for(names[1], keyring, keyring_path, workdir) as client:
            await warm(client)
            results["burst_tasks_per_s_ha_on"] = await burst(client, burst_size)
            results["burst_ha_on_over_off"] = round(
                results["burst_tasks_per_s_ha_on"] / results["burst_tasks_per_s_ha_off"], 3)
            results |= await kills(ha, client, kill_count, rate)
    finally:
        children.stop_all()
        for name in names:
            with contextlib.suppress(Exception):
                await delete_namespace(SecretStr(BROKER_URL), name, AGENTS, (OPERATOR,))
    return results


def _consul_ready(url: str) -> bool:
    try:
        leader = get_json(f"{url}/v1/status/leader")
        nodes = get_json(f"{url}/v1/catalog/nodes")
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return bool(leader) and bool(nodes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--rate", type=float, default=10.0, help="trickle tasks per second")
    args = parser.parse_args()
    out = asyncio.run(main(args.kills, args.burst, args.rate))
    print(table(["measure", "value"], sorted(out.items())))
    print(json.dumps(out))
