"""The replicated log under real failures: the leader killed under load, every coordinator
killed at once, a standby started late against a long log.

Real `coordinator-agent run` processes with ``ha.enabled``, the real RabbitMQ (the log is a
stream there), a private Consul (1 s minimum TTL), real agents.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator

import aio_pika
import pytest

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.settings import Settings
from coordinator_agent.wire.constants import log_queue, snapshot_queue
from coordinator_agent.wire.messaging import close_connection

from ..conftest import StartWorker
from .test_lease import consul  # noqa: F401  (the private Consul fixture)
from .test_standby import Coordinators, coordinators, get_json, until  # noqa: F401

TASKS = 300


@pytest.fixture
async def drop_log(settings: Settings) -> AsyncIterator[None]:
    yield
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    channel = await connection.channel()
    await channel.queue_delete(log_queue(settings.name))
    await channel.queue_delete(snapshot_queue(settings.name))
    await close_connection(connection)


def one_notice_each(client: CoordinatorClient, ids: list[str]) -> None:
    """Every task completed, and every repeat of its notice says the same."""
    seen: dict[str, set[str]] = defaultdict(set)
    for notice in client.notices:
        seen[notice.task_id].add(notice.model_dump_json())
    missing = [task_id for task_id in ids if task_id not in seen]
    assert not missing, f"{len(missing)} tasks never completed, e.g. {missing[:3]}"
    differing = [task_id for task_id in ids if len(seen[task_id]) != 1]
    assert not differing, f"tasks completed twice, differently: {differing[:3]}"


async def submit_load(client: CoordinatorClient, ids: list[str], count: int) -> None:
    for i in range(count):
        ids.append(await client.submit(f"load {i}", input={"op": "sleep", "seconds": 0.05}))
        await asyncio.sleep(0.02)


@pytest.mark.timeout(600)
async def test_the_leader_killed_three_times_under_load_loses_and_doubles_nothing(
    coordinators: Coordinators, start_worker: StartWorker,  # noqa: F811
    client: CoordinatorClient, drop_log: None,
) -> None:
    for label in ("a", "b", "c"):
        coordinators.start(label)
    await until(lambda: coordinators.leader() is not None, 30, "a leader")
    await until(lambda: None not in coordinators.roles().values(), 60, "all three answer",
                coordinators.silent)
    for n in range(3):  # the test keyring holds three agents
        await start_worker(f"agent-{n + 1}", max_concurrency=4)

    ids: list[str] = []
    load = asyncio.create_task(submit_load(client, ids, TASKS))
    epochs = []
    for kill in range(3):
        target = (kill + 1) * TASKS // 5
        await until(lambda t=target: len(client.completed) >= t, 120,  # type: ignore[misc]
                    f"completions before kill {kill + 1}")
        leader = coordinators.leader()
        assert leader is not None
        status = coordinators.status(leader)
        assert status is not None
        epochs.append(status["epoch"])
        coordinators.processes[leader].send_signal(signal.SIGKILL)
        coordinators.processes[leader].wait()
        await until(lambda old=leader: coordinators.leader() not in (None, old),  # type: ignore[misc]
                    30,
                    f"a new leader after kill {kill + 1}")
        coordinators.start(leader)  # back as a standby: it reads the log from its offset
    await load
    for task_id in ids:
        notice = await client.wait(task_id, 180)
        assert notice.status == "succeeded", (task_id, notice.error, notice.attempts)
    one_notice_each(client, ids)
    leader = coordinators.leader()
    assert leader is not None
    final = coordinators.status(leader)
    assert final is not None and final["epoch"] > max(epochs)
    assert epochs == sorted(epochs) and len(set(epochs)) == 3

    # Every coordinator's store holds every task's end (the read API answers from it).
    await until(lambda: all(
        (coordinators.status(label) or {}).get("replication", {}).get("lag_entries") == 0
        for label in coordinators.processes), 60, "every replica caught up")
    for label in coordinators.processes:
        def applied(url: str = coordinators.urls[label]) -> bool:
            try:
                return bool(get_json(f"{url}/api/tasks/{ids[-1]}")["status"] == "succeeded")
            except urllib.error.HTTPError as exc:  # 404: not applied yet (the lag's tail is
                if exc.code != 404:                 # probed every 2 s, so it can lag itself)
                    raise
                return False
        await until(applied, 30, f"{label}'s replica holds the last task's end")


@pytest.mark.timeout(400)
async def test_every_coordinator_killed_at_once_then_restarted_loses_nothing(
    coordinators: Coordinators, start_worker: StartWorker,  # noqa: F811
    client: CoordinatorClient, drop_log: None,
) -> None:
    for label in ("a", "b", "c"):
        coordinators.start(label)
    await until(lambda: coordinators.leader() is not None, 30, "a leader")
    for n in range(2):
        await start_worker(f"agent-{n + 1}", max_concurrency=4)
    ids: list[str] = []
    await submit_load(client, ids, 60)
    await until(lambda: len(client.completed) >= 10, 60, "some completions")
    for process in coordinators.processes.values():
        process.send_signal(signal.SIGKILL)
    for process in coordinators.processes.values():
        process.wait()
    for label in ("a", "b", "c"):
        coordinators.start(label)
    for task_id in ids:
        assert (await client.wait(task_id, 180)).status == "succeeded"
    one_notice_each(client, ids)


@pytest.mark.timeout(400)
async def test_a_standby_started_late_catches_up_with_a_long_log(
    coordinators: Coordinators, start_worker: StartWorker,  # noqa: F811
    client: CoordinatorClient, drop_log: None,
) -> None:
    coordinators.start("a")
    await until(lambda: coordinators.leader() == "a", 30, "a leads")
    await start_worker("agent-1", max_concurrency=8)
    ids = [await client.submit(f"history {i}", input={"op": "echo"}) for i in range(400)]
    for task_id in ids:
        assert (await client.wait(task_id, 120)).status == "succeeded"

    coordinators.start("late")
    await until(lambda: coordinators.roles().get("late") == "standby", 30, "late stands by")

    def caught_up() -> bool:
        a, late = coordinators.status("a"), coordinators.status("late")
        if a is None or late is None:
            return False
        return bool(late["replication"]["log_offset"] is not None
                    and late["replication"]["log_offset"] >= a["replication"]["log_offset"])
    await until(caught_up, 60, "the late standby reached the leader's offset")
    # It answers reads from its replica: every task, with its outcome.
    for task_id in (ids[0], ids[len(ids) // 2], ids[-1]):
        view = get_json(f"{coordinators.urls['late']}/api/tasks/{task_id}")
        assert view["status"] == "succeeded" and view["output"] == {"op": "echo"}
    # Its learner took the leader's routing outcomes from the log, as the leader's did.
    def outcomes(label: str) -> int:
        kinds = get_json(f"{coordinators.urls[label]}/api/routing")["kinds"]
        return sum(int(stats["outcomes"]) for stats in kinds.values())
    assert outcomes("a") > len(ids) // 2  # the learner's own count (it may skip a few)
    await until(lambda: outcomes("late") == outcomes("a"), 30, "the late learner caught up")
    metrics = urllib.request.urlopen(coordinators.urls["late"] + "/metrics", timeout=5).read()
    assert b"coordinator_log_lag_events 0.0" in metrics  # caught up, and it says so
    recent = get_json(f"{coordinators.urls['late']}/api/tasks?limit=500")
    listed = {task["id"] for task in recent["tasks"]}
    assert set(ids) <= listed


@pytest.mark.timeout(600)
async def test_a_fresh_standby_restores_the_leaders_snapshot_and_reads_only_the_rest(
    coordinators: Coordinators, start_worker: StartWorker,  # noqa: F811
    client: CoordinatorClient, drop_log: None,
) -> None:
    # The smallest schedule the settings allow: a snapshot every 1,000 events applied.
    coordinators.start("a", COORDINATOR_HA__SNAPSHOT_EVERY_EVENTS="1000")
    await until(lambda: coordinators.leader() == "a", 30, "a leads")
    await start_worker("agent-1", max_concurrency=8)
    ids = [await client.submit(f"history {i}", input={"op": "echo"}) for i in range(400)]
    for task_id in ids:
        assert (await client.wait(task_id, 120)).status == "succeeded"
    leader_log = (coordinators.tmp_path / "a.log")
    await until(lambda: "snapshot " in leader_log.read_text() and " chunks, " in
                leader_log.read_text(), 60, "the leader wrote a snapshot")

    coordinators.start("late")
    await until(lambda: coordinators.roles().get("late") == "standby", 60, "late stands by")
    assert "restored snapshot" in (coordinators.tmp_path / "late.log").read_text()

    def replication(label: str) -> dict[str, int]:
        status = coordinators.status(label)
        return dict(status["replication"]) if status else {}
    await until(lambda: replication("late").get("log_offset", -1) >=
                replication("a")["log_offset"], 60, "the late standby reached the leader")
    # It applied only the log after the snapshot, yet holds the whole history.
    assert replication("late")["applied_events"] < replication("a")["applied_events"]
    for task_id in (ids[0], ids[-1]):
        view = get_json(f"{coordinators.urls['late']}/api/tasks/{task_id}")
        assert view["status"] == "succeeded"
