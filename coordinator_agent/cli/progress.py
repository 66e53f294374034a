"""What the CLI shows people: aligned tables, the ``watch`` frame, progress on long waits.

Everything here is pure text in, text out, except the two progress widgets, which write to
stderr so stdout stays clean for ``--json`` and pipes. Agent-supplied strings (ids, kinds,
descriptions, outputs) are untrusted: ``clean`` turns control characters into visible escapes so
a hostile description can neither move the cursor nor break the table layout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

# --- text --------------------------------------------------------------------------------------

_COLOURS = {"green": "32", "yellow": "33", "red": "31", "blue": "34", "dim": "2", "bold": "1"}
_STATUS_COLOUR = {
    "healthy": "green", "succeeded": "green", "passing": "green", "ready": "green",
    "suspect": "yellow", "draining": "yellow", "pending": "yellow", "warning": "yellow",
    "dead": "red", "failed": "red", "critical": "red", "NOT READY": "red", "DOWN": "red",
    "running": "blue", "assigned": "blue", "registered": "blue", "up": "green",
    "left": "dim", "cancelled": "dim",
}


def use_colour(stream: TextIO) -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def paint(text: str, colour: str | None, enabled: bool) -> str:
    if not enabled or colour is None:
        return text
    return f"\x1b[{_COLOURS[colour]}m{text}\x1b[0m"


def clean(value: Any) -> str:
    """A value as one printable line: control and format characters become escapes."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or char == " ":
            out.append(char)
        elif char in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def width(text: str) -> int:
    """Columns a string takes in a terminal (wide East Asian characters take two)."""
    total = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        total += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return total


def shorten(text: str, limit: int) -> str:
    if limit <= 0:
        return ""
    if width(text) <= limit:
        return text
    out, used = [], 0
    for char in text:
        w = width(char)
        if used + w > limit - 1:
            break
        out.append(char)
        used += w
    return "".join(out) + "…"


def ago(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "never"
    if seconds < 0:
        return "just now"
    if seconds < 10:
        return f"{seconds:.1f}s ago"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


# --- tables ------------------------------------------------------------------------------------


def format_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Iterable[str] = (),
    limits: Mapping[str, int] | None = None,
    colour: bool = False,
    empty: str = "(none)",
    max_line: int | None = None,
) -> str:
    """Left-aligned columns (``right`` ones right-aligned), cells cleaned and cut to ``limits``.

    ``max_line`` cuts the last column so that lines fit a terminal. With ``colour``, words with
    a meaning (healthy, failed, ...) are coloured after the padding is computed, so escapes
    never disturb the alignment.
    """
    limits = limits or {}
    right_set = set(right)
    cells = [
        [shorten(clean(v), limits.get(col, 10_000)) for col, v in zip(columns, row, strict=True)]
        for row in rows
    ]
    header = [c.upper() for c in columns]
    widths = [max(width(r[i]) for r in [header, *cells]) for i in range(len(columns))]
    if max_line is not None:
        room = max(width(header[-1]), 10, max_line - sum(widths[:-1]) - 2 * (len(columns) - 1))
        for row in cells:
            row[-1] = shorten(row[-1], room)
        widths[-1] = min(widths[-1], room)

    def line(row: list[str], head: bool) -> str:
        parts = []
        for i, (col, text) in enumerate(zip(columns, row, strict=True)):
            pad = " " * (widths[i] - width(text))
            last = i == len(columns) - 1
            padded = pad + text if col in right_set else text + ("" if last else pad)
            if head:
                padded = paint(padded, "bold", colour)
            else:
                padded = paint(padded, _STATUS_COLOUR.get(text.split(" ")[0]), colour)
            parts.append(padded)
        return "  ".join(parts).rstrip()

    lines = [line(header, True), *(line(r, False) for r in cells)]
    if not cells:
        lines.append(empty)
    return "\n".join(lines)


def signals_label(agent: Mapping[str, Any]) -> str:
    """Which sources vouch for an agent: ``amqp+consul``, ``amqp``, ``consul:critical``, ``-``."""
    signals = agent.get("signals")
    if not isinstance(signals, Mapping):
        return "-"
    parts = []
    for name, value in signals.items():
        if value is None or value is False:
            continue  # that source does not track this agent
        if isinstance(value, Mapping):
            if value.get("heard") is False or value.get("ok") is False:
                continue
            parts.append(clean(name))
        elif value is True or value == "passing":
            parts.append(clean(name))
        else:
            parts.append(f"{clean(name)}:{clean(value)}")
    return "+".join(parts) or "-"


