"""Where a sequential task's time goes: timestamps from every process, per stage.

Runs our coordinator (``--ha``: with the replicated log), one agent and a client as
bench/e2e_tasks.py does, with ``bench/trace_hooks`` on every process's path: each process
writes a line per AMQP publish, confirm and delivery (and an HA coordinator per log flush,
apply and barrier) with the wall clock (one machine, one clock). Then M tasks one at a time.
A task's window runs from the client's ``task.submit`` publish to its ``task.completed``
delivery; each stage ends at the first event of its kind after the stage before it ended, so
the stages of a window add up to its end-to-end time. The table gives each stage's median
over the tasks, per system; ``--base-tree`` runs another source tree's coordinator and agent
too, rounds alternating, for a before/after in one run.

    flock /tmp/bench.lock .venv/bin/python bench/stage_trace.py --ha [--tasks 300]
        [--rounds 2] [--base-tree DIR] [--also-without-ha] [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from _common import ROOT, Children, group_cpu_seconds, restore_env

from coordinator_agent.wire.constants import log_queue

HOOKS = ROOT / "bench" / "trace_hooks"

Event = tuple[float, str, str, str]  # time, process, kind, what (message type, or "log")

#: (stage, process, kind, what): a stage ends at the first such event after the previous one
#: ended. The log's steps are skipped where absent (HA off): the stage after them then runs
#: from the end of the one before.
#: A barrier's steps after the log flush: the batch out, the broker's confirm, the wake-up.
_BARRIER = [
    ("  log flush -> batch sealed, published", "coordinator", "pub", "log"),
    ("  log publish -> broker confirm", "coordinator", "conf", "log"),
    ("  confirm -> barrier returns", "coordinator", "bar1", "-"),
]
STAGES = [
    ("client: task.submit published -> the coordinator has it", "coordinator", "recv",
     "task.submit"),
    ("coordinator: submission handled, the dispatcher's turn -> log flush", "coordinator",
     "logflush", "-"),
    *_BARRIER,
    ("coordinator: -> task.assign published", "coordinator", "pub", "task.assign"),
    ("task.assign -> the agent has it", "agent", "recv", "task.assign"),
    ("agent: assignment -> task.result published", "agent", "pub", "task.result"),
    ("task.result -> the coordinator has it", "coordinator", "recv", "task.result"),
    ("coordinator: result handled -> log flush", "coordinator", "logflush", "-"),
    *_BARRIER,
    ("coordinator: -> task.completed published", "coordinator", "pub", "task.completed"),
    ("task.completed -> the client has it", "client", "recv", "task.completed"),
]
LOG_STEPS = ("logflush", "log", "bar1")


def forget(trace_dir: Path) -> None:
    for path in trace_dir.glob("*.trace"):
        path.write_text("")


def load(trace_dir: Path, names: dict[int, str], log_name: str) -> list[Event]:
    events: list[Event] = []
    for path in trace_dir.glob("*.trace"):
        pid = int(path.stem.rsplit("-", 1)[1])
        if pid not in names:
            continue
        proc = names[pid]
        for line in path.read_text().splitlines():
            t, kind, *rest = line.split()
            what = "-"
            if kind in ("pub", "conf", "recv"):
                what = "log" if rest[1] == log_name else rest[2]
            events.append((float(t), proc, kind, what))
    events.sort()
    return events


def windows(events: list[Event]) -> list[list[Event]]:
    out: list[list[Event]] = []
    current: list[Event] | None = None
    for event in events:
        _, proc, kind, what = event
        if proc == "client" and kind == "pub" and what == "task.submit":
            current = []
        if current is None:
            continue
        current.append(event)
        if proc == "client" and kind == "recv" and what == "task.completed":
            out.append(current)
            current = None
    return out


def stages(window: list[Event], ha: bool) -> dict[str, float] | None:
    """The stages of one task's window (ms), or None if one is missing."""
    durations: dict[str, float] = {}
    at, i = window[0][0], 0
    for number, (stage, proc, kind, what) in enumerate(STAGES):
        if not ha and (kind in LOG_STEPS or what in LOG_STEPS):
            continue
        while i < len(window) and window[i][1:] != (proc, kind, what):
            i += 1
        if i == len(window):
            return None
        durations[f"{number:02d} {stage}"] = (window[i][0] - at) * 1000
        at = window[i][0]
    durations["end to end"] = (window[-1][0] - window[0][0]) * 1000
    return durations


