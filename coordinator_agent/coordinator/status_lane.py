"""The status lane's fast path: agents' heartbeats and metrics reports, a loop turn's worth at once.

At 10,000 agents heartbeating every 10 s the status lane carries 1,000 messages a second, each
a small, self-contained report. They are read in batches (``wire/batches.py``): opened and
authorized one by one as on any lane (a bad one is still refused with its reason, counted and
dead-lettered), then applied here in one synchronous pass, and acked with one frame.

Unlike the tasks lane, nothing here waits for the store or the replicated log before the ack:
a heartbeat or a metrics report changes only the agent's in-memory record (soft state that
the next heartbeat restates, see DESIGN.md), never a task. ``task.progress``, which the status
lane also carries, touches tasks and goes the ordinary way, message by message.
"""

from __future__ import annotations

from collections.abc import Callable

from coordinator_agent.exceptions import NotLeading
from coordinator_agent.wire import protocol
from coordinator_agent.wire.delivery import Delivery

#: The message types applied in batches.
BATCHED_TYPES = frozenset({"agent.status", "agent.metrics"})


class StatusLane:
    def __init__(self, leading: Callable[[], bool],
                 apply: Callable[[protocol.Envelope, Delivery], object]) -> None:
        self._leading = leading
        self._apply = apply

    def handle(self, batch: list[tuple[protocol.Envelope, Delivery]]) -> list[Exception | None]:
        """Apply each report; for each, None or what applying it raised (batches.py)."""
        if not self._leading():
            raise NotLeading()  # every message back to the queue, for the leader
        apply = self._apply
        outcomes: list[Exception | None] = []
        for envelope, message in batch:
            try:
                apply(envelope, message)
            except Exception as exc:  # one bad report must not cost the others theirs
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes
