"""Test support for the cancelled-call tests (test_cancelled_*): the tiny batched super-resolution and
image-to-image models they call, a pool job held on an event, and the sequence they share: cancel a call
while its job is held on a pool, its budget still counts its bytes; let the job end, the budget returns.
"""

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
from server_support import image_to_image_graph, super_resolution_graph, write_model

from genserve.kserve import grpc_service_pb2 as kpb
from genserve_server.core import Call
from genserve_server.response_budget import ByteBudget

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


def write_image_model(root: Path, kind: str) -> str:
    """The tiny batched model of `kind` under `root` (super_resolution: "sr", x2; image_to_image:
    "i2i"): its name."""
    if kind == "super_resolution":
        write_model(root, "sr", kind, super_resolution_graph(2), SR_CARD, config=BATCHING)
        return "sr"
    write_model(root, "i2i", kind, image_to_image_graph(4), I2I_CARD, config=BATCHING)
    return "i2i"


def infer_request(model: str, kind: str) -> kpb.ModelInferRequest:
    """One image whose output (raw FP32) is wire.OFF_LOOP_BYTES or more: built on the codec pool."""
    side = 160 if kind == "super_resolution" else 304  # 3x320x320 or 3x304x304 float32 out: > 1 MiB
    low = 0.0 if kind == "super_resolution" else -1.0
    image = np.linspace(low, 1.0, 3 * side * side, dtype=np.float32).reshape(1, 3, side, side)
    request = kpb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="FP32", shape=image.shape)
    request.raw_input_contents.append(image.tobytes())
    return request


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


async def released_within(budget: ByteBudget, bound_s: float = 10.0) -> None:
    """Wait (`bound_s` at most) until nothing holds `budget`."""
    deadline = time.monotonic() + bound_s
    while budget.held and time.monotonic() < deadline:
        await asyncio.sleep(0.002)


async def cancel_while_held(
    task: asyncio.Task[Any], entered: threading.Event, budget: ByteBudget, go: threading.Event, job: str
) -> None:
    """Cancel `task` once its job (`job`, for the messages) is held on the pool (`entered`): the bytes
    it holds against `budget` stay held until the job ends (`go`), and are given back then."""
    while not entered.is_set():
        assert not task.done(), task.result()
        await asyncio.sleep(0.002)
    held = budget.held
    assert held > 0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, JobFailed):
        await task
    assert task.cancelled()
    assert budget.held == held, f"given back while {job} still ran on the pool"
    go.set()
    await released_within(budget)
    assert budget.held == 0, f"not given back once {job} had ended"


def release_call(call: Call) -> None:
    """What gRPC's end of `call` gives back: its batcher lease and its response bytes."""
    if call.batcher is not None:
        call.batcher.release()
    if call.response is not None:
        call.response.release()
