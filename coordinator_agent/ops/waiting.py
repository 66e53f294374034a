"""Why a pending task waits, in words, for the task views of the API, the CLI and the page.

Worked out when a task is read, from the task's and the agents' public views, so the dispatch
loop pays nothing for it. The rules follow dispatch and the sweep: a task goes to a healthy agent
of its kind (if it names one) with every required capability and a free slot; with no such agent
known at all, it fails ``timeout_s`` after it was queued, unless it is cancelled first. A task a
fleet-wide limit keeps back (``limits.py``) says so with dispatch's own reason (``routing.held``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Liveness of agents that will never take work again (until a new hello).
GONE = frozenset({"dead", "left"})


def _can_run(task: Mapping[str, Any], agent: Mapping[str, Any]) -> bool:
    kind = task.get("kind")
    if kind and agent.get("kind") != kind:
        return False
    return set(task.get("required_capabilities") or ()) <= set(agent.get("capabilities") or ())


def _heard(agent: Mapping[str, Any]) -> bool:
    amqp = (agent.get("signals") or {}).get("amqp")
    return not isinstance(amqp, Mapping) or bool(amqp.get("heard", True))


def _wanted(task: Mapping[str, Any]) -> str:
    parts = []
    if task.get("kind"):
        parts.append(f"of kind {task['kind']!r}")
    capabilities = task.get("required_capabilities") or []
    if capabilities:
        parts.append("with " + ", ".join(map(str, capabilities)))
    return " ".join(parts) or "at all"


def why_waiting(
    task: Mapping[str, Any], agents: Sequence[Mapping[str, Any]], now: float
) -> dict[str, Any] | None:
    """``{"reason", "text", ...}`` for a pending task, None for any other."""
    if task.get("status") != "pending" or task.get("workflow"):
        return None
    able = [a for a in agents if _can_run(task, a) and a.get("liveness") not in GONE
            and _heard(a)]
    if not able:
        timeout = float(task.get("timeout_s") or 0)
        gives_up_at = float(task.get("updated_at") or now) + timeout
        left = max(0.0, gives_up_at - now)
        return {
            "reason": "no_matching_agent",
            "text": f"no agent {_wanted(task)} is known: the task waits for one, and fails "
                    f"in {left:.0f}s (its timeout, {timeout:g}s) unless one says hello first "
                    "or the task is cancelled",
            "gives_up_at": round(gives_up_at, 3),
        }
    free = [a for a in able if a.get("liveness") == "healthy" and a.get("state") != "draining"
            and int(a.get("in_flight") or 0) < int(a.get("max_concurrency") or 0)]
    if not free:
        return {
            "reason": "no_free_agent",
            "text": f"{len(able)} agent{'s' if len(able) != 1 else ''} {_wanted(task)} "
                    "known, none free or healthy right now: the task goes to the first that is",
        }
    held = (task.get("routing") or {}).get("held")
    if held:
        # Dispatch's own words (limits.py): a fleet-wide limit keeps it back, not the agents.
        return {"reason": "held", "text": f"held by a fleet-wide limit: {held}; it runs when "
                "the limit allows (a slot or a token frees)"}
    return {"reason": "queued", "text": "an agent that can take it is free: assigned shortly"}