def route_label(routing: Any) -> str:
    """The routing decision in a few words: ``agent-1 (general, conf 0.82, fallback)``."""
    if not isinstance(routing, Mapping) or not routing:
        return "-"
    agent = routing.get("agent", routing.get("agent_id"))
    details = []
    if routing.get("kind"):
        details.append(clean(routing["kind"]))
    confidence = routing.get("confidence")
    if isinstance(confidence, int | float):
        details.append(f"conf {confidence:.2f}")
    fallback = routing.get("fallback", routing.get("fallback_used"))
    if fallback is True:
        details.append("fallback")
    elif fallback:
        details.append(f"fallback {clean(fallback)}")
    if routing.get("reason") and confidence is None:
        details.append(clean(routing["reason"]))
    head = clean(agent) if agent else "no agent"
    return f"{head} ({', '.join(details)})" if details else head


def _count(value: Any) -> int:
    return value if isinstance(value, int) else 0


def agents_table(agents: Sequence[Mapping[str, Any]], *, colour: bool = False) -> str:
    rows = []
    for a in agents:
        liveness = clean(a.get("liveness"))
        reason = a.get("liveness_reason")
        if reason and reason != "ok":
            liveness += f" ({clean(reason)})"
        spawned = a.get("spawned")  # run by the coordinator's local spawner (spawner.py)
        if isinstance(spawned, Mapping):
            restarts = spawned.get("restarts")
            liveness += f", spawned{f' x{restarts}' if restarts else ''}"
        load = a.get("load")
        rows.append([
            a.get("id"), a.get("kind"), liveness, signals_label(a),
            f"{load * 100:.0f}%" if isinstance(load, int | float) else "-",
            f"{_count(a.get('in_flight'))}/{clean(a.get('max_concurrency'))}",
            ago(a.get("last_seen_s")),
            f"{_count(a.get('completed'))}/{_count(a.get('failed'))}",
        ])
    return format_table(
        ["id", "kind", "liveness", "signals", "load", "in-flight", "last seen", "done/failed"],
        rows, right=("load", "in-flight", "last seen", "done/failed"),
        limits={"id": 40, "kind": 24, "liveness": 28, "signals": 32},
        colour=colour, empty="no agents yet — start one with `coordinator-agent worker`",
    )


def tasks_table(
    tasks: Sequence[Mapping[str, Any]], *, now: float, colour: bool = False,
    max_line: int | None = None,
) -> str:
    rows = []
    for t in tasks:
        attempts = t.get("attempts")
        tries = len(attempts) if isinstance(attempts, list) else 0
        updated = t.get("updated_at")
        status = clean(t.get("status"))
        if status == "running" and isinstance(t.get("progress"), int | float):
            status += f" {t['progress'] * 100:.0f}%"
        route = route_label(t.get("routing"))
        waiting = t.get("waiting")
        if route == "-" and isinstance(waiting, Mapping) and waiting.get("reason"):
            route = f"waiting: {clean(waiting['reason'])}"  # no_matching_agent, no_free_agent
        rows.append([
            t.get("id"), status, route, tries,
            ago(now - updated) if isinstance(updated, int | float) else "-",
            t.get("description"),
        ])
    return format_table(
        ["task", "status", "route", "tries", "updated", "description"], rows,
        right=("tries", "updated"),
        limits={"task": 36, "route": 44, "description": 200}, max_line=max_line,
        colour=colour, empty="no tasks yet — send one with `coordinator-agent submit`",
    )


def _pairs(counts: Any, *, skip_zero: bool = False) -> str:
    if not isinstance(counts, Mapping):
        return clean(counts)
    parts = [f"{clean(v)} {clean(k)}" for k, v in counts.items() if v or not skip_zero]
    return " · ".join(parts) or "none"


class Rates:
    """Tasks per second from successive status totals (the API reports totals only)."""

    def __init__(self) -> None:
        self._last: tuple[float, int, int] | None = None

    def update(self, totals: Any, at: float) -> dict[str, float] | None:
        totals = totals if isinstance(totals, Mapping) else {}
        finished = sum(_count(totals.get(k)) for k in ("succeeded", "failed", "cancelled"))
        submitted = _count(totals.get("submitted"))
        last, self._last = self._last, (at, finished, submitted)
        if last is None or at <= last[0]:
            return None
        elapsed = at - last[0]
        return {"finished_per_s": max(0, finished - last[1]) / elapsed,
                "submitted_per_s": max(0, submitted - last[2]) / elapsed}


