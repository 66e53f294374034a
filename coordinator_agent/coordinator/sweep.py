"""The sweep: periodic work that no message triggers.

Four times a second it advances liveness (only the agents whose deadline passed, see
``state.py``; and reassigns the tasks of dead agents), times out attempts, fails tasks that no
agent could ever run (looked for once a second), resends unsent notices, and picks up a
replaced keyring file (parsed off the event loop). During a broker outage (``outage.py``) it
judges nothing and times out nothing; while the coordinator is behind on its agents' reports
(``backlog.py``) silence counts for nobody. After a failed store write it probes the store
until a write succeeds again, and after a flood it gives memory back (``memory.py``).
Liveness changes are summed up in one log line per sweep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from coordinator_agent.coordinator.backlog import Backlog
from coordinator_agent.coordinator.memory import FloodWatch
from coordinator_agent.coordinator.outage import OutageClock
from coordinator_agent.coordinator.outbox import Outbox
from coordinator_agent.coordinator.results import TaskResults
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.tasks import TaskRecord, TaskStatus
from coordinator_agent.exceptions import ConfigError
from coordinator_agent.routing.planner import matches
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.security import SecurityManager

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25
NOTICE_RETRY_S = 5.0
#: Agents gone this long are forgotten; looking for them is not worth doing 4 times a second.
FORGET_EVERY_S = 5.0
#: Pending tasks that no agent could ever run are looked for once a second.
UNRUNNABLE_EVERY_S = 1.0


class KeyringReloader:
    """Picks up `keys generate/rotate` without a restart (the file is replaced atomically)."""

    def __init__(self, path: Path, security: SecurityManager, keyring: Keyring) -> None:
        self.path = path
        self.security = security
        self.current = keyring
        self._mtime = self._file_mtime()

    def _file_mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def adopt(self, keyring: Keyring) -> None:
        """A keyring this process just wrote (the spawner's keys): use it now, not next sweep."""
        self._mtime = self._file_mtime()
        self.current = keyring
        self.security.reload(keyring)

    async def reload_if_changed(self) -> None:
        mtime = self._file_mtime()
        if mtime is None or mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            # Reading and checking 10,000 principals takes a third of a second: not on the loop.
            keyring = await asyncio.to_thread(Keyring.load, self.path)
        except ConfigError as exc:
            log.warning("keyring changed but could not be loaded, keeping the old one: %s", exc)
            return
        if self._mtime != mtime:
            return  # adopt() ran meanwhile with a newer keyring of this process's own
        self.current = keyring
        self.security.reload(keyring)
        log.info("keyring reloaded: %d principals", len(keyring.principals))


class Sweeper:
    def __init__(self, state: StateManager, results: TaskResults, outbox: Outbox,
                 keyring: KeyringReloader, *, outage: OutageClock, flood: FloodWatch,
                 backlog: Backlog | None = None) -> None:
        self.state = state
        self.backlog = backlog
        self.results = results
        self.outbox = outbox
        self.keyring = keyring
        self.outage = outage
        self.flood = flood
        #: Cleared by a handler that met an unwritable store; set when a probe write succeeds.
        self.store_writable = asyncio.Event()
        self.store_writable.set()
        #: False while another coordinator leads (docs/HA.md): nothing is judged or sent.
        self.leading: Callable[[], bool] = lambda: True
        self._forgot_at = 0.0
        self._unrunnable_at = 0.0

    def _log_changes(self) -> None:
        """One line for every liveness change since the last sweep (not one per agent)."""
        changes = self.state.changes
        if changes:
            log.info("agents: %s", ", ".join(f"{n} {what}" for what, n in sorted(changes.items())))
            changes.clear()

    async def run(self) -> None:
        last_notice_retry = time.monotonic()
        while True:
            asked = time.monotonic()
            await asyncio.sleep(SWEEP_INTERVAL_S)
            if self.backlog is not None:
                self.backlog.loop_late(time.monotonic() - asked - SWEEP_INTERVAL_S)
            try:
                await self.keyring.reload_if_changed()
                if not self.leading():
                    continue
                self.check_store()
                self.sweep(time.time())
                self.flood.observe(len(self.state.tasks))
                if time.monotonic() - last_notice_retry > NOTICE_RETRY_S:
                    last_notice_retry = time.monotonic()
                    self.outbox.resend_unsent()
            except Exception:
                log.exception("sweep failed")

    def check_store(self) -> None:
        store = self.state.store
        if not store.healthy and store.probe():
            log.warning("task store writable again")
        if store.healthy and not self.store_writable.is_set():
            self.store_writable.set()

    def sweep(self, now: float) -> None:
        backlog = self.backlog
        if backlog is not None:
            was_behind = backlog.behind
            if backlog.refresh(now) or was_behind:
                # Behind: nobody's silence grows meanwhile; caught up: it counts from now.
                self.state.silence_floor = now
        was_out = self.outage.active
        if self.outage.check(now):
            return  # the broker is the problem: nobody is judged, nothing times out
        if was_out:
            self.results.dispatcher.wake.set()  # assignments held during the outage
        self.results.bury(self.state.sweep_liveness(now), now)
        self._log_changes()
        self.results.dispatcher.refresh_routing()
        if now - self._forgot_at > FORGET_EVERY_S:
            self._forgot_at = now
            self.state.forget_departed(now)
        # A flood's backlog is pending, and a pending task has no attempt running (every way
        # back to pending ends it first): its only check, "can any agent ever run it?", is made
        # once a second, with one search of the fleet per constraint (kind, capabilities), so
        # that a sweep over 10,000 pending tasks stays well under a millisecond most times.
        unrunnable_check = now - self._unrunnable_at >= UNRUNNABLE_EVERY_S
        if unrunnable_check:
            self._unrunnable_at = now
        runnable: dict[tuple[str | None, frozenset[str]], bool] = {}
        pending = TaskStatus.PENDING
        for task in list(self.state.tasks.values()):
            if task.status is pending:
                if not unrunnable_check or now - task.updated_at <= task.timeout_s:
                    continue
                key = (task.kind, frozenset(task.required_capabilities))
                can = runnable.get(key)
                if can is None:
                    can = runnable[key] = any(
                        _could_ever_run(task, a) for a in self.state.agents.values())
                if not can:
                    self.results.finish(
                        task, TaskStatus.FAILED,
                        error=f"no agent can run it (kind={task.kind}, capabilities="
                        f"{task.required_capabilities}) within {task.timeout_s:g}s")
                continue
            attempt = task.current_attempt
            if attempt is not None and now > attempt.deadline:
                self.results.time_out(task, attempt)


def _could_ever_run(task: TaskRecord, agent: AgentRecord) -> bool:
    # Only agents that have spoken count: one known from the registry alone may never come.
    return not agent.liveness.gone and agent.heard and matches(task, agent)
