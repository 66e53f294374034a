"""Prometheus metrics in an injected CollectorRegistry (tests run many coordinators at once).

Labels are bounded: message types, reasons, outcomes and liveness states, never ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
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
            "coordinator_broker_connected", "1 while the broker connection is up.", registry=r
        )
        self.broker_reconnects = Counter(
            "coordinator_broker_reconnects_total", "Broker connections re-established.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
