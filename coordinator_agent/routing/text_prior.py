"""TextPrior: P(kind | description) before anything has been learned about a task like it.

The router's cold start. Each kind is described in the routing config by words, phrases and a
few example tickets; this module turns those into one table of evidence per feature and scores
a description by adding up the evidence of its features:

* **features** come from a tokenizer made for tickets: snake_case and dotted names are split
  (``test_client.py`` gives test, client, py), camelCase tokens also count as their parts
  (``NullPointerException`` also gives null, pointer, exception), digits-only tokens
  (versions, ids, CVE numbers) are dropped, stopwords removed, the rest reduced by the
  analyser's stemmer. Adjacent words also form bigrams; the first words weigh a little more
  (``prior.lead_bonus``): a title names its subject first.
* **keywords** of a kind add ``prior.keyword_weight`` each, **terms** ``prior.term_weight``,
  **hints** the smaller ``prior.hint_weight`` (a word listed by several kinds is shared
  between them). Keywords name what a task *is* (a guide, a deployment, a vulnerability);
  terms are more often what it is *about*, which other kinds' tickets mention too.
* **phrases** add ``prior.phrase_weight``, and the words inside a matched phrase count no
  further: "memory leak" is development, and its "leak" no longer votes for security. A phrase
  is matched on every token, stopwords and numbers included: "do we have" and "how to" say
  nothing when only "have" or "how" is there.
* **examples** (and the kind's description) teach a smoothed log-ratio per feature: how much
  more often it occurs in this kind's examples than in the average kind's, never below zero,
  times ``prior.example_weight``. With K kinds it is at most log K, so no single word decides
  alone; a feature seen in fewer than ``prior.example_min_count`` examples teaches nothing.

The fallback kind scores ``prior.fallback_score`` on top of its own evidence: it means "nothing
here points anywhere", so a description of unknown words leans towards it without a tie, and a
single clear word is enough to outweigh it. Scores become probabilities by a softmax; each is
strictly between 0 and 1. Nothing is broken by name: equal evidence gives equal probabilities.

Pure Python, no model download; results are cached per description (``prior.cache_size``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from coordinator_agent.routing.analysis import stem
from coordinator_agent.routing.config import RoutingConfig

_TOKEN = re.compile(r"[A-Za-z0-9]+")
#: A lower-case letter followed by a capital: camelCase ("GitHub"), not "PRs" or "URLs".
_CAMEL = re.compile(r"[a-z][A-Z]")
_CAMEL_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
#: A score above this would round a probability to exactly 0 or 1 after the softmax.
MAX_SCORE = 30.0
MAX_PHRASE_WORDS = 4
#: Probabilities this close are a tie: float noise must not pick a kind.
TIE_TOLERANCE = 1e-9
STEM_CACHE_SIZE = 50_000


def _mostly_digits(token: str) -> bool:
    if token.isalpha():
        return False
    return sum(ch.isdigit() for ch in token) * 2 > len(token)


@dataclass(frozen=True, slots=True)
class Features:
    """What the prior reads in a description."""

    #: Stems in order (stopwords out); the sequence that words and bigrams are read from.
    words: tuple[str, ...]
    #: The parts of camelCase tokens (``NullPointerException``: null, pointer, exception), each
    #: with the position of its token in ``words``.
    compounds: tuple[tuple[str, int], ...]
    #: Every token in order, stopwords and numbers included (a stem where ``words`` has one):
    #: the sequence phrases are read from, so "do we have" needs its "do we".
    tokens: tuple[str, ...]
    #: For each token, its position in ``words``, or -1 for a token ``words`` leaves out.
    slots: tuple[int, ...]


class TextPrior:
    """P(kind | text) over every kind in the config (and the fallback kind)."""

    def __init__(self, config: RoutingConfig) -> None:
        settings = config.prior
        self.max_chars = config.learning.max_description_chars
        self.stopwords = frozenset(config.stopwords)
        self.fallback = config.fallback_kind
        self.kinds: tuple[str, ...] = tuple(dict.fromkeys([*config.kinds, self.fallback]))
        self._index = {kind: i for i, kind in enumerate(self.kinds)}
        self._base = [0.0] * len(self.kinds)
        self._base[self._index[self.fallback]] = settings.fallback_score
        self._cache_size = settings.cache_size
        self._cache: dict[str, dict[str, float]] = {}
        self._lead_bonus = settings.lead_bonus
        #: raw token -> stem, or "" for a token that is dropped; bounded, cleared when full.
        self._stems: dict[str, str] = {}
        #: feature (stem or "stem stem") -> ((kind index, evidence), ...)
        self._evidence: dict[str, tuple[tuple[int, float], ...]] = {}
        #: phrase (tuple of stems) -> ((kind index, weight), ...)
        self._phrases: dict[tuple[str, ...], tuple[tuple[int, float], ...]] = {}
        self._build(config)

    # --- reading a description ----------------------------------------------------------------

    def features(self, text: str) -> Features:
        text = text[: self.max_chars]
        words: list[str] = []
        parts_of: list[tuple[str, int]] = []
        tokens: list[str] = []
        slots: list[int] = []
        for match in _TOKEN.finditer(text):
            raw = match.group()
            lower = raw.lower()
            word = self._stem(lower)
            tokens.append(word or lower)
            slots.append(len(words) if word else -1)
            if word:
                words.append(word)
            # A compound keeps its place in the sequence as one word ("github" as configured,
            # so "GitHub Actions" meets the phrase "github actions"); its parts are extra words
            # ("NullPointerException" also says "exception").
            if _CAMEL.search(raw):
                parts = _CAMEL_PART.findall(raw)
                if len(parts) > 1:
                    for part in parts:
                        word = self._stem(part.lower())
                        if word:
                            parts_of.append((word, max(0, len(words) - 1)))
        return Features(tuple(words), tuple(parts_of), tuple(tokens), tuple(slots))

    def _stem(self, token: str) -> str:
        word = self._stems.get(token)
        if word is None:
            if len(token) < 2 or token in self.stopwords or _mostly_digits(token):
                word = ""
            else:
                word = stem(token)
            if len(self._stems) >= STEM_CACHE_SIZE:
                self._stems.clear()
            self._stems[token] = word
        return word

    # --- scoring ------------------------------------------------------------------------------

    def scores(self, description: str) -> dict[str, float]:
        """Each kind's evidence in nats (the softmax input), before the fallback's base."""
        raw = self._raw(description)
        return {kind: raw[i] - self._base[i] for i, kind in enumerate(self.kinds)}

    def probabilities(self, description: str) -> dict[str, float]:
        """P(kind | text) over every kind in the config: each in (0, 1), summing to 1."""
        cached = self._cache.get(description)
        if cached is not None:
            return dict(cached)
        raw = self._raw(description)
        top = max(raw)
        exps = [math.exp(s - top) for s in raw]
        total = sum(exps)
        result = {kind: exps[i] / total for i, kind in enumerate(self.kinds)}
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                # Drop the oldest entry (dicts keep insertion order): a cheap bounded cache.
                del self._cache[next(iter(self._cache))]
            self._cache[description] = result
        return dict(result)

    def drop_caches(self) -> None:
        """After a flood: its descriptions' entries would hold the flood's heap pages."""
        self._cache = {}
        self._stems = {}

    def best(self, description: str) -> str:
        """The most probable kind; when several share the top, the fallback kind (never a name).

        Equal probabilities mean the text does not decide between those kinds, and deciding
        that nothing decides is what the fallback kind is for.
        """
        probabilities = self.probabilities(description)
        top = max(probabilities.values())
        leaders = [k for k, p in probabilities.items() if top - p <= TIE_TOLERANCE]
        return leaders[0] if len(leaders) == 1 else self.fallback

    def matched(self, description: str) -> dict[str, list[str]]:
        """Per kind, the features that gave it evidence (for explanations), strongest first."""
        found: dict[str, dict[str, float]] = {}
        for feature, position, weight_by_kind in self._matches(self.features(description)):
            lead = self._lead(position)
            for i, weight in weight_by_kind:
                bucket = found.setdefault(self.kinds[i], {})
                bucket[feature] = bucket.get(feature, 0.0) + weight * lead
        return {kind: sorted(fs, key=lambda f: -fs[f]) for kind, fs in found.items()}

    def _lead(self, position: int) -> float:
        # Titles name their subject first ("Okta: ...", "NullPointerException at ..."), so the
        # first words weigh a little more; this also settles what would otherwise be a tie.
        return 1.0 + self._lead_bonus / (1 + position)

    def _raw(self, description: str) -> list[float]:
        raw = list(self._base)
        for _, position, weight_by_kind in self._matches(self.features(description)):
            lead = self._lead(position)
            for i, weight in weight_by_kind:
                raw[i] += weight * lead
        return [min(MAX_SCORE, s) for s in raw]

    def _matches(
        self, features: Features
    ) -> Iterator[tuple[str, int, tuple[tuple[int, float], ...]]]:
        words = features.words
        consumed = [False] * len(words)
        # Phrases are read from every token, stopwords included ("do we have" is not "have"),
        # longest first, so "penetration test report" beats "test report".
        tokens, slots = features.tokens, features.slots
        taken = [False] * len(tokens)
        for size in range(MAX_PHRASE_WORDS, 1, -1):
            for start in range(len(tokens) - size + 1):
                hit = self._phrases.get(tokens[start:start + size])
                if hit is not None and not any(taken[start:start + size]):
                    taken[start:start + size] = [True] * size
                    inside = [slot for slot in slots[start:start + size] if slot >= 0]
                    for slot in inside:
                        consumed[slot] = True
                    yield " ".join(tokens[start:start + size]), inside[0] if inside else 0, hit
        seen: set[str] = set()
        known: set[int] = set()  # positions whose whole word had evidence or a phrase
        known.update(i for i, used in enumerate(consumed) if used)
        for feature, position in _feature_names(words, consumed, ()):
            if feature not in seen:
                seen.add(feature)
                hit = self._evidence.get(feature)
                if hit is not None:
                    if " " not in feature:
                        known.add(position)
                    yield feature, position, hit
        # The parts of a camelCase word speak only for a word the tables do not know:
        # "ArgoCD" counts once, "ConcurrentModificationException" as its parts.
        for part, position in features.compounds:
            if position not in known and part not in seen:
                seen.add(part)
                hit = self._evidence.get(part)
                if hit is not None:
                    yield part, position, hit

    # --- learning the table from the config ---------------------------------------------------

    def _entry(self, entry: str) -> tuple[str, ...]:
        """A vocabulary entry as the sequence it is matched against: one word, or a phrase of
        all its tokens ("do we have" keeps "do we": without them it would be the word "have")."""
        features = self.features(entry)
        return features.tokens if len(features.tokens) > 1 else features.words

    def _build(self, config: RoutingConfig) -> None:
        settings = config.prior
        evidence: dict[str, dict[int, float]] = {}

        def add(feature: str, kind: int, weight: float) -> None:
            if weight > 0:
                by_kind = evidence.setdefault(feature, {})
                by_kind[kind] = by_kind.get(kind, 0.0) + weight

        # Keywords, terms and hints: a word listed by several kinds is shared between them.
        listed: dict[str, dict[int, float]] = {}
        phrases: dict[tuple[str, ...], dict[int, float]] = {}

        def list_word(words: tuple[str, ...], k: int, weight: float) -> None:
            if len(words) == 1:
                by_kind = listed.setdefault(words[0], {})
                by_kind[k] = max(by_kind.get(k, 0.0), weight)
            elif len(words) > 1:  # "snipe-it", "end-of-life": a phrase after all
                by_kind = phrases.setdefault(words[:MAX_PHRASE_WORDS], {})
                by_kind[k] = max(by_kind.get(k, 0.0), weight)

        for kind, spec in config.kinds.items():
            k = self._index[kind]
            for keyword in spec.keywords:
                list_word(self._entry(keyword), k, settings.keyword_weight)
            for term in spec.terms:
                list_word(self._entry(term), k, settings.term_weight)
            for hint in spec.hints:
                list_word(self._entry(hint), k, settings.hint_weight)
            for phrase in spec.phrases:
                list_word(self._entry(phrase), k, settings.phrase_weight)
        for word, by_kind in listed.items():
            for k, weight in by_kind.items():
                add(word, k, weight / len(by_kind))

        # Examples: smoothed rate of each feature in a kind's examples against the average kind.
        counts: dict[int, dict[str, int]] = {}
        sizes: dict[int, int] = {}
        for kind, spec in config.kinds.items():
            texts = [*spec.examples, *([spec.description] if spec.examples else [])]
            if not texts:
                continue
            k = self._index[kind]
            sizes[k] = len(texts)
            per_kind = counts.setdefault(k, {})
            for text in texts:
                f = self.features(text)
                unconsumed = [False] * len(f.words)
                for name in {n for n, _ in _feature_names(f.words, unconsumed, f.compounds)}:
                    per_kind[name] = per_kind.get(name, 0) + 1
        a = settings.example_smoothing
        # A feature seen in fewer examples than this (in every kind) is more likely an accident
        # of wording ("two", "new") than a sign of the kind: it teaches nothing.
        everything = {name for per_kind in counts.values() for name, n in per_kind.items()
                      if n >= settings.example_min_count}
        for name in everything:
            rates = {k: (counts[k].get(name, 0) + a) / (sizes[k] + 2 * a) for k in sizes}
            average = sum(rates.values()) / len(rates)
            for k, rate in rates.items():
                add(name, k, settings.example_weight * max(0.0, math.log(rate / average)))

        self._evidence = {f: tuple(sorted(by_kind.items())) for f, by_kind in evidence.items()}
        self._phrases = {p: tuple(sorted(by_kind.items())) for p, by_kind in phrases.items()}


def _feature_names(
    words: tuple[str, ...], consumed: list[bool], compounds: Iterable[tuple[str, int]]
) -> Iterator[tuple[str, int]]:
    """Unigrams (not inside a matched phrase), bigrams and compounds, with their positions."""
    for i, word in enumerate(words):
        if not consumed[i]:
            yield word, i
        if i and not (consumed[i] and consumed[i - 1]):
            yield f"{words[i - 1]} {word}", i - 1
    yield from compounds
