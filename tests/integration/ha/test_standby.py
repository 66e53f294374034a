"""Coordinator processes of one name with ``ha.enabled``: one leads, the others stand by.

Real `coordinator-agent run` processes, the real RabbitMQ, a private Consul (1 s minimum TTL).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.registry import coordinator_service_id
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring

from ..conftest import OPERATOR, StartWorker
from ..discovery.consul_agent import PrivateConsul
from ..helpers import spawn, subprocess_env
from .test_lease import consul  # noqa: F401  (the private Consul fixture)

LEASE_TTL_S = 2.0


_handed_out: set[int] = set()


def free_port() -> int:
    """A free port below the ephemeral range: a port the kernel handed out for the test would
    be free again once probed, and the outgoing connections of coordinators starting meanwhile
    (to the broker, to Consul) take theirs from that range."""
    while True:
        port = random.randrange(20_000, 32_000)
        if port in _handed_out:  # probed free, but maybe not bound yet by its process
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Coordinators:
    """Starts same-name coordinator processes, each with its own port and data directory."""

    def __init__(self, settings: Settings, consul_url: str | None, tmp_path: Path,
                 lease_ttl_s: float = LEASE_TTL_S) -> None:
        self.settings = settings
        self.consul_url = consul_url
        self.tmp_path = tmp_path
        self.processes: dict[str, subprocess.Popen[Any]] = {}
        self.urls: dict[str, str] = {}
        self.lease_ttl_s = lease_ttl_s

    def start(self, label: str, **env_extra: str) -> None:
        port = free_port()
        data = self.tmp_path / label
        data.mkdir(exist_ok=True)
        # Without a Consul URL the coordinators elect on the broker alone.
        registry = {"COORDINATOR_REGISTRY_URL": self.consul_url} if self.consul_url else {}
        env = subprocess_env(
            self.settings, COORDINATOR_MONITORING_PORT=str(port), COORDINATOR_DATA_DIR=str(data),
            COORDINATOR_HA__ENABLED="true", COORDINATOR_HA__LEASE_TTL_S=str(self.lease_ttl_s),
            **registry, **env_extra)
        self.processes[label] = spawn(["run"], env, self.tmp_path / f"{label}.log")
        self.urls[label] = f"http://127.0.0.1:{port}"

    def status(self, label: str) -> dict[str, Any] | None:
        try:
            return dict(get_json(self.urls[label] + "/api/status"))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def silent(self) -> str:
        """Why the processes that do not answer are silent: exit status and end of log."""
        lines = []
        for label, role in self.roles().items():
            if role is None:
                tail = (self.tmp_path / f"{label}.log").read_text(errors="replace")[-3000:]
                lines.append(f"{label} (exit status {self.processes[label].poll()}):\n{tail}")
        return "\n".join(lines)

    def roles(self) -> dict[str, str | None]:
        """Each process's reported role; None for one that does not answer."""
        return {label: (self.status(label) or {}).get("role") for label in self.processes}

    async def leader_and_standby(self) -> None:
        """Start "a" and wait until it leads, then "b" until it stands by."""
        self.start("a")
        await until(lambda: self.leader() == "a", 30, "a leads", self.silent)
        self.start("b")
        await until(lambda: self.roles().get("b") == "standby", 30, "b stands by", self.silent)

    def leader(self) -> str | None:
        leaders = [label for label, role in self.roles().items() if role == "leader"]
        assert len(leaders) <= 1, f"two leaders at once: {self.roles()}"
        return leaders[0] if leaders else None

    async def stop(self, label: str, timeout: float = 60) -> None:
        """SIGTERM one process and wait off the event loop (which serves the agents) for its
        graceful stop; a stop that hangs fails with the end of its log."""
        process = self.processes[label]
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # the second: it logs where its tasks wait
            await asyncio.to_thread(process.wait, 10)
            tail = (self.tmp_path / f"{label}.log").read_text(errors="replace")[-6000:]
            message = f"{label} did not stop within {timeout}s of SIGTERM:\n{tail}"
            raise AssertionError(message) from None

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def coordinators(settings: Settings, keyring: Keyring, consul: PrivateConsul,  # noqa: F811
                 tmp_path: Path, cleanup_namespace: None) -> Iterator[Coordinators]:
    group = Coordinators(settings, consul.url, tmp_path)
    yield group
    group.stop_all()


async def until(condition: Any, timeout: float, what: str,
                detail: Callable[[], str] | None = None) -> None:
    # The condition makes HTTP calls: run it off the event loop, which serves the agents.
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f"\n{detail()}" if detail is not None else ""))
        await asyncio.sleep(0.1)


def registered(consul_url: str, name: str) -> bool:
    services = get_json(f"{consul_url}/v1/agent/services")
    return coordinator_service_id(name) in services


