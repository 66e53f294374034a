"""Routing configuration: the vocabulary the analyser reads and the knobs of the planner.

The vocabulary lives in YAML, not in code, so operators can teach the router their own kinds of
agents. The package ships a default (``coordinator_agent/routing/data/routing.yaml``);
:func:`load_routing_config` reads it or a file of your own and turns every problem into one
:class:`~coordinator_agent.exceptions.ConfigError` that names the offending field.
"""

from __future__ import annotations

import enum
import functools
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from coordinator_agent.exceptions import ConfigError

KindName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


def _lower_words(words: list[str]) -> list[str]:
    cleaned = [w.strip().lower() for w in words]
    if any(not w or any(ch.isspace() for ch in w) for w in cleaned):
        raise ValueError("keywords must be single words")
    return cleaned


Words = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64)]], AfterValidator(_lower_words)
]


def _phrases(phrases: list[str]) -> list[str]:
    cleaned = [" ".join(p.lower().split()) for p in phrases]
    for phrase in cleaned:
        if not 2 <= len(phrase.split()) <= 4:
            raise ValueError(f"phrase {phrase!r} must have two to four words")
    return cleaned


def _examples(examples: list[str]) -> list[str]:
    cleaned = [" ".join(e.split()) for e in examples]
    seen: set[str] = set()
    for example in cleaned:
        if example.lower() in seen:
            raise ValueError(f"example {example!r} is listed twice")
        seen.add(example.lower())
    return cleaned


#: Multi-word terms ("memory leak", "pen test") that outweigh the words they are made of.
Phrases = Annotated[
    list[Annotated[str, Field(min_length=3, max_length=80)]], AfterValidator(_phrases)
]
#: Example tickets of a kind, as people write them: what the text prior learns from.
Examples = Annotated[
    list[Annotated[str, Field(min_length=8, max_length=400)]],
    Field(max_length=200),
    AfterValidator(_examples),
]


