"""PatternStore: every routing outcome, persisted in SQLite and indexed in memory.

A decision must not scan past outcomes, so the store keeps *aggregates* in memory, rebuilt from
the ``outcomes`` table when it opens: per (keyword, kind), per (exact keyword set, kind) and per
kind, each a time-decayed count of outcomes and of their value (success x quality).

Similarity of a past outcome P to a task's keywords Q is 1 when P and Q are the same set and
``partial_match_weight x |P & Q| / |Q|`` otherwise. Summed over outcomes, that is exactly
``(1 - partial) x exact(Q) + partial / |Q| x sum over k in Q of per_keyword(k)``, so the
similarity-weighted evidence for a kind costs |Q| + 1 dictionary lookups, however many outcomes
are stored.

Time decay uses one reference time ``t0``: an outcome at time t is added with weight
``2 ** ((t - t0) / half_life)``, and every total is read multiplied by
``2 ** ((t0 - now) / half_life)``. Adding is O(1) and reading costs one power per decision;
``t0`` moves forward (all aggregates rescaled) before weights grow too large for a float.

Writes are grouped per event-loop turn: each outcome's statements go in a savepoint of a
transaction that commits once, at the end of the turn (``call_soon``, no timer), with the other
outcomes of that turn; a burst of results costs one commit, not one each. The counters and the
bandit weights the turn's outcomes changed are written once, at that commit, as they stand
then; so are the turn's outcome rows (one ``executemany``, in order: the table only ever takes
them and the prune), the neighbours' new rows (in order too, each keyed by its own sequence
number) and their forgetting (one delete up to the last point, which only moves forward, after
them). An outcome's rows are taken for the commit only once its own statements went through, so
an outcome whose statements fail is still undone alone; an outcome with a single statement of
one row needs no savepoint for that (SQLite undoes a failed statement by itself). Without a
running loop each outcome commits at once. A crash loses at most the last turn's learning, which
is advisory.

The store's connection keeps its temporary files in memory (``temp_store``): the statement
journal of an outcome's savepoint holds the pages it changes, scattered ones when task ids are
random, and spilling it to a file cost more than the statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    category TEXT NOT NULL,
    complexity TEXT NOT NULL,
    keywords TEXT NOT NULL,         -- sorted, space-separated: also the exact-match signature
    success INTEGER NOT NULL,
    quality REAL NOT NULL,
    duration_s REAL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bandit_weights (  -- BanditModel's state (bandit.py)
    kind TEXT NOT NULL,
    feature TEXT NOT NULL,
    evidence REAL NOT NULL,         -- precision beyond the prior's, x 2**((t - ref) / half-life)
    information REAL NOT NULL,      -- precision x mean, scaled the same way
    successes REAL NOT NULL,        -- decayed outcomes behind the weight, scaled the same way
    failures REAL NOT NULL,
    ref REAL NOT NULL,              -- the reference time of the scaling
    PRIMARY KEY (kind, feature)
);
CREATE TABLE IF NOT EXISTS routing_clusters (  -- DescriptionClusters' state (clusters.py)
    id INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,              -- the coarse group it is nested in
    members REAL NOT NULL,
    norm REAL NOT NULL,             -- the centroid's weighted length when it last changed
    centroid TEXT NOT NULL          -- "word count word count ..."
);
CREATE TABLE IF NOT EXISTS routing_neighbours (  -- NeighbourEvidence's memory (neighbours.py)
    seq INTEGER PRIMARY KEY,
    keywords TEXT NOT NULL,         -- space-separated, as learned
    kind TEXT NOT NULL,
    success INTEGER NOT NULL,
    predicted REAL NOT NULL,        -- the model's probability for kind, before learning it
    norm REAL NOT NULL              -- the length of its idf-weighted words when it was added
);
"""
UPSERT_CLUSTER = (
    "INSERT INTO routing_clusters (id, grp, members, norm, centroid) VALUES (?,?,?,?,?) "
    "ON CONFLICT(id) DO UPDATE SET grp = excluded.grp, members = excluded.members, "
    "norm = excluded.norm, centroid = excluded.centroid"
)
INSERT_NEIGHBOUR = (
    "INSERT OR REPLACE INTO routing_neighbours (seq, keywords, kind, success, predicted, norm) "
    "VALUES (?,?,?,?,?,?)"
)
#: Forget what the neighbours' memory no longer holds: the rows up to this sequence number.
FORGET_NEIGHBOURS = "DELETE FROM routing_neighbours WHERE seq <= ?"
_UPSERT_WEIGHT = (
    "INSERT INTO bandit_weights (kind, feature, evidence, information, successes, failures, ref)"
    " VALUES (?,?,?,?,?,?,?) ON CONFLICT(kind, feature) DO UPDATE SET "
    "evidence = excluded.evidence, information = excluded.information, "
    "successes = excluded.successes, failures = excluded.failures, ref = excluded.ref"
)
#: More statements to run in the transaction of an outcome: (SQL, rows for executemany).
Statements = Sequence[tuple[str, Sequence[Sequence[object]]]]
_INSERT = (
    "INSERT INTO outcomes (at, kind, agent_id, category, complexity, keywords, success, quality,"
    " duration_s) VALUES (?,?,?,?,?,?,?,?,?)"
)
#: Rescale the aggregates once the newest weight reaches 2**REBASE_EXPONENT.
REBASE_EXPONENT = 64.0
PRUNE_EVERY = 1000


