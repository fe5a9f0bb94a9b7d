"""A SuperResolve, Translate or KServe ModelInfer (on a super-resolution or image-to-image model) that
leaves (cancelled, its deadline) while one of its jobs runs on the codec pool (decoding its images,
blending its tiles, encoding its outputs, building a large ModelInfer response) holds its working set
until that job has ended: the job's buffers (decoded images, blend canvases, the encode's copies, the
model's outputs a response is built from) are alive until then, and the working set counts them. A
job that raises ends too: the working set is given back then."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from cancel_support import (
    SR_CARD,
    cancel_while_held,
    held_on_the_pool,
    infer_request,
    release_call,
    released_within,
    write_image_model,
)
from server_support import run_with_core, super_resolution_graph, write_model
from test_translate_working_set import gradient_png

from genserve.v1 import types_pb2 as tpb
from genserve_server import encoding, kserve, tiling, validate, wire
from genserve_server.boundary import Boundary
from genserve_server.core import Call, GenerationCore
from genserve_server.repository import Repository

PNG = tpb.IMAGE_FORMAT_PNG

# (the module holding the pool job's function, its name): each runs on the codec pool for a 64x64 PNG
# in, PNG out (decode_sync: a PNG; tiling.blend: several tiles; encode_sync: 128x128 RGB as PNG).
STAGES = {
    "decode": (encoding, "decode_sync"),
    "blend": (tiling, "blend"),
    "encode": (encoding, "encode_sync"),
}
# A ModelInfer's response of wire.OFF_LOOP_BYTES or more is built on the codec pool (kserve._response).
INFER_STAGES = {"response": (wire, "with_bytes_field")}


def cancelled_while_held(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
    rpc: str,
    model: str,
    kind: str,
    raises: bool = False,
) -> None:
    image = tpb.Image(format=PNG, data=gradient_png(64))
    out = validate.output_spec(PNG, 0, None, False)
    module, name = {**STAGES, **INFER_STAGES}[stage]

    async def body(repo: Repository, core: GenerationCore) -> None:
        budget = core.sr_working_set if kind == "super_resolution" else core.translate_working_set
        infer = kserve.InferenceService(repo, core, Boundary(core.metrics))

        def start(call: Call) -> Any:
            if rpc == "ModelInfer":
                return infer._do_infer(infer_request(model, kind), call)
            mv = core.resolve(call, model, "", (kind,), rpc)
            if rpc == "SuperResolve":
                return core.upscale(mv, call, [image], 0, None, out)
            return core.translate(mv, call, [image], out)

        call = Call(rpc, "test", time.monotonic(), core.metrics.unresolved(), unary=True)
        with held_on_the_pool(monkeypatch, module, name, raises) as (entered, go):
            task = asyncio.create_task(start(call))
            try:
                await cancel_while_held(task, entered, budget, go, f"its {stage}")
            finally:
                go.set()
                release_call(call)
        # The next call is served, and gives its bytes back.
        served = Call(rpc, "next", time.monotonic(), core.metrics.unresolved(), unary=True)
        try:
            done = await start(served)
            if rpc == "ModelInfer":
                assert isinstance(done, bytes) and len(done) >= wire.OFF_LOOP_BYTES
            else:
                assert len(done.images) == 1
            assert budget.held == 0
        finally:
            release_call(served)

    run_with_core(root, body)


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_cancelled_super_resolve_holds_its_working_set_until_its_pool_job_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """It gave its working set back as it was cancelled, while its decode, blend or encode went on
    on the codec pool: the budget admitted other calls beside buffers it counted as held."""
    model = write_image_model(tmp_path, "super_resolution")
    cancelled_while_held(tmp_path, monkeypatch, stage, "SuperResolve", model, "super_resolution")


@pytest.mark.parametrize("stage", ["decode", "encode"])
def test_a_cancelled_translate_holds_its_working_set_until_its_pool_job_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """As SuperResolve's (a Translate blends nothing)."""
    model = write_image_model(tmp_path, "image_to_image")
    cancelled_while_held(tmp_path, monkeypatch, stage, "Translate", model, "image_to_image")


@pytest.mark.parametrize("kind", ["super_resolution", "image_to_image"])
def test_a_cancelled_model_infer_holds_its_working_set_until_its_response_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A ModelInfer on a super-resolution or image-to-image model, cancelled while its large response
    was built on the codec pool, gave its working set back at once: the job still held the model's
    outputs the working set counts."""
    model = write_image_model(tmp_path, kind)
    cancelled_while_held(tmp_path, monkeypatch, "response", "ModelInfer", model, kind)


@pytest.mark.parametrize(
    ("rpc", "stage"),
    [
        ("SuperResolve", "decode"),
        ("SuperResolve", "blend"),
        ("Translate", "encode"),
        ("ModelInfer", "response"),
    ],
)
def test_a_cancelled_call_whose_pool_job_raises_gives_its_working_set_back_once_it_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rpc: str, stage: str
) -> None:
    """A pool job that raises resolves the call's `computing` as one that returns: the working set is
    not held for ever (nor is a later call left waiting for it)."""
    kind = "super_resolution" if rpc == "SuperResolve" else "image_to_image"
    model = write_image_model(tmp_path, kind)
    cancelled_while_held(tmp_path, monkeypatch, stage, rpc, model, kind, raises=True)


class PartFailed(Exception):
    """What the batch of one part (one tile shape) of a SuperResolve raises in the test below."""


def test_a_super_resolve_whose_part_fails_holds_its_working_set_until_its_other_parts_batch_has_ended(
    tmp_path: Path,
) -> None:
    """Images of two sizes are two parts (tiles of two shapes, batched apart: core.gather_or_cancel).
    Where one part's batch failed while the other's still computed, the call gave its working set back
    as the error went out: gather_or_cancel cancelled the sibling and raised at once, before the
    sibling had left (and added its batch to call.computing), so holding_working_set found nothing to
    wait for while that batch still held the call's tiles and outputs."""
    config = {"instances": 2, "batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0}}
    write_model(tmp_path, "sr", "super_resolution", super_resolution_graph(2), SR_CARD, config=config)
    out = validate.output_spec(tpb.IMAGE_FORMAT_RAW_UINT8, 0, None, False)

    def raw(side: int) -> tpb.Image:
        size = side * side * 3
        return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(size), shape=[side, side, 3])

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("SuperResolve", "test", time.monotonic(), core.metrics.unresolved(), unary=True)
        mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
        batcher = mv.batcher
        assert batcher is not None
        run_batch = batcher._run_batch
        held, go = asyncio.Event(), asyncio.Event()
        shapes: list[Any] = []

        async def one_fails_one_held(key: Any, inputs: Any) -> Any:
            shapes.append(key)
            if len(shapes) == 1:  # the first part's batch: held until `go`
                held.set()
                await go.wait()
                return await run_batch(key, inputs)
            await held.wait()
            raise PartFailed("the other part's batch")

        batcher._run_batch = one_fails_one_held
        budget = core.sr_working_set
        try:
            task = asyncio.create_task(core.upscale(mv, call, [raw(16), raw(48)], 0, None, out))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), 10)
            assert task.done() and task.exception() is not None, "the call did not fail"
            assert held.is_set() and not go.is_set()
            assert budget.held > 0, "given back while its other part's batch still computes"
            go.set()
            await released_within(budget)
            assert budget.held == 0, "not given back once its other part's batch had ended"
        finally:
            go.set()
            batcher._run_batch = run_batch
            release_call(call)

    run_with_core(tmp_path, body)
