"""A SuperResolve or Translate that leaves (cancelled, its deadline) while one of its jobs runs on the
codec pool (decoding its images, blending its tiles, encoding its outputs) holds its working set
until that job has ended: the job's buffers (decoded images, blend canvases, the encode's copies)
are alive until then, and the working set counts them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import image_to_image_graph, run_with_core, super_resolution_graph, write_model
from test_translate_working_set import gradient_png

from genserve.v1 import types_pb2 as tpb
from genserve_server import encoding, tiling, validate
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


@contextlib.contextmanager
def held_on_the_pool(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """(entered, go): `module.name` waits, on the pool thread that runs it, until `go` is set."""
    entered, go = threading.Event(), threading.Event()
    real: Callable[..., Any] = getattr(module, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    try:
        yield entered, go
    finally:
        go.set()


def cancelled_while_held(
    root: Path, monkeypatch: pytest.MonkeyPatch, stage: str, rpc: str, model: str, kind: str
) -> None:
    image = tpb.Image(format=PNG, data=gradient_png(64))
    out = validate.output_spec(PNG, 0, None, False)

    async def body(repo: Repository, core: GenerationCore) -> None:
        budget = core.sr_working_set if rpc == "SuperResolve" else core.translate_working_set
        call = Call(rpc, "test", time.monotonic(), core.metrics.unresolved(), unary=True)
        mv = core.resolve(call, model, "", (kind,), rpc)
        with held_on_the_pool(monkeypatch, *STAGES[stage]) as (entered, go):
            if rpc == "SuperResolve":
                task = asyncio.create_task(core.upscale(mv, call, [image], 0, None, out))
            else:
                task = asyncio.create_task(core.translate(mv, call, [image], out))
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
        core.resolve(served, model, "", (kind,), rpc)
        try:
            if rpc == "SuperResolve":
                done = await core.upscale(mv, served, [image], 0, None, out)
            else:
                done = await core.translate(mv, served, [image], out)
            assert len(done.images) == 1 and budget.held == 0
        finally:
            if served.batcher is not None:
                served.batcher.release()
            if served.response is not None:
                served.response.release()

    run_with_core(root, body)


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
