"""Triton-style inference statistics of one model version (KServe v2 ModelStatistics).

Triton's definitions: for each successful request, `success` is its whole duration, `queue` the
time it waited for a batch, `compute_input` / `compute_infer` / `compute_output` the phases of the
execution that ran it (a request is charged its batch's time, once, however many rows the batch
held); `fail` counts and times failed requests; `inference_count` counts rows, `execution_count`
model executions (batches), and `batch_stats` the executions and their compute time per batch size.
perf_analyzer reports "overhead" = success - queue - compute, so for every request
queue + compute_input + compute_infer + compute_output <= success must hold. Here the phases are
disjoint parts of the call's own wall time (CallTiming.phases), never sums over rows or batches:

    started ... first submit | queue, compute of its batches | last batch done ... ended
    compute_input <= this    | queue / compute_infer         | compute_output <= this

compute_input is the time spent decoding the request's inputs (images, tensors) and
compute_output encoding its outputs, each bounded by its window; the rest of the call (parsing,
validation, resolving the model, gaps) is what perf_analyzer shows as server overhead, as in
Triton, where the frontend's request handling is overhead too. A request served wholly from the
image cache counts as Triton counts a response-cache hit: success, queue and cache_hit, no compute
(the compute counts are the computed requests'); one that looked the cache up and computed counts in
cache_miss too. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += round(seconds * 1e9)


@dataclass(slots=True)
class CallTiming:
    """The batcher submissions of one RPC: when the first entered, when the last came back, and
    the queue and compute seconds of each."""

    first_submit: float | None = None
    last_done: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    input_s: float = 0.0  # decoding the request's inputs (encoding.Codec.decode, KServe tensors)
    output_s: float = 0.0  # encoding its outputs (encoding.Codec.encode, KServe tensors)
    cache_s: float | None = None  # looking its images up in the image cache and storing them

    def cache_done(self, seconds: float) -> None:
        """Time spent looking up or storing images in the image cache (core.sample)."""
        self.cache_s = (self.cache_s or 0.0) + seconds

    def submitted(self, entered: float, dispatched: float, done: float) -> None:
        """One submission: entered the batcher, its last batch dispatched, its result back."""
        dispatched = min(max(dispatched, entered), done)  # unknown (0.0) or skewed: within the call
        if self.first_submit is None or entered < self.first_submit:
            self.first_submit = entered
        self.last_done = max(self.last_done, done)
        self.queue_s += dispatched - entered
        self.infer_s += max(0.0, done - dispatched)

    def phases(self, started: float, ended: float) -> tuple[float, float, float, float]:
        """(compute_input, queue, compute_infer, compute_output) seconds of a call that ran from
        `started` to `ended`: disjoint, so their sum is at most ended - started."""
        whole = max(0.0, ended - started)
        if self.first_submit is None:  # nothing computed (every image from the cache)
            compute_input = min(self.input_s, whole)
            return compute_input, 0.0, 0.0, min(self.output_s, whole - compute_input)
        window = max(0.0, self.last_done - self.first_submit)
        queue, infer = self.queue_s, self.infer_s
        if queue + infer > window:
            # Submissions that overlap (a stream's chunks computed ahead, tiles of several shapes)
            # share the wall time they overlap in, in proportion.
            scale = window / (queue + infer)
            queue, infer = queue * scale, infer * scale
        before = max(0.0, self.first_submit - started)
        after = max(0.0, ended - max(self.last_done, self.first_submit))
        return min(self.input_s, before), queue, infer, min(self.output_s, after)


@dataclass(slots=True)
class InferStats:
    """What ModelStatistics reports for one model version, accumulated as calls and batches end."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)  # successes wholly from the image cache
    cache_miss: Duration = field(default_factory=Duration)  # successes that looked it up and computed
    inference_count: int = 0
    execution_count: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> executions, compute
    last_inference_ms: int = 0  # ms since the epoch of the last successful request

    def request_done(self, ok: bool, started: float, ended: float, timing: CallTiming) -> None:
        duration_s = max(0.0, ended - started)
        if not ok:
            self.fail.add(duration_s)
            return
        self.success.add(duration_s)
        self.last_inference_ms = int(time.time() * 1000)
        if timing.cache_s is not None:
            cache_s = min(timing.cache_s, duration_s)
            if timing.first_submit is None:
                # Every image from the image cache: as Triton counts a response-cache hit, queue
                # (none here) and cache_hit, no compute (its counts are the computed requests').
                self.queue.add(0.0)
                self.cache_hit.add(cache_s)
                return
            self.cache_miss.add(cache_s)
        compute_input, queue, infer, compute_output = timing.phases(started, ended)
        self.queue.add(queue)
        self.compute_input.add(compute_input)
        self.compute_infer.add(infer)
        self.compute_output.add(compute_output)

    def batch_done(self, rows: int, compute_s: float) -> None:
        """One successful model execution of `rows` rows."""
        self.execution_count += 1
        self.inference_count += rows
        per_size = self.batches.get(rows)
        if per_size is None:
            per_size = self.batches[rows] = Duration()
        per_size.add(compute_s)