def status_summary(
    status: Mapping[str, Any], *, rates: Mapping[str, float] | None = None,
    colour: bool = False, with_rates: bool = False,
) -> str:
    ready = "ready" if status.get("ready") else "NOT READY"
    broker = "up" if status.get("broker_connected") else "DOWN"
    totals = status.get("totals")
    if not isinstance(totals, Mapping):
        totals = {}
    succeeded, failed = _count(totals.get("succeeded")), _count(totals.get("failed"))
    ok_share = f" ({100 * succeeded / (succeeded + failed):.1f}% ok)" if succeeded + failed else ""
    role = ""
    # docs/HA.md: with HA on, the role and the term's epoch (a lone coordinator's epoch is 0).
    if status.get("epoch") or status.get("role") == "standby":
        role = f"{clean(status.get('role'))}" + (
            f" (epoch {_count(status.get('epoch'))})" if status.get("epoch") else "") + " · "
    lines = [
        ("coordinator", f"{clean(status.get('name'))} · {role}"
                        f"{paint(ready, _STATUS_COLOUR.get(ready), colour)} · broker "
                        f"{paint(broker, _STATUS_COLOUR.get(broker), colour)} · "
                        f"up {duration(status.get('uptime_s'))}"),
        ("agents", _pairs(status.get("agents"))),
        ("open tasks", _pairs(status.get("tasks_open"), skip_zero=True)),
        ("totals", _pairs(totals) + ok_share),
    ]
    if with_rates:
        lines.append(("rate", "measuring…" if rates is None else
                      f"{rates['finished_per_s']:.1f} tasks/s finished · "
                      f"{rates['submitted_per_s']:.1f}/s submitted"))
    known = {"name", "ready", "broker_connected", "uptime_s", "agents", "tasks_open", "totals",
             "role", "epoch"}
    lines += [(clean(k), shorten(clean(v), 100)) for k, v in status.items() if k not in known]
    label_width = max(len(label) for label, _ in lines)
    return "\n".join(f"{paint(label.ljust(label_width), 'bold', colour)}  {value}"
                     for label, value in lines)


def watch_frame(
    *, url: str, interval: float, now: float, status: Mapping[str, Any] | None,
    agents: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]],
    rates: Mapping[str, float] | None, error: str | None = None, colour: bool = False,
    columns: int | None = None,
) -> str:
    """One screen of ``coordinator-agent watch``."""
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    title = f"coordinator-agent watch · {url} · every {interval:g}s · {clock}"
    parts = [paint(title, "dim", colour)]
    if error is not None:
        parts.append(paint(f"! {error}", "red", colour) + " (retrying)")
    if status is not None:
        parts += ["", status_summary(status, rates=rates, colour=colour, with_rates=True),
                  "", paint(f"AGENTS ({len(agents)})", "bold", colour),
                  agents_table(agents, colour=colour),
                  "", paint(f"LATEST TASKS ({len(tasks)})", "bold", colour),
                  tasks_table(tasks, now=now, colour=colour, max_line=columns)]
    return "\n".join(parts)


# --- progress on long waits --------------------------------------------------------------------


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
    """An animated line while waiting for one thing (``submit --wait``); terminals only.

    It draws from a thread of its own, so it keeps turning whatever the waiting code does, and
    leaves one line behind: how long the wait took.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    ASCII_FRAMES = "|/-\\"

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None,
                 detail: Callable[[], str] | None = None, interval: float = 0.1) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.detail = detail
        self.interval = interval
        self.started = time.monotonic()
        encoding = (getattr(self.stream, "encoding", None) or "").lower().replace("-", "")
        self.frames = self.FRAMES if encoding == "utf8" else self.ASCII_FRAMES
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.drawn = 0

    def __enter__(self) -> Spinner:
        self.started = time.monotonic()
        if self.enabled:
            self._draw()
            self._thread = threading.Thread(target=self._run, name="spinner", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        elapsed = time.monotonic() - self.started
        ending = f"{self.label}: done in {elapsed:.1f}s\n" if exc_type is None else ""
        self.stream.write("\r\x1b[K" + ending)
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self) -> None:
        frame = self.frames[self.drawn % len(self.frames)]
        detail = f" · {self.detail()}" if self.detail is not None else ""
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r{frame} waiting for {self.label}{detail} {elapsed:.1f}s\x1b[K")
        self.stream.flush()
        self.drawn += 1
