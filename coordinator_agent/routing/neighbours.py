"""NeighbourEvidence: what the most similar recent tasks say about each kind, for this task.

The bandit's weights are shared: a context such as "the text points at documentation" pools
docs tasks and release notes, and a keyword is shared by every task that uses it. When the
fleet changes for one sort of task only (a kind starts failing on docs, not on release notes),
the shared weights hardly move, and the features only that sort has see few outcomes each.

So the router also keeps the last ``memory`` learned attempts (their keywords, the kind that
ran them, the outcome, and what the model predicted for that kind just before learning it)
and, for a task, looks up the recent attempts whose descriptions are most similar to it. Per
kind, their residuals against the model tell how wrong the shared model is *for tasks like
this one*, now:

    R = sum_i w_i (y_i - p_i)      V = sum_i w_i p_i (1 - p_i)      offset = R / (strength + V)

``offset`` is one Newton step for a local log-odds shift with a Gaussian prior of precision
``strength`` (a kernel estimate of the model's local bias), added to the kind's log-odds. The
weight ``w_i`` of a neighbour is its similarity (cosine, at least ``similarity``) times
``keep ** j``, ``j`` the number of more recent neighbours of that kind (about ``window`` of
them count): recency by count, so a sort of task that is seldom seen is not forgotten by time
alone, and the newest outcomes after a change outweigh the many before it. Residuals before a
change are near 0 (the model was right), so they hardly dilute the ones after.

Similarity: a description is its keyword stems, each weighing its inverse document frequency
over the attempts in memory, ``log((2 + N) / (1 + df))``; the cosine of two such sets. Cost:
candidates are the most recent attempts (``MAX_POSTINGS`` per word) that share the task's
rarest words, taken word by word until ``MAX_CANDIDATES`` are found; each candidate then costs
one lookup per word it has. A word every sort of task uses is rarely reached. The memory is
written to the learning store (``routing_neighbours``) in the transaction of the outcome that
added to it, and read back at start-up, so a restart and a standby replaying the same updates
agree (``updates.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Recent attempts looked up per keyword of the task ...
MAX_POSTINGS = 64
#: ... until this many candidates are found, through the task's rarest words first.
MAX_CANDIDATES = 64
#: A local shift never moves a kind's log-odds further than this.
MAX_OFFSET = 4.0
#: (sequence number, keywords space-separated, kind, success 0/1, predicted, norm): the
#: store's row.
NeighbourRow = tuple[int, str, str, int, float, float]


@dataclass(frozen=True, slots=True)
class _Attempt:
    words: tuple[str, ...]
    norm: float  # length of the idf-weighted word vector, when the attempt was added
    kind: str
    success: bool
    predicted: float  # the model's probability of success for ``kind``, before learning it


@dataclass(frozen=True, slots=True)
class Local:
    """The neighbours' verdict on one kind for one task."""

    offset: float  # log-odds shift
    weight: float  # summed weights of the neighbours that ran this kind
    residual: float  # their weighted mean of (success - predicted)


