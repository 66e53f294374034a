"""Task analysis: what a description is about, in terms the router can score and learn from.

The vocabulary comes from :class:`~coordinator_agent.routing.config.RoutingConfig`. Words of the
description and of the vocabulary go through the same small stemmer, so "deploying",
"deployed" and "deployment" all meet the configured "deploy" without listing every form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from coordinator_agent.routing.config import Complexity, RoutingConfig

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_KEEP_DOUBLE = frozenset("lsz")
STEM_CACHE_SIZE = 50_000
#: Analyses kept by description: a task's text is read on intake (urgency), by the decision
#: and by the learning of its outcome, and automated fleets repeat descriptions.
ANALYSIS_CACHE_SIZE = 4_096


def stem(word: str) -> str:
    """A deliberately small stemmer: plural, -ing, -ed, -ment and a final e.

    It only has to map the usual forms of one word onto one key, identically for the
    vocabulary and for descriptions; it does not need to produce real words.
    """
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) >= 7:
        word = _undouble(word[:-3])
    elif word.endswith("ed") and len(word) >= 5:
        word = _undouble(word[:-2])
    elif word.endswith("ment") and len(word) >= 8:
        word = word[:-4]
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    return word


def _undouble(word: str) -> str:
    if len(word) >= 3 and word[-1] == word[-2] and word[-1] not in _KEEP_DOUBLE:
        return word[:-1]
    return word


def _mostly_digits(token: str) -> bool:
    # Version numbers, ids and CVE numbers make every signature unique and teach nothing.
    if token.isalpha():
        return False
    return sum(ch.isdigit() for ch in token) * 2 > len(token)


@dataclass(frozen=True, slots=True)
class TaskAnalysis:
    """What the analyser found; ``keywords`` are stems, vocabulary words first.

    Analyses are cached and shared (``TaskAnalyzer.analyze``): never mutate ``domain_match``.
    """

    keywords: tuple[str, ...]
    category: str
    complexity: Complexity
    #: Kinds whose vocabulary the description uses, best match first.
    domains: tuple[str, ...]
    #: Per kind in ``domains``: its keyword hits relative to the best kind (the best has 1.0).
    domain_match: dict[str, float]
    urgency: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "keywords": list(self.keywords),
            "category": self.category,
            "complexity": self.complexity.value,
            "domains": list(self.domains),
            "urgency": self.urgency,
        }


class TaskAnalyzer:
    """Turns a description into a :class:`TaskAnalysis`; all lookups are precomputed sets."""

    URGENCY_LEVELS = ("critical", "high", "low")

    def __init__(self, config: RoutingConfig) -> None:
        self.max_keywords = config.learning.max_keywords
        self.max_chars = config.learning.max_description_chars
        self.stopwords = frozenset(config.stopwords)
        self.kind_order = {kind: i for i, kind in enumerate(config.kinds)}
        self.domain_index = _index((kind, spec.keywords) for kind, spec in config.kinds.items())
        self.category_index = _index(config.categories.items())
        self.high_hints = frozenset(stem(w) for w in config.complexity.high)
        self.low_hints = frozenset(stem(w) for w in config.complexity.low)
        self.long_description = config.complexity.long_description_keywords
        urgency = config.urgency
        self.urgency_words = {
            level: frozenset(stem(w) for w in getattr(urgency, level))
            for level in self.URGENCY_LEVELS
        }
        self._all_urgency = frozenset().union(*self.urgency_words.values())
        #: raw token -> stem, or "" for a token that is dropped; bounded, cleared when full.
        self._stems: dict[str, str] = {}
        #: description (as read: its first ``max_chars``) -> analysis; least recently used
        #: first, bounded by ``cache_size``.
        self.cache_size = ANALYSIS_CACHE_SIZE
        self._analyses: dict[str, TaskAnalysis] = {}

    def _word(self, part: str) -> str:
        word = self._stems.get(part)
        if word is None:
            if len(part) < 2 or part in self.stopwords or _mostly_digits(part):
                word = ""
            else:
                word = stem(part)
            if len(self._stems) >= STEM_CACHE_SIZE:
                self._stems.clear()
            self._stems[part] = word
        return word

    def drop_caches(self) -> None:
        """After a flood: one cached token or analysis per task (an id, a number) would hold a
        heap page per task of the flood's memory."""
        self._stems = {}
        self._analyses = {}

    def tokens(self, description: str) -> list[str]:
        """Distinct stems of the description, in order of first appearance."""
        seen: set[str] = set()
        out: list[str] = []
        for match in _TOKEN.finditer(description[: self.max_chars].lower()):
            raw = match.group()
            parts = (raw, *raw.split("-")) if "-" in raw else (raw,)
            for part in parts:
                word = self._word(part)
                if word and word not in seen:
                    seen.add(word)
                    out.append(word)
        return out

    def analyze(self, description: str) -> TaskAnalysis:
        """The description's analysis; the same text gives the same (shared) analysis."""
        text = description[: self.max_chars]  # all that is read, so all the key needs
        cache = self._analyses
        analysis = cache.pop(text, None)
        if analysis is None:
            analysis = self._analyze(text)
            if len(cache) >= self.cache_size > 0:
                del cache[next(iter(cache))]  # the least recently used
        if self.cache_size > 0:
            cache[text] = analysis  # (again) the most recently used
        return analysis

    def _analyze(self, description: str) -> TaskAnalysis:
        tokens = self.tokens(description)
        hits: dict[str, int] = {}
        vocabulary: list[str] = []
        others: list[str] = []
        for word in tokens:
            kinds = self.domain_index.get(word)
            if kinds:
                vocabulary.append(word)
                for kind in kinds:
                    hits[kind] = hits.get(kind, 0) + 1
            elif word not in self._all_urgency:
                # Urgency says how soon, not who: it stays out of the learned signature.
                others.append(word)
        keywords = tuple((vocabulary + others)[: self.max_keywords])
        domains = tuple(sorted(hits, key=lambda k: (-hits[k], self.kind_order[k])))
        best = hits[domains[0]] if domains else 1
        return TaskAnalysis(
            keywords=keywords,
            category=self._category(tokens),
            complexity=self._complexity(tokens),
            domains=domains,
            domain_match={kind: hits[kind] / best for kind in domains},
            urgency=self._urgency(tokens),
        )

    def _category(self, tokens: list[str]) -> str:
        hits: dict[str, int] = {}
        for word in tokens:
            for name in self.category_index.get(word, ()):
                hits[name] = hits.get(name, 0) + 1
        if not hits:
            return "general"
        # Dicts keep insertion order and max() keeps the first of equals: ties go to the
        # category whose word comes first in the description.
        return max(hits, key=hits.__getitem__)

    def _complexity(self, tokens: list[str]) -> Complexity:
        score = sum(w in self.high_hints for w in tokens) - sum(w in self.low_hints for w in tokens)
        if len(tokens) >= self.long_description:
            score += 1
        if score > 0:
            return Complexity.HIGH
        return Complexity.LOW if score < 0 else Complexity.MEDIUM

    def _urgency(self, tokens: list[str]) -> str:
        present = self._all_urgency.intersection(tokens)
        if present:
            for level in self.URGENCY_LEVELS:
                if present & self.urgency_words[level]:
                    return level
        return "normal"


def _index(groups: Iterable[tuple[str, list[str]]]) -> dict[str, tuple[str, ...]]:
    """stem -> names of the groups (kinds, categories) that list it, in config order."""
    index: dict[str, list[str]] = {}
    for name, words in groups:
        for word in words:
            names = index.setdefault(stem(word), [])
            if name not in names:
                names.append(name)
    return {word: tuple(names) for word, names in index.items()}
