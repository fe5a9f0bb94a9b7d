"""What a code prior call counts in genserve_requests_rejected_total / genserve_requests_dropped_total
(docs/metrics.md): a call whose deadline passed before it reached a queue or row budget is a
`deadline` drop, full or not, never `queue_full`; a call that ends with an error is counted under
that status, not also as a drop. Through the core with tiny synthetic priors (code_models.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from code_models import write_code_models
from server_support import fill_queue, gate, hold_runs, run_with_core

from genserve_server import code_sampling, validate
from genserve_server.batch_keys import CodeRows
from genserve_server.code_sampling import CodeSamples
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import DeadlineExceeded, Internal
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository
from genserve_server.step_sampler import SamplingOptions

GRID = (6, 6)
MAX_ROWS = 8
PNG = validate.output_spec(1, 0, None, False)


def counted(metrics: Metrics, family: str, model: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(family, {"model": model, "version": "1", "reason": reason})
    return value or 0.0


def ledger(metrics: Metrics, *models: str) -> dict[str, float]:
    """queue_full refusals and deadline/cancelled drops, summed over `models`."""
    return {
        "queue_full": sum(
            counted(metrics, "genserve_requests_rejected_total", m, "queue_full") for m in models
        ),
        "deadline": sum(counted(metrics, "genserve_requests_dropped_total", m, "deadline") for m in models),
        "cancelled": sum(counted(metrics, "genserve_requests_dropped_total", m, "cancelled") for m in models),
    }


async def sample(
    core: GenerationCore,
    name: str,
    seeds: list[int],
    labels: list[int] | None = None,
    *,
    tops: np.ndarray | None = None,
    deadline: float | None = None,
) -> CodeSamples:
    call = Call("SampleCodes", "test", time.monotonic(), core.metrics.unresolved(), deadline=deadline)
    mv = core.resolve(call, name, "", ("code_prior",), "SampleCodes")
    try:
        return await code_sampling.sample_codes(core, mv, call, seeds, labels, tops, SamplingOptions(), PNG)
    finally:
        if call.batcher is not None:
            call.batcher.release()
        call.release_uses()


def test_a_call_past_its_deadline_that_finds_its_decoders_queue_full_is_a_deadline_drop(
    tmp_path: Path,
) -> None:
    """The decoder's queue is held from admission (Batcher.reserved): a call whose deadline had
    passed when it got there was refused `queue_full` when the queue was full, though its client
    gets DEADLINE_EXCEEDED (the boundary sends nothing past the deadline) and the same call
    finding room is a `deadline` drop. docs/metrics.md: never `queue_full`."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    metrics = Metrics(enabled=True)
    models = (names["prior"], names["decoder"])

    async def body(repo: Repository, core: GenerationCore) -> None:
        batcher = repo.get(names["decoder"]).resolve("").batcher
        free = hold_runs(batcher)
        others = await fill_queue(batcher, CodeRows(), {"codes": np.zeros((1, *GRID), np.int64)})
        before = ledger(metrics, *models)
        try:
            with pytest.raises(DeadlineExceeded):
                await sample(core, names["prior"], [1, 2], [0, 0], deadline=time.monotonic() - 0.1)
        finally:
            free.set()
            await asyncio.gather(*others)
        after = ledger(metrics, *models)
        assert {k: after[k] - before[k] for k in after} == {"queue_full": 0, "deadline": 1, "cancelled": 0}

    run_with_core(tmp_path, body, metrics)


