"""NeighbourEvidence: similar recent tasks say how wrong the shared model is for this task, per
kind; the memory is bounded, and it survives the learning store."""

from __future__ import annotations

import math
import random
from pathlib import Path

from coordinator_agent.cli.routing import _bandit_table
from coordinator_agent.coordinator.state import AgentRecord
from coordinator_agent.coordinator.tasks import Attempt, AttemptOutcome, TaskRecord
from coordinator_agent.routing.config import default_routing_config
from coordinator_agent.routing.neighbours import (
    MAX_CANDIDATES,
    MAX_OFFSET,
    MAX_POSTINGS,
    NeighbourEvidence,
)
from coordinator_agent.routing.planner import CoordinationPlanner

SERVICES = [("billing", "api"), ("session", "store"), ("checkout", "page"), ("search", "backend")]
FAQ = ("add", "faq", "entri")
NOTES = ("releas", "note", "hotfix")
#: As in real tickets, more sorts of tickets (templates) than services, so a template's words
#: are rarer than a service name.
OTHERS = [("implement", "bulk", "export"), ("port", "client", "async"),
          ("rotat", "leak", "credenti"), ("which", "host", "run"), ("deploy", "stage", "promot")]


def _memory(**overrides: float) -> NeighbourEvidence:
    settings: dict[str, float] = {"memory": 500, "similarity": 0.5, "window": 10,
                                  "strength": 1.0} | overrides
    return NeighbourEvidence(memory=int(settings["memory"]), similarity=settings["similarity"],
                             window=settings["window"], strength=settings["strength"])


def _fill(memory: NeighbourEvidence, rng: random.Random, n: int, *, faq_docs: float) -> None:
    """FAQ entries and release notes, run by documentation; the model predicted 0.9 for both,
    and documentation succeeds on FAQ entries with probability ``faq_docs``."""
    for _ in range(n):
        sort = rng.randrange(7)
        if sort >= 2:
            memory.add((*OTHERS[sort - 2], *rng.choice(SERVICES)), "development",
                       rng.random() < 0.5, 0.5)
            continue
        words = (*(FAQ if sort == 0 else NOTES), *rng.choice(SERVICES))
        rate = faq_docs if sort == 0 else 0.9
        memory.add(words, "documentation", rng.random() < rate, 0.9)


def test_neighbours_are_tickets_of_the_same_sort_whatever_the_service() -> None:
    memory = _memory()
    _fill(memory, random.Random(1), 200, faq_docs=0.9)
    found = memory.neighbours((*FAQ, "billing", "api"))
    assert found, "FAQ entries about other services are similar"
    words = {memory._attempts[seq].words[:3] for seq, _ in found}
    assert words == {FAQ}, "a shared service name does not make a release note a neighbour"
    assert all(0.5 <= sim <= 1.0 + 1e-9 for _, sim in found)
    seqs = [seq for seq, _ in found]
    assert seqs == sorted(seqs, reverse=True), "newest first"


def test_a_kind_failing_on_one_sort_of_task_is_shifted_there_only() -> None:
    memory = _memory()
    rng = random.Random(2)
    _fill(memory, rng, 300, faq_docs=0.9)
    before = memory.local((*FAQ, "checkout", "page"))["documentation"].offset
    assert abs(before) < 1.0, "residuals of a right model are noise around 0"
    _fill(memory, rng, 140, faq_docs=0.2)  # documentation now fails on FAQ entries
    after = memory.local((*FAQ, "checkout", "page"))["documentation"]
    assert after.offset < -1.0 and after.residual < -0.3
    notes = memory.local((*NOTES, "checkout", "page"))["documentation"].offset
    assert abs(notes) < 1.0, "release notes keep succeeding: no shift there"
    assert "general" not in memory.local((*FAQ, "checkout", "page")), "a kind nobody ran"


def test_the_shift_follows_the_newest_outcomes_of_a_kind() -> None:
    memory = _memory(window=5)
    _fill(memory, random.Random(5), 100, faq_docs=0.9)
    for _ in range(30):
        memory.add(FAQ, "documentation", False, 0.9)
    assert memory.local(FAQ)["documentation"].offset <= -1.5
    for _ in range(30):
        memory.add(FAQ, "documentation", True, 0.9)
    assert memory.local(FAQ)["documentation"].offset > 0, "recovered: the old failures fade"


def test_the_shift_is_bounded_and_weaker_with_a_stronger_prior() -> None:
    weak, strong = _memory(strength=0.1), _memory(strength=10.0)
    for memory in (weak, strong):
        _fill(memory, random.Random(6), 100, faq_docs=0.9)
        for _ in range(50):
            memory.add(FAQ, "documentation", False, 0.999)
    assert weak.local(FAQ)["documentation"].offset == -MAX_OFFSET
    assert -MAX_OFFSET < strong.local(FAQ)["documentation"].offset < 0


def test_memory_postings_and_frequencies_stay_bounded() -> None:
    memory = _memory(memory=50)
    rng = random.Random(3)
    _fill(memory, rng, 400, faq_docs=0.9)
    assert len(memory) == 50
    assert memory.forgotten == memory._next - 1 - 50
    assert all(len(p) <= MAX_POSTINGS for p in memory._postings.values())
    counted: dict[str, int] = {}
    for attempt in memory._attempts.values():
        for word in attempt.words:
            counted[word] = counted.get(word, 0) + 1
    assert counted == memory._df, "document frequencies are over the remembered attempts"
    assert math.isclose(memory.idf("faq"), math.log(52 / (1 + counted.get("faq", 0))))