def counts(window: list[Event]) -> Counter[str]:
    return Counter(f"{proc} {kind} {what}" for _, proc, kind, what in window
                   if what == "log" or kind in ("bar0", "apply0"))


async def one_round(args: argparse.Namespace, trace_dir: Path, workdir: Path,
                    base: Path | None, ha: bool
                    ) -> tuple[list[dict[str, float]], Counter[str], float]:
    import e2e_tasks  # after the hooks: the client's AMQP is traced too

    children = Children(workdir)
    uid = f"trace{uuid.uuid4().hex[:6]}"
    # A base tree's processes get its path as PYTHONPATH: the hooks' directory goes with it.
    source = None if base is None else Path(f"{base}{os.pathsep}{HOOKS}")
    ours = e2e_tasks.Ours(children, workdir, uid, agent_concurrency=64, in_flight_cap=64,
                          ha=ha, source=source)
    saved = os.environ.get("COORDINATOR_CONFIG")
    try:
        await ours.start()
        await e2e_tasks.guarded(children, ours.warm_up())
        await asyncio.to_thread(forget, trace_dir)  # the warm-up is not measured
        coordinator = children.pid(ours.processes[0])
        cpu = group_cpu_seconds([coordinator])
        await e2e_tasks.guarded(children, ours.sequential(args.tasks))
        cpu_ms = (group_cpu_seconds([coordinator]) - cpu) * 1000 / args.tasks
        await asyncio.sleep(0.5)  # the last lines reach the files
        names = {children.pid(p): p.removeprefix("base-") for p in ours.processes}
        names[os.getpid()] = "client"
    finally:
        await ours.close()
        await asyncio.to_thread(children.stop_all)
        await ours.cleanup()
        restore_env("COORDINATOR_CONFIG", saved)
    tasks = windows(load(trace_dir, names, log_queue(ours.name)))
    per_task = [s for s in (stages(w, ha) for w in tasks) if s is not None]
    total: Counter[str] = Counter()
    for w in tasks:
        total.update(counts(w))
    return per_task, Counter({k: v / max(1, len(tasks)) for k, v in total.items()}), cpu_ms


def report(results: dict[str, list[tuple[list[dict[str, float]], Counter[str], float]]]
           ) -> None:
    systems = list(results)
    merged = {s: [t for r in results[s] for t in r[0]] for s in systems}
    names = sorted({n for tasks in merged.values() for t in tasks for n in t},
                   key=lambda n: (n == "end to end", n))
    print(f"{'stage (p50 over the tasks, ms)':72s}" + "".join(f"{s:>12s}" for s in systems))
    for name in names:
        row = []
        for s in systems:
            values = [t[name] for t in merged[s] if name in t]
            row.append(f"{statistics.median(values):12.3f}" if values else f"{'':12s}")
        print(f"{name[3:] if name[:2].isdigit() else name:72s}" + "".join(row))
    sums = [sum(statistics.median([t[n] for t in merged[s] if n in t] or [0.0])
                for n in names if n != "end to end") for s in systems]
    print(f"{'sum of the stages p50':72s}" + "".join(f"{v:12.3f}" for v in sums))
    for s in systems:
        p99 = sorted(t["end to end"] for t in merged[s])[int(0.99 * (len(merged[s]) - 1))]
        cpu = [r[2] for r in results[s]]
        per = Counter[str]()
        for r in results[s]:
            per.update(r[1])
        rounds = len(results[s])
        detail = ", ".join(f"{k} {v / rounds:.2f}" for k, v in sorted(per.items()))
        print(f"{s}: {len(merged[s])} tasks, p99 {p99:.2f} ms; coordinator CPU ms/task "
              f"{', '.join(f'{c:.2f}' for c in cpu)}; per task: {detail}")


