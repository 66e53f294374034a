"""The cost of a routing decision: its wall time, its own CPU time, and why a slow one was slow.

The dispatcher times every ``CoordinationPlanner.select`` twice: wall time
(``coordinator_dispatch_decision_seconds``) and the CPU time of the coordinator's thread
(``coordinator_dispatch_decision_cpu_seconds``). A decision is synchronous on the event loop,
so nothing else in the process runs inside it: the difference between the two is time the
thread was off the CPU, either preempted (the machine is busy: an involuntary context switch)
or blocked (it waited for the disk or a lock: a voluntary one), not the coordinator's other
work. The thread's context switches tell which (Linux; elsewhere a long wait counts as
preempted).

A decision over ``SLOW_DECISION_S`` of wall time is counted by cause
(``coordinator_dispatch_decision_slow_total``) and logged, at most one line per
``LOG_EVERY_S``, with what it did besides deciding (:class:`DecisionWork`, filled by the
planner) and how many garbage collections ran inside it.
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from dataclasses import dataclass

from coordinator_agent.ops.metrics import Metrics

log = logging.getLogger(__name__)

#: Wall time past which a decision is counted and logged as slow (the goal is p99 < 1 ms).
SLOW_DECISION_S = 0.001
#: At most one log line per this many seconds; the lines in between are counted in the next.
LOG_EVERY_S = 10.0


@dataclass(slots=True)
class DecisionWork:
    """What one ``select`` did besides scoring and picking (reset by each ``select``)."""

    regrouped: int = 0  # agents grouped from scratch (no grouping yet, or too far behind)
    folded: int = 0  # fleet changes folded into the grouping (repeats included)
    view_built: bool = False  # a new constraint's pools: one pass over the kinds it matches
    prior_built: bool = False  # the text prior, on first use (``warm_up`` builds it at start)
    #: The decision log's buffer was full and written to the store (decisions.py): a burst of
    #: ``MAX_PENDING`` decisions with no outcome or scrape in between.
    log_written: bool = False

    def reset(self) -> None:
        self.regrouped = 0
        self.folded = 0
        self.view_built = False
        self.prior_built = False
        self.log_written = False


_THREAD = getattr(resource, "RUSAGE_THREAD", None)


def _collections() -> int:
    return sum(generation["collections"] for generation in gc.get_stats())


def _switches() -> tuple[int, int]:
    """This thread's (voluntary, involuntary) context switches so far; (0, 0) if unknown."""
    if _THREAD is None:
        return 0, 0
    usage = resource.getrusage(_THREAD)
    return usage.ru_nvcsw, usage.ru_nivcsw


class DecisionCost:
    """Times decisions (``begin``, then ``end``) into the metrics; logs the slow ones."""

    def __init__(self, metrics: Metrics, *, slow_s: float = SLOW_DECISION_S,
                 log_every_s: float = LOG_EVERY_S) -> None:
        self.metrics = metrics
        self.slow_s = slow_s
        self.log_every_s = log_every_s
        self._wall = 0.0
        self._cpu = 0.0
        self._gcs = 0
        self._switches = (0, 0)
        self._logged_at = float("-inf")
        self._unlogged = 0  # slow decisions since the last line

    def begin(self) -> None:
        self._gcs = _collections()
        self._switches = _switches()
        self._cpu = time.thread_time()
        self._wall = time.perf_counter()

    def end(self, work: DecisionWork, agents: int) -> float:
        """Record the decision begun last; returns its wall time in seconds."""
        wall = time.perf_counter() - self._wall
        cpu = time.thread_time() - self._cpu
        self.metrics.dispatch_decision.observe(wall)
        self.metrics.dispatch_decision_cpu.observe(cpu)
        if wall > self.slow_s:
            gcs = _collections() - self._gcs
            voluntary, _ = _switches()
            blocked = voluntary > self._switches[0]
            cause = slow_cause(work, gcs, wall, cpu, blocked=blocked)
            self.metrics.dispatch_decision_slow.labels(cause).inc()
            self._log(cause, work, gcs=gcs, wall=wall, cpu=cpu, agents=agents)
        return wall

    def _log(self, cause: str, work: DecisionWork, *, gcs: int, wall: float, cpu: float,
             agents: int) -> None:
        now = time.monotonic()
        if now - self._logged_at < self.log_every_s:
            self._unlogged += 1
            return
        self._logged_at = now
        more, self._unlogged = self._unlogged, 0
        log.info("slow routing decision (%s): %.1f ms, %.1f ms of it on the CPU; %d agents, "
                 "regrouped %d, folded %d changes, new view %s, text prior built %s, "
                 "decision log written %s, %d garbage collection(s)%s", cause, wall * 1000,
                 cpu * 1000, agents, work.regrouped, work.folded, work.view_built,
                 work.prior_built, work.log_written, gcs,
                 f" ({more} more slow since the last such line)" if more else "")


def slow_cause(work: DecisionWork, gcs: int, wall: float, cpu: float, *,
               blocked: bool = False) -> str:
    """The likeliest reason a decision was slow (a bounded metric label), one-off work first.

    ``blocked``: the thread gave up the CPU on its own during the decision (it waited for
    something); otherwise time off the CPU is the machine's (preempted).
    """
    if work.prior_built:
        return "text_prior"
    if work.regrouped:
        return "regroup"
    if work.log_written:
        return "log_write"
    if gcs:
        return "gc"
    if work.view_built:
        return "view"
    if wall > 2 * cpu:  # off the CPU for longer than it ran
        return "blocked" if blocked else "waited_for_cpu"
    if work.folded:
        return "fold"
    return "scoring"
