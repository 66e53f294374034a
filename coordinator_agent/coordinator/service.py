"""CoordinatorAgent: wires the parts together and runs their lifecycle.

A message's way in: ``wire.messaging`` (consume, open, check) calls ``_on_message`` here, which
hands it by type to ``heartbeats`` (agents' own reports), ``results`` (progress and results),
or ``intake`` (submissions). ``dispatch`` assigns pending tasks, ``sweep`` does the periodic
work, ``outbox`` sends, and ``views`` reads. Every change is saved to the task store before the
message that caused it is acked, so a crash loses nothing the coordinator accepted; with HA, to
the replicated log first (``ha/replication.py``), which every coordinator applies to its store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from coordinator_agent.coordinator import views
from coordinator_agent.coordinator.desk import OperatorDesk
from coordinator_agent.coordinator.discovery import RegistryWatcher
from coordinator_agent.coordinator.dispatch import Dispatcher
from coordinator_agent.coordinator.heartbeats import AgentReports
from coordinator_agent.coordinator.intake import Intake
from coordinator_agent.coordinator.leadership import Leadership
from coordinator_agent.coordinator.limits import FleetLimiter
from coordinator_agent.coordinator.liveness import AgentLiveness
from coordinator_agent.coordinator.memory import FloodWatch
from coordinator_agent.coordinator.outage import OutageClock
from coordinator_agent.coordinator.outbox import Outbox, background
from coordinator_agent.coordinator.readahead import ReadAhead
from coordinator_agent.coordinator.results import TaskResults
from coordinator_agent.coordinator.scheduling import SchedulingQueue
from coordinator_agent.coordinator.spawner import AgentSpawner
from coordinator_agent.coordinator.state import AgentRecord, StateManager
from coordinator_agent.coordinator.status_lane import BATCHED_TYPES, StatusLane
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.sweep import KeyringReloader, Sweeper
from coordinator_agent.coordinator.tasks import TaskRecord, TaskStatus
from coordinator_agent.coordinator.workflows import WorkflowEngine, merged_output_limit
from coordinator_agent.exceptions import NotLeading, StoreUnavailable, TransportError
from coordinator_agent.ha import snapshot
from coordinator_agent.ha.log import LogCodec
from coordinator_agent.ha.replication import Replication
from coordinator_agent.ops.api import MonitoringServer
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.registry import ServiceRegistry, registry_from_settings
from coordinator_agent.routing.config import load_routing_config
from coordinator_agent.routing.planner import CoordinationPlanner, Router
from coordinator_agent.routing.updates import LearningUpdate
from coordinator_agent.settings import Settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol
from coordinator_agent.wire.delivery import Delivery
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.messaging import (
    MessageHandler,
    coordinator_topology,
    submission_lanes_topology,
)
from coordinator_agent.wire.security import AuthorizationManager, SecurityManager

log = logging.getLogger(__name__)

#: Deliveries a submission lane may have in the coordinator at once. Each one is a task in the
#: event loop, run in turn: a lane with hundreds there would hold up everyone else's results and
#: submissions behind its own; a few keep intake busy (the broker refills as they are acked).
LANE_PREFETCH = 16
#: An HTTP submission is held at most this long (readahead.py); then admitted as usual.
MAX_HTTP_HOLD_S = 30.0

PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0
#: A new leader's wait for its epoch marker's confirm, and for its log reader to progress
#: towards the marker (it waits as long as the reader keeps applying).
TAKEOVER_BARRIER_TIMEOUT_S = 30.0
#: Exit status of a leader that left because the log refused a write (a supervisor restarts it).
EXIT_LOG_FAILED = 75


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
        limits = settings.limits
        keyring = keyring if keyring is not None else Keyring.load(settings.keyring_path)
        self.metrics = Metrics(registry)
        self.state = StateManager(TaskStore(settings.store_path), settings.liveness)
        self.planner = CoordinationPlanner(
            limits.max_in_flight_per_agent, router,
            config=load_routing_config(settings.routing_config),
            store_path=settings.routing_store_path, metrics=self.metrics)
        self.security = SecurityManager.from_settings(settings, keyring, settings.name)
        self.authorizer = AuthorizationManager(self.security, self.state.is_assigned)
        self.messages = MessageHandler(
            settings.broker_url,
            self.security,
            name=f"{settings.name}/coordinator",
            authorizer=self.authorizer,
            metrics=self.metrics,
            publish_timeout_s=limits.publish_timeout_s,
            # A hung broker keeps the connection open: a confirmed probe shows it within ~1 s.
            probe_interval_s=PROBE_INTERVAL_S, probe_timeout_s=PROBE_TIMEOUT_S,
        )
        self.messages.add_topology(coordinator_topology(settings.name))
        self.messages.consume(c.tasks_queue(settings.name), self._on_message,
                              prefetch=settings.prefetch, settle=self._settle)
        # Heartbeats and metrics reports in batches (status_lane.py); progress one by one.
        self.status_lane = StatusLane(lambda: self.leadership.leading, self._handle)
        self.messages.consume(c.status_queue(settings.name), self._on_message,
                              prefetch=settings.prefetch, requeue_on_error=False,
                              settle=self._settle,
                              # Late-bound: the reports are made further down.
                              shed=lambda message: self.reports.shed(message),  # noqa: PLW0108
                              batch=self.status_lane.handle, batch_types=BATCHED_TYPES)
        # A lane per operator known at start (a later one uses the tasks queue until a restart).
        self.lanes = sorted(p.id for p in keyring.principals.values() if p.role == "operator")
        self.messages.add_topology(submission_lanes_topology(settings.name, lambda: self.lanes))
        for operator in self.lanes:
            self.messages.consume(c.submit_queue(settings.name, operator), self._on_lane,
                                  prefetch=min(settings.prefetch, LANE_PREFETCH),
                                  settle=self._settle)
        self._background: set[asyncio.Task[Any]] = set()
        spawn = background(self._background)

        # The parts, in the order they need each other; three late bindings close the loops.
        self.outbox = Outbox(settings.name, self.state, self.messages, spawn)
        self.outbox.barrier = self.durable  # nothing leaves before what it announces is durable
        scheduling = settings.scheduling
        self.limits = FleetLimiter(settings.fleet, self.metrics)  # fleet-wide limits, admission
        self.dispatcher = Dispatcher(self.state, self.planner, self.outbox, self.metrics,
                                     max_in_flight_per_agent=limits.max_in_flight_per_agent,
                                     spawn=spawn, limits=self.limits,
                                     scan_limit=scheduling.scan_limit,
                                     queue=SchedulingQueue(
                                         aging_s=scheduling.aging_s,
                                         max_aging_bands=scheduling.max_aging_bands,
                                         weights=scheduling.weights,
                                         default_weight=scheduling.default_weight,
                                         reserve_s=scheduling.reserve_s))
        #: Intake holds a principal far ahead of its agents while others have work.
        self.read_ahead = ReadAhead(scheduling.read_ahead, self.dispatcher.pending,
                                    self.dispatcher.running_by_principal,
                                    on_hold=lambda _: self.metrics.intake_held.inc())
        self.results = TaskResults(self.state, self.planner, self.dispatcher, self.outbox,
                                   self.metrics, max_output_bytes=limits.max_output_bytes)
        self.intake = Intake(self.state, self.dispatcher, self.outbox, self.metrics, limits,
                             admission=self.limits, planner=self.planner,
                             priority_from_urgency=scheduling.priority_from_urgency)
        self.workflows = WorkflowEngine(  # composite tasks: fan-out, steps, coalitions, races
            self.state, create_child=self.intake.create_child, finish=self.results.finish,
            cancel=self.results.cancel, max_merged_bytes=merged_output_limit(limits))
        self.dispatcher.workflows = self.results.workflows = self.intake.workflows = self.workflows
        self.dispatcher.on_undeliverable = self.results.retry_or_fail
        self.desk = OperatorDesk(  # cancel, redirect, and the escalation desk
            self.state, self.dispatcher, self.results, self.outbox, self.metrics,
            config=settings.escalation, max_output_bytes=limits.max_output_bytes)
        self.results.escalate = self.desk.escalate
        self.reports = AgentReports(self.state, self.dispatcher, self.results, self.metrics)
        self.keyrings = KeyringReloader(settings.keyring_path, self.security, keyring)
        self.outage = OutageClock(self.state, lambda: self.messages.connected,
                                  settings.liveness)
        self.flood = FloodWatch(self._compact)
        self.sweeper = Sweeper(self.state, self.results, self.outbox, self.keyrings,
                               outage=self.outage, flood=self.flood,
                               backlog=self.reports.backlog)
        #: Leader or standby (docs/HA.md); with ``ha.enabled`` off, the leader from start to stop.
        self.leadership = Leadership(settings, self.metrics, on_elected=self._lead,
                                     on_deposed=self._step_down)
        self.sweeper.leading = lambda: self.leadership.leading
        self.outbox.epoch = lambda: (self.leadership.epoch if self.leadership.enabled else None)
        self.outbox.leading = lambda: self.leadership.leading
        # Assignments wait while there is no connection (an unconfirmed one is sent again), and
        # stop the moment the lease may have passed to another coordinator.
        self.dispatcher.broker_ok = lambda: (self.messages.transport_up
                                             and self.leadership.leading)
        self.state.on_rollback = self._rolled_back
        #: HA: the replicated log, written by the leader, applied by everyone (docs/HA.md).
        self.replication: Replication | None = None
        if settings.ha.enabled:
            self.replication = self._replication(settings, keyring)
        self.spawner = AgentSpawner(  # agents on demand: local processes, or a count for KEDA
            settings.spawner, self.state, self.metrics, name=settings.name,
            broker_url=settings.broker_url.get_secret_value(),
            keyring_path=settings.keyring_path, data_dir=settings.data_dir,
            adopt_keyring=self.keyrings.adopt, send_drain=self.outbox.to_agent,
            retiring=self.dispatcher.retiring)

        self._loops: list[asyncio.Task[None]] = []
        self._leader_loops: list[asyncio.Task[None]] = []
        self._restored = False
        self._abdicating = False
        self._abdicate_task: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()
        self.started_at = time.time()
        self.monitoring = MonitoringServer(self, settings.monitoring_host, settings.monitoring_port)
        registry_ = (service_registry if service_registry is not None
                     else registry_from_settings(settings))
        #: Consul, or None: discovery by AMQP announcements alone.
        self.discovery = None if registry_ is None else RegistryWatcher(
            registry_, settings, self.state, self.metrics, health_url=self._health_url,
            bury=self.results.bury, wake=self.dispatcher.wake.set)

    def __repr__(self) -> str:
        return f"CoordinatorAgent(name={self.settings.name!r})"

    def _replication(self, settings: Settings, keyring: Keyring) -> Replication:
        # The log is sealed with the keys of the keyring's `coordinator` principals, which no
        # agent or client holds. Without one it falls back to the operators' keys (first by id
        # seals, all open), which an operator's client also holds: a warning says so.
        own = [p for p in keyring.principals.values() if p.role == "coordinator"]
        if not own:
            own = [p for p in keyring.principals.values() if p.role == "operator"]
            log.warning("ha: no `coordinator` key in the keyring, so the log is sealed with the "
                        "operators' keys; create one with `coordinator-agent keys generate "
                        "--principal coordinator --role coordinator`")
        secrets = [key.get_secret_value() for p in sorted(own, key=lambda p: p.id)
                   for key in p.keys]
        if not secrets:
            raise ValueError("ha.enabled needs a key to seal the log: `coordinator-agent keys "
                             "generate --principal coordinator --role coordinator`")
        log_retention, snapshot_retention = snapshot.retentions(settings.ha)
        replication = Replication(
            settings.broker_url.get_secret_value(), settings.name,
            LogCodec(secrets), self.state.store,
            epoch=lambda: self.leadership.epoch, on_outcome=self._learn_from_log,
            retention=log_retention,
            snapshots=(snapshot_retention, snapshot.schedule(settings.ha)))
        self.state.store.replicate(None)  # a standby until elected: the log writes the file
        self.planner.outcome_hook = lambda update: replication.record_outcome(update.to_dict())
        return replication

    def _learn_from_log(self, update: dict[str, Any]) -> None:
        """A standby's learner takes the leader's routing outcomes, as the leader's did."""
        self.planner.apply_outcome(LearningUpdate.from_dict(update))

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.planner.warm_up()  # before any task: the first decision must not build it
        if self.leadership.enabled:
            await self.messages.pause_consuming()  # a standby consumes nothing: _lead starts it
        else:
            self._restore()  # the only coordinator: state first, then messages
            self._restored = True
        await self.messages.start()
        if self.replication is not None:
            await self.replication.start()  # a standby's store follows the log from now on
        await self.monitoring.start()
        self._loops = [asyncio.create_task(self.dispatcher.run(), name="dispatch")]
        await self.leadership.start()
        log.info("coordinator %s started as %s (broker %s)", self.settings.name,
                 self.leadership.role if not self.leadership.enabled else "candidate",
                 self.messages.url_for_display)

    async def _lead(self) -> None:
        """Elected (or HA off): carry on from the store, then take messages and act."""
        if self.replication is not None:
            # The takeover barrier: once our epoch's marker is applied, the store holds
            # everything the previous leader logged. Every term starts from the store.
            try:
                await self.replication.begin_term(self.leadership.epoch,
                                                  TAKEOVER_BARRIER_TIMEOUT_S)
            except (TransportError, TimeoutError) as exc:
                await self._abdicate(f"the term could not be marked in the log: {exc!r}")
                return
            self.dispatcher.pending.clear()
            self._restore()
            self._restored = True
        elif not self._restored:  # later terms of this process carry on from its memory
            self._restore()
            self._restored = True
        self.accepting = True
        self._leader_loops = [asyncio.create_task(self.sweeper.run(), name="sweep")]
        if self.discovery is not None:
            self._leader_loops.append(asyncio.create_task(self.discovery.run(), name="registry"))
        if self.settings.spawner.backend != "none":  # only the leader starts and stops agents
            self._leader_loops.append(asyncio.create_task(self.spawner.run(), name="spawner"))
        await self.messages.resume_consuming()
        self.dispatcher.wake.set()

    async def _step_down(self, reason: str) -> None:
        """Deposed: stop acting at once. Unacked messages go back to the queues for the leader;
        the Consul registration is left alone, the new leader's to keep."""
        self.accepting = False
        if self.replication is not None:
            self.replication.end_term()
        await self.messages.pause_consuming()
        await self._stop_leader_loops()

    async def _abdicate(self, reason: str) -> None:
        """Crash-only exit of an HA leader whose memory may be ahead of the log: hand the
        lease over at once and exit; restarted, it reads the log like any standby."""
        if self._abdicating:
            return
        self._abdicating = True
        log.critical("leaving the lead and exiting: %s", reason)
        self.accepting = False
        with contextlib.suppress(Exception):
            await self.messages.pause_consuming()
        with contextlib.suppress(Exception):
            await self.leadership.release()
        os._exit(EXIT_LOG_FAILED)

    async def _stop_leader_loops(self) -> None:
        loops, self._leader_loops = self._leader_loops, []
        for loop in loops:
            loop.cancel()
        for loop in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    async def stop(self) -> None:
        """Graceful stop: stop consuming, drain handlers and publishes, close."""
        if self._stopped.is_set():
            return
        self.accepting = False
        timeout = self.settings.limits.drain_timeout_s
        leader = self.leadership.leading
        await self.spawner.stop()  # its agents drain and say goodbye while we still listen
        await self.messages.stop_consuming()
        drained = await self.messages.drain(timeout)
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        await self.leadership.stop()  # hands the lease over now that nothing is left to do
        await self._stop_leader_loops()
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self.messages.close()
        if self.replication is not None:
            await self.replication.stop()
        if self.discovery is not None:
            # Last: Consul stops sending us its health checks. A standby never registered, and
            # must not remove the leader's registration (same service id).
            await self.discovery.leave(deregister=leader or not self.leadership.enabled)
        await self.monitoring.stop()
        self.state.store.close()
        self.planner.close()
        self._stopped.set()
        if not drained:
            log.warning("stopped with messages still in progress; the broker redelivers them")
        log.info("coordinator %s stopped", self.settings.name)

    def _restore(self) -> None:
        """Carry on with what a previous run (perhaps killed) left open."""
        now = time.time()
        for task in self.state.restore():
            if task.status.terminal:
                self.outbox.completed(task)
                continue
            if task.workflow is not None:
                continue  # a composite parent is never assigned: resumed below
            attempt = task.current_attempt
            if task.status is TaskStatus.PENDING or attempt is None:
                self.dispatcher.enqueue(task.id)
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
                self.dispatcher.spawn(self.dispatcher.send(task, attempt))
        self.workflows.resume()
        if self.state.tasks:
            log.info("restored %d open tasks (%d pending)", len(self.state.tasks),
                     len(self.dispatcher.pending))

    def _rolled_back(self, task: TaskRecord) -> None:
        """A failed write put the task back to its stored state: queue it if it waits."""
        if task.status is TaskStatus.PENDING and task.workflow is None:
            self.dispatcher.enqueue(task.id)

    def _compact(self) -> None:
        """After a flood: right-sized copies of the containers that grew with it."""
        self.state.tasks = dict(self.state.tasks)
        self.dispatcher.pending.compact()
        self.state.store.shrink_memory()
        # Caches filled during the flood: their entries, live, would pin its heap pages.
        self.planner.drop_caches()
        self.state.recent.clear()  # finished tasks are read from the store instead

    # --- inbound messages, by type --------------------------------------------------------------

    async def _on_lane(self, envelope: protocol.Envelope, message: Delivery) -> None:
        """A submission lane: a submission waits while its sender is held (readahead.py); the
        lane's prefetch then keeps the rest of its backlog in the broker."""
        if isinstance(envelope.payload, protocol.TaskSubmit):
            await self.read_ahead.turn(envelope.sender)
        await self._on_message(envelope, message)

    async def intake_turn(self, principal: str) -> None:
        """HTTP: wait while this principal is held (readahead.py), at most ``MAX_HTTP_HOLD_S``."""
        await self.read_ahead.turn(principal, MAX_HTTP_HOLD_S)

    async def _on_message(
        self, envelope: protocol.Envelope, message: Delivery
    ) -> None:
        """Handle one message (or one item of a batch); while the store cannot be written,
        hold it and try again. ``_settle`` then makes the change durable, once per delivery.

        Held, the message stays unacked (the broker's delivery count does not grow) and the
        prefetch limit stops the flow. Submissions are the exception: they are refused at once
        (intake.py) so that the client hears of it.
        """
        answer: Coroutine[Any, Any, None] | None = None
        while True:
            if not self.leadership.leading:
                raise NotLeading()  # back to the queue: deposed since it was delivered
            try:
                answer = self._handle(envelope, message)
                break
            except StoreUnavailable as exc:
                if not self.leadership.leading:
                    raise NotLeading() from None  # deposed mid-handling: a standby's store
                self.metrics.store_errors.labels(envelope.type).inc()
                log.warning("%s held until the store is writable: %s", envelope.type, exc)
                self.sweeper.store_writable.clear()
            await self.sweeper.store_writable.wait()
        if answer is not None:
            # A submission is acked once answered (intake.py): a lane's prefetch bounds the
            # answers on their way ahead of assignments. The answer itself waits until the
            # change is durable (Outbox.answer); the answers of a batch's items leave together.
            if message.before_ack is None:
                message.before_ack = []
            message.before_ack.append(asyncio.ensure_future(answer))

    async def _settle(self, message_type: str) -> None:
        """Before a delivery is acked: the log holds what its message, or every item of its
        batch, changed (the items of a batch are handled in one loop turn: one log append)."""
        if self.replication is not None:
            # Acked only once the log holds what the message changed.
            try:
                await self.replication.barrier()
            except TransportError as exc:
                self.background_abdicate(str(exc))
                raise NotLeading() from None
            if not self.leadership.leading:
                raise NotLeading()  # the successor handles it again (handlers are idempotent)
            return
        # Acked only once this turn's transaction is committed (group commit, store.py). A
        # commit that failed keeps its rows: held until the sweep's probe has written them.
        while True:
            try:
                await self.state.store.committed()
                return
            except StoreUnavailable as exc:
                self.metrics.store_errors.labels(message_type).inc()
                log.warning("%s held until the store is writable: %s", message_type, exc)
                self.sweeper.store_writable.clear()
            await self.sweeper.store_writable.wait()

    def background_abdicate(self, reason: str) -> None:
        self._abdicate_task = asyncio.ensure_future(self._abdicate(reason))

    async def durable(self) -> None:
        """Until every change made so far is in the log (HA; raises TransportError), or
        committed to the store (raises StoreUnavailable)."""
        if self.replication is not None:
            try:
                await self.replication.barrier()
            except TransportError as exc:
                self.background_abdicate(str(exc))
                raise
        else:
            await self.state.store.committed()

    def _handle(self, envelope: protocol.Envelope, message: Delivery
                ) -> Coroutine[Any, Any, None] | None:
        """Apply one message; a submission returns its answer, still to be sent."""
        payload = envelope.payload
        sender = envelope.sender
        now = time.time()
        if isinstance(payload, protocol.AgentStatus | protocol.AgentHello):
            # A process's session is the id of its hello; its heartbeats carry it as their
            # correlation id (agents that send none get the old first-delivery rule).
            session = (envelope.id if isinstance(payload, protocol.AgentHello)
                       else envelope.correlation_id)
            self.reports.seen(sender, payload, now, redelivered=bool(message.redelivered),
                              session=session, sent_at=envelope.sent_at)
        elif isinstance(payload, protocol.TaskResult):
            self.reports.touch(sender, now)
            self.results.on_result(sender, payload)
        elif isinstance(payload, protocol.TaskProgress):
            self.reports.touch(sender, now)
            self.results.on_progress(sender, payload)
        elif isinstance(payload, protocol.TaskSubmit):
            answer = self.intake.on_submit(envelope, payload)
            if payload.reply_to is not None and message.in_batch:
                self.outbox.takes_batches(payload.reply_to)  # a client that sends batches
            return answer
        elif isinstance(payload, protocol.AgentMetrics):
            self.reports.metrics_report(sender, payload, now)
        elif isinstance(payload, protocol.AgentGoodbye):
            self.reports.goodbye(sender)
        return None

    # --- what the API, the CLI and tests call (ops.api.CoordinatorView) --------------------------

    @property
    def accepting(self) -> bool:
        return self.dispatcher.active

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.dispatcher.active = value

    @property
    def keyring(self) -> Keyring:
        return self.keyrings.current

    @property
    def ready(self) -> bool:
        return all(self.readiness().values())

    def broker_working(self) -> bool:
        """Connected, confirming publishes, and not every agent silent at once."""
        return self.messages.connected and not self.outage.active

    @property
    def role(self) -> str:
        """``leader`` or ``standby`` (docs/HA.md); always ``leader`` with ``ha.enabled`` off."""
        return self.leadership.role

    def readiness(self) -> dict[str, bool]:
        """What /readyz checks. A standby is ready when it can serve reads and queue
        submissions for the leader: it consumes nothing and assigns nothing by design."""
        if not self.leadership.leading:
            return {"broker_connected": self.messages.connected,
                    "store_writable": self.state.store.healthy}
        return {
            "broker_connected": self.broker_working(),
            "consumers_active": self.messages.active_consumers > 0,
            "store_writable": self.state.store.healthy,
            "accepting": self.accepting,
        }

    @property
    def registry_state(self) -> str:
        """``disabled`` (no registry configured), ``ok`` or ``degraded`` (unreachable)."""
        return "disabled" if self.discovery is None else self.discovery.health

    def submit(
        self, spec: protocol.TaskSubmit, *, submitted_by: str, default_id: str
    ) -> tuple[TaskRecord, bool]:
        """Accept a task (durably) or return the existing one for a repeated id."""
        return self.intake.submit(spec, submitted_by=submitted_by, default_id=default_id)

    def cancel(self, task_id: str, reason: str = "cancelled by operator") -> TaskRecord:
        return self.results.cancel(task_id, reason)

    def get_task(self, task_id: str) -> TaskRecord:
        return self.state.get_task(task_id)

    def queue_position(self, task_id: str) -> dict[str, float] | None:
        """A pending task's band, aged priority and wait so far (None when not queued)."""
        return self.dispatcher.pending.position(task_id, time.time())

    def recent_tasks(self, limit: int) -> list[TaskRecord]:
        return self.state.store.recent(limit)

    async def forward_submit(self, spec: protocol.TaskSubmit, *, submitted_by: str) -> None:
        """A standby's ``POST /api/tasks``: queued as the operator's, for the leader to take."""
        await self.messages.publish(spec, peer=self.settings.name,
                                    exchange=c.COORDINATOR_EXCHANGE,
                                    routing_key=c.tasks_key(self.settings.name),
                                    on_behalf_of=submitted_by)

    async def drain_agent(self, agent_id: str, reason: str = "") -> None:
        if not self.leadership.leading:
            raise NotLeading()  # a directive: only the leader sends them (the API says 503)
        agent = self.state.agents.get(agent_id)
        if agent is not None:
            agent.drain_requested = True  # no new work from now on, whatever it reports
            self.state.fleet.changed(agent_id)
        if self.replication is not None:
            self.replication.record_drained(agent_id, reason)
        await self.outbox.to_agent(agent_id, protocol.AgentDrain(reason=reason))

    def agents_view(self) -> list[dict[str, Any]]:
        return views.agents_view(self.state, spawned=self.spawner.describe())

    def status_view(self) -> dict[str, Any]:
        view = views.status_view(
            self.settings.name, self.state, ready=self.ready,
            broker_connected=self.broker_working(), registry=self.registry_state,
            started_at=self.started_at, role=self.role, epoch=self.leadership.epoch)
        view["liveness"] = self.reports.view()
        if self.replication is not None:
            view["replication"] = {"log_offset": self.state.store.log_offset(),
                                   "lag_entries": self.replication.lag,
                                   "applied_events": self.replication.applied_events,
                                   "fenced_events": self.replication.fence.dropped}
        return view

    def routing_view(self) -> dict[str, Any]:
        return self.planner.export_metrics()

    def explain_route(self, description: str, *, kind: str | None,
                      required_capabilities: list[str],
                      labels: list[str] | None = None) -> dict[str, Any]:
        explained = self.planner.explain(description, self.state.agents.values(), kind=kind,
                                         required_capabilities=required_capabilities,
                                         labels=labels or ())
        if explained.get("workflow"):
            explained["workflow_missing_kinds"] = self.intake.kinds_missing_for(
                explained["workflow"])
            if explained["workflow_missing_kinds"]:
                explained["runs_as"] = "task"  # intake runs it whole (``Intake._phased``)
        kind = explained.get("kind")
        return views.with_scheduling(
            explained, priority=self.intake.priority_for(None, description),
            held=self.limits.describe(kind, time.time()) if kind else None)

    def refresh_gauges(self) -> None:
        views.set_gauges(self.state, self.planner, self.metrics,
                         max_in_flight_per_agent=self.settings.limits.max_in_flight_per_agent,
                         registry=self.registry_state)
        self.desk.set_gauges(time.time())
        self.reports.export_metrics()

    def render_metrics(self) -> bytes:
        self.refresh_gauges()  # gauges are set here, exact at scrape time
        self.metrics.broker_connected.set(1 if self.broker_working() else 0)
        if self.replication is not None:
            self.metrics.log_lag.set(self.replication.lag)
        return self.metrics.render()

    def operator_for_token(self, token: str) -> str | None:
        principal = self.keyring.operator_for_token(token)
        return principal.id if principal is not None else None

    def _health_url(self) -> str:
        advertised = self.settings.registry.advertise_url
        if advertised:
            return advertised
        return f"http://{self.settings.monitoring_client_host}:{self.monitoring.port}/healthz"
