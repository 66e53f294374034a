"""Handlers for the example worker (``coordinator-agent worker``): small, real, deterministic work.

The operation comes from the task input's ``op`` (default ``stats``):
``stats`` text statistics, ``hash`` SHA-256 digests, ``sleep`` a delay (with progress reports),
``noop`` nothing (benchmarks), ``fail`` an error (to see retries and failure handling),
``echo`` the input as received. For composite tasks (see ``workflows.py``): ``decompose`` splits
a text into parts, one ``stats`` sub-task each (what a ``planner`` agent answers), and
``synthesize`` merges the sub-tasks' outputs (what a ``synthesizer`` agent answers).

A step of a chain, or a synthesizer, gets ``{"input": {...op...}, "previous": ...}``: the op comes
from the inner input, and ``stats`` and ``hash`` work on ``previous`` when given no text or data.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import Counter
from typing import Any

from coordinator_agent.agent.worker import TaskContext

WORD = re.compile(r"[A-Za-z0-9']+")
MAX_SLEEP_S = 300.0
MAX_PARTS = 64


def text_stats(text: str) -> dict[str, Any]:
    words = [w.lower() for w in WORD.findall(text)]
    sentences = [s for s in re.split(r"[.!?]+", text) if s.strip()]
    return {
        "characters": len(text),
        "words": len(words),
        "unique_words": len(set(words)),
        "sentences": len(sentences),
        "top_words": [{"word": w, "count": n} for w, n in Counter(words).most_common(5)],
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def canonical_json(value: Any) -> str:
    """The one text of a JSON value that ``hash`` digests: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decompose(text: str, parts: int, kind: str | None = None) -> dict[str, Any]:
    """A planner's answer: the text split at word boundaries into ``parts`` near-equal parts."""
    words = text.split()
    count = max(1, min(parts, len(words), MAX_PARTS))
    chunks = [" ".join(words[i * len(words) // count:(i + 1) * len(words) // count])
              for i in range(count)]
    return {"subtasks": [
        {"description": f"text statistics of part {i} of {count}", "kind": kind,
         "input": {"op": "stats", "text": chunk}}
        for i, chunk in enumerate(chunks, start=1)
    ]}


def synthesize(merged: Any) -> dict[str, Any]:
    """A synthesizer's answer: the numeric fields of the succeeded outputs summed, top words
    merged. ``merged`` is the coordinator's fan-in (``{"results": [...], ...}``), untrusted."""
    results = merged.get("results") if isinstance(merged, dict) else None
    if not isinstance(results, list):
        raise ValueError("synthesize needs the merged results as 'previous'")
    totals: dict[str, float] = {}
    words: Counter[str] = Counter()
    used: list[Any] = []
    for result in results:
        output = result.get("output") if isinstance(result, dict) else None
        if not isinstance(output, dict) or result.get("status") != "succeeded":
            continue
        used.append(result.get("index"))
        for key, value in output.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                totals[str(key)] = totals.get(str(key), 0) + value
        for entry in output.get("top_words") or []:
            if (isinstance(entry, dict) and isinstance(entry.get("word"), str)
                    and isinstance(entry.get("count"), int)):
                words[entry["word"]] += entry["count"]
    top = sorted(words.items(), key=lambda item: (-item[1], item[0]))[:5]
    return {"parts": len(used), "indexes": used, "totals": dict(sorted(totals.items())),
            "top_words": [{"word": w, "count": n} for w, n in top]}


def _params(task: TaskContext) -> tuple[dict[str, Any], Any, bool]:
    """The op's parameters, and what a previous step (or the fan-in) handed over, if anything."""
    data = task.input
    if isinstance(data, dict) and set(data) == {"input", "previous"}:
        inner = data["input"]
        return (inner if isinstance(inner, dict) else {}), data["previous"], True
    return (data if isinstance(data, dict) else {}), None, False


async def example_handler(task: TaskContext) -> Any:
    params, previous, handed_over = _params(task)
    op = params.get("op", "stats")
    if op == "noop":
        return None
    if op == "echo":
        return task.input
    if op == "stats":
        text = params.get("text")
        if not isinstance(text, str):
            text = previous if isinstance(previous, str) else task.description
        return text_stats(text)
    if op == "decompose":
        text, kind = params.get("text"), params.get("kind")
        parts = max(1, min(int(params.get("parts", 3)), MAX_PARTS))
        return decompose(text if isinstance(text, str) else task.description, parts,
                         kind if isinstance(kind, str) else None)
    if op == "synthesize":
        return synthesize(previous)
    if op == "hash":
        default = canonical_json(previous) if handed_over else task.description
        data = params.get("data", default)
        rounds = max(1, min(int(params.get("rounds", 1)), 100_000))
        digest = str(data).encode()
        for _ in range(rounds):
            digest = hashlib.sha256(digest).digest()
        return {"sha256": digest.hex(), "rounds": rounds}
    if op == "sleep":
        seconds = max(0.0, min(float(params.get("seconds", 1.0)), MAX_SLEEP_S))
        steps = 4
        for step in range(steps):
            await asyncio.sleep(seconds / steps)
            await task.report((step + 1) / steps, f"slept {seconds * (step + 1) / steps:.2f}s")
        return {"slept_s": seconds}
    if op == "fail":
        raise RuntimeError(str(params.get("message", "asked to fail")))
    raise ValueError(f"unknown op {op!r} (use stats, hash, sleep, noop, fail, echo, decompose "
                     "or synthesize)")
