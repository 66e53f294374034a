"""The coordinator's side of the service registry: register itself, follow its agents.

While the registry is unreachable the coordinator runs on heartbeats alone: errors are counted,
logged once per episode, and the watch (and the coordinator's own registration, which a
restarted dev Consul forgets) resumes by itself when the registry answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.exceptions import DiscoveryError, NotRegistered
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.registry import Episode, ServiceRegistry
from coordinator_agent.settings import Settings

#: Never poll a registry that answers at once more often than this.
MIN_WATCH_PERIOD_S = 0.05
MAX_BACKOFF_S = 10.0


class RegistryWatcher:
    def __init__(
        self,
        registry: ServiceRegistry,
        settings: Settings,
        state: StateManager,
        metrics: Metrics,
        *,
        health_url: Callable[[], str],
        bury: Callable[[list[AgentRecord], float], None],
        wake: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.name = settings.name
        self.state = state
        self.metrics = metrics
        self._health_url = health_url
        self._bury = bury  # reassigns the tasks of agents that just died
        self._wake = wake  # someone became assignable: dispatch again
        self.episode = Episode("service registry")

    @property
    def health(self) -> str:
        """``ok``, or ``degraded`` while unreachable (and until the first answer)."""
        return "degraded" if self.episode.degraded or not self.state.registry_trusted else "ok"

    async def run(self) -> None:
        registry, index, registered, backoff = self.registry, 0, False, 0.5
        while True:
            started = time.monotonic()
            try:
                if not registered:
                    await registry.register_coordinator(self.name, self._health_url())
                    registered = True
                new_index, entries = await registry.watch_agents(self.name, index)
            except NotRegistered:
                registered = False
                continue
            except DiscoveryError as exc:
                self.metrics.registry_errors.labels(exc.operation).inc()
                self.metrics.registry_up.set(0)
                if self.episode.failed(exc, time.time()):
                    self.state.registry_lost()
                registered, index = False, 0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self.episode.succeeded(time.time())
            self.metrics.registry_up.set(1)
            backoff = 0.5
            died, woke = self.state.observe_registry(entries, time.time())
            self._bury(died, time.time())
            if woke:
                self._wake()
            # An index that went backwards means the registry was reset: start over.
            index = new_index if new_index >= index else 0
            if time.monotonic() - started < MIN_WATCH_PERIOD_S:
                await asyncio.sleep(MIN_WATCH_PERIOD_S)

    async def leave(self, *, deregister: bool = True) -> None:
        if deregister:
            with contextlib.suppress(DiscoveryError):
                await self.registry.deregister_coordinator(self.name)
        await self.registry.close()
