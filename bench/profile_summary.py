"""Summarise py-spy raw (collapsed) stacks: where the samples are, by function.

    .venv/bin/python bench/profile_summary.py PROFILE.txt [--top 25] [--filter coordinator_agent]

"self" counts samples whose innermost frame is the function; "incl" counts samples with the
function anywhere on the stack (once per sample). Idle samples (the event loop waiting in
select/epoll) are reported separately and excluded from the percentages of "busy".
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

IDLE = re.compile(r"\((selectors|select)\.py\)|epoll|poll \(")
FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "coordinator_agent/"):
        if marker in file:
            file = (("coordinator_agent/" if marker == "coordinator_agent/" else "")
                    + file.split(marker, 1)[1])
            break
    return f"{match['func']} ({file})"


def summarise(path: Path, top: int, keep: str | None) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short(f) for f in stack.split(";") if f.strip()]
        total += count
        if frames and IDLE.search(stack.split(";")[-1]):
            idle += count
            continue
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    busy = max(1, total - idle)
    lines = [f"{path.name}: {total} samples, {idle} idle ({100 * idle / max(1, total):.0f}%), "
             f"{busy} busy", "", "self% of busy  function"]
    lines += [f"{100 * n / busy:6.1f}  {f}" for f, n in self_time.most_common(top)]
    lines += ["", "incl% of busy  function" + (f" (matching {keep!r})" if keep else "")]
    rows = [(f, n) for f, n in inclusive.most_common() if keep is None or keep in f]
    lines += [f"{100 * n / busy:6.1f}  {f}" for f, n in rows[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", help="inclusive table: only frames containing this text")
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top, args.filter))
        print()


if __name__ == "__main__":
    main()
