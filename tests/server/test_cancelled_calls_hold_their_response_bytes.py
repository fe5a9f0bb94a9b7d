"""A unary call that leaves (cancelled, its deadline) while its response's bytes are still being built
off the event loop (the boundary's serialize of a large response, KServe ModelInfer's large response
built on the codec pool) holds its response bytes (response_budget_bytes) until that job has ended:
the bytes are being written until then, and the budget bounds them. A job that raises ends too: the
bytes are given back then."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from server_support import image_to_image_graph, run_with_core, super_resolution_graph, write_model
from test_cancelled_image_calls_hold_their_working_set import (
    BATCHING,
    I2I_CARD,
    SR_CARD,
    JobFailed,
    held_on_the_pool,
    infer_request,
)

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb
from genserve_server import boundary, kserve, wire
from genserve_server.boundary import Boundary
from genserve_server.core import Call, GenerationCore
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository
from genserve_server.response_budget import ByteBudget, Reservation


class _Context:
    """The parts of grpc.aio.ServicerContext the boundary uses for a unary call."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def add_done_callback(self, callback: Any) -> None:
        pass

    def done(self) -> bool:
        return False


async def released_within(budget: ByteBudget, bound_s: float = 10.0) -> None:
    deadline = time.monotonic() + bound_s
    while budget.held and time.monotonic() < deadline:
        await asyncio.sleep(0.002)


async def cancel_while_held(task: asyncio.Task[Any], entered: Any, budget: ByteBudget, go: Any) -> None:
    """Cancel `task` once its job is held on the pool: its bytes stay held until the job ends."""
    while not entered.is_set():
        assert not task.done(), task.result()
        await asyncio.sleep(0.002)
    held = budget.held
    assert held > 0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, JobFailed):
        await task
    assert task.cancelled()
    assert budget.held == held, "response bytes given back while they were still being built"
    go.set()
    await released_within(budget)
    assert budget.held == 0, "response bytes not given back once their job had ended"


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_a_cancelled_call_holds_its_response_bytes_until_the_boundary_has_serialized_them(
    monkeypatch: pytest.MonkeyPatch, raises: bool
) -> None:
    """A call whose large response (wire.OFF_LOOP_BYTES or more predicted) was being serialized on the
    boundary's pool when it was cancelled gave its response bytes back at once."""
    response = pb.SampleResponse(
        images=[tpb.GeneratedImage(index=i, image=tpb.Image(data=bytes(300_000))) for i in range(4)]
    )
    predicted = wire.OFF_LOOP_BYTES + 4096

    async def handler(request: object, call: Call) -> pb.SampleResponse:
        call.response = Reservation(budget)
        await call.response.reserve(predicted, None, "Sample")
        return response

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            ends = Boundary(Metrics(), serialize_pool=pool)
            with held_on_the_pool(monkeypatch, boundary, "serialize", raises) as (entered, go):
                task = asyncio.create_task(ends.unary("Sample", object(), _Context(), handler))  # type: ignore[arg-type]
                await cancel_while_held(task, entered, budget, go)
            # The next call is answered, and its bytes are its own.
            answer = await ends.unary("Sample", object(), _Context(), handler)  # type: ignore[arg-type]
            assert isinstance(answer, bytes) and answer == response.SerializeToString()

    budget = ByteBudget("response_budget_bytes", 64 << 20, 5.0)
    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("kind", ["super_resolution", "image_to_image"])
def test_a_cancelled_model_infer_holds_its_response_bytes_until_its_response_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, raises: bool
) -> None:
    """A ModelInfer whose large response was being built on the codec pool (kserve._response) when it
    was cancelled gave its response bytes back at once (its working set waited for the job)."""
    model = "sr" if kind == "super_resolution" else "i2i"
    if kind == "super_resolution":
        write_model(tmp_path, model, kind, super_resolution_graph(2), SR_CARD, config=BATCHING)
    else:
        write_model(tmp_path, model, kind, image_to_image_graph(4), I2I_CARD, config=BATCHING)

    async def body(repo: Repository, core: GenerationCore) -> None:
        infer = kserve.InferenceService(repo, core, Boundary(core.metrics))
        working_set = core.sr_working_set if kind == "super_resolution" else core.translate_working_set
        with held_on_the_pool(monkeypatch, wire, "with_bytes_field", raises) as (entered, go):
            task = asyncio.create_task(infer.ModelInfer(infer_request(model, kind), _Context()))  # type: ignore[arg-type]
            await cancel_while_held(task, entered, core.responses, go)
        await released_within(working_set)
        assert working_set.held == 0
        # The next call is answered, and gives its bytes back as gRPC ends it (here: nothing holds them).
        answer = await infer.ModelInfer(infer_request(model, kind), _Context())  # type: ignore[arg-type]
        assert isinstance(answer, bytes) and len(answer) >= wire.OFF_LOOP_BYTES

    run_with_core(tmp_path, body)
