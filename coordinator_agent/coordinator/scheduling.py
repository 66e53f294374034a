"""The queue discipline: who goes next among the pending tasks.

Two rules, in this order:

1. **Fair share between principals.** The next free slot goes to the submitting principal
   whose running tasks, divided by its weight, are fewest. A principal alone is served at full
   capacity; a principal that submits a little next to a flood waits for one slot, not for the
   flood. Weights come from ``scheduling.weights``.
2. **Priority with bounded aging inside a principal's queue.** Each task has a band from 0
   (lowest) to 9; ``low`` is 2, ``medium`` 5 and ``high`` 8. A waiting task gains one band per
   ``aging_s`` seconds, at most ``max_aging_bands`` bands, so with the default (9 bands) a task
   of any band overtakes newly arrived work of every band after ``9 * aging_s`` seconds: nothing
   starves, and nothing gains more than the bound. Ties go to the task that waited longer.

Between its submissions a principal has nothing pending, and a flood would take every slot
that frees: its next task would wait for a slot to end, up to a whole task's duration. So a
principal that submitted within ``reserve_s`` keeps its share free: while such a principal has
nothing pending, every other principal is served only up to its own share of the fleet
(``Dispatcher``). A principal alone, or after ``reserve_s`` of quiet, has the whole fleet.

Age counts from the moment a task (re)joined the queue, so a retry waits its turn anew.
The structures are small: one insertion-ordered dict per (principal, band, named kind); a pass
merges the lane heads of each principal, so picking the next task never scans the whole
backlog, and tasks that name a kind with no free agent are skipped lane by lane.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

PRIORITY_NAMES: dict[str, int] = {"low": 2, "medium": 5, "high": 8}
#: Analysis urgency (routing/analysis.py) -> band, used when a submission names no priority.
URGENCY_PRIORITY: dict[str, int] = {"critical": 9, "high": 8, "normal": 5, "low": 2}
DEFAULT_PRIORITY = PRIORITY_NAMES["medium"]
#: A principal's queue is split into lanes: (band, the kind the tasks name or "" if routed).
Lane = tuple[int, str]
MIN_PRIORITY, MAX_PRIORITY = 0, 9


def priority_band(value: str | int | None, default: int = DEFAULT_PRIORITY) -> int:
    """``high``/``medium``/``low`` or an integer band 0-9 -> the band."""
    if value is None:
        return default
    if isinstance(value, int):
        if not MIN_PRIORITY <= value <= MAX_PRIORITY:
            raise ValueError(f"priority band must be {MIN_PRIORITY}-{MAX_PRIORITY}, not {value}")
        return value
    if value in PRIORITY_NAMES:
        return PRIORITY_NAMES[value]
    raise ValueError(f"priority must be one of {', '.join(PRIORITY_NAMES)} or a band 0-9")


def priority_name(band: int) -> str:
    """The band as shown to people: its name when it has one, else the number."""
    for name, value in PRIORITY_NAMES.items():
        if value == band:
            return name
    return str(band)


@dataclass
class _Principal:
    weight: float
    #: (band, kind) -> task id -> the time it joined the queue (insertion order is age order).
    #: ``kind`` is the kind a task names, "" for a routed one: a pass can skip, in one step,
    #: every task that names a kind with no free agent.
    lanes: dict[Lane, dict[str, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(b) for b in self.lanes.values())


class SchedulingQueue:
    """Pending task ids, served by fair share, then priority with aging, then age."""

    def __init__(self, *, aging_s: float = 10.0, max_aging_bands: int = 9,
                 weights: Mapping[str, float] | None = None, default_weight: float = 1.0,
                 reserve_s: float = 0.0) -> None:
        self.aging_s = aging_s
        self.reserve_s = reserve_s
        #: Principal -> when a task of theirs last joined the queue (``sharing``).
        self._last_added: dict[str, float] = {}
        self.max_aging_bands = max_aging_bands
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self._principals: dict[str, _Principal] = {}
        #: task id -> (principal, lane), for O(1) removal.
        self._where: dict[str, tuple[str, Lane]] = {}
        #: While a pass iterates the band dicts, changes wait here (a dict must not change size
        #: under its iterator) and are applied, in order, when the pass closes.
        self._deferred: list[tuple[bool, str, str, Lane, float]] | None = None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._where

    def __bool__(self) -> bool:
        return bool(self._where)

    def add(self, task_id: str, principal: str, band: int, now: float,
            kind: str | None = None) -> None:
        if task_id in self._where:
            return  # keeps its place and its age
        lane = (band, kind or "")
        self._where[task_id] = (principal, lane)
        self._last_added[principal] = now
        if self._deferred is not None:
            self._deferred.append((True, task_id, principal, lane, now))
            return
        self._insert(task_id, principal, lane, now)

    def _insert(self, task_id: str, principal: str, lane: Lane, now: float) -> None:
        queue = self._principals.get(principal)
        if queue is None:
            queue = self._principals[principal] = _Principal(self.weight(principal))
        queue.lanes.setdefault(lane, {})[task_id] = now

    def discard(self, task_id: str) -> None:
        where = self._where.pop(task_id, None)
        if where is None:
            return
        if self._deferred is not None:
            self._deferred.append((False, task_id, where[0], where[1], 0.0))
            return
        self._remove(task_id, *where)

    def _remove(self, task_id: str, principal: str, lane: Lane) -> None:
        queue = self._principals[principal]
        tasks = queue.lanes[lane]
        del tasks[task_id]
        if not tasks:
            del queue.lanes[lane]
            if not queue.lanes:
                del self._principals[principal]

    def clear(self) -> None:
        """Forget every pending id (a new HA term queues again from the store)."""
        self._principals.clear()
        self._where.clear()
        self._last_added.clear()

    def compact(self) -> None:
        """Right-sized copies of the dicts that grew with a flood (memory.py); order is kept."""
        if self._deferred is not None:
            return  # never under a pass's iterators
        self._where = dict(self._where)
        for queue in self._principals.values():
            queue.lanes = {lane: dict(tasks) for lane, tasks in queue.lanes.items()}
        self._principals = dict(self._principals)

    def weight(self, principal: str) -> float:
        return self.weights.get(principal, self.default_weight)

    def principals(self) -> Collection[str]:
        """The principals with tasks pending."""
        return self._principals.keys()

    def keeping_room(self, now: float) -> dict[str, float]:
        """The weights of every principal sharing the fleet: tasks pending, or one added within
        ``reserve_s``; empty unless one of them has nothing pending (its room to keep free)."""
        if self.reserve_s <= 0:
            return {}
        added = self._last_added
        for principal in [p for p, t in added.items() if now - t > self.reserve_s]:
            del added[principal]
        if all(p in self._principals for p in added):
            return {}
        return {p: self.weight(p) for p in {*added, *self._principals}}

    def backlog(self, principal: str) -> int:
        queue = self._principals.get(principal)
        return len(queue) if queue is not None else 0

    def effective_priority(self, band: int, since: float, now: float) -> float:
        if self.aging_s <= 0:
            return float(band)
        return band + min(self.max_aging_bands, max(0.0, now - since) / self.aging_s)

    def position(self, task_id: str, now: float) -> dict[str, float] | None:
        """A pending task's band, effective priority and wait so far (for the task view)."""
        where = self._where.get(task_id)
        if where is None:
            return None
        principal, lane = where
        band = lane[0]
        since = self._principals[principal].lanes[lane][task_id]
        return {"band": band, "effective_priority": round(
            self.effective_priority(band, since, now), 2), "waited_s": round(now - since, 3)}

    def serving_order(self, now: float, running: Mapping[str, int],
                      blocked_kinds: Collection[str] = ()) -> ServingPass:
        """One dispatch pass over the queue; see :class:`ServingPass`. Close it when done.

        Tasks that name a kind in ``blocked_kinds`` (no free agent, or held by a limit) are
        left out of the pass without being looked at one by one.
        """
        self._deferred = []
        return ServingPass(self, now, running, set(blocked_kinds))

    def _close_pass(self) -> None:
        deferred, self._deferred = self._deferred or [], None
        for added, task_id, principal, lane, now in deferred:
            queue = self._principals.get(principal)
            present = queue is not None and task_id in queue.lanes.get(lane, {})
            if added and not present and self._where.get(task_id) == (principal, lane):
                self._insert(task_id, principal, lane, now)
            elif not added and present:
                self._remove(task_id, principal, lane)

    def _ordered(self, principal: str, now: float, blocked_kinds: Collection[str | None]
                 ) -> Iterator[tuple[tuple[float, float], str]]:
        """A principal's tasks, best first: the lanes merged by (aged priority, age). A lane
        whose kind joins ``blocked_kinds`` during the pass stops (after the one task the merge
        already holds)."""
        queue = self._principals[principal]

        def lane_items(band: int, kind: str | None, tasks: dict[str, float]
                       ) -> Iterator[tuple[tuple[float, float], str]]:
            # Within one lane, older means at least as aged: each lane is already in order.
            for task_id, since in tasks.items():
                if kind in blocked_kinds:
                    return
                if task_id in self._where:  # not discarded earlier in this pass
                    yield (-self.effective_priority(band, since, now), since), task_id

        return heapq.merge(*(lane_items(band, kind, tasks) for (band, kind), tasks
                             in queue.lanes.items() if kind not in blocked_kinds))


