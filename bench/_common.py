"""Shared helpers for the benchmarks: statistics, child processes, keyrings, broker clean-up.

Every benchmark talks to the RabbitMQ on loopback only (BROKER_URL), names its queues with a
fresh random suffix and deletes them at the end, and stops the processes it started (SIGTERM,
then SIGKILL of the child's own process group) even when it fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
PYTHON = sys.executable

#: Environment variables the package reads; stripped from the children's environment so that
#: the caller's shell cannot change what is measured.
_ENV_PREFIX = "COORDINATOR_"


# --- statistics -------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


@dataclass(frozen=True)
class Goal:
    """One goal of a benchmark, as run_all's summary shows it."""

    name: str
    measured: str  #: ours, with its unit
    baseline: str  #: the same-run baseline it is compared with ("-" for an absolute bound)
    value: float  #: the ratio (or the figure, for an absolute bound) checked against the target
    target: str  #: e.g. ">= x1.25", "<= 0.8 ms"
    ok: bool

    def row(self) -> list[str]:
        shown = f"x{self.value:.2f}" if self.target.lstrip("<>= ").startswith("x") \
            else f"{self.value:.2f}"
        return [self.name, self.measured, self.baseline, shown, self.target, verdict(self.ok)]


GOAL_COLUMNS = ["goal", "ours", "baseline (same run)", "ratio/value", "target", "verdict"]


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(c) for c in columns], *[[_fmt(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


# --- environment ------------------------------------------------------------------------------


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIX)}
    env.update(extra)
    return env


def restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def empty_config(directory: Path) -> Path:
    """A config file with nothing in it: the benchmarks measure the code's defaults plus what
    they set explicitly, not whatever config/coordinator.yaml holds today."""
    path = directory / "empty.yaml"
    path.write_text("{}\n", encoding="utf-8")
    return path


# --- child processes --------------------------------------------------------------------------


class Children:
    """Child processes in their own sessions; ``stop_all`` ends them (and only them)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def spawn(
        self, name: str, args: Sequence[str], *, env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(args), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self._procs.append((name, proc, log))
        return proc

    def pid(self, name: str) -> int:
        for proc_name, proc, _ in self._procs:
            if proc_name == name:
                return proc.pid
        raise KeyError(name)

    def check_alive(self) -> None:
        for name, proc, _ in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} (pid {proc.pid}) exited with {proc.returncode}:\n{self.tail(name)}"
                )

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.log_dir / f"{name}.log"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def tails(self) -> str:
        return "\n".join(f"--- {name} (last lines) ---\n{self.tail(name)}"
                         for name, _, _ in self._procs)

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful stop) to each child, then SIGKILL to the child's process group."""
        for _, proc, _ in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc, _ in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for name, proc, log in self._procs:
            if proc.poll() is None:
                print(f"  {name} did not stop within {timeout:g}s: killing it", flush=True)
                # Its group also holds prefork children (Celery) that would outlive it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            log.close()
        self._procs.clear()


# --- broker -----------------------------------------------------------------------------------


async def delete_queues(queues: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
    """Best-effort deletion of the benchmark's own queues and exchanges."""
    connection = await aio_pika.connect(BROKER_URL, timeout=10)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    """Ready messages in a queue (passive declare; unacked deliveries are not counted)."""
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


# --- CPU accounting ---------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stats() -> Iterable[tuple[int, str, int, float]]:
    """(pid, comm, process group, CPU seconds) for every process we may read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.find("(") + 1:raw.rfind(")")]
        fields = raw[raw.rfind(")") + 2:].split()
        yield int(entry.name), comm, int(fields[2]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def group_cpu_seconds(leaders: Iterable[int]) -> float:
    """CPU time (user + system) of every live process in the given process groups."""
    groups = set(leaders)
    return sum(cpu for _, _, pgrp, cpu in _proc_stats() if pgrp in groups)


def broker_cpu_seconds() -> float:
    """CPU time of the local RabbitMQ server (its beam.smp; not the short-lived ones of
    rabbitmqctl). The broker is shared: this includes whatever else it did meanwhile, so treat
    it as an upper bound."""
    total = 0.0
    for pid, comm, _, cpu in _proc_stats():
        if comm != "beam.smp":
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"rabbit\x00boot" in cmdline:
            total += cpu
    return total
