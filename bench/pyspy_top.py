"""Summarise py-spy ``--format raw`` (collapsed stacks) files: where ours spends its time.

    python -m bench.pyspy_top PROFILE.txt [--top 25] [--filter aibridgeproxyd]

Prints the functions with the most samples on top of the stack (self) and anywhere on the stack
(inclusive), as a share of all samples. ``--profile DIR`` on ``python -m bench`` writes the files.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``module.py:func``; idle frames are kept as they are."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "lib/python3.13/", "lib/python3.12/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{match['func']}"


def summarise(path: Path, top: int, needle: str | None) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        count = int(match[2])
        frames = [frame_name(f) for f in match[1].split(";") if f]
        # py-spy puts the process/thread first: skip frames without a file.
        frames = [f for f in frames if ".py:" in f] or frames
        total += count
        if frames:
            own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    out = [f"{path.name}: {total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        out.append(f"  top {title}:")
        rows = [(n, c) for n, c in counter.most_common() if not needle or needle in n][:top]
        out += [f"    {c / max(1, total) * 100:5.1f}%  {n}" for n, c in rows]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", help="only functions whose name contains this")
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top, args.filter))


if __name__ == "__main__":
    main()
