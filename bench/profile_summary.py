"""Summarise a py-spy collapsed-stack file (`py-spy record --format raw`): where the samples go.

    py-spy record --pid PID --duration 10 --rate 200 --format raw -o prof.txt
    python -m bench.profile_summary prof.txt [--top 25]

Prints the share of samples per thread (recorded with py-spy's `--threads`, which adds a root frame
"thread (TID)" to each stack; without it the threads section is empty), then the top functions by
inclusive share (a function is counted once per sample however deep it recurs) and by self share
(the leaf frame).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.common import ctrl_c_exits_130, write_line

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_THREAD = re.compile(r"^thread \([^()]*\)(?::.*)?$")  # py-spy --threads: "thread (TID)[: name]"


def _frame_name(frame: str) -> str:
    # py-spy frames look like "function (path/to/file.py:123)"; keep the function and the file name.
    match = re.match(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$", frame)
    if match is None:
        return frame
    return f"{match['fn']} ({Path(match['file']).name})"


def summarise(path: Path, top: int = 25) -> list[str]:
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        count = int(match["count"])
        frames = match["stack"].split(";")
        total += count
        if _THREAD.match(frames[0]):
            threads[frames[0]] += count
            frames = frames[1:]
        names = [_frame_name(f) for f in frames] or ["<idle>"]
        for name in set(names):
            inclusive[name] += count
        leaf[names[-1]] += count
    out = [f"{total} samples"]
    out.append("threads:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common(12)]
    if not threads:
        out.append("  (none: recorded without py-spy's --threads)")
    out.append("inclusive:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    out.append("self:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in leaf.most_common(top)]
    return out


@ctrl_c_exits_130("bench.profile_summary")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for line in summarise(args.profile, args.top):
        write_line(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
