"""Learner: the state and arithmetic of ``policy: bandit`` that the planner asks about a task.

It holds the text prior (``text_prior.py``), the model (``bandit.py``), the calibration of its
probabilities and the policy that picks a kind (``policy.py``), and answers two questions:
what is believed about each kind for this task (:meth:`Learner.scores`), and what one more
outcome teaches (:meth:`Learner.learn`). The planner does the rest (constraints, the fallback
chain, records, metrics); both policies' decisions teach the learner, so switching policy
keeps what was learned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from coordinator_agent.routing.analysis import TaskAnalysis, TaskAnalyzer
from coordinator_agent.routing.bandit import (
    CONTEXT_PREFIX,
    BanditModel,
    Calibrator,
    KindBelief,
    Row,
    features,
    logit,
    sigmoid,
)
from coordinator_agent.routing.clusters import PREFIX as CLUSTER_PREFIX
from coordinator_agent.routing.clusters import ClusterRow, DescriptionClusters
from coordinator_agent.routing.config import DriftScope, RoutingConfig
from coordinator_agent.routing.drift import ChangeDetector
from coordinator_agent.routing.neighbours import Local, NeighbourEvidence, NeighbourRow
from coordinator_agent.routing.patterns import PatternStore
from coordinator_agent.routing.policy import ThompsonPolicy
from coordinator_agent.routing.surprise import SurpriseDetector
from coordinator_agent.routing.text_prior import TextPrior
from coordinator_agent.routing.updates import LearningUpdate

#: Vocabulary words that form the finer context of a task (its "signature").
MAX_SIGNATURE_WORDS = 4

Features = Sequence[tuple[str, float]]


class _Reading(NamedTuple):
    """What the learner reads in one description, the same every time: the text prior, its
    coarse contexts and the features they make with the description's keywords. Cached per
    description (a task is read when it is decided and again when each attempt is learned);
    a tuple, the cheapest immutable record to build on a miss."""

    analysis: TaskAnalysis
    text: Mapping[str, float]  # P(kind | text); shared, never mutated
    top: str  # the kind the text points at, or "-"
    coarse: tuple[str, ...]  # ``Learner.contexts`` without a cluster
    feats: tuple[tuple[str, float], ...]  # the coarse contexts and the analysis' keywords
    watched: tuple[str, ...]  # ``Learner.watched(feats)``


@dataclass(frozen=True, slots=True)
class BanditScore:
    """One kind for one task: the text prior, the evidence, the belief, the confidence."""

    kind: str
    text: float  # P(kind | text)
    belief: KindBelief
    exploration_scale: float  # this decision's spread (widened by surprise, see surprise.py)
    calibrated: float  # the model's probability, recalibrated (bandit.Calibrator)
    chance: float | None = None  # P(the policy picks this kind), when computed
    #: The task's finer context (clusters.py): its cluster and the outcomes it has seen.
    cluster: int | None = None
    cluster_members: float = 0.0
    contexts: tuple[str, ...] = ()  # the task's contexts, coarse to fine (the same per kind)
    #: What similar recent tasks say about this kind (neighbours.py); None: none ran it.
    local: Local | None = None
    #: The log-odds its recent shortfall on a feature of the task takes off (surprise.py).
    shortfall: float = 0.0

    @property
    def confidence(self) -> float:
        return self.calibrated

    def with_chance(self, chance: float) -> BanditScore:
        return BanditScore(self.kind, self.text, self.belief, self.exploration_scale,
                           self.calibrated, chance, self.cluster, self.cluster_members,
                           self.contexts, self.local, self.shortfall)

    def parts(self) -> dict[str, Any]:
        b = self.belief
        p = b.probability
        return {
            "prior": round(self.text, 4),  # P(kind | text)
            "prior_success": round(b.prior, 4),  # what the prior alone predicts
            "successes": round(b.successes, 3),  # decayed, of similar tasks on this kind
            "failures": round(b.failures, 3),
            # The typical size of a Thompson draw's deviation, in probability.
            "exploration": round(p * (1.0 - p) * b.std * self.exploration_scale, 4),
            "chance": None if self.chance is None else round(self.chance, 4),
            "model": round(p, 6),  # the model's probability, before calibration
            "probability": round(self.calibrated, 4),
            # The finer context the evidence is keyed on: the cluster of similar descriptions
            # (None: none is similar enough yet; the coarse contexts alone then decide).
            "cluster": self.cluster,
            "cluster_tasks": round(self.cluster_members, 1),
            # Similar recent tasks on this kind (neighbours.py): their summed similarity, and
            # the log-odds shift their residuals add to the shared model (already in `model`).
            "neighbours": round(self.local.weight, 3) if self.local is not None else 0.0,
            "local": round(self.local.offset, 4) if self.local is not None else 0.0,
            # Its recent first tries on a feature of this task fell far short of the model's
            # prediction: the log-odds that takes off (surprise.py; already in `model`).
            "shortfall": round(self.shortfall, 4),
        }


class Learner:
    def __init__(self, config: RoutingConfig, analyzer: TaskAnalyzer,
                 store: PatternStore) -> None:
        self.config = config
        self.analyzer = analyzer
        bandit = config.bandit
        # The parts of a task that share the prior's spread: its coarse contexts, its keywords
        # and, with clusters on, its cluster (so the prior stays worth ``prior_strength``).
        parts = 4 if bandit.cluster_threshold > 0 and bandit.max_clusters > 0 else 3
        self.model = BanditModel(prior_strength=bandit.prior_strength, window=bandit.window,
                                 half_life_s=config.learning.decay_half_life_s, groups=parts)
        self.model.load(store.bandit_weights())
        self.calibrator = Calibrator()
        self.calibrator.load(store.counters())
        self.policy = ThompsonPolicy(bandit, config.fallback_kind)
        self.surprise = SurpriseDetector(bandit.surprise_window)
        self.changes = ChangeDetector(threshold=bandit.drift_threshold, shift=bandit.drift_shift,
                                      memory=bandit.drift_memory)
        self.clusters = DescriptionClusters(threshold=bandit.cluster_threshold,
                                            max_clusters=bandit.max_clusters)
        self.clusters.load(store.clusters())
        self.neighbours = NeighbourEvidence(
            memory=bandit.neighbour_memory, similarity=bandit.neighbour_similarity,
            window=bandit.neighbour_window, strength=bandit.neighbour_strength)
        self.neighbours.load(store.neighbours(bandit.neighbour_memory)
                             if self.neighbours.enabled else ())
        #: The neighbours' row added by the last ``learn``, for the store.
        self.changed_neighbours: list[NeighbourRow] = []
        #: Cluster rows changed by the last ``apply_outcome``, for the store.
        self.changed_clusters: list[ClusterRow] = []
        self._text_prior: TextPrior | None = None  # built on first use: it may load a model
        #: Readings by description (its first ``max_description_chars``, all that is read),
        #: the oldest out once ``analyzer.cache_size`` are kept.
        self._readings: dict[str, _Reading] = {}

    @property
    def text_prior(self) -> TextPrior:
        if self._text_prior is None:
            self._text_prior = TextPrior(self.config)
        return self._text_prior

    @property
    def prior_ready(self) -> bool:
        """Whether the text prior is built (the first ``text_prior`` builds it)."""
        return self._text_prior is not None

    def drop_caches(self) -> None:
        self._readings = {}
        if self._text_prior is not None:
            self._text_prior.drop_caches()

    def _read(self, description: str, analysis: TaskAnalysis) -> _Reading:
        """The description's reading, from the cache when it holds one of this analysis."""
        key = description[: self.config.learning.max_description_chars]
        reading = self._readings.get(key)
        if reading is not None and reading.analysis is analysis:
            return reading
        text = self.text_prior.probabilities(description)
        top = _top_kind(text)
        coarse = self._coarse(analysis, top)
        feats = tuple(self.features(analysis.keywords, coarse))
        reading = _Reading(analysis, text, top, coarse, feats, tuple(self.watched(feats)))
        readings, size = self._readings, self.analyzer.cache_size
        if size > 0:
            if key not in readings and len(readings) >= size:
                del readings[next(iter(readings))]  # the oldest (dicts keep insertion order)
            readings[key] = reading
        return reading

    def _coarse(self, analysis: TaskAnalysis, top: str) -> tuple[str, ...]:
        index = self.analyzer.domain_index
        vocabulary = sorted(w for w in analysis.keywords if w in index)[:MAX_SIGNATURE_WORDS]
        return ("k:" + top, "v:" + " ".join(vocabulary))

    def _features(self, reading: _Reading, keywords: Sequence[str],
                  contexts: tuple[str, ...]) -> Features:
        """``features(keywords, contexts)``: the reading's own when they are its."""
        if contexts is reading.coarse and (keywords is reading.analysis.keywords
                                           or tuple(keywords) == reading.analysis.keywords):
            return reading.feats
        return self.features(keywords, contexts)

    def _watched(self, reading: _Reading, feats: Features) -> Sequence[str]:
        return reading.watched if feats is reading.feats else self.watched(feats)

    def contexts(self, analysis: TaskAnalysis, text: Mapping[str, float],
                 cluster: int | None = None, labels: Sequence[str] = ()) -> tuple[str, ...]:
        """Groups of similar tasks, coarse then fine: the kind the text points at, the set of
        vocabulary words the description uses, each label the submitter gave the task, and
        its cluster of similar descriptions (when it has one: clusters.py)."""
        top = _top_kind(text)
        return self._contexts(self._coarse(analysis, top), top, cluster, labels)

    def _contexts(self, coarse: tuple[str, ...], top: str, cluster: int | None,
                  labels: Sequence[str] = ()) -> tuple[str, ...]:
        if labels:
            # What the submitter's ticket system knows (a type, a component) groups tasks
            # that the text alone may write in many ways: each label pools their evidence.
            coarse = (*coarse, *label_contexts(labels))
        if cluster is None:
            return coarse
        fine = f"{CLUSTER_PREFIX}{cluster}"
        threshold = self.config.bandit.drift_group_z
        if threshold <= 0:
            return (*coarse, fine)
        # The drifted group: every cluster of this coarse group on which a kind now fails
        # more than predicted (surprise z below -threshold) shares a context per such kind,
        # so what the other kinds achieve on one such cluster is evidence for all of them.
        drifted = self.surprise.falling(CONTEXT_PREFIX + fine, threshold)
        return (*coarse, fine, *(f"d:{top}:{kind}" for kind in drifted))

    def features(self, keywords: Sequence[str],
                 contexts: Sequence[str]) -> list[tuple[str, float]]:
        """``bandit.features``, the cluster context weighing ``bandit.cluster_weight``: its
        evidence moves the log-odds that many times faster (a fine context exists to catch
        what the coarse ones average away). A task's labels are one part, like its keywords:
        each weighs 1/sqrt(number of labels), so several labels, seen or not, add no more
        prior spread than one."""
        feats = features(keywords, contexts)
        weight = self.config.bandit.cluster_weight
        labels = sum(c.startswith(LABEL_PREFIX) for c in contexts)
        if weight == 1.0 and labels < 2:
            return feats
        share = 1.0 / math.sqrt(labels) if labels else 1.0
        return [(name, weight if name.startswith(_CLUSTER_FEATURE)
                 else share if name.startswith(_LABEL_FEATURE) else x)
                for name, x in feats]

    def watched(self, feats: Sequence[tuple[str, float]]) -> list[str]:
        """The features the surprise sums and the change test watch (``bandit.drift_scope``):
        all of them, or only the cluster context (none when the task has no cluster)."""
        if self.config.bandit.drift_scope == DriftScope.CLUSTER:
            return [name for name, _ in feats if name.startswith(_CLUSTER_FEATURE)]
        return [name for name, _ in feats]

    def prior_success(self, text: Mapping[str, float], kind: str) -> float:
        """P(kind | text) mapped onto a success probability; a kind the config does not list
        (only agents announced it) gets an even share."""
        b = self.config.bandit
        p_text = text.get(kind, 1.0 / max(1, len(text)))
        return b.success_if_wrong + (b.success_if_right - b.success_if_wrong) * p_text

    def scores(self, description: str, analysis: TaskAnalysis, kinds: Iterable[str],
               now: float, *, chances: bool = False,
               labels: Sequence[str] = ()) -> list[BanditScore]:
        """What is believed about each kind for this task (no side effects); ``chances`` adds
        each kind's probability of being picked (an integral per kind: for explanations);
        ``labels`` are the task's (``task.submit``)."""
        reading = self._read(description, analysis)
        text = reading.text
        unknown = 1.0 / max(1, len(text))
        cluster = self.clusters.assign(analysis.keywords, reading.top)
        contexts = self._contexts(reading.coarse, reading.top, cluster, labels)
        feats = self._features(reading, analysis.keywords, contexts)
        shares = {kind: text.get(kind, unknown) for kind in kinds}
        b = self.config.bandit
        low, span = b.success_if_wrong, b.success_if_right - b.success_if_wrong
        groups = self._watched(reading, feats)
        priors = {kind: low + span * p for kind, p in shares.items()}
        flagged = self.changes.flagged(groups, b.drift_votes) if self.changes.enabled else ()
        if flagged:
            # A kind's success dropped on this sort of task (drift.py): take the change test's
            # alternative for it, and let the kinds the text never pointed at be drawn.
            shift = b.drift_shift
            priors = {kind: sigmoid(logit(p) - shift) if kind in flagged
                      else max(p, b.drift_prior) for kind, p in priors.items()}
        beliefs = self.model.beliefs(priors, feats, now)
        # What similar recent tasks say the shared weights get wrong for this task, per kind
        # (neighbours.py): a context of its own, not shared with what the text lumps with it.
        local = self.neighbours.local(analysis.keywords) if self.neighbours.enabled else {}
        if local:
            beliefs = [_shifted(b, local[b.kind].offset) if b.kind in local else b
                       for b in beliefs]
        # A kind failing far more than predicted on a feature of this task (surprise.py).
        shortfall = (self.surprise.shortfalls(groups, b.surprise_shift)
                     if b.surprise_shift > 0 else {})
        if shortfall:
            beliefs = [_shifted(b, shortfall[b.kind]) if b.kind in shortfall else b
                       for b in beliefs]
        scale = self.exploration_scale(groups, beliefs)
        calibrate = self.calibrator.apply_logit
        members = self.clusters.members(cluster) if cluster is not None else 0.0
        scores = [BanditScore(b.kind, shares[b.kind], b, scale, calibrate(b.mean), None,
                              cluster, members, contexts, local.get(b.kind),
                              shortfall.get(b.kind, 0.0))
                  for b in beliefs]
        if chances:
            dist = self.policy.distribution(beliefs, scale=scale)
            scores = [s.with_chance(dist.get(s.kind, 0.0)) for s in scores]
        return scores

    def exploration_scale(self, groups: Sequence[str], beliefs: Sequence[KindBelief]) -> float:
        """The decision's exploration spread: ``bandit.exploration_scale``, widened while the
        kind believed best fails more than predicted on tasks sharing a feature (a context or a
        keyword) with this one (surprise.py). One lookup per feature, for the best kind only."""
        b = self.config.bandit
        if not beliefs or not groups:
            return b.exploration_scale
        best = max(beliefs, key=lambda belief: belief.mean).kind
        widened = b.exploration_scale * self.surprise.widest(groups, best)
        return max(b.exploration_scale, min(b.max_exploration_scale, widened))

    def observe(self, description: str, analysis: TaskAnalysis, kind: str,
                probability: float, success: bool, *, cluster: int | None = None,
                labels: Sequence[str] = ()) -> None:
        """A first try of the kind a decision chose, and the confidence it had: the residual
        the surprise detector and the change test watch."""
        reading = self._read(description, analysis)
        contexts = self._contexts(reading.coarse, reading.top, cluster, labels)
        self._observe(reading, self._features(reading, analysis.keywords, contexts), kind,
                      probability, success)

    def _observe(self, reading: _Reading, feats: Features, kind: str, probability: float,
                 success: bool) -> None:
        for name in self._watched(reading, feats):
            self.surprise.observe(name, kind, probability, success)
            self.changes.observe(name, kind, probability, success)

    def learn(self, description: str, analysis: TaskAnalysis, kind: str, success: bool,
              now: float, *, prior: float | None = None,
              keywords: Sequence[str] | None = None, cluster: int | None = None,
              labels: Sequence[str] = ()) -> list[Row]:
        """Teach the model one outcome; returns the weights it changed, for the store.

        ``prior`` is the prior success the decision saw (recorded on the task), else it is
        computed again; ``keywords`` those recorded with the decision, else the analysis';
        ``cluster`` the task's cluster, else the one it is most similar to now; ``labels``
        the task's.
        """
        reading = self._read(description, analysis)
        words = analysis.keywords if keywords is None else keywords
        if cluster is None:
            cluster = self.clusters.assign(words, reading.top)
        feats = self._features(reading, words,
                               self._contexts(reading.coarse, reading.top, cluster, labels))
        return self._learn(reading, words, feats, kind, success, now=now, prior=prior)

    def _learn(self, reading: _Reading, words: Sequence[str], feats: Features, kind: str,
               success: bool, *, now: float, prior: float | None) -> list[Row]:
        if prior is None:
            prior = self.prior_success(reading.text, kind)
        if not self.neighbours.enabled:
            return self.model.update(kind, prior, feats, success, now)
        # The residual the neighbours keep is against the shared model as it stood.
        predicted, rows = self.model.predict_and_update(kind, prior, feats, success, now)
        row = self.neighbours.add(words, kind, success, predicted)
        if row is not None:
            self.changed_neighbours.append(row)
        return rows

    def apply_outcome(self, update: LearningUpdate) -> list[Row]:
        """Everything one ended attempt teaches: the model's weights, and for a first try of
        the chosen kind the calibration and the surprise sums. Pure and deterministic (the
        update carries its time), so a standby replaying the leader's updates in order ends in
        the same state; returns the weights it changed, for the store."""
        analysis = self.analyzer.analyze(update.description)
        reading = self._read(update.description, analysis)
        self.changed_clusters = []
        self.changed_neighbours = []
        words = update.keywords
        if update.first_try:
            # A task joins a cluster once, when its first try is learned.
            cluster = self._join(reading.top, words)
        else:
            cluster = self.clusters.assign(words, reading.top)
        contexts = self._contexts(reading.coarse, reading.top, cluster, update.labels)
        feats = self._features(reading, words, contexts)
        rows = self._learn(reading, words, feats, update.kind, update.success, now=update.at,
                           prior=update.prior)
        if update.model_probability is not None:
            self.calibrator.update(update.model_probability, update.success)
        if update.confidence is not None:
            # The surprise sums watch the analysis' keywords (the same as the update's unless
            # the analyser changed); nothing learned above moves the contexts.
            if tuple(words) != analysis.keywords:
                feats = self._features(reading, analysis.keywords, contexts)
            self._observe(reading, feats, update.kind, update.confidence, update.success)
        return rows

    def join_cluster(self, description: str, keywords: Sequence[str]) -> int | None:
        """Put a learned task in its cluster, nested in the kind its text points at; the
        changed row waits in ``changed_clusters`` for the store."""
        return self._join(_top_kind(self.text_prior.probabilities(description)), keywords)

    def _join(self, group: str, keywords: Sequence[str]) -> int | None:
        cluster, row = self.clusters.learn(keywords, group)
        if row is not None:
            self.changed_clusters.append(row)
        return cluster

    def replay_distribution(self, scores: Sequence[BanditScore]) -> dict[str, float]:
        """The policy's distribution for a logged task; its exploration share moves by its
        expectation, as if it had decided (replay.py)."""
        scale = scores[0].exploration_scale if scores else None
        dist = self.policy.distribution([s.belief for s in scores], scale=scale)
        greedy = max(scores, key=lambda s: s.confidence).kind
        self.policy.expect(dist, greedy)
        return dist


_CLUSTER_FEATURE = CONTEXT_PREFIX + CLUSTER_PREFIX
#: A label's context: ``l:`` and the label in lower case (ticket systems do not agree on case).
LABEL_PREFIX = "l:"
_LABEL_FEATURE = CONTEXT_PREFIX + LABEL_PREFIX


def label_contexts(labels: Iterable[str]) -> tuple[str, ...]:
    """The contexts of a task's labels, each once, in the order given."""
    return tuple(dict.fromkeys(LABEL_PREFIX + label.lower() for label in labels))


def _shifted(belief: KindBelief, offset: float) -> KindBelief:
    """The belief with a log-odds shift (the neighbours', a shortfall's) added to its mean."""
    mean = max(-8.0, min(8.0, belief.mean + offset))
    return KindBelief(belief.kind, belief.prior, mean, belief.std, belief.successes,
                      belief.failures)


def _top_kind(text: Mapping[str, float]) -> str:
    """The kind the text points at, or "-" when it is a tie."""
    if not text:
        return "-"
    best = max(text.values())
    top = [kind for kind, p in text.items() if p >= best - 1e-9]
    return top[0] if len(top) == 1 else "-"
