"""Handlers for the example worker (``coordinator-agent worker``): small, real, deterministic work.

The operation comes from the task input's ``op`` (default ``stats``):
``stats`` text statistics, ``hash`` SHA-256 digests, ``sleep`` a delay (with progress reports),
``noop`` nothing (benchmarks), ``fail`` an error (to see retries and failure handling).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from typing import Any

from .worker import TaskContext

WORD = re.compile(r"[A-Za-z0-9']+")
MAX_SLEEP_S = 300.0


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


async def example_handler(task: TaskContext) -> Any:
    params = task.input if isinstance(task.input, dict) else {}
    op = params.get("op", "stats")
    if op == "noop":
        return None
    if op == "stats":
        text = params.get("text")
        return text_stats(text if isinstance(text, str) else task.description)
    if op == "hash":
        data = params.get("data", task.description)
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
    raise ValueError(f"unknown op {op!r} (use stats, hash, sleep, noop or fail)")
