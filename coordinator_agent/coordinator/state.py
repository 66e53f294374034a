"""StateManager: agents with liveness, active tasks (persisted through TaskStore), totals.

Liveness is advanced by deadlines, not by judging everyone on every sweep: each heard agent
has one entry in a heap, due when its silence could next change its liveness. A sweep pops
only the entries that are due, re-checks them against the agent's latest heartbeat (an entry
is never updated in place: a heartbeat costs nothing here) and pushes them back.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator_agent.coordinator.liveness import AgentLiveness, RegistryHealth, judge
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import TaskRecord, TaskStatus
from coordinator_agent.exceptions import StoreError, UnknownTask
from coordinator_agent.settings import Liveness
from coordinator_agent.wire import protocol

if TYPE_CHECKING:
    from coordinator_agent.registry import RegisteredAgent

log = logging.getLogger(__name__)


@dataclass
class AgentRecord:
    id: str
    kind: str
    capabilities: frozenset[str]
    max_concurrency: int
    version: str = ""
    reported_state: str = "ready"
    reported_in_flight: int = 0
    reported_load: float = 0.0
    liveness: AgentLiveness = AgentLiveness.HEALTHY
    #: Why it has that liveness (see liveness.judge).
    liveness_reason: str = "ok"
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    #: Signal 1: heard on AMQP at all (an agent known only from the registry is not).
    heard: bool = True
    beats_since_suspect: int = 0
    #: Signal 2: its check in the registry; None = not registered or no registry configured.
    registry: RegistryHealth | None = None
    #: The agent's queue as it registered it (informational).
    queue: str = ""
    #: The running process: the id of its last ``agent.hello`` (None: not known yet).
    session: str | None = None
    #: Task ids the coordinator has assigned to this agent and not yet seen finish.
    in_flight: set[str] = field(default_factory=set)
    metrics: dict[str, float] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    #: The agent's own stamp on its last heartbeat (gaps count heartbeats that never came).
    last_sent_at: float | None = None
    #: An operator (or the spawner) asked this process to drain: no new work, whatever a
    #: heartbeat sent before the agent read the request still says. A new hello clears it.
    drain_requested: bool = False

    def capacity(self, cap: int) -> int:
        return min(self.max_concurrency, cap)

    def free_slots(self, cap: int) -> int:
        return self.capacity(cap) - len(self.in_flight)

    @property
    def assignable(self) -> bool:
        return (self.liveness is AgentLiveness.HEALTHY and self.reported_state != "draining"
                and not self.drain_requested)

    def public_view(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "capabilities": sorted(self.capabilities),
            "liveness": self.liveness.value,
            "liveness_reason": self.liveness_reason,
            "signals": {
                "amqp": ({"heard": True, "last_seen_s": round(now - self.last_seen, 3)}
                         if self.heard else {"heard": False, "last_seen_s": None}),
                "consul": self.registry.value if self.registry is not None else None,
            },
            "state": "draining" if self.drain_requested else self.reported_state,
            "max_concurrency": self.max_concurrency,
            "in_flight": len(self.in_flight),
            "load": round(self.reported_load, 3),
            "last_seen_s": round(now - self.last_seen, 3) if self.heard else None,
            "completed": self.completed,
            "failed": self.failed,
            "version": self.version,
            "metrics": dict(self.metrics),  # the agent's own figures, from agent.metrics
        }


class FleetLog:
    """The agents whose routing-relevant record changed, in order (fleet.py folds them in).

    A reader keeps its position (a version); one that fell behind what is kept regroups.
    """

    __slots__ = ("agents", "base", "ids")

    def __init__(self, agents: dict[str, AgentRecord]) -> None:
        self.agents = agents  # the state's own dict: the current record of a changed id
        self.base = 0  # the version of ids[0]
        self.ids: list[str] = []

    @property
    def version(self) -> int:
        return self.base + len(self.ids)

    def changed(self, agent_id: str) -> None:
        self.ids.append(agent_id)
        if len(self.ids) > 2 * len(self.agents) + 4096:  # keep the newer half
            half = len(self.ids) // 2
            self.base += half
            del self.ids[:half]

    def since(self, version: int) -> list[str] | None:
        """Ids changed after ``version`` (repeats possible); None when no longer kept."""
        if version < self.base:
            return None
        return self.ids[version - self.base:]


class StateManager:
    """The coordinator's view of the world. Single-threaded: called from the event loop only."""

    RECENT_TASKS = 200

    def __init__(self, store: TaskStore, liveness: Liveness) -> None:
        self.store = store
        self.liveness = liveness
        self.agents: dict[str, AgentRecord] = {}
        #: False while the registry is unreachable: its last word is then no signal at all.
        self.registry_trusted = False
        self.tasks: dict[str, TaskRecord] = {}  # non-terminal or not yet notified
        self.recent: OrderedDict[str, TaskRecord] = OrderedDict()  # finished, newest last
        self.totals: dict[str, int] = {"submitted": 0, "succeeded": 0, "failed": 0,
                                       "cancelled": 0, "retried": 0}
        #: Told about a task put back to its stored state after a failed write (dispatch
        #: queues it again if it is pending).
        self.on_rollback: Callable[[TaskRecord], None] | None = None
        #: Silence counts from here at the earliest: moved to "now" while the coordinator is
        #: behind on its agents' reports (backlog.py), so its backlog is nobody's silence.
        self.silence_floor = 0.0
        #: Agents whose membership, kind, capabilities, capacity or assignability changed,
        #: in order: routing folds them into its grouping instead of regrouping everyone.
        self.fleet = FleetLog(self.agents)
        #: Liveness changes since the sweep last summed them up in its log line.
        self.changes: Counter[str] = Counter()
        #: Heartbeats that never arrived, inferred from gaps in the agents' own stamps.
        self.missing_heartbeats = 0
        #: When any agent was last heard (hello or heartbeat).
        self.last_heard_at = 0.0
        self._due: list[tuple[float, int, str]] = []  # (when, tie-breaker, agent id)
        self._scheduled: set[str] = set()
        self._departed: set[str] = set()  # dead or left: forget_departed looks only here
        self._seq = 0

    @property
    def fleet_version(self) -> int:
        """Moves when the set of agents, or what routing groups them by, changes."""
        return self.fleet.version

    # --- agents -------------------------------------------------------------------------------

    def observe_agent(
        self, agent_id: str, info: protocol.AgentHello | protocol.AgentStatus, now: float,
        sent_at: float | None = None,
    ) -> tuple[AgentRecord, bool]:
        """Record a hello or heartbeat; returns (record, became_assignable)."""
        record = self.agents.get(agent_id)
        if (record is not None and sent_at is not None and type(info) is protocol.AgentStatus
                and self._repeat(record, info)):
            # Nothing it says is new and it is healthy: only its deadline moves (most
            # heartbeats of a large, steady fleet).
            self._count_gap(record, sent_at)
            record.last_seen = now
            self.last_heard_at = max(self.last_heard_at, now)
            record.beats_since_suspect += 1
            self._schedule(record, now)  # scheduled already, as every heard agent is
            return record, False
        was_assignable = record is not None and record.assignable
        if (record is not None and record.liveness is AgentLiveness.LEFT
                and not isinstance(info, protocol.AgentHello)):
            # A heartbeat sent before the goodbye, overtaken by it (they travel on different
            # lanes): only a new hello brings an agent that left back.
            return record, False
        if record is None or record.liveness.gone:
            fresh = AgentRecord(agent_id, info.kind, frozenset(info.capabilities),
                                info.max_concurrency, first_seen=now)
            if record is not None:
                fresh.in_flight = record.in_flight
                fresh.registry = record.registry
                fresh.session = record.session
            record = self.agents[agent_id] = fresh
            self._departed.discard(agent_id)
            self.fleet.changed(agent_id)
        capabilities = info.capabilities
        if (record.kind != info.kind or record.max_concurrency != info.max_concurrency
                or len(record.capabilities) != len(capabilities)
                or not record.capabilities.issuperset(capabilities)):
            record.kind = info.kind
            record.capabilities = frozenset(capabilities)
            record.max_concurrency = info.max_concurrency
            self.fleet.changed(record.id)
        if sent_at is not None and isinstance(info, protocol.AgentStatus):
            self._count_gap(record, sent_at)
        record.last_seen = now
        self.last_heard_at = max(self.last_heard_at, now)
        record.heard = True
        record.beats_since_suspect += 1
        if isinstance(info, protocol.AgentHello):
            record.version = info.version
            record.reported_state = "ready"
            record.drain_requested = False  # a new process: the drain was its predecessor's
        else:
            record.reported_state = info.state
            record.reported_in_flight = info.in_flight
            record.reported_load = info.load
        self._judge(record, now)
        self._schedule(record, now)
        became = record.assignable and not was_assignable
        if became or (was_assignable and not record.assignable):
            self.fleet.changed(record.id)
        return record, became

    @staticmethod
    def _repeat(record: AgentRecord, info: protocol.AgentStatus) -> bool:
        """A heartbeat that would change nothing but the agent's deadline: the agent is
        healthy for no other reason than being heard (judge's last rule; its registry check,
        if any, is passing), and reports what its record already holds."""
        return (record.liveness is AgentLiveness.HEALTHY and record.liveness_reason == "ok"
                and (record.registry is None or record.registry is RegistryHealth.PASSING)
                and record.reported_state == info.state
                and record.reported_in_flight == info.in_flight
                and record.reported_load == info.load and record.kind == info.kind
                and record.max_concurrency == info.max_concurrency
                and len(record.capabilities) == len(info.capabilities)
                and record.capabilities.issuperset(info.capabilities))

    def _count_gap(self, record: AgentRecord, sent_at: float) -> None:
        """Heartbeats missing between this one and the last (expired in the queue, shed, or
        never sent): a gap of more than 1.5 intervals counts whole intervals."""
        last, record.last_sent_at = record.last_sent_at, sent_at
        if last is None:
            return
        gap = (sent_at - last) / self.liveness.heartbeat_interval_s
        if gap > 1.5:
            self.missing_heartbeats += round(gap) - 1

    def observe_registry(
        self, entries: list[RegisteredAgent], now: float
    ) -> tuple[list[AgentRecord], bool]:
        """Apply the registry's view; returns (agents that just died, anyone became assignable)."""
        self.registry_trusted = True
        listed = {entry.service.agent_id: entry for entry in entries}
        for agent_id, entry in listed.items():
            if agent_id not in self.agents:
                service = entry.service
                self.agents[agent_id] = AgentRecord(
                    agent_id, service.kind, frozenset(service.capabilities),
                    service.max_concurrency, version=service.version, first_seen=now,
                    last_seen=now, heard=False, liveness=AgentLiveness.REGISTERED,
                    liveness_reason="not_heard", queue=service.queue)
                self.fleet.changed(agent_id)
        died: list[AgentRecord] = []
        woke = False
        for record in list(self.agents.values()):
            listing = listed.get(record.id)
            if listing is not None:
                record.registry = listing.health
                record.queue = listing.service.queue
            elif record.registry is not None:
                record.registry = RegistryHealth.ABSENT
            if not record.heard and listing is None:
                del self.agents[record.id]  # known only from the registry, which dropped it
                self.fleet.changed(record.id)
                continue
            was_assignable = record.assignable
            if self._judge(record, now):
                died.append(record)
            woke = woke or (record.assignable and not was_assignable)
            if record.assignable is not was_assignable:
                self.fleet.changed(record.id)
        return died, woke

    def registry_lost(self) -> None:
        """The registry cannot be reached: judge on heartbeats alone until it answers again."""
        self.registry_trusted = False

    def suspect(self, record: AgentRecord, reason: str) -> None:
        """Take an agent out of rotation for a reason found elsewhere (e.g. its queue is gone)."""
        if record.liveness is AgentLiveness.HEALTHY:
            record.liveness = AgentLiveness.SUSPECT
            record.liveness_reason = reason
            record.beats_since_suspect = 0
            self.changes[AgentLiveness.SUSPECT.value] += 1
            self.fleet.changed(record.id)

    def agent_left(self, agent_id: str) -> AgentRecord | None:
        record = self.agents.get(agent_id)
        if record is not None:
            record.liveness = AgentLiveness.LEFT
            record.liveness_reason = "goodbye"
            self._departed.add(agent_id)
            self.changes[AgentLiveness.LEFT.value] += 1
            self.fleet.changed(agent_id)
        return record

    def sweep_liveness(self, now: float) -> list[AgentRecord]:
        """Advance liveness as time passes; returns the agents that just died.

        Touches only the agents whose deadline has passed (see the module docstring).
        """
        died: list[AgentRecord] = []
        due = self._due
        while due and due[0][0] <= now:
            _, _, agent_id = heapq.heappop(due)
            self._scheduled.discard(agent_id)
            record = self.agents.get(agent_id)
            if record is None:
                continue
            was_assignable = record.assignable
            if self._judge(record, now):  # perhaps heard since: then it stays as it is
                died.append(record)
            if record.assignable is not was_assignable:
                self.fleet.changed(record.id)
            self._schedule(record, now)
        return died

    def _next_due(self, record: AgentRecord, now: float) -> float:
        """The next moment after ``now`` its silence could change its liveness: when it
        turns suspect, else when it dies (``judge`` kills at dead_after, whatever else)."""
        config = self.liveness
        since = record.last_seen if record.last_seen > self.silence_floor else self.silence_floor
        suspect_at = since + config.heartbeat_interval_s * config.suspect_after
        due = (suspect_at if suspect_at > now
               else since + config.heartbeat_interval_s * config.dead_after)
        return due if due > now else now + 0.001  # float rounding must not spin the sweep

    def _schedule(self, record: AgentRecord, now: float) -> None:
        if record.id in self._scheduled or record.liveness.gone or not record.heard:
            return
        self._seq += 1
        heapq.heappush(self._due, (self._next_due(record, now), self._seq, record.id))
        self._scheduled.add(record.id)

    def _judge(self, record: AgentRecord, now: float) -> bool:
        """Apply liveness.judge; True when the agent just died. Dead and left agents stay so.

        Silence counts from ``silence_floor`` at the earliest (the coordinator's own backlog).
        """
        if record.liveness.gone:
            return False
        since = record.last_seen if record.last_seen > self.silence_floor else self.silence_floor
        verdict = judge(
            record.liveness, heard=record.heard, silent_s=now - since,
            registry=record.registry if self.registry_trusted else None,
            reported_draining=record.reported_state == "draining",
            beats_since_suspect=record.beats_since_suspect, config=self.liveness,
        )
        if verdict.suspicion:
            record.beats_since_suspect = 0
        record.liveness_reason = verdict.reason
        if verdict.liveness is record.liveness:
            return False
        record.liveness = verdict.liveness
        self.changes[verdict.liveness.value] += 1
        if verdict.liveness is AgentLiveness.DEAD:
            self._departed.add(record.id)
            return True
        return False

    def forget_departed(self, now: float, keep_s: float = 600.0) -> None:
        for agent_id in list(self._departed):
            record = self.agents.get(agent_id)
            if record is None or not record.liveness.gone:
                self._departed.discard(agent_id)
            elif not record.in_flight and now - record.last_seen > keep_s:
                del self.agents[agent_id]
                self._departed.discard(agent_id)
                self.fleet.changed(agent_id)

    def count_by_liveness(self) -> dict[str, int]:
        counts = {state.value: 0 for state in AgentLiveness}
        for record in self.agents.values():
            counts[record.liveness.value] += 1
        return counts

    # --- tasks --------------------------------------------------------------------------------

    def find_task(self, task_id: str) -> TaskRecord | None:
        task = self.tasks.get(task_id) or self.recent.get(task_id)
        return task if task is not None else self.store.get(task_id)

    def get_task(self, task_id: str) -> TaskRecord:
        task = self.find_task(task_id)
        if task is None:
            raise UnknownTask(task_id)
        return task

    def add_task(self, task: TaskRecord) -> None:
        """Durable first, visible after: a task that cannot be stored was never accepted."""
        self.store.save(task)  # raises StoreError, and then nothing has changed
        self.tasks[task.id] = task
        self.totals["submitted"] += 1
        self._place(task)

    def save(self, task: TaskRecord) -> None:
        """Persist; finished and notified tasks leave the active set.

        A failed write raises ``StoreError`` after putting the task back to what the store
        holds, so memory never runs ahead of the store (nor does any notice sent from it).
        """
        try:
            self.store.save(task)
        except StoreError:
            self._roll_back(task)
            raise
        self._place(task)

    def _place(self, task: TaskRecord) -> None:
        if task.status.terminal and task.notified:
            self.tasks.pop(task.id, None)
            self.recent[task.id] = task
            self.recent.move_to_end(task.id)
            while len(self.recent) > self.RECENT_TASKS:
                self.recent.popitem(last=False)

    def _roll_back(self, changed: TaskRecord) -> None:
        try:
            stored = self.store.get(changed.id)
        except Exception:  # the store cannot even be read: forget the unsaved copy
            log.exception("task store unreadable while rolling back %s", changed.id)
            stored = None
        # Slots follow the stored attempt, not the one memory had moved to.
        for task in (changed, stored):
            attempt = task.current_attempt if task is not None else None
            agent = self.agents.get(attempt.agent_id) if attempt is not None else None
            if agent is not None and task is not None:
                if task is stored:
                    agent.in_flight.add(task.id)
                else:
                    agent.in_flight.discard(task.id)
        if stored is None:
            self.tasks.pop(changed.id, None)
            return
        if changed.id in self.tasks or not stored.status.terminal or not stored.notified:
            self.tasks[changed.id] = stored
        log.warning("task %s: the store kept %s; memory rolled back to it", changed.id,
                    stored.status.value)
        if self.on_rollback is not None:
            self.on_rollback(stored)

    def restore(self) -> list[TaskRecord]:
        """Load the tasks a previous run left open (after a crash or a restart)."""
        self.tasks.clear()  # a later HA term starts from the store too: memory may be stale
        self.recent.clear()
        for agent in self.agents.values():
            agent.in_flight.clear()
        restored = list(self.store.open_tasks())
        for task in restored:
            self.tasks[task.id] = task
        return restored

    def is_assigned(self, agent_id: str, task_id: str) -> bool:
        task = self.find_task(task_id)
        return task is not None and task.was_assigned_to(agent_id)

    def pending(self) -> list[TaskRecord]:
        return [t for t in self.tasks.values() if t.status is TaskStatus.PENDING]

    def status_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in TaskStatus}
        for task in self.tasks.values():
            counts[task.status.value] += 1
        return counts
