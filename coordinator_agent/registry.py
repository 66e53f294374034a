"""ServiceRegistry: the catalogue of agents in Consul, behind a one-screen Protocol.

Agents register a service (id = agent id; tags = kind and capabilities; meta = version, max
concurrency, queue, coordinator) with a TTL check they refresh now and then; the coordinator
watches the agents that name it with blocking queries and registers itself with an HTTP check on
``/healthz``. Heartbeats stay on AMQP: Consul is the coarse, authoritative catalogue, so the TTL
is long (120 s by default) and the check's output never changes (a changed output costs Consul a
catalogue write on every refresh).

``ConsulRegistry`` is the real implementation (py-consul); ``InMemoryRegistry`` serves fast unit
tests of the logic above it. Consul and aiohttp exceptions become ``DiscoveryError`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio

from coordinator_agent.coordinator.liveness import RegistryHealth
from coordinator_agent.exceptions import DiscoveryError, NotRegistered
from coordinator_agent.settings import RegistrySettings, Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The TTL check's output: constant, so a refresh never becomes a catalogue write.
TTL_NOTE = "heartbeats travel over AMQP"
DRAINING_NOTE = "draining"


def worst_health(statuses: list[str]) -> RegistryHealth:
    """A service's health from all its checks (the node's included): the worst of them."""
    if "critical" in statuses:
        return RegistryHealth.CRITICAL
    if "warning" in statuses:  # the SDK sets this while draining
        return RegistryHealth.WARNING
    return RegistryHealth.PASSING


@dataclass(frozen=True)
class AgentService:
    """What an agent tells the registry about itself."""

    agent_id: str
    kind: str
    coordinator: str
    capabilities: tuple[str, ...] = ()
    max_concurrency: int = 1
    version: str = ""
    queue: str = ""

    def tags(self) -> list[str]:
        return [f"kind:{self.kind}", *(f"cap:{cap}" for cap in self.capabilities)]

    def meta(self) -> dict[str, str]:
        return {"coordinator": self.coordinator, "kind": self.kind, "version": self.version,
                "max_concurrency": str(self.max_concurrency), "queue": self.queue}

    @classmethod
    def from_consul(cls, service: dict[str, Any]) -> AgentService:
        meta = service.get("Meta") or {}
        tags = service.get("Tags") or []
        try:
            max_concurrency = max(1, int(meta.get("max_concurrency", "1")))
        except ValueError:
            max_concurrency = 1
        return cls(
            agent_id=str(service["ID"]), kind=str(meta.get("kind", "")),
            coordinator=str(meta.get("coordinator", "")),
            capabilities=tuple(sorted(t[4:] for t in tags if t.startswith("cap:"))),
            max_concurrency=max_concurrency, version=str(meta.get("version", "")),
            queue=str(meta.get("queue", "")),
        )


@dataclass(frozen=True)
class RegisteredAgent:
    service: AgentService
    health: RegistryHealth


class ServiceRegistry(Protocol):
    async def register_agent(self, service: AgentService) -> None: ...
    async def refresh_agent(self, agent_id: str) -> None:
        """Keep the TTL check passing; raises NotRegistered if the registry forgot it."""
    async def mark_draining(self, agent_id: str) -> None: ...
    async def deregister_agent(self, agent_id: str) -> None: ...
    async def register_coordinator(self, name: str, health_url: str) -> None: ...
    async def deregister_coordinator(self, name: str) -> None: ...
    async def watch_agents(
        self, coordinator: str, index: int
    ) -> tuple[int, list[RegisteredAgent]]:
        """A blocking query: returns when the catalogue changes after ``index`` (or on timeout)."""
    async def close(self) -> None: ...


def coordinator_service_id(name: str) -> str:
    return f"coordinator-{name}"


class ConsulRegistry:
    """py-consul's asyncio client, every call bounded by a timeout."""

    def __init__(self, url: str, config: RegistrySettings, token: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"registry URL {url!r} names no host")
        self.config = config
        self.url = f"{parts.scheme}://{parts.hostname}:{parts.port or 8500}"
        self._token = token
        self._host, self._port, self._scheme = parts.hostname, parts.port or 8500, parts.scheme
        self._client: Any = None

    def __repr__(self) -> str:
        return f"ConsulRegistry(url={self.url!r})"  # never the token

    def _consul(self) -> Any:
        if self._client is None:
            cfg = self.config
            verify: bool | str = str(cfg.tls_ca_file) if cfg.tls_ca_file else cfg.tls_verify
            if self._scheme == "http":
                verify = False  # else py-consul loads the CA bundle, blocking the loop ~50 ms
            cert = ((str(cfg.tls_cert_file), str(cfg.tls_key_file))
                    if cfg.tls_cert_file and cfg.tls_key_file else None)
            with warnings.catch_warnings():
                # py-consul passes aiohttp's deprecated ssl_context/verify_ssl arguments.
                warnings.simplefilter("ignore", DeprecationWarning)
                self._client = consul.aio.Consul(
                    host=self._host, port=self._port, scheme=self._scheme, token=self._token,
                    verify=verify, cert=cert,
                )
        return self._client

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]],
                    timeout: float | None = None) -> T:
        try:
            return await asyncio.wait_for(call(), timeout or self.config.call_timeout_s)
        except consul.NotFound as exc:
            raise NotRegistered(operation, str(exc)[:200]) from exc
        except TimeoutError as exc:
            raise DiscoveryError(operation, f"no answer from {self.url} in time") from exc
        except (consul.ConsulException, aiohttp.ClientError, OSError, ValueError) as exc:
            raise DiscoveryError(operation, f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    async def _require_leader(self) -> None:
        """Register only once the cluster has a leader: before that the Consul agent accepts a
        registration locally but cannot sync it to the catalogue until its next anti-entropy
        round, a minute or more later (seen when a dev agent restarts)."""
        c = self._consul()
        leader = await self._call("register", c.status.leader)
        if not leader:
            raise DiscoveryError("register", "the Consul cluster has no leader yet")

    async def register_agent(self, service: AgentService) -> None:
        await self._require_leader()
        check = consul.Check.ttl(f"{self.config.ttl_s:g}s")
        check["DeregisterCriticalServiceAfter"] = f"{self.config.deregister_critical_after_s}s"
        check["Notes"] = TTL_NOTE
        check["Status"] = "passing"  # from the start: it registers once it is up on AMQP
        c = self._consul()
        await self._call("register", lambda: c.agent.service.register(
            self.config.agent_service, service_id=service.agent_id, tags=service.tags(),
            meta=service.meta(), check=check))

    async def refresh_agent(self, agent_id: str) -> None:
        c = self._consul()
        try:
            await self._call("refresh", lambda: c.agent.check.ttl_pass(f"service:{agent_id}",
                                                                         notes=TTL_NOTE))
        except DiscoveryError as exc:
            # Consul answers an unknown TTL check with a 500 that names it, not a 404.
            if "does not have associated TTL" in str(exc) or "Unknown check" in str(exc):
                raise NotRegistered("refresh", agent_id) from exc
            raise

    async def mark_draining(self, agent_id: str) -> None:
        c = self._consul()
        await self._call("drain", lambda: c.agent.check.ttl_warn(f"service:{agent_id}",
                                                                  notes=DRAINING_NOTE))

    async def deregister_agent(self, agent_id: str) -> None:
        c = self._consul()
        await self._call("deregister", lambda: c.agent.service.deregister(agent_id))

    async def register_coordinator(self, name: str, health_url: str) -> None:
        await self._require_leader()
        check = consul.Check.http(
            health_url, f"{self.config.check_interval_s:g}s", timeout="3s",
            deregister=f"{self.config.deregister_critical_after_s}s")
        c = self._consul()
        await self._call("register", lambda: c.agent.service.register(
            self.config.coordinator_service, service_id=coordinator_service_id(name),
            tags=[f"name:{name}"], meta={"name": name}, check=check))

    async def deregister_coordinator(self, name: str) -> None:
        c = self._consul()
        await self._call("deregister",
                         lambda: c.agent.service.deregister(coordinator_service_id(name)))

    async def watch_agents(self, coordinator: str, index: int) -> tuple[int, list[RegisteredAgent]]:
        c = self._consul()
        wait = self.config.watch_wait_s
        index_arg = str(index) if index > 0 else None
        # Only this coordinator's agents; Consul filters server-side.
        expr = f'Service.Meta.coordinator == "{coordinator}"'
        new_index, nodes = await self._call(
            "watch",
            lambda: c.health.service(self.config.agent_service, index=index_arg,
                                     wait=f"{wait:g}s", filter_expr=expr),
            timeout=wait + wait / 16 + self.config.call_timeout_s,
        )
        agents = [
            RegisteredAgent(AgentService.from_consul(node["Service"]),
                            worst_health([check["Status"] for check in node.get("Checks", [])]))
            for node in nodes
        ]
        return int(new_index or 0), agents

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


@dataclass
class InMemoryRegistry:
    """A registry in a dict, for unit tests of the logic that uses one. Not for production."""

    agents: dict[str, RegisteredAgent] = field(default_factory=dict)
    coordinators: dict[str, str] = field(default_factory=dict)
    index: int = 1
    available: bool = True
    _changed: asyncio.Condition | None = None

    def _check(self, operation: str) -> None:
        if not self.available:
            raise DiscoveryError(operation, "registry unavailable")

    async def _bump(self) -> None:
        self.index += 1
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            self._changed.notify_all()

    async def set_health(self, agent_id: str, health: RegistryHealth) -> None:
        self.agents[agent_id] = RegisteredAgent(self.agents[agent_id].service, health)
        await self._bump()

    async def register_agent(self, service: AgentService) -> None:
        self._check("register")
        self.agents[service.agent_id] = RegisteredAgent(service, RegistryHealth.PASSING)
        await self._bump()

    async def refresh_agent(self, agent_id: str) -> None:
        self._check("refresh")
        if agent_id not in self.agents:
            raise NotRegistered("refresh", agent_id)
        if self.agents[agent_id].health is not RegistryHealth.PASSING:
            await self.set_health(agent_id, RegistryHealth.PASSING)

    async def mark_draining(self, agent_id: str) -> None:
        self._check("drain")
        await self.set_health(agent_id, RegistryHealth.WARNING)

    async def deregister_agent(self, agent_id: str) -> None:
        self._check("deregister")
        self.agents.pop(agent_id, None)
        await self._bump()

    async def register_coordinator(self, name: str, health_url: str) -> None:
        self._check("register")
        self.coordinators[name] = health_url

    async def deregister_coordinator(self, name: str) -> None:
        self._check("deregister")
        self.coordinators.pop(name, None)

    async def watch_agents(self, coordinator: str, index: int) -> tuple[int, list[RegisteredAgent]]:
        self._check("watch")
        if self._changed is None:
            self._changed = asyncio.Condition()
        if index >= self.index:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)
        self._check("watch")
        return self.index, [a for a in self.agents.values()
                            if a.service.coordinator == coordinator]

    async def close(self) -> None:
        return None


def registry_from_settings(settings: Settings) -> ServiceRegistry | None:
    """The configured registry, or None: discovery by AMQP announcements alone."""
    if not settings.registry_url:
        return None
    token = settings.registry_token.get_secret_value() if settings.registry_token else None
    return ConsulRegistry(settings.registry_url, settings.registry, token)


class Episode:
    """Logs a run of registry failures once when it starts and once when it ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing_since: float | None = None
        self.failures = 0

    def failed(self, exc: Exception, now: float) -> bool:
        """Returns True on the first failure of an episode (the one that was logged)."""
        self.failures += 1
        if self.failing_since is not None:
            return False
        self.failing_since = now
        log.warning("%s: %s; carrying on without it, retrying quietly", self.what, exc)
        return True

    def succeeded(self, now: float) -> bool:
        """Returns True when this success ends an episode of failures."""
        if self.failing_since is None:
            return False
        log.info("%s: back after %.1fs (%d failed calls)", self.what, now - self.failing_since,
                 self.failures)
        self.failing_since = None
        self.failures = 0
        return True

    @property
    def degraded(self) -> bool:
        return self.failing_since is not None
