"""A SuperResolve, Translate or KServe ModelInfer (on a super-resolution or image-to-image model) that
leaves (cancelled, its deadline) while one of its jobs runs on the codec pool (decoding its images,
blending its tiles, encoding its outputs, building a large ModelInfer response) holds its working set
until that job has ended: the job's buffers (decoded images, blend canvases, the encode's copies, the
model's outputs a response is built from) are alive until then, and the working set counts them. A
job that raises ends too: the working set is given back then."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_support import image_to_image_graph, run_with_core, super_resolution_graph, write_model
from test_translate_working_set import gradient_png

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.v1 import types_pb2 as tpb
from genserve_server import encoding, kserve, tiling, validate, wire
from genserve_server.boundary import Boundary
from genserve_server.core import Call, GenerationCore
from genserve_server.repository import Repository

PNG = tpb.IMAGE_FORMAT_PNG

SR_CARD = {
    "channels": 3,
    "input_channels": 3,
    "input_range": [0.0, 1.0],
    "scale_factor": 2,
    "size_multiple": 1,
    "tile_size": 32,
    "tile_overlap": 8,
    "min_size": 4,
}
I2I_CARD = {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 8}
BATCHING = {"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0}}

# (the module holding the pool job's function, its name): each runs on the codec pool for a 64x64 PNG
# in, PNG out (decode_sync: a PNG; tiling.blend: several tiles; encode_sync: 128x128 RGB as PNG).
STAGES = {
    "decode": (encoding, "decode_sync"),
    "blend": (tiling, "blend"),
    "encode": (encoding, "encode_sync"),
}
# A ModelInfer's response of wire.OFF_LOOP_BYTES or more is built on the codec pool (kserve._response).
INFER_STAGES = {"response": (wire, "with_bytes_field")}


class JobFailed(Exception):
    """What a held pool job raises where the test asks it to."""


@contextlib.contextmanager
def held_on_the_pool(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, raises: bool = False
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """(entered, go): `module.name` waits, on the pool thread that runs it, until `go` is set; then
    runs, or raises JobFailed where `raises`."""
    entered, go = threading.Event(), threading.Event()
    real: Callable[..., Any] = getattr(module, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        go.wait(10)
        if raises:
            raise JobFailed(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    try:
        yield entered, go
    finally:
        go.set()
        monkeypatch.setattr(module, name, real)


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
                while not entered.is_set():
                    assert not task.done(), task.result()
                    await asyncio.sleep(0.002)
                held = budget.held
                assert held > 0
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert budget.held == held, f"given back while its {stage} still runs on the pool"
                go.set()
                deadline = time.monotonic() + 10
                while budget.held and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                assert budget.held == 0, f"not given back once its {stage} had ended"
            finally:
                go.set()
                if call.batcher is not None:
                    call.batcher.release()
                if call.response is not None:
                    call.response.release()
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
            if served.batcher is not None:
                served.batcher.release()
            if served.response is not None:
                served.response.release()

    run_with_core(root, body)


def infer_request(model: str, kind: str) -> kpb.ModelInferRequest:
    """One image whose output (raw FP32) is wire.OFF_LOOP_BYTES or more: built on the codec pool."""
    side = 160 if kind == "super_resolution" else 304  # 3x320x320 or 3x304x304 float32 out: > 1 MiB
    low = 0.0 if kind == "super_resolution" else -1.0
    image = np.linspace(low, 1.0, 3 * side * side, dtype=np.float32).reshape(1, 3, side, side)
    request = kpb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="FP32", shape=image.shape)
    request.raw_input_contents.append(image.tobytes())
    return request


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_cancelled_super_resolve_holds_its_working_set_until_its_pool_job_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """It gave its working set back as it was cancelled, while its decode, blend or encode went on
    on the codec pool: the budget admitted other calls beside buffers it counted as held."""
    write_model(tmp_path, "sr", "super_resolution", super_resolution_graph(2), SR_CARD, config=BATCHING)
    cancelled_while_held(tmp_path, monkeypatch, stage, "SuperResolve", "sr", "super_resolution")


@pytest.mark.parametrize("stage", ["decode", "encode"])
def test_a_cancelled_translate_holds_its_working_set_until_its_pool_job_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """As SuperResolve's (a Translate blends nothing)."""
    write_model(tmp_path, "i2i", "image_to_image", image_to_image_graph(4), I2I_CARD, config=BATCHING)
    cancelled_while_held(tmp_path, monkeypatch, stage, "Translate", "i2i", "image_to_image")


@pytest.mark.parametrize("kind", ["super_resolution", "image_to_image"])
def test_a_cancelled_model_infer_holds_its_working_set_until_its_response_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A ModelInfer on a super-resolution or image-to-image model, cancelled while its large response
    was built on the codec pool, gave its working set back at once: the job still held the model's
    outputs the working set counts."""
    if kind == "super_resolution":
        write_model(tmp_path, "sr", kind, super_resolution_graph(2), SR_CARD, config=BATCHING)
        cancelled_while_held(tmp_path, monkeypatch, "response", "ModelInfer", "sr", kind)
    else:
        write_model(tmp_path, "i2i", kind, image_to_image_graph(4), I2I_CARD, config=BATCHING)
        cancelled_while_held(tmp_path, monkeypatch, "response", "ModelInfer", "i2i", kind)


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
    if rpc == "SuperResolve":
        write_model(tmp_path, "sr", "super_resolution", super_resolution_graph(2), SR_CARD, config=BATCHING)
        cancelled_while_held(tmp_path, monkeypatch, stage, rpc, "sr", "super_resolution", raises=True)
    else:
        write_model(tmp_path, "i2i", "image_to_image", image_to_image_graph(4), I2I_CARD, config=BATCHING)
        cancelled_while_held(tmp_path, monkeypatch, stage, rpc, "i2i", "image_to_image", raises=True)


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
            deadline = time.monotonic() + 10
            while budget.held and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            assert budget.held == 0, "not given back once its other part's batch had ended"
        finally:
            go.set()
            batcher._run_batch = run_batch
            if call.batcher is not None:
                call.batcher.release()

    run_with_core(tmp_path, body)
