"""Prometheus metrics in an injected CollectorRegistry (tests run many coordinators at once).

Labels are bounded: message types, reasons, outcomes and liveness states, never ids.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: Finer around the 1 ms goal of a routing decision, so that its p99 is read to 0.25 ms there.
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.002, 0.0025,
                    0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        r = self.registry
        self.message_latency = Histogram(
            "coordinator_message_latency_seconds",
            "Time from a message being sent to the coordinator having handled it.",
            ["message_type"], registry=r, buckets=LATENCY_BUCKETS,
        )
        self.active_agents = Gauge(
            "coordinator_active_agents", "Agents that are healthy (can take work).", registry=r
        )
        self.agents_by_liveness = Gauge(
            "coordinator_agents", "Known agents by liveness state.", ["liveness"], registry=r
        )
        self.operations = Counter(
            "coordinator_operations_total", "Operations performed, by type.",
            ["operation_type"], registry=r,
        )
        self.messages_received = Counter(
            "coordinator_messages_received_total", "Valid messages handled, by type.",
            ["message_type"], registry=r,
        )
        self.messages_rejected = Counter(
            "coordinator_messages_rejected_total",
            "Inbound messages rejected and dead-lettered, by reason.", ["reason"], registry=r,
        )
        self.messages_published = Counter(
            "coordinator_messages_published_total", "Messages published, by type.",
            ["message_type"], registry=r,
        )
        self.batch_items = Histogram(
            "coordinator_batch_items", "Items per batch message (PROTOCOL.md §9.13), by "
            "direction: received or sent.", ["direction"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.publish_errors = Counter(
            "coordinator_publish_errors_total", "Publishes that failed, by kind of failure.",
            ["error"], registry=r,
        )
        self.tasks = Counter(
            "coordinator_tasks_total", "Tasks that reached an end, by outcome.",
            ["outcome"], registry=r,
        )
        self.tasks_submitted = Counter(
            "coordinator_tasks_submitted_total", "Tasks accepted.", registry=r
        )
        self.task_retries = Counter(
            "coordinator_task_retries_total", "Attempts that ended without success and were "
            "retried, by reason.", ["reason"], registry=r,
        )
        self.task_duration = Histogram(
            "coordinator_task_duration_seconds", "Submit-to-finish time of tasks, by outcome.",
            ["outcome"], registry=r, buckets=TASK_BUCKETS,
        )
        self.tasks_active = Gauge(
            "coordinator_tasks_active", "Tasks not yet finished, by status.", ["status"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "coordinator_broker_connected", "1 while the broker is connected and confirms "
            "publishes, and not every agent has fallen silent at once.", registry=r
        )
        # --- high availability (docs/HA.md) ---
        self.leader = Gauge(
            "coordinator_leader", "1 while this coordinator leads its name; 0 as a standby.",
            registry=r,
        )
        self.epoch = Gauge(
            "coordinator_epoch", "Fencing epoch of the current leadership term (0 before any).",
            registry=r,
        )
        self.takeovers = Counter(
            "coordinator_takeovers_total", "Times this coordinator became the leader.",
            registry=r,
        )
        self.log_lag = Gauge(
            "coordinator_log_lag_events", "Replicated log entries (batches of events) not yet "
            "applied to this coordinator's store; 0 without HA.", registry=r,
        )
        # --- reliability (docs/RELIABILITY.md) ---
        self.duplicate_executions = Counter(
            "coordinator_duplicate_executions_total", "Attempts that started while an earlier "
            "attempt of the same task had started too: work run more than once.", registry=r,
        )
        self.tasks_quarantined = Counter(
            "coordinator_tasks_quarantined_total", "Poison tasks failed and dead-lettered "
            "after crashing their agents.", registry=r,
        )
        self.store_errors = Counter(
            "coordinator_store_errors_total", "Task store writes that failed, by the message "
            "type that needed them.", ["message_type"], registry=r,
        )
        self.broker_reconnects = Counter(
            "coordinator_broker_reconnects_total", "Broker connections re-established.",
            registry=r,
        )
        # --- discovery (ServiceRegistry) ---
        self.registry_up = Gauge(
            "coordinator_registry_up",
            "1 while the service registry (Consul) answers; 0 when degraded or not configured.",
            registry=r,
        )
        self.registry_errors = Counter(
            "coordinator_registry_errors_total", "Failed calls to the service registry, by "
            "operation.", ["operation"], registry=r,
        )
        self.agent_in_flight = Gauge(
            "coordinator_agent_in_flight", "Tasks in flight on live agents, by agent kind.",
            ["kind"], registry=r,
        )
        self.agent_capacity = Gauge(
            "coordinator_agent_capacity", "Task slots of assignable agents, by agent kind.",
            ["kind"], registry=r,
        )
        self.api_auth_failures = Counter(
            "coordinator_api_auth_failures_total", "Write requests to the HTTP API refused for "
            "their bearer token, by reason: missing or invalid.", ["reason"], registry=r,
        )
        # --- routing (CoordinationPlanner) ---
        self.routing_decisions = Counter(
            "coordinator_routing_decisions_total", "Routing decisions, by chosen kind and "
            "whether the fallback kind was used.", ["kind", "fallback"], registry=r,
        )
        self.routing_confidence = Histogram(
            "coordinator_routing_confidence", "Confidence of the chosen kind per decision.",
            registry=r, buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        )
        self.routing_fallbacks = Counter(
            "coordinator_routing_fallbacks_total", "Decisions that used the fallback kind "
            "or moved to the next alternative, by reason.", ["reason"], registry=r,
        )
        self.routing_accuracy = Gauge(
            "coordinator_routing_accuracy_ratio",
            "Share of routed tasks that succeeded on the first attempt.", registry=r,
        )
        self.routing_fallback_rate = Gauge(
            "coordinator_routing_fallback_ratio", "Share of decisions that used a fallback.",
            registry=r,
        )
        self.routing_average_confidence = Gauge(
            "coordinator_routing_confidence_average", "Mean confidence of the chosen kinds.",
            registry=r,
        )
        self.routing_kind_success = Gauge(
            "coordinator_routing_kind_success_ratio", "Learned success rate, by agent kind.",
            ["kind"], registry=r,
        )
        self.routing_kind_confidence = Gauge(
            "coordinator_routing_kind_confidence_average",
            "Mean confidence of decisions that chose each kind, since start.", ["kind"],
            registry=r,
        )
        self.multi_master_tasks = Counter(
            "coordinator_routing_multi_master_tasks_total",
            "Tasks run on two kinds at once because their confidences were close, by mode "
            "(race or merge).", ["mode"], registry=r,
        )
        self.escalations = Counter(
            "coordinator_escalations_total", "Tasks that exhausted their fallback chain.",
            registry=r,
        )
        # --- scheduling and fleet-wide limits (coordinator/scheduling.py, limits.py) ---
        self.limit_held = Counter(
            "coordinator_limit_held_total", "Dispatch decisions held back by a fleet-wide "
            "limit, by limit.", ["limit"], registry=r,
        )
        self.admission_refused = Counter(
            "coordinator_admission_refused_total",
            "Submissions refused because the submitter was past its backlog limit.", registry=r,
        )
        self.intake_held = Counter(
            "coordinator_intake_held_total",
            "Submissions held before intake: their principal was past its read-ahead while "
            "others had work (scheduling.read_ahead).", registry=r,
        )
        self.task_wait = Histogram(
            "coordinator_task_wait_seconds", "Time a task waited in the queue before an "
            "assignment, by priority band.", ["priority"], registry=r, buckets=TASK_BUCKETS,
        )
        # --- the operator's desk (coordinator/desk.py) ---
        self.desk_actions = Counter(
            "coordinator_desk_actions_total", "Tasks escalated to the desk, and operator "
            "actions on tasks, by action.", ["action"], registry=r,
        )
        self.escalated_oldest = Gauge(
            "coordinator_escalated_oldest_seconds",
            "How long the longest-waiting escalated task has waited for an operator.", registry=r,
        )
        self.escalated_overdue = Gauge(
            "coordinator_escalated_overdue",
            "Escalated tasks waiting longer than escalation.overdue_after_s.", registry=r,
        )
        # --- the agent spawner (coordinator/spawner.py) ---
        self.desired_agents = Gauge(
            "coordinator_desired_agents", "Agents the spawner wants, by kind (KEDA scales "
            "agent Deployments on it).", ["kind"], registry=r,
        )
        self.spawned_agents = Gauge(
            "coordinator_spawned_agents", "Agent processes the local spawner runs, by kind.",
            ["kind"], registry=r,
        )
        self.spawner_restarts = Counter(
            "coordinator_spawner_restarts_total", "Spawned agents restarted after a crash, by "
            "kind.", ["kind"], registry=r,
        )
        self._fleet_scale(r)

    def _fleet_scale(self, r: CollectorRegistry) -> None:
        """What an overloaded coordinator does instead of declaring healthy agents dead."""
        self.status_lag = Gauge(
            "coordinator_status_lag_seconds", "How far behind the coordinator handles its agents' "
            "reports (age of recent heartbeats when handled, or its own loop's delay).",
            registry=r)
        self.liveness_paused = Gauge(
            "coordinator_liveness_paused", "1 while silence verdicts are paused because the "
            "coordinator is behind on its agents' reports.", registry=r)
        self.status_shed = Counter(
            "coordinator_status_shed_total", "Repeat heartbeats acked unread while the "
            "coordinator was behind.", registry=r)
        self.heartbeats_missing = Counter(
            "coordinator_heartbeats_missing_total", "Heartbeats that never reached the "
            "coordinator, from gaps in the agents' own stamps (expired in the status queue, "
            "shed, or not sent).", registry=r)
        self.dispatch_decision = Histogram(
            "coordinator_dispatch_decision_seconds", "Time to route one pending task to an "
            "agent of the fleet as it is (wall time).", registry=r, buckets=DECISION_BUCKETS)
        self.dispatch_decision_cpu = Histogram(
            "coordinator_dispatch_decision_cpu_seconds", "CPU time the coordinator spent on "
            "one routing decision (its own cost, without waiting for a CPU).", registry=r,
            buckets=DECISION_BUCKETS)
        self.dispatch_decision_slow = Counter(
            "coordinator_dispatch_decision_slow_total", "Routing decisions over 1 ms of wall "
            "time, by likeliest cause.", ["cause"], registry=r)

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, kept: ``labels()`` checks its arguments and takes a lock
        on every call, several times per task. Only for metrics never cleared (labels are
        bounded, so is this)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
