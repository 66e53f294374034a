"""What the agent's "started" report costs: the same bursts with and without it, in one run.

Before each task's handler runs, the SDK publishes a ``task.progress`` of 0 ("started") and
waits for the broker's confirm (RELIABILITY.md, "Started reports"). That is one more message per
task through the broker and the coordinator. Here one coordinator serves two agents of two kinds,
identical but for that report (``WorkerAgent.report_started`` off in the second), and bursts of
no-op tasks go to one kind then the other, alternating which goes first. Reported per variant,
medians over rounds: tasks/s (submit to last completion) and CPU milliseconds per task of the
coordinator, of the agent and of the (shared) broker.

    .venv/bin/python bench/started_cost.py [--tasks 1000] [--rounds 4] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from _common import (
    BROKER_URL,
    PYTHON,
    Children,
    broker_cpu_seconds,
    clean_environ,
    empty_config,
    group_cpu_seconds,
    median,
    ratio,
    table,
)
from pydantic import SecretStr

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.settings import load_settings
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import delete_namespace

NOOP = {"op": "noop"}
#: The example worker with the started report switched off (the CLI has no such option).
QUIET_WORKER = (
    "import sys; from coordinator_agent.agent.worker import WorkerAgent; "
    "WorkerAgent.report_started = False; "
    "from coordinator_agent.cli.main import main; sys.exit(main(sys.argv[1:]))"
)
VARIANTS = {"reports": "with started report", "quiet": "without"}


async def burst(client: CoordinatorClient, kind: str, n: int) -> float:
    started = time.perf_counter()
    ids = await asyncio.gather(*(client.submit("noop", kind=kind, input=NOOP) for _ in range(n)))
    results = await asyncio.wait_for(asyncio.gather(*(client.wait(i) for i in ids)),
                                     max(120.0, n / 10))
    elapsed = time.perf_counter() - started
    bad = [r for r in results if r.status != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} tasks did not succeed: {bad[0]}")
    client.completed.clear()
    client.accepted.clear()
    client.notices.clear()
    return n / elapsed


async def main(tasks: int, rounds: int, concurrency: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-started-"))
    name = f"bench-started-{uuid.uuid4().hex[:6]}"
    agents = {"reports": "started-agent-1", "quiet": "started-agent-2"}
    keyring = Keyring()
    for agent_id in agents.values():
        keyring.generate(agent_id, "agent")
    keyring.generate("bench-operator", "operator")
    keyring_path = workdir / "keyring.json"
    keyring.save(keyring_path)
    config = empty_config(workdir)
    os.environ["COORDINATOR_CONFIG"] = str(config)
    env = clean_environ(
        COORDINATOR_CONFIG=str(config), COORDINATOR_NAME=name, COORDINATOR_BROKER_URL=BROKER_URL,
        COORDINATOR_KEYRING_PATH=str(keyring_path), COORDINATOR_DATA_DIR=str(workdir / "data"),
        COORDINATOR_MONITORING_PORT="0", COORDINATOR_LOG_LEVEL="WARNING",
    )
    children = Children(workdir)
    children.spawn("coordinator", [PYTHON, "-m", "coordinator_agent", "run"], env=env, cwd=workdir)
    for variant, agent_id in agents.items():
        cli = ([PYTHON, "-c", QUIET_WORKER] if variant == "quiet"
               else [PYTHON, "-m", "coordinator_agent"])
        children.spawn(agent_id, [*cli, "worker", "--id", agent_id, "--kind", variant,
                                  "--concurrency", str(concurrency)], env=env, cwd=workdir)
    settings = load_settings(name=name, broker_url=BROKER_URL, keyring_path=keyring_path,
                             data_dir=workdir / "data", monitoring_port=0, log_level="WARNING")
    client = CoordinatorClient(settings, keyring.subset("bench-operator"), "bench-operator")
    measured: dict[str, dict[str, list[float]]] = {
        v: {"rate": [], "coordinator": [], "agent": [], "broker": []} for v in VARIANTS}
    print(f"started_cost: {tasks} no-op tasks per burst, {rounds} round(s), agent concurrency "
          f"{concurrency}", flush=True)
    try:
        await client.start()
        for variant in VARIANTS:  # warm-up; also waits for both hellos
            await asyncio.wait_for(burst(client, variant, 20), 120)
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                children.check_alive()
                pids = {"coordinator": children.pid("coordinator"),
                        "agent": children.pid(agents[variant])}
                cpu0 = {k: group_cpu_seconds([p]) for k, p in pids.items()}
                broker0 = broker_cpu_seconds()
                rate = await burst(client, variant, tasks)
                m = measured[variant]
                m["rate"].append(rate)
                for k, p in pids.items():
                    m[k].append((group_cpu_seconds([p]) - cpu0[k]) * 1000 / tasks)
                m["broker"].append((broker_cpu_seconds() - broker0) * 1000 / tasks)
                print(f"  round {r + 1} {variant:8} {rate:7.1f} tasks/s", flush=True)
    finally:
        await client.close()
        children.stop_all()
        await delete_namespace(SecretStr(BROKER_URL), name, list(agents.values()),
                               ["bench-operator"])
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for variant, label in VARIANTS.items():
        m = measured[variant]
        rows.append([label, median(m["rate"]), median(m["coordinator"]), median(m["agent"]),
                     median(m["broker"])])
    print(table(["agent", "tasks/s", "coord CPU ms/task", "agent CPU ms/task",
                 "broker CPU ms/task"], rows))
    on, off = (measured[v] for v in VARIANTS)
    print(f"with / without: throughput {ratio(median(on['rate']), median(off['rate'])):.2f}x, "
          f"coordinator CPU {ratio(median(on['coordinator']), median(off['coordinator'])):.2f}x, "
          f"agent CPU {ratio(median(on['agent']), median(off['agent'])):.2f}x, "
          f"broker CPU {ratio(median(on['broker']), median(off['broker'])):.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.rounds, args.concurrency))
