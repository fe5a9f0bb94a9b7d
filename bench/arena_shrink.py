"""What one rare, far larger call leaves resident, with and without the runner's per-call arena
shrinkage (`runner.SHRINK_MIN_ROW_VALUES`, `runner.SHRINK_ABOVE_WARMED`).

Loads a translator of the default repository (`unet-denoise` by default) in this process on the CPU,
warms it on small images as the server does, then runs one large image and reads how much VmRSS
grew across that call (its output dropped at once). It does so with the shipped threshold and with
shrinkage turned off, side by side in one run, after one throw-away call that pays the one-time
costs of a first large call (thread pools, page tables). What the allocator keeps depends on the
CPU, the kernel and glibc: on some machines the arena's growth is handed back without shrinkage as
well, so this is a benchmark that prints figures, not a test (the decision itself, which calls run
with shrinkage, is tested in tests/server/test_runner.py).

    .venv/bin/python -m bench.arena_shrink [--model unet-denoise] [--size 1024] [--rounds 2]

Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_MODELS, ctrl_c_exits_130, write_line
from genserve_server import runner as runner_module
from genserve_server.runner import Runner


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def grown_mb(model: Path, size: int) -> float:
    """VmRSS growth across one size x size call of a runner warmed on 32 x 32 images."""
    runner = Runner(model, label="arena", providers=["CPUExecutionProvider"], instances=1, intra_op_threads=1)
    runner.warm({"image": np.zeros((2, 3, 32, 32), np.float32)})
    before = rss_mb()
    runner.run_sync({"image": np.zeros((1, 3, size, size), np.float32)})
    grown = rss_mb() - before
    runner.close()
    return grown


@ctrl_c_exits_130("bench.arena_shrink")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="unet-denoise", help="a translator in --models")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=1024, help="side of the large image")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    model = args.models / args.model / "1" / "model.onnx"
    input_mb = 3 * args.size * args.size * 4 / 2**20
    grown_mb(model, args.size)  # one-time costs of a first large call in this process
    shipped_threshold = runner_module.SHRINK_MIN_ROW_VALUES
    shrunk: list[float] = []
    kept: list[float] = []
    for _ in range(args.rounds):
        runner_module.SHRINK_MIN_ROW_VALUES = shipped_threshold
        shrunk.append(grown_mb(model, args.size))
        runner_module.SHRINK_MIN_ROW_VALUES = 1 << 40  # never shrink
        kept.append(grown_mb(model, args.size))
    runner_module.SHRINK_MIN_ROW_VALUES = shipped_threshold
    figures = {
        "model": args.model,
        "size": args.size,
        "input_mb": round(input_mb, 1),
        "grown_mb_with_shrinkage": [round(v, 1) for v in shrunk],
        "grown_mb_without_shrinkage": [round(v, 1) for v in kept],
    }
    write_line(
        f"{args.model} one {args.size}x{args.size} call (input {input_mb:.0f} MB): resident growth "
        f"{statistics.median(shrunk):.0f} MB with shrinkage, {statistics.median(kept):.0f} MB without "
        f"(medians of {args.rounds})"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
