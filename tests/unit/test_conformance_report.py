"""The conformance kit's pure parts: judging overlap from result times, the report, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator_agent.cli.main import build_parser, main
from coordinator_agent.conformance import Report, Verdict
from coordinator_agent.conformance.agent import RULES, max_overlap, running_intervals
from coordinator_agent.conformance.client import RULES as CLIENT_RULES


def test_max_overlap_counts_intervals_open_at_once() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (2, 3)]) == 1
    assert max_overlap([(0, 2), (1, 3), (1.5, 4)]) == 3
    assert max_overlap([(0, 1), (1, 2)]) == 1  # touching is not overlapping


def test_a_compliant_agent_never_looks_over_its_limit() -> None:
    # Limit 2, three 1.5 s sleeps: two end at 1.5 s (+ latency), the third starts then.
    sleep = 1.5
    results = [1.5 + 0.05, 1.5 + 0.2, 3.0 + 0.01]
    assert max_overlap(running_intervals(results, sleep)) == 2


def test_an_agent_over_its_limit_is_seen() -> None:
    # Limit 2, yet all three ran at once: their results arrive together.
    sleep = 1.5
    results = [1.52, 1.55, 1.6]
    assert max_overlap(running_intervals(results, sleep)) == 3


def test_report_json_and_text() -> None:
    report = Report("agent", "agent-7")
    report.add("hello", True, "kind general")
    report.add("cancel", False, "it sent a result for a cancelled attempt")
    report.not_applicable("wrong_epoch", "not yet")
    assert not report.passed
    assert report.verdict("wrong_epoch") is Verdict.NOT_APPLICABLE
    data = report.as_json()
    assert data == {"target": "agent", "id": "agent-7", "passed": False, "rules": [
        {"rule": "hello", "status": "pass", "detail": "kind general"},
        {"rule": "cancel", "status": "fail",
         "detail": "it sent a result for a cancelled attempt"},
        {"rule": "wrong_epoch", "status": "n/a", "detail": "not yet"}]}
    json.dumps(data)
    text = report.as_text()
    assert "FAIL  cancel" in text and "n/a   wrong_epoch" in text
    assert text.endswith("1 rule(s) failed")


def test_not_applicable_alone_is_not_a_failure_but_never_a_pass() -> None:
    report = Report("agent", "a")
    report.not_applicable("wrong_epoch", "later")
    assert report.passed
    assert report.as_json()["rules"][0]["status"] != "pass"


def test_the_rules_are_the_documented_ones() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    agent_section = doc.split("### 19.1", 1)[1].split("### 19.2", 1)[0]
    client_section = doc.split("### 19.2", 1)[1]
    assert [r for r in RULES if f"| `{r}` |" in agent_section] == list(RULES)
    assert [r for r in CLIENT_RULES if f"| `{r}` |" in client_section] == list(CLIENT_RULES)


def test_cli_parses_both_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["conformance", "agent", "--id", "a-1", "--kind", "k",
                                      "--json"])
    assert (args.command, args.target, args.peer, args.kind, args.json, args.wait) == (
        "conformance", "agent", "a-1", "k", True, 30.0)
    monkeypatch.setenv("COORDINATOR_CONFORMANCE_ID", "ops")
    monkeypatch.setenv("COORDINATOR_CONFORMANCE_TASKS", "3")
    args = build_parser().parse_args(["conformance", "client"])
    assert (args.target, args.peer, args.tasks) == ("client", "ops", 3)


def test_cli_refuses_a_bad_count_with_exit_code_2(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    (tmp_path / "absent.yaml").write_text("{}\n")
    monkeypatch.setenv("COORDINATOR_CONFIG", str(tmp_path / "absent.yaml"))
    assert main(["conformance", "client", "--id", "ops", "--tasks", "0"]) == 2
    assert "--tasks at least 1" in capsys.readouterr().err
