"""CoordinationPlanner: which kind of agent, which agent, and what to do when an attempt fails.

A decision, cheapest step first:

1. Hard constraints (explicit ``kind``, ``required_capabilities``) filter the agents; the healthy
   ones (``AgentRecord.assignable``) are grouped by kind with their load. The whole fleet's
   grouping is kept current by folding in the agents the state logged as changed (see
   ``fleet.py``), so a decision does not walk ten thousand agents.
2. The description is analysed (``analysis.py``) and every kind with a healthy agent is scored::

       confidence = base + w_pattern * pattern + w_domain * domain
                    + w_complexity * complexity - w_workload * workload       (clipped to [0, 1])

   ``pattern`` is the learned term from ``patterns.py``: similarity- and recency-weighted success
   *centred on zero*, ``(2 x successes - outcomes) / (outcomes + prior)`` where every outcome
   counts with its similarity, its decay and (for successes) its quality. Centring matters: a
   plain success rate can only add confidence, so a kind that keeps failing would never lose
   its place. Centred, failures push the term towards -1, successes towards +1, and a kind
   nobody has tried sits at 0 (neutral). The prior (``learning.prior_weight`` neutral
   pseudo-outcomes) makes each success raise confidence a step smaller than the last, towards
   the bound ``base + w_pattern + ...``, and keeps one unlucky outcome from swinging a decision.
3. The best kind is taken when its confidence reaches ``threshold``; otherwise the configured
   fallback kind, when it has a healthy agent. The other kinds, best first, are the alternatives
   that :meth:`CoordinationPlanner.next_step` walks through when attempts fail.
4. Within the kind (``fleet.py``): least loaded (or power of two choices) among healthy agents
   with a free slot, preferring agents that have not already failed this task. A busy kind is
   waited for rather than replaced by a worse one: its load already counts in its confidence.

Everything the decision used is written to ``task.routing`` (JSON-able) for operators.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator_agent.coordinator.state import AgentRecord, FleetLog
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.routing.analysis import TaskAnalysis, TaskAnalyzer
from coordinator_agent.routing.config import (
    Complexity,
    Policy,
    RoutingConfig,
    default_routing_config,
)
from coordinator_agent.routing.decision_cost import DecisionWork
from coordinator_agent.routing.decisions import DecisionLog
from coordinator_agent.routing.fleet import REFRESH_BUDGET, Fleet, Pool, pick
from coordinator_agent.routing.learner import BanditScore, Learner
from coordinator_agent.routing.patterns import UPSERT_CLUSTER, Outcome, PatternStore
from coordinator_agent.routing.phases import split_phases
from coordinator_agent.routing.policy import Choice
from coordinator_agent.routing.updates import LearningUpdate

#: Attempts that say nothing about the kind: never delivered, overtaken, or cancelled.
NOT_LEARNED = frozenset({AttemptOutcome.RUNNING, AttemptOutcome.UNDELIVERABLE,
                         AttemptOutcome.SUPERSEDED, AttemptOutcome.CANCELLED})
FAILURES = frozenset({AttemptOutcome.FAILED, AttemptOutcome.TIMEOUT, AttemptOutcome.AGENT_LOST})
MAX_ALTERNATIVES_RECORDED = 8
OTHER_KIND = "other"
_COUNTERS = ("decisions", "fallbacks", "confidence_sum", "first_tries", "first_try_successes")


@dataclass(frozen=True)
class RoutingDecision:
    agent: AgentRecord | None
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    confidence: float | None = None
    fallback_used: bool = False


class Router(Protocol):
    """A custom router replaces the learned choice (used when given to the planner)."""

    def choose(self, task: TaskRecord, candidates: Sequence[AgentRecord]) -> RoutingDecision: ...

    def record_outcome(self, task: TaskRecord, agent: AgentRecord | None, success: bool) -> None:
        ...


def matches(task: TaskRecord, agent: AgentRecord) -> bool:
    """Hard constraints: explicit kind and every required capability."""
    if task.kind is not None and agent.kind != task.kind:
        return False
    return agent.capabilities.issuperset(task.required_capabilities)


@dataclass(frozen=True, slots=True)
class KindScore:
    """One kind's confidence and the parts it is made of (factors before weighting)."""

    kind: str
    confidence: float
    raw: float  # before clipping; ranks kinds that both clip at 1.0
    pattern: float
    evidence: float
    success_rate: float | None
    domain: float
    complexity: float
    workload: float

    def parts(self) -> dict[str, Any]:
        rate = None if self.success_rate is None else round(self.success_rate, 4)
        return {"pattern": round(self.pattern, 4), "evidence": round(self.evidence, 3),
                "success_rate": rate, "domain": round(self.domain, 4),
                "complexity": self.complexity, "workload": round(self.workload, 4),
                "raw": round(self.raw, 4)}


Score = KindScore | BanditScore