class NeighbourEvidence:
    def __init__(self, *, memory: int, similarity: float, window: float,
                 strength: float) -> None:
        self.memory = memory
        self.similarity = similarity
        self.keep = 1.0 - 1.0 / window if window > 1 else 0.0
        self.strength = strength
        self.enabled = memory > 0 and similarity > 0
        self._attempts: dict[int, _Attempt] = {}
        self._next = 0  # sequence number of the next attempt
        self._df: dict[str, int] = {}
        self._postings: dict[str, deque[int]] = {}

    def __len__(self) -> int:
        return len(self._attempts)

    def idf(self, word: str) -> float:
        return math.log((2.0 + len(self._attempts)) / (1.0 + self._df.get(word, 0)))

    @property
    def forgotten(self) -> int:
        """Attempts up to this sequence number are no longer remembered (for the store)."""
        return self._next - 1 - self.memory

    def add(self, keywords: Sequence[str], kind: str, success: bool,
            predicted: float) -> NeighbourRow | None:
        """Remember one learned attempt; the oldest leaves once ``memory`` are kept. Returns
        the row to store (None: off, or no keywords to compare)."""
        if not self.enabled:
            return None
        words = tuple(dict.fromkeys(keywords))
        if not words:
            return None
        self._count(words)
        # The length uses the frequencies of this moment; it is stored, so a restart agrees.
        norm = math.sqrt(sum(self.idf(w) ** 2 for w in words))
        return self._remember(self._next, _Attempt(words, norm, kind, success,
                                                   min(1.0 - 1e-6, max(1e-6, predicted))))

    def _count(self, words: Sequence[str]) -> None:
        df = self._df
        for word in words:
            df[word] = df.get(word, 0) + 1

    def _remember(self, seq: int, attempt: _Attempt) -> NeighbourRow:
        self._next = seq + 1
        df = self._df
        for word in attempt.words:
            posting = self._postings.get(word)
            if posting is None:
                posting = self._postings[word] = deque(maxlen=MAX_POSTINGS)
            posting.append(seq)
        self._attempts[seq] = attempt
        old = seq - self.memory
        gone = self._attempts.pop(old, None)
        if gone is not None:
            for word in gone.words:
                left = df[word] - 1
                if left:
                    df[word] = left
                else:
                    del df[word]
                    self._postings.pop(word, None)
        return (seq, " ".join(attempt.words), attempt.kind, int(attempt.success),
                attempt.predicted, attempt.norm)

    def neighbours(self, keywords: Sequence[str]) -> list[tuple[int, float]]:
        """(sequence number, cosine) of the remembered attempts similar enough, newest first.

        Candidates are the newest attempts sharing the task's rarest words (at most
        ``MAX_CANDIDATES``), then each one's cosine is computed over all its words."""
        return [(seq, sim) for seq, sim, _ in self._similar(keywords)]

    def _similar(self, keywords: Sequence[str]) -> list[tuple[int, float, _Attempt]]:
        """``neighbours``, each with its attempt."""
        attempts = self._attempts
        if not self.enabled or not attempts:
            return []
        df = self._df
        log, n = math.log, 2.0 + len(attempts)
        squares: dict[str, float] = {}
        for word in keywords:
            idf = log(n / (1.0 + df.get(word, 0)))  # ``idf``
            squares[word] = idf * idf
        norm = math.sqrt(sum(squares.values()))
        if norm <= 0.0:
            return []
        candidates: set[int] = set()
        postings = self._postings
        remembered = attempts.keys()
        for word in sorted(squares, key=lambda w: df.get(w, 0)):
            posting = postings.get(word)
            if posting is None:
                continue
            candidates |= remembered & posting  # a posting may outlive its oldest attempts
            if len(candidates) >= MAX_CANDIDATES:
                break
        limit = self.similarity * norm
        weight = squares.get
        out = []
        for seq in candidates:
            attempt = attempts[seq]
            dot = 0.0
            for word in attempt.words:
                dot += weight(word, 0.0)
            length = attempt.norm
            if length > 0.0 and dot >= limit * length:
                # The stored length used the frequencies of its time: clip to a cosine.
                out.append((seq, min(1.0, dot / (norm * length)), attempt))
        out.sort(key=_newest_first)
        return out

    def local(self, keywords: Sequence[str]) -> dict[str, Local]:
        """Per kind that similar recent tasks ran: the local log-odds shift (no side effects)."""
        found = self._similar(keywords)
        if not found:
            return {}
        sums: dict[str, list[float]] = {}  # kind -> [R, V, W, decay]
        keep = self.keep
        for _, sim, a in found:
            s = sums.get(a.kind)
            if s is None:
                s = sums[a.kind] = [0.0, 0.0, 0.0, 1.0]
            w = sim * s[3]
            p = a.predicted
            s[0] += w * ((1.0 if a.success else 0.0) - p)
            s[1] += w * p * (1.0 - p)
            s[2] += w
            s[3] *= keep
        out = {}
        for kind, (r, v, w, _) in sums.items():
            offset = r / (self.strength + v)
            offset = max(-MAX_OFFSET, min(MAX_OFFSET, offset))
            out[kind] = Local(offset, w, r / w if w > 0 else 0.0)
        return out

    def rows(self) -> list[NeighbourRow]:
        """What is remembered, oldest first, as the store keeps it."""
        return [(seq, " ".join(a.words), a.kind, int(a.success), a.predicted, a.norm)
                for seq, a in sorted(self._attempts.items())]

    def load(self, rows: Iterable[NeighbourRow]) -> None:
        """Remember stored attempts, oldest first (the store keeps the newest ``memory``)."""
        if not self.enabled:
            return
        for seq, words, kind, success, predicted, norm in rows:
            if words:
                attempt = _Attempt(tuple(words.split(" ")), float(norm), str(kind),
                                   bool(success), float(predicted))
                self._count(attempt.words)
                self._remember(int(seq), attempt)


def _newest_first(found: tuple[int, float, _Attempt]) -> int:
    return -found[0]
