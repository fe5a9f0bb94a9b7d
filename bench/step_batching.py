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

--flat-step-ms MS emulates a GPU on the CPU: every prior call takes MS ms of wall time whatever its
rows (the real graph runs on the call's pool thread, then the thread sleeps the rest of the budget,
releasing the GIL as a GPU call does), so the scheduler's own CPU work is what differs between the
policies, as on the H200 where a step costs about the same for 1 or 64 rows. --flat-serial makes
the priors' calls take turns (one device); --synthetic-chain benches a near-free two-prior chain
with the digits chain's shapes (7x7 K=32 top, 14x14 K=64 bottom given the top, 10 labels) where
--models' trained priors would cost more than the budget on this CPU.

Prints per policy and rate: p50 and p99 latency (arrival -> grid) and throughput (grids/s);
--json writes them with the run's settings. Keep runs short: the machine is shared.

    python -m bench.step_batching --duration 3 --rates 0.25,0.5,1,1.5
    python -m bench.step_batching --models models --rows 8 --duration 15 --rounds 4 --rates 0.5,0.9,1.2
    python -m bench.step_batching --synthetic-chain --flat-step-ms 1.3 --rows 8 --rates 0.2,0.5,0.8,1.1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ctrl_c_exits_130
from bench.common import write_line as say
from genserve_server.batch_keys import StepRows
from genserve_server.runner import Runner, select_providers
from genserve_server.step_sampler import SamplingOptions, StepScheduler

REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_PRIOR, PRIOR, DECODER = "vqvae-digits-top-prior", "vqvae-digits-prior", "vqvae-digits-decoder"
# One request of a policy: sample grid `i` (seed i) and return when its answer is ready.
Submit = Callable[[int], Awaitable[None]]
POLICIES = ("step", "request")


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


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of `rate`/s: drawn until the window ends
    (a fixed draw of 1.5 x rate x duration cut the count short where that product is small)."""
    rng = np.random.default_rng(seed)
    arrivals: list[float] = []
    at = float(rng.exponential(1.0 / rate))
    while at < duration_s:
        arrivals.append(at)
        at += float(rng.exponential(1.0 / rate))
    return arrivals


class Errors(collections.Counter[str]):
    """Failed requests by exception type, with the first message of each (`messages`)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: dict[str, str] = {}

    def add(self, exc: Exception) -> None:
        name = type(exc).__name__
        self[name] += 1
        self.messages.setdefault(name, str(exc))