class Complexity(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Policy(enum.StrEnum):
    #: The seed's weighted formula (base + pattern + domain + complexity - workload).
    SEED = "seed"
    #: Predicted probability of first-try success, learned online, Thompson sampling.
    BANDIT = "bandit"


class Exploration(enum.StrEnum):
    THOMPSON = "thompson"
    GREEDY = "greedy"  # never explore on purpose


class CloseCall(enum.StrEnum):
    """What ``hedge`` does with two kinds whose confidences are within its margin."""

    RACE = "race"  # both run, the first success wins, the other is cancelled
    MERGE = "merge"  # both run to the end, and their results are merged


class Balance(enum.StrEnum):
    LEAST_LOADED = "least_loaded"
    TWO_CHOICES = "two_choices"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KindSpec(_Model):
    """One kind of agent: what it is for and which words point at it.

    ``keywords`` feed the analyser's domains (and so the seed formula) and the text prior;
    ``terms``, ``hints``, ``phrases`` and ``examples`` are read by the text prior only
    (``text_prior.py``).
    """

    description: str = ""
    keywords: Words = []
    #: Further words and product or tool names (okta, argocd, cmdb) that point at this kind.
    terms: Words = []
    #: Words that only lean towards this kind ("which", "slow"): they weigh less than terms.
    hints: Words = []
    phrases: Phrases = []
    examples: Examples = []
    complexity: list[Complexity] = Field(
        default_factory=lambda: [Complexity.LOW, Complexity.MEDIUM, Complexity.HIGH],
        min_length=1,
    )


class ComplexityHints(_Model):
    high: Words = []
    low: Words = []
    #: Descriptions with at least this many keywords get one more hint towards "high".
    long_description_keywords: int = Field(10, ge=1)


class Urgency(_Model):
    critical: Words = []
    high: Words = []
    low: Words = []


class Weights(_Model):
    base: float = Field(0.5, ge=0, le=1)
    pattern: float = Field(0.4, ge=0, le=1)
    domain: float = Field(0.2, ge=0, le=1)
    complexity: float = Field(0.1, ge=0, le=1)
    workload: float = Field(0.1, ge=0, le=1)


class RetryPolicy(_Model):
    #: Further attempts on the same kind before moving to the next alternative kind.
    max_retries: int = Field(1, ge=0, le=20)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    #: Alternative kinds tried after the first one before escalating.
    max_alternatives: int = Field(2, ge=0, le=20)


class Learning(_Model):
    #: An outcome weighs half as much after this long (time decay).
    half_life_s: float = Field(7 * 86_400.0, gt=0)
    #: Or: an outcome weighs exp(-age / time_constant_s), the seed's form (30 days: 2592000).
    #: When set, it replaces ``half_life_s`` (half-life = time constant x ln 2).
    time_constant_s: float | None = Field(None, gt=0)
    #: Pseudo-outcomes of neutral evidence added to every estimate: unknown is neutral, and a
    #: handful of outcomes cannot swing the pattern term to an extreme.
    prior_weight: float = Field(2.0, gt=0)
    #: Similarity of a past outcome whose keywords cover the task's but are not the same set,
    #: scaled by the share of the task's keywords it has. An identical set has similarity 1.
    partial_match_weight: float = Field(0.5, ge=0, le=1)
    max_keywords: int = Field(12, ge=1, le=64)
    max_description_chars: int = Field(4000, ge=16)
    max_outcomes: int = Field(500_000, ge=100)


    @property
    def decay_half_life_s(self) -> float:
        if self.time_constant_s is not None:
            return self.time_constant_s * math.log(2.0)
        return self.half_life_s


class DriftScope(enum.StrEnum):
    FEATURES = "features"
    CLUSTER = "cluster"


class BanditSettings(_Model):
    """The learned policy (``policy: bandit``); see ``bandit.py`` and ``policy.py``."""

    #: What the text prior is worth, in pseudo-outcomes.
    prior_strength: float = Field(1.0, gt=0, le=1000)
    #: Success probability the prior gives a kind the text is sure of (P(kind | text) = 1) ...
    success_if_right: float = Field(0.8, gt=0, lt=1)
    #: ... and one the text rules out (P(kind | text) = 0); linear in between.
    success_if_wrong: float = Field(0.3, gt=0, lt=1)
    #: A kind is credible when its predicted success reaches this; with none, the fallback kind.
    credible: float = Field(0.2, ge=0, le=1)
    exploration: Exploration = Exploration.THOMPSON
    #: Spread of the Thompson draws relative to the belief (1 = plain Thompson sampling; the
    #: diagonal belief overstates the spread, so less than 1 explores about as much as needed).
    exploration_scale: float = Field(0.1, ge=0, le=10)
    #: At most this share of recent decisions may differ from the greedy choice.
    exploration_budget: float = Field(0.2, ge=0, le=1)
    #: Kinds predicted this much below the best are never explored.
    max_exploration_gap: float = Field(0.3, ge=0, le=1)
    #: Count decay: each feature of a kind remembers about its last ``window`` outcomes (drift).
    window: float = Field(20.0, ge=2, le=1_000_000)
    #: Surprise: first tries (about this many) over which a kind's residuals are watched; while
    #: the best kind fails more than predicted, exploration widens (surprise.py). 0: off.
    surprise_window: float = Field(20.0, ge=0, le=1_000_000)
    #: The widest exploration spread surprise may lead to (1 = plain Thompson sampling).
    max_exploration_scale: float = Field(1.0, ge=0, le=10)
    #: Where a kind's surprise z on a feature of the task is below minus this, its log-odds
    #: on the task drop by the residuals' own estimate R / (1 + V) (surprise.py). 0: off.
    surprise_shift: float = Field(2.5, ge=0, le=100)
    #: Change detection (drift.py): a Bernoulli CUSUM per (feature, kind) of first tries
    #: against "success log-odds dropped by ``drift_shift``" trips at this threshold. 0: off.
    #: With the cluster context among the features, 6 was tried (docs/ROUTING.md).
    drift_threshold: float = Field(0.0, ge=0, le=1000)
    drift_shift: float = Field(2.0, ge=0, le=20)
    #: A tripped (feature, kind) stays flagged for about this many first tries on the feature.
    drift_memory: float = Field(100.0, ge=1, le=1_000_000)
    #: A kind counts as drifted on a task when this many of the task's features flag it.
    drift_votes: int = Field(1, ge=1, le=100)
    #: On such a task, its prior success drops by ``drift_shift`` (log-odds) and every other
    #: kind's prior success is at least this.
    drift_prior: float = Field(0.6, gt=0, lt=1)
    #: Finer contexts (clusters.py): a learned description joins the cluster of similar
    #: descriptions whose cosine (idf-weighted keywords) reaches this, else starts one. 0: off
    #: (0.4 was tried, docs/ROUTING.md).
    cluster_threshold: float = Field(0.0, ge=0, le=1)
    #: The cluster context's value among a task's features: above 1, the cluster's own
    #: evidence moves a kind's log-odds faster than the coarse contexts' (learner.py).
    cluster_weight: float = Field(1.0, gt=0, le=10)
    #: At most this many clusters; then a description joins the most similar one.
    max_clusters: int = Field(4096, ge=0, le=1_000_000)
    #: What the surprise sums and the change test watch: every feature of a task
    #: (``features``), or only its cluster (``cluster``), which only similar tasks share.
    drift_scope: DriftScope = DriftScope.FEATURES
    #: Clusters on which a kind's surprise z is below minus this share a context per such
    #: kind (the drifted group of tasks, learner.py). 0: off.
    drift_group_z: float = Field(0.0, ge=0, le=100)
    #: Evidence from similar recent tasks (neighbours.py): learned attempts remembered for it.
    #: 0: off.
    neighbour_memory: int = Field(0, ge=0, le=1_000_000)
    #: Cosine (idf-weighted keywords) at which a remembered attempt counts as a neighbour.
    neighbour_similarity: float = Field(0.5, gt=0, le=1)
    #: Count decay per kind: about this many of a kind's most recent neighbours count.
    neighbour_window: float = Field(10.0, ge=1, le=1_000_000)
    #: Prior precision of the local log-odds shift: the neighbours' residuals move it by
    #: R / (strength + V).
    neighbour_strength: float = Field(1.0, gt=0, le=1000)


class Hedge(_Model):
    """Run the top two kinds at once when their confidences are this close (off by default)."""

    enabled: bool = False
    margin: float = Field(0.05, ge=0, le=1)
    #: race: first success wins; merge: both run to the end and their results are combined.
    mode: CloseCall = CloseCall.RACE


class Phases(_Model):
    """A description with several phases ("implement X, audit it, then deploy") becomes steps."""

    enabled: bool = True
    #: Words that separate phases ("then", "and then", "after that", ";" always separates).
    separators: Words = ["then", "afterwards", "finally"]
    max_steps: int = Field(5, ge=2, le=20)
    #: Words that make a with-clause a phase of its own ("with a security audit"), where
    #: without one it is the means of the clause before ("with ArgoCD", "with a feature flag").
    work_words: Words = ["audit", "review", "scan", "pentest", "assessment", "test", "testing",
                         "analysis", "inspection", "investigation", "deployment", "rollout",
                         "documentation", "runbook", "changelog", "writeup"]


class PriorSettings(_Model):
    """How the text prior weighs its sources (see ``text_prior.py`` and docs/ROUTING.md)."""

    #: Score a kind gets for each of its keywords found in a description (in nats).
    keyword_weight: float = Field(1.5, ge=0, le=10)
    #: Score for each of its terms.
    term_weight: float = Field(1.0, ge=0, le=10)
    #: Score a kind gets for each of its hints.
    hint_weight: float = Field(0.4, ge=0, le=10)
    #: Score for each of its phrases; the words of a matched phrase count no further.
    phrase_weight: float = Field(2.0, ge=0, le=10)
    #: Multiplier of the evidence learned from the kinds' example tickets.
    example_weight: float = Field(0.5, ge=0, le=10)
    #: Additive smoothing of the example counts; larger trusts a single example less.
    example_smoothing: float = Field(1.0, gt=0, le=10)
    #: Extra weight of the first words: a feature at position p counts (1 + lead_bonus/(1+p))
    #: times. Titles name their subject first; it also settles ties without a name.
    lead_bonus: float = Field(0.5, ge=0, le=5)
    #: Examples of one kind a feature must appear in before the examples teach anything about it.
    example_min_count: int = Field(2, ge=1, le=100)
    #: The fallback kind's score: what "nothing in the text points anywhere" is worth.
    fallback_score: float = Field(0.5, ge=0, le=10)
    #: Descriptions whose probabilities are kept (least recently used beyond this go).
    cache_size: int = Field(4096, ge=0, le=1_000_000)


class RoutingConfig(_Model):
    """Everything the analyser and the planner read; see ``data/routing.yaml``."""

    kinds: dict[KindName, KindSpec] = Field(min_length=1)
    categories: dict[Annotated[str, Field(min_length=1, max_length=64)], Words] = {}
    complexity: ComplexityHints = ComplexityHints()
    urgency: Urgency = Urgency()
    stopwords: Words = []
    policy: Policy = Policy.BANDIT
    bandit: BanditSettings = BanditSettings()
    phases: Phases = Phases()
    weights: Weights = Weights()
    threshold: float = Field(0.6, ge=0, le=1)
    fallback_kind: KindName = "general"
    balance: Balance = Balance.LEAST_LOADED
    retry: RetryPolicy = RetryPolicy()
    hedge: Hedge = Hedge()
    learning: Learning = Learning()
    prior: PriorSettings = PriorSettings()
    #: How long a grouping of the fleet by kind (health, capacity) is reused between decisions
    #: while the set of agent records stays the same. Loads are read live for the chosen kind
    #: and the chosen agent is re-checked, so this only delays noticing an agent that became
    #: healthy again (the coordinator's liveness sweep runs every 0.25 s anyway); 0 regroups
    #: on every decision.
    agent_snapshot_s: float = Field(0.25, ge=0, le=10)
    #: Distinct kind labels in metrics; further kinds are counted as "other".
    max_kind_labels: int = Field(50, ge=1, le=1000)

    @model_validator(mode="after")
    def _backoff_cap(self) -> RoutingConfig:
        if self.retry.backoff_max_s < self.retry.backoff_base_s:
            raise ValueError("retry.backoff_max_s must be at least retry.backoff_base_s")
        return self

    @model_validator(mode="after")
    def _examples_belong_to_one_kind(self) -> RoutingConfig:
        owner: dict[str, str] = {}
        for kind, spec in self.kinds.items():
            for example in spec.examples:
                other = owner.setdefault(example.lower(), kind)
                if other != kind:
                    raise ValueError(
                        f"example {example!r} is listed under both {other!r} and {kind!r}")
        return self


DEFAULT_RESOURCE = "routing.yaml"


@functools.lru_cache(maxsize=1)
def default_routing_config() -> RoutingConfig:
    """The vocabulary shipped with the package (parsed once; treat it as read-only)."""
    resource = resources.files(__package__).joinpath("data", DEFAULT_RESOURCE)
    text = resource.read_text(encoding="utf-8")
    return parse_routing_config(text, f"packaged {DEFAULT_RESOURCE}")


def load_routing_config(path: Path | str | None = None) -> RoutingConfig:
    """Read a routing config file, or the packaged default when ``path`` is None."""
    if path is None:
        return default_routing_config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"routing config {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"routing config {path} cannot be read: {exc.strerror}") from exc
    return parse_routing_config(text, str(path))


def parse_routing_config(text: str, source: str = "<string>") -> RoutingConfig:
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"routing config {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"routing config {source} must hold a mapping at the top level")
    try:
        return RoutingConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"routing config {source}: {problems}") from None
