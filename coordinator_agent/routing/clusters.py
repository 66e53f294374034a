"""DescriptionClusters: online groups of similar descriptions, the router's finer context.

The coarse contexts of the bandit (the kind the text points at) lump together groups of tasks
that the fleet may treat differently: docs and release notes both point at documentation.
When one such group drifts, evidence keyed on the coarse context never sees it alone. So the
router also groups descriptions by the words they share, online, and keys evidence on the
group (``@c:<id>``, a context of ``bandit.features``).

Clusters are nested in a coarse group (the kind the text points at): a description is only
compared with the clusters of its group, so words that every group uses (a service name) can
not pull tickets the text tells apart into one cluster, and the fine context always refines
the coarse one it backs off to.

A description is its set of keywords (the analyser's stems). Each word weighs its inverse
document frequency, ``log((2 + N) / (1 + df))`` over the N tasks learned so far, so a word
every sort of task uses (a service name) counts little, and the words of a sort of ticket
("faq", "runbook", "pagination") count much. A cluster keeps the summed words of its members
(a centroid); a description's similarity to a cluster is the cosine of the two weighted
vectors (a word no learned description used weighs most: it is what makes a ticket new).
Learning a task (its first try) puts it in the most similar cluster when that similarity
reaches ``threshold``, else it starts a new cluster (at most ``max_clusters``; then it joins
the most similar one, if any shares a word).

Assignment (:meth:`assign`) reads only: a decision never changes the clusters, and learning
(:meth:`learn`) is a deterministic function of the descriptions learned in order, so a standby
applying the same updates builds the same clusters (``updates.py``). :meth:`rows` and
:meth:`load` move the state to and from the learning store.

Cost: one lookup per keyword, then one per keyword and cluster sharing it (a centroid's
length is computed when the cluster gains a member, with the word frequencies of that moment,
and stored with it). A word shared by more than ``MAX_POSTINGS`` clusters is too common to
tell clusters apart and is skipped when looking for candidates (it still counts in the cosine
of the candidates found through rarer words). Candidates are looked up in the description's
group only, and at most ``MAX_CANDIDATES`` are compared, found through its rarest words first:
a decision's cost stays bounded however many clusters there are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

PREFIX = "c:"  # the context's name: "@c:<id>" among a task's features
MAX_POSTINGS = 48
#: Clusters compared per description at most (found through its rarest words first).
MAX_CANDIDATES = 64
#: (cluster id, coarse group, members, norm, centroid as "word count word count ...")
ClusterRow = tuple[int, str, float, float, str]


class DescriptionClusters:
    def __init__(self, *, threshold: float, max_clusters: int) -> None:
        self.threshold = threshold
        self.max_clusters = max_clusters
        self.enabled = threshold > 0 and max_clusters > 0
        self.tasks = 0  # descriptions learned (N of the idf)
        self._df: dict[str, int] = {}  # word -> learned descriptions using it
        self._centroids: dict[int, dict[str, float]] = {}
        self._members: dict[int, float] = {}
        self._groups: dict[int, str] = {}
        #: Length of each centroid's weighted vector, computed when the cluster last gained a
        #: member (and stored with it): a decision then costs one lookup per word and
        #: candidate, not a pass over every centroid's words.
        self._norms: dict[int, float] = {}
        #: (group, word) -> the group's clusters using the word, oldest first
        self._postings: dict[tuple[str, str], dict[int, None]] = {}
        self._spread: dict[str, int] = {}  # word -> clusters of any group using it

    def __len__(self) -> int:
        return len(self._centroids)

    def idf(self, word: str) -> float:
        return math.log((2.0 + self.tasks) / (1.0 + self._df.get(word, 0)))

    def _nearest(self, words: Sequence[str], group: str) -> tuple[int | None, float]:
        """The most similar cluster and its cosine; ties go to the older cluster (lower id)."""
        if not words or not self._centroids:
            return None, 0.0
        weights = {w: self.idf(w) for w in words}
        norm = math.sqrt(sum(v * v for v in weights.values()))
        if norm <= 0.0:
            return None, 0.0
        candidates: dict[int, None] = {}
        spread = self._spread
        postings = [p for p in (self._postings.get((group, w)) for w in words
                                if spread.get(w, 0) <= MAX_POSTINGS) if p is not None]
        postings.sort(key=len)  # stable: ties keep the description's word order
        for posting in postings:
            candidates.update(posting)
            if len(candidates) >= MAX_CANDIDATES:
                break
        best: int | None = None
        best_sim = 0.0
        norms = self._norms
        centroids = self._centroids
        # The centroid's weight of a word is count x idf, so a word adds idf^2 x count.
        squares = [(word, x * x) for word, x in weights.items()]
        for cid in candidates:
            c_norm = norms[cid]
            if c_norm <= 0.0:
                continue
            count_of = centroids[cid].get
            dot = 0.0
            for word, xx in squares:
                count = count_of(word)
                if count is not None:
                    dot += xx * count
            sim = dot / (norm * c_norm)
            if sim > best_sim + 1e-12 or (best is not None and abs(sim - best_sim) <= 1e-12
                                          and cid < best):
                best, best_sim = cid, sim
        return best, best_sim

    def assign(self, keywords: Sequence[str], group: str = "") -> int | None:
        """The cluster of a description of ``group`` (no side effects); None: none is similar
        enough."""
        if not self.enabled:
            return None
        cid, sim = self._nearest(list(dict.fromkeys(keywords)), group)
        return cid if cid is not None and sim >= self.threshold else None

    def learn(self, keywords: Sequence[str],
              group: str = "") -> tuple[int | None, ClusterRow | None]:
        """Add one learned description of ``group``; returns its cluster and the changed row,
        for the store."""
        if not self.enabled:
            return None, None
        words = list(dict.fromkeys(keywords))
        if not words:
            return None, None
        cid, sim = self._nearest(words, group)
        if cid is None or (sim < self.threshold and len(self._centroids) < self.max_clusters):
            cid = max(self._centroids, default=-1) + 1
            self._centroids[cid] = {}
            self._members[cid] = 0.0
            self._groups[cid] = group
        centroid = self._centroids[cid]
        for word in words:
            centroid[word] = centroid.get(word, 0.0) + 1.0
            posting = self._postings.setdefault((group, word), {})
            if cid not in posting:
                posting[cid] = None
                self._spread[word] = self._spread.get(word, 0) + 1
            self._df[word] = self._df.get(word, 0) + 1
        self._members[cid] += 1.0
        self.tasks += 1
        self._norms[cid] = math.sqrt(sum((c * self.idf(w)) ** 2 for w, c in centroid.items()))
        return cid, self._row(cid)

    def _row(self, cid: int) -> ClusterRow:
        centroid = self._centroids[cid]
        words = " ".join(f"{w} {c:g}" for w, c in centroid.items())
        return cid, self._groups[cid], self._members[cid], self._norms[cid], words

    def rows(self) -> Iterable[ClusterRow]:
        for cid in self._centroids:
            yield self._row(cid)

    def load(self, rows: Iterable[ClusterRow]) -> None:
        """Rebuild from stored rows; the document frequencies follow from the centroids."""
        for cid, group, members, norm, text in sorted(rows):
            parts = text.split()
            centroid = {parts[i]: float(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
            self._centroids[int(cid)] = centroid
            self._members[int(cid)] = float(members)
            self._groups[int(cid)] = str(group)
            self._norms[int(cid)] = float(norm)
            self.tasks += int(members)
            for word, count in centroid.items():
                self._postings.setdefault((str(group), word), {})[int(cid)] = None
                self._spread[word] = self._spread.get(word, 0) + 1
                self._df[word] = self._df.get(word, 0) + int(count)

    def members(self, cid: int) -> float:
        return self._members.get(cid, 0.0)
