"""Step-level (continuous) batching of an autoregressive code prior (kind code_prior).

One image is H*W dependent prior calls. Request-level batching would make a newcomer wait for the
whole batch in front of it; here a `StepScheduler` per prior version keeps a running set of rows
and, every step, makes ONE prior call for all of them, whatever position each row is at (the
graph gives logits for every position of partially filled grids). Each row then samples its next
code at its own position and advances. New rows join at the next step, up to the row budget
(batching.max_batch_size; a request that does not fit is refused at once with RESOURCE_EXHAUSTED);
finished rows leave at once; rows whose caller cancelled or whose deadline passed leave at the
next step.

With `stable_shapes` (a prior on a GPU) a step's call is padded to a power-of-two number of rows
(at most the row budget) that grows at once and never shrinks, so rows joining and leaving do not
change the call's input shape: a scheduler sees at most log2(row budget) + 1 shapes in its life.
On a GPU a step costs about the same for 1 or 64 rows, but ONNX Runtime's CUDA Conv rebuilds its
cuDNN frontend plans (graph, heuristics, plan build) whenever its input shape differs from its
previous call's, every Conv of the prior. Measured on an H200 (bench/README.md, "Step-level
batching on the H200"): a call at a new shape 52-83 ms, a step 0.8-1.3 ms at 1 or 8 rows, so no
shrink pays back the new shape it costs (a bucket that shrank after 4 grids' worth of smaller
steps still made 19-32 new shapes a run). Padded rows repeat the first row; their logits are dropped.

Sampling is a pure function of (logits of the row, seed, position, options), and the logits of a
row depend only on its own grid, so a grid never depends on which rows shared its steps. The random
stream (CODE_RNG_ALGORITHM, documented above SampleCodesRequest in protos/genserve/v1/genserve.proto):

1. Philox4x32-10 (latents.philox4x32_10) keyed by the seed: key = (seed mod 2^32, floor(seed / 2^32));
   the code at raster position p = r * W + c uses counter (p, stream, 0, 0), stream 0 for a prior
   without top_codes (single-level or top) and 1 for a bottom prior; u = (x0 + 0.5) / 2^32 (float64).
2. l = float64(logits[:, r, c]) / temperature; with top_k > 0 only the top_k largest l stay (ties:
   the lower code first), the rest are dropped. A request that leaves temperature unset (top_k 0)
   gets the prior's config.json sampling.temperature rounded to float32 (sampling.top_k; 1 and 0
   where absent): the same grid as a request that sends those values.
3. w_j = exp(l_j - max l); the code is the smallest j whose running sum w_0 + .. + w_j > u * sum(w).
   Where a kept l_j is +inf, w_j = 1 for the +inf codes and 0 for the rest (the limit); a row whose
   kept logits hold NaN (or are all -inf) has no code: it fails alone (INTERNAL), its request with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from genserve_contract.config import MAX_TEMPERATURE, SamplingConfig
from genserve_server import latents
from genserve_server.batch_parts import Caller, count_once
from genserve_server.batcher import (
    WITHDRAWN,
    FailureLog,
    Lane,
    caller_ids,
    drop_reason,
    model_call_failure,
    withdrawn,
)
from genserve_server.errors import DeadlineExceeded, GenserveError, Internal, ResourceExhausted, invalid
from genserve_server.metrics import ModelMetrics

CODE_RNG_ALGORITHM: Final = "philox4x32-10/code-sampling/v1"
# Unfilled positions of a grid hold this code (kinds.CODES): the prior's masks never read them.
UNFILLED: Final = 0
# sample_codes' answer for a row whose logits define no distribution (NaN, or every kept one -inf).
NO_CODE: Final = -1

RunStep = Callable[[dict[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
# A request's progress: (positions filled, its grids so far int64 [N, H, W], a copy).
Progress = Callable[[int, np.ndarray], None]


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """A request's options; unset ones take the prior's config.json `sampling` (`resolved`)."""

    temperature: float | None = None  # None: the prior's sampling.temperature
    top_k: int = 0  # 0: the prior's sampling.top_k (0 there: every code)
    # A two-level call's top level, where the request gave its own (SampleCodesRequest.top_*):
    # None / 0 take temperature / top_k above (`top_level`).
    top_temperature: float | None = None
    top_top_k: int = 0

    @staticmethod
    def checked(
        temperature: float | None,
        top_k: int,
        codebook_size: int,
        fields: tuple[str, str] = ("temperature", "top_k"),
        unset_top_k: str = "the model's default",
    ) -> SamplingOptions:
        """Options within range, else InvalidArgument naming the field (`fields`: the request's
        names for these two) and its limit (`unset_top_k`: what a top_k of 0 takes)."""
        if temperature is not None and not (
            math.isfinite(temperature) and 0.0 < temperature <= MAX_TEMPERATURE
        ):
            # A proto float: its float32's shortest form is what the client wrote (10.000001, not
            # the double 10.000000953674316).
            raise invalid(
                fields[0], f"must be in (0, {MAX_TEMPERATURE:g}], got {str(np.float32(temperature))}"
            )
        if not 0 <= top_k <= codebook_size:
            raise invalid(
                fields[1],
                f"must be in 0..{codebook_size} (0: {unset_top_k}; {codebook_size}: every code), got {top_k}",
            )
        return SamplingOptions(None if temperature is None else float(temperature), int(top_k))

    def resolved(self, defaults: SamplingConfig) -> tuple[float, int]:
        """(temperature, top_k) to sample with. The default temperature is rounded to float32, as
        the request's field is, so leaving it unset equals sending the default (byte-identical)."""
        temperature = (
            float(np.float32(defaults.temperature)) if self.temperature is None else self.temperature
        )
        return temperature, self.top_k or defaults.top_k

    def top_level(self, codebook_size: int) -> SamplingOptions:
        """The options a top prior of `codebook_size` codes samples a two-level call's top grids
        with: the request's top_temperature and top_top_k, else its temperature and top_k (capped
        at that codebook), unset ones the top prior's own defaults."""
        temperature = self.temperature if self.top_temperature is None else self.top_temperature
        return SamplingOptions(temperature, self.top_top_k or min(self.top_k, codebook_size))