def test_a_two_level_call_past_its_deadline_that_finds_the_bottom_budget_full_is_a_deadline_drop(
    tmp_path: Path,
) -> None:
    """The bottom prior's row budget is asked before the top level runs (StepScheduler.reserved): a
    call already past its deadline that found it full was refused `queue_full`, where the same call
    reaching StepScheduler.sample is a `deadline` drop (commit 11c19ad covered sample() only)."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    metrics = Metrics(enabled=True)
    models = (names["chain"], names["top"], names["decoder2"])

    async def body(repo: Repository, core: GenerationCore) -> None:
        bottom = core.stepper(repo.get(names["chain"]).resolve(""))
        reached, go = gate(bottom, at_step=2)  # the full call's rows stay running
        tops = np.zeros((MAX_ROWS, GRID[0] // 2, GRID[1] // 2), np.int64)
        full = asyncio.ensure_future(sample(core, names["chain"], list(range(MAX_ROWS)), tops=tops))
        await reached.wait()
        assert bottom.rows == MAX_ROWS
        before = ledger(metrics, *models)
        try:
            with pytest.raises(DeadlineExceeded):
                await sample(core, names["chain"], [100], deadline=time.monotonic() - 0.1)
        finally:
            go.set()
            await full
        after = ledger(metrics, *models)
        assert {k: after[k] - before[k] for k in after} == {"queue_full": 0, "deadline": 1, "cancelled": 0}

    run_with_core(tmp_path, body, metrics)


def test_a_code_stream_ended_by_a_failed_preview_is_not_also_counted_as_a_drop(tmp_path: Path) -> None:
    """A SampleCodesStream whose preview decode fails ends with that error (INTERNAL: counted under
    it by the boundary); its rows still in the prior's running set then left as if its client had
    gone away, counted in genserve_requests_dropped_total{reason="cancelled"} as well: one call in
    two outcomes. (A SampleStream's chunks ahead that a failed chunk ends are not drops: WITHDRAWN.)"""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    metrics = Metrics(enabled=True)
    models = (names["prior"], names["decoder"])

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        run = scheduler._run

        async def slow(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            await asyncio.sleep(0.005)  # the sampling runs on while the preview is decoded
            return await run(inputs)

        scheduler._run = slow
        batcher = repo.get(names["decoder"]).resolve("").batcher

        async def broken(key: Any, inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            raise RuntimeError("decoder failed")

        batcher._run_batch = broken
        before = ledger(metrics, *models)
        call = Call("SampleCodesStream", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["prior"], "", ("code_prior",), "SampleCodesStream")
        try:
            stream = code_sampling.sample_codes_stream(
                core, mv, call, [1, 2], [0, 0], None, SamplingOptions(), PNG
            )
            with pytest.raises(Internal):
                async for _ in stream:
                    pass
        finally:
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        await asyncio.sleep(0.1)  # its rows have left the running set by now
        assert scheduler.rows == 0
        after = ledger(metrics, *models)
        assert {k: after[k] - before[k] for k in after} == {"queue_full": 0, "deadline": 0, "cancelled": 0}

    run_with_core(tmp_path, body, metrics)


def test_a_failed_prior_step_is_a_model_call_in_the_batch_histograms(tmp_path: Path) -> None:
    """docs/metrics.md: for a prior a step is one batch, and genserve_batch_size counts every model
    call (a failed one too), genserve_compute_duration_seconds each call's duration. A step that
    raised counted only genserve_batch_failures_total: failures with no model call behind them."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    metrics = Metrics(enabled=True)
    labels = {"model": names["prior"], "version": "1"}

    def value(name: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))

        async def broken(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            raise RuntimeError("prior failed")

        scheduler._run = broken
        with pytest.raises(Internal, match="model call failed"):
            await sample(core, names["prior"], [1, 2, 3], [0, 0, 0])

    run_with_core(tmp_path, body, metrics)
    assert value("genserve_batch_failures_total") == 1
    assert value("genserve_batch_size_count") == 1
    assert value("genserve_batch_size_sum") == 3
    assert value("genserve_batch_requests_count") == 1
    assert value("genserve_compute_duration_seconds_count") == 1


def test_a_call_cancelled_while_its_step_fails_is_counted_as_a_cancelled_drop(tmp_path: Path) -> None:
    """docs/metrics.md: a code prior's rows leaving its running set because their caller went away
    are a `cancelled` drop. A caller that left while the step holding its rows ran was counted when
    the step succeeded, but not when that step failed: its rows left uncounted."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        entered, fail = asyncio.Event(), asyncio.Event()

        async def broken(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            entered.set()
            await fail.wait()
            raise RuntimeError("prior failed")

        scheduler._run = broken
        task = asyncio.ensure_future(sample(core, names["prior"], [1, 2], [0, 0]))
        await entered.wait()
        task.cancel()  # the caller goes away while its step runs
        with pytest.raises(asyncio.CancelledError):
            await task
        fail.set()
        for _ in range(100):
            if scheduler._task is None:
                break
            await asyncio.sleep(0.01)
        assert scheduler.rows == 0
        assert scheduler.stats.cancelled == 2

    run_with_core(tmp_path, body, metrics)
    assert ledger(metrics, names["prior"])["cancelled"] == 1


def test_a_two_level_call_whose_deadline_passes_in_its_top_priors_steps_is_a_drop_of_the_prior_called(
    tmp_path: Path,
) -> None:
    """docs/metrics.md: a call's drop counts under the model its client called, as its
    genserve_requests_total does. A two-level call (SampleCodes on a chained prior) whose deadline
    passed while its top prior's steps ran was counted under the top prior."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        top = core.stepper(repo.get(names["top"]).resolve(""))
        reached, go = gate(top, at_step=2)
        deadline = time.monotonic() + 0.1
        call = asyncio.ensure_future(sample(core, names["chain"], [1, 2], deadline=deadline))
        await reached.wait()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        go.set()
        with pytest.raises(DeadlineExceeded):
            await call

    run_with_core(tmp_path, body, metrics)
    drops = {m: ledger(metrics, names[m])["deadline"] for m in ("chain", "top", "decoder2")}
    assert drops == {"chain": 1, "top": 0, "decoder2": 0}
