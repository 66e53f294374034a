"""Run every benchmark with its in-run baselines and print a summary against the targets.

    .venv/bin/python bench/run_all.py            # full: 2000 burst / 300 sequential tasks,
                                                 # 20000 status messages, 3 rounds, discovery
                                                 # with 10/100/1000 agents (~10 min)
    .venv/bin/python bench/run_all.py --quick    # smoke run (~2 min)
    .venv/bin/python bench/run_all.py --only routing   # the planner alone, no broker
    .venv/bin/python bench/run_all.py --only discovery # Consul + liveness alone (~5 min)

The benchmarks' progress lines go to a log file (named at the start; --verbose prints them);
the terminal gets each benchmark's result table and a summary of the goals: ours, the baseline
of the same run, the ratio, the target, MET or MISSED.

Needs RabbitMQ on 127.0.0.1:5672, and Consul on 127.0.0.1:8500 for discovery (`make
services`). Figures are medians of the rounds; every
ratio compares with a baseline measured in the same run, because the machine is shared.
Exit status: 0 when the benchmarks ran (targets met or not; --strict: 1 if one is missed),
2 when a benchmark failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import discovery
import e2e_tasks
import routing_decision
import status_ingest
from _common import GOAL_COLUMNS, ROOT, Goal, table


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "coordinator_agent"],
                               cwd=ROOT, check=False, capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (coordinator_agent modified)' if dirty.strip() else ''}" or "unknown"


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs, {platform.python_implementation()} "
            f"{platform.python_version()}, load average {load}")


@contextlib.contextmanager
def quiet(log: IO[str] | None) -> Iterator[None]:
    """Send a benchmark's progress lines to the log (None: leave them on the terminal)."""
    if log is None:
        yield
        return
    with contextlib.redirect_stdout(log):
        yield
    log.flush()


def step(name: str, log: IO[str] | None, run: Callable[[], Any]) -> Any:
    """Run one benchmark; its lines go to the log, its traceback to stderr; None if it failed."""
    started = time.monotonic()
    print(f"{name} ...", end="" if log is not None else "\n", flush=True)
    try:
        with quiet(log):
            result = run()
    except Exception:
        print(" FAILED" if log is not None else f"{name}: FAILED", flush=True)
        traceback.print_exc()
        return None
    if log is not None:
        print(f" done ({time.monotonic() - started:.0f} s)", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="e2e burst size N")
    parser.add_argument("--latency-tasks", type=int, default=300, help="e2e sequential tasks M")
    parser.add_argument("--status-messages", type=int, default=20000, help="status backlog K")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 burst / 50 sequential tasks, 2000 status, 1 round")
    parser.add_argument("--only", choices=["e2e", "status", "routing", "discovery"],
                        help="run one benchmark")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--log", type=Path, help="the benchmarks' progress lines (default: a "
                        "file in /tmp, named at the start)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the benchmarks' progress lines instead of logging them")
    parser.add_argument("--ha", action="store_true",
                        help="e2e with the coordinator's ha.enabled (needs Consul on :8500)")
    parser.add_argument("--base-tree", type=Path, metavar="DIR",
                        help="e2e: also run another source tree's coordinator and agent (e.g. "
                        "a worktree of main) as 'base', in the same rounds")
    parser.add_argument("--client-batch", action="store_true", default=True,
                        help="e2e: ours submits the burst in batch messages (submit_many, the "
                        "client's bulk path); the default")
    parser.add_argument("--single-submits", dest="client_batch", action="store_false",
                        help="e2e: ours submits the burst with one submit() per task")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    if args.quick:
        args.tasks, args.latency_tasks, args.status_messages, args.rounds = 200, 50, 2000, 1

    started = time.monotonic()
    print(f"coordinator_agent benchmarks, revision {git_revision()}; {machine()}", flush=True)
    log_path = None if args.verbose else (
        args.log or Path(tempfile.mkstemp(prefix="bench-run-all-", suffix=".log")[1]))
    log = None if log_path is None else log_path.open("w", encoding="utf-8")
    if log_path is not None:
        print(f"progress lines in {log_path} (--verbose prints them)", flush=True)
    results: dict[str, Any] = {"revision": git_revision(), "machine": machine(),
                               "args": {k: str(v) for k, v in vars(args).items()}}
    goals: list[Goal] = []
    failures = []
    reports: list[Callable[[], None]] = []
    notes: list[str] = []  # context for the goals (the e2e floor)
    if args.only in (None, "e2e"):
        e2e = step("e2e tasks (ours, raw aio-pika, its 4 hops, Celery)", log, lambda: asyncio.run(
            e2e_tasks.run(tasks=args.tasks, latency_tasks=args.latency_tasks,
                          rounds=args.rounds, ha=args.ha, base_tree=args.base_tree,
                          client_batch=args.client_batch)))
        if e2e is None:
            failures.append("e2e")
        else:
            results["e2e"] = e2e
            goals += e2e_tasks.targets(e2e)
            reports.append(lambda: e2e_tasks.report(e2e))
            floor = e2e_tasks.floor_note(e2e)
            notes += [] if floor is None else [floor]
    if args.only in (None, "status"):
        status = step("status ingestion (ours, raw aio-pika)", log, lambda: asyncio.run(
            status_ingest.run(messages=args.status_messages, rounds=args.rounds)))
        if status is None:
            failures.append("status")
        else:
            results["status"] = status
            goals += status_ingest.targets(status)
            reports.append(lambda: status_ingest.report(status))
    if args.only in (None, "routing"):
        # No broker: the planner alone, 100k outcomes and 1000 agents even in a quick run.
        routing = step("routing decisions (no broker)", log, lambda: routing_decision.run(
            decisions=2000 if args.quick else 20_000, records=500 if args.quick else 5000))
        if routing is None:
            failures.append("routing")
        else:
            results["routing"] = routing
            goals += routing_decision.targets(routing)
    if args.only in (None, "discovery"):
        # No target: latencies against the bounds the liveness settings give.
        discovered = step("discovery and liveness (Consul)", log, lambda: asyncio.run(
            discovery.run(fleets=(10, 100), probes=3, deaths=2) if args.quick
            else discovery.run()))
        if discovered is None:
            failures.append("discovery")
        else:
            results["discovery"] = discovered
    if log is not None:
        log.close()

    for show in reports:
        show()
    print(f"\nsummary ({'quick' if args.quick else 'full'} run, {args.rounds} round(s), "
          f"{time.monotonic() - started:.0f}s); every ratio against a baseline of the same run")
    if goals:
        print(table(GOAL_COLUMNS, [goal.row() for goal in goals]))
        met = sum(goal.ok for goal in goals)
        print(f"{met} of {len(goals)} goals met")
    for note in notes:
        print(f"  {note}")
    where = "" if log_path is None else f" and {log_path}"
    for name in failures:
        print(f"{name}: FAILED (see the traceback above{where})")
    if args.json:
        results["goals"] = [goal.__dict__ for goal in goals]
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if failures:
        return 2
    if args.strict and not all(goal.ok for goal in goals):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
