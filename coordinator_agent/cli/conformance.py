"""``coordinator-agent conformance agent|client``: certify an implementation of the protocol.

Exit codes: 0 every rule passed (or does not apply yet), 1 a rule failed, 2 a usage or
configuration error (the usual for the CLI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring


def add_conformance_command(sub: Any, common: argparse.ArgumentParser) -> None:
    conformance = sub.add_parser(
        "conformance", help="check an agent or a client, in any language, against the protocol")
    targets = conformance.add_subparsers(dest="target", required=True, metavar="TARGET")
    agent = targets.add_parser(
        "agent", parents=[common],
        help="play the coordinator against a running agent (PROTOCOL.md §19.1)")
    client = targets.add_parser(
        "client", parents=[common],
        help="answer a client's submissions as the coordinator would (PROTOCOL.md §19.2)")
    for parser, who in ((agent, "agent id"), (client, "operator principal id")):
        default = os.environ.get("COORDINATOR_CONFORMANCE_ID")
        parser.add_argument("--id", dest="peer", default=default, required=default is None,
                            help=f"the {who} under test [COORDINATOR_CONFORMANCE_ID]")
        parser.add_argument("--wait", type=float,
                            default=float(os.environ.get("COORDINATOR_CONFORMANCE_WAIT", "30")),
                            help="seconds to wait for its first message "
                            "[COORDINATOR_CONFORMANCE_WAIT]")
    agent.add_argument("--kind", default=os.environ.get("COORDINATOR_CONFORMANCE_KIND"),
                       help="the kind its hello must announce [COORDINATOR_CONFORMANCE_KIND]")
    client.add_argument("--tasks", type=int,
                        default=int(os.environ.get("COORDINATOR_CONFORMANCE_TASKS", "1")),
                        help="submissions to wait for and answer [COORDINATOR_CONFORMANCE_TASKS]")


def cmd_conformance(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from coordinator_agent.cli.reach import require_broker
    from coordinator_agent.conformance import AgentConformance, ClientConformance, Harness

    if args.wait <= 0 or (args.target == "client" and args.tasks < 1):
        print("coordinator-agent: --wait must be positive and --tasks at least 1",
              file=sys.stderr)
        return 2
    require_broker(settings.broker_url.get_secret_value())
    keyring = Keyring.load(settings.keyring_path)

    async def run() -> int:
        harness = Harness(settings, keyring, args.peer)
        check: AgentConformance | ClientConformance
        if args.target == "agent":
            check = AgentConformance(harness, args.peer, kind=args.kind, wait_s=args.wait)
        else:
            check = ClientConformance(harness, args.peer, tasks=args.tasks, wait_s=args.wait)
        await harness.start()
        if not args.json:
            print(f"conformance: acting as coordinator {settings.name!r}; start {args.target} "
                  f"{args.peer!r} with the same name now, if it is not running", flush=True)
        try:
            report = await check.run()
        finally:
            await harness.close()
        print(json.dumps(report.as_json()) if args.json else report.as_text())
        return 0 if report.passed else 1

    return asyncio.run(run())
