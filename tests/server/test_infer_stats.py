"""KServe statistics as Triton defines them: per request, the phases are disjoint parts of its time."""

from __future__ import annotations

import pytest

from genserve_server.infer_stats import CallTiming, InferStats


def test_one_submission_splits_the_call_into_input_queue_infer_output() -> None:
    timing = CallTiming(input_s=0.25, output_s=0.125)
    timing.submitted(entered=1.0, dispatched=1.5, done=3.0)
    # What is neither decoding, queue, model nor encoding (parsing, validation) is overhead.
    assert timing.phases(started=0.5, ended=3.25) == (0.25, 0.5, 1.5, 0.125)


def test_decoding_and_encoding_count_only_within_their_windows() -> None:
    # Encodes of a stream's chunks overlap the compute of the next ones: only the tail counts.
    timing = CallTiming(input_s=5.0, output_s=5.0)
    timing.submitted(entered=1.0, dispatched=1.5, done=3.0)
    assert timing.phases(started=0.5, ended=3.25) == (0.5, 0.5, 1.5, 0.25)
    cached = CallTiming(input_s=0.5, output_s=5.0)  # nothing submitted: every image from the cache
    assert cached.phases(started=0.0, ended=2.0) == (0.5, 0.0, 0.0, 1.5)


def test_overlapping_submissions_share_their_wall_time_and_never_exceed_the_call() -> None:
    # Three chunks of a stream: each queued while the one before computed.
    timing = CallTiming()
    for k in range(3):
        timing.submitted(entered=1.0 + k, dispatched=2.0 + k, done=3.0 + k)
    timing.input_s = timing.output_s = 2.0
    compute_input, queue, infer, output = timing.phases(started=0.0, ended=6.0)
    assert (compute_input, output) == (1.0, 1.0)
    assert queue + infer == pytest.approx(4.0)  # the window from the first entry to the last result
    assert queue == pytest.approx(infer)  # 3 s each before scaling: shared in proportion


def test_stats_count_requests_and_executions_apart() -> None:
    stats = InferStats()
    timing = CallTiming(input_s=1.0, output_s=0.5)
    timing.submitted(1.0, 1.25, 2.0)
    stats.request_done(True, 0.0, 2.5, timing)
    stats.request_done(False, 0.0, 1.0, CallTiming())
    stats.batch_done(4, 0.5)
    stats.batch_done(4, 0.25)
    stats.batch_done(1, 0.125)
    assert (stats.success.count, stats.fail.count) == (1, 1)
    parts = (stats.queue, stats.compute_input, stats.compute_infer, stats.compute_output)
    assert [p.count for p in parts] == [1, 1, 1, 1]
    assert sum(p.ns for p in parts) == stats.success.ns == 2_500_000_000
    assert (stats.execution_count, stats.inference_count) == (3, 9)
    assert {size: (d.count, d.ns) for size, d in stats.batches.items()} == {
        4: (2, 750_000_000),
        1: (1, 125_000_000),
    }
    assert stats.last_inference_ms > 0


def test_an_unknown_dispatch_time_never_makes_a_phase_longer_than_the_call() -> None:
    timing = CallTiming()
    timing.submitted(entered=1.0, dispatched=0.0, done=2.0)  # a BatchResult without dispatched_at
    phases = timing.phases(started=0.5, ended=2.5)
    assert all(p >= 0 for p in phases) and sum(phases) <= 2.0


def test_a_failed_batch_counts_as_a_batch_failure_not_an_execution() -> None:
    """docs/kserve.md: inference_count is the rows computed and execution_count the model executions:
    a model call that raised computed nothing (genserve_batch_failures_total counts it)."""
    from genserve_server.metrics import BatchMetrics, Metrics

    metrics = Metrics()
    mm = metrics.for_model("gen", "1", 8, "generator")
    observer = BatchMetrics(mm)
    observer.on_batch(4, 2, 0.5, ok=False)
    stats = mm.infer_stats
    assert (stats.execution_count, stats.inference_count, stats.batches) == (0, 0, {})
    observer.on_batch(3, 1, 0.25, ok=True)
    assert (stats.execution_count, stats.inference_count) == (1, 3)
    assert {size: (d.count, d.ns) for size, d in stats.batches.items()} == {3: (1, 250_000_000)}
    failures = metrics.registry.get_sample_value(
        "genserve_batch_failures_total", {"model": "gen", "version": "1"}
    )
    assert failures == 1.0
