"""How far behind the coordinator reads its agents' reports, and what it does about it.

An overloaded coordinator must never read its own backlog as its agents' silence. Two signs
say that it is behind:

* the status lane: how old the heartbeats are when they are handled (now - ``sent_at``). A
  low quantile of the recent ones is used, so that a few agents with skewed clocks (whose
  heartbeats look old, or from the future) neither raise nor hide a backlog: when the
  coordinator is behind, *every* heartbeat it reads is late;
* the event loop: how late the sweep wakes up.

While the lag exceeds ``behind_after`` heartbeat intervals, liveness verdicts that come from
silence are paused (``StateManager.silence_floor`` follows the clock, so nobody's silence
grows), and repeat heartbeats from agents heard recently are shed before they are decrypted.
When the lag falls back under half of that, silence counts again from that moment: every agent
gets a whole suspect window to be heard after the backlog, whatever the queue dropped.
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger(__name__)

#: Heartbeats whose age is remembered (receipt order): enough for a quantile, cheap to sort.
WINDOW = 128
#: Observations older than this (receipt time) no longer describe the lane.
STALE_S = 5.0
#: The quantile of the recent ages taken as the lag: robust to a quarter of skewed clocks.
QUANTILE = 0.25
#: While behind, a heartbeat is shed if its agent was heard within this many intervals plus the
#: lag: the further behind, the fewer heartbeats per agent are read, until it catches up.
SHED_WITHIN = 1.0


class Backlog:
    """The lag, the ``behind`` flag with hysteresis, and what was shed while behind."""

    def __init__(self, behind_after_s: float) -> None:
        self.behind_after_s = behind_after_s
        self._ages: deque[tuple[float, float]] = deque(maxlen=WINDOW)  # (received, age)
        self._loop_late_s = 0.0
        self.lag_s = 0.0
        self.behind = False
        #: When the current episode of being behind began (None: not behind).
        self.since: float | None = None
        self.episodes = 0
        self.shed = 0  # heartbeats shed, in all
        self._shed_in_episode = 0

    def observe(self, sent_at: float, now: float) -> None:
        """A heartbeat handled now that its agent stamped at ``sent_at``."""
        age = now - sent_at
        self._ages.append((now, age if age > 0.0 else 0.0))

    def loop_late(self, late_s: float) -> None:
        """How much later than asked the sweep woke up (the loop was busy)."""
        self._loop_late_s = late_s if late_s > 0.0 else 0.0

    def sheddable(self, message_type: str | None, last_seen: float | None, now: float,
                  interval_s: float) -> bool:
        """Shed this message unread? Only while behind, only a heartbeat, only from an agent
        heard within ``SHED_WITHIN`` intervals plus the lag (``last_seen``; None: not a live
        agent). Heartbeats handled ``lag`` late reach each agent's record every ``interval``
        of *their* time, which is longer than ``interval`` of ours: hence the lag.

        The type and sender it is judged by are not authenticated yet; the worst a forged one
        can do is have one heartbeat of a busy coordinator skipped, which it would tolerate
        anyway while silence verdicts are paused. Counted when True.
        """
        if (not self.behind or message_type != "agent.status" or last_seen is None
                or now - last_seen > SHED_WITHIN * interval_s + self.lag_s):
            return False
        self.shed += 1
        self._shed_in_episode += 1
        return True

    def refresh(self, now: float) -> bool:
        """Recompute the lag; returns True when the coordinator is behind now."""
        ages = self._ages
        while ages and now - ages[0][0] > STALE_S:
            ages.popleft()
        lane = 0.0
        if ages:
            ordered = sorted(age for _, age in ages)
            lane = ordered[int(QUANTILE * (len(ordered) - 1))]
        self.lag_s = max(lane, self._loop_late_s)
        if not self.behind and self.lag_s > self.behind_after_s:
            self.behind, self.since = True, now
            self.episodes += 1
            self._shed_in_episode = 0
            log.warning("behind on agents' reports by %.1fs: silence verdicts paused, repeat "
                        "heartbeats shed until caught up", self.lag_s)
        elif self.behind and self.lag_s < self.behind_after_s / 2:
            lasted = now - (self.since if self.since is not None else now)
            self.behind, self.since = False, None
            log.warning("caught up with agents' reports after %.1fs (%d heartbeats shed); "
                        "silence counts again from now", lasted, self._shed_in_episode)
        return self.behind

    def view(self) -> dict[str, object]:
        return {"behind": self.behind, "lag_s": round(self.lag_s, 3),
                "behind_after_s": self.behind_after_s, "episodes": self.episodes,
                "shed": self.shed}
