"""Read-ahead: how far the coordinator takes in one principal's submissions ahead of its agents.

A principal with ``read_ahead`` tasks or more pending has work queued for as long as its intake
pauses; taking in more of it only spends the coordinator's time (decrypt, store, answer) ahead of
everybody else's submissions and results, and on a busy coordinator that time is what the others
wait for. So while another principal has tasks pending or running, intake holds that principal:
its submission lane's deliveries wait before they are handled (the lane's prefetch then stops the
broker: nothing more is read), and its HTTP submissions wait before they are admitted. Alone, no
principal is ever held; a held one is taken in again as soon as its backlog falls under the
read-ahead or the others are done, so its share of agents never runs dry (its backlog still
holds ``read_ahead`` tasks) and a flood alone runs at full capacity.

Submissions that are held are not refused and not lost: they wait, unacked, in the broker (or in
the HTTP request); admission control (``max_backlog``) still answers the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from coordinator_agent.coordinator.scheduling import SchedulingQueue

#: How often a held intake looks again.
POLL_S = 0.05
#: The tasks in flight per principal are counted at most this often (a pass over the agents).
RUNNING_TTL_S = 0.05


class ReadAhead:
    def __init__(self, limit: int | None, pending: SchedulingQueue,
                 running: Callable[[], Mapping[str, int]],
                 on_hold: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.pending = pending
        self._count_running = running
        self._running: Mapping[str, int] = {}
        self._running_at = float("-inf")
        self.on_hold = on_hold
        #: Principals held right now (for the status view).
        self.holding: dict[str, int] = {}

    def holds(self, principal: str) -> bool:
        """Hold this principal's intake now? Only past its read-ahead, only if others wait."""
        if self.limit is None or self.pending.backlog(principal) < self.limit:
            return False
        if any(p != principal for p in self.pending.principals()):
            return True
        return any(n and p != principal for p, n in self.running().items())

    def running(self) -> Mapping[str, int]:
        now = time.monotonic()
        if now - self._running_at > RUNNING_TTL_S:
            self._running, self._running_at = self._count_running(), now
        return self._running

    async def turn(self, principal: str, max_wait_s: float | None = None) -> None:
        """Return when this principal's next submission may be taken in (at once if not held);
        after ``max_wait_s`` in any case."""
        if not self.holds(principal):
            return
        if self.on_hold is not None:
            self.on_hold(principal)
        self.holding[principal] = self.holding.get(principal, 0) + 1
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        try:
            while self.holds(principal):
                if deadline is not None and time.monotonic() >= deadline:
                    return
                await asyncio.sleep(POLL_S)
        finally:
            left = self.holding[principal] - 1
            if left:
                self.holding[principal] = left
            else:
                del self.holding[principal]
