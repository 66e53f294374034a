"""Which agent within a kind, by load: the fleet grouped by kind, and the pick from a pool.

``Fleet`` groups the healthy agents that pass a task's hard constraints by kind, one ``Pool``
each with its capacity and load. The planner scores the kinds on those loads, then :func:`pick`
takes an agent of the chosen kind: the least loaded with a free slot (or the better of two drawn
at random, with ``balance: two_choices``), preferring agents that have not already failed the
task, and checked live before it is returned.

The whole fleet's grouping is kept current by folding in the agents the state logged as changed
(``FleetLog``): each costs O(1) per cached constraint view, so 10,000 agents are not regrouped
whenever one of them falls ill.
"""

from __future__ import annotations

import random

from coordinator_agent.coordinator.state import AgentRecord, FleetLog
from coordinator_agent.coordinator.tasks import AttemptOutcome, TaskRecord
from coordinator_agent.routing.config import Balance

#: Constraint views kept at once; past it all but the plain one are dropped (rebuilt on use).
MAX_VIEWS = 64
#: Agents ``pick`` compares at most once it has a free one (from a random place in the pool):
#: the least loaded of a random window, not of a whole kind of thousands.
SCAN_WINDOW = 256
#: Agents whose load one ``refresh_loads`` re-reads at most: the sweep that calls it runs on
#: the event loop, so 10,000 agents (times the constraint views) are re-read over a few sweeps.
REFRESH_BUDGET = 2048

Key = tuple[str | None, frozenset[str]]
Member = tuple[AgentRecord, int, bool]  # (agent, capacity, assignable) as grouped


class Pool:
    """Healthy agents of one kind that pass the hard constraints, as (agent, capacity)."""

    __slots__ = ("capacity", "entries", "index", "used")

    def __init__(self) -> None:
        self.entries: list[tuple[AgentRecord, int]] = []
        self.index: dict[str, int] = {}  # agent id -> position in entries (O(1) removal)
        self.capacity = 0
        self.used = 0  # refreshed whenever the kind is scanned, and by refresh_loads

    @property
    def workload(self) -> float:
        return self.used / self.capacity if self.capacity else 1.0

    def add(self, agent: AgentRecord, capacity: int) -> None:
        if agent.id in self.index:
            return
        used = len(agent.in_flight)
        self.index[agent.id] = len(self.entries)
        self.entries.append((agent, capacity))
        self.capacity += capacity
        self.used += used if used < capacity else capacity

    def remove(self, agent_id: str) -> None:
        at = self.index.pop(agent_id, None)
        if at is None:
            return
        entries = self.entries
        agent, capacity = entries[at]
        last = entries.pop()
        if at < len(entries):  # the last entry takes the removed one's place
            entries[at] = last
            self.index[last[0].id] = at
        used = len(agent.in_flight)
        self.capacity -= capacity
        self.used = max(0, self.used - (used if used < capacity else capacity))


class View:
    """The pools of one constraint (kind, capabilities), and how many agents pass it at all."""

    __slots__ = ("caps", "count", "kind", "pools")

    def __init__(self, kind: str | None, caps: frozenset[str]) -> None:
        self.kind = kind
        self.caps = caps
        self.count = 0  # agents passing the constraint, healthy or not
        self.pools: dict[str, Pool] = {}

    def matches(self, kind: str, caps: frozenset[str]) -> bool:
        return (self.kind is None or self.kind == kind) and self.caps <= caps

    def add(self, agent: AgentRecord, kind: str, capacity: int, healthy: bool) -> None:
        self.count += 1
        if healthy:
            pool = self.pools.get(kind)
            if pool is None:
                pool = self.pools[kind] = Pool()
            pool.add(agent, capacity)

    def remove(self, agent_id: str, kind: str) -> None:
        self.count -= 1
        pool = self.pools.get(kind)
        if pool is not None:
            pool.remove(agent_id)
            if not pool.entries:
                del self.pools[kind]