async def confirm_floor(rounds: int = 300) -> None:
    """The broker's floor for one log append: a bare aio-pika publish + confirm loop of a
    2 KB persistent message on a stream (as big as a task's batch), then the same with a
    consumer reading the stream in the same process (as the leader's reader does), and on a
    quorum queue for comparison."""
    import aio_pika
    from _common import BROKER_URL

    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        body = os.urandom(2100)
        name = f"stage-trace-floor-{uuid.uuid4().hex[:6]}"

        async def loop(queue: str) -> str:
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                await channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue)
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            return f"p50 {times[len(times) // 2]:.3f} ms, p99 {times[int(len(times) * .99)]:.3f}"

        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "stream"})
        await channel.declare_queue(f"{name}-q", durable=True,
                                    arguments={"x-queue-type": "quorum"})
        try:
            await loop(name)  # warm-up
            print(f"stream publish -> confirm: {await loop(name)}")
            reader = await connection.channel()
            await reader.set_qos(prefetch_count=500)
            queue = await reader.get_queue(name, ensure=False)

            async def on_entry(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await message.ack()
            await queue.consume(on_entry, arguments={"x-stream-offset": "next"})
            print(f"stream publish -> confirm, a reader on it: {await loop(name)}")
            print(f"quorum queue publish -> confirm: {await loop(f'{name}-q')}")
        finally:
            await channel.queue_delete(name)
            await channel.queue_delete(f"{name}-q")
    finally:
        await connection.close()


async def run(args: argparse.Namespace, trace_dir: Path, workdir: Path) -> None:
    if args.floor:
        await confirm_floor()
    results: dict[str, list[tuple[list[dict[str, float]], Counter[str], float]]] = {}
    systems: list[tuple[str, Path | None, bool]] = [("this tree", None, args.ha)]
    if args.base_tree is not None:
        systems.append(("base tree", args.base_tree.resolve(), args.ha))
    if args.ha and args.also_without_ha:
        systems.append(("HA off", None, False))
    for number in range(args.rounds):
        turn = number % len(systems)
        for label, base, ha in systems[turn:] + systems[:turn]:
            outcome = await one_round(args, trace_dir, workdir, base, ha)
            results.setdefault(label, []).append(outcome)
            print(f"  round {number + 1} {label}: p50 "
                  f"{statistics.median(t['end to end'] for t in outcome[0]):.2f} ms",
                  flush=True)
    report(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ha", action="store_true")
    parser.add_argument("--base-tree", type=Path, metavar="DIR")
    parser.add_argument("--also-without-ha", action="store_true",
                        help="with --ha: this tree without HA too, in the same rounds")
    parser.add_argument("--floor", action="store_true",
                        help="first, a bare publish + confirm loop on a stream (the floor)")
    parser.add_argument("--keep", action="store_true", help="keep the trace files")
    args = parser.parse_args()
    trace_dir = Path(tempfile.mkdtemp(prefix="stage-trace-"))
    workdir = Path(tempfile.mkdtemp(prefix="stage-trace-run-"))
    os.environ["STAGE_TRACE_DIR"] = str(trace_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HOOKS), os.environ.get("PYTHONPATH")) if p)
    spec = importlib.util.spec_from_file_location("trace_hooks", HOOKS / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # this process: the client
    try:
        asyncio.run(run(args, trace_dir, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if args.keep:
            print(f"traces in {trace_dir}")
        else:
            shutil.rmtree(trace_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
