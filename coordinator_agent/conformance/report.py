"""What a conformance run found: one verdict per rule, as text for people and JSON for scripts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Verdict(enum.Enum):
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"
    #: The rule does not apply yet (e.g. epochs before HA): never counted as a pass.
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class RuleResult:
    rule: str
    verdict: Verdict
    detail: str = ""


@dataclass
class Report:
    target: str  # "agent" or "client"
    peer: str
    results: list[RuleResult] = field(default_factory=list)

    def add(self, rule: str, ok: bool, detail: str = "") -> None:
        self.results.append(RuleResult(rule, Verdict.PASS if ok else Verdict.FAIL, detail))

    def not_applicable(self, rule: str, detail: str) -> None:
        self.results.append(RuleResult(rule, Verdict.NOT_APPLICABLE, detail))

    def verdict(self, rule: str) -> Verdict:
        return next(r.verdict for r in self.results if r.rule == rule)

    @property
    def passed(self) -> bool:
        return all(r.verdict is not Verdict.FAIL for r in self.results)

    def as_json(self) -> dict[str, Any]:
        return {"target": self.target, "id": self.peer, "passed": self.passed,
                "rules": [{"rule": r.rule, "status": r.verdict.value, "detail": r.detail}
                          for r in self.results]}

    def as_text(self) -> str:
        width = max((len(r.rule) for r in self.results), default=0)
        label = {Verdict.PASS: "pass", Verdict.FAIL: "FAIL", Verdict.NOT_APPLICABLE: "n/a "}
        lines = [f"conformance of {self.target} {self.peer}:"]
        lines += [f"  {label[r.verdict]}  {r.rule.ljust(width)}  {r.detail}".rstrip()
                  for r in self.results]
        failed = sum(r.verdict is Verdict.FAIL for r in self.results)
        lines.append("all rules passed" if not failed else f"{failed} rule(s) failed")
        return "\n".join(lines)
