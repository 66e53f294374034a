"""Liveness at fleet scale: deadlines instead of judging everyone, and "behind => no verdict".

Pure logic (``StateManager`` with a real SQLite store, ``Backlog``); times are given, never
waited for.
"""

from __future__ import annotations

import pytest

from coordinator_agent.coordinator.backlog import STALE_S, Backlog
from coordinator_agent.coordinator.state import AgentLiveness, StateManager
from coordinator_agent.wire import protocol

T0 = 1_000.0
# With the liveness fixture: heartbeat 2 s, suspect after 2.5 x (5 s), dead after 5 x (10 s).
SUSPECT_S = 5.0
DEAD_S = 10.0


def _status() -> protocol.AgentStatus:
    return protocol.AgentStatus(kind="general", capabilities=[], max_concurrency=2)


def _fleet(state: StateManager, n: int, now: float) -> None:
    for i in range(n):
        state.observe_agent(f"a{i}", _status(), now, sent_at=now)


def _counts(state: StateManager) -> dict[str, int]:
    counts = state.count_by_liveness()
    return {k: v for k, v in counts.items() if v}


# --- deadlines ---------------------------------------------------------------------------------


def test_sweep_touches_only_agents_whose_deadline_passed(state: StateManager) -> None:
    _fleet(state, 1000, T0)
    state.observe_agent("late", _status(), T0 + 3.0)
    # Everyone but "late" beats on; "late" alone goes silent.
    for step in range(1, 4):
        _fleet(state, 1000, T0 + 2.0 * step)
    assert state.sweep_liveness(T0 + 3.0 + SUSPECT_S + 0.1) == []
    assert state.agents["late"].liveness is AgentLiveness.SUSPECT
    assert _counts(state) == {"healthy": 1000, "suspect": 1}
    # The heap holds one entry per agent, however many heartbeats came in.
    assert len(state._due) == 1001


def test_deadline_kills_a_silent_agent_once(state: StateManager) -> None:
    _fleet(state, 3, T0)
    state.observe_agent("a0", _status(), T0 + 4.0)
    died = state.sweep_liveness(T0 + DEAD_S + 0.1)
    assert sorted(a.id for a in died) == ["a1", "a2"]
    assert state.agents["a0"].liveness is AgentLiveness.SUSPECT  # silent 6.1 s, not 10
    assert state.sweep_liveness(T0 + 100.0) != []  # a0 dies later, by itself
    assert state.sweep_liveness(T0 + 200.0) == []  # and nobody dies twice
    assert state.changes["dead"] == 3


def test_heartbeat_after_suspect_moves_the_deadline(state: StateManager) -> None:
    _fleet(state, 1, T0)
    state.sweep_liveness(T0 + SUSPECT_S + 0.1)
    assert state.agents["a0"].liveness is AgentLiveness.SUSPECT
    state.observe_agent("a0", _status(), T0 + 9.0)
    assert state.sweep_liveness(T0 + DEAD_S + 0.1) == []  # heard at 9: not dead at 10
    assert state.agents["a0"].liveness is not AgentLiveness.DEAD


def test_revived_agent_is_scheduled_again(state: StateManager) -> None:
    _fleet(state, 1, T0)
    assert len(state.sweep_liveness(T0 + DEAD_S + 1)) == 1
    state.observe_agent("a0", _status(), T0 + 20.0)
    assert state.agents["a0"].liveness is AgentLiveness.HEALTHY
    assert len(state.sweep_liveness(T0 + 20.0 + DEAD_S + 1)) == 1


def test_gaps_in_the_agents_stamps_count_missing_heartbeats(state: StateManager) -> None:
    state.observe_agent("a0", _status(), T0, sent_at=T0)
    state.observe_agent("a0", _status(), T0 + 2.0, sent_at=T0 + 2.0)  # on time
    state.observe_agent("a0", _status(), T0 + 9.0, sent_at=T0 + 8.1)  # 2 never came
    assert state.missing_heartbeats == 2


# --- behind => no verdict ----------------------------------------------------------------------