def uniforms(seeds: Sequence[int], positions: Sequence[int], stream: int) -> np.ndarray:
    """u in (0, 1), float64 [N]: row i's draw at `positions[i]` of its stream (step 1 above)."""
    if len(seeds) != len(positions):
        raise ValueError(f"uniforms: {len(seeds)} seeds but {len(positions)} positions")
    n = len(seeds)
    seed_words = np.asarray(seeds, dtype=np.uint64)  # vectorised: a join draws rows x H*W at once
    key = np.empty((n, 2), np.uint32)
    key[:, 0] = seed_words & np.uint64(0xFFFFFFFF)
    key[:, 1] = seed_words >> np.uint64(32)
    counter = np.zeros((n, 4), np.uint32)
    counter[:, 0] = np.asarray(positions, dtype=np.uint32)
    counter[:, 1] = stream
    words = latents.philox4x32_10(counter, key)
    return (words[:, 0].astype(np.float64) + 0.5) / 2.0**32


def sample_codes(
    logits: np.ndarray, u: np.ndarray, temperatures: np.ndarray, top_ks: np.ndarray
) -> np.ndarray:
    """Codes int64 [N] from logits float [N, K] and uniforms u [N] (steps 2-3 above), row by row
    independent: the same row gives the same code in any batch.

    Non-finite logits: -inf is a code of probability 0; +inf codes take all of the probability
    (the limit of step 3: shared by the kept +inf codes like equal logits); a row whose kept logits
    hold NaN, or are all -inf, has no distribution and gets NO_CODE (the caller fails that row)."""
    n, k = logits.shape
    scaled = np.ascontiguousarray(logits, dtype=np.float64) / temperatures[:, None]
    order = np.argsort(-scaled, axis=1, kind="stable")  # ties: the lower code first (NaN last)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(k)[None, :].repeat(n, axis=0), axis=1)
    limit = np.where(top_ks > 0, top_ks, k)
    kept = ranks < limit[:, None]
    top = np.max(np.where(kept, scaled, -np.inf), axis=1, keepdims=True)
    infinite = np.isposinf(top)  # [N, 1]: rows with a kept +inf logit
    finite_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(invalid="ignore"):  # NaN rows are answered NO_CODE below
        weights = np.where(
            kept,
            np.where(infinite, np.isposinf(scaled), np.exp(np.where(kept, scaled - finite_top, 0.0))),
            0.0,
        )
    cumulative = np.cumsum(weights, axis=1)
    threshold = u * cumulative[:, -1]
    codes: np.ndarray = np.argmax(cumulative > threshold[:, None], axis=1).astype(np.int64)
    undefined = (kept & np.isnan(scaled)).any(axis=1) | np.isneginf(top[:, 0])
    codes[undefined] = NO_CODE
    return codes


