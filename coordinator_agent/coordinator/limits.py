"""Fleet-wide limits and admission control, enforced by the coordinator across all agents.

Per agent kind and per submitting principal: tasks running at once, and a start rate as a token
bucket; for the whole fleet: a cap on tasks in flight. A task that a limit holds back stays
pending (its ``routing.held`` says why) and is tried again when a slot or a token frees.
Admission: a principal with too many pending tasks has new submissions refused, with a hint of
when to try again; with the open-task limit this bounds the coordinator's memory under a flood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator_agent.exceptions import SubmissionRefused
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.settings import FleetLimit, FleetLimits, PrincipalLimit


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per task started."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: int | None, now: float) -> TokenBucket:
        size = float(burst if burst is not None else max(1, math.ceil(rate)))
        return cls(rate, size, size, now)

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def ready(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0

    def wait_s(self, now: float) -> float:
        """Seconds until the next token."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate)


class FleetLimiter:
    """The limits of one coordinator; ``begin`` starts a dispatch pass with the running counts."""

    def __init__(self, config: FleetLimits, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.running_by_kind: dict[str, int] = {}
        self.running_by_principal: dict[str, int] = {}
        self.in_flight = 0
        #: Earliest time an empty bucket that held a task has a token again (None: none held).
        self.next_token_at: float | None = None

    def principal_limit(self, principal: str) -> PrincipalLimit:
        return self.config.principals.get(principal, self.config.default_principal)

    def begin(self, running_by_kind: dict[str, int], running_by_principal: dict[str, int],
              in_flight: int) -> None:
        self.running_by_kind = running_by_kind
        self.running_by_principal = running_by_principal
        self.in_flight = in_flight
        self.next_token_at = None

    # --- dispatch -------------------------------------------------------------------------------

    def room(self) -> int | None:
        """Tasks the global in-flight cap still allows (None: no cap)."""
        cap = self.config.max_in_flight
        return None if cap is None else max(0, cap - self.in_flight)

    def principal_hold(self, principal: str, now: float) -> tuple[str, str] | None:
        """(limit label, why) when the principal may start nothing now."""
        return self._hold("principal", principal, self.principal_limit(principal),
                          self.running_by_principal.get(principal, 0), now)

    def kind_hold(self, kind: str, now: float) -> tuple[str, str] | None:
        spec = self.config.kinds.get(kind)
        if spec is None:
            return None
        return self._hold("kind", kind, spec, self.running_by_kind.get(kind, 0), now)

    def _hold(self, scope: str, name: str, spec: FleetLimit, running: int,
              now: float) -> tuple[str, str] | None:
        if spec.max_running is not None and running >= spec.max_running:
            return f"{scope}_running", f"{name} at its limit of {spec.max_running} running"
        bucket = self._bucket(scope, name, spec, now)
        if bucket is not None and not bucket.ready(now):
            at = now + bucket.wait_s(now)
            self.next_token_at = at if self.next_token_at is None else min(self.next_token_at, at)
            return f"{scope}_rate", f"{name} at its rate of {spec.rate}"
        return None

    def _bucket(self, scope: str, name: str, spec: FleetLimit, now: float) -> TokenBucket | None:
        rate = spec.per_second
        if rate is None:
            return None
        key = (scope, name)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket.full(rate, spec.burst, now)
        return bucket

    def held(self, limit: str) -> None:
        self.metrics.limit_held.labels(limit).inc()

    def started(self, kind: str, principal: str, now: float) -> None:
        """A task of this kind and principal was assigned: count it, spend the tokens."""
        self.running_by_kind[kind] = self.running_by_kind.get(kind, 0) + 1
        self.running_by_principal[principal] = self.running_by_principal.get(principal, 0) + 1
        self.in_flight += 1
        for scope, name, spec in (("kind", kind, self.config.kinds.get(kind)),
                                  ("principal", principal, self.principal_limit(principal))):
            bucket = self._bucket(scope, name, spec, now) if spec is not None else None
            if bucket is not None:
                bucket.take(now)

    def describe(self, kind: str, now: float) -> str | None:
        """Why a task of this kind would be held right now (for ``route``), or None."""
        if (room := self.room()) is not None and room <= 0:
            return f"fleet at its limit of {self.config.max_in_flight} in flight"
        hold = self.kind_hold(kind, now)
        return hold[1] if hold is not None else None

    # --- admission --------------------------------------------------------------------------------

    def admit(self, principal: str, backlog: int) -> None:
        """Refuse a submission past the principal's backlog limit."""
        limit = self.principal_limit(principal).max_backlog
        if limit is not None and backlog >= limit:
            self.metrics.admission_refused.inc()
            raise SubmissionRefused(
                f"{principal} has {backlog} tasks waiting, its limit is {limit}; "
                f"try again in {self.config.retry_after_s:g}s",
                retry_after_s=self.config.retry_after_s)
