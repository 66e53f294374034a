"""Why a pending task waits, worked out from the public views alone."""

from __future__ import annotations

from typing import Any

from coordinator_agent.cli.routing import route_explanation
from coordinator_agent.ops.waiting import why_waiting

NOW = 10_000.0


def task(**extra: Any) -> dict[str, Any]:
    view = {"id": "t1", "status": "pending", "kind": "security", "required_capabilities": [],
            "timeout_s": 60.0, "updated_at": NOW - 15, "workflow": None}
    view.update(extra)
    return view


def agent(agent_id: str, **extra: Any) -> dict[str, Any]:
    view = {"id": agent_id, "kind": "security", "capabilities": ["hash"], "liveness": "healthy",
            "state": "ready", "in_flight": 0, "max_concurrency": 2,
            "signals": {"amqp": {"heard": True, "last_seen_s": 0.1}, "consul": None}}
    view.update(extra)
    return view


def test_no_agent_of_the_kind_says_so_and_when_it_gives_up() -> None:
    waiting = why_waiting(task(kind="nosuchkind"), [agent("a1")], NOW)
    assert waiting is not None
    assert waiting["reason"] == "no_matching_agent"
    assert waiting["text"].startswith("no agent of kind 'nosuchkind' is known")
    assert "fails in 45s (its timeout, 60s)" in waiting["text"] and "cancelled" in waiting["text"]
    assert waiting["gives_up_at"] == NOW + 45


def test_capabilities_count_and_dead_or_silent_agents_do_not() -> None:
    needs = task(required_capabilities=["gpu"])
    assert why_waiting(needs, [agent("a1")], NOW)["text"].startswith(  # type: ignore[index]
        "no agent of kind 'security' with gpu is known")
    gone = [agent("a1", liveness="dead"), agent("a2", liveness="left"),
            agent("a3", signals={"amqp": {"heard": False}, "consul": "passing"})]
    assert why_waiting(task(), gone, NOW)["reason"] == "no_matching_agent"  # type: ignore[index]


def test_busy_or_draining_agents_make_it_wait_for_a_slot() -> None:
    busy = [agent("a1", in_flight=2), agent("a2", state="draining"),
            agent("a3", liveness="suspect")]
    waiting = why_waiting(task(), busy, NOW)
    assert waiting is not None and waiting["reason"] == "no_free_agent"
    assert waiting["text"].startswith("3 agents of kind 'security' known, none free")
    assert why_waiting(task(), [agent("a1")], NOW)["reason"] == "queued"  # type: ignore[index]


def test_only_plain_pending_tasks_wait() -> None:
    assert why_waiting(task(status="running"), [], NOW) is None
    assert why_waiting(task(workflow={"mode": "fan_out"}), [], NOW) is None


def test_route_says_no_matching_agent_in_words() -> None:
    text = route_explanation({"analysis": {}, "kinds": {}, "kind": None, "agent": None,
                              "reason": "no_matching_agent", "threshold": 0.6,
                              "source": "coordinator"})
    why = next(line for line in text.splitlines() if line.startswith("why"))
    assert "no_matching_agent" not in why
    assert "no known agent can take it" in why and "wait" in why


def test_the_cli_tasks_table_shows_why_a_task_waits() -> None:
    from coordinator_agent.cli.progress import tasks_table

    table = tasks_table([{"id": "t1", "status": "pending", "routing": {}, "attempts": [],
                          "updated_at": NOW, "description": "Scan",
                          "waiting": {"reason": "no_matching_agent", "text": "..."}}], now=NOW)
    assert "waiting: no_matching_agent" in table.splitlines()[1]


def test_a_task_held_by_a_fleet_limit_says_so_in_dispatch_s_words() -> None:
    held = task(routing={"held": "security at its limit of 20 running"})
    waiting = why_waiting(held, [agent("a1")], NOW)
    assert waiting is not None
    assert waiting["reason"] == "held"
    assert "security at its limit of 20 running" in waiting["text"]
    # No free agent is the stronger reason: the limit is not what keeps it back then.
    busy = [agent("a1", in_flight=2)]
    assert why_waiting(held, busy, NOW)["reason"] == "no_free_agent"  # type: ignore[index]
    assert why_waiting(task(routing={}), [agent("a1")], NOW)["reason"] == "queued"  # type: ignore[index]
