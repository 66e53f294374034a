"""Shared fixtures for the pure unit tests (no broker, no network)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.settings import Liveness


@pytest.fixture
def liveness() -> Liveness:
    return Liveness(heartbeat_interval_s=2.0, suspect_after=2.5, dead_after=5.0)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "tasks.sqlite3"


@pytest.fixture
def store(store_path: Path) -> Iterator[TaskStore]:
    task_store = TaskStore(store_path)
    yield task_store
    task_store.close()


@pytest.fixture
def state(store: TaskStore, liveness: Liveness) -> StateManager:
    return StateManager(store, liveness)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No COORDINATOR_* variables and an empty working directory (no config/coordinator.yaml)."""
    for name in list(os.environ):
        if name.startswith("COORDINATOR_"):
            monkeypatch.delenv(name)
    # The CLI sets COORDINATOR_CONFIG for the processes it starts (--config): recorded here so
    # that it is gone again after the test, not left to the tests that follow.
    monkeypatch.setenv("COORDINATOR_CONFIG", "")
    monkeypatch.delenv("COORDINATOR_CONFIG")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir
