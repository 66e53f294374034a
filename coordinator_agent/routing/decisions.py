"""DecisionLog: every routing decision with its propensity, and later its outcome.

A row says what the router saw (the description, the kinds it could choose from, what it
believed about each), what it chose, with which probability the policy would choose it (the
*propensity*), and, once the attempt ends, whether it succeeded. That is what off-policy
evaluation needs (``replay.py``): how another policy or threshold would have done, estimated from
this log alone.

Rows are buffered in memory and written in the transaction of the next outcome, at the next
metrics scrape, on close, or when ``MAX_PENDING`` wait; so a decision costs no disk write, and a
crash loses only decisions whose attempts had not ended.
The table lives in the learning store's SQLite file and is pruned like the outcomes.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator_agent.routing.patterns import PatternStore, Statements

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    policy TEXT NOT NULL,           -- seed | bandit
    reason TEXT NOT NULL,           -- greedy, explore, fallback, explicit_kind, fallback_chain...
    description TEXT NOT NULL,
    candidates TEXT NOT NULL,       -- JSON {kind: {"prior": P(kind|text), "p": success, "sd"}}
    kind TEXT NOT NULL,
    propensity REAL NOT NULL,
    confidence REAL NOT NULL,
    outcome INTEGER,                -- 1 success, 0 failure, NULL not known yet
    ended_at REAL,
    labels TEXT NOT NULL DEFAULT '' -- the task's labels, space-separated (none contain a space)
);
CREATE INDEX IF NOT EXISTS decisions_task ON decisions (task_id, attempt);
"""
_INSERT = ("INSERT INTO decisions (task_id, attempt, at, policy, reason, description, candidates,"
           " kind, propensity, confidence, labels) VALUES (?,?,?,?,?,?,?,?,?,?,?)")
_OUTCOME = ("UPDATE decisions SET outcome = ?, ended_at = ? WHERE task_id = ? AND attempt = ?"
            " AND outcome IS NULL")
_SELECT_ALL = ("SELECT id, task_id, attempt, at, policy, reason, description, candidates, kind, "
               "propensity, confidence, outcome, labels FROM decisions ORDER BY id")
_SELECT_KNOWN = _SELECT_ALL.replace("ORDER BY", "WHERE outcome IS NOT NULL ORDER BY")
#: Buffered decisions are written by ``add`` itself only once this many wait (a burst of
#: decisions with no outcome and no scrape in between); otherwise outcomes and scrapes do it.
MAX_PENDING = 2048
#: The log is pruned to ``max_rows`` every this many outcomes.
PRUNE_EVERY = 1024
#: ``json.dumps(..., separators=(",", ":"))`` without building an encoder per row.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


Candidate = tuple[str, float | None, float, float | None]


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    id: int
    task_id: str
    attempt: int
    at: float
    policy: str
    reason: str
    description: str
    candidates: dict[str, dict[str, float]]
    kind: str
    propensity: float
    confidence: float
    outcome: bool | None
    labels: tuple[str, ...] = ()


