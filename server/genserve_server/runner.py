"""ONNX Runtime execution for one model version: the session(s) and the thread pool that runs them.

The runner knows tensors (numpy arrays by input/output name), not protos. Sessions are built by
ort_session.create_session (provider chain with TensorRT/CUDA options and clean fallback to CPU,
threads sized to the cores); batches run through ort_session.SessionRunner (plain run, IO binding
or CUDA graphs). ONNX Runtime releases the GIL inside `run`, so batches run on the pool while the
event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from genserve_server import codecs
from genserve_server.batch_keys import FINITE_ROWS_OUTPUT, PIXELS_OUTPUT, RowsKey
from genserve_server.config import cpu_count
from genserve_server.errors import ModelCallAborted
from genserve_server.gpu_errors import sticky_cuda_error
from genserve_server.gpu_gate import (
    CAPTURE_GATE,
)
from genserve_server.idle_spin import off_loop_work, run_off_loop
from genserve_server.ort_session import (
    GPU_PROVIDERS,
    ProfileShapes,
    RuntimeConfig,
    SessionInfo,
    create_session,
)
from genserve_server.providers import usable_providers
from genserve_server.session_runner import (
    RecentlyUsed,
    SessionRunner,
)

logger = logging.getLogger(__name__)

# What a batch's compute cost depends on (Runner._signature).
Signature = tuple[tuple[str | int, ...], ...]

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
}


# A call whose rows are larger than this many times the warm-up's rows, and than SHRINK_MIN_ROW_VALUES
# input values (~0.35 MP RGB), runs with ORT's arena shrinkage: the CPU arena keeps its peak for the
# process's life, so one 1024x1024 Translate would hold ~1 GB for good; shrinking at the end of such
# a call hands it back (pix2pix: 1.1 GB -> 0.1 GB). Full batches of usual rows keep their arena.
SHRINK_ABOVE_WARMED = 2.0
SHRINK_MIN_ROW_VALUES = 1 << 20


def _shrink_cpu_options() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


_SHRINK_CPU = _shrink_cpu_options()

# Threads that run BULK batches are background threads for the kernel: SCHED_IDLE, so that the
# wakeup of any normal thread (an interactive batch, the event loop, a co-located client) preempts
# a running bulk batch at once, while bulk work still gets every cycle nobody else wants. Where
# SCHED_IDLE is refused, niceness +19: a smaller share, but the same time slice, so a woken thread
# may still wait up to a slice (bench/profile.md item 27: p99 under bulk 1.6-1.8x idle with
# SCHED_IDLE, 1.9-2.2x with nice 19). Either needs no privilege; undoing it would, hence threads of
# their own.
BULK_THREAD_NICE = 19
# A batch whose measured model call plus output conversion (uint8 pixels) is at most this runs on the
# event loop unless the pool would give it the solo session (Runner._runs_inline);
# inline_compute_max_s = 0 (always the pool) turns this off too.
INLINE_BUSY_MAX_S = 2e-3
# The same bound for interactive batches while callers overlap (Batcher.callers_overlap), on a CPU
# with no more cores than instances. With several calls accepted per loop turn (accept.py) a tiny
# model's batches at c=64 grow to 30-40 rows, 2-5 ms: on a pool thread beside the busy loop (2
# cores) they computed 2.3x slower per row and finished after batches formed later, so requests
# overtook each other by 30-45 places (bench/profile.md, fourteenth round).
OVERLAP_INLINE_MAX_S = 5e-3

_cpu_fallback_warned = False
_cpu_fallback_lock = threading.Lock()


def select_providers(requested: Sequence[str]) -> list[str]:
    """The requested providers, in order, that this ORT build offers and that work in this process
    (GPU providers are probed once: providers.py); CPU always last. What a session really runs on
    is still `session.get_providers()` (Runner.provider).
    """
    return usable_providers(requested)


@dataclass(frozen=True, slots=True)
class RowAgreement:
    """What Runner.compare_rows measured: the largest |difference| between a row computed alone on
    the narrow session and (solo_diff) the same row alone on the solo session (None: no solo
    session), (batch_diff) the same row inside a batch (None: one row given). 0.0: bit-identical."""

    solo_diff: float | None
    batch_diff: float | None


@dataclass(frozen=True, slots=True)
class IoSpec:
    name: str
    dtype: Any  # a numpy scalar type
    shape: tuple[int | str | None, ...]


class BatchCost:
    """What one batch signature's model calls took, in seconds (Runner._costs)."""

    __slots__ = ("average_s", "fastest_s", "fastest_with_outputs_s")

    def __init__(self) -> None:
        # Moving average of the calls (None: not measured since a warm-up began).
        self.average_s: float | None = None
        # The fastest call seen: what it costs when not preempted. The inline decision uses it, so
        # that a busy machine (whose preemptions inflate the average) does not send a tiny model's
        # every batch through two thread hand-offs. Solo-session calls are left out.
        self.fastest_s = math.inf
        # The same with the outputs' conversion (the uint8 pixels) added: what the INLINE_BUSY_MAX_S
        # rule weighs, so that a batch whose model call is short but whose outputs are large (SR on
        # a GPU: ~1 ms of model call for 16 images, more of float -> uint8 for 16 x 256 x 256 x 3)
        # stays off the loop.
        self.fastest_with_outputs_s = math.inf


