"""PatternStore: similarity through the index, time decay, sample size, persistence."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator_agent.routing import patterns
from coordinator_agent.routing.patterns import (
    Evidence,
    Outcome,
    PatternStore,
    signature,
)

NOW = 1_700_000_000.0
DAY = 86_400.0


def _outcome(keywords: str, kind: str, success: bool = True, *, at: float = NOW,
             quality: float = 1.0, duration_s: float | None = None) -> Outcome:
    return Outcome(tuple(keywords.split()), kind, success, agent_id="a-1", quality=quality,
                   duration_s=duration_s, at=at)


@pytest.fixture
def store() -> Iterator[PatternStore]:
    s = PatternStore(half_life_s=DAY, partial_match_weight=0.5)
    yield s
    s.close()


def test_signature_ignores_order_and_repeats() -> None:
    assert signature(["b", "a", "b"]) == signature(("a", "b")) == "a b"


def test_exact_match_counts_fully(store: PatternStore) -> None:
    store.record(_outcome("scan cve", "security"))
    store.record(_outcome("cve scan", "security", success=False))
    ev = store.evidence(["scan", "cve"], now=NOW)["security"]
    assert ev.weight == pytest.approx(2.0)
    assert ev.value == pytest.approx(1.0)
    assert ev.exact == pytest.approx(2.0)
    assert ev.success_rate == pytest.approx(0.5)


def test_partial_match_is_weighted_by_shared_keywords(store: PatternStore) -> None:
    # Shares 1 of the query's 2 keywords: similarity 0.5 x 1/2.
    store.record(_outcome("scan image", "security"))
    # Shares both, but is a different set: similarity 0.5 x 2/2.
    store.record(_outcome("scan cve image", "security"))
    ev = store.evidence(["scan", "cve"], now=NOW)["security"]
    assert ev.weight == pytest.approx(0.25 + 0.5)
    assert ev.exact == 0.0


def test_unrelated_keywords_and_kind_filter(store: PatternStore) -> None:
    store.record(_outcome("scan cve", "security"))
    store.record(_outcome("scan cve", "development"))
    assert store.evidence(["deploy"], now=NOW) == {}
    assert store.evidence([], now=NOW) == {}
    assert set(store.evidence(["scan", "cve"], now=NOW)) == {"security", "development"}
    assert set(store.evidence(["scan", "cve"], {"development"}, now=NOW)) == {"development"}


def test_quality_scales_a_success_and_failures_are_worth_nothing(store: PatternStore) -> None:
    store.record(_outcome("a", "k", quality=0.5))
    store.record(_outcome("a", "k", success=False, quality=1.0))
    assert store.evidence(["a"], now=NOW)["k"].value == pytest.approx(0.5)


def test_pattern_is_centred_and_damped_by_the_prior() -> None:
    assert Evidence(0.0, 0.0, 0.0).pattern(2.0) == 0.0  # nothing known: neutral
    assert Evidence(2.0, 2.0, 2.0).pattern(2.0) == pytest.approx(0.5)
    assert Evidence(2.0, 0.0, 2.0).pattern(2.0) == pytest.approx(-0.5)
    assert Evidence(98.0, 98.0, 98.0).pattern(2.0) == pytest.approx(0.98)
    # Same rate, more samples: further from neutral.
    assert Evidence(10.0, 8.0, 0).pattern(2.0) > Evidence(5.0, 4.0, 0).pattern(2.0) > 0


def test_time_decay_halves_weight_each_half_life(store: PatternStore) -> None:
    store.record(_outcome("a", "k", at=NOW - DAY))
    store.record(_outcome("b", "k", at=NOW - 2 * DAY))
    assert store.evidence(["a"], now=NOW)["k"].weight == pytest.approx(0.5)
    assert store.evidence(["b"], now=NOW)["k"].weight == pytest.approx(0.25)
    assert store.evidence(["a"], now=NOW + DAY)["k"].weight == pytest.approx(0.25)


def test_recent_successes_outweigh_old_failures(store: PatternStore) -> None:
    for _ in range(8):
        store.record(_outcome("deploy", "cicd", success=False, at=NOW - 10 * DAY))
    for _ in range(2):
        store.record(_outcome("deploy", "cicd", success=True, at=NOW))
    ev = store.evidence(["deploy"], now=NOW)["cicd"]
    assert ev.success_rate is not None and ev.success_rate > 0.99
    assert ev.pattern(2.0) > 0


def test_rebase_keeps_results_exact() -> None:
    # A one-second half-life: a few minutes of outcomes cross the rebase point many times.
    store = PatternStore(half_life_s=1.0, partial_match_weight=0.5)
    try:
        for i in range(300):
            store.record(_outcome("x y", "k", success=i % 3 != 0, at=NOW + i))
        ev = store.evidence(["x", "y"], now=NOW + 299)["k"]
        expected = sum(0.5 ** (299 - i) for i in range(300))
        expected_value = sum(0.5 ** (299 - i) for i in range(300) if i % 3 != 0)
        assert ev.weight == pytest.approx(expected)
        assert ev.value == pytest.approx(expected_value)
    finally:
        store.close()


def test_kind_summary(store: PatternStore) -> None:
    store.record(_outcome("a", "k", duration_s=2.0))
    store.record(_outcome("b", "k", success=False, duration_s=4.0))
    store.record(_outcome("c", "k"))
    summary = store.kinds(now=NOW)["k"]
    assert summary.outcomes == pytest.approx(3.0)
    assert summary.success_rate == pytest.approx(2 / 3)
    assert summary.mean_duration_s == pytest.approx(3.0)


def test_duplicate_keywords_count_once(store: PatternStore) -> None:
    store.record(Outcome(("a", "a", "b"), "k", True, at=NOW))
    ev = store.evidence(["a", "b"], now=NOW)["k"]
    assert ev.weight == pytest.approx(1.0)


def test_outcomes_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "patterns.sqlite3"
    first = PatternStore(path, half_life_s=DAY)
    first.record(_outcome("scan cve", "security", at=NOW - DAY), counters={"decisions": 3.0})
    first.record_many([_outcome("scan cve", "security", success=False, at=NOW),
                       _outcome("deploy", "cicd", at=NOW)])
    before = first.evidence(["scan", "cve"], now=NOW)
    first.close()

    second = PatternStore(path, half_life_s=DAY)
    try:
        assert len(second) == 3
        assert second.evidence(["scan", "cve"], now=NOW) == pytest.approx(before)
        assert second.evidence(["scan", "cve"], now=NOW)["security"].weight == pytest.approx(1.5)
        assert second.counters() == {"decisions": 3.0}
        assert set(second.kinds(now=NOW)) == {"security", "cicd"}
    finally:
        second.close()


def test_oldest_outcomes_are_pruned(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite3"
    store = PatternStore(path, max_outcomes=100)
    store.record_many(_outcome(f"w{i}", "k", at=NOW + i) for i in range(250))
    assert len(store) == 100
    store.close()
    with sqlite3.connect(path) as db:
        oldest = db.execute("SELECT MIN(at), COUNT(*) FROM outcomes").fetchone()
    assert oldest == (NOW + 150, 100)


def test_failed_write_leaves_memory_untouched(store: PatternStore) -> None:
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.record(_outcome("a", "k"))
    assert store.evidence(["a"], now=NOW) == {}
    assert len(store) == 0


def _stored(path: Path) -> int:
    with sqlite3.connect(path) as other:  # another reader sees what is committed
        count: int = other.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
    return count


async def test_one_loop_turns_outcomes_are_committed_together_at_its_end(tmp_path: Path) -> None:
    path = tmp_path / "learning.sqlite3"
    store = PatternStore(path, half_life_s=DAY)
    try:
        for i in range(50):
            store.record(_outcome(f"deploy service{i}", "cicd"))
        assert _stored(path) == 0  # still this turn: one transaction open
        await asyncio.sleep(0)  # the turn ends: one commit for the fifty
        assert _stored(path) == 50
        # An outcome whose statements fail is undone alone; the turn's others are kept.
        store.record(_outcome("kept", "cicd"))
        with pytest.raises(sqlite3.OperationalError):
            store.record(_outcome("undone", "cicd"), also=[("INSERT INTO nowhere VALUES (?)",
                                                            [(1,)])])
        await asyncio.sleep(0)
        assert _stored(path) == 51 and len(store) == 51
    finally:
        store.close()


async def test_a_turns_counters_and_weights_are_written_once_as_they_end(
        tmp_path: Path) -> None:
    """Every outcome of a burst changes the counters and the same weights: the turn's commit
    writes each once, with its last value; an undone outcome's are not taken."""
    path = tmp_path / "learning.sqlite3"
    store = PatternStore(path, half_life_s=DAY)
    try:
        for i in range(20):
            store.record(_outcome("deploy api", "cicd"), counters={"first_tries": float(i)},
                         weights=[("cicd", "w:deploy", float(i), 0.0, 0.0, 0.0, 0.0),
                                  ("cicd", f"w:{i}", 1.0, 0.0, 0.0, 0.0, 0.0)])
        with pytest.raises(sqlite3.OperationalError):
            store.record(_outcome("undone", "cicd"), counters={"first_tries": 99.0},
                         weights=[("cicd", "w:deploy", 99.0, 0.0, 0.0, 0.0, 0.0)],
                         also=[("INSERT INTO nowhere VALUES (?)", [(1,)])])
        await asyncio.sleep(0)  # the turn ends: one commit
        with sqlite3.connect(path) as other:
            counters = dict(other.execute("SELECT name, value FROM counters"))
            weights = dict(other.execute("SELECT feature, evidence FROM bandit_weights"))
        assert counters == {"first_tries": 19.0}
        assert weights["w:deploy"] == 19.0 and len(weights) == 21
    finally:
        store.close()