class Fleet:
    """The agents grouped by kind, and the pools per hard constraint.

    Built once from a list of agents; the whole fleet's grouping is then kept current by
    :meth:`fold`. What it can get wrong is bounded: loads are re-read live when the chosen
    kind is scanned, and the chosen agent is checked live before it is returned.
    """

    __slots__ = ("by_kind", "cap", "consulted", "cursor", "grouped", "log", "members",
                 "taken_at", "version", "views")

    def __init__(self, members: list[AgentRecord], taken_at: float, cap: int, *,
                 version: int | None = None, log: FleetLog | None = None) -> None:
        self.members = members  # as built (a caller's subset is compared against it)
        self.taken_at = taken_at
        self.cap = cap
        #: The state's fleet version it was grouped at (None: a caller's subset, or stale).
        self.version = version
        self.log = log  # the log it folds (None: built once, never folded)
        self.consulted = False  # used by a decision since its loads were last read
        self.cursor = 0  # where the last refresh_loads stopped, over all views' pools
        self.by_kind: dict[str, dict[str, Member]] = {}
        self.grouped: dict[str, tuple[str, frozenset[str]]] = {}  # id -> (kind, caps) as grouped
        self.views: dict[Key, View] = {(None, frozenset()): View(None, frozenset())}
        for agent in members:
            self._add(agent)

    def fold(self, log: FleetLog) -> bool:
        """Bring the grouping to ``log.version``; False when it cannot (regroup instead)."""
        if self.log is not log or self.version is None:
            return False
        changed = log.since(self.version)
        if changed is None:
            return False
        if changed:
            agents = log.agents
            for agent_id in set(changed):
                self._remove(agent_id)
                agent = agents.get(agent_id)
                if agent is not None:
                    self._add(agent)
            self.version = log.version
        return True

    def _add(self, agent: AgentRecord) -> None:
        agent_id, kind, caps = agent.id, agent.kind, agent.capabilities
        limit = agent.max_concurrency
        capacity = limit if limit < self.cap else self.cap
        healthy = agent.assignable
        group = self.by_kind.get(kind)
        if group is None:
            group = self.by_kind[kind] = {}
        group[agent_id] = (agent, capacity, healthy)
        self.grouped[agent_id] = (kind, caps)
        for view in self.views.values():
            if view.matches(kind, caps):
                view.add(agent, kind, capacity, healthy)

    def _remove(self, agent_id: str) -> None:
        was = self.grouped.pop(agent_id, None)
        if was is None:
            return
        kind, caps = was
        group = self.by_kind[kind]
        del group[agent_id]
        if not group:
            del self.by_kind[kind]
        for view in self.views.values():
            if view.matches(kind, caps):
                view.remove(agent_id, kind)

    def refresh_loads(self, now: float, budget: int | None = None) -> bool:
        """Re-read the loads of the pools (no grouping, no checks), about ``budget`` agents of
        them from where the last call stopped (None: all); True when all were re-read."""
        self.taken_at = now
        pools = [pool for view in self.views.values() for pool in view.pools.values()]
        if not pools:
            return True
        start = self.cursor % len(pools) if budget is not None else 0
        done = 0
        for n in range(len(pools)):
            if budget is not None and done >= budget:
                self.cursor = start + n
                return False
            pool = pools[(start + n) % len(pools)]
            used = 0
            for agent, capacity in pool.entries:
                k = len(agent.in_flight)
                used += k if k < capacity else capacity
            pool.used = used
            done += len(pool.entries)
        self.cursor = 0
        return True

    def same_members(self, members: list[AgentRecord]) -> bool:
        old = self.members
        return len(old) == len(members) and all(a is b for a, b in zip(old, members, strict=True))

    def view(self, kind: str | None, caps: frozenset[str]) -> tuple[dict[str, Pool], bool]:
        """(pools by kind, whether any agent at all passes the constraints)."""
        key = (kind, caps)
        found = self.views.get(key)
        if found is None:
            if len(self.views) >= MAX_VIEWS:
                self.views = {(None, frozenset()): self.views[(None, frozenset())]}
            found = self.views[key] = self._build(kind, caps)
        return found.pools, found.count > 0

    def _build(self, kind: str | None, caps: frozenset[str]) -> View:
        """A new constraint's view: one pass over the kinds it can match (then kept current)."""
        view = View(kind, caps)
        groups = (self.by_kind.items() if kind is None
                  else [(kind, self.by_kind.get(kind, {}))])
        for name, group in groups:
            for agent_id, (agent, capacity, healthy) in group.items():
                if caps and not caps <= self.grouped[agent_id][1]:
                    continue
                view.add(agent, name, capacity, healthy)
        return view


def pick(
    task: TaskRecord, kind: str, pool: Pool, *, cap: int, balance: Balance, rng: random.Random
) -> tuple[AgentRecord | None, bool]:
    """An agent of the pool with a free slot, checked live; None when all are busy.

    The flag says whether the grouping turned out stale on the way (the stale agent is
    dropped from the pool), so that the caller regroups the fleet.
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
        # The grouping is stale (an agent fell ill, changed kind, or shrank): drop it here;
        # the state logged the change, so the next fold or regroup sees it as it is now.
        stale = True
        pool.remove(agent.id)
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
    # The scan starts at a random place and stops at the first idle agent (nobody is less
    # loaded), or after SCAN_WINDOW agents once one is free: a large kind is not walked whole.
    best: list[AgentRecord] = []
    best_load = 2.0
    spare: AgentRecord | None = None
    total = 0
    start = rng.randrange(len(entries)) if len(entries) > 1 else 0
    for seen, (agent, capacity) in enumerate(entries[start:] + entries[:start]):
        if seen >= SCAN_WINDOW and best:
            break  # the loads are not all read: pool.used keeps its last figure
        used = len(agent.in_flight)
        if used >= capacity:
            total += capacity
            continue
        if tried and agent.id in tried:
            total += used
            if spare is None:
                spare = agent
            continue
        if used == 0:
            return agent  # the loads are not all read: pool.used keeps its last figure
        total += used
        load = used / capacity
        if load < best_load:
            best_load = load
            best = [agent]
        elif load == best_load:
            best.append(agent)
    else:
        pool.used = total
    if not best:
        return spare
    return best[0] if len(best) == 1 else rng.choice(best)