def signature(keywords: Iterable[str]) -> str:
    """The exact-match key of a keyword set."""
    return " ".join(sorted(set(keywords)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished attempt: which kind (and agent) did what kind of task, and how it went."""

    keywords: tuple[str, ...]
    kind: str
    success: bool
    agent_id: str = ""
    category: str = "general"
    complexity: str = "medium"
    #: How good a success was, in [0, 1]; a failure is worth 0 whatever its quality.
    quality: float = 1.0
    duration_s: float | None = None
    at: float = field(default_factory=time.time)

    @property
    def value(self) -> float:
        return min(1.0, max(0.0, self.quality)) if self.success else 0.0


@dataclass(frozen=True, slots=True)
class Evidence:
    """Similarity- and decay-weighted outcomes of one kind for one set of keywords."""

    weight: float  # sum of similarity x decay over matching outcomes
    value: float  # the same, times each outcome's value
    exact: float  # decay-weighted outcomes with exactly these keywords

    def pattern(self, prior_weight: float) -> float:
        """Centred success in (-1, 1): neutral (0) without evidence, towards +1 with successes
        and towards -1 with failures; ``prior_weight`` neutral pseudo-outcomes damp small
        samples."""
        return (2.0 * self.value - self.weight) / (self.weight + prior_weight)

    @property
    def success_rate(self) -> float | None:
        return self.value / self.weight if self.weight > 0 else None


@dataclass(frozen=True, slots=True)
class KindSummary:
    outcomes: float  # decay-weighted
    success_rate: float
    mean_duration_s: float | None


#: (decayed outcomes, decayed value). Tuples of floats, not objects: the garbage collector
#: stops tracking them (and dicts holding only them), so a few hundred thousand aggregates do
#: not lengthen every full collection.
_Stat = tuple[float, float]
#: (outcomes, value, outcomes with a duration, sum of their durations), all decayed.
_KindStat = tuple[float, float, float, float]


class PatternStore:
    """Outcomes in SQLite (``path=None``: in memory), aggregates in dictionaries."""

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        half_life_s: float = 7 * 86_400.0,
        partial_match_weight: float = 0.5,
        max_outcomes: int = 500_000,
    ) -> None:
        self.path = path
        self.half_life_s = half_life_s
        self.partial = partial_match_weight
        self.max_outcomes = max_outcomes
        target = ":memory:" if path is None else str(path)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA temp_store=MEMORY")  # module docstring
        self._db.executescript(_SCHEMA)
        self._t0 = 0.0  # set by the first outcome
        self._newest = 0.0
        self._by_keyword: dict[str, dict[str, _Stat]] = {}
        self._by_signature: dict[tuple[str, str], _Stat] = {}
        self._by_kind: dict[str, _KindStat] = {}
        self._count = 0
        self._since_prune = 0
        #: A transaction is open for this loop turn's outcomes (committed by ``commit``).
        self._grouping = False
        #: What the turn's outcomes left of the counters and bandit weights: only the last
        #: value of each is written, once, when the turn commits (a burst's outcomes change
        #: the same weights and every counter over and over).
        self._counters: Mapping[str, float] | None = None
        self._weights: dict[tuple[object, object], Sequence[object]] = {}
        self._rows: list[tuple[object, ...]] = []  # the turn's outcomes, for one executemany
        self._neighbours: list[Sequence[object]] = []  # the turn's new neighbours' rows, too
        self._forget: int | None = None  # the neighbours' forgetting point after the turn
        self._load()

    def __len__(self) -> int:
        return self._count

    # --- writing ------------------------------------------------------------------------------

    def record(self, outcome: Outcome, *, counters: Mapping[str, float] | None = None,
               weights: Sequence[Sequence[object]] = (), also: Statements = (),
               neighbours: Sequence[Sequence[object]] = (),
               forget_neighbours: int | None = None) -> None:
        """Persist one outcome and, all or nothing, any further statements (the decision
        log's); committed with the loop turn's other outcomes (module docstring), together
        with the planner's ``counters``, the bandit ``weights`` (rows keyed by kind and
        feature), the ``neighbours``' new rows and their memory up to ``forget_neighbours``
        forgotten, as they stand after the turn's last outcome."""
        deferred = self._begin_group()
        # One statement of one row is all or nothing by itself (module docstring).
        savepoint = len(also) > 1 or (len(also) == 1 and len(also[0][1]) > 1)
        try:
            if savepoint:
                self._db.execute("SAVEPOINT outcome")
                try:
                    for sql, rows in also:
                        self._db.executemany(sql, rows)
                except BaseException:
                    self._db.execute("ROLLBACK TO outcome")
                    self._db.execute("RELEASE outcome")
                    raise
                self._db.execute("RELEASE outcome")
            elif also:
                self._db.executemany(*also[0])
            self._rows.append(_row(outcome))
            self._neighbours.extend(neighbours)
            if counters:
                self._counters = counters
            for row in weights:
                self._weights[row[0], row[1]] = row
            if forget_neighbours is not None:
                self._forget = forget_neighbours
        finally:
            if not deferred:
                self.commit()
        self._add(_canonical(outcome.keywords), outcome.kind, outcome.value, outcome.duration_s,
                  outcome.at)
        self._count += 1
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self._prune()

    def _begin_group(self) -> bool:
        """Open this turn's transaction if none is; True when it commits at the end of the
        turn, False when there is no running loop to end it (commit at once)."""
        if self._grouping:
            return True
        self._db.execute("BEGIN")
        self._grouping = True
        try:
            asyncio.get_running_loop().call_soon(self.commit)
        except RuntimeError:
            return False
        return True

    def commit(self) -> None:
        """Commit the outcomes recorded since the group began (a no-op without one)."""
        if not self._grouping:
            return
        self._grouping = False
        counters, self._counters = self._counters, None
        weights, self._weights = self._weights, {}
        forget, self._forget = self._forget, None
        try:
            self._write_rows()
            self._write_neighbours()
            if forget is not None:
                self._db.execute(FORGET_NEIGHBOURS, (forget,))
            if counters:
                self._save_counters(counters)
            if weights:
                self._db.executemany(_UPSERT_WEIGHT, list(weights.values()))
            self._db.execute("COMMIT")
        except sqlite3.Error:  # the aggregates keep them; the file lost this turn's learning
            log.exception("learning store: this loop turn's outcomes were not stored")
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _write_rows(self) -> None:
        rows, self._rows = self._rows, []
        if rows:
            self._db.executemany(_INSERT, rows)

    def _write_neighbours(self) -> None:
        rows, self._neighbours = self._neighbours, []
        if rows:
            self._db.executemany(INSERT_NEIGHBOUR, rows)

    def record_many(self, outcomes: Iterable[Outcome]) -> None:
        """Bulk import in one transaction (benchmarks, migrations)."""
        batch = list(outcomes)
        self.commit()
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, [_row(o) for o in batch])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        for o in batch:
            self._add(_canonical(o.keywords), o.kind, o.value, o.duration_s, o.at)
        self._count += len(batch)
        self._prune()

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for the other tables of the learning store (decisions.py)."""
        return self._db

    def bandit_weights(self) -> list[tuple[str, str, float, float, float, float, float]]:
        return list(self._db.execute(
            "SELECT kind, feature, evidence, information, successes, failures, ref "
            "FROM bandit_weights"))

    def save_bandit_weights(self, rows: Iterable[Sequence[object]]) -> None:
        self._db.executemany(_UPSERT_WEIGHT, list(rows))

    def clusters(self) -> list[tuple[int, str, float, float, str]]:
        return list(self._db.execute(
            "SELECT id, grp, members, norm, centroid FROM routing_clusters"))

    def save_clusters(self, rows: Iterable[Sequence[object]]) -> None:
        self._db.executemany(UPSERT_CLUSTER, list(rows))

    def neighbours(self, limit: int) -> list[tuple[int, str, str, int, float, float]]:
        """The newest ``limit`` remembered attempts, oldest first."""
        rows = list(self._db.execute(
            "SELECT seq, keywords, kind, success, predicted, norm FROM routing_neighbours "
            "ORDER BY seq DESC LIMIT ?", (limit,)))
        rows.reverse()
        return rows

    def save_neighbours(self, rows: Iterable[Sequence[object]], forget: int) -> None:
        self._write_neighbours()  # the turn's so far first: in order
        self._db.executemany(INSERT_NEIGHBOUR, list(rows))
        self._db.execute(FORGET_NEIGHBOURS, (forget,))

    def counters(self) -> dict[str, float]:
        return {name: value for name, value in self._db.execute("SELECT name, value FROM counters")}

    def save_counters(self, counters: Mapping[str, float]) -> None:
        self._save_counters(counters)

    def _save_counters(self, counters: Mapping[str, float]) -> None:
        self._db.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            list(counters.items()),
        )

    def shrink_memory(self) -> None:
        """Give back SQLite's page cache (after a flood; it refills as needed)."""
        self._db.execute("PRAGMA shrink_memory")

    def close(self) -> None:
        self.commit()
        self._db.close()

    # --- reading ------------------------------------------------------------------------------

    def evidence(
        self, keywords: Sequence[str], kinds: Collection[str] | None = None, *, now: float
    ) -> dict[str, Evidence]:
        """Evidence per kind (only kinds with any) for distinct ``keywords``."""
        if not keywords:
            return {}
        share = self.partial / len(keywords)
        acc: dict[str, list[float]] = {}
        for word in keywords:
            per_kind = self._by_keyword.get(word)
            if per_kind is None:
                continue
            for kind, stat in per_kind.items():
                if kinds is not None and kind not in kinds:
                    continue
                totals = acc.get(kind)
                if totals is None:
                    acc[kind] = [stat[0] * share, stat[1] * share, 0.0]
                else:
                    totals[0] += stat[0] * share
                    totals[1] += stat[1] * share
        if not acc:
            return {}
        sig = signature(keywords)
        rest = 1.0 - self.partial
        for kind, totals in acc.items():
            exact = self._by_signature.get((sig, kind))
            if exact is not None:
                totals[0] += exact[0] * rest
                totals[1] += exact[1] * rest
                totals[2] = exact[0]
        f = self._decay(now)
        return {kind: Evidence(t[0] * f, t[1] * f, t[2] * f) for kind, t in acc.items()}

    def kinds(self, *, now: float) -> dict[str, KindSummary]:
        f = self._decay(now)
        return {
            kind: KindSummary(
                outcomes=n * f,
                success_rate=v / n if n > 0 else 0.0,
                mean_duration_s=dsum / dn if dn > 0 else None,
            )
            for kind, (n, v, dn, dsum) in self._by_kind.items()
        }

    # --- aggregates ---------------------------------------------------------------------------

    def _decay(self, now: float) -> float:
        # No outcome is fresher than now, even if the clock went back: weights stay <= 1, and
        # the exponent <= 0 can underflow to 0 but never overflow.
        now = max(now, self._newest)
        return float(2.0 ** ((self._t0 - now) / self.half_life_s))

    def _add(
        self, keywords: list[str], kind: str, value: float, duration_s: float | None, at: float
    ) -> None:
        """Add one outcome; ``keywords`` must be distinct and sorted (see ``_canonical``)."""
        if not self._by_kind:
            self._t0 = self._newest = at
        self._newest = max(self._newest, at)
        exponent = (at - self._t0) / self.half_life_s
        if exponent > REBASE_EXPONENT:
            self._rebase(at)
            exponent = 0.0
        w = float(2.0**exponent)
        wv = w * value
        by_keyword = self._by_keyword
        for word in keywords:
            per_kind = by_keyword.get(word)
            if per_kind is None:
                per_kind = by_keyword[word] = {}
            stat = per_kind.get(kind)
            per_kind[kind] = (w, wv) if stat is None else (stat[0] + w, stat[1] + wv)
        key = (" ".join(keywords), kind)
        exact = self._by_signature.get(key)
        self._by_signature[key] = (w, wv) if exact is None else (exact[0] + w, exact[1] + wv)
        dn, dsum = (w, w * duration_s) if duration_s is not None else (0.0, 0.0)
        n0, v0, dn0, dsum0 = self._by_kind.get(kind, (0.0, 0.0, 0.0, 0.0))
        self._by_kind[kind] = (n0 + w, v0 + wv, dn0 + dn, dsum0 + dsum)

    def _rebase(self, t0: float) -> None:
        k = float(2.0 ** ((self._t0 - t0) / self.half_life_s))
        self._by_keyword = {
            word: {kind: (n * k, v * k) for kind, (n, v) in per_kind.items()}
            for word, per_kind in self._by_keyword.items()
        }
        self._by_signature = {key: (n * k, v * k) for key, (n, v) in self._by_signature.items()}
        self._by_kind = {kind: (n * k, v * k, dn * k, ds * k)
                         for kind, (n, v, dn, ds) in self._by_kind.items()}
        self._t0 = t0

    def _load(self) -> None:
        rows = self._db.execute(
            "SELECT at, kind, keywords, success, quality, duration_s FROM outcomes ORDER BY id"
        )
        for at, kind, words, success, quality, duration in rows:
            value = min(1.0, max(0.0, quality)) if success else 0.0
            self._add(words.split(" ") if words else [], kind, value, duration, at)
            self._count += 1

    def _prune(self) -> None:
        # The aggregates keep what was pruned until the next open; by then it has decayed.
        self._since_prune = 0
        if self._count <= self.max_outcomes:
            return
        self._write_rows()  # the turn's rows so far first: the prune keeps the newest
        self._db.execute(
            "DELETE FROM outcomes WHERE id <= (SELECT MAX(id) FROM outcomes) - ?",
            (self.max_outcomes,),
        )
        self._count = self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]


def _canonical(keywords: Iterable[str]) -> list[str]:
    return sorted(set(keywords))


def _row(o: Outcome) -> tuple[object, ...]:
    return (o.at, o.kind, o.agent_id, o.category, o.complexity, signature(o.keywords),
            int(o.success), o.quality, o.duration_s)
