"""Step-level vs request-level batching of autoregressive code priors, open loop.

Requests arrive as a Poisson process (open loop: an arrival never waits for an earlier answer) at
rates from light to past saturation. Each request samples one grid of H*W codes. Both policies
drive the same ONNX Runtime runners and the same per-row sampling (step_sampler.py), in the same
run, in rounds of ABBA order at each rate (--rounds), so a busy machine weighs on both. The prior is either a
synthetic one (tests/server/code_models.py, with MatMul layers so that a call costs something) or,
with --models DIR, the trained VQ-VAE-2 digits chain as SampleCodes serves it: the top prior's 7x7
grid, then the bottom prior's 14x14 grid given it, then one decoder call (class labels cycle 0-9):

- step-level: `StepScheduler` as served (rows join at the next step, leave when done); arrivals
  beyond the row budget wait for a free row (a client-side semaphore), and that wait counts;
- request-level: the same scheduler admitting rows only when the running set is empty (a batch of
  up to the row budget runs to its end; newcomers wait for it).

Prints per policy and rate: p50 and p99 latency (arrival -> grid) and throughput (grids/s);
--json writes them with the run's settings. Keep runs short: the machine is shared.

    python -m bench.step_batching --duration 3 --rates 0.25,0.5,1,1.5
    python -m bench.step_batching --models models --rows 8 --duration 15 --rounds 4 --rates 0.5,0.9,1.2
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_line as say
from genserve_server.batch_keys import StepRows
from genserve_server.runner import Runner, select_providers
from genserve_server.step_sampler import SamplingOptions, StepScheduler

REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_PRIOR, PRIOR, DECODER = "vqvae-digits-top-prior", "vqvae-digits-prior", "vqvae-digits-decoder"
# One request of a policy: sample grid `i` (seed i) and return when its answer is ready.
Submit = Callable[[int], Awaitable[None]]


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


async def one_rate(submit: Submit, rate: float, duration_s: float, seed: int) -> tuple[list[float], float]:
    """Latencies (s) of the requests arriving at `rate`/s over `duration_s`, and grids per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=max(1, int(rate * duration_s * 1.5))))
    arrivals = arrivals[arrivals < duration_s]
    start = time.perf_counter()
    latencies: list[float] = []
    finished: list[float] = []

    async def request(i: int, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        await submit(i)
        now = time.perf_counter()
        latencies.append(now - (start + at))
        finished.append(now)

    await asyncio.gather(*(request(i, float(at)) for i, at in enumerate(arrivals)))
    span = max(finished) - start if finished else 1.0
    return latencies, len(finished) / span


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@dataclass
class Setup:
    """The graphs of one bench run and a `Submit` per policy over the same runners."""

    description: str
    policies: dict[str, Submit]
    runners: list[Runner]


# Set by --providers: the CPU by default; CUDA where the GPU premise of step-level batching is tried.
PROVIDERS: list[str] = ["CPUExecutionProvider"]


def _runner(path: Path, label: str) -> Runner:
    runner = Runner(path, label=label, providers=PROVIDERS, instances=1, intra_op_threads=1)
    say(f"{label}: {runner.provider}")
    return runner


def _gated(scheduler: StepScheduler, gate: asyncio.Semaphore | None) -> Callable[..., Awaitable[np.ndarray]]:
    """`scheduler.sample`, waiting for a free row where the row budget is full (step-level: the
    server would answer RESOURCE_EXHAUSTED and the client retry; here the wait counts as latency)."""

    async def sample(*args: Any) -> np.ndarray:
        if gate is None:
            return await scheduler.sample(*args)
        async with gate:
            return await scheduler.sample(*args)

    return sample


def synthetic_setup(args: argparse.Namespace, tmp: Path) -> Setup:
    grid = (args.grid, args.grid)
    runner = _runner(build_prior(tmp, grid, args.codes, args.iterations), "bench-prior")
    step_run = functools.partial(runner.run, StepRows())
    common: dict[str, Any] = {"name": "bench-prior", "grid": grid, "codebook_size": args.codes}
    policies: dict[str, Submit] = {}
    for label, scheduler, gate in (
        ("step", StepScheduler(step_run, max_rows=args.rows, **common), asyncio.Semaphore(args.rows)),
        ("request", RequestLevel(step_run, max_rows=1 << 30, batch=args.rows, **common), None),
    ):
        sample = _gated(scheduler, gate)

        async def submit(i: int, sample: Callable[..., Awaitable[np.ndarray]] = sample) -> None:
            await sample([i], None, None, SamplingOptions(), None)

        policies[label] = submit
    description = f"synthetic prior {grid[0]}x{grid[1]} K={args.codes}, {args.iterations} MatMul layers"
    return Setup(description, policies, [runner])


def vqvae_setup(args: argparse.Namespace) -> Setup:
    """The default VQ-VAE-2 chain (top prior -> bottom prior -> decoder) from `args.models`, each
    prior at its config.json default sampling, as a SampleCodes request without options."""
    from genserve_server.config import load_card, load_model_config

    root = Path(args.models)
    cards = {name: load_card(root / name / "1" / "card.json") for name in (TOP_PRIOR, PRIOR, DECODER)}
    configs = {name: load_model_config(root / name / "config.json") for name in (TOP_PRIOR, PRIOR)}
    runners = {name: _runner(root / name / "1" / "model.onnx", name) for name in cards}
    decode = runners[DECODER]
    policies: dict[str, Submit] = {}
    for label in ("step", "request"):
        levels = []
        for name, stream in ((TOP_PRIOR, 0), (PRIOR, 1)):
            card = cards[name]
            assert card.grid is not None and card.codebook_size is not None
            common: dict[str, Any] = {
                "name": name,
                "grid": card.grid,
                "codebook_size": card.codebook_size,
                "stream": stream,
                "takes_label": True,
                "top_grid": card.top_grid,
                "defaults": configs[name].sampling,
            }
            step_run = functools.partial(runners[name].run, StepRows())
            if label == "step":
                scheduler: StepScheduler = StepScheduler(step_run, max_rows=args.rows, **common)
                levels.append(_gated(scheduler, asyncio.Semaphore(args.rows)))
            else:
                scheduler = RequestLevel(step_run, max_rows=1 << 30, batch=args.rows, **common)
                levels.append(_gated(scheduler, None))
        top_level, bottom_level = levels

        async def submit(
            i: int,
            top_level: Callable[..., Awaitable[np.ndarray]] = top_level,
            bottom_level: Callable[..., Awaitable[np.ndarray]] = bottom_level,
        ) -> None:
            labels = [i % 10]
            tops = await top_level([i], labels, None, SamplingOptions(), None)
            codes = await bottom_level([i], labels, tops, SamplingOptions(), None)
            await decode.run(StepRows(), {"codes": codes, "top_codes": tops})

        policies[label] = submit
    sampling = configs[PRIOR].sampling
    description = (
        f"{TOP_PRIOR} (7x7, K=32) -> {PRIOR} (14x14, K=64) -> {DECODER}, default sampling "
        f"(temperature {sampling.temperature:g}), ORT {PROVIDERS[0]}, 1 thread per graph"
    )
    return Setup(description, policies, list(runners.values()))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        setup = vqvae_setup(args) if args.models else synthetic_setup(args, Path(tmp))
    policies = setup.policies
    for submit in policies.values():
        await submit(0)  # warm
    # Lone requests, policies in turns: what one request costs alone (no contention).
    lone_times: dict[str, list[float]] = {label: [] for label in policies}
    for i in range(args.lone):
        for label, submit in policies.items():
            started = time.perf_counter()
            await submit(i)
            lone_times[label].append(time.perf_counter() - started)
    lone = {label: float(np.median(times)) for label, times in lone_times.items()}
    # Capacity: a full batch of `rows` requests at once under request-level batching.
    started = time.perf_counter()
    await asyncio.gather(*(policies["request"](i) for i in range(args.rows)))
    capacity = args.rows / (time.perf_counter() - started)
    say(
        f"{setup.description}; row budget {args.rows}; lone request: step {lone['step'] * 1e3:.1f} ms, "
        f"request {lone['request'] * 1e3:.1f} ms (ratio {lone['step'] / lone['request']:.2f}); "
        f"capacity (a full request-level batch) {capacity:.2f} grids/s; load {os.getloadavg()[0]:.1f}"
    )
    say(f"{'rate/s':>8} {'policy':>8} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'grids/s':>8}")
    rates = (
        [float(r) * capacity for r in args.rates.split(",")]
        if args.relative
        else [float(r) for r in args.rates.split(",")]
    )
    rows_out = []
    for index, rate in enumerate(rates):
        results: dict[str, dict[str, Any]] = {}
        pooled: dict[str, list[float]] = {label: [] for label in policies}
        rounds: dict[str, list[dict[str, float]]] = {label: [] for label in policies}
        # Rounds in ABBA order (the same arrivals per round for both policies): a machine whose load
        # drifts weighs on both alike.
        for r in range(args.rounds):
            order = list(policies) if r % 2 == 0 else list(reversed(policies))
            for label in order:
                latencies, throughput = await one_rate(
                    policies[label], rate, args.duration, seed=index * 100 + r // 2
                )
                pooled[label] += latencies
                rounds[label].append(
                    {
                        "n": len(latencies),
                        "p50_ms": percentile(latencies, 50) * 1e3,
                        "p99_ms": percentile(latencies, 99) * 1e3,
                        "grids_per_s": throughput,
                        "load": os.getloadavg()[0],
                    }
                )
        for label, latencies in pooled.items():
            results[label] = {
                "n": len(latencies),
                "p50_ms": percentile(latencies, 50) * 1e3,
                "p99_ms": percentile(latencies, 99) * 1e3,
                "grids_per_s": float(np.mean([x["grids_per_s"] for x in rounds[label]])),
                "rounds": rounds[label],
            }
            got = results[label]
            say(
                f"{rate:8.2f} {label:>8} {len(latencies):5d} {got['p50_ms']:9.1f} {got['p99_ms']:9.1f} "
                f"{got['grids_per_s']:8.2f}"
            )
        p50 = results["step"]["p50_ms"] / results["request"]["p50_ms"]
        p99 = results["step"]["p99_ms"] / results["request"]["p99_ms"]
        say(f"{'':8} {'step/req':>8} {'':5} {p50:9.2f} {p99:9.2f}")
        rows_out.append({"rate_per_s": rate, **results, "p50_ratio": p50, "p99_ratio": p99})
    for runner in setup.runners:
        runner.close()
    return {
        "setup": setup.description,
        "row_budget": args.rows,
        "duration_s_per_round": args.duration,
        "rounds": args.rounds,
        "lone_ms": {label: value * 1e3 for label, value in lone.items()},
        "lone_ratio": lone["step"] / lone["request"],
        "capacity_grids_per_s": capacity,
        "rates": rows_out,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, default=7, help="grid side (H = W)")
    parser.add_argument("--codes", type=int, default=32, help="codebook size K")
    parser.add_argument("--iterations", type=int, default=1, help="MatMul layers of the synthetic prior")
    parser.add_argument("--rows", type=int, default=16, help="row budget / request-level batch size")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of arrivals per round")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds per rate and policy, in ABBA order (pooled)"
    )
    parser.add_argument("--lone", type=int, default=5, help="lone requests timed per policy")
    parser.add_argument(
        "--rates",
        default="0.1,0.4,0.8,1.2",
        help="arrival rates, as fractions of the rough capacity (default) or per second (--absolute)",
    )
    parser.add_argument("--absolute", dest="relative", action="store_false", help="--rates are requests/s")
    parser.add_argument(
        "--models", default="", help="a repository holding the vqvae-digits entries: bench that chain"
    )
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="ONNX Runtime providers, comma-separated, in order (CUDAExecutionProvider on a GPU)",
    )
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    PROVIDERS[:] = select_providers(args.providers.split(","))
    figures = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
