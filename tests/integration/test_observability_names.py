"""Every metric the alert rules and the Grafana dashboard query is one a real coordinator exports.

A dashboard panel or an alert on a misspelt metric shows "no data" (or never fires) instead of
failing, so the names are compared here with the ``/metrics`` output of a coordinator started
on the real RabbitMQ and fetched over HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.metrics import MetricWrapperBase

from coordinator_agent.coordinator.service import CoordinatorAgent

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
K8S_COORDINATOR = ROOT / "deploy" / "k8s" / "coordinator.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "coordinator.json"

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: Labels Prometheus attaches at scrape time, and the bucket label of histograms.
TARGET_LABELS = {"job", "instance"}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
METRIC = re.compile(r"(?<![\w:])(coordinator_[A-Za-z0-9_]*)(?![\w:])")
SELECTOR = re.compile(r"(?<![\w:])(coordinator_[A-Za-z0-9_]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


# --- the queries --------------------------------------------------------------------------------


def rule_queries() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"{RULES.name}: {rule.get('alert') or rule.get('record')}", rule["expr"]


def dashboard_queries() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, object]]) -> Iterator[dict[str, object]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))  # type: ignore[arg-type]

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):  # type: ignore[attr-defined]
            yield f"{DASHBOARD.name}: panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            yield f"{DASHBOARD.name}: variable ${variable['name']}", query


def without_strings(expr: str) -> str:
    """Drop string literals (label values, regexes), which may look like metric names."""
    return STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(without_strings(expr)))


# --- what the coordinator exports ---------------------------------------------------------------


def exported_families(text: str) -> dict[str, str]:
    """name -> type, from the ``# TYPE`` lines (printed even for a labelled metric with no
    children yet, which has no sample lines)."""
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind.strip()
    return families


def sample_names(text: str) -> set[str]:
    return {
        re.split(r"[{\s]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def family_of(name: str, families: dict[str, str]) -> tuple[str, str] | None:
    """The exported family a series name belongs to, with the family's type. A `_bucket`,
    `_sum` or `_count` suffix is stripped only when what is left is a histogram (or summary):
    a gauge that happens to end in `_count` keeps its name."""
    if name in families:
        return name, families[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and families.get(base) in ("histogram", "summary"):
            if suffix == "_bucket" and families[base] == "summary":
                return None
            return base, families[base]
    return None


def exposition_labels(coordinator: CoordinatorAgent) -> dict[str, set[str]]:
    """Exposition name -> label names, from the coordinator's own metric objects."""
    labels: dict[str, set[str]] = {}
    for metric in vars(coordinator.metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name + ("_total" if metric._type == "counter" else "")
        labels[name] = set(metric._labelnames)
    return labels


async def fetch_metrics(coordinator: CoordinatorAgent) -> str:
    url = f"http://127.0.0.1:{coordinator.monitoring.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


# --- the tests ----------------------------------------------------------------------------------


def test_the_parser_strips_suffixes_only_from_histograms() -> None:
    families = {"a_seconds": "histogram", "b_count": "gauge", "c_total": "counter",
                "d": "summary"}
    assert family_of("a_seconds_bucket", families) == ("a_seconds", "histogram")
    assert family_of("a_seconds_count", families) == ("a_seconds", "histogram")
    assert family_of("b_count", families) == ("b_count", "gauge")
    assert family_of("b", families) is None
    assert family_of("c_total", families) == ("c_total", "counter")
    assert family_of("c_total_sum", families) is None
    assert family_of("d_sum", families) == ("d", "summary")
    assert family_of("d_bucket", families) is None
    assert metric_names(
        'sum by (le) (rate(coordinator_x_bucket{job="coordinator_fake"}[5m])) / '
        "coordinator_y_total unless coordinator_z:recorded"
    ) == {"coordinator_x_bucket", "coordinator_y_total"}


async def test_rules_and_dashboard_use_only_exported_metrics(
    coordinator: CoordinatorAgent,
) -> None:
    text = await fetch_metrics(coordinator)
    families = exported_families(text)
    samples = sample_names(text)
    assert "coordinator_active_agents" in families, text[:2000]

    queries = [*rule_queries(), *dashboard_queries()]
    assert len(queries) > 20, queries
    problems = []
    used: set[str] = set()
    for where, expr in queries:
        for name in sorted(metric_names(expr)):
            used.add(name)
            found = family_of(name, families)
            if found is None:
                problems.append(f"{where}: {name} is not exported by the coordinator")
            elif found[1] == "histogram" and name == found[0]:
                problems.append(f"{where}: {name} is a histogram: query {name}_bucket, "
                                f"_sum or _count")
    assert problems == [], "\n".join(problems)

    # The metrics the issue asks the dashboard to show are all there.
    dashboard_used = {n for _, e in dashboard_queries() for n in metric_names(e)}
    for name in ("coordinator_message_latency_seconds_bucket",
                 "coordinator_task_duration_seconds_bucket", "coordinator_agents",
                 "coordinator_agent_in_flight", "coordinator_agent_capacity",
                 "coordinator_routing_confidence_bucket", "coordinator_routing_fallbacks_total",
                 "coordinator_messages_rejected_total", "coordinator_registry_up",
                 "coordinator_tasks_total",
                 # scheduling and fleet-wide limits (coordinator/scheduling.py, limits.py)
                 "coordinator_task_wait_seconds_bucket", "coordinator_limit_held_total",
                 "coordinator_admission_refused_total",
                 # the operator's desk (coordinator/desk.py)
                 "coordinator_desk_actions_total", "coordinator_escalated_oldest_seconds",
                 "coordinator_escalated_overdue",
                 # the agent spawner (coordinator/spawner.py)
                 "coordinator_desired_agents", "coordinator_spawned_agents",
                 "coordinator_spawner_restarts_total"):
        assert name in dashboard_used, f"the dashboard does not show {name}"
    # Unlabelled metrics print samples right away: those the rules use are really there.
    for name in ("coordinator_active_agents", "coordinator_registry_up",
                 "coordinator_broker_connected"):
        assert name in used and name in samples, name


async def test_rules_and_dashboard_use_only_real_labels(coordinator: CoordinatorAgent) -> None:
    families = exported_families(await fetch_metrics(coordinator))
    labels = exposition_labels(coordinator)
    # The metric objects and the HTTP output agree, so the labels below are the exported ones.
    assert set(labels) == {name for name, kind in families.items()
                           if kind in ("counter", "gauge", "histogram", "summary")
                           and not (kind == "gauge" and name.endswith("_created"))}

    problems = []
    for where, expr in [*rule_queries(), *dashboard_queries()]:
        bare = without_strings(expr)
        in_query: set[str] = set()
        for name, matchers in SELECTOR.findall(bare):
            found = family_of(name, families)
            if found is None:
                continue  # reported by the test above
            allowed = labels[found[0]] | TARGET_LABELS | (
                {"le"} if name.endswith("_bucket") else set())
            for label in MATCHER_LABEL.findall(matchers):
                if label not in allowed:
                    problems.append(f"{where}: {name} has no label {label!r} "
                                    f"(it has {sorted(labels[found[0]])})")
        for name in metric_names(expr):
            found = family_of(name, families)
            if found is not None:
                in_query |= labels[found[0]] | ({"le"} if name.endswith("_bucket") else set())
        for grouping in GROUPING.findall(bare):
            for label in (part.strip() for part in grouping.split(",")):
                if label and label not in in_query | TARGET_LABELS:
                    problems.append(f"{where}: grouping by {label!r}, which none of its "
                                    f"metrics has")
    assert problems == [], "\n".join(problems)


async def test_the_k8s_probes_hit_real_endpoints(coordinator: CoordinatorAgent) -> None:
    (deployment,) = [doc for doc in yaml.safe_load_all(K8S_COORDINATOR.read_text())
                     if doc and doc["kind"] == "StatefulSet"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probes = {kind: container[kind]["httpGet"]["path"]
              for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == "/healthz" and probes["readinessProbe"] == "/readyz"
    async with aiohttp.ClientSession() as session:
        for kind, path in probes.items():
            url = f"http://127.0.0.1:{coordinator.monitoring.port}{path}"
            async with session.get(url) as response:
                assert response.status == 200, (kind, path, await response.text())
        # Without consumers the pod leaves the Service (readiness) but is not restarted
        # (liveness): the two probes must not be the same check.
        await coordinator.messages.stop_consuming()
        base = f"http://127.0.0.1:{coordinator.monitoring.port}"
        async with session.get(base + probes["readinessProbe"]) as response:
            assert response.status == 503, await response.text()
        async with session.get(base + probes["livenessProbe"]) as response:
            assert response.status == 200, await response.text()
