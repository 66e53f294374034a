"""Where a sequential task's time goes: timestamps from every process, per stage.

Runs our coordinator (optionally with HA), one agent and a client as bench/e2e_tasks.py does,
with ``bench/trace_hooks`` on every process's path: each process writes a line per AMQP publish,
confirm and delivery (and, in an HA coordinator, per log flush, apply and barrier) with the
wall clock (one machine: one clock). Then M tasks one at a time; each task's window runs from
the client's ``task.submit`` publish to its ``task.completed`` delivery. Every event of a
window is named by process, kind, message type (the log's entries: ``log``) and its
occurrence in the window, and the table lists each named event that occurs in most windows,
in order of its median offset from the submit, with the median step from the event before it.

    flock /tmp/bench.lock .venv/bin/python bench/stage_trace.py [--ha] [--tasks 300]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path

from _common import ROOT, Children, restore_env

from coordinator_agent.wire.constants import log_queue

HOOKS = ROOT / "bench" / "trace_hooks"


def forget(trace_dir: Path) -> None:
    for path in trace_dir.glob("*.trace"):
        path.write_text("")


def load(trace_dir: Path, names: dict[int, str]) -> list[tuple[float, str, list[str]]]:
    events = []
    for path in trace_dir.glob("*.trace"):
        pid = int(path.stem.rsplit("-", 1)[1])
        proc = names.get(pid, "client" if pid == os.getpid() else f"pid{pid}")
        for line in path.read_text().splitlines():
            t, kind, *rest = line.split()
            events.append((float(t), proc, [kind, *rest]))
    events.sort(key=lambda e: e[0])
    return events


def label(proc: str, fields: list[str], log_queue: str) -> str:
    kind = fields[0]
    if kind in ("pub", "conf", "recv"):
        _, _exchange, routing_key, mtype = fields[:4]
        what = "log" if routing_key == log_queue else mtype
        return f"{proc} {kind} {what}"
    if kind in ("bar0", "bar1"):
        return f"{proc} {kind}{'(waits)' if fields[1] == '1' else '(done)'}"
    return f"{proc} {kind}"


def windows(events: list[tuple[float, str, list[str]]], log_queue: str
            ) -> list[dict[str, float]]:
    """Per task: the offset (ms) of each named event from the submit's publish."""
    out: list[dict[str, float]] = []
    current: dict[str, float] | None = None
    counts: dict[str, int] = defaultdict(int)
    start = 0.0
    for t, proc, fields in events:
        if proc == "client" and fields[0] == "pub" and fields[3] == "task.submit":
            current, counts, start = {}, defaultdict(int), t
        if current is None:
            continue
        name = label(proc, fields, log_queue)
        counts[name] += 1
        current[f"{name} #{counts[name]}"] = (t - start) * 1000
        if proc == "client" and fields[0] == "recv" and fields[3] == "task.completed":
            out.append(current)
            current = None
    return out


def report(tasks: list[dict[str, float]]) -> None:
    seen: dict[str, list[float]] = defaultdict(list)
    for w in tasks:
        for name, offset in w.items():
            seen[name].append(offset)
    common = [n for n, v in seen.items() if len(v) >= 0.8 * len(tasks)]
    common.sort(key=lambda n: statistics.median(seen[n]))
    total = [w[max(w, key=w.__getitem__)] for w in tasks]
    print(f"{len(tasks)} tasks; end to end p50 {statistics.median(total):.2f} ms")
    print(f"{'event (process kind type #occurrence)':58s} {'in':>5s} {'p50 at':>8s} "
          f"{'p50 step':>9s}")
    previous: str | None = None
    for name in common:
        steps = [w[name] - w[previous] for w in tasks
                 if previous is not None and name in w and previous in w]
        step = f"{statistics.median(steps):9.3f}" if steps else " " * 9
        print(f"{name:58s} {len(seen[name]):5d} {statistics.median(seen[name]):8.3f} {step}")
        previous = name


async def run(args: argparse.Namespace, trace_dir: Path, workdir: Path) -> None:
    import e2e_tasks  # after the hooks: its imports are traced too

    children = Children(workdir)
    uid = f"trace{uuid.uuid4().hex[:6]}"
    ours = e2e_tasks.Ours(children, workdir, uid, agent_concurrency=64, in_flight_cap=64,
                          ha=args.ha)
    saved = os.environ.get("COORDINATOR_CONFIG")
    try:
        await ours.start()
        await e2e_tasks.guarded(children, ours.warm_up())
        await asyncio.to_thread(forget, trace_dir)  # the warm-up is not measured
        await e2e_tasks.guarded(children, ours.sequential(args.tasks))
        await asyncio.sleep(0.5)  # the last lines reach the files
        names = {children.pid(p): p for p in ours.processes}
    finally:
        await ours.close()
        await asyncio.to_thread(children.stop_all)
        await ours.cleanup()
        restore_env("COORDINATOR_CONFIG", saved)
    report(windows(load(trace_dir, names), log_queue(ours.name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--ha", action="store_true")
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