def test_silence_floor_suspends_verdicts(state: StateManager) -> None:
    """While behind, the sweep moves the floor with the clock: nobody's silence grows."""
    _fleet(state, 500, T0)
    now = T0
    while now < T0 + 60.0:  # a minute behind: no heartbeat handled at all
        now += 0.25
        state.silence_floor = now
        assert state.sweep_liveness(now) == []
    assert _counts(state) == {"healthy": 500}
    # Caught up at T0 + 60: silence counts from then. The agents that still beat are fine ...
    for i in range(250):
        state.observe_agent(f"a{i}", _status(), now + 1.0)
    assert state.sweep_liveness(now + SUSPECT_S - 0.1) == []
    # ... and the truly silent ones are judged a whole window after the catch-up, not before.
    assert len(state.sweep_liveness(now + DEAD_S + 0.1)) == 250


@pytest.fixture
def backlog() -> Backlog:
    return Backlog(behind_after_s=1.0)


def test_backlog_behind_when_every_heartbeat_is_late(backlog: Backlog) -> None:
    for i in range(100):
        backlog.observe(sent_at=T0 + i * 0.01 - 30.0, now=T0 + i * 0.01)
    assert backlog.refresh(T0 + 1.0)
    assert backlog.lag_s == pytest.approx(30.0, abs=0.1)
    assert backlog.view()["behind"] is True


def test_a_few_skewed_clocks_neither_raise_nor_hide_a_backlog(backlog: Backlog) -> None:
    # 10 % of agents have clocks 40 s slow (their heartbeats look old): not a backlog.
    for i in range(100):
        skew = 40.0 if i % 10 == 0 else 0.0
        backlog.observe(sent_at=T0 - 0.05 - skew, now=T0)
    assert not backlog.refresh(T0)
    # Everyone 20 s late, 10 % with clocks 60 s fast (stamps from the future): still behind.
    for i in range(128):
        skew = -60.0 if i % 10 == 0 else 0.0
        backlog.observe(sent_at=T0 + 1.0 - 20.0 - skew, now=T0 + 1.0)
    assert backlog.refresh(T0 + 1.0)


def test_backlog_recovers_with_hysteresis(backlog: Backlog) -> None:
    for _ in range(50):
        backlog.observe(sent_at=T0 - 5.0, now=T0)
    assert backlog.refresh(T0)
    for _ in range(128):
        backlog.observe(sent_at=T0 + 1.0 - 0.8, now=T0 + 1.0)  # 0.8 s: under 1.0, over 0.5
    assert backlog.refresh(T0 + 1.0)  # not yet: no flapping at the threshold
    for _ in range(128):
        backlog.observe(sent_at=T0 + 2.0 - 0.1, now=T0 + 2.0)
    assert not backlog.refresh(T0 + 2.0)
    assert backlog.episodes == 1


def test_a_busy_loop_counts_as_behind(backlog: Backlog) -> None:
    backlog.loop_late(3.0)
    assert backlog.refresh(T0)
    backlog.loop_late(0.0)
    assert not backlog.refresh(T0 + 0.25)


def test_old_observations_expire(backlog: Backlog) -> None:
    backlog.observe(sent_at=T0 - 30.0, now=T0)
    assert backlog.refresh(T0)
    # Nothing handled since (the whole fleet went away): the old lag no longer holds.
    assert not backlog.refresh(T0 + STALE_S + 1.0)


def test_shedding_only_repeat_heartbeats_while_behind(backlog: Backlog) -> None:
    interval = 2.0
    assert not backlog.sheddable("agent.status", T0 - 1.0, T0, interval)  # not behind
    backlog.loop_late(5.0)
    backlog.refresh(T0)
    assert backlog.sheddable("agent.status", T0 - 1.0, T0, interval)
    assert backlog.sheddable("agent.status", T0 - 6.0, T0, interval)  # 5 s behind: 2 + 5 s
    assert not backlog.sheddable("agent.status", T0 - 10.0, T0, interval)  # not heard lately
    assert not backlog.sheddable("agent.status", None, T0, interval)  # unknown, or not healthy
    assert not backlog.sheddable("task.progress", T0 - 1.0, T0, interval)
    assert not backlog.sheddable("agent.hello", T0 - 1.0, T0, interval)
    assert backlog.shed == 2
