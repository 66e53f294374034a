"""Leadership: whether this coordinator leads its name, and the epoch of its term.

With ``ha.enabled`` off, the process leads alone from start to stop (epoch 0), as before HA.
With it on, every coordinator of a name campaigns for the lease (``ha/election.py``): on Consul
when ``registry_url`` is set, else on the broker alone (``ha/broker_lease.py``). The winner
leads and the others are standbys. ``leading`` is read before every act (consume a message,
dispatch, sweep): it turns false the moment the lease may have passed to someone else, even
before the campaign has noticed (a process paused past its lease wakes up a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

from coordinator_agent.ha.broker_lease import BrokerLease
from coordinator_agent.ha.election import Campaign, Lease
from coordinator_agent.ha.lease import ConsulLease, Term
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.settings import Settings

log = logging.getLogger(__name__)

LEADER = "leader"
STANDBY = "standby"


class Leadership:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        on_elected: Callable[[], Awaitable[None]],
        on_deposed: Callable[[str], Awaitable[None]],
    ) -> None:
        self.metrics = metrics
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        #: This process among the candidates (host, pid, and a random part for restarts).
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.epoch = 0
        #: Between on_elected and on_deposed; without HA, from the start.
        self._acting = not settings.ha.enabled
        self._run: asyncio.Task[None] | None = None
        self.campaign: Campaign | None = None
        if settings.ha.enabled:
            lease: Lease
            ha = settings.ha
            if settings.registry_url is not None:
                token = settings.registry_token
                lease = ConsulLease(
                    settings.registry_url, settings.name, self.holder,
                    ttl_s=ha.lease_ttl_s, margin_s=ha.lease_margin_s,
                    token=token.get_secret_value() if token else None,
                    timeout_s=min(settings.registry.call_timeout_s, ha.lease_ttl_s / 2))
            else:  # no Consul: the broker alone elects (docs/HA.md, "Broker-only election")
                lease = BrokerLease(
                    settings.broker_url.get_secret_value(), settings.name, self.holder,
                    ttl_s=ha.lease_ttl_s, margin_s=ha.lease_margin_s,
                    timeout_s=ha.lease_ttl_s / 2)
            self.campaign = Campaign(lease, on_elected=self._elected, on_deposed=self._deposed)
        self.metrics.leader.set(0 if settings.ha.enabled else 1)

    def __repr__(self) -> str:
        return f"Leadership(holder={self.holder!r}, role={self.role!r}, epoch={self.epoch})"

    @property
    def enabled(self) -> bool:
        return self.campaign is not None

    @property
    def leading(self) -> bool:
        """True while this process may act as the leader: elected, and its lease still good."""
        if not self._acting:
            return False
        return self.campaign is None or self.campaign.leading

    @property
    def role(self) -> str:
        return LEADER if self.leading else STANDBY

    @property
    def takeovers(self) -> int:
        return self.campaign.takeovers if self.campaign is not None else 0

    async def start(self) -> None:
        """Lead at once (HA off), or start campaigning and return (HA on)."""
        if self.campaign is None:
            await self._elected(Term(self.holder, 0))
            return
        self._run = asyncio.create_task(self._campaign(self.campaign), name="campaign")

    async def _campaign(self, campaign: Campaign) -> None:
        try:
            await campaign.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # never silently: a coordinator that stops campaigning stays a standby
            log.exception("leader election stopped")

    async def stop(self) -> None:
        """Stop campaigning; a leader hands the lease over at once (no TTL wait)."""
        self._acting = False
        self.metrics.leader.set(0)
        if self.campaign is None:
            return
        await self.campaign.close()  # resigns: releases the key, destroys the session
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run

    async def release(self) -> None:
        """Stop leading and hand the lease over now, without stopping the campaign's task
        (the caller may be running inside it)."""
        self._acting = False
        self.metrics.leader.set(0)
        if self.campaign is not None:
            await self.campaign.resign()

    async def _elected(self, term: Term) -> None:
        self.epoch = term.epoch
        self._acting = True
        self.metrics.epoch.set(term.epoch)
        if self.campaign is not None:
            self.metrics.takeovers.inc()
        log.info("leading %s (epoch %d)", self.holder, term.epoch)
        await self._on_elected()
        self.metrics.leader.set(1 if self.leading else 0)

    async def _deposed(self, reason: str) -> None:
        self._acting = False
        self.metrics.leader.set(0)
        log.warning("no longer leading (%s): a standby from now on", reason)
        await self._on_deposed(reason)