async def test_a_turns_outcome_rows_go_in_at_its_end_in_order_and_the_prune_keeps_the_newest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patterns, "PRUNE_EVERY", 7)
    path = tmp_path / "learning.sqlite3"
    store = PatternStore(path, half_life_s=DAY, max_outcomes=10)
    try:
        for i in range(25):  # prunes after the 7th, 14th and 21st, all within the turn
            store.record(_outcome(f"deploy service{i}", "cicd", at=NOW + i))
        await asyncio.sleep(0)
        with sqlite3.connect(path) as other:
            kept = [row[0] for row in other.execute(
                "SELECT keywords FROM outcomes ORDER BY id")]
        # Each prune kept the newest ten then; the last four came after the last prune.
        assert kept == [signature(["deploy", f"service{i}"]) for i in range(11, 25)]
    finally:
        store.close()


async def test_the_neighbours_are_forgotten_once_per_turn_up_to_its_last_point(
        tmp_path: Path) -> None:
    """One delete at the turn's end leaves what a delete per outcome left: the point only
    moves forward."""
    path = tmp_path / "learning.sqlite3"
    store = PatternStore(path, half_life_s=DAY)
    try:
        for seq, forget in ((1, None), (2, None), (3, 0), (4, 1), (5, 3), (6, 4)):
            row = (seq, "deploy api", "cicd", 1, 0.5, 1.0)
            store.record(_outcome("deploy api", "cicd"), neighbours=[row],
                         forget_neighbours=forget)
        with pytest.raises(sqlite3.OperationalError):  # undone: its row is not written
            store.record(_outcome("undone", "cicd"), neighbours=[(7, "x", "cicd", 1, 0.5, 1.0)],
                         also=[("INSERT INTO nowhere VALUES (?)", [(1,)])], forget_neighbours=5)
        assert not store.neighbours(100), "written when the turn commits"
        await asyncio.sleep(0)
        assert [row[0] for row in store.neighbours(100)] == [5, 6]
        # Stored apart (a logged outcome learned), after the turn's rows: in order.
        store.record(_outcome("deploy api", "cicd"), neighbours=[(8, "a", "cicd", 1, 0.5, 1.0)])
        store.save_neighbours([(9, "b", "cicd", 0, 0.5, 1.0)], 5)
        await asyncio.sleep(0)
        assert [row[0] for row in store.neighbours(100)] == [6, 8, 9]
    finally:
        store.close()