class FallbackAction(enum.StrEnum):
    RETRY = "retry"  # same kind again, after delay_s
    ALTERNATIVE = "alternative"  # the next kind of the recorded decision
    ESCALATE = "escalate"  # give up: the task fails with its chain recorded


@dataclass(frozen=True, slots=True)
class FallbackStep:
    action: FallbackAction
    kind: str | None
    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class _Plan:
    analysis: TaskAnalysis
    scores: Sequence[Score]  # best first
    chosen: Score
    fallback_used: bool
    label: str  # short, bounded: metrics and RoutingDecision.reason
    reason: str  # for people
    propensity: float = 1.0  # P(this choice | the policy), for the decision log


class CoordinationPlanner:
    """Routes tasks and learns from their outcomes; see the module docstring."""

    def __init__(
        self,
        in_flight_cap: int,
        router: Router | None = None,
        *,
        config: RoutingConfig | None = None,
        store_path: Path | str | None = None,
        store: PatternStore | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.in_flight_cap = in_flight_cap
        self.router = router
        self.config = config if config is not None else default_routing_config()
        learning = self.config.learning
        self.store = store if store is not None else PatternStore(
            store_path, half_life_s=learning.decay_half_life_s,
            partial_match_weight=learning.partial_match_weight,
            max_outcomes=learning.max_outcomes,
        )
        self.analyzer = TaskAnalyzer(self.config)
        self.learner = Learner(self.config, self.analyzer, self.store)
        self.decisions = DecisionLog(self.store, max_rows=learning.max_outcomes)
        self.metrics = metrics
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._kind_complexity: dict[str, frozenset[Complexity]] = {
            kind: frozenset(spec.complexity) for kind, spec in self.config.kinds.items()
        }
        self._labels: set[str] = set(self.config.kinds) | {self.config.fallback_kind}
        self._fleet_cache: Fleet | None = None  # a part of the fleet (filtered by the caller)
        self._whole: Fleet | None = None  # the whole fleet, at a version (refresh_fleet)
        #: The state's log of changed agents: the whole fleet's grouping folds it in rather
        #: than regrouping (None: regrouped whenever the version moves).
        self.fleet_log: FleetLog | None = None
        #: What the last ``select`` did besides deciding (decision_cost.py reads it).
        self.work = DecisionWork()
        stored = self.store.counters()
        self._counters: dict[str, float] = {name: stored.get(name, 0.0) for name in _COUNTERS}
        self._unsaved = False  # decisions counted since the counters were last written
        #: Per kind: (decisions, sum of confidences), for the average confidence per kind.
        self._by_kind: dict[str, list[float]] = {}
        #: Called with every update the planner learned from (after it is applied): where the
        #: HA log can pick the leader's updates up for standbys (``apply_outcome``).
        self.outcome_hook: Callable[[LearningUpdate], None] | None = None

    # --- selection ----------------------------------------------------------------------------

    def select(self, task: TaskRecord, agents: Iterable[AgentRecord], *,
               fleet_version: int | None = None) -> RoutingDecision:
        """Pick an agent now and record why in ``task.routing``, or say why none can take it.

        ``fleet_version``: ``agents`` is the whole fleet as of that version of the state (its
        membership, kinds and assignability); its grouping is then reused as long as the
        version holds, and regrouped by ``refresh_fleet`` off the decision path when not.
        With ``fleet_log`` set (the dispatcher sets the state's), the agents the log says
        changed are folded into the grouping instead.
        """
        self.work.reset()
        if self.router is not None:
            return self._select_with_router(task, agents)
        if fleet_version is not None and self.fleet_log is not None:
            # The changed agents are folded in on the way: O(changes), not O(agents).
            folded = self._folded(self.fleet_log)
            folded.consulted = True
            return self._select(task, folded)
        if fleet_version is not None:
            whole = self._whole
            if whole is None or whole.version is None:
                whole = self._regroup(agents, fleet_version)
            whole.consulted = True
            decision = self._select(task, whole)
            if (decision.agent is None and whole.version != fleet_version
                    and time.monotonic() - whole.taken_at > self.config.agent_snapshot_s):
                # Stale, and not regrouped lately: a task nobody can take must not regroup
                # 10,000 agents on every wake while the fleet changes.
                decision = self._select(task, self._regroup(agents, fleet_version))
            return decision
        members = list(agents)
        decision = self._select(task, self._fleet(members))
        if decision.agent is None and self._fleet_cache is None:
            # The grouping was stale: regrouped, again.
            decision = self._select(task, self._fleet(members))
        return decision

    def refresh_fleet(self, agents: Iterable[AgentRecord], fleet_version: int) -> bool:
        """Keep the whole fleet's grouping current (called by the sweep, not per decision):
        regrouped (or the log folded in) when the version moved (then True), else only the
        loads re-read."""
        whole = self._whole
        if self.fleet_log is not None:
            moved = whole is None or whole.version != self.fleet_log.version
            whole = self._folded(self.fleet_log)
            if not moved and whole.consulted:  # a slice per sweep: a big fleet over a few
                whole.consulted = not whole.refresh_loads(time.monotonic(), REFRESH_BUDGET)
            return moved
        if whole is None or whole.version != fleet_version:
            self._regroup(agents, fleet_version)
            return True
        if whole.consulted:  # an idle fleet's loads are not worth re-reading 4 times a second
            whole.consulted = False
            whole.refresh_loads(time.monotonic())
        return False

    def fleet_kinds(
        self, fleet_version: int
    ) -> dict[str, Collection[tuple[AgentRecord, int, bool]]]:
        """The whole fleet by kind, as (agent, capacity, assignable) at ``fleet_version``; empty
        when no grouping of that version exists."""
        whole = self._whole
        if self.fleet_log is not None and self.fleet_log.version == fleet_version:
            whole = self._folded(self.fleet_log)
        if whole is None or whole.version != fleet_version:
            return {}
        return {kind: group.values() for kind, group in whole.by_kind.items()}

    def _regroup(self, agents: Iterable[AgentRecord], version: int) -> Fleet:
        self._whole = Fleet(list(agents), time.monotonic(), self.in_flight_cap, version=version)
        self.work.regrouped += len(self._whole.members)
        return self._whole

    def _folded(self, log: FleetLog) -> Fleet:
        """The whole fleet's grouping at ``log.version``: the changed agents folded in, or
        (first time, or too far behind the log) regrouped."""
        whole = self._whole
        was = whole.version if whole is not None else None
        if whole is None or not whole.fold(log):
            whole = self._whole = Fleet(list(log.agents.values()), time.monotonic(),
                                        self.in_flight_cap, version=log.version, log=log)
            self.work.regrouped += len(whole.members)
        elif was is not None:
            self.work.folded += log.version - was
        return whole

    def _select(self, task: TaskRecord, fleet: Fleet) -> RoutingDecision:
        key = (task.kind, frozenset(task.required_capabilities))
        self.work.view_built |= key not in fleet.views
        pools, able = fleet.view(*key)
        if not able:
            return RoutingDecision(None, "no_matching_agent")
        if not pools:
            return RoutingDecision(None, "no_free_agent")
        analysis = self.analyzer.analyze(task.description)
        plan = self._plan(task, analysis, {k: p.workload for k, p in pools.items()})
        chosen = plan.chosen
        pool = pools[chosen.kind]
        agent = self._pick(task, chosen.kind, pool)
        if agent is None:
            return RoutingDecision(None, "no_free_agent", {"kind": chosen.kind},
                                   kind=chosen.kind, confidence=chosen.confidence)
        details = self._record_decision(task, plan, agent, len(pool.entries))
        return RoutingDecision(agent, plan.label, details, kind=chosen.kind,
                               confidence=chosen.confidence, fallback_used=plan.fallback_used)

    def score_kinds(
        self, analysis: TaskAnalysis, workloads: Mapping[str, float], now: float | None = None
    ) -> list[KindScore]:
        """Confidence of each kind in ``workloads`` (kind -> load in [0, 1]), best first."""
        w = self.config.weights
        prior = self.config.learning.prior_weight
        when = self._clock() if now is None else now
        evidence = self.store.evidence(analysis.keywords, workloads, now=when)
        scores = []
        for kind, load in workloads.items():
            ev = evidence.get(kind)
            pattern = ev.pattern(prior) if ev is not None else 0.0
            domain = analysis.domain_match.get(kind, 0.0)
            handled = self._kind_complexity.get(kind)
            # A kind without a vocabulary entry is not known to be bad at anything.
            cx = 1.0 if handled is None or analysis.complexity in handled else 0.0
            raw = (w.base + w.pattern * pattern + w.domain * domain + w.complexity * cx
                   - w.workload * load)
            scores.append(KindScore(
                kind, min(1.0, max(0.0, raw)), raw, pattern,
                ev.weight if ev is not None else 0.0,
                ev.success_rate if ev is not None else None, domain, cx, load,
            ))
        fallback = self.config.fallback_kind
        # Rounded, so that float noise does not decide a tie: the fallback kind, then the name.
        scores.sort(key=lambda s: (-round(s.raw, 9), s.kind != fallback, s.kind))
        return scores

    def _fleet(self, members: list[AgentRecord]) -> Fleet:
        now = time.monotonic()
        fleet = self._fleet_cache
        if (fleet is None or now - fleet.taken_at > self.config.agent_snapshot_s
                or not fleet.same_members(members)):
            fleet = self._fleet_cache = Fleet(members, now, self.in_flight_cap)
            self.work.regrouped += len(members)
        return fleet

    def _plan(self, task: TaskRecord, analysis: TaskAnalysis,
              workloads: Mapping[str, float], *, explain: bool = False) -> _Plan:
        if self.config.policy is Policy.BANDIT:
            return self._plan_bandit(task, analysis, workloads, explain)
        scores = self.score_kinds(analysis, workloads)
        best = scores[0]
        threshold = self.config.threshold
        if task.kind is not None:
            return _Plan(analysis, scores, best, False, "explicit_kind",
                         f"the task asks for kind {task.kind!r}")
        pinned = task.routing.get("next_kind")
        for score in scores:
            if score.kind == pinned:
                return _Plan(analysis, scores, score, False, "fallback_chain",
                             f"fallback chain: {task.routing.get('next_action')} on {pinned!r}")
        if best.confidence >= threshold:
            return _Plan(analysis, scores, best, False, "confident",
                         f"{best.kind!r} at {best.confidence:.2f} reaches the threshold "
                         f"{threshold:.2f}")
        fallback = self.config.fallback_kind
        for score in scores:
            if score.kind == fallback:
                return _Plan(analysis, scores, score, True, "below_threshold",
                             f"best kind {best.kind!r} at {best.confidence:.2f} is below the "
                             f"threshold {threshold:.2f}: fallback kind {fallback!r}")
        return _Plan(analysis, scores, best, False, "no_fallback_agent",
                     f"best kind {best.kind!r} at {best.confidence:.2f} is below the threshold "
                     f"{threshold:.2f}, and the fallback kind {fallback!r} has no healthy "
                     f"agent: best kind taken")

    def _plan_bandit(self, task: TaskRecord, analysis: TaskAnalysis,
                     workloads: Mapping[str, float], explain: bool) -> _Plan:
        """``policy: bandit``: Thompson sampling over the predicted success (policy.py)."""
        self.work.prior_built |= not self.learner.prior_ready
        scores = self.learner.scores(task.description, analysis, workloads, self._clock(),
                                     chances=explain, labels=task.labels)
        # Best first for the fallback chain; equal probabilities in random order, not by name.
        keyed = [(-s.confidence, self._rng.random(), s) for s in scores]
        keyed.sort(key=lambda item: (item[0], item[1]))
        ranked = [s for _, _, s in keyed]
        if task.kind is not None:
            return _Plan(analysis, ranked, ranked[0], False, "explicit_kind",
                         f"the task asks for kind {task.kind!r}")
        pinned = task.routing.get("next_kind")
        for score in ranked:
            if score.kind == pinned:
                return _Plan(analysis, ranked, score, False, "fallback_chain",
                             f"fallback chain: {task.routing.get('next_action')} on {pinned!r}")
        if explain:
            # What the policy would most likely do, without drawing or counting anything.
            best = max(ranked, key=lambda s: (s.chance or 0.0, s.confidence))
            choice = Choice(best.kind, best.chance or 0.0,
                            "fallback" if best.kind == self.config.fallback_kind
                            and best.belief.probability < self.config.bandit.credible
                            else "greedy",
                            False, {})
        else:
            choice = self.learner.policy.choose([s.belief for s in ranked], self._rng,
                                                scale=ranked[0].exploration_scale)
        chosen = next(s for s in ranked if s.kind == choice.kind)
        p = chosen.confidence
        credible = self.config.bandit.credible
        if choice.label == "fallback":
            top = ranked[0]
            return _Plan(analysis, ranked, chosen, True, "no_credible_kind",
                         f"no kind is credible (best {top.kind!r} at {top.confidence:.2f} < "
                         f"{credible:.2f}): fallback kind {chosen.kind!r}", 1.0)
        if choice.label == "explore":
            return _Plan(analysis, ranked, chosen, False, "explore",
                         f"exploring {chosen.kind!r} (predicted success {p:.2f}, chosen with "
                         f"probability {choice.propensity:.2f}); best is {ranked[0].kind!r} at "
                         f"{ranked[0].confidence:.2f}", choice.propensity)
        return _Plan(analysis, ranked, chosen, False, "confident",
                     f"{chosen.kind!r}: predicted first-try success {p:.2f} (chosen with "
                     f"probability {choice.propensity:.2f})", choice.propensity)

    def _pick(self, task: TaskRecord, kind: str, pool: Pool) -> AgentRecord | None:
        """An agent of the pool (see ``fleet.pick``); a stale grouping is regrouped next time."""
        agent, stale = pick(task, kind, pool, cap=self.in_flight_cap,
                            balance=self.config.balance, rng=self._rng)
        if stale:
            self._fleet_cache = None  # the whole fleet's grouping: regrouped by refresh_fleet
        return agent

    def _record_decision(
        self, task: TaskRecord, plan: _Plan, agent: AgentRecord, candidates: int
    ) -> dict[str, Any]:
        chosen = plan.chosen
        confidence = round(chosen.confidence, 4)
        previous = task.routing
        chain = [*previous.get("chain", []), {
            "attempt": len(task.attempts) + 1, "kind": chosen.kind, "agent_id": agent.id,
            "confidence": confidence, "reason": plan.label,
        }]
        routing: dict[str, Any] = {
            "agent_id": agent.id,
            "kind": chosen.kind,
            "confidence": confidence,
            "policy": self.config.policy.value,
            "propensity": round(plan.propensity, 6),
            "parts": chosen.parts(),
            "threshold": self._threshold(),
            "fallback_used": plan.fallback_used,
            "reason": plan.reason,
            "alternatives": [
                {"kind": s.kind, "confidence": round(s.confidence, 4)}
                for s in plan.scores if s.kind != chosen.kind
            ][:MAX_ALTERNATIVES_RECORDED],
            "analysis": plan.analysis.to_dict(),
            "balance": self.config.balance.value,
            "candidates": candidates,
            "chain": chain,
        }
        if "learned" in previous:
            routing["learned"] = previous["learned"]
        task.routing = routing
        self._log(task, plan)
        counters = self._counters
        counters["decisions"] += 1
        counters["confidence_sum"] += chosen.confidence
        per_kind = self._by_kind.setdefault(chosen.kind, [0.0, 0.0])
        per_kind[0] += 1
        per_kind[1] += chosen.confidence
        self._unsaved = True
        if plan.fallback_used:
            counters["fallbacks"] += 1
        if self.metrics is not None:
            self.metrics.child(self.metrics.routing_decisions, self._label(chosen.kind),
                               "true" if plan.fallback_used else "false").inc()
            self.metrics.routing_confidence.observe(chosen.confidence)
            if plan.fallback_used:
                self.metrics.routing_fallbacks.labels(plan.label).inc()
        return routing

    def _threshold(self) -> float:
        if self.config.policy is Policy.BANDIT:
            return self.config.bandit.credible
        return self.config.threshold

    def _log(self, task: TaskRecord, plan: _Plan) -> None:
        # Plain tuples now; rounded and serialised when the log is written (decisions.py).
        candidates = [(s.kind, s.text, s.confidence, s.belief.std) if isinstance(s, BanditScore)
                      else (s.kind, None, s.confidence, None) for s in plan.scores]
        self.work.log_written |= self.decisions.add(
            task_id=task.id, attempt=len(task.attempts) + 1, at=self._clock(),
            policy=self.config.policy.value, reason=plan.label,
            description=task.description[: self.config.learning.max_description_chars],
            candidates=candidates, kind=plan.chosen.kind, propensity=plan.propensity,
            confidence=plan.chosen.confidence, labels=task.labels)

    def _select_with_router(
        self, task: TaskRecord, agents: Iterable[AgentRecord]
    ) -> RoutingDecision:
        assert self.router is not None
        able = [a for a in agents if matches(task, a)]
        if not able:
            return RoutingDecision(None, "no_matching_agent")
        ready = [a for a in able if a.assignable and a.free_slots(self.in_flight_cap) > 0]
        if not ready:
            return RoutingDecision(None, "no_free_agent")
        tried = {a.agent_id for a in task.attempts if a.outcome is not AttemptOutcome.SUCCEEDED}
        fresh = [a for a in ready if a.id not in tried]
        decision = self.router.choose(task, fresh or ready)
        task.routing = {"agent_id": decision.agent.id if decision.agent else None,
                        "reason": decision.reason, **decision.details}
        return decision

    # --- outcomes and fallback chains ---------------------------------------------------------

    def should_retry(self, task: TaskRecord) -> bool:
        return task.retries_left > 0

    def record_outcome(
        self, task: TaskRecord, agent: AgentRecord | None, success: bool, *,
        quality: float | None = None, duration_s: float | None = None,
    ) -> None:
        """Learn from the attempt that just ended (once per attempt, however often called).

        ``quality`` in [0, 1] scales a success (default 1); ``duration_s`` defaults to what the
        agent reported for the attempt. Attempts that never reached an agent, were overtaken or
        were cancelled teach nothing about the kind and are skipped.
        """
        if self.router is not None:
            self.router.record_outcome(task, agent, success)
        attempt = _ended_attempt(task, success)
        if attempt is None or attempt.outcome in NOT_LEARNED:
            return
        learned: list[int] = task.routing.setdefault("learned", [])
        if attempt.number in learned:
            return
        kind = _kind_of(task, attempt.number, agent)
        if kind is None:
            return
        info = task.routing.get("analysis")
        if not isinstance(info, dict):
            info = self.analyzer.analyze(task.description).to_dict()
        first_try = not learned
        learned.append(attempt.number)
        routing = task.routing
        parts = routing.get("parts") if routing.get("kind") == kind else None
        parts = parts if isinstance(parts, dict) else {}
        prior, model_p, confidence = (parts.get(name) for name in
                                      ("prior_success", "model", "probability"))
        calibrated = first_try and isinstance(model_p, float)
        update = LearningUpdate(
            task_id=task.id, attempt=attempt.number, at=self._clock(),
            description=task.description[: self.config.learning.max_description_chars],
            kind=kind, success=success, keywords=tuple(str(k) for k in info.get("keywords", ())),
            labels=tuple(task.labels),
            category=str(info.get("category", "general")),
            complexity=str(info.get("complexity", "medium")), agent_id=attempt.agent_id,
            quality=1.0 if quality is None else quality,
            duration_s=attempt.duration_s if duration_s is None else duration_s,
            prior=float(prior) if isinstance(prior, (int, float)) else None,
            first_try=first_try, model_probability=model_p if calibrated else None,
            confidence=confidence if calibrated and isinstance(confidence, float) else None)
        self.apply_outcome(update)
        if self.outcome_hook is not None:
            self.outcome_hook(update)

    def apply_outcome(self, update: LearningUpdate) -> None:
        """Learn one ended attempt, and store it: the leader's path and a standby's replay.

        Everything comes from ``update`` (its time included): no clock, no random draw, so the
        same updates in the same order leave two planners with the same configuration in the
        same learning state (``updates.py``). The store writes the outcome, the bandit weights
        it changed, the counters and the decision log's outcome in one transaction.
        """
        if update.first_try:
            self._counters["first_tries"] += 1
            self._counters["first_try_successes"] += int(update.success)
        weights = self.learner.apply_outcome(update)
        if update.model_probability is not None:
            self._counters.update(self.learner.calibrator.state())
        also = list(self.decisions.outcome_statements(update.task_id, update.attempt,
                                                      update.success, update.at))
        if self.learner.changed_clusters:
            also.append((UPSERT_CLUSTER, self.learner.changed_clusters))
        neighbours = self.learner.changed_neighbours
        forget = self.learner.neighbours.forgotten if neighbours else None
        self.store.record(update.outcome(), counters=self._counters, weights=weights,
                          also=also, neighbours=neighbours, forget_neighbours=forget)
        self._unsaved = False

    def next_step(self, task: TaskRecord, outcome: AttemptOutcome | None = None) -> FallbackStep:
        """After a failed attempt (error, timeout, lost agent): what to do next.

        Retry the same kind up to ``retry.max_retries`` times with exponential backoff, then
        the next untried alternative of the recorded decision (at most
        ``retry.max_alternatives``); with no other kind allowed or left, the task's remaining
        retries go to the same kind. The task's own ``max_retries`` bounds the whole chain;
        when it is used up, escalate. The next :meth:`select` honours the kind returned here.
        """
        policy = self.config.retry
        routing = task.routing
        last = _ended_attempt(task, success=False)
        outcome = outcome if outcome is not None else (last.outcome if last else None)
        kind = routing.get("kind")
        if outcome is AttemptOutcome.UNDELIVERABLE:
            return self._step(task, FallbackAction.RETRY, kind, 0.0,
                              "the assignment never reached the agent: no fault of the kind")
        if task.retries_left <= 0:
            return self._escalate(task, f"all {task.max_retries} retries of the task are used")
        failures = sum(
            1 for entry in routing.get("chain", ())
            if entry.get("kind") == kind and _outcome_of(task, entry.get("attempt")) in FAILURES
        )
        retries = max(0, failures - 1)
        if kind is None or retries < policy.max_retries:
            # Backoff gives a failing kind a breather; a lost agent is no fault of the task.
            delay = 0.0 if outcome is AttemptOutcome.AGENT_LOST else min(
                policy.backoff_max_s, policy.backoff_base_s * 2.0**retries)
            return self._step(task, FallbackAction.RETRY, kind, delay,
                              f"{outcome}: retry {retries + 1} of {policy.max_retries} on "
                              f"{kind!r}")
        tried = {entry.get("kind") for entry in routing.get("chain", ())}
        if task.kind is None and len(tried) - 1 < policy.max_alternatives:
            for alternative in routing.get("alternatives", ()):
                if alternative.get("kind") not in tried:
                    if self.metrics is not None:
                        self.metrics.routing_fallbacks.labels("alternative").inc()
                    return self._step(task, FallbackAction.ALTERNATIVE, alternative["kind"],
                                      0.0, f"{kind!r} failed {failures} times: next "
                                      f"alternative {alternative['kind']!r}")
        # No other kind may or can take it: the task's own retries go to the same kind.
        delay = min(policy.backoff_max_s, policy.backoff_base_s * 2.0**retries)
        return self._step(task, FallbackAction.RETRY, kind, delay,
                          f"{kind!r} failed {failures} times and no other kind is left: retry "
                          f"({task.retries_left} left)")

    def _step(self, task: TaskRecord, action: FallbackAction, kind: str | None, delay: float,
              reason: str) -> FallbackStep:
        if kind is None:
            task.routing.pop("next_kind", None)
        else:
            task.routing["next_kind"] = kind
        task.routing["next_action"] = action.value
        return FallbackStep(action, kind, delay, reason)

    def _escalate(self, task: TaskRecord, reason: str) -> FallbackStep:
        task.routing.pop("next_kind", None)
        task.routing["next_action"] = FallbackAction.ESCALATE.value
        task.routing["escalated"] = reason
        if self.metrics is not None:
            self.metrics.escalations.inc()
        return FallbackStep(FallbackAction.ESCALATE, None, 0.0, reason)

    # --- what it has learned ------------------------------------------------------------------

    def explain(
        self, description: str, agents: Iterable[AgentRecord] | None = None, *,
        kind: str | None = None, required_capabilities: Sequence[str] = (),
        labels: Sequence[str] = (),
    ) -> dict[str, Any]:
        """The decision for a description, without side effects (``route --json``)."""
        task = TaskRecord(id="explain", description=description, kind=kind,
                          required_capabilities=list(required_capabilities),
                          labels=list(labels))
        analysis = self.analyzer.analyze(description)
        result: dict[str, Any] = {
            "analysis": {**analysis.to_dict(), "domain_match": dict(analysis.domain_match)},
            "policy": self.config.policy.value,
            "threshold": self._threshold(), "kinds": {}, "kind": None,
            "fallback_used": False, "reason": "", "alternatives": [],
            # As intake splits: only a submission that names no kind and no capabilities.
            "workflow": (self.phases(description)
                         if kind is None and not required_capabilities else None),
        }
        # "workflow": a task with this description runs as those steps, not as ``kind`` (the
        # kind of the description whole); the coordinator also needs a live agent per step kind.
        result["runs_as"] = "workflow" if result["workflow"] else "task"
        pools: dict[str, Pool] | None = None
        if agents is None:
            names = [kind] if kind else [*self.config.kinds, self.config.fallback_kind]
            workloads = dict.fromkeys(names, 0.0)
        else:
            fleet = Fleet(list(agents), time.monotonic(), self.in_flight_cap)
            pools, able = fleet.view(kind, frozenset(required_capabilities))
            workloads = {k: p.workload for k, p in pools.items()}
            result["agent"] = None
            if not workloads:
                result["reason"] = "no_free_agent" if able else "no_matching_agent"
                return result
        plan = self._plan(task, analysis, workloads, explain=True)
        result["kinds"] = {s.kind: {"confidence": round(s.confidence, 4), "parts": s.parts()}
                           for s in plan.scores}
        first = plan.scores[0] if plan.scores else None
        if isinstance(first, BanditScore):
            # The groups of tasks whose evidence this decision reads, coarse to fine.
            result["contexts"] = {"names": list(first.contexts), "cluster": first.cluster,
                                  "cluster_tasks": round(first.cluster_members, 1)}
        result.update(kind=plan.chosen.kind, fallback_used=plan.fallback_used,
                      reason=plan.reason,
                      alternatives=[s.kind for s in plan.scores if s is not plan.chosen])
        if pools is not None:
            agent = self._pick(task, plan.chosen.kind, pools[plan.chosen.kind])
            result["agent"] = agent.id if agent is not None else None
        return result

    # --- offline evaluation (replay.py) -------------------------------------------------------

    def policy_distribution(self, description: str, kinds: Sequence[str], now: float,
                            labels: Sequence[str] = (),
                            ) -> tuple[dict[str, float], dict[str, float]]:
        """(P(this planner's policy picks kind), predicted success of kind) for a logged task
        whose candidate kinds were ``kinds``; the policy's exploration share moves by its
        expectation."""
        analysis = self.analyzer.analyze(description)
        scores = self.learner.scores(description, analysis, kinds, now, labels=labels)
        predicted = {s.kind: s.confidence for s in scores}
        if self.config.policy is Policy.BANDIT:
            return self.learner.replay_distribution(scores), predicted
        task = TaskRecord(id="replay", description=description)
        plan = self._plan(task, analysis, dict.fromkeys(kinds, 0.0), explain=True)
        return {k: float(k == plan.chosen.kind) for k in kinds}, predicted

    def learn_logged(self, description: str, kind: str, success: bool, at: float,
                     labels: Sequence[str] = ()) -> None:
        """Learn a logged outcome as if it had happened here (both policies' state)."""
        outcome = self._learn_description(description, kind, success, at, labels)
        self.store.record(outcome)
        self._save_neighbours()

    def import_outcomes(self, rows: Iterable[tuple[str, str, bool, float]]) -> int:
        """Bulk-learn (description, kind, success, at) rows in one transaction (benchmarks,
        migrations); returns how many."""
        outcomes = [self._learn_description(d, k, ok, at) for d, k, ok, at in rows]
        self.store.record_many(outcomes)
        self.store.save_bandit_weights(self.learner.model.rows())
        self.store.save_clusters(self.learner.clusters.rows())
        self.learner.changed_clusters = []
        self._save_neighbours()
        return len(outcomes)

    def _save_neighbours(self) -> None:
        """Store the neighbours' memory the learning since the last save added to."""
        memory = self.learner.neighbours
        rows = self.learner.changed_neighbours[-memory.memory:] if memory.enabled else []
        if rows:
            self.store.save_neighbours(rows, memory.forgotten)
        self.learner.changed_neighbours = []

    def _learn_description(self, description: str, kind: str, success: bool,
                           at: float, labels: Sequence[str] = ()) -> Outcome:
        analysis = self.analyzer.analyze(description)
        cluster = self.learner.join_cluster(description, analysis.keywords)
        self.learner.learn(description, analysis, kind, success, at, cluster=cluster,
                           labels=labels)
        return Outcome(keywords=analysis.keywords, kind=kind, success=success,
                       category=analysis.category, complexity=analysis.complexity.value, at=at)

    def phases(self, description: str) -> list[dict[str, Any]] | None:
        """The steps a multi-phase description becomes (``phases``), or None for one phase."""
        settings = self.config.phases
        if not settings.enabled:
            return None
        steps = split_phases(description, self.learner.text_prior, settings)
        if steps is None:
            return None
        return [{"description": text, "kind": kind} for text, kind in steps]

    def snapshot(self) -> dict[str, Any]:
        """Routing accuracy (first-try success), fallback rate, confidence, per-kind success."""
        c = self._counters
        decisions, tries = c["decisions"], c["first_tries"]
        kinds = self.store.kinds(now=self._clock())
        return {
            "decisions": int(decisions),
            "fallbacks": int(c["fallbacks"]),
            "fallback_rate": c["fallbacks"] / decisions if decisions else 0.0,
            "average_confidence": c["confidence_sum"] / decisions if decisions else 0.0,
            "first_tries": int(tries),
            "first_try_successes": int(c["first_try_successes"]),
            "accuracy": c["first_try_successes"] / tries if tries else 0.0,
            "outcomes_stored": len(self.store),
            "policy": self.config.policy.value,
            "average_confidence_by_kind": {
                kind: round(total / n, 4) for kind, (n, total) in sorted(self._by_kind.items())
                if n},
            "kinds": {
                kind: {"success_rate": round(s.success_rate, 4),
                       "outcomes": round(s.outcomes, 3),
                       "mean_duration_s": s.mean_duration_s}
                for kind, s in sorted(kinds.items())
            },
        }

    def export_metrics(self, metrics: Metrics | None = None) -> dict[str, Any]:
        """Push the snapshot into the routing gauges; returns the snapshot.

        Called at scrape time, off the decision path: buffered decision-log rows are written
        here too.
        """
        self.decisions.flush()
        snap = self.snapshot()
        target = metrics if metrics is not None else self.metrics
        if target is None:
            return snap
        target.routing_accuracy.set(snap["accuracy"])
        target.routing_fallback_rate.set(snap["fallback_rate"])
        target.routing_average_confidence.set(snap["average_confidence"])
        by_label: dict[str, list[float]] = {}
        for kind, stats in snap["kinds"].items():
            totals = by_label.setdefault(self._label(kind), [0.0, 0.0])
            totals[0] += stats["outcomes"]
            totals[1] += stats["outcomes"] * stats["success_rate"]
        for label, (n, successes) in by_label.items():
            target.routing_kind_success.labels(label).set(successes / n if n else 0.0)
        confidence: dict[str, list[float]] = {}
        for kind, (n, total) in self._by_kind.items():
            sums = confidence.setdefault(self._label(kind), [0.0, 0.0])
            sums[0] += n
            sums[1] += total
        for label, (n, total) in confidence.items():
            target.routing_kind_confidence.labels(label).set(total / n if n else 0.0)
        return snap

    def _label(self, kind: str) -> str:
        """Bounded metric label: configured kinds, then announced ones up to the limit."""
        if kind in self._labels:
            return kind
        if len(self._labels) < self.config.max_kind_labels:
            self._labels.add(kind)
            return kind
        return OTHER_KIND

    def warm_up(self) -> None:
        """Build now what the first decision would otherwise build on the dispatch path (the
        text prior: tens of ms, that the first task of a freshly started coordinator paid)."""
        if self.config.policy is Policy.BANDIT:
            self.learner.text_prior.probabilities("warm up")

    def drop_caches(self) -> None:
        """Per-description caches and the store's page cache, emptied after a flood
        (coordinator/memory.py)."""
        self.analyzer.drop_caches()
        self.learner.drop_caches()
        self.store.shrink_memory()

    def close(self) -> None:
        """Write the decision counters (if any changed) and close the store."""
        self.decisions.flush()
        if self._unsaved:
            self.store.save_counters(self._counters)
        self.store.close()


def _ended_attempt(task: TaskRecord, success: bool) -> Attempt | None:
    for attempt in reversed(task.attempts):
        if success and attempt.outcome is AttemptOutcome.SUCCEEDED:
            return attempt
        if not success and attempt.outcome is not AttemptOutcome.RUNNING:
            return attempt
    return None


def _outcome_of(task: TaskRecord, number: Any) -> AttemptOutcome | None:
    attempt = task.attempt(number) if isinstance(number, int) else None
    return attempt.outcome if attempt is not None else None


def _kind_of(task: TaskRecord, number: int, agent: AgentRecord | None) -> str | None:
    for entry in task.routing.get("chain", ()):
        if entry.get("attempt") == number:
            return str(entry["kind"])
    if agent is not None:
        return agent.kind
    return task.kind
