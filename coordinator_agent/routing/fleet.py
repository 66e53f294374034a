"""Which agent within a kind, by load: the fleet grouped by kind, and the pick from a pool.

``Fleet`` groups the healthy agents that pass a task's hard constraints by kind, one ``Pool``
each with its capacity and load. The planner scores the kinds on those loads, then :func:`pick`
takes an agent of the chosen kind: the least loaded with a free slot (or the better of two drawn
at random, with ``balance: two_choices``), preferring agents that have not already failed the
task, and checked live before it is returned.
"""

from __future__ import annotations

import operator
import random

from coordinator_agent.coordinator.state import AgentRecord
from coordinator_agent.coordinator.tasks import AttemptOutcome, TaskRecord
from coordinator_agent.routing.config import Balance


class Pool:
    """Healthy agents of one kind that pass the hard constraints, as (agent, capacity)."""

    __slots__ = ("capacity", "entries", "used")

    def __init__(self) -> None:
        self.entries: list[tuple[AgentRecord, int]] = []
        self.capacity = 0
        self.used = 0  # refreshed whenever the kind is picked from

    @property
    def workload(self) -> float:
        return self.used / self.capacity if self.capacity else 1.0

    def add(self, agent: AgentRecord, capacity: int) -> None:
        used = len(agent.in_flight)
        self.entries.append((agent, capacity))
        self.capacity += capacity
        self.used += used if used < capacity else capacity


def _pool(pools: dict[str, Pool], kind: str) -> Pool:
    pool = pools.get(kind)
    if pool is None:
        pool = pools[kind] = Pool()
    return pool


class Fleet:
    """The agents grouped by kind at one moment, and the pools per hard constraint.

    Grouping a thousand agents costs more than the rest of a decision, so it is reused for
    ``agent_snapshot_s`` while the set of agent records stays the same. What it can get wrong
    is bounded: loads are re-read live for the chosen kind, and the chosen agent is checked
    live before it is returned.
    """

    __slots__ = ("by_kind", "consulted", "members", "taken_at", "version", "views")

    def __init__(self, members: list[AgentRecord], taken_at: float, cap: int, *,
                 version: int | None = None) -> None:
        self.members = members
        self.taken_at = taken_at
        #: The state's fleet version it was grouped at (None: a caller's subset, or stale).
        self.version = version
        self.consulted = False  # used by a decision since its loads were last read
        by_kind: dict[str, list[tuple[AgentRecord, int, bool]]] = {}
        pools: dict[str, Pool] = {}  # the view without constraints, built in the same pass
        for agent in members:
            kind = agent.kind
            group = by_kind.get(kind)
            if group is None:
                group = by_kind[kind] = []
            limit = agent.max_concurrency
            capacity = limit if limit < cap else cap
            healthy = agent.assignable
            group.append((agent, capacity, healthy))
            if healthy:
                _pool(pools, kind).add(agent, capacity)
        self.by_kind = by_kind
        self.views: dict[tuple[str | None, frozenset[str]], tuple[dict[str, Pool], bool]] = {
            (None, frozenset()): (pools, bool(members)),
        }

    def refresh_loads(self, now: float) -> None:
        """Re-read the loads of every pool (cheap next to regrouping: no grouping, no checks)."""
        self.taken_at = now
        for pools, _ in self.views.values():
            for pool in pools.values():
                used = 0
                for agent, capacity in pool.entries:
                    n = len(agent.in_flight)
                    used += n if n < capacity else capacity
                pool.used = used

    def same_members(self, members: list[AgentRecord]) -> bool:
        old = self.members
        return len(old) == len(members) and all(map(operator.is_, old, members))

    def view(self, kind: str | None, caps: frozenset[str]) -> tuple[dict[str, Pool], bool]:
        """(pools by kind, whether any agent at all passes the constraints)."""
        key = (kind, caps)
        found = self.views.get(key)
        if found is None:
            found = self.views[key] = self._build(kind, caps)
        return found

    def _build(self, kind: str | None, caps: frozenset[str]) -> tuple[dict[str, Pool], bool]:
        if kind is not None and not caps:
            base = self.views[(None, frozenset())][0]
            pool = base.get(kind)
            return ({kind: pool} if pool is not None else {}), kind in self.by_kind
        if kind is None:
            groups = list(self.by_kind.items())
        else:
            groups = [(kind, self.by_kind.get(kind, []))]
        pools: dict[str, Pool] = {}
        able = False
        for name, group in groups:
            for agent, capacity, healthy in group:
                if caps and not agent.capabilities.issuperset(caps):
                    continue
                able = True
                if healthy:
                    _pool(pools, name).add(agent, capacity)
        return pools, able


def pick(
    task: TaskRecord, kind: str, pool: Pool, *, cap: int, balance: Balance, rng: random.Random
) -> tuple[AgentRecord | None, bool]:
    """An agent of the pool with a free slot, checked live; None when all are busy.

    The flag says whether the grouping turned out stale on the way, so that the caller regroups
    the fleet at the next decision.
    """
    caps = task.required_capabilities
    stale = False
    while pool.entries:
        agent = _choose(task, pool, balance, rng)
        if agent is None:
            return None, stale
        if (agent.kind == kind and agent.assignable and agent.free_slots(cap) > 0
                and agent.capabilities.issuperset(caps)):
            return agent, stale
        # The grouping is stale (an agent fell ill, changed kind, or shrank): drop what is
        # stale in this pool now, and regroup the fleet at the next decision.
        stale = True
        pool.entries = [(a, c) for a, c in pool.entries
                        if a is not agent and a.kind == kind and a.assignable]
    return None, stale


def _choose(
    task: TaskRecord, pool: Pool, balance: Balance, rng: random.Random
) -> AgentRecord | None:
    entries = pool.entries
    tried: set[str] = set()
    if task.attempts:
        tried = {a.agent_id for a in task.attempts if a.outcome is not AttemptOutcome.SUCCEEDED}
    if balance is Balance.TWO_CHOICES and not tried and len(entries) > 2:
        for _ in range(4):  # a full agent in the sample: draw again, then scan
            (a, cap_a), (b, cap_b) = rng.sample(entries, 2)
            load_a, load_b = len(a.in_flight) / cap_a, len(b.in_flight) / cap_b
            if load_a < 1.0 or load_b < 1.0:
                if load_a == load_b:
                    return a if rng.random() < 0.5 else b
                return a if load_a < load_b else b
    # Least loaded, live; agents that already failed this task only if nobody else is free.
    best: list[AgentRecord] = []
    best_load = 2.0
    spare: AgentRecord | None = None
    total = 0
    for agent, capacity in entries:
        used = len(agent.in_flight)
        if used >= capacity:
            total += capacity
            continue
        total += used
        if tried and agent.id in tried:
            if spare is None:
                spare = agent
            continue
        load = used / capacity
        if load < best_load:
            best_load = load
            best = [agent]
        elif load == best_load:
            best.append(agent)
    pool.used = total
    if not best:
        return spare
    return best[0] if len(best) == 1 else rng.choice(best)
