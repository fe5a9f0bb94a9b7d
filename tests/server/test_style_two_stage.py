"""A style generator's calls span two models: its style_mapping (z -> w), then its synthesis (ws ->
image). These check the second stage through the core (style_sampling.py) with tiny models
(style_models.py): what the synthesis queue can take is asked before the mapping's work is paid."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_support import fill_queue, hold_runs, run_with_core
from style_models import NUM_LAYERS, W_DIM, write_style_models

from genserve_server import style_sampling, validate
from genserve_server.batch_keys import LatentRows, StyleRows
from genserve_server.batcher import Lane
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import DeadlineExceeded, ResourceExhausted
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository

PNG = validate.output_spec(1, 0, None, False)
# One row of a synthesis request, as fill_queue queues them into a held batcher.
ONE_W = {"ws": np.zeros((1, NUM_LAYERS, W_DIM), np.float32)}


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


def style_call(
    core: GenerationCore, name: str, method: str, how: str, deadline: float | None = None
) -> Awaitable[Any]:
    """One call of `method` to the style generator `name` through the core, released at its end."""

    async def run() -> Any:
        call = Call(method, "test", time.monotonic(), core.metrics.unresolved(), deadline=deadline)
        mv = core.resolve(call, name, "", ("style_generator",), method)
        try:
            if how == "sample":
                return await core.generate(mv, call, None, PNG, Lane.INTERACTIVE, seeds=[1, 2, 3])
            if how == "mix":
                return await style_sampling.mix(
                    core, mv, call, [1, 2, 3], [4, 5, 6], [2, 2, 2], [None] * 3, PNG, Lane.INTERACTIVE
                )
            start = np.zeros(8, np.float32)
            end = np.ones(8, np.float32)
            return await style_sampling.interpolate(core, mv, call, start, end, 3, None, PNG)
        finally:
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()

    return run()


@pytest.mark.parametrize("how", ["sample", "mix", "interpolate"])
def test_a_style_call_keeps_room_in_its_synthesis_queue_while_its_mapping_runs(
    tmp_path: Path, how: str
) -> None:
    """A style generator's rows go to its mapping's batcher first, and to the synthesis batcher only
    once they are mapped: synthesis traffic that filled the synthesis queue meanwhile refused the call
    RESOURCE_EXHAUSTED after its mapping work was done (the work lost, the client told to retry).
    The call's synthesis rows are held from admission, as a code prior's decoder rows are."""
    names = write_style_models(tmp_path)

    async def body(repo: Repository, core: GenerationCore) -> None:
        mapping = repo.get(names["mapping"]).resolve("").batcher
        synthesis = repo.get(names["generator"]).resolve("").batcher
        assert mapping is not None and synthesis is not None
        free_mapping = hold_runs(mapping)
        free_synthesis = hold_runs(synthesis)
        call = asyncio.ensure_future(style_call(core, names["generator"], "Sample", how))
        # The call's rows are in the mapping's (held) batch: admitted, not yet at the synthesis.
        await until(lambda: mapping._batches_in_flight > 0 or call.done())
        assert not call.done(), call.exception()
        others = await fill_queue(synthesis, StyleRows(), ONE_W)
        filled = synthesis.queued_rows
        free_mapping.set()
        try:
            await until(lambda: call.done() or synthesis.queued_rows > filled)
            assert not call.done() or call.exception() is None, call.exception()
        finally:
            free_synthesis.set()
            done = await asyncio.gather(call, *others, return_exceptions=True)
        assert not any(isinstance(d, BaseException) for d in done), done

    run_with_core(tmp_path, body)


def test_a_style_call_is_refused_before_its_mapping_runs_when_the_synthesis_queue_is_full(
    tmp_path: Path,
) -> None:
    """A full synthesis queue refuses the call at once (RESOURCE_EXHAUSTED naming the generator's
    queue), before any of its rows reach the mapping."""
    names = write_style_models(tmp_path)

    async def body(repo: Repository, core: GenerationCore) -> None:
        mapping = repo.get(names["mapping"]).resolve("").batcher
        synthesis = repo.get(names["generator"]).resolve("").batcher
        assert mapping is not None and synthesis is not None
        free = hold_runs(synthesis)
        mapped: list[int] = []
        run = mapping._run_batch

        async def counted(key: Any, inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            mapped.append(1)
            return await run(key, inputs)

        mapping._run_batch = counted
        others = await fill_queue(synthesis, StyleRows(), ONE_W)
        try:
            with pytest.raises(ResourceExhausted, match=f"{names['generator']}.*queue full"):
                await style_call(core, names["generator"], "Sample", "sample")
            assert mapped == []
        finally:
            free.set()
            await asyncio.gather(*others)

    run_with_core(tmp_path, body)


def test_a_style_calls_rows_computing_in_the_synthesis_no_longer_take_its_queue(tmp_path: Path) -> None:
    """The call's synthesis rows are held from before its mapping to its synthesis: once they are
    taken into a synthesis batch they are no longer in the queue, and the queue's whole room is
    there for other requests while that batch computes (as before the rows were reserved)."""
    names = write_style_models(tmp_path)

    async def body(repo: Repository, core: GenerationCore) -> None:
        synthesis = repo.get(names["generator"]).resolve("").batcher
        assert synthesis is not None
        free = hold_runs(synthesis)
        call = asyncio.ensure_future(style_call(core, names["generator"], "Sample", "sample"))
        await until(lambda: synthesis._batches_in_flight > 0 or call.done())
        assert not call.done(), call.exception()
        assert synthesis.queued_rows == 0
        whole = {"ws": np.zeros((synthesis.max_queue_size, NUM_LAYERS, W_DIM), np.float32)}
        other = asyncio.ensure_future(
            synthesis.submit(StyleRows(), whole, synthesis.max_queue_size, caller=None)
        )
        for _ in range(3):
            await asyncio.sleep(0)
        try:
            assert not other.done() or other.exception() is None, other.exception()
        finally:
            free.set()
            done = await asyncio.gather(call, other, return_exceptions=True)
        assert not any(isinstance(d, BaseException) for d in done), done

    run_with_core(tmp_path, body)


def test_a_style_call_whose_deadline_passes_in_its_mappings_queue_is_a_drop_of_the_generator_called(
    tmp_path: Path,
) -> None:
    """docs/metrics.md: genserve_requests_dropped_total counts every call of a model that ends
    DEADLINE_EXCEEDED, under the model its client called, as genserve_requests_total does. A style
    call whose deadline passed while its rows waited in its mapping's queue was counted under the
    mapping (drops without requests there, requests without drops under the generator)."""
    names = write_style_models(tmp_path)
    metrics = Metrics(enabled=True)

    def dropped(model: str) -> float:
        value = metrics.registry.get_sample_value(
            "genserve_requests_dropped_total", {"model": model, "version": "1", "reason": "deadline"}
        )
        return value or 0.0

    async def body(repo: Repository, core: GenerationCore) -> None:
        mapping = repo.get(names["mapping"]).resolve("").batcher
        assert mapping is not None
        free = hold_runs(mapping)
        blocker = asyncio.ensure_future(
            mapping.submit(LatentRows(), {"z": np.zeros((1, 8), np.float32)}, 1, caller=None)
        )
        await until(lambda: mapping._batches_in_flight > 0)
        deadline = time.monotonic() + 0.3  # its rows reach the mapping's queue before it passes
        call = asyncio.ensure_future(style_call(core, names["generator"], "Sample", "sample", deadline))
        await until(lambda: mapping.queued_rows > 0 or call.done())
        assert not call.done(), call.exception()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        free.set()
        with pytest.raises(DeadlineExceeded):
            await call
        await blocker
        assert (dropped(names["generator"]), dropped(names["mapping"])) == (1, 0)

    run_with_core(tmp_path, body, metrics)


def test_interpolate_maps_its_two_ends_where_the_mappings_queue_holds_one_row(tmp_path: Path) -> None:
    """genserve.proto InterpolateRequest: steps is bounded by the synthesis network's queue, the
    mapping maps only the two ends. A mapping whose batching.max_queue_size is 1 (max_batch_size 1)
    refused every Interpolate INVALID_ARGUMENT "the request needs 2 items, more than the whole queue
    holds; split it into smaller requests", naming no field, which no client could split: each end
    is mapped on its own there, the path the same as that of two ends mapped together."""
    names = write_style_models(tmp_path, max_batch_size=1, mapping_queue=1)
    out = validate.output_spec(5, 0, None, True)  # TENSOR_F32, return_latents (each image's w)
    start = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    end = np.linspace(2.0, -0.5, 8, dtype=np.float32)

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("Interpolate", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["generator"], "", ("style_generator",), "Interpolate")
        try:
            images, path, _ = await style_sampling.interpolate(core, mv, call, start, end, 3, 0.5, out)
            ends = []
            for z in (start, end):  # each end alone, as a Sample of its latent with the same psi
                one = await core.generate(mv, call, None, out, Lane.INTERACTIVE, z=z[np.newaxis], psi=0.5)
                ends.append(one.images[0].data)
        finally:
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        assert path.shape == (3, W_DIM)
        assert [images[0].data, images[-1].data] == ends

    run_with_core(tmp_path, body)