async def test_an_outcome_of_one_statement_is_undone_alone_without_a_savepoint(
        tmp_path: Path) -> None:
    """A single statement of one row goes without a savepoint: when it fails part way, SQLite
    undoes all of it, and the turn's other outcomes stay."""
    path = tmp_path / "learning.sqlite3"
    store = PatternStore(path, half_life_s=DAY)
    try:
        store.db.execute("CREATE TABLE t (v INTEGER CHECK (v < 3))")
        store.db.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
        store.record(_outcome("deploy api", "cicd"), also=[("INSERT INTO t VALUES (?)", [(0,)])])
        with pytest.raises(sqlite3.IntegrityError):  # 1 -> 2 done, then 2 -> 3 refused
            store.record(_outcome("undone", "cicd"), also=[("UPDATE t SET v = v + 1", [()])],
                         neighbours=[(1, "x", "cicd", 1, 0.5, 1.0)])
        store.record(_outcome("deploy web", "cicd"), also=[("INSERT INTO t VALUES (?)", [(2,)])])
        await asyncio.sleep(0)
        with sqlite3.connect(path) as other:
            values = sorted(v for (v,) in other.execute("SELECT v FROM t"))
        assert values == [0, 1, 2, 2]
        assert _stored(path) == 2 and not store.neighbours(10)
    finally:
        store.close()


def test_without_a_running_loop_each_outcome_commits_at_once(tmp_path: Path) -> None:
    path = tmp_path / "learning.sqlite3"
    store = PatternStore(path, half_life_s=DAY)
    try:
        store.record(_outcome("deploy api", "cicd"))
        assert _stored(path) == 1
    finally:
        store.close()
