"""Giving memory back after a flood of tasks has drained.

CPython keeps what it freed: a dict that once held 50,000 tasks keeps its 50,000-slot table when
it is empty again, and glibc's allocator keeps freed pages in its arenas. So after a flood the
process would stay at its peak size for good. When the open tasks fall to a quarter of their
peak (and the peak was large), the coordinator copies its big containers into right-sized ones,
runs the garbage collector and asks glibc to return free pages (``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Peaks below this many open tasks are not worth a compaction.
MIN_PEAK = 1_000


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_trim()


def release_free_memory() -> None:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


class FloodWatch:
    """Tracks the open-task peak and compacts once a flood has drained."""

    def __init__(self, compact: Callable[[], None], min_peak: int = MIN_PEAK) -> None:
        self.compact = compact
        self.min_peak = min_peak
        self.peak = 0
        self.compactions = 0

    def observe(self, open_tasks: int) -> bool:
        """Call now and then with the number of open tasks; True when it compacted."""
        self.peak = max(self.peak, open_tasks)
        if self.peak < self.min_peak or open_tasks > self.peak // 4:
            return False
        log.info("flood drained (%d open tasks, peak %d): giving memory back", open_tasks,
                 self.peak)
        self.compact()
        release_free_memory()
        self.peak = open_tasks
        self.compactions += 1
        return True
