"""CoordinatorAgent: wires the parts and runs the task lifecycle.

    submit -> pending -> assigned -> running -> succeeded | failed | cancelled
                 ^__________|___________|  (attempt failed, timed out or its agent died: retry)

Every change is written to the TaskStore before the message that caused it is acked, and the
terminal notice is sent from the store (an outbox), so a crash loses nothing it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry

from . import constants as c
from . import protocol
from .api import MonitoringServer
from .discovery import RegistryWatcher
from .exceptions import (
    AuthorizationError,
    ConfigError,
    SubmissionRefused,
    TransportError,
    Unroutable,
)
from .keyring import Keyring
from .liveness import AgentLiveness
from .messaging import MessageHandler, coordinator_topology
from .metrics import Metrics
from .planner import CoordinationPlanner, FallbackAction, Router, matches
from .registry import ServiceRegistry, registry_from_settings
from .routing_config import load_routing_config
from .security import AuthorizationManager, SecurityManager
from .settings import Settings
from .state import AgentRecord, StateManager
from .store import TaskStore
from .tasks import Attempt, AttemptOutcome, TaskRecord, TaskStatus
from .workflows import WorkflowEngine, merged_output_limit

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25
#: Assignments the broker could not deliver cost no retry, up to this many per task.
MAX_UNDELIVERABLE = 10


class CoordinatorAgent:
    def __init__(
        self,
        settings: Settings,
        keyring: Keyring | None = None,
        *,
        registry: CollectorRegistry | None = None,
        router: Router | None = None,
        service_registry: ServiceRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring if keyring is not None else Keyring.load(settings.keyring_path)
        self.metrics = Metrics(registry)
        self.state = StateManager(TaskStore(settings.store_path), settings.liveness)
        self.planner = CoordinationPlanner(
            settings.limits.max_in_flight_per_agent, router,
            config=load_routing_config(settings.routing_config),
            store_path=settings.routing_store_path, metrics=self.metrics)
        self.workflows = WorkflowEngine(  # composite tasks: fan-out, steps, coalitions, races
            self.state, create_child=self._create_child, finish=self._finish, cancel=self.cancel,
            max_merged_bytes=merged_output_limit(settings.limits))
        self.security = SecurityManager.from_settings(settings, self.keyring, settings.name)
        self.authorizer = AuthorizationManager(self.security, self.state.is_assigned)
        self.messages = MessageHandler(
            settings.broker_url,
            self.security,
            name=f"{settings.name}/coordinator",
            authorizer=self.authorizer,
            metrics=self.metrics,
            publish_timeout_s=settings.limits.publish_timeout_s,
        )
        self.messages.add_topology(coordinator_topology(settings.name))
        self.messages.consume(c.tasks_queue(settings.name), self._on_message,
                              prefetch=settings.prefetch)
        self.messages.consume(c.status_queue(settings.name), self._on_message,
                              prefetch=settings.prefetch, requeue_on_error=False)
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.started_at = time.time()
        self._keyring_mtime = self._keyring_file_mtime()
        self.accepting = False
        self.monitoring = MonitoringServer(self, settings.monitoring_host, settings.monitoring_port)
        #: Consul, or None: discovery by AMQP announcements alone.
        registry_ = (service_registry if service_registry is not None
                     else registry_from_settings(settings))
        #: Consul, or None: discovery by AMQP announcements alone.
        self.discovery = None if registry_ is None else RegistryWatcher(
            registry_, settings, self.state, self.metrics, health_url=self._health_url,
            bury=self._bury, wake=self._wake.set)

    def __repr__(self) -> str:
        return f"CoordinatorAgent(name={self.settings.name!r})"

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._restore()
        await self.messages.start()
        await self.monitoring.start()
        self.accepting = True
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._sweep_loop(), name="sweep"),
        ]
        if self.discovery is not None:
            self._loops.append(asyncio.create_task(self.discovery.run(), name="registry"))
        self._wake.set()
        log.info("coordinator %s started (broker %s)", self.settings.name,
                 self.messages.url_for_display)

    async def stop(self) -> None:
        """Graceful stop: stop consuming, drain handlers and publishes, close."""
        if self._stopped.is_set():
            return
        self.accepting = False
        timeout = self.settings.limits.drain_timeout_s
        await self.messages.stop_consuming()
        drained = await self.messages.drain(timeout)
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self.messages.close()
        if self.discovery is not None:
            await self.discovery.leave()  # last: Consul stops sending us its health checks
        await self.monitoring.stop()
        self.state.store.close()
        self.planner.close()
        self._stopped.set()
        if not drained:
            log.warning("stopped with messages still in progress; the broker redelivers them")
        log.info("coordinator %s stopped", self.settings.name)

    @property
    def ready(self) -> bool:
        return self.accepting and self.messages.connected and self.messages.active_consumers > 0

    @property
    def registry_state(self) -> str:
        """``disabled`` (no registry configured), ``ok`` or ``degraded`` (unreachable)."""
        return "disabled" if self.discovery is None else self.discovery.health

    def _restore(self) -> None:
        """Carry on with what a previous run (perhaps killed) left open."""
        now = time.time()
        for task in self.state.restore():
            if task.status.terminal:
                self._spawn(self._notify(task))
                continue
            if task.workflow is not None:
                continue  # a composite parent is never assigned: resumed below
            attempt = task.current_attempt
            if task.status is TaskStatus.PENDING or attempt is None:
                self._pending[task.id] = None
                continue
            # Hold the agent's slot until it heartbeats again or is declared dead.
            agent = self.state.agents.get(attempt.agent_id)
            if agent is None:
                agent = AgentRecord(attempt.agent_id, "unknown", frozenset(), 1,
                                    liveness=AgentLiveness.SUSPECT, last_seen=now)
                self.state.agents[agent.id] = agent
            agent.in_flight.add(task.id)
            if task.status is TaskStatus.ASSIGNED:
                # The crash may have come before the assignment was published; agents ignore
                # an assignment they already have, so sending it again is safe.
                self._spawn(self._send_assignment(task, attempt))
        self.workflows.resume()
        if self.state.tasks:
            log.info("restored %d open tasks (%d pending)", len(self.state.tasks),
                     len(self._pending))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- submissions --------------------------------------------------------------------------

    def submit(
        self, spec: protocol.TaskSubmit, *, submitted_by: str, default_id: str
    ) -> tuple[TaskRecord, bool]:
        """Accept a task (durably) or return the existing one for a repeated id."""
        task_id = spec.task_id or default_id
        existing = self.state.find_task(task_id)
        if existing is not None:
            if existing.submitted_by != submitted_by:
                # Never show one principal another's task, nor let it hijack the id.
                raise SubmissionRefused(f"task id {task_id} is already used by another client")
            return existing, True
        if len(self.state.tasks) >= self.settings.limits.max_pending_tasks:
            raise SubmissionRefused(f"{len(self.state.tasks)} tasks open, the limit is "
                                    f"{self.settings.limits.max_pending_tasks}")
        limits = self.settings.limits
        task = TaskRecord(
            id=task_id,
            description=spec.description,
            kind=spec.kind,
            required_capabilities=list(spec.required_capabilities),
            input=spec.input,
            timeout_s=spec.timeout_s or limits.task_timeout_s,
            max_retries=limits.max_retries if spec.max_retries is None else spec.max_retries,
            reply_to=spec.reply_to,
            submitted_by=submitted_by,
        )
        composite = self.workflows.prepare(task, spec)  # before the first save, for a restart
        self.state.add_task(task)
        self.metrics.tasks_submitted.inc()
        self.metrics.operations.labels("task_submit").inc()
        if composite:
            self.workflows.launch(task)  # never assigned itself: its children are
        else:
            self._pending[task.id] = None
        self._wake.set()
        return task, False

    def _create_child(self, child: TaskRecord) -> None:
        """A composite task's child (workflows.py): an ordinary task from here on."""
        self.state.add_task(child)
        self.metrics.operations.labels("task_child").inc()
        self._pending[child.id] = None
        self._wake.set()

    # --- inbound messages ---------------------------------------------------------------------

    async def _on_message(
        self, envelope: protocol.Envelope, message: AbstractIncomingMessage
    ) -> None:
        payload = envelope.payload
        sender = envelope.sender
        now = time.time()
        if isinstance(payload, protocol.AgentStatus | protocol.AgentHello):
            self._on_agent_seen(sender, payload, now, redelivered=bool(message.redelivered))
        elif isinstance(payload, protocol.TaskResult):
            self._touch(sender, now)
            self._on_result(sender, payload)
        elif isinstance(payload, protocol.TaskProgress):
            self._touch(sender, now)
            self._on_progress(sender, payload)
        elif isinstance(payload, protocol.TaskSubmit):
            await self._on_submit(envelope, payload)
        elif isinstance(payload, protocol.AgentMetrics):
            agent = self._touch(sender, now)
            if agent is not None:
                agent.metrics = dict(payload.values)
        elif isinstance(payload, protocol.AgentGoodbye):
            self._on_goodbye(sender)

    async def _on_submit(self, envelope: protocol.Envelope, spec: protocol.TaskSubmit) -> None:
        if spec.reply_to is not None and not spec.reply_to.startswith(
            f"{c.CLIENT_QUEUE_PREFIX}{envelope.sender}."
        ):
            raise AuthorizationError(
                "forbidden", f"reply_to must be one of the sender's own "
                f"{c.CLIENT_QUEUE_PREFIX}{envelope.sender}.* queues",
                sender=envelope.sender, message_id=envelope.id)
        try:
            task, duplicate = self.submit(spec, submitted_by=envelope.sender,
                                          default_id=envelope.id)
        except SubmissionRefused as exc:
            if spec.reply_to:
                notice = protocol.TaskCompleted(task_id=spec.task_id or envelope.id,
                                                status="rejected", error=str(exc))
                self._spawn(self._reply(spec.reply_to, envelope.sender, notice))
            return
        if spec.reply_to:
            accepted = protocol.TaskAccepted(task_id=task.id, status=task.status.value,
                                             duplicate=duplicate)
            self._spawn(self._reply(spec.reply_to, envelope.sender, accepted))
            if duplicate and task.status.terminal:
                self._spawn(self._reply(spec.reply_to, envelope.sender, self._completed(task)))

    def _on_agent_seen(
        self, agent_id: str, info: protocol.AgentHello | protocol.AgentStatus, now: float,
        *, redelivered: bool = False,
    ) -> None:
        previous = self.state.agents.get(agent_id)
        if (isinstance(info, protocol.AgentHello) and not redelivered
                and previous is not None and previous.in_flight):
            # A (first-delivery) hello means a fresh process: what the old one ran is gone.
            self._lose_agent_tasks(previous, "agent restarted")
        agent, became_assignable = self.state.observe_agent(agent_id, info, now)
        self.metrics.operations.labels("heartbeat").inc()
        if became_assignable:
            log.info("agent %s (%s) is available", agent_id, agent.kind)
            self._wake.set()

    def _touch(self, agent_id: str, now: float) -> AgentRecord | None:
        agent = self.state.agents.get(agent_id)
        if agent is not None and agent.liveness not in (AgentLiveness.DEAD, AgentLiveness.LEFT):
            agent.last_seen = now
        return agent

    def _on_goodbye(self, agent_id: str) -> None:
        agent = self.state.agent_left(agent_id)
        if agent is not None:
            log.info("agent %s left", agent_id)
            self._lose_agent_tasks(agent, "agent left")

    def _on_progress(self, agent_id: str, report: protocol.TaskProgress) -> None:
        task = self.state.tasks.get(report.task_id)
        attempt = task.attempt(report.attempt) if task else None
        if task is None or attempt is None or attempt is not task.current_attempt:
            return  # stale: that attempt is over
        if attempt.agent_id != agent_id:
            raise AuthorizationError("not_assigned", "attempt belongs to another agent",
                                     sender=agent_id)
        task.progress = report.progress
        if task.status is TaskStatus.ASSIGNED:
            task.move(TaskStatus.RUNNING)
            self.state.save(task)

    def _on_result(self, agent_id: str, result: protocol.TaskResult) -> None:
        task = self.state.find_task(result.task_id)
        attempt = task.attempt(result.attempt) if task else None
        if task is None or attempt is None or attempt.agent_id != agent_id:
            raise AuthorizationError("not_assigned", "no such attempt for this agent",
                                     sender=agent_id)
        agent = self.state.agents.get(agent_id)
        if task.status.terminal:
            # Redelivered or late: the task completes once, whatever arrives after.
            self.metrics.operations.labels("duplicate_result").inc()
            return
        attempt.duration_s = result.duration_s
        current = task.current_attempt
        if agent is not None and (current is attempt or current is None):
            agent.in_flight.discard(task.id)
        if result.success:
            output, error = self._bounded_output(result.output)
            if error is not None:
                if attempt is current:
                    self._retry_or_fail(task, attempt, AttemptOutcome.FAILED, error)
                else:
                    attempt.end(AttemptOutcome.FAILED, error)
                    self.state.save(task)
                return
            attempt.end(AttemptOutcome.SUCCEEDED)
            if current is not None and current is not attempt:
                # A late success from an earlier attempt wins; stop the newer one.
                self._abandon(task, current, AttemptOutcome.SUPERSEDED)
            if agent is not None:
                agent.completed += 1
            self.planner.record_outcome(task, agent, True)
            self._finish(task, TaskStatus.SUCCEEDED, output=output)
        elif attempt is current:
            if agent is not None:
                agent.failed += 1
            self._retry_or_fail(task, attempt, AttemptOutcome.FAILED, result.error or "failed")
        self._wake.set()

    def _bounded_output(self, output: Any) -> tuple[Any, str | None]:
        size = len(orjson.dumps(output))
        limit = self.settings.limits.max_output_bytes
        if size > limit:
            return None, f"output of {size} bytes exceeds the {limit}-byte limit"
        return output, None

    # --- task lifecycle -----------------------------------------------------------------------

    def _retry_or_fail(
        self, task: TaskRecord, attempt: Attempt, outcome: AttemptOutcome, error: str
    ) -> None:
        attempt.end(outcome, error)
        agent = self.state.agents.get(attempt.agent_id)
        if agent is not None:
            agent.in_flight.discard(task.id)
        self.planner.record_outcome(task, agent, False)
        if outcome is AttemptOutcome.UNDELIVERABLE:
            delay = 0.0 if task.undeliverable_attempts <= MAX_UNDELIVERABLE else None
            reason = "too many undeliverable assignments"
        else:
            # The fallback chain: retry the kind with backoff, then the next alternative kind.
            step = self.planner.next_step(task, outcome)
            delay = None if step.action is FallbackAction.ESCALATE else step.delay_s
            reason = step.reason
        if delay is None:
            chain = "; ".join(f"#{a.number} {a.agent_id}: {a.outcome}" for a in task.attempts)
            log.warning("task %s escalated: %s (attempts: %s)", task.id, reason, chain)
            self._finish(task, TaskStatus.FAILED,
                         error=f"{error}; escalated: {reason} (attempts: {chain})")
            return
        task.move(TaskStatus.PENDING)
        self.state.totals["retried"] += 1
        self.metrics.task_retries.labels(outcome.value).inc()
        self.state.save(task)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._requeue, task.id)
        else:
            self._requeue(task.id)

    def _requeue(self, task_id: str) -> None:
        self._pending[task_id] = None
        self._wake.set()

    def _abandon(self, task: TaskRecord, attempt: Attempt, outcome: AttemptOutcome) -> None:
        attempt.end(outcome)
        agent = self.state.agents.get(attempt.agent_id)
        if agent is not None:
            agent.in_flight.discard(task.id)
        cancel = protocol.TaskCancel(task_id=task.id, attempt=attempt.number, reason=outcome.value)
        self._spawn(self._send_to_agent(attempt.agent_id, cancel))

    def _finish(
        self, task: TaskRecord, status: TaskStatus, *, output: Any = None, error: str | None = None
    ) -> None:
        task.move(status)
        task.output = output
        task.error = error
        task.progress = 1.0 if status is TaskStatus.SUCCEEDED else task.progress
        self._pending.pop(task.id, None)
        self.state.save(task)  # durable before anything is acked or announced
        self.state.totals[status.value] += 1
        self.metrics.tasks.labels(status.value).inc()
        self.metrics.task_duration.labels(status.value).observe(task.updated_at - task.created_at)
        self.metrics.operations.labels(f"task_{status.value}").inc()
        self._spawn(self._notify(task))
        if task.parent_id is not None or task.workflow is not None:
            self.workflows.on_finished(task)  # advance its parent, or stop its children

    def _lose_agent_tasks(self, agent: AgentRecord, why: str) -> None:
        for task_id in list(agent.in_flight):
            task = self.state.tasks.get(task_id)
            attempt = task.current_attempt if task else None
            agent.in_flight.discard(task_id)
            if task is not None and attempt is not None and attempt.agent_id == agent.id:
                self._retry_or_fail(task, attempt, AttemptOutcome.AGENT_LOST, why)

    def cancel(self, task_id: str, reason: str = "cancelled by operator") -> TaskRecord:
        task = self.state.get_task(task_id)
        if not task.status.terminal:
            attempt = task.current_attempt
            if attempt is not None:
                self._abandon(task, attempt, AttemptOutcome.CANCELLED)
            self._finish(task, TaskStatus.CANCELLED, error=reason)
        return task

    # --- dispatch -----------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.accepting:
                self._dispatch()
            await asyncio.sleep(0)

    def _dispatch(self) -> None:
        cap = self.settings.limits.max_in_flight_per_agent
        agents = self.state.agents.values()
        free = sum(max(0, a.free_slots(cap)) for a in agents if a.assignable)
        if free <= 0 or not self._pending:
            return  # a backlog with no free agent costs nothing per wake
        for task_id in list(self._pending):
            if free <= 0:
                return
            task = self.state.tasks.get(task_id)
            if task is None or task.status is not TaskStatus.PENDING:
                self._pending.pop(task_id, None)
                continue
            decision = self.planner.select(task, agents)
            if self._hedge(task):
                self._pending.pop(task_id, None)  # raced on two kinds (workflows.py)
                continue
            if decision.agent is None:
                if (decision.reason == "no_matching_agent"
                        and self.workflows.try_coalition(task, agents)):
                    self._pending.pop(task_id, None)  # split across agents (workflows.py)
                continue
            self._pending.pop(task_id, None)
            self._assign(task, decision.agent)
            free -= 1

    def _hedge(self, task: TaskRecord) -> bool:
        """Race a first attempt on the top two kinds when they score within the margin."""
        hedge = self.planner.config.hedge
        if not hedge.enabled or task.attempts or task.parent_id is not None or task.kind:
            return False
        routing = task.routing
        alternatives = routing.get("alternatives") or []
        top = routing.get("confidence")
        if routing.get("kind") is None or top is None or not alternatives:
            return False
        runner_up = alternatives[0]
        if top - float(runner_up.get("confidence", 0.0)) > hedge.margin:
            return False
        return self.workflows.hedge(task, [routing["kind"], runner_up["kind"]])

    def _assign(self, task: TaskRecord, agent: AgentRecord) -> None:
        now = time.time()
        attempt = Attempt(len(task.attempts) + 1, agent.id, now, now + task.timeout_s)
        task.attempts.append(attempt)
        task.move(TaskStatus.ASSIGNED)
        agent.in_flight.add(task.id)
        self.state.save(task)
        self.metrics.operations.labels("task_assign").inc()
        self._spawn(self._send_assignment(task, attempt))

    async def _send_assignment(self, task: TaskRecord, attempt: Attempt) -> None:
        assign = protocol.TaskAssign(
            task_id=task.id, attempt=attempt.number, description=task.description,
            input=task.input, timeout_s=task.timeout_s,
        )
        try:
            await self.messages.publish(
                assign, peer=attempt.agent_id, exchange=c.AGENTS_EXCHANGE,
                routing_key=c.agent_key(self.settings.name, attempt.agent_id),
            )
        except TransportError as exc:
            if attempt is not task.current_attempt:
                return
            log.warning("assignment of %s to %s failed: %s", task.id, attempt.agent_id, exc)
            if isinstance(exc, Unroutable):
                agent = self.state.agents.get(attempt.agent_id)
                if agent is not None:
                    self.state.suspect(agent, "queue_gone")
            self._retry_or_fail(task, attempt, AttemptOutcome.UNDELIVERABLE, str(exc))

    # --- outbound notices ---------------------------------------------------------------------

    def _completed(self, task: TaskRecord) -> protocol.TaskCompleted:
        return protocol.TaskCompleted(
            task_id=task.id,
            status=task.status.value,
            output=task.output,
            error=task.error,
            attempts=[
                protocol.AttemptSummary(attempt=a.number, agent_id=a.agent_id,
                                        outcome=a.outcome.value, error=a.error,
                                        duration_s=a.duration_s)
                for a in task.attempts
            ],
        )

    async def _notify(self, task: TaskRecord) -> None:
        """Send task.completed from the store (outbox); marked sent only once confirmed."""
        if task.reply_to:
            try:
                await self._reply(task.reply_to, task.submitted_by, self._completed(task),
                                  raise_errors=True)
            except Unroutable:
                log.info("client queue for task %s is gone; result kept for the API", task.id)
            except TransportError:
                return  # the sweeper tries again
        task.notified = True
        self.state.save(task)

    async def _reply(
        self, queue: str, principal: str, payload: protocol.Model, *, raise_errors: bool = False
    ) -> None:
        try:
            await self.messages.publish(payload, peer=principal, exchange="", routing_key=queue)
        except TransportError:
            if raise_errors:
                raise

    async def _send_to_agent(self, agent_id: str, payload: protocol.Model) -> None:
        with contextlib.suppress(TransportError):
            await self.messages.publish(
                payload, peer=agent_id, exchange=c.AGENTS_EXCHANGE,
                routing_key=c.agent_key(self.settings.name, agent_id), persistent=False,
            )

    async def drain_agent(self, agent_id: str, reason: str = "") -> None:
        await self._send_to_agent(agent_id, protocol.AgentDrain(reason=reason))

    # --- periodic -----------------------------------------------------------------------------

    def _keyring_file_mtime(self) -> float | None:
        try:
            return self.settings.keyring_path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _reload_keyring_if_changed(self) -> None:
        """Pick up `keys generate/rotate` without a restart (the file is replaced atomically)."""
        mtime = self._keyring_file_mtime()
        if mtime is None or mtime == self._keyring_mtime:
            return
        self._keyring_mtime = mtime
        try:
            keyring = Keyring.load(self.settings.keyring_path)
        except ConfigError as exc:
            log.warning("keyring changed but could not be loaded, keeping the old one: %s", exc)
            return
        self.keyring = keyring
        self.security.reload(keyring)
        log.info("keyring reloaded: %d principals", len(keyring.principals))

    async def _sweep_loop(self) -> None:
        last_notify_retry = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self._reload_keyring_if_changed()
                self._sweep(time.time())
                if time.monotonic() - last_notify_retry > 5 and self.messages.connected:
                    last_notify_retry = time.monotonic()
                    for task in list(self.state.tasks.values()):
                        if task.status.terminal and not task.notified:
                            self._spawn(self._notify(task))
            except Exception:
                log.exception("sweep failed")

    def _sweep(self, now: float) -> None:
        self._bury(self.state.sweep_liveness(now), now)
        self.state.forget_departed(now)
        for task in list(self.state.tasks.values()):
            attempt = task.current_attempt
            if attempt is not None and now > attempt.deadline:
                self._abandon_timed_out(task, attempt)
            elif (task.status is TaskStatus.PENDING and now - task.updated_at > task.timeout_s
                  and not any(self._could_ever_run(task, a) for a in self.state.agents.values())):
                self._finish(task, TaskStatus.FAILED,
                             error=f"no agent can run it (kind={task.kind}, capabilities="
                             f"{task.required_capabilities}) within {task.timeout_s:g}s")

    def _abandon_timed_out(self, task: TaskRecord, attempt: Attempt) -> None:
        cancel = protocol.TaskCancel(task_id=task.id, attempt=attempt.number, reason="timeout")
        self._spawn(self._send_to_agent(attempt.agent_id, cancel))
        self._retry_or_fail(task, attempt, AttemptOutcome.TIMEOUT,
                            f"no result within {task.timeout_s:g}s")

    def _bury(self, dead: list[AgentRecord], now: float) -> None:
        for agent in dead:
            log.warning("agent %s is dead (%s, silent %.1fs, registry %s); reassigning %d tasks",
                        agent.id, agent.liveness_reason, now - agent.last_seen,
                        agent.registry.value if agent.registry else "-", len(agent.in_flight))
            self._lose_agent_tasks(agent, f"agent is dead ({agent.liveness_reason})")

    @staticmethod
    def _could_ever_run(task: TaskRecord, agent: AgentRecord) -> bool:
        # Only agents that have spoken count: one known from the registry alone may never come.
        return not agent.liveness.gone and agent.heard and matches(task, agent)

    def _health_url(self) -> str:
        advertised = self.settings.registry.advertise_url
        if advertised:
            return advertised
        return f"http://{self.settings.monitoring_client_host}:{self.monitoring.port}/healthz"

    def refresh_gauges(self) -> None:
        self.planner.export_metrics()
        self.metrics.registry_up.set(1 if self.registry_state == "ok" else 0)
        cap = self.settings.limits.max_in_flight_per_agent
        in_flight: dict[str, int] = {}
        capacity: dict[str, int] = {}
        for agent in self.state.agents.values():
            if agent.liveness.gone or not agent.heard:
                continue
            in_flight[agent.kind] = in_flight.get(agent.kind, 0) + len(agent.in_flight)
            capacity[agent.kind] = capacity.get(agent.kind, 0) + (
                agent.capacity(cap) if agent.assignable else 0)
        self.metrics.agent_in_flight.clear()  # kinds that left go with them
        self.metrics.agent_capacity.clear()
        for kind, count in in_flight.items():
            self.metrics.agent_in_flight.labels(kind).set(count)
            self.metrics.agent_capacity.labels(kind).set(capacity[kind])
        by_liveness = self.state.count_by_liveness()
        for liveness, count in by_liveness.items():
            self.metrics.agents_by_liveness.labels(liveness).set(count)
        self.metrics.active_agents.set(by_liveness[AgentLiveness.HEALTHY.value])
        for status, count in self.state.status_counts().items():
            self.metrics.tasks_active.labels(status).set(count)

    # --- views for the API and CLI -------------------------------------------------------------

    def agents_view(self) -> list[dict[str, Any]]:
        now = time.time()
        return [a.public_view(now) for a in sorted(self.state.agents.values(), key=lambda a: a.id)]

    def status_view(self) -> dict[str, Any]:
        return {
            "name": self.settings.name,
            "ready": self.ready,
            "broker_connected": self.messages.connected,
            "registry": self.registry_state,
            "uptime_s": round(time.time() - self.started_at, 1),
            "agents": self.state.count_by_liveness(),
            "tasks_open": self.state.status_counts(),
            "totals": dict(self.state.totals),
        }