class ServingPass:
    """Yields pending task ids in serving order; call :meth:`took` after one was assigned.

    The next id always comes from the principal with the smallest running/weight share (the
    share grows as this pass assigns its tasks), best task first. A principal whose next
    ``scan_limit`` tasks in a row could not be placed is left for this pass, so a backlog that
    cannot run costs a bounded amount of work per wake.
    """

    def __init__(self, queue: SchedulingQueue, now: float, running: Mapping[str, int],
                 blocked_kinds: set[str | None] | None = None) -> None:
        self.queue = queue
        self.running = dict(running)
        self.blocked: set[str | None] = blocked_kinds if blocked_kinds is not None else set()
        self._streams = {p: queue._ordered(p, now, self.blocked) for p in list(queue._principals)}
        self._heads: dict[str, tuple[tuple[float, float], str]] = {}
        self._skipped: dict[str, int] = {}
        self._current: str | None = None
        self._seq = itertools.count()

    def _share(self, principal: str) -> float:
        return self.running.get(principal, 0) / self.queue.weight(principal)

    def next(self, scan_limit: int) -> tuple[str, str] | None:
        """The next (task id, principal), or None when the pass is over."""
        best: tuple[float, tuple[float, float], str] | None = None
        for principal in list(self._streams):
            head = self._heads.get(principal)
            if head is None:
                head = next(self._streams[principal], None)
                if head is None or self._skipped.get(principal, 0) >= scan_limit:
                    del self._streams[principal]
                    continue
                self._heads[principal] = head
            candidate = (self._share(principal), head[0], principal)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        principal = best[2]
        task_id = self._heads.pop(principal)[1]
        self._current = principal
        self._skipped[principal] = self._skipped.get(principal, 0) + 1
        return task_id, principal

    def took(self, principal: str) -> None:
        """The last task given out was assigned: its principal's share grows."""
        self.running[principal] = self.running.get(principal, 0) + 1
        self._skipped[principal] = 0

    def close(self) -> None:
        """Apply the adds and removals made during the pass."""
        self._streams.clear()
        self._heads.clear()
        self.queue._close_pass()

    def block(self, kind: str) -> None:
        """Skip the rest of the tasks that name this kind in this pass (its agents filled up
        during the pass): each would be one more decision that finds no free agent."""
        self.blocked.add(kind)

    def leave(self, principal: str) -> None:
        """Skip the rest of this principal's tasks in this pass (for example, held by a limit)."""
        self._streams.pop(principal, None)
        self._heads.pop(principal, None)