async def one_rate(
    submit: Submit, rate: float, duration_s: float, seed: int
) -> tuple[list[float], float, Errors]:
    """Latencies (s) of the requests arriving at `rate`/s over `duration_s` that completed, grids
    per second, and the requests that failed (counted, not raised: the other figures stand)."""
    arrivals = poisson_arrivals(rate, duration_s, seed)
    start = time.perf_counter()
    latencies: list[float] = []
    finished: list[float] = []
    errors = Errors()

    async def request(i: int, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        try:
            await submit(i)
        except Exception as exc:  # a failed request is a figure of the level, as the CLI's bench
            errors.add(exc)
            return
        now = time.perf_counter()
        latencies.append(now - (start + at))
        finished.append(now)

    await asyncio.gather(*(request(i, at) for i, at in enumerate(arrivals)))
    span = max(finished) - start if finished else 1.0
    return latencies, len(finished) / span, errors


def failed_levels(rates: Sequence[dict[str, Any]]) -> list[str]:
    """A line per policy and rate (measure_rate's results) at which no request completed."""
    return [
        f"{label} at {row['rate_per_s']:g}/s: no request completed (errors: {row[label]['errors']}"
        + "".join(f"; {name}: {msg}" for name, msg in row[label]["error_messages"].items())
        + ")"
        for row in rates
        for label in POLICIES
        if label in row and row[label]["n"] == 0
    ]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class StepTimes:
    """One scheduler's prior calls as it awaits them: rows, the call's wall time (the pool hop
    included) and the gap from the previous call's end to this call's start while the scheduler
    kept running (its own per-step work on the event loop: sampling, bookkeeping, the loop's other
    tasks). Tells a slow call (the device, the hop) from a slow scheduler."""

    # A longer gap is the scheduler idle between requests, not a step's work.
    IDLE_GAP_S = 0.05

    def __init__(self, run: Callable[[dict[str, np.ndarray]], Awaitable[Any]]) -> None:
        self._run = run
        self.reset()

    def reset(self) -> None:
        self.rows: list[int] = []
        self.calls: list[float] = []
        self.gaps: list[float] = []
        self._last_end: float | None = None

    async def __call__(self, inputs: dict[str, np.ndarray]) -> Any:
        started = time.perf_counter()
        if self._last_end is not None and started - self._last_end < self.IDLE_GAP_S:
            self.gaps.append(started - self._last_end)
        outputs = await self._run(inputs)
        self._last_end = time.perf_counter()
        self.calls.append(self._last_end - started)
        self.rows.append(len(inputs["codes"]))
        return outputs

    @property
    def reshapes(self) -> int:
        """Calls with other rows than the previous call (a new input shape)."""
        return sum(a != b for a, b in zip(self.rows, self.rows[1:], strict=False))

    def summary(self) -> dict[str, float]:
        return {
            "steps": len(self.calls),
            "rows_per_step": float(np.mean(self.rows)) if self.rows else 0.0,
            "reshapes": self.reshapes,
            "call_ms_p50": percentile(self.calls, 50) * 1e3,
            "call_ms_mean": float(np.mean(self.calls)) * 1e3 if self.calls else float("nan"),
            "gap_ms_p50": percentile(self.gaps, 50) * 1e3,
            "gap_ms_mean": float(np.mean(self.gaps)) * 1e3 if self.gaps else float("nan"),
        }


@dataclass
class Setup:
    """The graphs of one bench run, a `Submit` per policy over the same runners, and the step
    timings of each policy's schedulers (policy -> level -> StepTimes)."""

    description: str
    policies: dict[str, Submit]
    runners: list[Runner]
    timers: dict[str, dict[str, StepTimes]]
    steps: dict[str, int]  # level -> positions (steps a row takes there), in chain order


# Set by --providers: the CPU by default; CUDA where the GPU premise of step-level batching is tried.
PROVIDERS: list[str] = ["CPUExecutionProvider"]


def _runner(path: Path, label: str) -> Runner:
    runner = Runner(path, label=label, providers=PROVIDERS, instances=1, intra_op_threads=1)
    say(f"{label}: {runner.provider}")
    return runner


@dataclass
class FlatCost:
    """--flat-step-ms: a prior call costs `step_s` of wall time whatever its rows, off the GIL.

    The real graph runs (the codes are the real ones), then the pool thread sleeps what is left of
    the budget; time.sleep releases the GIL as ONNX Runtime does inside a GPU call, so the event
    loop and the other prior's thread run meanwhile. `device`, when set, is held for the whole call:
    the priors' calls take turns as on one device that runs one call at a time."""

    step_s: float
    device: threading.Lock | None = None
    row_s: float = 0.0  # --flat-row-ms: plus this much per row (a step that is not quite flat)
    # --flat-reshape-ms: plus this much for a call whose rows differ from the runner's previous
    # call, as ORT's CUDA Conv rebuilds its cuDNN frontend plans whenever its input shape changes.
    reshape_s: float = 0.0
    reshapes: int = 0
    calls: int = 0
    over: int = 0  # calls whose real graph alone took longer than the budget (not flat then)

    def wrap(self, runner: Runner) -> None:
        real = runner._model_call
        last = [0]  # the rows of this runner's previous call

        def model_call(feeds: dict[str, np.ndarray], solo: bool) -> list[Any]:
            rows = len(next(iter(feeds.values())))
            extra = 0.0
            if rows != last[0]:
                extra = self.reshape_s if last[0] else 0.0  # the first call's shape was warmed
                self.reshapes += last[0] > 0
                last[0] = rows
            if self.device is None:
                return self._flat(real, feeds, solo, extra)
            with self.device:
                return self._flat(real, feeds, solo, extra)

        runner._model_call = model_call  # type: ignore[method-assign]

    def _flat(
        self,
        real: Callable[[dict[str, np.ndarray], bool], list[Any]],
        feeds: dict[str, np.ndarray],
        solo: bool,
        extra_s: float,
    ) -> list[Any]:
        started = time.perf_counter()
        values = real(feeds, solo)
        rows = len(next(iter(feeds.values())))
        left = self.step_s + self.row_s * rows + extra_s - (time.perf_counter() - started)
        self.calls += 1  # plain int updates under the GIL: a lost one only skews the tally
        if left > 0:
            time.sleep(left)
        else:
            self.over += 1
        return values


# Set by --flat-step-ms: wraps every prior runner.
FLAT: list[FlatCost] = []


def _prior_runner(path: Path, label: str) -> Runner:
    runner = _runner(path, label)
    for flat in FLAT:
        flat.wrap(runner)
    return runner


def stable_shapes(args: argparse.Namespace, runner: Runner) -> bool:
    """--stable-shapes: pad the steps of both policies to stable row buckets (auto: on a GPU, as
    the server does)."""
    return bool(args.stable_shapes == "on" or (args.stable_shapes == "auto" and runner.info.on_gpu))


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
    runner = _prior_runner(build_prior(tmp, grid, args.codes, args.iterations), "bench-prior")
    timers = {label: {"prior": StepTimes(functools.partial(runner.run, StepRows()))} for label in POLICIES}
    common: dict[str, Any] = {"name": "bench-prior", "grid": grid, "codebook_size": args.codes}
    common["stable_shapes"] = stable_shapes(args, runner)
    policies: dict[str, Submit] = {}
    step_run, request_run = timers["step"]["prior"], timers["request"]["prior"]
    for label, scheduler, gate in (
        ("step", StepScheduler(step_run, max_rows=args.rows, **common), asyncio.Semaphore(args.rows)),
        ("request", RequestLevel(request_run, max_rows=1 << 30, batch=args.rows, **common), None),
    ):
        sample = _gated(scheduler, gate)

        async def submit(i: int, sample: Callable[..., Awaitable[np.ndarray]] = sample) -> None:
            await sample([i], None, None, SamplingOptions(), None)

        policies[label] = submit
    description = f"synthetic prior {grid[0]}x{grid[1]} K={args.codes}, {args.iterations} MatMul layers"
    return Setup(description, policies, [runner], timers, {"prior": grid[0] * grid[1]})


class ChainBatches:
    """--request-scope chain: request-level batching of the whole chain. Up to `batch` waiting
    requests enter together once the previous batch has left both priors and the decoder; each
    level's RequestLevel scheduler then runs them as one batch. The default ("level") lets the
    next batch into the top prior while the previous one is in the bottom prior (a pipeline)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._inside = 0

    def around(self, submit: Submit) -> Submit:
        async def chained(i: int) -> None:
            loop = asyncio.get_running_loop()
            entry = loop.create_future()
            self._waiting.append(entry)
            # At the next loop iteration, as a level's scheduler admits at its next step: requests
            # arriving together (the capacity batch) enter together.
            loop.call_soon(self._admit)
            try:
                await entry
            except asyncio.CancelledError:
                if entry.done() and not entry.cancelled():  # admitted, cancelled before it ran
                    self._inside -= 1
                    self._admit()
                raise
            try:
                await submit(i)
            finally:
                self._inside -= 1
                self._admit()

        return chained

    def _admit(self) -> None:
        if self._inside:
            return
        while self._waiting and self._inside < self.batch:
            entry = self._waiting.popleft()
            if entry.done():  # its request was cancelled while it waited
                continue
            entry.set_result(None)
            self._inside += 1


def build_chain(root: Path) -> Path:
    """A repository with the digits chain's names and shapes (7x7 K=32 top prior, 14x14 K=64 bottom
    prior given the top, both over 10 labels, and a decoder), near-free synthetic graphs."""
    sys.path.insert(0, str(REPO_ROOT / "tests" / "server"))
    from code_models import decoder_graph, prior_graph
    from server_support import write_model

    top, grid, classes = (7, 7), (14, 14), [str(i) for i in range(10)]
    base = {"output_range": None, "class_names": classes}
    write_model(
        root,
        TOP_PRIOR,
        "code_prior",
        prior_graph(*top, 32, n_classes=10, seed=1),
        {**base, "grid": list(top), "codebook_size": 32},
    )
    write_model(
        root,
        PRIOR,
        "code_prior",
        prior_graph(*grid, 64, n_classes=10, top=top, seed=2),
        {**base, "grid": list(grid), "codebook_size": 64, "top_grid": list(top), "top_codebook_size": 32},
        config={"top_prior": TOP_PRIOR, "decoder": DECODER},
    )
    write_model(
        root,
        DECODER,
        "code_decoder",
        decoder_graph(*grid, 64, top=top, top_k=32),
        {
            "grid": list(grid),
            "codebook_size": 64,
            "top_grid": list(top),
            "top_codebook_size": 32,
            "image_size": list(grid),
            "channels": 1,
            "output_range": [0.0, 1.0],
        },
    )
    return root


def vqvae_setup(args: argparse.Namespace, root: Path) -> Setup:
    """The default VQ-VAE-2 chain (top prior -> bottom prior -> decoder) from `args.models`, each
    prior at its config.json default sampling, as a SampleCodes request without options."""
    from genserve_server.config import load_card, load_model_config

    cards = {name: load_card(root / name / "1" / "card.json") for name in (TOP_PRIOR, PRIOR, DECODER)}
    configs = {name: load_model_config(root / name / "config.json") for name in (TOP_PRIOR, PRIOR)}
    runners = {
        name: (_runner if name == DECODER else _prior_runner)(root / name / "1" / "model.onnx", name)
        for name in cards
    }
    decode = runners[DECODER]
    policies: dict[str, Submit] = {}
    timers: dict[str, dict[str, StepTimes]] = {label: {} for label in POLICIES}
    for label in POLICIES:
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
                "stable_shapes": stable_shapes(args, runners[name]),
            }
            step_run = timers[label][name] = StepTimes(functools.partial(runners[name].run, StepRows()))
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
        if label == "request" and args.request_scope == "chain":
            policies[label] = ChainBatches(args.rows).around(submit)
    sampling = configs[PRIOR].sampling
    description = (
        f"{'synthetic ' if args.synthetic_chain else ''}"
        f"{TOP_PRIOR} (7x7, K=32) -> {PRIOR} (14x14, K=64) -> {DECODER}, default sampling "
        f"(temperature {sampling.temperature:g}), ORT {PROVIDERS[0]}, 1 thread per graph, "
        f"stable shapes {'on' if stable_shapes(args, runners[PRIOR]) else 'off'}, "
        f"request-level batches per {args.request_scope}"
    )
    steps = {}
    for name in (TOP_PRIOR, PRIOR):
        grid = cards[name].grid
        assert grid is not None
        steps[name] = grid[0] * grid[1]
    return Setup(description, policies, list(runners.values()), timers, steps)


async def measure_rate(setup: Setup, args: argparse.Namespace, index: int, rate: float) -> dict[str, Any]:
    """Both policies at `rate` requests/s, `args.rounds` rounds in ABBA order, pooled."""
    policies = setup.policies
    results: dict[str, dict[str, Any]] = {}
    pooled: dict[str, list[float]] = {label: [] for label in policies}
    failures: dict[str, Errors] = {label: Errors() for label in policies}
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in policies}
    for level_timers in setup.timers.values():
        for timer in level_timers.values():
            timer.reset()
    # Rounds in ABBA order (the same arrivals per round for both policies): a machine whose load
    # drifts weighs on both alike.
    for r in range(args.rounds):
        order = list(policies) if r % 2 == 0 else list(reversed(policies))
        for label in order:
            latencies, throughput, errors = await one_rate(
                policies[label], rate, args.duration, seed=index * 100 + r // 2
            )
            pooled[label] += latencies
            failures[label].update(errors)
            for name, message in errors.messages.items():
                failures[label].messages.setdefault(name, message)
            rounds[label].append(
                {
                    "n": len(latencies),
                    "errors": dict(errors),
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                    "grids_per_s": throughput,
                    "load": os.getloadavg()[0],
                }
            )
    for label, latencies in pooled.items():
        results[label] = {
            "steps": {level: timer.summary() for level, timer in setup.timers[label].items()},
            "n": len(latencies),
            "errors": dict(failures[label]),
            "error_messages": dict(failures[label].messages),
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "grids_per_s": float(np.mean([x["grids_per_s"] for x in rounds[label]])),
            "rounds": rounds[label],
        }
        got = results[label]
        failed = ", ".join(f"{name}={n}" for name, n in sorted(got["errors"].items()))
        say(
            f"{rate:8.2f} {label:>8} {len(latencies):5d} {got['p50_ms']:9.1f} {got['p99_ms']:9.1f} "
            f"{got['grids_per_s']:8.2f}" + (f"  failed: {failed}" if failed else "")
        )
    for label in policies:
        for level, steps in results[label]["steps"].items():
            say(
                f"{'':8} {label:>8} {level}: {steps['steps']} steps, {steps['rows_per_step']:.2f} rows/step, "
                f"{steps['reshapes']} new shapes, "
                f"call {steps['call_ms_p50']:.2f} ms p50 ({steps['call_ms_mean']:.2f} mean), gap "
                f"{steps['gap_ms_p50']:.3f} ms p50 ({steps['gap_ms_mean']:.3f} mean)"
            )
    p50 = results["step"]["p50_ms"] / results["request"]["p50_ms"]
    p99 = results["step"]["p99_ms"] / results["request"]["p99_ms"]
    say(f"{'':8} {'step/req':>8} {'':5} {p50:9.2f} {p99:9.2f}")
    return {"rate_per_s": rate, **results, "p50_ratio": p50, "p99_ratio": p99}


def simulate(
    policy: str, levels: Sequence[int], rows: int, rate_per_step: float, n: int, seed: int
) -> np.ndarray:
    """Latencies in steps of `n` Poisson arrivals through `levels` (positions per level) where every
    step costs one unit whatever its rows, the levels step side by side, and nothing else costs
    anything: what a policy could do at best. "step": rows join any step up to `rows`; "request":
    up to `rows` join only when the level is empty."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate_per_step, n))
    queues: list[list[int]] = [[] for _ in levels]
    running: list[list[list[int]]] = [[] for _ in levels]  # [request, positions left]
    done = np.zeros(n)
    t, arrived = 0.0, 0
    while arrived < n or any(queues) or any(running):
        while arrived < n and arrivals[arrived] <= t:
            queues[0].append(arrived)
            arrived += 1
        for queue, level_rows, positions in zip(queues, running, levels, strict=True):
            if policy == "step" or not level_rows:
                while queue and len(level_rows) < rows:
                    level_rows.append([queue.pop(0), positions])
        if not any(running):
            t = float(arrivals[arrived])
            continue
        t += 1.0
        for i, level_rows in enumerate(running):
            for row in level_rows:
                row[1] -= 1
            for row in [row for row in level_rows if row[1] == 0]:
                level_rows.remove(row)
                if i + 1 < len(levels):
                    queues[i + 1].append(row[0])
                else:
                    done[row[0]] = t
    latencies: np.ndarray = (done - arrivals)[n // 10 :]  # the first tenth warms the queues
    return latencies


def ideal_ratios(
    levels: Sequence[int], rows: int, fraction: float, n: int = 2000, chain: bool = False
) -> dict[str, float]:
    """step ÷ request p50 and p99 of `simulate` at `fraction` of the capacity as the bench defines
    it (a full request-level batch through every level): the best ratio a scheduler with no
    overhead could reach against this baseline under a flat step cost."""
    rate = fraction * rows / sum(levels)
    step = simulate("step", levels, rows, rate, n, seed=1)
    # `chain`: request-level batches run through every level before the next enters.
    request = simulate("request", [sum(levels)] if chain else levels, rows, rate, n, seed=1)
    return {
        "p50_ratio": float(np.percentile(step, 50) / np.percentile(request, 50)),
        "p99_ratio": float(np.percentile(step, 99) / np.percentile(request, 99)),
    }


def shape_probe(runner: Runner, rows: int, calls: int = 40) -> dict[str, float]:
    """Median ms of one prior call (zero codes) with 1 row, with `rows` rows every call, and with
    rows - 1 and rows alternating: a new input shape every call, what step-level batching's joins
    and leaves cause without stable shapes."""

    def feeds(n: int) -> dict[str, np.ndarray]:
        # The priors' inputs have fixed dims past the batch axis (codes [N, H, W], label [N]).
        return {
            spec.name: np.zeros((n, *(int(d) for d in spec.shape[1:] if isinstance(d, int))), spec.dtype)
            for spec in runner.inputs
        }

    def median_ms(sizes: Sequence[int]) -> float:
        times = []
        for n in sizes:
            started = time.perf_counter()
            runner.run_sync(feeds(n))
            times.append(time.perf_counter() - started)
        return float(np.median(times[2:])) * 1e3  # the first calls settle the shapes

    return {
        "one_row_ms": median_ms([1] * calls),
        "rows_ms": median_ms([rows] * calls),
        "alternating_ms": median_ms([rows - (i % 2) for i in range(calls)]),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_chain:
            setup = vqvae_setup(args, build_chain(Path(tmp)))
        elif args.models:
            setup = vqvae_setup(args, Path(args.models))
        else:
            setup = synthetic_setup(args, Path(tmp))
    probe = {}
    if args.shape_probe:
        for runner in setup.runners:
            if runner.label in setup.steps or runner.label == "bench-prior":
                probe[runner.label] = got = shape_probe(runner, max(2, args.rows))
                say(
                    f"shape probe {runner.label}: 1 row {got['one_row_ms']:.2f} ms, {args.rows} rows "
                    f"{got['rows_ms']:.2f} ms, {args.rows - 1} and {args.rows} rows alternating "
                    f"{got['alternating_ms']:.2f} ms (median per call)"
                )
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
    levels = [setup.steps[name] for name in setup.steps]
    rows_out = []
    for index, rate in enumerate(rates):
        got = await measure_rate(setup, args, index, rate)
        ideal = ideal_ratios(levels, args.rows, rate / capacity, chain=args.request_scope == "chain")
        say(f"{'':8} {'ideal':>8} {'':5} {ideal['p50_ratio']:9.2f} {ideal['p99_ratio']:9.2f}")
        rows_out.append({**got, "ideal": ideal})
    for runner in setup.runners:
        runner.close()
    flat = {}
    for emulated in FLAT:
        flat = {"step_ms": emulated.step_s * 1e3, "row_ms": emulated.row_s * 1e3}
        flat |= {"reshape_ms": emulated.reshape_s * 1e3, "reshapes": emulated.reshapes}
        flat |= {"serial": emulated.device is not None}
        flat |= {"calls": emulated.calls, "over_budget": emulated.over}
        say(
            f"flat step {flat['step_ms']:g} ms: {emulated.calls} prior calls, {emulated.over} over budget, "
            f"{emulated.reshapes} with other rows than the runner's previous call"
        )
    return {
        "shape_probe": probe,
        "flat": flat,
        "setup": setup.description,
        "row_budget": args.rows,
        "duration_s_per_round": args.duration,
        "rounds": args.rounds,
        "lone_ms": {label: value * 1e3 for label, value in lone.items()},
        "lone_ratio": lone["step"] / lone["request"],
        "capacity_grids_per_s": capacity,
        "rates": rows_out,
    }


@ctrl_c_exits_130("bench.step_batching")
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
        "--synthetic-chain",
        action="store_true",
        help="bench a near-free synthetic chain with the digits chain's names and shapes",
    )
    parser.add_argument(
        "--flat-step-ms",
        type=float,
        default=0.0,
        help="every prior call takes this many ms of wall time, whatever its rows, off the GIL "
        "(a GPU's flat step emulated on the CPU: the graph runs, its thread sleeps the rest)",
    )
    parser.add_argument(
        "--flat-row-ms",
        type=float,
        default=0.0,
        help="with --flat-step-ms: plus this many ms per row of the call (a step not quite flat)",
    )
    parser.add_argument(
        "--flat-reshape-ms",
        type=float,
        default=0.0,
        help="with --flat-step-ms: plus this many ms for a call whose rows differ from the previous "
        "call's (ORT's CUDA Conv rebuilds its cuDNN plans on every input-shape change)",
    )
    parser.add_argument(
        "--flat-serial", action="store_true", help="with --flat-step-ms: the priors' calls take turns"
    )
    parser.add_argument(
        "--request-scope",
        choices=("level", "chain"),
        default="level",
        help="request-level baseline of a two-prior chain: a batch per level (the next batch enters "
        "the top prior while the previous one is in the bottom one) or per chain (it leaves the "
        "decoder before the next enters)",
    )
    parser.add_argument(
        "--shape-probe",
        action="store_true",
        help="first time each prior's calls at a fixed and at an alternating number of rows",
    )
    parser.add_argument(
        "--stable-shapes",
        choices=("auto", "on", "off"),
        default="auto",
        help="pad each step's call to a stable power-of-two number of rows (StepScheduler "
        "stable_shapes), both policies; auto: where the prior runs on a GPU, as served",
    )
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="ONNX Runtime providers, comma-separated, in order (CUDAExecutionProvider on a GPU)",
    )
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    PROVIDERS[:] = select_providers(args.providers.split(","))
    FLAT[:] = []
    if args.flat_step_ms > 0:
        device = threading.Lock() if args.flat_serial else None
        FLAT.append(
            FlatCost(args.flat_step_ms / 1e3, device, args.flat_row_ms / 1e3, args.flat_reshape_ms / 1e3)
        )
    figures = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **figures}, indent=2) + "\n")
    # A level where nothing completed measured nothing: fail, as genserve-client bench does.
    failed = failed_levels(figures["rates"])
    if failed:
        say(f"FAILED: {len(failed)} level(s) measured nothing: {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
