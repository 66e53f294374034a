"""Metrics.child: a labelled child is looked up once and kept; what it counts is exported."""

from __future__ import annotations

from coordinator_agent.ops.metrics import Metrics


def test_a_kept_child_is_the_one_labels_gives_and_counts_into_the_export() -> None:
    metrics = Metrics()
    first = metrics.child(metrics.operations, "task_submit")
    assert metrics.child(metrics.operations, "task_submit") is first
    assert first is metrics.operations.labels("task_submit")
    assert metrics.child(metrics.operations, "task_assign") is not first
    for _ in range(3):
        metrics.child(metrics.operations, "task_submit").inc()
    metrics.child(metrics.routing_decisions, "general", "false").inc()
    text = metrics.render().decode()
    assert 'coordinator_operations_total{operation_type="task_submit"} 3.0' in text
    assert 'coordinator_routing_decisions_total{fallback="false",kind="general"} 1.0' in text
