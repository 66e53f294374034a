"""Agent SDK: ``WorkerAgent`` speaks the agent side of the protocol.

    async def handle(task: TaskContext) -> Any:
        await task.report(0.5, "half way")
        return {"words": len(task.description.split())}

    await WorkerAgent("agent-1", "development", handle, settings=s, keyring=k).run()

It says hello, heartbeats with its load, runs at most ``max_concurrency`` tasks at once,
reports progress and results, ignores an assignment it already has
or has finished, and on stop drains: no new work, running tasks finish, then goodbye.
An assignment is acked only after its result is confirmed by the broker.

A process's session is the id of its ``agent.hello``; its heartbeats carry it as their
correlation id. It says hello *before* it consumes its queue, and runs only the assignments
whose correlation id is its session: what was queued for an earlier process of the same agent
(one that crashed, say) is the coordinator's to give again, and is dropped here unrun. Before a
task's handler runs, a ``task.progress`` of 0 ("started") is written to the connection's socket,
so that if the task kills the process the coordinator knows which task did it
(docs/RELIABILITY.md).

It announces ``batch:N`` (``batch_limit``, PROTOCOL.md §9.13): the coordinator may then send it
several assignments in one ``batch`` message, which it runs side by side and acks once all are
reported. Once it has received a batch, its own reports of one loop turn leave as one batch too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from coordinator_agent import __version__
from coordinator_agent.exceptions import (
    DiscoveryError,
    NotRegistered,
    RejectedMessage,
    TransportError,
)
from coordinator_agent.registry import (
    AgentService,
    Episode,
    ServiceRegistry,
    registry_from_settings,
)
from coordinator_agent.settings import Settings
from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.batching import Destination, TurnBatcher
from coordinator_agent.wire.delivery import Delivery
from coordinator_agent.wire.keyring import Keyring, require_role
from coordinator_agent.wire.messaging import MessageHandler, agent_topology, lane_for
from coordinator_agent.wire.security import AuthorizationManager, SecurityManager

log = logging.getLogger(__name__)

FINISHED_MEMORY = 10_000
#: Items per batch this agent announces it takes (``batch:N``, PROTOCOL.md §9.13).
DEFAULT_BATCH_LIMIT = 16
#: Deliveries beyond max_concurrency, so task.cancel and agent.drain reach a busy agent.
CONTROL_HEADROOM = 8


@dataclass
class TaskContext:
    task_id: str
    attempt: int
    description: str
    input: Any
    timeout_s: float
    _agent: WorkerAgent

    async def report(self, progress: float, message: str = "") -> None:
        """Tell the coordinator how far along this task is (0.0 - 1.0). Best effort."""
        report = protocol.TaskProgress(task_id=self.task_id, attempt=self.attempt,
                                       progress=max(0.0, min(1.0, progress)),
                                       message=message[:1024])
        with contextlib.suppress(TransportError):
            await self._agent.report(report)


TaskHandler = Callable[[TaskContext], Awaitable[Any]]


class WorkerAgent:
    #: Send the "started" report before each handler runs. Off only to measure what
    #: it costs (bench/started_cost.py): without it the coordinator cannot tell a task that
    #: crashed its agent from one merely queued for it (RELIABILITY.md, "Started reports").
    report_started = True

    def __init__(
        self,
        agent_id: str,
        kind: str,
        handler: TaskHandler,
        *,
        settings: Settings,
        keyring: Keyring,
        capabilities: list[str] | None = None,
        max_concurrency: int = 1,
        registry: ServiceRegistry | None = None,
        batch_limit: int = DEFAULT_BATCH_LIMIT,
    ) -> None:
        self.agent_id = agent_id
        self.kind = kind
        self.handler = handler
        self.settings = settings
        self.capabilities = sorted(set(capabilities or []))
        #: Most items per batch, both ways (1: none; the agent speaks only the old shape).
        self.batch_limit = min(max(1, batch_limit), batch.MAX_BATCH_ITEMS)
        #: What the agent announces: its capabilities and, if it takes batches, ``batch:N``.
        self.announced = sorted({*self.capabilities, batch.capability(self.batch_limit)}
                                if self.batch_limit > 1 else self.capabilities)
        self.max_concurrency = max_concurrency
        self.coordinator_id = settings.name
        # An operator's key would be refused on every heartbeat: say so now, not never.
        require_role(keyring, agent_id, "agent", "the keyring")
        self.security = SecurityManager.from_settings(settings, keyring.subset(agent_id), agent_id)
        self.messages = MessageHandler(
            settings.broker_url, self.security, name=f"{settings.name}/agent:{agent_id}",
            authorizer=AuthorizationManager(self.security),
            publish_timeout_s=settings.limits.publish_timeout_s,
        )
        self.messages.add_topology(agent_topology(settings.name, agent_id))
        self._queue = c.agent_queue(settings.name, agent_id)
        self.messages.consume(self._queue, self._on_message,
                              prefetch=max_concurrency + CONTROL_HEADROOM,
                              requeue_on_error=False, paused=True,  # until the hello is out
                              items_at_once=True)  # a batch's assignments run side by side
        #: Reports (started, results) of one loop turn leave as one batch, once the
        #: coordinator has shown that it speaks batches by sending one.
        self._reports = TurnBatcher(
            self.messages, lambda _: self.batch_limit if self.coordinator_batches else 1)
        self.coordinator_batches = False
        self._slots = asyncio.Semaphore(max_concurrency)
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._state = "ready"
        self._stop = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        #: Consul (from settings.registry_url), or None: announced over AMQP alone.
        self.registry = registry if registry is not None else registry_from_settings(settings)
        self._registry_episode = Episode(f"agent {agent_id}: service registry")
        self._registration: asyncio.Task[None] | None = None
        self.completed = 0
        self.failed = 0
        #: This process: the id of its hello (None before it is sent).
        self.session: str | None = None
        #: Assignments dropped unrun because they were queued for another process.
        self.dropped = 0
        #: Highest leadership epoch seen on a directive (PROTOCOL.md §10.7), and how many
        #: directives of a lower one were refused (``stale_epoch``).
        self.max_epoch = 0
        self.stale_directives = 0

    def __repr__(self) -> str:
        return f"WorkerAgent(id={self.agent_id!r}, kind={self.kind!r})"

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.messages.start()
        hello = await self.send(protocol.AgentHello(
            kind=self.kind, capabilities=self.announced,
            max_concurrency=self.max_concurrency, version=__version__))
        self.session = hello.id
        await self.messages.resume(self._queue)  # only now: the hello is ahead of any work
        await self._send_status()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        if self.registry is not None:
            self._registration = asyncio.create_task(self._registry_loop(), name="registry")
        log.info("agent %s (%s) started", self.agent_id, self.kind)

    async def run(self) -> None:
        """Start, serve until ``request_stop()`` (or a signal via the CLI), then stop."""
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Drain: stop taking work, let running tasks finish (bounded), say goodbye."""
        if self._state == "stopped":
            return
        timeout = self.settings.limits.drain_timeout_s if timeout is None else timeout
        self._state = "draining"
        with contextlib.suppress(TransportError):
            await self._send_status()
        if self.registry is not None and self._registration is not None:
            self._registration.cancel()
            await self._registry_call(self.registry.mark_draining)
        await self.messages.stop_consuming()
        if self._running:
            _, late = await asyncio.wait(set(self._running.values()), timeout=timeout)
            for task in late:
                task.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(TransportError):
            await self.send(protocol.AgentGoodbye(reason="stopped"))
        await self.messages.close()
        if self.registry is not None:
            if self._registration is not None:
                await self._registry_call(self.registry.deregister_agent)  # last, as it left
            await self.registry.close()
        self._state = "stopped"
        log.info("agent %s stopped", self.agent_id)

    # --- outbound -----------------------------------------------------------------------------

    async def send(self, payload: protocol.Model) -> protocol.Envelope:
        message_type = protocol.TYPE_OF_PAYLOAD[type(payload)]
        lane = lane_for(self.coordinator_id, message_type)
        durable = lane == c.tasks_key(self.coordinator_id)
        return await self.messages.publish(
            payload, peer=self.coordinator_id, exchange=c.COORDINATOR_EXCHANGE, routing_key=lane,
            persistent=durable,
            # Telemetry is worthless once its token has expired; let the broker drop it.
            expiration_s=None if durable else self.settings.security.message_ttl_s,
            # Which process speaks: the coordinator tells a restart from a redelivery by it.
            correlation_id=self.session,
        )

    async def report(self, payload: protocol.TaskProgress | protocol.TaskResult) -> None:
        """A report on a task, with this loop turn's others (one batch, PROTOCOL.md §9.13).

        A result returns once the broker has confirmed it; progress once it is written to the
        connection (the broker's confirm would add a round trip before every handler)."""
        message_type = protocol.TYPE_OF_PAYLOAD[type(payload)]
        lane = lane_for(self.coordinator_id, message_type)
        durable = lane == c.tasks_key(self.coordinator_id)
        await self._reports.send(
            payload, Destination(self.coordinator_id, c.COORDINATOR_EXCHANGE, lane,
                                 persistent=durable,
                                 expiration_s=None if durable
                                 else self.settings.security.message_ttl_s,
                                 confirm=durable),
            correlation_id=self.session)

    async def _send_status(self) -> None:
        busy = self.in_flight >= self.max_concurrency
        await self.send(protocol.AgentStatus(
            kind=self.kind, capabilities=self.announced,
            max_concurrency=self.max_concurrency,
            state="draining" if self._state == "draining" else ("busy" if busy else "ready"),
            in_flight=self.in_flight, load=min(1.0, self.in_flight / self.max_concurrency),
        ))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.liveness.heartbeat_interval_s)
            try:
                await self._send_status()
            except TransportError as exc:
                log.debug("heartbeat not sent: %s", exc)

    # --- the service registry -----------------------------------------------------------------

    def _service(self) -> AgentService:
        return AgentService(
            agent_id=self.agent_id, kind=self.kind, coordinator=self.coordinator_id,
            capabilities=tuple(self.announced), max_concurrency=self.max_concurrency,
            version=__version__, queue=c.agent_queue(self.coordinator_id, self.agent_id),
        )

    async def _registry_loop(self) -> None:
        """Register, then keep the TTL check passing; re-register if the registry forgot us.

        Refreshes come every ttl/3 with jitter, so 1,000 agents cost a Consul agent about
        25 calls/s at the default 120 s TTL, and never in step with each other.
        """
        assert self.registry is not None
        registry = self.registry
        period = self.settings.registry.ttl_s / 3
        registered = False
        while True:
            try:
                if registered:
                    await registry.refresh_agent(self.agent_id)
                else:
                    await registry.register_agent(self._service())
                    registered = True
                self._registry_episode.succeeded(time.time())
            except NotRegistered:
                registered = False
                continue
            except DiscoveryError as exc:
                # Register again once it answers: a restarted (dev) registry forgot us.
                registered = False
                self._registry_episode.failed(exc, time.time())
                await asyncio.sleep(min(period, 2.0))
                continue
            await asyncio.sleep(period * random.uniform(0.8, 1.0))  # jitter: never in step

    async def _registry_call(self, call: Callable[[str], Awaitable[None]]) -> None:
        try:
            await call(self.agent_id)
        except DiscoveryError as exc:
            log.info("agent %s: %s", self.agent_id, exc)

    # --- inbound ------------------------------------------------------------------------------

    async def _on_message(
        self, envelope: protocol.Envelope, message: Delivery
    ) -> None:
        payload = envelope.payload
        if envelope.sender != self.coordinator_id:
            return
        if message.in_batch:
            self.coordinator_batches = True  # it speaks batches: ours are welcome
        if isinstance(payload, protocol.Directive):
            self._fence(envelope, payload)
        if isinstance(payload, protocol.TaskAssign):
            if envelope.correlation_id != self.session:
                # Queued for an earlier process of this agent: the coordinator has withdrawn
                # it (or will, on our hello) and gives it out again. Running it here would run
                # it twice, or crash this process as it did the last one.
                self.dropped += 1
                log.info("agent %s: dropped assignment %s#%d meant for another process",
                         self.agent_id, payload.task_id, payload.attempt)
                return
            await self._run_assignment(payload)
        elif isinstance(payload, protocol.TaskCancel):
            for (task_id, attempt), task in list(self._running.items()):
                if task_id == payload.task_id and payload.attempt in (None, attempt):
                    task.cancel()
        elif isinstance(payload, protocol.AgentDrain):
            log.info("coordinator asked agent %s to drain", self.agent_id)
            self.request_stop()

    def _fence(self, envelope: protocol.Envelope, directive: protocol.Directive) -> None:
        """Refuse a deposed leader's directive: its epoch is below one already seen."""
        epoch = directive.epoch or 0  # absent: a coordinator without HA, epoch 0
        if epoch < self.max_epoch:
            self.stale_directives += 1
            raise RejectedMessage("stale_epoch", f"epoch {epoch} < {self.max_epoch}",
                                  sender=envelope.sender, message_id=envelope.id)
        self.max_epoch = epoch

    async def _run_assignment(self, assign: protocol.TaskAssign) -> None:
        key = (assign.task_id, assign.attempt)
        if key in self._finished:
            return  # a redelivery of work already reported: ack it and move on
        running = self._running.get(key)
        if running is None:
            running = asyncio.create_task(self._execute(assign), name=f"task-{assign.task_id}")
            self._running[key] = running
        # Redelivered while running (after a reconnect): wait for the same run, then ack.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(running)

    async def _execute(self, assign: protocol.TaskAssign) -> None:
        key = (assign.task_id, assign.attempt)
        ctx = TaskContext(assign.task_id, assign.attempt, assign.description, assign.input,
                          assign.timeout_s, self)
        started = time.monotonic()
        try:
            async with self._slots:
                if self.report_started:
                    await self._report_started(assign)
                output = await asyncio.wait_for(self.handler(ctx), assign.timeout_s)
            result = protocol.TaskResult(task_id=assign.task_id, attempt=assign.attempt,
                                         success=True, output=output,
                                         duration_s=time.monotonic() - started)
            self.completed += 1
        except asyncio.CancelledError:
            self._running.pop(key, None)
            self._remember(key)
            raise
        except Exception as exc:
            self.failed += 1
            error = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            result = protocol.TaskResult(task_id=assign.task_id, attempt=assign.attempt,
                                         success=False, error=error[:1024],
                                         duration_s=time.monotonic() - started)
        try:
            await self._send_result(result)
        finally:
            self._running.pop(key, None)
        self._remember(key)

    async def _report_started(self, assign: protocol.TaskAssign) -> None:
        """Written to the socket before the handler runs: should it kill us, the kernel still
        delivers it and the coordinator knows."""
        started = protocol.TaskProgress(task_id=assign.task_id, attempt=assign.attempt,
                                        progress=0.0, message="started")
        try:
            await self.report(started)
        except TransportError as exc:  # run anyway: the work matters more than the blame
            log.warning("start of %s not reported: %s", assign.task_id, exc)

    async def _send_result(self, result: protocol.TaskResult) -> None:
        """Results must not be lost: retry through broker outages until confirmed."""
        delay = 0.2
        while True:
            try:
                await self.report(result)
                return
            except TransportError as exc:
                log.warning("result for %s not sent yet (%s); retrying", result.task_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _remember(self, key: tuple[str, int]) -> None:
        self._finished[key] = None
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)
