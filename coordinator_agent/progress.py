"""Progress on long waits, on stderr so stdout stays clean for --json and pipes."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, label: str, *, enabled: bool = True,
                 stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(1, total)
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.started = time.monotonic()
        self._tty = self.stream.isatty()
        self._last_line = 0.0

    def update(self, done: int, failed: int = 0) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done >= self.total
        if not self._tty and not finished and now - self._last_line < 1.0:
            return  # in logs, one line a second is plenty
        self._last_line = now
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        text = (f"{self.label} [{bar}] {done}/{self.total}"
                f"{f' ({failed} failed)' if failed else ''} {rate:.1f}/s {elapsed:.1f}s")
        self.stream.write(("\r" + text) if self._tty else text + "\n")
        if self._tty and finished:
            self.stream.write("\n")
        self.stream.flush()


class Spinner:
    """Elapsed time while waiting for one thing (``submit --wait``)."""

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.started = time.monotonic()

    def __enter__(self) -> Spinner:
        if self.enabled:
            self.stream.write(f"waiting for {self.label}...")
            self.stream.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stream.write(f" {time.monotonic() - self.started:.1f}s\n")
            self.stream.flush()