@dataclass(eq=False, slots=True)
class Row:
    """One grid being sampled: its codes so far, next position, stream inputs and its future."""

    seed: int
    label: int | None
    top: np.ndarray | None
    temperature: float
    top_k: int
    deadline: float | None
    future: asyncio.Future[np.ndarray]
    codes: np.ndarray
    draws: np.ndarray  # float64 [H*W]: u at every position, drawn once at join (not one Philox call a step)
    position: int = 0
    submitted: float = field(default_factory=time.monotonic)
    request: int = 0  # the sample() call it belongs to (genserve_batch_requests: requests per step)
    caller: Caller | None = None  # the RPC (core.Call): its drops count once, with its other models'


@dataclass(eq=False, slots=True)
class _Watch:
    """A request that asked for progress: its rows (which advance together: they joined the same
    step) and how often to report."""

    rows: list[Row]
    every: int
    report: Progress


@dataclass(slots=True)
class StepStats:
    """What the scheduler did (metrics, tests, the bench)."""

    steps: int = 0
    rows_stepped: int = 0  # sum over steps of the rows in the call
    joined: int = 0
    finished: int = 0
    cancelled: int = 0
    expired: int = 0
    refused: int = 0
    join_wait_s: float = 0.0  # summed over joined rows: submitted -> first step
    padded: int = 0  # sum over steps of the rows added to keep the call's shape (stable_shapes)
    reshapes: int = 0  # steps whose call had other rows than the previous step's call


