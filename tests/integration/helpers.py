"""Helpers for integration tests: waiting, child processes, broker-side connection closes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def task_is(coordinator: CoordinatorAgent, task_id: str, status: str) -> Callable[[], bool]:
    """A wait_until condition: the coordinator holds the task, in that status."""
    def check() -> bool:
        task = coordinator.state.find_task(task_id)
        return task is not None and task.status.value == status
    return check


def subprocess_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for `coordinator-agent` child processes sharing the test's settings."""
    return {
        **os.environ,
        "COORDINATOR_CONFIG": os.environ["COORDINATOR_CONFIG"],
        "COORDINATOR_NAME": settings.name,
        "COORDINATOR_BROKER_URL": settings.broker_url.get_secret_value(),
        "COORDINATOR_KEYRING_PATH": str(settings.keyring_path),
        "COORDINATOR_DATA_DIR": str(settings.data_dir),
        "COORDINATOR_LIVENESS__HEARTBEAT_INTERVAL_S": str(settings.liveness.heartbeat_interval_s),
        "COORDINATOR_LIVENESS__SUSPECT_AFTER": str(settings.liveness.suspect_after),
        "COORDINATOR_LIVENESS__DEAD_AFTER": str(settings.liveness.dead_after),
        "COORDINATOR_LIMITS__TASK_TIMEOUT_S": str(settings.limits.task_timeout_s),
        "COORDINATOR_LOG_LEVEL": "INFO",
        **extra,
    }


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[Any]:
    """Start `python -m coordinator_agent ARGS`, its output appended to ``log_path``."""
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "coordinator_agent", *args], env=env, stdout=log, stderr=log,
        )


def close_broker_connections(name_prefix: str) -> int:
    """Close, from the broker side, every connection whose name starts with ``name_prefix``."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    closed = 0
    for line in listing.splitlines():
        pid, _, props = line.partition("\t")
        match = re.search(r'\{"connection_name","([^"]*)"\}', props)
        if pid.startswith("<") and match and match.group(1).startswith(name_prefix):
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: closed by broker"],
                           capture_output=True, timeout=60, check=True)
            closed += 1
    return closed
