"""The Prometheus alerting rules and config, checked and unit-tested with promtool.

promtool comes from Debian's `prometheus` package (`make tools` / `scripts/tools.sh promtool`).
A missing promtool fails these tests: rules nobody evaluated are not known to work.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULES_TEST = PROMETHEUS / "rules_test.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "coordinator.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH, so the alert rules cannot be checked. Install it with "
            "`make tools` (or `bash scripts/tools.sh promtool`: Debian package `prometheus`).",
            pytrace=False,
        )
    return path


def run(promtool: str, *args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout, result.stdout


def test_promtool_check_config_loads_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    assert f"Checking {RULES}" in result.stdout, result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_the_issue_asks_for_these_alerts() -> None:
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "CoordinatorDown": "up{",
        "CoordinatorNoHealthyAgents": "coordinator_active_agents == 0",
        "CoordinatorMessagesRejected": "coordinator_messages_rejected_total",
        "CoordinatorTaskFailureRateHigh": 'coordinator_tasks_total{outcome="failed"}',
        "CoordinatorRoutingFallbackRateHigh": "coordinator_routing_fallbacks_total",
        "CoordinatorBacklogGrowing": 'deriv(coordinator_tasks_active{status="pending"}',
        "CoordinatorRegistryDegraded": "coordinator_registry_up == 0",
        "CoordinatorEscalationsWaiting": "coordinator_escalated_overdue",
    }
    for alert, fragment in wanted.items():
        assert alert in rules, f"no alert {alert} in {RULES.name}"
        assert fragment in rules[alert], (alert, rules[alert])


def test_every_alert_is_actionable() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no `for:`; one bad scrape would page"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        assert "{{ $labels.instance }}" in annotations["summary"], (
            f"{name}: the summary should say which coordinator"
        )


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), f"alerts never expected to fire: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never expected to stay quiet: {sorted(names - quiet)}"
    assert firing | quiet <= names, f"tests name unknown alerts: {sorted((firing | quiet) - names)}"


def test_unit_tests_catch_an_alert_that_never_fires(promtool: str, tmp_path: Path) -> None:
    """Break each alert in turn (its expression can never match): promtool must notice."""
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    original = yaml.safe_load(RULES.read_text())
    for name in sorted(rule["alert"] for rule in alert_rules()):
        broken = json.loads(json.dumps(original))
        for group in broken["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == name:
                    rule["expr"] = "vector(1) == 0"
        (tmp_path / RULES.name).write_text(yaml.safe_dump(broken, sort_keys=False))
        result = run(promtool, "test", "rules", RULES_TEST.name, cwd=tmp_path)
        assert result.returncode != 0, f"rules_test.yml passes even when {name} never fires"
        assert name in result.stdout + result.stderr, result.stdout


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    filled = []
    for where, query in queries:
        expr = query.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        expr = re.sub(r"\$\{?instance\}?", ".+", expr)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        filled.append((where, expr))
    return filled


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool has no expression linter; recording rules built from the queries get one."""
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)
    ]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + "\n".join(
        f"{i}: {where}: {expr}" for i, (where, expr) in enumerate(queries)
    )
