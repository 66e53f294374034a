"""TextPrior: P(kind | text) from the description alone, before anything is learned.

This version reads the vocabulary of the routing configuration through the keyword analyser
(``analysis.py``): every kind gets one pseudo-hit, plus its keyword hits, so no kind ever gets
zero and a description without vocabulary words gives every kind the same probability.
Probabilities depend only on hit counts, never on a kind's name or its place in the config.
"""

from __future__ import annotations

from coordinator_agent.routing.analysis import TaskAnalyzer
from coordinator_agent.routing.config import RoutingConfig

#: Weight of one keyword hit against the one pseudo-hit every kind starts with.
HIT_WEIGHT = 2.0


class TextPrior:
    def __init__(self, config: RoutingConfig) -> None:
        self._kinds = list(dict.fromkeys([*config.kinds, config.fallback_kind]))
        self._analyzer = TaskAnalyzer(config)
        self._index = self._analyzer.domain_index

    def probabilities(self, description: str) -> dict[str, float]:
        """P(kind | text) over every kind in the config: each in (0, 1), summing to 1."""
        scores = dict.fromkeys(self._kinds, 1.0)
        for word in self._analyzer.tokens(description):
            for kind in self._index.get(word, ()):
                scores[kind] += HIT_WEIGHT
        total = sum(scores.values())
        return {kind: score / total for kind, score in scores.items()}