class DecisionLog:
    def __init__(self, store: PatternStore, *, max_rows: int) -> None:
        self._db: sqlite3.Connection = store.db
        self._db.executescript(_SCHEMA)
        if not _has_labels(self._db):
            # A store written before tasks had labels: its decisions had none.
            try:
                self._db.execute(
                    "ALTER TABLE decisions ADD COLUMN labels TEXT NOT NULL DEFAULT ''")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it first
                    raise
        self.max_rows = max_rows
        self._pending: list[tuple[Any, ...]] = []
        self._since_prune = 0

    def add(self, *, task_id: str, attempt: int, at: float, policy: str, reason: str,
            description: str, candidates: Sequence[Candidate], kind: str,
            propensity: float, confidence: float, labels: Sequence[str] = ()) -> bool:
        """Buffer one decision; ``candidates`` are (kind, P(kind | text), predicted success,
        log-odds spread), None where the policy has no such thing. True when the buffer was
        full and written to the store (then, on the caller's time)."""
        self._pending.append((task_id, attempt, at, policy, reason, description, candidates,
                              kind, propensity, confidence, " ".join(labels)))
        if len(self._pending) >= MAX_PENDING:
            self.flush()
            return True
        return False

    def outcome_statements(self, task_id: str, attempt: int, success: bool,
                           at: float) -> Statements:
        """The statements that record an outcome, pending decisions first (one transaction)."""
        pending, self._pending = self._pending, []
        self._since_prune += 1
        statements: list[tuple[str, Sequence[Sequence[object]]]] = []
        if pending:
            statements.append((_INSERT, [_row(p) for p in pending]))
        statements.append((_OUTCOME, [(int(success), at, task_id, attempt)]))
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            statements.append((
                "DELETE FROM decisions WHERE id <= (SELECT MAX(id) FROM decisions) - ?",
                [(self.max_rows,)]))
        return statements

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._db.executemany(_INSERT, [_row(p) for p in pending])

    def __len__(self) -> int:
        count: int = self._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
        return count + len(self._pending)


def _row(pending: tuple[Any, ...]) -> tuple[object, ...]:
    candidates: dict[str, dict[str, float]] = {}
    for kind, prior, p, sd in pending[6]:
        entry = {"p": round(p, 6)}
        if prior is not None:
            entry["prior"] = round(prior, 6)
        if sd is not None:
            entry["sd"] = round(sd, 6)
        candidates[kind] = entry
    return (*pending[:6], _COMPACT.encode(candidates), *pending[7:])


def _has_labels(db: sqlite3.Connection) -> bool:
    return any(row[1] == "labels" for row in db.execute("PRAGMA table_info(decisions)"))


class CorruptDecision(ValueError):
    """A row of the decision log that the log cannot have written (the file was edited or
    damaged): reading it on would turn it into nonsense estimates or a crash."""

    def __init__(self, row_id: object, problem: str) -> None:
        super().__init__(f"row {row_id} of the decision log is corrupted: {problem}")


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _checked(row: Sequence[Any]) -> dict[str, dict[str, float]]:
    """The row's candidates, once every column holds what ``DecisionLog`` writes."""
    try:
        candidates: Any = json.loads(row[7])
    except (TypeError, ValueError):
        raise CorruptDecision(row[0], "its candidates are not JSON") from None
    if not isinstance(candidates, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in candidates.items()):
        raise CorruptDecision(row[0], "its candidates are not a JSON object of kinds")
    if not all(isinstance(row[i], str) for i in (1, 4, 5, 6, 8)):
        raise CorruptDecision(row[0], "its task id, policy, reason, description or kind is "
                                      "not text")
    if not isinstance(row[2], int) or not _real(row[3]):
        raise CorruptDecision(row[0], "its attempt or its time (at) is not a number")
    if not _real(row[9]) or not 0.0 < row[9] <= 1.0:
        raise CorruptDecision(row[0], f"its propensity {row[9]!r} is not a probability in "
                                      "(0, 1]")
    if not _real(row[10]) or row[11] not in (None, 0, 1):
        raise CorruptDecision(row[0], "its confidence or its outcome is not what the log "
                                      "writes")
    if not isinstance(row[12], str):
        raise CorruptDecision(row[0], "its labels are not text")
    return candidates


def read_log(db: sqlite3.Connection, *, with_outcome: bool = True) -> Iterator[LoggedDecision]:
    """Logged decisions in order; by default only those whose outcome is known.

    Raises ``CorruptDecision`` at a row that the log cannot have written."""
    query = _SELECT_KNOWN if with_outcome else _SELECT_ALL
    if not _has_labels(db):  # a store from before labels, opened read-only (replay)
        query = query.replace(", labels FROM", ", '' FROM")
    rows = db.execute(query)
    for row in rows:
        candidates = _checked(row)
        yield LoggedDecision(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                             candidates, row[8], row[9], row[10],
                             None if row[11] is None else bool(row[11]), tuple(row[12].split()))
