"""Run every benchmark with its in-run baselines and print a summary against the targets.

    .venv/bin/python bench/run_all.py            # full: 2000 burst / 300 sequential tasks,
                                                 # 20000 status messages, 3 rounds, discovery
                                                 # with 10/100/1000 agents (~10 min)
    .venv/bin/python bench/run_all.py --quick    # smoke run (~2 min)
    .venv/bin/python bench/run_all.py --only routing   # the planner alone, no broker
    .venv/bin/python bench/run_all.py --only discovery # Consul + liveness alone (~5 min)

Needs RabbitMQ on 127.0.0.1:5672, and Consul on 127.0.0.1:8500 for discovery (`make
services`). Figures are medians of the rounds; every
ratio compares with a baseline measured in the same run, because the machine is shared.
Exit status: 0 when the benchmarks ran (targets met or not; --strict: 1 if one is missed),
2 when a benchmark failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import discovery
import e2e_tasks
import routing_decision
import status_ingest
from _common import ROOT, table, verdict


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
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    if args.quick:
        args.tasks, args.latency_tasks, args.status_messages, args.rounds = 200, 50, 2000, 1

    started = time.monotonic()
    print(f"coordinator_agent benchmarks, revision {git_revision()}; {machine()}", flush=True)
    results: dict[str, Any] = {"revision": git_revision(), "machine": machine(),
                               "args": {k: str(v) for k, v in vars(args).items()}}
    checks: dict[str, tuple[float, bool]] = {}
    failures = []
    if args.only in (None, "e2e"):
        print(flush=True)
        try:
            e2e = asyncio.run(e2e_tasks.run(
                tasks=args.tasks, latency_tasks=args.latency_tasks, rounds=args.rounds,
            ))
            results["e2e"] = e2e
            checks |= e2e_tasks.targets(e2e)
        except Exception:
            traceback.print_exc()
            failures.append("e2e")
    if args.only in (None, "status"):
        print(flush=True)
        try:
            status = asyncio.run(status_ingest.run(
                messages=args.status_messages, rounds=args.rounds,
            ))
            results["status"] = status
            checks |= status_ingest.targets(status)
        except Exception:
            traceback.print_exc()
            failures.append("status")

    if args.only in (None, "routing"):
        print(flush=True)
        try:
            # No broker: the planner alone, 100k outcomes and 1000 agents even in a quick run.
            routing = routing_decision.run(decisions=2000 if args.quick else 20_000,
                                           records=500 if args.quick else 5000)
            results["routing"] = routing
            checks |= routing_decision.targets(routing)
        except Exception:
            traceback.print_exc()
            failures.append("routing")

    if args.only in (None, "discovery"):
        print(flush=True)
        try:
            # No target: latencies against the bounds the liveness settings give.
            results["discovery"] = asyncio.run(
                discovery.run(fleets=(10, 100), probes=3, deaths=2) if args.quick
                else discovery.run())
        except Exception:
            traceback.print_exc()
            failures.append("discovery")

    print(f"\nsummary ({'quick' if args.quick else 'full'} run, {args.rounds} round(s), "
          f"{time.monotonic() - started:.0f}s)")
    if checks:
        print(table(["target", "measured", "verdict"],
                    [[name, f"x{value:.2f}", verdict(ok)] for name, (value, ok) in
                     checks.items()]))
    for name in failures:
        print(f"{name}: FAILED (see the traceback above)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if failures:
        return 2
    if args.strict and not all(ok for _, ok in checks.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