class Runner:
    """The session(s) of one model version, run by `instances` threads.

    With plain `run` one session is shared by the threads (ORT sessions are thread-safe); with IO
    binding or CUDA graphs (not thread-safe) each instance gets its own session and binding. With
    CUDA graphs each instance's calls run on that instance's own graph thread (ORT keeps graphs per
    thread), its graphs captured at the first `warm`; until then batches never run inline.

    With `solo_intra_op_threads` (plain run on the CPU provider only) a second session with that many
    intra-op threads runs the batches that start while no other batch is running: all cores for one
    call when the model is alone, one core per call when batches overlap.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        label: str,
        providers: Sequence[str],
        instances: int,
        intra_op_threads: int,
        solo_intra_op_threads: int = 0,
        runtime: RuntimeConfig | None = None,
        fp16: bool = False,
        profile: ProfileShapes | None = None,
        inline_max_s: float = 0.0,
        latent_dim: int | None = None,
        pixels_range: tuple[float, float] | None = None,
        model_sha256: str | None = None,
        external_sha256: Mapping[str, str] | None = None,
    ) -> None:
        self.label = label
        # Set by `close` (a reload's drain unloading the version): callers that run the model without
        # a batcher (a code prior's step scheduler) check it and refuse instead of calling.
        self.closed = False
        # When set, the "image" output is also returned as uint8 pixels (PIXELS_OUTPUT) mapped from
        # this range: one vectorised to_uint8 per batch (~2 us an image at 28x28) instead of one per
        # request (~24 us), off the event loop when the batch runs on the pool.
        self.pixels_range = pixels_range
        # Batches whose measured compute is below this run on the calling thread: a hop to the pool
        # and back costs ~50-100 us on 2 cores, more than a tiny model's whole batch.
        self.inline_max_s = inline_max_s
        self.latent_dim = latent_dim
        # What each batch signature's calls cost (power-of-two rows, other dims): the MAX_SHAPES_KEPT
        # signatures used last (a model of any input size has one per size); one dropped is measured
        # again, its next batch on the pool. One record per signature, updated in place: a lookup and
        # no lock per batch.
        self._costs: RecentlyUsed[Signature, BatchCost] = RecentlyUsed()
        self._last_s = 0.0
        # Every model call of this runner runs with one of these: `abort` sets their terminate flag,
        # which ends the calls still running at their next node (shutdown's deadline).
        self._run_options = ort.RunOptions()
        self._shrink_options = _shrink_cpu_options()
        self.requested_providers = tuple(providers)
        config = runtime or RuntimeConfig()
        if intra_op_threads and not config.intra_op_threads:
            config = _with_threads(config, intra_op_threads)
        n_sessions = instances if config.uses_io_binding else 1
        infos: list[SessionInfo] = [
            create_session(
                model_path,
                list(providers),
                config,
                cores=cpu_count(),
                instances=instances,
                fp16=fp16,
                profile=profile,
                # The load's verified digests key a TensorRT engine cache: no file hashed again.
                model_sha256=model_sha256,
                external_sha256=external_sha256,
            )
            for _ in range(n_sessions)
        ]
        self.info = infos[0]
        self.session = self.info.session
        self.providers = tuple(self.info.providers)
        self.provider = self.info.provider
        self.fallbacks = tuple(self.info.fallbacks)
        self._runners: queue.SimpleQueue[SessionRunner] = queue.SimpleQueue()
        # Every instance's runner (CUDA graphs: each has its own graph thread, captured at warm-up).
        self.session_runners = tuple(SessionRunner(info, config) for info in infos)
        for session_runner in self.session_runners:
            self._runners.put(session_runner)
        # The serving mode the sessions really have (effective provider options), not the config's.
        self.mode = self.session_runners[0].mode
        # e.g. "CUDAExecutionProvider, fp32, device 0, tf32 off, cuda graphs" or "..., io_binding".
        described = self.info.describe()
        self.description = described if self.mode == "cuda_graph" else f"{described}, {self.mode}"
        # Called (on the thread of the failed call) when a model call fails with a sticky CUDA error:
        # the context is unusable, so the owner marks the version broken and restarts the process.
        self.on_device_lost: Callable[[str], None] | None = None
        self.inputs = tuple(
            IoSpec(i.name, _ORT_DTYPES.get(i.type, np.float32), tuple(i.shape))
            for i in self.session.get_inputs()
        )
        self.outputs = tuple(o.name for o in self.session.get_outputs())
        self._input_dtypes = {i.name: i.dtype for i in self.inputs}
        self._shared = n_sessions == 1 and not config.uses_io_binding
        # Input values of the largest warm-up row (0 = not warmed: never shrink); see shrinks_after.
        self._warmed_row_values = 0
        self._shrinkable = self._shared and self.provider == "CPUExecutionProvider" and config.cpu_mem_arena
        # Batches running on the normal-priority pool threads now (not background bulk calls: their
        # SCHED_IDLE threads yield the cores to a solo call, see run_bulk).
        self._running = 0
        # Set by the owner (loader.make_batcher: rows wait in the batcher, or another batch has been
        # formed, e.g. a split's other part). A batch goes to the solo session only while nothing
        # else runs and nothing waits: otherwise the next batch would start beside it on the other
        # instance, and a multi-threaded call would share the cores with it for its whole (possibly
        # long) duration.
        self.more_work_queued: Callable[[], bool] = lambda: False
        # Set by the owner too (Batcher.callers_overlap): concurrent interactive callers lately. See
        # _runs_inline.
        self.callers_overlap: Callable[[], bool] = lambda: False
        self._running_lock = threading.Lock()
        self.solo_session: ort.InferenceSession | None = None
        if (
            instances > 1
            and self._shared
            and self.provider == "CPUExecutionProvider"
            and solo_intra_op_threads > config.intra_op_threads
        ):
            solo = create_session(
                model_path,
                ["CPUExecutionProvider"],
                _with_threads(config, solo_intra_op_threads),
                cores=cpu_count(),
                fp16=fp16,
            )
            self.solo_session = solo.session
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"ort-{label}")
        # OVERLAP_INLINE_MAX_S applies where every pool thread shares a core with the event loop
        # (measured on 2 cores); a host with more cores than instances keeps the 2-ms bound.
        on_cpu = self.provider == "CPUExecutionProvider"
        self._pool_shares_the_loops_cores = on_cpu and cpu_count() <= instances
        # Background bulk (run_bulk) only where the calling thread does a call's whole compute (one
        # intra-op thread: ORT's own workers would keep normal priority) and another instance is
        # always there for interactive batches (with one, an interactive batch waits for the bulk
        # batch, which a background thread would only make slower).
        self.background_bulk = (
            instances > 1
            and self._shared
            and self.provider == "CPUExecutionProvider"
            and self.session.get_session_options().intra_op_num_threads == 1
        )
        self._bulk_executor: ThreadPoolExecutor | None = None
        self._bulk_prep: ThreadPoolExecutor | None = None
        if self.background_bulk:
            self._bulk_executor = ThreadPoolExecutor(
                max_workers=instances,
                thread_name_prefix=f"ort-bulk-{label}",
                initializer=_lower_thread_priority,
            )
            # Latents, input conversion and pixels hold the GIL: at normal priority, so that a
            # preempted background thread never holds the GIL the event loop waits for.
            self._bulk_prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-bulk-prep-{label}")
        self._warn_if_cpu_fallback()

    def _warn_if_cpu_fallback(self) -> None:
        global _cpu_fallback_warned
        wanted_gpu = [p for p in self.requested_providers if p in GPU_PROVIDERS]
        if wanted_gpu and self.provider == "CPUExecutionProvider":
            with _cpu_fallback_lock:
                if not _cpu_fallback_warned:
                    _cpu_fallback_warned = True
                    logger.warning(
                        "GPU execution providers %s were requested but sessions run on CPUExecutionProvider "
                        "(no usable GPU/CUDA libraries); this warning is logged once per server",
                        wanted_gpu,
                    )

    def run_sync(self, inputs: Mapping[str, np.ndarray], solo: bool = False) -> dict[str, np.ndarray]:
        """One model call on the calling thread (warm-up, tests; the pool calls this too).

        `solo`: on the all-cores session when there is one (see the class docstring).
        """
        return self._named(self._run_feeds(self._feeds(inputs), solo))

    def _run_feeds(self, feeds: dict[str, np.ndarray], solo: bool = False) -> list[Any]:
        """The model call on converted feeds: the output values, in the graph's output order."""
        try:
            return self._model_call(feeds, solo)
        except Exception as exc:
            if self._run_options.terminate:  # abort(): said once by the shutdown, not as a model failure
                aborted = f"{self.label}: model call aborted: the server is shutting down"
                raise ModelCallAborted(aborted) from exc
            sticky = sticky_cuda_error(exc) if self.info.on_gpu else ""
            if sticky and self.on_device_lost is not None:
                self.on_device_lost(f"{sticky}: {str(exc)[:300]}")
            raise

    def _model_call(self, feeds: dict[str, np.ndarray], solo: bool) -> list[Any]:
        options = self._shrink_options if self.shrinks_after(feeds) else self._run_options
        if solo and self.solo_session is not None:
            values: list[Any] = self.solo_session.run(None, feeds, options)
        elif self._shared and self.info.on_gpu:
            with CAPTURE_GATE.gpu_call():  # never beside a CUDA graph capture (see ort_session)
                values = self.session.run(None, feeds, options)
        elif self._shared:
            values = self.session.run(None, feeds, options)
        else:
            runner = self._runners.get()  # one per instance thread: never blocks
            try:
                values = runner.run(feeds)
            finally:
                self._runners.put(runner)
        return values

    def compare_rows(self, inputs: Mapping[str, np.ndarray]) -> RowAgreement:
        """Row 0 of `inputs` (seeded values, not zeros: a zero input hides a difference in the order
        of a reduction) computed alone on the narrow session, against the same row inside the batch
        of all of them (2+ rows) and, where there is one, alone on the solo session
        (loader.check_rows)."""
        first = {name: value[:1] for name, value in inputs.items()}
        alone = self.run_sync(first)
        batch_diff = solo_diff = None
        if len(next(iter(inputs.values()))) > 1:
            batched = self.run_sync(inputs)
            batch_diff = max(_max_diff(alone[name], batched[name][:1]) for name in self.outputs)
        if self.solo_session is not None:
            solo = self.run_sync(first, solo=True)
            solo_diff = max(_max_diff(alone[name], solo[name]) for name in self.outputs)
        return RowAgreement(solo_diff, batch_diff)

    @property
    def intra_op_threads(self) -> int:
        """The narrow session's intra-op threads (0: ONNX Runtime's default)."""
        return int(self.session.get_session_options().intra_op_num_threads)

    @property
    def solo_intra_op_threads(self) -> int:
        """The solo session's intra-op threads; 0 without one."""
        if self.solo_session is None:
            return 0
        return int(self.solo_session.get_session_options().intra_op_num_threads)

    def drop_solo_session(self) -> None:
        """Run every batch on the narrow session(s) from now on (the solo session computes rows
        differently: loader.check_rows). At load, before any batch is served."""
        self.solo_session = None

    def _named(self, values: Sequence[Any]) -> dict[str, np.ndarray]:
        return {name: np.asarray(v) for name, v in zip(self.outputs, values, strict=True)}

    def _feeds(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            name: np.ascontiguousarray(value, dtype=self._input_dtypes[name])
            for name, value in inputs.items()
        }

    def shrinks_after(self, feeds: Mapping[str, np.ndarray]) -> bool:
        """Whether this call hands the arena's unused memory back when it ends: its inputs are far
        larger than anything warmed (a rare large image), so what it grows the arena by would
        otherwise stay allocated for the life of the process."""
        if not self._shrinkable or not self._warmed_row_values:
            return False
        return _values_per_row(feeds) > max(
            SHRINK_MIN_ROW_VALUES, SHRINK_ABOVE_WARMED * self._warmed_row_values
        )

    def shrink_arena(self, inputs: Mapping[str, np.ndarray]) -> None:
        """One call of `inputs` (a small batch) on each CPU session with arena shrinkage: hands back
        what warm-up's largest batches grew the arenas by (the first large batch regrows it)."""
        if not self._shrinkable:
            return
        feeds = self._feeds(self._prepare(None, inputs)[0])
        for session in (self.session, self.solo_session):
            if session is not None:
                session.run(None, feeds, _SHRINK_CPU)

    def _signature(
        self, key: Hashable, inputs: Mapping[str, np.ndarray]
    ) -> tuple[tuple[str | int, ...], ...]:
        """What a batch's compute cost depends on: rows (rounded up to a power of two) and shapes."""
        rows = int(next(iter(inputs.values())).shape[0])
        bucket = 1 << max(0, rows - 1).bit_length()
        rows_key = key if isinstance(key, RowsKey) else _PLAIN_ROWS
        parts = []
        for name, value in inputs.items():
            name_part, *dims = rows_key.cost_part(name, value, self.latent_dim)
            parts.append((name_part, bucket, *dims))
        return tuple(sorted(parts, key=str))

    def _prepare(
        self, key: Hashable, inputs: Mapping[str, np.ndarray]
    ) -> tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]:
        """The key's hook (batch_keys.RowsKey.prepare): the graph's feeds and outputs to add."""
        rows_key = key if isinstance(key, RowsKey) else _PLAIN_ROWS
        return rows_key.prepare(inputs, self.latent_dim)

    def measured_cost_s(self, inputs: Mapping[str, np.ndarray], key: Hashable = None) -> float | None:
        """The compute seconds a batch shaped like `inputs` took (warm-up minimum, then averaged)."""
        cost = self._costs.get(self._signature(key, inputs))
        return None if cost is None else cost.average_s

    def warm(
        self,
        inputs: Mapping[str, np.ndarray],
        times: int = 3,
        key: Hashable = None,
        check_stopping: Callable[[], None] | None = None,
    ) -> None:
        """Run a batch a few times at load: allocations settle and its compute cost is known.
        `check_stopping` runs between the calls (it raises to end a load that SIGTERM cancelled: a
        large batch of a slow model takes seconds per call)."""
        signature = self._signature(key, inputs)
        cost = self._costs.get(signature)
        if cost is not None:
            cost.average_s = None  # measured again from these calls
        fastest_s = math.inf
        for session_runner in self.session_runners:
            if not session_runner.sealed:  # every graph size of every instance, captured at load
                session_runner.capture_all(self._feeds(self._prepare(key, inputs)[0]))
        # Seed rows count as one value each, not a latent: only image rows come near the threshold.
        self._warmed_row_values = max(self._warmed_row_values, _values_per_row(inputs))
        for _ in range(times):
            if check_stopping is not None:
                check_stopping()
            self._call(key, signature, inputs)
            fastest_s = min(fastest_s, self._last_s)
        self._cost(signature).average_s = fastest_s  # a busy moment during load does not stick
        if self.solo_session is not None:
            if check_stopping is not None:
                check_stopping()
            self._call(key, signature, inputs, solo=True)  # settle the solo session too (cost not recorded)

    def _call(
        self,
        key: Hashable,
        signature: tuple[tuple[str | int, ...], ...],
        inputs: Mapping[str, np.ndarray],
        solo: bool = False,
    ) -> dict[str, np.ndarray]:
        feeds, added = self._prepare(key, inputs)
        started = time.perf_counter()
        outputs = self.run_sync(feeds, solo=solo)
        elapsed_s = time.perf_counter() - started  # the model call only: what running inline costs
        self._last_s = elapsed_s
        cost = self._cost(signature)
        if not solo and elapsed_s < cost.fastest_s:
            cost.fastest_s = elapsed_s
        previous = cost.average_s
        if previous is None or not solo:
            # Plain float stores are atomic under the GIL; a lost update only delays the average.
            # Solo calls are left out: inline runs and bulk budgets use the one-thread session.
            cost.average_s = elapsed_s if previous is None else previous + 0.1 * (elapsed_s - previous)
        finished = self._finish(outputs, added)
        with_outputs_s = time.perf_counter() - started  # the model call and the outputs' conversion
        if not solo and with_outputs_s < cost.fastest_with_outputs_s:
            cost.fastest_with_outputs_s = with_outputs_s
        return finished

    def _cost(self, signature: Signature) -> BatchCost:
        """The signature's record, made at its first call (two threads making it at once: one
        record is lost with its one measurement)."""
        cost = self._costs.get(signature)
        if cost is None:
            cost = self._costs[signature] = BatchCost()
        return cost

    def _finish(
        self, outputs: dict[str, np.ndarray], added: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """What the key's hook added (drawn latents) and the uint8 pixels next to the model's outputs,
        with whether each row is finite (encoding's check, once per batch)."""
        outputs.update(added)
        if self.pixels_range is not None and "image" in outputs:
            outputs[PIXELS_OUTPUT] = codecs.to_uint8(outputs["image"], self.pixels_range)
            outputs[FINITE_ROWS_OUTPUT] = codecs.finite_rows(outputs["image"])
        return outputs

    async def run(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The batcher's run-batch callable: one model call, on the pool unless it is tiny.

        `inputs` are the rows of `key`, which the key's hook (batch_keys.RowsKey.prepare) turns into
        the graph's feeds (seed rows -> latents, added to the outputs as DRAWN_LATENTS_OUTPUT). With
        `pixels_range` the outputs also hold PIXELS_OUTPUT, the "image" output as uint8 [N, H, W, C].
        """
        signature = self._signature(key, inputs)
        if self._runs_inline(key, signature, inputs):
            return self._call(key, signature, inputs)
        return await run_off_loop(self._executor, self._call_pooled, key, signature, inputs)

    def would_run_inline(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether `run` would run an interactive batch shaped like `inputs` (only their shapes are
        read) on the event loop now: the batcher splits a batch only where its parts run on the pool,
        side by side (Batcher._split_over_free)."""
        return self._runs_inline(key, self._signature(key, inputs), inputs)

    def _runs_inline(
        self,
        key: Hashable,
        signature: tuple[tuple[str | int, ...], ...],
        inputs: Mapping[str, np.ndarray],
        *,
        bulk: bool = False,
    ) -> bool:
        """Whether the batch is cheaper to run on the calling thread than to hand to a pool."""
        cost = self._costs.get(signature)
        if self.mode == "cuda_graph" and not all(r.sealed for r in self.session_runners):
            return False  # a graph may still be captured: never on the event loop
        slow = isinstance(key, RowsKey) and key.slow_to_prepare(self.latent_dim)  # never on the loop
        if cost is None or cost.fastest_s == math.inf or slow:
            return False
        cost_s = cost.fastest_s
        if cost_s <= self.inline_max_s:
            return True
        # Up to INLINE_BUSY_MAX_S a batch is cheaper on the loop than on a pool thread, which waits
        # for the GIL the busy event loop holds (up to Python's 5-ms switch interval at a time) --
        # unless the pool would run it on the solo session, on every core (nothing else running or
        # waiting: concurrency 1), which computes a mid-size batch faster (bench/profile.md, ninth round).
        # Not while callers overlap: a batch that has just taken every queued row finds nothing
        # waiting, but under a closed loop of 32 such solo calls shared the cores with the loop and
        # the next batch and ran 2-6x slower than inline, finishing after batches formed later
        # (bench/profile.md, thirteenth round). Larger batches keep the solo session whenever it is
        # free (_call_pooled): at c=2 a mid-size model's pair of rows computes faster on all cores.
        # The model call and the outputs' conversion both hold the loop here (SR's uint8 pixels).
        # While callers overlap, interactive batches up to OVERLAP_INLINE_MAX_S where the pool would
        # share the loop's cores: in admission order (a bulk batch keeps its background thread).
        busy_s = cost.fastest_with_outputs_s  # set with fastest_s, by the same call
        overlap = self.callers_overlap()
        if overlap and self._pool_shares_the_loops_cores and not bulk and busy_s <= OVERLAP_INLINE_MAX_S:
            return self.inline_max_s > 0
        solo_would_run = (
            self.solo_session is not None
            and self._running == 0
            and not self.more_work_queued()
            and not overlap
        )
        return self.inline_max_s > 0 and busy_s <= INLINE_BUSY_MAX_S and not solo_would_run

    async def run_bulk(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """`run` for BULK batches (see background_bulk): the model call on a background thread of
        the shared one-thread session, never the solo session. The kernel gives that thread's core to
        any normal thread that wants it (an interactive batch, the event loop, a co-located client),
        so an interactive batch that starts while only bulk batches run may take the solo session
        and compute about as fast as on an idle server. Tiny batches still run inline, as in `run`.
        Bulk calls are left out of the measured costs: a preempted call's wall time says nothing
        about the model."""
        if self._bulk_executor is None or self._bulk_prep is None:
            return await self.run(key, inputs)
        signature = self._signature(key, inputs)
        if self._runs_inline(key, signature, inputs, bulk=True):
            return self._call(key, signature, inputs)
        loop = asyncio.get_running_loop()
        with off_loop_work():
            feeds, added = await loop.run_in_executor(self._bulk_prep, self._bulk_feeds, key, inputs)
            values = await loop.run_in_executor(self._bulk_executor, self._bulk_compute, feeds)
            return await loop.run_in_executor(self._bulk_prep, self._bulk_outputs, values, added)

    def _bulk_feeds(
        self, key: Hashable, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        prepared, added = self._prepare(key, inputs)
        return self._feeds(prepared), added

    def _bulk_compute(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        """On a background thread: the model call only (ORT releases the GIL inside)."""
        return self._run_feeds(feeds)

    def _bulk_outputs(self, values: list[Any], added: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._finish(self._named(values), added)

    def _call_pooled(
        self, key: Hashable, signature: tuple[tuple[str | int, ...], ...], inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """A pool thread's batch: on the solo session when no other batch runs or waits right now."""
        with self._running_lock:
            solo = self._running == 0 and self.solo_session is not None and not self.more_work_queued()
            self._running += 1
        try:
            return self._call(key, signature, inputs, solo)
        finally:
            with self._running_lock:
                self._running -= 1

    def close(self) -> None:
        """Wait for the batches still computing, then release the pools. Blocks: off the event loop."""
        self.closed = True
        self._executor.shutdown(wait=True, cancel_futures=False)
        for pool in (self._bulk_executor, self._bulk_prep):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=False)
        for session_runner in self.session_runners:
            session_runner.close()

    def abort(self) -> None:
        """End the model calls still running (shutdown's deadline): ONNX Runtime's terminate flag,
        checked before each node (a Loop's every iteration included), fails them at their next node,
        so a `close` waiting for them returns; a call made afterwards fails at once. One node's
        kernel itself is not interrupted."""
        self.closed = True
        self._run_options.terminate = True
        self._shrink_options.terminate = True
        for session_runner in self.session_runners:
            session_runner.abort()


_PLAIN_ROWS = RowsKey()  # rows under a key that is not a batch_keys key (tests, warm-up): plain tensors


def _lower_thread_priority() -> None:
    """Make the calling thread a background thread (Linux schedules threads, not processes):
    SCHED_IDLE where the kernel allows it, else niceness +19 (BULK_THREAD_NICE)."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError) as exc:
        logger.debug("no SCHED_IDLE for the bulk thread (%r); raising its niceness instead", exc)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BULK_THREAD_NICE))
    except (AttributeError, OSError) as exc:  # no per-thread priorities here: bulk runs at normal priority
        logger.debug("cannot lower the bulk thread's priority: %r", exc)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |a - b| over two outputs: 0.0 where they hold the same values (NaN where both
    have NaN), inf where they differ in shape or in where their NaNs are."""
    if a.shape != b.shape:
        return math.inf
    x, y = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(x - y)
    diff[(x == y) | (np.isnan(x) & np.isnan(y))] = 0.0
    if np.isnan(diff).any():
        return math.inf
    return float(diff.max(initial=0.0))


def _values_per_row(arrays: Mapping[str, np.ndarray]) -> int:
    """Input values one row of a batch holds, over every input with a batch axis."""
    return sum(int(v.size) // max(1, len(v)) for v in arrays.values() if v.ndim)


def _with_threads(config: RuntimeConfig, intra_op_threads: int) -> RuntimeConfig:
    from dataclasses import replace

    return replace(config, intra_op_threads=intra_op_threads)