class StepScheduler:
    """The running set of one prior version; `sample` is what the core awaits."""

    def __init__(
        self,
        run: RunStep,
        *,
        name: str,
        grid: tuple[int, int],
        codebook_size: int,
        max_rows: int,
        stream: int = 0,
        takes_label: bool = False,
        top_grid: tuple[int, int] | None = None,
        metrics: ModelMetrics | None = None,
        defaults: SamplingConfig | None = None,
        stable_shapes: bool = False,
    ) -> None:
        self._run = run
        # Pad each call to a bucket of rows that only grows (the module docstring: GPU priors).
        self.stable_shapes = stable_shapes
        # The prior's config.json `sampling`: options a request leaves unset.
        self.defaults = defaults or SamplingConfig()
        # The prior version's series (docs/metrics-contract.md): a step is a batch (compute
        # duration, batch size = rows per step, batch requests = requests per step), the join wait
        # is the interactive queue wait, a full budget is a `queue_full` rejection, and
        # genserve_step_running_rows the running set.
        self.metrics = metrics
        self._requests = itertools.count(1)
        self.name = name
        self._failures = FailureLog(name)  # a failed step's line, as a failed batch's
        self.grid = grid
        self.positions = grid[0] * grid[1]
        self.codebook_size = codebook_size
        self.max_rows = max_rows
        self.stream = stream
        self.takes_label = takes_label
        self.top_grid = top_grid
        self.stats = StepStats()
        self._running: list[Row] = []
        self._joining: list[Row] = []
        self._watches: list[_Watch] = []
        self._task: asyncio.Task[None] | None = None
        self._previous_rows = 0  # rows of the previous call (with stable_shapes: its bucket)
        self._reserved = 0  # rows promised to calls still on their way (`reserved`)

    @property
    def rows(self) -> int:
        """Rows running, about to join or reserved (what the budget counts). A row whose caller left
        or whose deadline passed takes no room: it leaves at the next step, before rows that join
        now come in (it held the budget until the step in flight ended, and a request sent
        meanwhile was refused though its rows fit that next step)."""
        now = time.monotonic()
        live = sum(
            1
            for row in itertools.chain(self._running, self._joining)
            if not row.future.done() and (row.deadline is None or now < row.deadline)
        )
        return live + self._reserved

    @contextlib.contextmanager
    def reserved(self, n: int, deadline: float | None = None, caller: Caller | None = None) -> Iterator[None]:
        """Hold `n` rows of the budget (check_room first) while a call gets ready to `sample` them: a
        two-level call's bottom rows while its top level runs. Leave it, then call `sample` with no
        await in between: the room is then still there (a call refused only after its top grid had
        been sampled lost that work, and under steady traffic lost it again on every retry).
        `deadline` passed: a deadline drop, as in `sample`, the budget full or not."""
        self._check_deadline(n, deadline, caller)
        self.check_room(n, caller)
        self._reserved += n
        try:
            yield
        finally:
            self._reserved -= n

    def _check_deadline(self, n: int, deadline: float | None, caller: Caller | None) -> None:
        """DeadlineExceeded where `deadline` has passed before `n` rows join (or are held): the budget
        full or not, a deadline drop, as at a step, not a queue_full refusal (its client gets
        DEADLINE_EXCEEDED); counted once for the RPC `caller`."""
        if deadline is not None and time.monotonic() >= deadline:
            self.stats.expired += n
            self._count_drop(caller, "deadline")
            raise DeadlineExceeded(f"{self.name}: deadline passed before the request joined; not computed")

    def check_room(self, n: int, caller: Caller | None = None) -> None:
        """INVALID_ARGUMENT where `n` rows exceed the row budget, RESOURCE_EXHAUSTED where they do not
        fit beside the running rows now (a two-level call asks its bottom prior before its top level
        runs, so that a full budget refuses it at once, not after a whole top grid). The refusal of
        an RPC `caller` is counted (`queue_full`) by the boundary, under the status its client gets
        (a stream's sampling task fails a loop turn or more before its answer: Caller.refused)."""
        if n > self.max_rows:
            raise invalid("seeds", f"{n} samples are more than {self.name}'s row budget ({self.max_rows})")
        if self.rows + n > self.max_rows:
            self.stats.refused += 1
            if caller is not None:
                if self.metrics is not None:
                    caller.refused = (self.metrics, "queue_full")
            elif self.metrics is not None:
                self.metrics.rejected["queue_full"].inc()
            running = self.rows - self._reserved
            held = (
                f", {self._reserved} held for two-level calls whose top level runs" if self._reserved else ""
            )
            raise ResourceExhausted(
                f"{self.name}: row budget full ({self.rows} of {self.max_rows} rows taken: {running} "
                f"running{held}; {n} asked); retry with backoff"
            )

    async def sample(
        self,
        seeds: Sequence[int],
        labels: Sequence[int] | None,
        tops: np.ndarray | None,
        options: SamplingOptions,
        deadline: float | None,
        progress: Progress | None = None,
        every: int = 0,
        caller: Caller | None = None,
    ) -> np.ndarray:
        """Grids int64 [N, H, W] for `seeds`; all of the request's rows join the next step together.

        RESOURCE_EXHAUSTED at once where they do not fit the row budget beside the running rows;
        cancelling the caller makes its rows leave at the next step. With `progress`, it is called
        after every `every`-th step of the request (not after the last) with the grids so far.
        `caller`: the RPC (core.Call), whose drops count once across its requests and models (a
        stream's chunks ahead, the top prior, the decoder)."""
        n = len(seeds)
        self._check_deadline(n, deadline, caller)
        self.check_room(n, caller)
        loop = asyncio.get_running_loop()
        temperature, top_k = options.resolved(self.defaults)
        draws = uniforms(
            [int(seed) for seed in seeds for _ in range(self.positions)],
            [p for _ in seeds for p in range(self.positions)],
            self.stream,
        ).reshape(len(seeds), self.positions)
        rows = [
            Row(
                seed=int(seed),
                label=None if labels is None else int(labels[i]),
                top=None if tops is None else tops[i],
                temperature=temperature,
                top_k=min(top_k, self.codebook_size),
                deadline=deadline,
                future=loop.create_future(),
                codes=np.full(self.grid, UNFILLED, np.int64),
                draws=draws[i],
            )
            for i, seed in enumerate(seeds)
        ]
        request = next(self._requests)
        for row in rows:
            row.request = request
            row.caller = caller
        watch = _Watch(rows, max(1, every), progress) if progress is not None else None
        if watch is not None:
            self._watches.append(watch)
        self._joining.extend(rows)
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())
        withdraw: str | None = None
        try:
            grids = await asyncio.gather(*(row.future for row in rows))
        except Exception:
            # A row of this request failed (NaN logits): the call counts under that failure, and
            # its other rows leave WITHDRAWN, not as a caller that went away (no drop).
            withdraw = WITHDRAWN
            raise
        finally:
            if watch is not None:
                self._watches.remove(watch)
            for row in rows:  # one row failed or the caller left: the others leave at the next step
                if not row.future.done():
                    row.future.cancel(withdraw)
        return np.stack(grids)

    def _report(self) -> None:
        """Progress of the watching requests whose rows reached a multiple of their `every`."""
        for watch in self._watches:
            position = watch.rows[0].position
            if 0 < position < self.positions and position % watch.every == 0:
                watch.report(position, np.stack([row.codes for row in watch.rows]))

    def _admit(self, now: float) -> None:
        observed: set[int] = set()
        for row in self._joining:
            self.stats.join_wait_s += now - row.submitted
            # One observation per request (its rows join together), as a batcher's request slice.
            if self.metrics is not None and row.request not in observed:
                observed.add(row.request)
                self.metrics.queue_duration[Lane.INTERACTIVE].observe(now - row.submitted)
        self.stats.joined += len(self._joining)
        self._running.extend(self._joining)
        self._joining = []

    def _drop_gone(self, now: float) -> None:
        """Rows whose caller cancelled or whose deadline passed leave now, before the call;
        genserve_step_running_rows is then the call's rows (joiners in, rows that left out, a failed
        step's too)."""
        keep = []
        dropped: dict[int, str] = {}
        for row in self._running:
            if row.future.done():
                self._dropped(row, drop_reason(row.deadline, now), dropped)
            elif row.deadline is not None and now >= row.deadline:
                self._dropped(row, "deadline", dropped)
                row.future.set_exception(
                    DeadlineExceeded(
                        f"{self.name}: deadline passed after {row.position} of {self.positions} positions"
                    )
                )
            else:
                keep.append(row)
        self._running = keep
        if self.metrics is not None:
            self.metrics.step_running_rows.set(len(keep))

    def _dropped(self, row: Row, reason: str, dropped: dict[int, str]) -> None:
        """One row leaves (`stats` count rows); genserve_requests_dropped_total counts its request
        once: `dropped` holds the requests counted in this pass (a request's rows leave together).
        Rows WITHDRAWN (their call ended with an error of its own: a stream's failed preview) are
        counted under that error, not dropped."""
        if reason == "deadline":
            self.stats.expired += 1
        else:
            self.stats.cancelled += 1
        if row.request not in dropped and not withdrawn(row.future):
            dropped[row.request] = reason
            self._count_drop(row.caller, reason)

    def _count_drop(self, caller: Caller | None, reason: str) -> None:
        """genserve_requests_dropped_total, once for the RPC `caller`, under the model it called (a
        two-level call's top prior's rows: the prior called, as its requests_total: Caller.metrics)."""
        if count_once(caller):
            counts = self.metrics if caller is None else caller.metrics
            if counts is not None:
                counts.on_dropped(reason)

    def call_rows(self, n: int) -> int:
        """Rows of this step's call for `n` running rows: `n`, or with `stable_shapes` the bucket,
        a power of two (at most the row budget) that grows at once to fit and never shrinks."""
        if not self.stable_shapes:
            rows = n
        else:
            fit = min(1 << max(0, n - 1).bit_length(), max(n, self.max_rows))
            rows = max(fit, self._previous_rows)
        if self._previous_rows and rows != self._previous_rows:
            self.stats.reshapes += 1
        self._previous_rows = rows
        return rows

    def _inputs(self, rows: Sequence[Row], padded: int) -> dict[str, np.ndarray]:
        """The call's inputs for `rows`, plus copies of the first row up to `padded` rows."""
        order = list(rows) + [rows[0]] * (padded - len(rows))
        inputs = {"codes": np.stack([row.codes for row in order])}
        if self.takes_label:
            inputs["label"] = np.array([row.label or 0 for row in order], np.int64)
        if self.top_grid is not None:
            inputs["top_codes"] = np.stack([row.top for row in order if row.top is not None])
        return inputs

    async def _loop(self) -> None:
        try:
            while self._running or self._joining:
                # Joiners and cancellations get in between steps even when a tiny call runs inline.
                await asyncio.sleep(0)
                now = time.monotonic()
                self._admit(now)
                self._drop_gone(now)
                rows = self._running
                if not rows:
                    continue
                started = time.perf_counter()
                padded = self.call_rows(len(rows))
                self.stats.padded += padded - len(rows)
                try:
                    outputs = await self._run(self._inputs(rows, padded))
                    codes = self._choose(rows, np.asarray(outputs["logits"]), padded)
                except Exception as exc:  # a failed call fails its rows; the scheduler goes on
                    if self.metrics is not None:  # a model call all the same, as a batcher's failed batch
                        self._observe_call(rows, time.perf_counter() - started)
                        self.metrics.batch_failures.inc()
                    self._fail_step(rows, exc)
                    self._running = [r for r in self._running if r not in rows]
                    continue
                self.stats.steps += 1
                self.stats.rows_stepped += len(rows)
                if self.metrics is not None:
                    compute_s = time.perf_counter() - started
                    self._observe_call(rows, compute_s)
                    # KServe ModelStatistics: a step is the prior's execution, as a batch elsewhere.
                    self.metrics.infer_stats.batch_done(len(rows), compute_s)
                still = []
                dropped: dict[int, str] = {}
                for row, code in zip(rows, codes, strict=True):
                    if row.future.done():  # cancelled during the call: leaves without advancing
                        self._dropped(row, drop_reason(row.deadline, time.monotonic()), dropped)
                        continue
                    if code == NO_CODE:  # this row's logits are broken: it fails, the others go on
                        row.future.set_exception(
                            Internal(
                                f"{self.name}: the prior's logits at position {row.position} hold NaN "
                                "(or are all -inf): no code can be sampled from them"
                            )
                        )
                        continue
                    row.codes.flat[row.position] = code
                    row.position += 1
                    if row.position == self.positions:
                        self.stats.finished += 1
                        if self.metrics is not None:
                            self.metrics.images.inc()
                        row.future.set_result(row.codes)  # leaves at once; the caller decodes it
                    else:
                        still.append(row)
                self._running = still
                self._report()
                if self.metrics is not None:
                    self.metrics.step_running_rows.set(len(still))
        finally:
            self._task = None
            if self.metrics is not None:
                self.metrics.step_running_rows.set(len(self._running))

    def _fail_step(self, rows: Sequence[Row], exc: Exception) -> None:
        """A failed step's rows fail as a failed batch's requests do (docs/operations.md, "Faults"):
        one line naming the prior, its version and every request id, the stack at most once a
        minute, and INTERNAL "model call failed" (RESOURCE_EXHAUSTED where memory ran out) marked
        logged; a GenserveError (the version unloaded, the shutdown's abort) as it is. Each call
        got the runtime's exception: the boundary's "unexpected error" with a traceback, per call."""
        failure: Exception = exc
        if not isinstance(exc, GenserveError):
            calls = len({row.request for row in rows})
            ids = caller_ids(row.caller for row in rows)
            self._failures.write(f"step of {len(rows)} rows from {calls} requests", ids, "", exc)
            failure = model_call_failure(self.name, exc)
        gone: dict[int, str] = {}
        for row in rows:
            if row.future.done():  # cancelled during the call: a drop, as after a step
                self._dropped(row, drop_reason(row.deadline, time.monotonic()), gone)
            else:
                row.future.set_exception(failure)

    def _observe_call(self, rows: Sequence[Row], compute_s: float) -> None:
        """One step's model call in the batch histograms (failed or not): a step is one batch."""
        assert self.metrics is not None
        self.metrics.compute_duration.observe(compute_s)
        self.metrics.batch_size.observe(len(rows))
        self.metrics.batch_requests.observe(len({row.request for row in rows}))

    def _choose(self, rows: Sequence[Row], logits: np.ndarray, padded: int) -> np.ndarray:
        """Each row's code at its own position (the padding rows' logits dropped)."""
        n = len(rows)
        if logits.shape != (padded, self.codebook_size, *self.grid):
            raise ValueError(
                f"{self.name}: logits of shape {logits.shape}, "
                f"expected {(padded, self.codebook_size, *self.grid)}"
            )
        width = self.grid[1]
        positions = [row.position for row in rows]
        r = np.array([p // width for p in positions])
        c = np.array([p % width for p in positions])
        at = logits[np.arange(n), :, r, c]  # [N, K]
        u = np.array([row.draws[p] for row, p in zip(rows, positions, strict=True)], np.float64)
        temperatures = np.array([row.temperature for row in rows], np.float64)
        top_ks = np.array([row.top_k for row in rows], np.int64)
        return sample_codes(at, u, temperatures, top_ks)


def check_labels(values: Sequence[int], class_names: Sequence[str], n: int, name: str) -> list[int] | None:
    """One label per row (one value: every row) for a prior with classes; none for one without."""
    if not class_names:
        if len(values):
            raise invalid("labels", f"{name} is not class-conditional (no class_names); send no labels")
        return None
    classes = f"in [0, {len(class_names)})"
    if not len(values):  # "got 0" read as a label 0 sent and refused
        raise invalid(
            "labels", f"required for {name}: one label {classes} for every sample or one per sample, got none"
        )
    if len(values) not in (1, n):
        expected = "1 value (one image)" if n == 1 else f"1 or {n} values"
        raise invalid("labels", f"must have {expected} {classes}, got {len(values)} values")
    labels = [int(v) for v in values] * (n if len(values) == 1 else 1)
    for i, label in enumerate(labels):
        if not 0 <= label < len(class_names):
            raise invalid(
                f"labels[{i if len(values) > 1 else 0}]", f"must be in [0, {len(class_names)}), got {label}"
            )
    return labels


def check_grids(
    grids: np.ndarray, n: int, grid: tuple[int, int], codebook_size: int, field: str
) -> np.ndarray:
    """int64 [n, H, W] codes in [0, K) from [n, H, W] or [H, W] (one grid for every row)."""
    if grids.ndim == 2:
        grids = np.broadcast_to(grids, (n, *grids.shape))
    if grids.shape != (n, *grid):
        raise invalid(
            f"{field}.shape",
            f"must be [{n}, {grid[0]}, {grid[1]}] or [{grid[0]}, {grid[1]}], got {list(grids.shape)}",
        )
    bad = np.flatnonzero((grids < 0) | (grids >= codebook_size))
    if bad.size:
        raise invalid(field, f"codes must be in [0, {codebook_size}), got {int(grids.flat[bad[0]])}")
    return np.ascontiguousarray(grids, dtype=np.int64)
