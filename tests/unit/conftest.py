"""Shared fixtures for the pure unit tests (no broker, no network)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator_agent.keyring import Keyring
from coordinator_agent.security import SecurityManager
from coordinator_agent.settings import Liveness
from coordinator_agent.state import StateManager
from coordinator_agent.store import TaskStore

COORDINATOR_ID = "coord"
AGENT_ID = "agent-1"
OTHER_AGENT_ID = "agent-2"
OPERATOR_ID = "op-1"
MAX_MESSAGE_BYTES = 64 * 1024
TTL_S = 120
REPLAY_WINDOW_S = 180


@pytest.fixture
def keyring() -> Keyring:
    ring = Keyring()
    ring.generate(AGENT_ID, "agent")
    ring.generate(OTHER_AGENT_ID, "agent")
    ring.generate(OPERATOR_ID, "operator")
    return ring


@pytest.fixture
def make_security(keyring: Keyring) -> Callable[..., SecurityManager]:
    """SecurityManager for a principal; agents and operators get only their own keyring entry."""

    def make(principal_id: str = COORDINATOR_ID, **overrides: int) -> SecurityManager:
        ring = keyring if principal_id == COORDINATOR_ID else keyring.subset(principal_id)
        options = {
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "ttl_s": TTL_S,
            "replay_window_s": REPLAY_WINDOW_S,
            **overrides,
        }
        return SecurityManager(ring, principal_id, coordinator_id=COORDINATOR_ID, **options)

    return make


@pytest.fixture
def coordinator_security(make_security: Callable[..., SecurityManager]) -> SecurityManager:
    return make_security(COORDINATOR_ID)


@pytest.fixture
def agent_security(make_security: Callable[..., SecurityManager]) -> SecurityManager:
    return make_security(AGENT_ID)


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
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir
