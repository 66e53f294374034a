"""The campaign: every coordinator of a name runs one; the lease decides who leads.

A candidate tries to acquire the lease; while another holds it, it waits on a blocking query
until the key's session is gone, then tries again. The leader renews every ``ttl / 3``. It calls
``on_deposed`` as soon as it may no longer act: a renewal that Consul refuses, or no good renewal
for ``ttl - margin`` (Consul unreachable, or this process paused). It then campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from coordinator_agent.exceptions import DiscoveryError
from coordinator_agent.ha.lease import Term

log = logging.getLogger(__name__)

#: How long a standby's blocking query on the leader key waits before asking again.
WATCH_WAIT_S = 10.0
#: Pause after an error talking to Consul.
RETRY_S = 0.5


class Lease(Protocol):
    """What a campaign needs of a lease: ``ha.lease.ConsulLease`` or ``ha.broker_lease``'s."""

    key: str
    ttl_s: float

    @property
    def held(self) -> bool: ...
    def time_left(self) -> float: ...
    async def acquire(self) -> Term | None: ...
    async def current(self, *, index: int | None = None, wait_s: float | None = None
                      ) -> dict[str, Any] | None: ...
    async def renew(self) -> bool: ...
    async def release(self) -> None: ...
    async def close(self) -> None: ...


class Campaign:
    def __init__(
        self,
        lease: Lease,
        *,
        on_elected: Callable[[Term], Awaitable[None]],
        on_deposed: Callable[[str], Awaitable[None]],
    ) -> None:
        self.lease = lease
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.takeovers = 0
        self._stopping = False

    @property
    def leading(self) -> bool:
        return self.lease.held

    async def run(self) -> None:
        while not self._stopping:
            term = await self._win()
            if term is None:
                return
            self.takeovers += 1
            await self.on_elected(term)
            reason = await self._hold()
            if self._stopping:
                return
            log.warning("leadership of %s lost (%s); now a standby", self.lease.key, reason)
            await self.on_deposed(reason)

    async def resign(self) -> None:
        """Stop campaigning and hand the lock over at once (a graceful stop)."""
        self._stopping = True
        await self.lease.release()

    async def _win(self) -> Term | None:
        index: int | None = None
        while not self._stopping:
            try:
                term = await self.lease.acquire()
                if term is not None:
                    return term
                entry = await self.lease.current()
                if entry is None or not entry.get("Session"):
                    continue  # freed between our try and our look: try again at once
                index = int(entry["ModifyIndex"])
                # Wait for the holder to release or expire: the key changes then.
                await self.lease.current(index=index, wait_s=WATCH_WAIT_S)
            except DiscoveryError as exc:
                log.warning("leader election: %s; retrying", exc)
                await asyncio.sleep(RETRY_S)
        return None

    async def _hold(self) -> str:
        """Renew every ttl / 3 until the lease is lost; say why."""
        interval = self.lease.ttl_s / 3
        while not self._stopping:
            await asyncio.sleep(min(interval, self.lease.time_left()))
            if not self.lease.held:  # Consul unreachable, or we were paused: stop at once
                return "no renewal within the lease"
            try:
                # A renewal must not outlive the point where we stop believing we lead.
                renewed = await asyncio.wait_for(self.lease.renew(), self.lease.time_left())
            except (DiscoveryError, TimeoutError) as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            if not renewed:
                return "the session expired"
        return "stopping"

    async def close(self) -> None:
        with contextlib.suppress(DiscoveryError):
            await self.resign()
        await self.lease.close()