async def test_a_late_same_name_coordinator_stands_by_and_never_splits_the_work(
    coordinators: Coordinators, start_worker: StartWorker, client: CoordinatorClient,
    settings: Settings, keyring: Keyring, consul: PrivateConsul,  # noqa: F811
) -> None:
    coordinators.start("a")
    await until(lambda: coordinators.leader() == "a", 30, "a leads")
    await until(lambda: registered(consul.url, settings.name), 15, "the leader registered")
    coordinators.start("b")
    await until(lambda: coordinators.roles().get("b") == "standby", 30, "b stands by")
    await start_worker("agent-1", max_concurrency=4)
    await start_worker("agent-2", max_concurrency=4)

    ids = [await client.submit(f"job {i}", input={"op": "sleep", "seconds": 0.1})
           for i in range(12)]
    for task_id in ids:
        assert (await client.wait(task_id, 30)).status == "succeeded"

    # A submission to the standby's API is queued for the leader, which runs it.
    token = keyring.principals[OPERATOR].api_token
    assert token is not None
    request = urllib.request.Request(
        coordinators.urls["b"] + "/api/tasks", method="POST",
        data=json.dumps({"description": "via the standby", "input": {"op": "echo"}}).encode(),
        headers={"Authorization": f"Bearer {token.get_secret_value()}",
                 "Content-Type": "application/json"})
    answer = await asyncio.to_thread(
        lambda: json.loads(urllib.request.urlopen(request, timeout=5).read()))
    assert answer["status"] == "queued_for_leader" and answer["role"] == "standby"

    def leader_finished() -> bool:
        view = get_json(f"{coordinators.urls['a']}/api/tasks/{answer['task_id']}")
        return bool(view["status"] == "succeeded")
    await until(leader_finished, 30, "the leader ran the task given to the standby")

    a, b = coordinators.status("a"), coordinators.status("b")
    assert a is not None and b is not None
    assert a["role"] == "leader" and a["epoch"] > 0 and b["role"] == "standby"
    assert a["totals"]["submitted"] == len(ids) + 1 and b["totals"]["submitted"] == 0
    assert Counter(n.task_id for n in client.notices if n.task_id in ids) == Counter(ids)
    ready = get_json(coordinators.urls["b"] + "/readyz")
    assert ready["ready"] is True and ready["role"] == "standby"
    metrics = urllib.request.urlopen(coordinators.urls["b"] + "/metrics", timeout=5).read()
    assert b"coordinator_leader 0.0" in metrics

    # The standby stops: the leader's Consul registration stays.
    await coordinators.stop("b")
    assert registered(consul.url, settings.name)
    assert coordinators.leader() == "a"


async def test_sigkill_of_the_leader_a_standby_takes_over_and_assigns(
    coordinators: Coordinators, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    for label in ("a", "b", "c"):
        coordinators.start(label)
    await until(lambda: coordinators.leader() is not None, 30, "a leader")
    await until(lambda: None not in coordinators.roles().values(), 30, "all three answer",
                coordinators.silent)
    worker = await start_worker("agent-1", max_concurrency=4)
    first = coordinators.leader()
    assert first is not None
    first_status = coordinators.status(first)
    assert first_status is not None
    warmup = await client.submit("warm up", input={"op": "echo"})
    assert (await client.wait(warmup, 30)).status == "succeeded"

    killed_at = time.time()
    coordinators.processes[first].send_signal(signal.SIGKILL)
    coordinators.processes[first].wait()
    task_id = await client.submit("after the kill", input={"op": "echo"})
    done = await client.wait(task_id, 30)
    assert done.status == "succeeded"

    second = coordinators.leader()
    assert second is not None and second != first
    status = coordinators.status(second)
    assert status is not None and status["epoch"] > first_status["epoch"]
    # Fencing: the agent now refuses anything from the first leader's term.
    assert worker.max_epoch == status["epoch"] and worker.stale_directives == 0
    view = get_json(f"{coordinators.urls[second]}/api/tasks/{task_id}")
    assigned_at = view["attempts"][0]["started_at"]
    takeover_s = assigned_at - killed_at
    print(f"kill -9 of the leader to the first assignment by the next: {takeover_s:.2f}s")
    # A killed leader's lease ends within its TTL; the new leader then starts at once.
    assert takeover_s < LEASE_TTL_S + 3.0
    standbys = [label for label, role in coordinators.roles().items()
                if label not in (first, second)]
    assert [coordinators.roles()[label] for label in standbys] == ["standby"]


async def test_a_leader_paused_past_its_lease_is_replaced_and_wakes_a_standby(
    coordinators: Coordinators, start_worker: StartWorker, client: CoordinatorClient,
) -> None:
    await coordinators.leader_and_standby()
    worker = await start_worker("agent-1", max_concurrency=4)

    coordinators.processes["a"].send_signal(signal.SIGSTOP)
    await until(lambda: coordinators.status("b") is not None
                and coordinators.roles().get("b") == "leader", LEASE_TTL_S + 10, "b leads")
    ids = [await client.submit(f"while a sleeps {i}", input={"op": "echo"}) for i in range(6)]
    # Deliveries the paused process had prefetched stay with it until it wakes (or the broker
    # drops its connection): it then hands them back unhandled, and b runs them.
    await asyncio.sleep(2)
    coordinators.processes["a"].send_signal(signal.SIGCONT)
    await until(lambda: coordinators.roles().get("a") == "standby", 10, "a wakes a standby")
    for task_id in ids:
        assert (await client.wait(task_id, 30)).status == "succeeded"
    later = await client.submit("after a woke", input={"op": "echo"})
    assert (await client.wait(later, 30)).status == "succeeded"
    a, b = coordinators.status("a"), coordinators.status("b")
    assert a is not None and b is not None and b["epoch"] > a["epoch"]
    assert a["totals"]["submitted"] == 0 and b["totals"]["submitted"] == len(ids) + 1
    assert Counter(n.task_id for n in client.notices) == Counter([*ids, later])
    # Every directive the agent acted on after the takeover was of b's term.
    assert worker.max_epoch == b["epoch"]
