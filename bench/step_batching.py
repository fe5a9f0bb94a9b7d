"""Step-level vs request-level batching of one autoregressive code prior, open loop.

Requests arrive as a Poisson process (open loop: an arrival never waits for an earlier answer) at
rates from light to past saturation. Each request samples one grid of H*W codes. Both policies
drive the same ONNX Runtime runner of the same synthetic prior (tests/server/code_models.py, with
MatMul layers so that a call costs something) and the same per-row sampling (step_sampler.py):

- step-level: `StepScheduler` as served (rows join at the next step, leave when done); arrivals
  beyond the row budget wait for a free row (a client-side semaphore), and that wait counts;
- request-level: the same scheduler admitting rows only when the running set is empty (a batch of
  up to the row budget runs to its end; newcomers wait for it).

Prints per policy and rate: p50 and p99 latency (arrival -> grid) and throughput (grids/s).
Keep runs short: the machine is shared.

    python -m bench.step_batching --duration 3 --rates 0.25,0.5,1,1.5
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import write_line as say
from genserve_server.batch_keys import StepRows
from genserve_server.runner import Runner
from genserve_server.step_sampler import SamplingOptions, StepScheduler

REPO_ROOT = Path(__file__).resolve().parent.parent


class RequestLevel(StepScheduler):
    """The baseline: a batch of up to `batch` rows is admitted only when the previous one is done."""

    def __init__(self, *args: object, batch: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batch = batch

    def _admit(self, now: float) -> None:
        if self._running:
            return
        taken, self._joining = self._joining[: self.batch], self._joining[self.batch :]
        self.stats.joined += len(taken)
        self._running = taken


def build_prior(root: Path, grid: tuple[int, int], k: int, iterations: int) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "tests" / "server"))
    import onnx
    from code_models import prior_graph  # the test suite's synthetic priors

    path = root / "prior.onnx"
    onnx.save(prior_graph(*grid, k, iterations=iterations), str(path))
    return path


async def one_rate(
    scheduler: StepScheduler, gate: asyncio.Semaphore | None, rate: float, duration_s: float, seed: int
) -> tuple[list[float], float]:
    """Latencies (s) of the requests arriving at `rate`/s over `duration_s`, and grids per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=max(1, int(rate * duration_s * 1.5))))
    arrivals = arrivals[arrivals < duration_s]
    start = time.perf_counter()
    latencies: list[float] = []
    finished: list[float] = []

    async def request(i: int, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        if gate is not None:
            async with gate:
                await scheduler.sample([i], None, None, SamplingOptions(), None)
        else:
            await scheduler.sample([i], None, None, SamplingOptions(), None)
        now = time.perf_counter()
        latencies.append(now - (start + at))
        finished.append(now)

    await asyncio.gather(*(request(i, float(at)) for i, at in enumerate(arrivals)))
    span = max(finished) - start if finished else 1.0
    return latencies, len(finished) / span


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def run(args: argparse.Namespace) -> None:
    grid = (args.grid, args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_prior(Path(tmp), grid, args.codes, args.iterations)
        runner = Runner(
            path, label="bench-prior", providers=["CPUExecutionProvider"], instances=1, intra_op_threads=1
        )
    step_run = functools.partial(runner.run, StepRows())
    common = {"name": "bench-prior", "grid": grid, "codebook_size": args.codes}
    step = StepScheduler(step_run, max_rows=args.rows, **common)
    request = RequestLevel(step_run, max_rows=1 << 30, batch=args.rows, **common)
    # Lone requests first: what one request costs under each policy (no contention).
    for scheduler in (step, request):
        await scheduler.sample([0], None, None, SamplingOptions(), None)  # warm
    lone = {}
    for label, scheduler in (("step", step), ("request", request)):
        times = []
        for i in range(args.lone):
            started = time.perf_counter()
            await scheduler.sample([i], None, None, SamplingOptions(), None)
            times.append(time.perf_counter() - started)
        lone[label] = float(np.median(times))
    capacity = args.rows / (lone["request"] * 1.0)  # grids/s if every step held a full batch, roughly
    say(
        f"prior {grid[0]}x{grid[1]} K={args.codes}, {args.iterations} MatMul layers, row budget {args.rows}; "
        f"lone request: step {lone['step'] * 1e3:.1f} ms, request {lone['request'] * 1e3:.1f} ms "
        f"(ratio {lone['step'] / lone['request']:.2f}); rough capacity {capacity:.0f} grids/s"
    )
    say(f"{'rate/s':>8} {'policy':>8} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'grids/s':>8}")
    rates = (
        [float(r) * capacity for r in args.rates.split(",")]
        if args.relative
        else [float(r) for r in args.rates.split(",")]
    )
    for index, rate in enumerate(rates):
        results = {}
        for label, scheduler, gate in (
            ("step", step, asyncio.Semaphore(args.rows)),
            ("request", request, None),
        ):
            latencies, throughput = await one_rate(scheduler, gate, rate, args.duration, seed=index)
            results[label] = latencies
            say(
                f"{rate:8.1f} {label:>8} {len(latencies):5d} {percentile(latencies, 50) * 1e3:9.1f} "
                f"{percentile(latencies, 99) * 1e3:9.1f} {throughput:8.1f}"
            )
        p50 = percentile(results["step"], 50) / percentile(results["request"], 50)
        p99 = percentile(results["step"], 99) / percentile(results["request"], 99)
        say(f"{'':8} {'step/req':>8} {'':5} {p50:9.2f} {p99:9.2f}")
    runner.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, default=7, help="grid side (H = W)")
    parser.add_argument("--codes", type=int, default=32, help="codebook size K")
    parser.add_argument("--iterations", type=int, default=1, help="MatMul layers of the synthetic prior")
    parser.add_argument("--rows", type=int, default=16, help="row budget / request-level batch size")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of arrivals per rate and policy")
    parser.add_argument("--lone", type=int, default=5, help="lone requests timed per policy")
    parser.add_argument(
        "--rates",
        default="0.1,0.4,0.8,1.2",
        help="arrival rates, as fractions of the rough capacity (default) or per second (--absolute)",
    )
    parser.add_argument("--absolute", dest="relative", action="store_false", help="--rates are requests/s")
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