def test_off_remembers_nothing() -> None:
    memory = _memory(memory=0)
    assert not memory.enabled
    assert memory.add(FAQ, "documentation", True, 0.9) is None
    assert memory.local(FAQ) == {} and len(memory) == 0


def _planner(path: Path, clock: list[float]) -> CoordinationPlanner:
    base = default_routing_config()
    config = base.model_copy(update={"bandit": base.bandit.model_copy(
        update={"neighbour_memory": 30})})
    return CoordinationPlanner(8, config=config, store_path=path, clock=lambda: clock[0],
                               rng=random.Random(4))


def test_the_memory_survives_the_store_and_shows_in_route(tmp_path: Path) -> None:
    clock = [1_767_225_600.0]
    path = tmp_path / "learning.sqlite3"
    planner = _planner(path, clock)
    agent = AgentRecord("doc-1", "documentation", frozenset(), 4)
    description = "Add a FAQ entry about the billing API"
    others = ["Write release notes for the session store", "Document the search backend",
              "Draw a diagram of the checkout page data flow"]
    for i in range(40):
        clock[0] += 60
        text = description if i % 2 else others[i % 3]
        task = TaskRecord(id=f"t{i}", description=text, kind="documentation")
        planner.select(task, [agent])
        task.attempts.append(Attempt(1, agent.id, clock[0], clock[0] + 1,
                                     outcome=AttemptOutcome(
                                         "failed" if text == description else "succeeded")))
        planner.record_outcome(task, agent, text != description)
    assert len(planner.learner.neighbours) == 30
    shown = planner.explain(description)["kinds"]["documentation"]["parts"]
    assert shown["local"] < 0 and shown["neighbours"] > 0
    assert shown["model"] < planner.learner.model.belief(
        "documentation", shown["prior_success"],
        planner.learner.features(
            planner.analyzer.analyze(description).keywords,
            planner.learner.contexts(planner.analyzer.analyze(description),
                                     planner.learner.text_prior.probabilities(description))),
        clock[0]).probability, "the local shift is part of the model's probability"
    planner.close()
    again = _planner(path, clock)
    assert len(again.learner.neighbours) == 30
    assert again.explain(description)["kinds"]["documentation"]["parts"]["local"] == \
        shown["local"]
    rows = again.store.db.execute("SELECT COUNT(*) FROM routing_neighbours").fetchone()[0]
    assert rows == 30, "the store keeps only what the memory holds"
    again.close()


def test_a_decision_compares_a_bounded_number_of_candidates() -> None:
    memory = _memory(memory=2000)
    _fill(memory, random.Random(7), 1500, faq_docs=0.9)
    found = memory.neighbours((*FAQ, "billing", "api"))
    assert 0 < len(found) <= MAX_CANDIDATES
    newest_faq = max(seq for seq, a in memory._attempts.items() if a.words[:3] == FAQ)
    assert found[0][0] == newest_faq, "the newest similar attempts are among the candidates"


def test_route_shows_the_similar_tasks_and_their_shift() -> None:
    parts = {"prior": 0.5, "prior_success": 0.55, "successes": 3, "failures": 1,
             "neighbours": 2.345, "local": -1.234, "exploration": 0.01, "chance": 0.9,
             "probability": 0.4}
    table = _bandit_table({"documentation": {"parts": parts}}, ["documentation"])
    header, row = table.splitlines()[:2]
    assert "SIMILAR: SHIFT" in header and "2.3: -1.23" in row


def _reference(memory: NeighbourEvidence, keywords: tuple[str, ...]) -> list[tuple[int, float]]:
    """``neighbours`` written plainly: the same candidates, each cosine summed word by word in
    the attempt's order, newest first."""
    attempts = memory._attempts
    squares = {w: memory.idf(w) ** 2 for w in keywords}
    norm = math.sqrt(sum(squares.values()))
    candidates: list[int] = []
    for word in sorted(squares, key=lambda w: memory._df.get(w, 0)):
        candidates += [s for s in reversed(memory._postings.get(word, ())) if s in attempts]
        if len(set(candidates)) >= MAX_CANDIDATES:
            break
    out = []
    for seq in set(candidates):
        dot = 0.0
        for word in attempts[seq].words:
            dot += squares.get(word, 0.0)
        length = attempts[seq].norm
        if length > 0 and dot >= memory.similarity * norm * length:
            out.append((seq, min(1.0, dot / (norm * length))))
    return sorted(out, reverse=True)


def test_neighbours_are_those_of_the_plain_computation_to_the_last_bit() -> None:
    """The lookup's shortcuts (set operations on the postings, candidates sorted before the
    cosines) change nothing: the same attempts and the same floats, also once the oldest
    attempts are forgotten while their words' postings still name them."""
    memory = _memory(memory=150)
    rng = random.Random(4)
    _fill(memory, rng, 400, faq_docs=0.3)
    queries = [(*FAQ, "billing", "api"), (*NOTES, "search"), ("rotat", "leak", "billing"),
               ("unknown", "words"), FAQ[:1], (*OTHERS[0], *SERVICES[2], "hotfix")]
    for keywords in queries:
        assert memory.neighbours(keywords) == _reference(memory, keywords), keywords
    assert any(memory.neighbours(q) for q in queries)
