"""`coordinator-agent route` and `routing`: explanations a person and a script can read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator_agent.cli.routing import route_explanation, routing_summary


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"COORDINATOR_CONFIG": str(cwd / "empty.yaml"), "COORDINATOR_DATA_DIR": str(cwd),
           "COORDINATOR_MONITORING_PORT": "1", "PATH": "/usr/bin:/bin"}
    (cwd / "empty.yaml").write_text("{}\n")
    return subprocess.run([sys.executable, "-m", "coordinator_agent", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("description", "kind"), [
    ("Scan repository for CVE-2024-12345 vulnerability", "security"),
    ("Deploy release 2.3 to staging", "cicd"),
    ("Refactor the payment module", "development"),
])
def test_route_explains_offline_from_the_configuration(
    tmp_path: Path, description: str, kind: str
) -> None:
    done = run_cli("route", description, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    explained = json.loads(done.stdout)
    assert explained["kind"] == kind
    assert explained["source"].startswith("local")
    assert explained["policy"] == "bandit"
    # Per kind: the prior from the text, the evidence, the exploration term, the probability.
    assert set(explained["kinds"][kind]["parts"]) >= {"prior", "prior_success", "successes",
                                                      "failures", "exploration", "chance",
                                                      "probability"}
    # Nobody listens on port 1: it says so, and carries on without the coordinator.
    assert "cannot reach the coordinator" in done.stderr


def test_route_table_names_kind_agent_and_reason() -> None:
    text = route_explanation({
        "analysis": {"keywords": ["deploy"], "category": "operation", "complexity": "low",
                     "urgency": "normal", "domains": ["cicd"]},
        "kinds": {"cicd": {"confidence": 0.8, "parts": {"pattern": 0.1, "domain": 1.0,
                                                        "complexity": 1.0, "workload": 0.0}},
                  "general": {"confidence": 0.6, "parts": {}}},
        "kind": "cicd", "agent": "cicd-1", "reason": "confident", "threshold": 0.6,
        "source": "coordinator",
    })
    lines = text.splitlines()
    assert lines.index(next(ln for ln in lines if ln.startswith("cicd"))) < lines.index(
        next(ln for ln in lines if ln.startswith("general")))
    assert "kind       cicd -> agent cicd-1" in text and "+0.100" in text


def test_route_table_of_the_bandit_policy_shows_prior_evidence_exploration() -> None:
    parts = {"prior": 0.5, "prior_success": 0.55, "successes": 3.0, "failures": 1.0,
             "exploration": 0.08, "chance": 0.7, "probability": 0.72}
    text = route_explanation({
        "analysis": {"keywords": ["deploy"]}, "policy": "bandit",
        "kinds": {"cicd": {"confidence": 0.72, "parts": parts}},
        "kind": "cicd", "reason": "confident", "threshold": 0.2, "source": "local",
        "workflow": [{"description": "implement", "kind": "development"},
                     {"description": "deploy", "kind": "cicd"}],
    })
    assert "PRIOR P(KIND|TEXT)" in text and "3.0/1.0" in text and "+-0.080" in text
    assert "0.720" in text and "workflow   development ('implement') -> cicd ('deploy')" in text


def test_routing_summary_with_and_without_history() -> None:
    assert "(nothing learned yet)" in routing_summary({})
    text = routing_summary({"decisions": 10, "accuracy": 0.9, "first_tries": 10,
                            "first_try_successes": 9, "fallback_rate": 0.1,
                            "average_confidence": 0.72, "outcomes_stored": 12,
                            "kinds": {"security": {"success_rate": 0.75, "outcomes": 4,
                                                   "mean_duration_s": 0.5}},
                            "average_confidence_by_kind": {"security": 0.71}})
    assert "first-try success 90.0% (9/10)" in text and "fallback rate 10.0%" in text
    assert "security" in text and "75.0%" in text and "0.710" in text


def test_routing_summary_rounds_decayed_outcome_counts() -> None:
    kinds = {"cicd": {"success_rate": 0.9, "outcomes": 26.999},
             "security": {"success_rate": 0.5, "outcomes": 3.25},
             "general": {"success_rate": 0.5, "outcomes": 4}}
    rows = {line.split()[0]: line.split() for line in
            routing_summary({"kinds": kinds}).splitlines()[2:]}
    assert rows["cicd"][2] == "27" and rows["security"][2] == "3.2"
    assert rows["general"][2] == "4"


def test_routing_replay_reads_the_decision_log_of_the_store(tmp_path: Path) -> None:
    import random

    from coordinator_agent.coordinator.state import AgentRecord
    from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
    from coordinator_agent.routing.planner import CoordinationPlanner

    store = tmp_path / "logged.sqlite3"
    planner = CoordinationPlanner(8, store_path=store, rng=random.Random(1))
    agents = [AgentRecord(f"{k}-1", k, frozenset(), 8) for k in ("cicd", "general")]
    for i in range(40):
        task = TaskRecord(id=f"t-{i}", description="Deploy the billing service")
        decision = planner.select(task, agents)
        assert decision.agent is not None
        ok = decision.kind == "cicd"
        task.attempts.append(Attempt(1, decision.agent.id, 0.0, 1.0, outcome=(
            AttemptOutcome.SUCCEEDED if ok else AttemptOutcome.FAILED)))
        planner.record_outcome(task, decision.agent, ok)
    planner.close()
    other = tmp_path / "seed.yaml"
    other.write_text("kinds: {cicd: {keywords: [deploy]}, general: {}}\npolicy: seed\n")
    done = run_cli("routing", "replay", "--config", str(other), "--store", str(store), "--json",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["decisions"] == 40 and result["target_policy"] == "seed"
    assert set(result) >= {"logged", "ips", "doubly_robust", "effective_sample_size"}
    low, high = result["ips"]["ci95"]
    assert low <= result["ips"]["estimate"] <= high
    text = run_cli("routing", "replay", "--config", str(other), "--store", str(store),
                   cwd=tmp_path)
    assert text.returncode == 0 and "target, DR" in text.stdout
    # It names what it evaluates: the configuration file and its policy, and the log.
    assert f"target {other}   policy seed" in text.stdout and str(store) in text.stdout
    assert result["target_config"] == str(other) and result["store"] == str(store)
    assert "target, SNIPS" in text.stdout and "bootstrap seed 0" in text.stdout
    missing = run_cli("routing", "replay", "--store", str(tmp_path / "none.sqlite3"),
                      cwd=tmp_path)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


@pytest.mark.parametrize("description", ["", "   ", "deploy " * 1200])
def test_route_refuses_a_description_no_task_could_have(tmp_path: Path, description: str) -> None:
    # `submit` refuses these (a description is 1 to 8192 characters), and so does the
    # coordinator's /api/route: `route` says so instead of explaining a task that cannot exist.
    for local in ([], ["--local"]):
        done = run_cli("route", description, "--json", *local, cwd=tmp_path)
        assert done.returncode == 2, (local, done.stdout[:200])
        assert "1 to 8192 characters" in done.stderr and done.stdout == ""
        assert "Traceback" not in done.stderr


def test_route_words_for_agents_that_are_not_healthy_do_not_call_them_busy() -> None:
    from coordinator_agent.cli.routing import NO_AGENT
    from coordinator_agent.coordinator.state import AgentLiveness, AgentRecord
    from coordinator_agent.routing.planner import CoordinationPlanner

    planner = CoordinationPlanner(8)
    silent = AgentRecord("cicd-1", "cicd", frozenset(), 8)
    silent.liveness = AgentLiveness.SUSPECT  # idle, and not heard lately: not busy
    explained = planner.explain("Deploy the billing service", [silent])
    planner.close()
    words = NO_AGENT[explained["reason"]]
    assert "healthy" in words and "coordinator-agent agents" in words


def test_route_under_the_seed_policy_names_the_kind_the_seed_formula_picks(
    tmp_path: Path,
) -> None:
    # The seed formula does not read the text prior: with nothing learned, `route --local`
    # must still say what the seed formula would choose, not what the text prior prefers.
    from coordinator_agent.routing.config import load_routing_config
    from coordinator_agent.routing.planner import CoordinationPlanner

    packaged = Path(__file__).parents[2] / "coordinator_agent/routing/data/routing.yaml"
    seed = tmp_path / "seed.yaml"
    seed.write_text(packaged.read_text().replace("\npolicy: bandit\n", "\npolicy: seed\n"))
    description = "Okta SSO login loop for contractors in the EU tenant"
    planner = CoordinationPlanner(8, config=load_routing_config(seed))
    expected = planner.explain(description)["kind"]
    planner.close()
    env = {"COORDINATOR_CONFIG": str(tmp_path / "none.yaml"), "COORDINATOR_DATA_DIR":
           str(tmp_path), "COORDINATOR_ROUTING_CONFIG": str(seed), "PATH": "/usr/bin:/bin"}
    (tmp_path / "none.yaml").write_text("{}\n")
    done = subprocess.run([sys.executable, "-m", "coordinator_agent", "route", description,
                           "--local", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    explained = json.loads(done.stdout)
    assert explained["policy"] == "seed"
    assert explained["kind"] == expected


PHASED = ("Rotate the Vault root token, then redeploy payments-api with ArgoCD, finally write "
          "the runbook")


def test_route_of_a_multi_phase_description_says_it_runs_as_its_steps(tmp_path: Path) -> None:
    done = run_cli("route", PHASED, "--local", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    explained = json.loads(done.stdout)
    # `kind` stays the kind of the description whole; `runs_as` says what a task would run as.
    assert explained["kind"] == "security" and explained["runs_as"] == "workflow"
    assert [s["kind"] for s in explained["workflow"]] == ["security", "cicd", "documentation"]
    text = run_cli("route", PHASED, "--local", cwd=tmp_path).stdout
    assert "runs as    workflow: a task with this description runs as these 3 steps" in text
    assert "kind       security (the description whole: see runs as)" in text
    # Locally the fleet is unknown: it says on what the split depends.
    assert "not checked here: the coordinator splits it only when a live agent runs" in text
    single = json.loads(run_cli("route", "Deploy release 2.3 to staging", "--local", "--json",
                                cwd=tmp_path).stdout)
    assert single["runs_as"] == "task" and single["workflow"] is None
    # Asking for capabilities (or a kind), a task is not split, and route says so.
    asking = json.loads(run_cli("route", PHASED, "--local", "--json", "--capability", "vault",
                                cwd=tmp_path).stdout)
    assert asking["workflow"] is None and asking["runs_as"] == "task"


def test_route_table_says_a_workflow_runs_whole_when_a_step_kind_has_no_agent() -> None:
    text = route_explanation({
        "kinds": {}, "kind": "security", "agent": "sec-1", "reason": "confident",
        "source": "coordinator", "runs_as": "task", "workflow_missing_kinds": ["cicd"],
        "workflow": [{"description": "audit", "kind": "security"},
                     {"description": "deploy", "kind": "cicd"}],
    })
    assert "runs as    task: no live agent of kind cicd" in text
    assert "kind       security -> agent sec-1\n" in text
    live = route_explanation({
        "kinds": {}, "kind": "security", "agent": "sec-1", "reason": "confident",
        "source": "coordinator", "runs_as": "workflow", "workflow_missing_kinds": [],
        "workflow": [{"description": "audit", "kind": "security"},
                     {"description": "deploy", "kind": "cicd"}],
    })
    assert "runs as    workflow: a task with this description runs as these 2 steps" in live
    assert "not checked here" not in live


def test_route_locally_notes_a_kind_the_configuration_does_not_list_and_capabilities(
    tmp_path: Path,
) -> None:
    args = ("route", "Deploy the api", "--local", "--kind", "frobnicator", "--capability",
            "gpu", "--capability", "cuda")
    done = run_cli(*args, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    explained = json.loads(done.stdout)
    # A note, not an error: agents may announce kinds the configuration does not list.
    assert explained["kind"] == "frobnicator" and explained["kind_configured"] is False
    assert explained["capabilities_checked"] is False
    assert any("'frobnicator' is not in the routing configuration" in n
               for n in explained["notes"])
    assert any("capabilities (gpu, cuda) cannot be checked without a coordinator" in n
               for n in explained["notes"])
    text = run_cli(*args, cwd=tmp_path).stdout
    assert "note       kind 'frobnicator' is not in the routing configuration (development," in text
    assert "note       capabilities (gpu, cuda) cannot be checked without a coordinator" in text
    # A listed kind and no capability: nothing to note.
    listed = json.loads(run_cli("route", "Deploy the api", "--local", "--kind", "cicd", "--json",
                                cwd=tmp_path).stdout)
    assert listed["kind_configured"] is True and "notes" not in listed
    assert "capabilities_checked" not in listed


def test_route_takes_labels_and_refuses_one_no_task_could_have(tmp_path: Path) -> None:
    done = run_cli("route", "Payouts delayed since Friday", "--local", "--json", "--label",
                   "Payments", "--label", "bug", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["contexts"]["names"][-2:] == ["l:payments", "l:bug"]
    refused = run_cli("route", "Payouts delayed", "--local", "--label", "two words",
                      cwd=tmp_path)
    assert refused.returncode == 2 and "--label: label 'two words'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_submit_refuses_bad_labels_before_it_needs_a_broker(tmp_path: Path) -> None:
    nine = [arg for i in range(9) for arg in ("--label", f"l{i}")]
    done = run_cli("submit", "Fix the login", *nine, cwd=tmp_path)
    assert done.returncode == 2 and "invalid task: labels" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
