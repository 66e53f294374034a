"""The conformance kit: judges an agent or a client in any language, rule by rule (PROTOCOL §19)."""

from __future__ import annotations

from coordinator_agent.conformance.agent import AgentConformance
from coordinator_agent.conformance.client import ClientConformance
from coordinator_agent.conformance.harness import Harness
from coordinator_agent.conformance.report import Report, RuleResult, Verdict

__all__ = ["AgentConformance", "ClientConformance", "Harness", "Report", "RuleResult", "Verdict"]
