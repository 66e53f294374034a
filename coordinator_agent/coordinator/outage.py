"""Broker outages: when the broker is the problem, time stops for agents and attempts.

An outage is either of:

- the broker stops confirming publishes (``MessageHandler.confirming``; a hung broker keeps its
  TCP connection open, so the connection alone says nothing) or the connection is down;
- every agent falls silent at once (at least two of them): one agent dying is an agent, all of
  them at the same moment is the path to them.

While it lasts, no agent is judged (none is declared dead) and no attempt times out; readiness
and ``coordinator_broker_connected`` are false. When it ends, every agent's last sign of life
and every running attempt's deadline move forward by the outage's length, so the outage costs
no task a retry. Silence from everyone while the broker itself works is believed only for
``collective_silence_max_s``: after that the agents are taken to be really gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.exceptions import StoreError
from coordinator_agent.settings import Liveness

log = logging.getLogger(__name__)


class OutageClock:
    def __init__(self, state: StateManager, broker_working: Callable[[], bool],
                 liveness: Liveness) -> None:
        self.state = state
        self.broker_working = broker_working
        interval = liveness.heartbeat_interval_s
        self.silence_s = interval * liveness.suspect_after
        self.collective_silence_max_s = max(30.0, 3 * interval * liveness.dead_after)
        #: When the current outage began (wall clock), or None.
        self.since: float | None = None
        self.cause = ""
        self.outages = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def check(self, now: float) -> bool:
        """Start or end an outage; True while one lasts (the sweep then judges nothing)."""
        if not self.broker_working():
            cause = "broker not confirming"
        elif self.collective_silence(now):
            cause = "every agent silent at once"
        else:
            cause = ""
        if cause and self.since is None:
            self.since, self.cause = now, cause
            self.outages += 1
            log.warning("broker outage: %s; liveness and deadlines are paused", cause)
        elif not cause and self.since is not None:
            self._resume(now)
        return self.since is not None

    def collective_silence(self, now: float) -> bool:
        if now - self.state.last_heard_at < self.silence_s:
            return False  # someone spoke lately: no need to look at 10,000 agents
        agents = [a for a in self.state.agents.values() if a.heard and not a.liveness.gone]
        if len(agents) < 2:
            return False
        latest = max(a.last_seen for a in agents)
        silent_for = now - latest
        if silent_for < self.silence_s:
            return False
        # The broker works and everyone has been quiet for long: they are really gone.
        return silent_for < self.collective_silence_max_s

    def _resume(self, now: float) -> None:
        assert self.since is not None
        shift = now - self.since
        cause, self.since, self.cause = self.cause, None, ""
        heard = [a.last_seen for a in self.state.agents.values()
                 if a.heard and not a.liveness.gone]
        if (cause == "every agent silent at once" and heard
                and now - max(heard) >= self.collective_silence_max_s):
            log.warning("every agent silent for %.0fs while the broker works: judged as gone",
                        now - max(heard))
            return  # not an outage after all: the agents are gone, judge them now
        log.warning("broker outage over after %.1fs (%s); deadlines moved by as much",
                    shift, cause)
        for agent in self.state.agents.values():
            if not agent.liveness.gone:
                agent.last_seen = min(now, agent.last_seen + shift)
        for task in list(self.state.tasks.values()):
            attempt = task.current_attempt
            if attempt is not None:
                attempt.deadline += shift
                try:
                    self.state.save(task)
                except StoreError:
                    # Rolled back to the stored copy: move its deadline too (memory only; a
                    # deadline is never announced, and the next save of the task keeps it).
                    stored = self.state.tasks.get(task.id)
                    current = stored.current_attempt if stored is not None else None
                    if current is not None:
                        current.deadline += shift
