"""The whole fleet's grouping, kept current by folding the state's log of changed agents, equals
a grouping built from scratch after random sequences of agent and task changes."""

from __future__ import annotations

import random

import pytest

from coordinator_agent.coordinator.liveness import AgentLiveness
from coordinator_agent.coordinator.state import AgentRecord, FleetLog
from coordinator_agent.coordinator.tasks import TaskRecord
from coordinator_agent.routing.config import Balance
from coordinator_agent.routing.fleet import Fleet, pick

KINDS = ["a", "b", "c"]
CAPS = ["x", "y", "z"]
CONSTRAINTS = [(None, frozenset()), ("a", frozenset()), (None, frozenset({"x"})),
               ("b", frozenset({"y", "z"})), ("c", frozenset({"nobody"}))]
CAP = 4


def _agent(rng: random.Random, n: int) -> AgentRecord:
    return AgentRecord(f"ag-{n}", rng.choice(KINDS),
                       frozenset(rng.sample(CAPS, rng.randint(0, 3))), rng.randint(1, 6))


def _shape(fleet: Fleet) -> dict[object, object]:
    """What routing reads from a grouping: per view, per kind, the agents with capacity and load
    (loads re-read), and whether anyone passes; and the fleet by kind."""
    fleet.refresh_loads(0.0)
    views = {}
    for key in CONSTRAINTS:
        pools, able = fleet.view(*key)
        views[key] = (able, {
            kind: (sorted((a.id, c) for a, c in pool.entries), pool.capacity, pool.used)
            for kind, pool in pools.items()})
    by_kind = {kind: sorted((a.id, c, h) for a, c, h in group.values())
               for kind, group in fleet.by_kind.items()}
    return {"views": views, "by_kind": by_kind}


def _change(rng: random.Random, agents: dict[str, AgentRecord], log: FleetLog, n: int) -> None:
    """One random change, logged as the state logs it (task changes are not logged)."""
    roll = rng.random()
    ids = list(agents)
    if roll < 0.15 or not ids:
        agent = _agent(rng, n)
        agents[agent.id] = agent
        log.changed(agent.id)
        return
    agent = agents[rng.choice(ids)]
    if roll < 0.25:
        del agents[agent.id]
        log.changed(agent.id)
    elif roll < 0.4:
        agent.liveness = rng.choice([AgentLiveness.HEALTHY, AgentLiveness.SUSPECT,
                                     AgentLiveness.DEAD])
        log.changed(agent.id)
    elif roll < 0.5:
        agent.reported_state = rng.choice(["ready", "draining"])
        log.changed(agent.id)
    elif roll < 0.6:
        agent.kind = rng.choice(KINDS)
        agent.capabilities = frozenset(rng.sample(CAPS, rng.randint(0, 3)))
        agent.max_concurrency = rng.randint(1, 6)
        log.changed(agent.id)
    elif roll < 0.65:  # a new record under the same id (an agent back from the dead)
        fresh = _agent(rng, n)
        fresh.id = agent.id
        agents[agent.id] = fresh
        log.changed(agent.id)
    elif roll < 0.85:
        agent.in_flight.add(f"t-{n}")  # a task assigned: not logged, loads are read live
    elif agent.in_flight:
        agent.in_flight.pop()


@pytest.mark.parametrize("seed", range(12))
def test_folded_grouping_equals_a_fresh_one(seed: int) -> None:
    rng = random.Random(seed)
    agents: dict[str, AgentRecord] = {}
    log = FleetLog(agents)
    for n in range(30):
        agent = _agent(rng, n)
        agents[agent.id] = agent
    folded = Fleet(list(agents.values()), 0.0, CAP, version=log.version, log=log)
    for key in CONSTRAINTS[:2]:
        folded.view(*key)  # some views exist before the changes, the others are built after
    for step in range(400):
        _change(rng, agents, log, 1000 + step)
        if rng.random() < 0.3:
            assert folded.fold(log)
            assert folded.version == log.version
            fresh = Fleet(list(agents.values()), 0.0, CAP)
            assert _shape(folded) == _shape(fresh)
        if rng.random() < 0.1:  # picks drop stale agents from pools: a fold must mend that
            pools, _ = folded.view(None, frozenset())
            if pools:
                kind = rng.choice(sorted(pools))
                task = TaskRecord(id=f"p-{step}", description="x")
                pick(task, kind, pools[kind], cap=CAP, balance=Balance.LEAST_LOADED, rng=rng)


def test_a_reader_behind_the_kept_log_regroups() -> None:
    agents = {"ag-0": AgentRecord("ag-0", "a", frozenset(), 1)}
    log = FleetLog(agents)
    fleet = Fleet(list(agents.values()), 0.0, CAP, version=log.version, log=log)
    for _ in range(5000):  # more than the log keeps for one agent
        log.changed("ag-0")
    assert log.base > 0
    assert not fleet.fold(log)
    assert Fleet(list(agents.values()), 0.0, CAP, version=0, log=FleetLog(agents)).fold(log) \
        is False  # another log's reader never folds this one


def test_pick_takes_an_idle_agent_and_skips_one_that_fell_ill() -> None:
    agents = {f"ag-{i}": AgentRecord(f"ag-{i}", "a", frozenset(), 2) for i in range(50)}
    for i, agent in enumerate(agents.values()):
        agent.in_flight = {f"t-{i}-{n}" for n in range(1 if i else 0)}  # only ag-0 is idle
    log = FleetLog(agents)
    fleet = Fleet(list(agents.values()), 0.0, CAP, version=0, log=log)
    pools, _ = fleet.view(None, frozenset())
    task = TaskRecord(id="t", description="x")
    rng = random.Random(1)
    first, stale = pick(task, "a", pools["a"], cap=CAP, balance=Balance.LEAST_LOADED, rng=rng)
    assert first is agents["ag-0"] and not stale
    agents["ag-0"].liveness = AgentLiveness.SUSPECT  # not yet logged
    other, stale = pick(task, "a", pools["a"], cap=CAP, balance=Balance.LEAST_LOADED, rng=rng)
    assert other is not None and other.id != "ag-0" and stale
    assert "ag-0" not in pools["a"].index


def test_pick_scans_past_its_window_until_an_agent_is_free() -> None:
    agents = {f"ag-{i}": AgentRecord(f"ag-{i}", "a", frozenset(), 2) for i in range(600)}
    for i, agent in enumerate(agents.values()):
        agent.in_flight = {f"t-{i}-{n}" for n in range(1 if i == 437 else 2)}  # one free slot
    fleet = Fleet(list(agents.values()), 0.0, CAP, version=0, log=FleetLog(agents))
    pools, _ = fleet.view(None, frozenset())
    task = TaskRecord(id="t", description="x")
    for seed in range(5):
        agent, _ = pick(task, "a", pools["a"], cap=CAP, balance=Balance.LEAST_LOADED,
                        rng=random.Random(seed))
        assert agent is agents["ag-437"]
