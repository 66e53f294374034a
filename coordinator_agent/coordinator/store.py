"""Durable task store (SQLite, WAL). A task is written before the message that created or
changed it is acknowledged, so a coordinator killed with SIGKILL loses nothing it accepted.

Group commit: inside a running event loop, the writes of one loop turn share one transaction,
committed by a callback at the end of that turn (``call_soon``: no timer, so an idle store
adds one loop turn, not a delay). Whatever must not happen before a write is durable (the ack
of the message that caused it, a notice, an assignment, an HTTP 2xx) awaits ``committed()``.
Outside a loop every write commits at once.

A write that fails raises ``StoreUnavailable`` (the disk, retry later) or ``UnstorableTask`` (the
task itself, never retry); ``healthy`` turns False until ``probe`` manages a write again. A
commit that fails keeps its rows and writes them first in the next transaction (``probe``
too), and ``committed()`` raises ``StoreUnavailable`` until they are on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from coordinator_agent.coordinator.tasks import TERMINAL, TaskRecord
from coordinator_agent.exceptions import StoreUnavailable, UnstorableTask

_TERMINAL_VALUES = frozenset(status.value for status in TERMINAL)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    open INTEGER NOT NULL,          -- not terminal, or terminal but not yet notified
    updated_at REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(open) WHERE open = 1;
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL NOT NULL, pad BLOB);
-- HA: the replicated log's offset applied so far, kept in the same transaction as the state.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# An update in place: REPLACE would delete the row and insert it again (a new rowid, every
# index entry twice), about a quarter more of the store's CPU per write.
_UPSERT = ("INSERT INTO tasks (id, status, open, updated_at, data) VALUES (?,?,?,?,?) "
           "ON CONFLICT(id) DO UPDATE SET status = excluded.status, open = excluded.open, "
           "updated_at = excluded.updated_at, data = excluded.data")

Row = tuple[str, str, int, float, bytes]


class TaskStore:
    def __init__(self, path: Path | str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = self._connect()
        #: False after a failed write, until ``probe`` succeeds.
        self.healthy = True
        self.write_errors = 0
        #: HA (``replicate``): where a write goes instead of the file, returning its event id.
        self._log: Callable[[TaskRecord, bytes], str] | None = None
        #: HA: this leader's writes its own log reader has not applied yet, by task id:
        #: (event id, record). Reads see them first; the file only ever holds a log prefix.
        self._pending: dict[str, tuple[str, bytes]] = {}
        self._standby = False
        #: Group commit: the rows of the open transaction (by task id), and what its commit
        #: resolves; None while no transaction is open.
        self._group: dict[str, Row] = {}
        self._commit: asyncio.Future[None] | None = None
        #: Rows of a transaction whose commit failed: written first by the next one.
        self._unwritten: dict[str, Row] = {}
        self._broken = False  # the open transaction lost rows: its commit must fail
        self.commits = 0

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        # WAL + synchronous=NORMAL survives a process crash (not a power cut) at ~20 us a write.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def reopen(self) -> None:
        """Open the file again: HA, after a snapshot was restored over it (``ha/restore.py``)."""
        self.flush()
        self._db.close()
        self._db = self._connect()

    def replicate(self, log: Callable[[TaskRecord, bytes], str] | None) -> None:
        """HA: writes go to the log (``log``), the file is written by applying it. None: as a
        standby, no writes at all. Either way, writes not applied yet are forgotten."""
        self._log = log
        self._standby = log is None
        self._pending.clear()

    def save(self, task: TaskRecord) -> None:
        try:
            # orjson serialises the dataclass directly: 20x cheaper than dataclasses.asdict.
            data = orjson.dumps(task)
        except (orjson.JSONEncodeError, TypeError) as exc:
            raise UnstorableTask(task.id, f"cannot be stored: {exc}") from None
        if self._log is not None:
            self._pending[task.id] = (self._log(task, data), data)
            return
        if self._standby:
            raise StoreUnavailable(task.id, "a standby's store is written from the log only")
        self._write(task_row(task, data))

    def _write(self, row: Row) -> None:
        """Write ``row`` into this turn's transaction (opening it), or at once outside a loop.
        The statement runs now, so a full disk or a capped file refuses the write here."""
        try:
            grouped = self._open_group()
            if not grouped and self._unwritten:
                self._write_unwritten()
            self._db.execute(_UPSERT, row)
        except sqlite3.Error as exc:
            self.healthy = False
            self.write_errors += 1
            if self._commit is not None and not self._db.in_transaction:
                # SQLite may roll back the whole transaction on SQLITE_FULL or an I/O error:
                # the turn's earlier rows are written again, or kept for the next commit.
                self._rewrite_group()
            raise StoreUnavailable(row[0], f"task store write failed: {exc}") from None
        if grouped:
            self._group[row[0]] = row

    def _open_group(self) -> bool:
        """True inside a running loop, with this turn's transaction open."""
        if self._commit is not None:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._db.execute("BEGIN")
        self._commit = loop.create_future()
        loop.call_soon(self._end_group)  # at the end of this turn
        if self._unwritten:
            self._group.update(self._unwritten)
            self._unwritten = {}
            self._rewrite_group()
        return True

    def _rewrite_group(self) -> None:
        """The open group's rows again, in a transaction of their own if SQLite dropped it."""
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN")
            self._db.executemany(_UPSERT, list(self._group.values()))
        except sqlite3.Error:
            # Some may be in, some not: the commit fails and keeps them all (``_end_group``).
            self.healthy = False
            self._broken = True

    def _write_unwritten(self) -> None:
        """Outside a loop: rows of a failed commit go in before anything newer."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_UPSERT, list(self._unwritten.values()))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._unwritten = {}

    def _end_group(self) -> None:
        """Commit this turn's writes; on failure keep them for the next transaction."""
        commit, self._commit = self._commit, None
        group, self._group = self._group, {}
        if commit is None:
            return
        try:
            broken, self._broken = self._broken, False
            if broken or not self._db.in_transaction:
                raise sqlite3.OperationalError("the transaction was rolled back")
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            self.healthy = False
            self.write_errors += 1
            self._unwritten.update(group)
            if not commit.done():
                commit.set_exception(StoreUnavailable(
                    "commit", f"task store commit of {len(group)} writes failed: {exc}"))
                commit.exception()  # waiters see it; none waiting is fine too
            return
        self.commits += 1
        if not commit.done():
            commit.set_result(None)

    def flush(self) -> None:
        """Commit the open transaction now (before reading the file elsewhere, or closing)."""
        if self._commit is not None:
            self._end_group()

    async def committed(self) -> None:
        """Until every write so far is on disk; raises ``StoreUnavailable`` when a commit failed
        and its rows are not written yet (``probe`` retries them)."""
        commit = self._commit
        if commit is not None:
            await asyncio.shield(commit)  # raises the commit's failure
        elif self._unwritten:
            raise StoreUnavailable("commit", f"{len(self._unwritten)} task writes are not on "
                                   "disk yet")

    def apply_log(self, rows: list[tuple[str, dict[str, Any] | Row]], offset: int,
                  fence_epoch: int) -> None:
        """Apply one log entry's task records ``(event id, record or row)`` and its offset in
        one transaction (HA). A row is what ``task_row`` made of the leader's own write."""
        self.flush()
        ready = [(event_id, r if isinstance(r, tuple) else record_row(r)) for event_id, r in rows]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # A task written twice in one batch (accepted, then assigned): its last record.
                latest = {row[0]: row for _, row in ready}
                self._db.executemany(_UPSERT, list(latest.values()))
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [("log_offset", str(offset)), ("fence_epoch", str(fence_epoch))])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.healthy = False
            self.write_errors += 1
            raise StoreUnavailable(f"log@{offset}", f"task store write failed: {exc}") from None
        for event_id, row in ready:  # our own writes, now in the file
            pending = self._pending.get(row[0])
            if pending is not None and pending[0] == event_id:
                del self._pending[row[0]]

    @property
    def unapplied(self) -> int:
        """HA: this leader's writes not yet back from the log into the file."""
        return len(self._pending)

    def log_offset(self) -> int | None:
        """The last log offset applied to this store (None: none yet)."""
        value = self.meta("log_offset")
        return None if value is None else int(value)

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def probe(self) -> bool:
        """Try a small write (the size of a typical task); sets and returns ``healthy``."""
        self.flush()
        try:
            if self._unwritten:  # a failed commit's rows first: then their messages are acked
                self._write_unwritten()
            # A new row, so the write needs free space as a new task would; then gone again.
            self._db.execute("INSERT INTO probe (at, pad) VALUES (?, ?)",
                             (time.time(), bytes(4096)))
            self._db.execute("DELETE FROM probe")
        except sqlite3.Error:
            self.healthy = False
        else:
            self.healthy = True
        return self.healthy

    def shrink_memory(self) -> None:
        """Give back SQLite's page cache (after a flood; it refills as needed)."""
        self._db.execute("PRAGMA shrink_memory")

    def get(self, task_id: str) -> TaskRecord | None:
        pending = self._pending.get(task_id)
        if pending is not None:
            return TaskRecord.from_dict(orjson.loads(pending[1]))
        unwritten = self._unwritten.get(task_id)
        if unwritten is not None:  # what the store will hold once the disk takes it
            return TaskRecord.from_dict(orjson.loads(unwritten[4]))
        row = self._db.execute("SELECT data FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return TaskRecord.from_dict(orjson.loads(row[0])) if row else None

    def open_tasks(self) -> Iterator[TaskRecord]:
        """Tasks a restarted coordinator must carry on with."""
        for (data,) in self._db.execute(
            "SELECT data FROM tasks WHERE open = 1 ORDER BY updated_at"
        ):
            yield TaskRecord.from_dict(orjson.loads(data))

    def recent(self, limit: int) -> list[TaskRecord]:
        rows = self._db.execute(
            "SELECT data FROM tasks ORDER BY updated_at DESC LIMIT ?", (limit,)
        ).fetchall()
        return [TaskRecord.from_dict(orjson.loads(r[0])) for r in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status"))

    def close(self) -> None:
        self.flush()
        self._db.close()


def task_row(task: TaskRecord, data: bytes) -> Row:
    """The row ``save`` writes for ``task``, serialised as ``data``."""
    is_open = int(task.status not in TERMINAL or not task.notified)
    return (task.id, task.status.value, is_open, task.updated_at, data)


def record_row(data: dict[str, Any]) -> Row:
    """A task record from the log as a row (the same columns ``save`` writes)."""
    status = str(data["status"])
    is_open = int(status not in _TERMINAL_VALUES or not data.get("notified"))
    return (str(data["id"]), status, is_open, float(data["updated_at"]), orjson.dumps(data))
