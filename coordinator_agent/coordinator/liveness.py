"""Agent liveness from two signals: AMQP heartbeats (fast) and the registry's health (coarse).

    registered ──hello──> healthy <──recover_after on-time beats── suspect ──> dead
                            │  ^                                     ^
                            │  └───────────── (new hello) ───────────┼──── dead / left
                            └── draining (the agent said so, or its check is "warning")

Rules, first match wins (``judge``):

1. never heard on AMQP                                   -> registered  (listed, never assigned)
2. silent on AMQP for dead_after heartbeats              -> dead        (tasks reassigned)
3. critical in the registry *and* silent for suspect_after -> dead     (both signals agree)
4. reported draining, or the registry check is "warning" -> draining    (no new work)
5. critical in the registry, or silent for suspect_after -> suspect     (no new work)
6. was suspect and fewer than recover_after on-time beats since -> suspect (hysteresis)
7.                                                       -> healthy

The registry alone never kills an agent that still heartbeats (rule 5: its tasks may well
finish), and a registry that cannot be reached is no signal at all (``registry=None``): the
coordinator then runs on heartbeats alone. An agent *missing* from the registry is shown as
``absent`` but is not suspected: a restarted registry forgets everyone at once (until agents
register again), and agents written without the SDK may not register at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from coordinator_agent.settings import Liveness


class AgentLiveness(enum.StrEnum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"  # one signal says it may be gone: no new work, tasks kept
    DEAD = "dead"  # gone: in-flight tasks are reassigned
    DRAINING = "draining"  # stopping gracefully: no new work, tasks finish
    LEFT = "left"  # said goodbye
    REGISTERED = "registered"  # in the registry, never heard on AMQP: listed, never assigned

    @property
    def gone(self) -> bool:
        return self in (AgentLiveness.DEAD, AgentLiveness.LEFT)


class RegistryHealth(enum.StrEnum):
    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    ABSENT = "absent"  # was in the registry, is no longer (deregistered, reaped or forgotten)


@dataclass(frozen=True)
class Verdict:
    liveness: AgentLiveness
    #: Why, in a word: shown in the agents view and logs.
    reason: str

    @property
    def suspicion(self) -> bool:
        """A cause for suspicion is present now (as opposed to waiting out the hysteresis)."""
        return self.reason in ("silent", "registry_critical")


def judge(
    current: AgentLiveness,
    *,
    heard: bool,
    silent_s: float,
    registry: RegistryHealth | None,
    reported_draining: bool,
    beats_since_suspect: int,
    config: Liveness,
) -> Verdict:
    """The liveness an agent should have now. Callers keep dead and left agents as they are."""
    interval = config.heartbeat_interval_s
    silent = silent_s >= interval * config.suspect_after
    registry_bad = registry is RegistryHealth.CRITICAL
    if not heard:
        return Verdict(AgentLiveness.REGISTERED, "not_heard")
    if silent_s >= interval * config.dead_after:
        return Verdict(AgentLiveness.DEAD, "silent")
    if registry_bad and silent:
        return Verdict(AgentLiveness.DEAD, "silent_and_critical")
    if reported_draining or registry is RegistryHealth.WARNING:
        return Verdict(AgentLiveness.DRAINING, "draining")
    if registry_bad:
        return Verdict(AgentLiveness.SUSPECT, "registry_critical")
    if silent:
        return Verdict(AgentLiveness.SUSPECT, "silent")
    if current is AgentLiveness.SUSPECT and beats_since_suspect < config.recover_after:
        return Verdict(AgentLiveness.SUSPECT, "recovering")
    return Verdict(AgentLiveness.HEALTHY, "ok")
