"""The example worker's handlers: deterministic results for each op."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from coordinator_agent.agent.examples import example_handler, text_stats
from coordinator_agent.agent.worker import TaskContext
from coordinator_agent.exceptions import TransportError
from coordinator_agent.wire import protocol

TEXT = "Hello world. Hello again! Is the world round? Yes"


class DummyAgent:
    """Stands in for WorkerAgent: only ``report`` is used by TaskContext.report."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[protocol.Model] = []
        self.fail = fail

    async def report(self, payload: protocol.Model) -> None:
        self.sent.append(payload)
        if self.fail:
            raise TransportError("broker down")


def _ctx(input: Any = None, description: str = "the description",
         agent: DummyAgent | None = None) -> TaskContext:
    return TaskContext(task_id="t-1", attempt=2, description=description, input=input,
                       timeout_s=5.0, _agent=agent or DummyAgent())  # type: ignore[arg-type]


def test_text_stats_known_text() -> None:
    stats = text_stats(TEXT)
    assert stats == {
        "characters": len(TEXT),
        "words": 9,
        "unique_words": 7,
        "sentences": 4,
        "top_words": [
            {"word": "hello", "count": 2},
            {"word": "world", "count": 2},
            {"word": "again", "count": 1},
            {"word": "is", "count": 1},
            {"word": "the", "count": 1},
        ],
        "sha256": hashlib.sha256(TEXT.encode()).hexdigest(),
    }


def test_text_stats_empty_and_apostrophes() -> None:
    assert text_stats("") == {
        "characters": 0, "words": 0, "unique_words": 0, "sentences": 0, "top_words": [],
        "sha256": hashlib.sha256(b"").hexdigest(),
    }
    stats = text_stats("Don't stop. DON'T!")
    assert stats["words"] == 3
    assert stats["unique_words"] == 2
    assert stats["top_words"][0] == {"word": "don't", "count": 2}


def test_text_stats_counts_characters_not_bytes() -> None:
    stats = text_stats("héllo wörld")
    assert stats["characters"] == 11
    assert stats["sha256"] == hashlib.sha256("héllo wörld".encode()).hexdigest()


async def test_stats_op_with_text() -> None:
    assert await example_handler(_ctx({"op": "stats", "text": TEXT})) == text_stats(TEXT)


async def test_default_op_is_stats_of_description() -> None:
    assert await example_handler(_ctx(None, description=TEXT)) == text_stats(TEXT)
    assert await example_handler(_ctx("not a dict", description=TEXT)) == text_stats(TEXT)
    assert await example_handler(_ctx({"text": 42}, description=TEXT)) == text_stats(TEXT)


async def test_hash_op() -> None:
    result = await example_handler(_ctx({"op": "hash", "data": "abc", "rounds": 3}))
    digest = b"abc"
    for _ in range(3):
        digest = hashlib.sha256(digest).digest()
    assert result == {"sha256": digest.hex(), "rounds": 3}


async def test_hash_op_defaults_and_bounds() -> None:
    result = await example_handler(_ctx({"op": "hash"}, description="desc"))
    assert result == {"sha256": hashlib.sha256(b"desc").hexdigest(), "rounds": 1}
    low = await example_handler(_ctx({"op": "hash", "data": "x", "rounds": 0}))
    assert low["rounds"] == 1
    assert low["sha256"] == hashlib.sha256(b"x").hexdigest()
    high = await example_handler(_ctx({"op": "hash", "data": "x", "rounds": 10**9}))
    assert high["rounds"] == 100_000


async def test_noop_op() -> None:
    agent = DummyAgent()
    assert await example_handler(_ctx({"op": "noop"}, agent=agent)) is None
    assert agent.sent == []


async def test_fail_op() -> None:
    with pytest.raises(RuntimeError, match="asked to fail"):
        await example_handler(_ctx({"op": "fail"}))
    with pytest.raises(RuntimeError, match=r"^custom message$"):
        await example_handler(_ctx({"op": "fail", "message": "custom message"}))


async def test_unknown_op() -> None:
    with pytest.raises(ValueError, match="unknown op 'explode'"):
        await example_handler(_ctx({"op": "explode"}))


async def test_sleep_op_reports_progress() -> None:
    agent = DummyAgent()
    result = await example_handler(_ctx({"op": "sleep", "seconds": 0.01}, agent=agent))
    assert result == {"slept_s": 0.01}
    assert all(isinstance(m, protocol.TaskProgress) for m in agent.sent)
    progress = [m for m in agent.sent if isinstance(m, protocol.TaskProgress)]
    assert [p.progress for p in progress] == [0.25, 0.5, 0.75, 1.0]
    assert {(p.task_id, p.attempt) for p in progress} == {("t-1", 2)}
    assert progress[-1].message == "slept 0.01s"


async def test_sleep_op_clamps_negative() -> None:
    agent = DummyAgent()
    assert await example_handler(_ctx({"op": "sleep", "seconds": -5}, agent=agent)) == {
        "slept_s": 0.0
    }
    assert len(agent.sent) == 4


async def test_sleep_op_survives_transport_errors() -> None:
    agent = DummyAgent(fail=True)
    result = await example_handler(_ctx({"op": "sleep", "seconds": 0.01}, agent=agent))
    assert result == {"slept_s": 0.01}
    assert len(agent.sent) == 4


async def test_report_clamps_progress_and_message() -> None:
    agent = DummyAgent()
    ctx = _ctx(agent=agent)
    await ctx.report(1.7, "x" * 5000)
    await ctx.report(-1)
    sent = [m for m in agent.sent if isinstance(m, protocol.TaskProgress)]
    assert [m.progress for m in sent] == [1.0, 0.0]
    assert len(sent[0].message) == 1024
