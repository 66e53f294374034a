"""The ``routing`` and ``route`` commands: what the router has learned, and why it would send
a description where it would.

``route`` works without a running coordinator: it reads the routing configuration and the
learning store from disk. When the coordinator answers, its live view is used instead, and that
also names the agent it would pick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from coordinator_agent.cli.progress import format_table
from coordinator_agent.cli.reach import api_get, monitoring_url
from coordinator_agent.exceptions import CoordinatorError
from coordinator_agent.settings import Settings


def add_routing_commands(
    sub: Any, common: argparse.ArgumentParser, url_option: Callable[[Any], None]
) -> None:
    routing = sub.add_parser("routing", parents=[common],
                             help="routing accuracy, fallback rate, confidence, per-kind success")
    url_option(routing)
    route = sub.add_parser("route", parents=[common],
                           help="explain where a description would be routed (submits nothing)")
    route.add_argument("description")
    route.add_argument("--kind", default=os.environ.get("COORDINATOR_ROUTE_KIND"),
                       help="only this kind, as a task may ask [COORDINATOR_ROUTE_KIND]")
    route.add_argument("--capability", action="append",
                       default=[c.strip() for c in os.environ.get(
                           "COORDINATOR_ROUTE_CAPABILITIES", "").split(",") if c.strip()],
                       help="required capability, repeatable "
                       "[COORDINATOR_ROUTE_CAPABILITIES, comma-separated]")
    route.add_argument("--local", action="store_true",
                       default=os.environ.get("COORDINATOR_ROUTE_LOCAL", "") not in ("", "0"),
                       help="do not ask the coordinator; config and learning store only "
                       "[COORDINATOR_ROUTE_LOCAL=1]")
    url_option(route)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def routing_summary(stats: Mapping[str, Any]) -> str:
    lines = [
        f"decisions {stats.get('decisions', 0)}   first-try success {_pct(stats.get('accuracy'))}"
        f" ({stats.get('first_try_successes', 0)}/{stats.get('first_tries', 0)})   "
        f"fallback rate {_pct(stats.get('fallback_rate'))}   "
        f"average confidence {float(stats.get('average_confidence') or 0):.3f}   "
        f"outcomes stored {stats.get('outcomes_stored', 0)}",
        "",
    ]
    kinds = stats.get("kinds") or {}
    rows = [(kind, _pct(k.get("success_rate")), k.get("outcomes", 0),
             "-" if k.get("mean_duration_s") is None else f"{k['mean_duration_s']:.3f}s")
            for kind, k in sorted(kinds.items())]
    lines.append(format_table(("KIND", "SUCCESS", "OUTCOMES", "MEAN TIME"), rows,
                              right=("SUCCESS", "OUTCOMES", "MEAN TIME"),
                              empty="(nothing learned yet)"))
    return "\n".join(lines)


def route_explanation(explained: Mapping[str, Any]) -> str:
    analysis = explained.get("analysis") or {}
    lines = [
        f"keywords   {', '.join(analysis.get('keywords') or []) or '-'}",
        f"category   {analysis.get('category') or '-'}   complexity "
        f"{analysis.get('complexity') or '-'}   urgency {analysis.get('urgency') or '-'}",
        f"domains    {', '.join(analysis.get('domains') or []) or '-'}",
        "",
    ]
    kinds = explained.get("kinds") or {}
    order = sorted(kinds, key=lambda k: -float(kinds[k].get("confidence") or 0))
    rows = []
    for kind in order:
        parts = kinds[kind].get("parts") or {}
        rows.append((kind, f"{float(kinds[kind].get('confidence') or 0):.3f}",
                     f"{float(parts.get('pattern') or 0):+.3f}",
                     f"{float(parts.get('domain') or 0):.3f}",
                     f"{float(parts.get('complexity') or 0):.3f}",
                     f"{float(parts.get('workload') or 0):.3f}"))
    lines.append(format_table(("KIND", "CONFIDENCE", "PATTERN", "DOMAIN", "COMPLEXITY",
                               "WORKLOAD"), rows,
                              right=("CONFIDENCE", "PATTERN", "DOMAIN", "COMPLEXITY", "WORKLOAD"),
                              empty="(no kind can take it)"))
    chosen = explained.get("kind") or "(none)"
    agent = explained.get("agent")
    via = f" -> agent {agent}" if agent else ""
    fallback = " (fallback kind)" if explained.get("fallback_used") else ""
    lines += ["", f"kind       {chosen}{fallback}{via}",
              f"why        {explained.get('reason') or '-'}",
              f"threshold  {explained.get('threshold')}   source {explained.get('source')}"]
    if explained.get("priority"):  # a live coordinator: scheduling.py and limits.py
        lines.append(f"priority   {explained['priority']}   "
                     f"{'held: ' + explained['held'] if explained.get('held') else 'not held'}")
    return "\n".join(lines)


def cmd_routing(args: argparse.Namespace, settings: Settings) -> int:
    stats = api_get(monitoring_url(args, settings), "/api/routing")
    print(json.dumps(stats) if args.json else routing_summary(stats))
    return 0


def explain_locally(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The decision from the configuration and the learning store on disk (no agents known)."""
    from coordinator_agent.routing.config import load_routing_config
    from coordinator_agent.routing.planner import CoordinationPlanner

    store = settings.routing_store_path
    planner = CoordinationPlanner(
        settings.limits.max_in_flight_per_agent,
        config=load_routing_config(settings.routing_config),
        store_path=store if store.exists() else None,
    )
    try:
        explained = planner.explain(args.description, kind=args.kind,
                                    required_capabilities=args.capability)
    finally:
        planner.close()
    return {**explained, "source": f"local ({store if store.exists() else 'no learning store'})"}


def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    explained: dict[str, Any] | None = None
    if not args.local:
        query = [("description", args.description),
                 *(("capability", c) for c in args.capability)]
        if args.kind:
            query.append(("kind", args.kind))
        try:
            base = monitoring_url(args, settings)
            explained = {**api_get(base, "/api/route?" + urllib.parse.urlencode(query)),
                         "source": "coordinator"}
        except CoordinatorError as exc:
            print(f"note: {exc}; explaining from local configuration instead", file=sys.stderr)
    if explained is None:
        explained = explain_locally(args, settings)
    if args.json:
        print(json.dumps(explained))
    else:
        print(route_explanation(explained))
    return 0
