"""TaskStore: SQLite persistence of task records and of the open set."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord, TaskStatus
from coordinator_agent.exceptions import StoreUnavailable


def _task(task_id: str, status: TaskStatus = TaskStatus.PENDING, *, notified: bool = False,
          updated_at: float = 1.0) -> TaskRecord:
    task = TaskRecord(id=task_id, description=f"task {task_id}", kind="development",
                      required_capabilities=["python"], input={"n": 1}, notified=notified)
    task.status = status
    task.updated_at = updated_at
    return task


def test_save_and_get(store: TaskStore) -> None:
    task = _task("t-1", TaskStatus.ASSIGNED)
    task.attempts.append(Attempt(1, "a1", 10.0, 70.0))
    store.save(task)
    loaded = store.get("t-1")
    assert loaded == task
    assert loaded is not task
    assert loaded.attempts[0].outcome is AttemptOutcome.RUNNING
    assert store.get("missing") is None


def test_save_replaces(store: TaskStore) -> None:
    task = _task("t-1")
    store.save(task)
    task.status = TaskStatus.RUNNING
    task.progress = 0.5
    store.save(task)
    loaded = store.get("t-1")
    assert loaded is not None
    assert loaded.status is TaskStatus.RUNNING
    assert loaded.progress == 0.5
    assert store.counts() == {"running": 1}


def test_open_tasks(store: TaskStore) -> None:
    store.save(_task("pending", TaskStatus.PENDING, updated_at=3.0))
    store.save(_task("assigned", TaskStatus.ASSIGNED, updated_at=1.0))
    store.save(_task("running", TaskStatus.RUNNING, updated_at=2.0))
    store.save(_task("succeeded-unnotified", TaskStatus.SUCCEEDED, updated_at=4.0))
    store.save(_task("failed-unnotified", TaskStatus.FAILED, updated_at=5.0))
    store.save(_task("succeeded-notified", TaskStatus.SUCCEEDED, notified=True))
    store.save(_task("failed-notified", TaskStatus.FAILED, notified=True))
    store.save(_task("cancelled-notified", TaskStatus.CANCELLED, notified=True))
    # "notified" only matters once a task is terminal.
    store.save(_task("pending-notified", TaskStatus.PENDING, notified=True, updated_at=6.0))

    open_ids = [t.id for t in store.open_tasks()]
    # Ordered oldest change first.
    assert open_ids == ["assigned", "running", "pending", "succeeded-unnotified",
                        "failed-unnotified", "pending-notified"]


def test_task_leaves_open_set_once_notified(store: TaskStore) -> None:
    task = _task("t-1")
    store.save(task)
    assert [t.id for t in store.open_tasks()] == ["t-1"]
    task.status = TaskStatus.SUCCEEDED
    store.save(task)
    assert [t.id for t in store.open_tasks()] == ["t-1"]
    task.notified = True
    store.save(task)
    assert list(store.open_tasks()) == []
    assert store.get("t-1") == task


def test_recent_and_counts(store: TaskStore) -> None:
    for i, status in enumerate([TaskStatus.PENDING, TaskStatus.SUCCEEDED, TaskStatus.SUCCEEDED,
                                TaskStatus.FAILED]):
        store.save(_task(f"t-{i}", status, updated_at=float(i)))
    assert [t.id for t in store.recent(2)] == ["t-3", "t-2"]
    assert len(store.recent(100)) == 4
    assert store.counts() == {"pending": 1, "succeeded": 2, "failed": 1}


def test_survives_reopening(store_path: Path) -> None:
    first = TaskStore(store_path)
    open_task = _task("open", TaskStatus.RUNNING, updated_at=2.0)
    open_task.attempts.append(Attempt(1, "a1", 1.0, 61.0))
    done = _task("done", TaskStatus.SUCCEEDED, notified=True)
    done.output = {"words": 3}
    try:
        first.save(open_task)
        first.save(done)
    finally:
        first.close()
    assert store_path.exists()

    second = TaskStore(store_path)
    try:
        assert second.get("open") == open_task
        assert second.get("done") == done
        assert [t.id for t in second.open_tasks()] == ["open"]
        # And it keeps working after the reopen.
        done_too = second.get("open")
        assert done_too is not None
        done_too.status = TaskStatus.CANCELLED
        done_too.notified = True
        second.save(done_too)
        assert list(second.open_tasks()) == []
    finally:
        second.close()


def test_creates_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "tasks.sqlite3"
    store = TaskStore(path)
    try:
        store.save(_task("t"))
    finally:
        store.close()
    assert path.exists()
    assert os.path.getsize(path) > 0 or (path.parent / "tasks.sqlite3-wal").exists()


def test_in_memory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = TaskStore(":memory:")
    try:
        store.save(_task("t"))
        assert store.get("t") is not None
    finally:
        store.close()
    assert list(tmp_path.iterdir()) == []


# --- group commit: one transaction per event-loop turn ------------------------------------------


def _on_disk(path: Path) -> set[str]:
    """What another process would read from the file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT id FROM tasks")}
    finally:
        db.close()


async def test_a_turns_writes_are_one_transaction_committed_at_its_end(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "tasks.sqlite3")
    for i in range(5):
        store.save(_task(f"t-{i}"))
    assert _on_disk(store.path) == set()  # not yet: the turn is not over
    assert store.get("t-3") is not None  # this connection reads its own open transaction
    await store.committed()
    assert _on_disk(store.path) == {f"t-{i}" for i in range(5)}
    assert store.commits == 1
    await store.committed()  # nothing open: returns at once
    store.close()


async def test_a_refused_write_leaves_the_turns_other_writes_to_commit(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "tasks.sqlite3")
    store.save(_task("kept"))
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL, as on a full disk
    big = _task("refused")
    big.input = {"blob": "x" * 20_000}
    with pytest.raises(StoreUnavailable):
        store.save(big)
    store._db.execute("PRAGMA max_page_count = 1073741823")
    await store.committed()
    assert _on_disk(store.path) == {"kept"}
    assert store.get("refused") is None
    store.close()


async def test_close_commits_what_the_turn_wrote(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "tasks.sqlite3")
    store.save(_task("last"))
    store.close()  # a graceful stop within the same turn
    assert _on_disk(tmp_path / "tasks.sqlite3") == {"last"}


def test_outside_a_loop_every_write_commits_at_once(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "tasks.sqlite3")
    store.save(_task("now"))
    assert _on_disk(store.path) == {"now"}
    store.close()
