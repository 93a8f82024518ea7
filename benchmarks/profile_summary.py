"""Summarise a py-spy ``--format raw`` (collapsed stacks) profile: top functions by self and total time.

    python benchmarks/profile_summary.py worker.collapsed.txt [--top 25] [--idle]

Samples whose leaf is the event loop waiting in ``select``/``epoll`` are idle time;
they are left out of the percentages unless ``--idle`` is given.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

IDLE_LEAF = re.compile(r"^(EpollSelector\.select|select|poll) \(")


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    found = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not found:
        return frame
    name, where = found.groups()
    parts = where.split("/")
    if "site-packages" in parts:
        where = "/".join(parts[parts.index("site-packages") + 1 :])
    elif "lib" in parts and "python3" in where:
        where = "stdlib/" + "/".join(parts[-2:])
    else:
        where = "/".join(parts[-2:])
    return f"{name} ({where})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--idle", action="store_true", help="count event-loop idle samples too")
    args = p.parse_args(argv)
    stacks = load(args.profile)
    idle = sum(c for frames, c in stacks if IDLE_LEAF.match(frames[-1]))
    total = sum(c for _, c in stacks)
    busy = [(f, c) for f, c in stacks if args.idle or not IDLE_LEAF.match(f[-1])]
    denominator = sum(c for _, c in busy) or 1
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in busy:
        self_time[short(frames[-1])] += count
        for frame in {short(f) for f in frames}:
            inclusive[frame] += count
    print(
        f"samples: {total}, idle (event loop waiting): {idle} ({100 * idle / max(total, 1):.1f}%)"
    )
    print(f"\ntop {args.top} by self time (% of busy samples)")
    for frame, count in self_time.most_common(args.top):
        print(f"{100 * count / denominator:6.1f}%  {frame}")
    print(f"\ntop {args.top} by total time (% of busy samples)")
    for frame, count in inclusive.most_common(args.top):
        print(f"{100 * count / denominator:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
