"""Giving memory back after a flood of tasks has drained.

CPython keeps what it freed: a dict that once held 50,000 tasks keeps its 50,000-slot table when
it is empty again, and glibc's allocator keeps freed pages in its arenas. So after a flood the
process would stay at its peak size for good. When the open tasks have fallen to a quarter of
their peak (and the peak was large) and stopped falling, the coordinator copies its big
containers into right-sized ones, runs the garbage collector and asks glibc to return free pages
(``malloc_trim``).

Not while they are still falling: a pass holds the event loop for tens of milliseconds (35-40 ms
after a 2,000-task burst here), during which no result is read and no assignment leaves, so in
the middle of a drain it stalls the work it is cleaning up after. Once the drain pauses or ends,
nothing waits on it.

The garbage collector, for the processes the command line starts (``settle_heap``): what
start-up built (modules, the routing configuration, the text prior: some 75,000 objects) lives
as long as the process, and each full collection walked all of it again; and the young
generation was collected every 700 new containers, a few times per task in a burst. In an HA
burst the collector took about an eighth of the coordinator's CPU. So once started, the
process freezes what start-up built (``gc.freeze``: never walked again; still freed by its
reference counts) and collects its young generation every ``YOUNG_THRESHOLD`` containers.
Almost nothing the coordinator makes is cyclic garbage (reference counting frees it at
once), so the larger young generation holds little more memory.
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


#: New containers between two collections of the young generation (CPython's default: 700).
YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once the process has started: freeze what start-up built out of the collector's way and
    collect the young generation less often (module docstring)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def release_free_memory() -> None:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


class FloodWatch:
    """Tracks the open-task peak and compacts once a flood has drained.

    The first compaction comes when the open tasks are at most a quarter of the peak and did
    not fall since the last look (the drain paused or ended), the next at a quarter of that, and
    so on down to none: a few passes per flood at most, the last one on an empty table.
    """

    def __init__(self, compact: Callable[[], None], min_peak: int = MIN_PEAK) -> None:
        self.compact = compact
        self.min_peak = min_peak
        self.peak = 0
        self._threshold = -1
        self._last = 0  # the open tasks at the last look
        self.compactions = 0

    def observe(self, open_tasks: int) -> bool:
        """Call now and then (the sweep: every 0.25 s) with the number of open tasks; True when
        it compacted."""
        falling, self._last = open_tasks < self._last, open_tasks
        if open_tasks > self.peak:
            self.peak, self._threshold = open_tasks, open_tasks // 4
        if self.peak < self.min_peak or open_tasks > self._threshold or falling:
            return False
        log.info("flood draining (%d open tasks, peak %d): giving memory back", open_tasks,
                 self.peak)
        self.compact()
        release_free_memory()
        self.compactions += 1
        if open_tasks == 0:
            self.peak, self._threshold = 0, -1  # drained: the next flood starts afresh
        else:
            self._threshold = open_tasks // 4
        return True
