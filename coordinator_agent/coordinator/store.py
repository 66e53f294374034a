"""Durable task store (SQLite, WAL). A task is written before the message that created or
changed it is acknowledged, so a coordinator killed with SIGKILL loses nothing it accepted.

A write that fails raises ``StoreUnavailable`` (the disk, retry later) or ``UnstorableTask`` (the
task itself, never retry); ``healthy`` turns False until ``probe`` manages a write again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from coordinator_agent.coordinator.tasks import TERMINAL, TaskRecord
from coordinator_agent.exceptions import StoreUnavailable, UnstorableTask

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
-- 'log_offset': the replicated log's last applied offset, written with the state it produced.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class TaskStore:
    def __init__(self, path: Path | str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        # WAL + synchronous=NORMAL survives a process crash (not a power cut) at ~20 us a write.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        #: False after a failed write, until ``probe`` succeeds.
        self.healthy = True
        self.write_errors = 0

    def save(self, task: TaskRecord) -> None:
        is_open = int(task.status not in TERMINAL or not task.notified)
        try:
            # orjson serialises the dataclass directly: 20x cheaper than dataclasses.asdict.
            data = orjson.dumps(task)
        except (orjson.JSONEncodeError, TypeError) as exc:
            raise UnstorableTask(task.id, f"cannot be stored: {exc}") from None
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO tasks (id, status, open, updated_at, data) "
                "VALUES (?,?,?,?,?)",
                (task.id, task.status.value, is_open, task.updated_at, data),
            )
        except sqlite3.Error as exc:
            self.healthy = False
            self.write_errors += 1
            raise StoreUnavailable(task.id, f"task store write failed: {exc}") from None

    def probe(self) -> bool:
        """Try a small write (the size of a typical task); sets and returns ``healthy``."""
        try:
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

    def log_offset(self) -> int | None:
        """The last log offset applied into this store; None for a store never fed by the log."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'log_offset'").fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        self._db.close()
