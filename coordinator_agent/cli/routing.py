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
from typing import TYPE_CHECKING, Any

from coordinator_agent.cli.progress import format_table
from coordinator_agent.cli.reach import api_get, monitoring_url
from coordinator_agent.exceptions import CoordinatorError, UsageError
from coordinator_agent.settings import Settings

if TYPE_CHECKING:
    from coordinator_agent.routing.config import RoutingConfig
    from coordinator_agent.routing.text_prior import TextPrior


#: The reasons a description has no agent, in words; ``route`` exits 1 for the first.
NO_AGENT = {
    "no_matching_agent": "no known agent can take it (none of that kind, or none with every "
                         "required capability): a task like this would wait for one until its "
                         "timeout, then fail",
    "no_free_agent": "no agent that could take it is both healthy and free right now (busy, "
                     "draining, or not heard lately: `coordinator-agent agents` shows which): a "
                     "task like this would wait for one",
}


def add_routing_commands(
    sub: Any, common: argparse.ArgumentParser, url_option: Callable[[Any], None]
) -> None:
    routing = sub.add_parser("routing", parents=[common],
                             help="routing accuracy, fallback rate, confidence, per-kind success;"
                             " 'routing replay' evaluates another policy on the decision log")
    url_option(routing)
    actions = routing.add_subparsers(dest="routing_action")
    replay = actions.add_parser(
        "replay", help="estimate from the decision log how another routing configuration "
        "(policy, threshold...) would have done: inverse-propensity and doubly robust")
    replay.add_argument("--config", dest="replay_config",
                        default=os.environ.get("COORDINATOR_REPLAY_CONFIG"),
                        help="the other routing configuration (YAML); default: the packaged "
                        "one [COORDINATOR_REPLAY_CONFIG]")
    replay.add_argument("--store", dest="replay_store",
                        default=os.environ.get("COORDINATOR_REPLAY_STORE"),
                        help="learning store with the decision log; default: this coordinator's"
                        " [COORDINATOR_REPLAY_STORE]")
    replay.add_argument("--seed", dest="replay_seed", type=int,
                        default=int(os.environ.get("COORDINATOR_REPLAY_SEED", "0")),
                        help="seed of the bootstrap resampling: moves only the bootstrap "
                        "intervals, never the estimates [COORDINATOR_REPLAY_SEED]")
    replay.add_argument("--json", dest="replay_json", action="store_true",
                        default=os.environ.get("COORDINATOR_JSON", "") not in ("", "0"),
                        help="JSON output [COORDINATOR_JSON=1]")
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
    route.add_argument("--label", action="append",
                       default=[c.strip() for c in os.environ.get(
                           "COORDINATOR_ROUTE_LABELS", "").split(",") if c.strip()],
                       help="a label the task would carry (its type, its component), "
                       "repeatable [COORDINATOR_ROUTE_LABELS, comma-separated]")
    route.add_argument("--local", action="store_true",
                       default=os.environ.get("COORDINATOR_ROUTE_LOCAL", "") not in ("", "0"),
                       help="do not ask the coordinator; config and learning store only "
                       "[COORDINATOR_ROUTE_LOCAL=1]")
    url_option(route)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _count(value: Any) -> str:
    """A (decayed) count for display: one decimal, or a whole number when it rounds to one."""
    tenths = round(float(value or 0) * 10)
    return str(tenths // 10) if tenths % 10 == 0 else f"{tenths / 10:.1f}"


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
    confidence = stats.get("average_confidence_by_kind") or {}
    rows = [(kind, _pct(k.get("success_rate")), _count(k.get("outcomes")),
             "-" if k.get("mean_duration_s") is None else f"{k['mean_duration_s']:.3f}s",
             "-" if kind not in confidence else f"{float(confidence[kind]):.3f}")
            for kind, k in sorted(kinds.items())]
    lines.append(format_table(("KIND", "SUCCESS", "OUTCOMES", "MEAN TIME", "CONFIDENCE"), rows,
                              right=("SUCCESS", "OUTCOMES", "MEAN TIME", "CONFIDENCE"),
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
    if explained.get("policy") == "bandit":
        lines.append(_bandit_table(kinds, order))
    else:
        lines.append(_seed_table(kinds, order))
    contexts = explained.get("contexts") or {}
    if contexts.get("names"):
        cluster = contexts.get("cluster")
        fine = ("no cluster yet: the coarse contexts decide" if cluster is None else
                f"cluster {cluster} ({float(contexts.get('cluster_tasks') or 0):.0f} tasks)")
        lines += ["", f"contexts   {'  '.join(contexts['names'])}   ({fine})"]
    prior = (explained.get("text_prior") or {}).get("probabilities") or {}
    if prior:
        lines += ["", "text prior " + "   ".join(
            f"{kind} {float(p):.3f}" for kind, p in list(prior.items())[:4])]
    workflow = explained.get("workflow")
    if workflow:
        steps = " -> ".join(f"{s.get('kind')} ({s.get('description')!r})" for s in workflow)
        lines += ["", f"workflow   {steps}", *_runs_as(explained, len(workflow))]
    chosen = explained.get("kind") or "(none)"
    agent = explained.get("agent")
    via = f" -> agent {agent}" if agent else ""
    fallback = " (fallback kind)" if explained.get("fallback_used") else ""
    reason = explained.get("reason") or "-"
    whole = " (the description whole: see runs as)" if explained.get(
        "runs_as") == "workflow" else ""
    lines += ["", f"kind       {chosen}{fallback}{via}{whole}",
              f"why        {NO_AGENT.get(reason, reason)}",
              f"policy     {explained.get('policy') or 'seed'}   threshold "
              f"{explained.get('threshold')}   source {explained.get('source')}"]
    if explained.get("priority"):  # a live coordinator: scheduling.py and limits.py
        lines.append(f"priority   {explained['priority']}   "
                     f"{'held: ' + explained['held'] if explained.get('held') else 'not held'}")
    lines += [f"note       {note}" for note in explained.get("notes") or []]
    return "\n".join(lines)


def _runs_as(explained: Mapping[str, Any], steps: int) -> list[str]:
    """What a task with this description runs as: the steps, or one task of ``kind``."""
    missing = explained.get("workflow_missing_kinds")
    if missing:
        return [f"runs as    task: no live agent of kind {', '.join(missing)}, so a task with "
                "this description is not split;",
                "           it runs whole, as the kind below"]
    lines = [f"runs as    workflow: a task with this description runs as these {steps} steps, "
             "in order, each",
             "           on its step's kind. The kind below is what the description gets "
             "whole, which is",
             "           what runs only with splitting off (phases: {enabled: false})"]
    if not str(explained.get("source", "")).startswith("coordinator"):
        lines += ["           not checked here: the coordinator splits it only when a live agent "
                  "runs every",
                  "           step's kind; otherwise it runs whole, as the kind below"]
    return lines


def _bandit_table(kinds: Mapping[str, Any], order: list[str]) -> str:
    rows = []
    for kind in order:
        p = kinds[kind].get("parts") or {}
        chance = p.get("chance")
        rows.append((kind, f"{float(p.get('prior') or 0):.3f}",
                     f"{float(p.get('prior_success') or 0):.3f}",
                     f"{float(p.get('successes') or 0):.1f}/{float(p.get('failures') or 0):.1f}",
                     # Similar recent tasks on this kind (neighbours.py): their summed
                     # similarity, and the log-odds shift their residuals add.
                     f"{float(p.get('neighbours') or 0):.1f}: {float(p.get('local') or 0):+.2f}",
                     # Its recent first tries on a feature of the task fell far short.
                     f"{float(p.get('shortfall') or 0):+.2f}",
                     f"+-{float(p.get('exploration') or 0):.3f}",
                     "-" if chance is None else f"{float(chance):.3f}",
                     f"{float(p.get('probability') or 0):.3f}"))
    return format_table(("KIND", "PRIOR P(KIND|TEXT)", "PRIOR SUCCESS", "EVIDENCE S/F",
                         "SIMILAR: SHIFT", "SHORTFALL", "EXPLORATION", "CHANCE", "PROBABILITY"),
                        rows,
                        right=("PRIOR P(KIND|TEXT)", "PRIOR SUCCESS", "EVIDENCE S/F",
                               "SIMILAR: SHIFT", "SHORTFALL", "EXPLORATION", "CHANCE",
                               "PROBABILITY"),
                        empty="(no kind can take it)")


def _seed_table(kinds: Mapping[str, Any], order: list[str]) -> str:
    rows = []
    for kind in order:
        parts = kinds[kind].get("parts") or {}
        rows.append((kind, f"{float(kinds[kind].get('confidence') or 0):.3f}",
                     f"{float(parts.get('pattern') or 0):+.3f}",
                     f"{float(parts.get('domain') or 0):.3f}",
                     f"{float(parts.get('complexity') or 0):.3f}",
                     f"{float(parts.get('workload') or 0):.3f}"))
    return format_table(("KIND", "CONFIDENCE", "PATTERN", "DOMAIN", "COMPLEXITY", "WORKLOAD"),
                        rows, right=("CONFIDENCE", "PATTERN", "DOMAIN", "COMPLEXITY", "WORKLOAD"),
                        empty="(no kind can take it)")


def replay_summary(result: Mapping[str, Any]) -> str:
    """The replay for a person: every rate within [0, 100 %] (clipped ones marked), the
    configuration evaluated, and a warning when the effective sample size is too small."""
    target = (f"target {result.get('target_config') or '(packaged configuration)'}   policy "
              f"{result.get('target_policy', '-')}")
    if not result.get("decisions"):
        return f"{target}\ndecisions 0: {result.get('note', 'nothing to replay')}"
    clipped = False

    def pct(x: float) -> str:  # replay() clips every rate to [0, 1]
        return f"{100 * float(x):5.1f}%"

    def line(name: str, key: str) -> str:
        nonlocal clipped
        r = result.get(key)
        if r is None:
            return f"{name:<20}     -    (the target never takes a logged choice)"
        mark = "*" if r.get("clipped") else " "
        clipped = clipped or bool(r.get("clipped"))
        low, high = r["ci95"]
        b_low, b_high = r["bootstrap95"]
        return (f"{name:<20}{pct(r['estimate'])}{mark}  95% CI {pct(low)} .. {pct(high)}   "
                f"bootstrap {pct(b_low)} .. {pct(b_high)}")

    n = result["decisions"]
    ess = float(result["effective_sample_size"])
    lines = [
        target,
        f"log {result.get('store', '-')}: {n} decisions (first attempts chosen by the logged "
        f"policy {', '.join(result['logged_policy'])}, outcome known)",
        f"agreement with the log {100 * result['agreement']:.1f}%   effective sample size "
        f"{ess:.0f} of {n}",
        f"first-try success (bootstrap seed {result.get('bootstrap_seed', 0)}):",
        line("  logged", "logged"),
        line("  target, IPS", "ips"),
        line("  target, SNIPS", "self_normalised_ips"),
        line("  target, DR", "doubly_robust"),
    ]
    if clipped:
        lines.append("  * clipped to [0, 100%]: the unbiased mean of its terms lies outside "
                     "(`unclipped_estimate` in --json)")
    if result.get("fragile"):
        lines.append(f"warning: effective sample size {ess:.0f} of {n} is too small to trust "
                     "these estimates (under 100, or under a tenth of the log): the target "
                     "seldom makes the logged choices; log more tasks, or log with more "
                     "exploration")
    return "\n".join(lines)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from coordinator_agent.routing.config import load_routing_config
    from coordinator_agent.routing.replay import replay

    target = load_routing_config(args.replay_config)
    store = args.replay_store or settings.routing_store_path
    result = {"target_config": str(args.replay_config) if args.replay_config else None,
              "store": str(store), **replay(store, target, seed=args.replay_seed)}
    print(json.dumps(result) if args.json or args.replay_json else replay_summary(result))
    return 0


def cmd_routing(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "routing_action", None) == "replay":
        return cmd_replay(args, settings)
    stats = api_get(monitoring_url(args, settings), "/api/routing")
    print(json.dumps(stats) if args.json else routing_summary(stats))
    return 0


def explain_locally(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The decision from the configuration and the learning store on disk (no agents known)."""
    from coordinator_agent.routing.config import Policy, load_routing_config
    from coordinator_agent.routing.planner import CoordinationPlanner
    from coordinator_agent.routing.text_prior import TextPrior

    store = settings.routing_store_path
    config = load_routing_config(settings.routing_config)
    planner = CoordinationPlanner(
        settings.limits.max_in_flight_per_agent,
        config=config,
        store_path=store if store.exists() else None,
    )
    try:
        explained = planner.explain(args.description, kind=args.kind,
                                    required_capabilities=args.capability, labels=args.label)
    finally:
        planner.close()
    if args.kind is None and config.policy is Policy.BANDIT:
        # The bandit starts from the text prior; the seed formula never reads it, so under
        # `policy: seed` the formula's own choice stands, learned or not.
        explained = cold_start(explained, TextPrior(config), args.description)
    return {**explained, **_unchecked(args, config),
            "source": f"local ({store if store.exists() else 'no learning store'})"}


def _unchecked(args: argparse.Namespace, config: RoutingConfig) -> dict[str, Any]:
    """What a local answer takes on trust: the agents it would check are the coordinator's."""
    notes: list[str] = []
    extra: dict[str, Any] = {}
    if args.kind is not None:
        listed = list(dict.fromkeys([*config.kinds, config.fallback_kind]))
        extra["kind_configured"] = args.kind in listed
        if args.kind not in listed:
            # Not an error: agents may announce kinds the configuration does not list, and a
            # task may ask for one (the coordinator then routes to it without a domain bonus).
            notes.append(f"kind {args.kind!r} is not in the routing configuration ("
                         f"{', '.join(listed)}): taken as given; a task asking for it runs "
                         "only if an agent announces that kind")
    if args.capability:
        extra["capabilities_checked"] = False
        notes.append(f"capabilities ({', '.join(args.capability)}) cannot be checked without a "
                     "coordinator: it knows which agents have them")
    if notes:
        extra["notes"] = notes
    return extra


def _evidence(parts: Mapping[str, Any]) -> float:
    """Learned outcomes behind a kind's score, under either policy."""
    return float(parts.get("evidence") or 0) + float(parts.get("successes") or 0) + float(
        parts.get("failures") or 0)


def cold_start(explained: dict[str, Any], prior: TextPrior, description: str) -> dict[str, Any]:
    """With nothing learned for any kind, the text prior decides the kind (``TextPrior``)."""
    kinds = explained.get("kinds") or {}
    if any(_evidence(k.get("parts") or {}) > 0 for k in kinds.values()):
        return explained
    probabilities = prior.probabilities(description)
    chosen = prior.best(description)
    ranked = sorted(probabilities, key=lambda k: -probabilities[k])
    return {
        **explained,
        "kind": chosen,
        "fallback_used": chosen == prior.fallback,
        "reason": f"cold start: nothing learned yet, the text prior gives {chosen!r} "
                  f"{probabilities[chosen]:.2f}",
        "alternatives": [k for k in ranked if k != chosen],
        "text_prior": {"probabilities": {k: round(probabilities[k], 4) for k in ranked},
                       "matched": prior.matched(description)},
    }


def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    from coordinator_agent.wire.protocol import MAX_DESCRIPTION_CHARS, task_labels

    # The coordinator's /api/route takes what a task may carry, and so does --local: the
    # answer never depends on whether a coordinator happens to be listening.
    length = len(args.description.strip())
    if not 1 <= length <= MAX_DESCRIPTION_CHARS:
        raise UsageError(f"a description is 1 to {MAX_DESCRIPTION_CHARS} characters (not "
                         f"counting surrounding blanks), as a task's is; this one has {length}")
    try:
        args.label = task_labels(args.label)
    except ValueError as exc:
        raise UsageError(f"--label: {exc}") from None
    explained: dict[str, Any] | None = None
    if not args.local:
        query = [("description", args.description),
                 *(("capability", c) for c in args.capability),
                 *(("label", x) for x in args.label)]
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
    # A coordinator older than the field: the same rule (``CoordinatorService.explain_route``).
    explained.setdefault("runs_as", "workflow" if explained.get("workflow") and not explained.get(
        "workflow_missing_kinds") else "task")
    words = NO_AGENT.get(str(explained.get("reason")))
    if words is not None:
        explained["explanation"] = words
    if args.json:
        print(json.dumps(explained))
    else:
        print(route_explanation(explained))
    # A script asking "would this run?" gets no for a description that no agent can take.
    return 1 if explained.get("reason") == "no_matching_agent" else 0
