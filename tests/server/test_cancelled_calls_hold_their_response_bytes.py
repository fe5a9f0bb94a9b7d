"""A unary call that leaves (cancelled, its deadline) while its response's bytes are still being built
off the event loop (the boundary's serialize of a large response, KServe ModelInfer's large response
built on the codec pool) holds its response bytes (response_budget_bytes) until that job has ended:
the bytes are being written until then, and the budget bounds them. A job that raises ends too: the
bytes are given back then."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cancel_support import (
    cancel_while_held,
    held_on_the_pool,
    infer_request,
    released_within,
    write_image_model,
)
from server_support import UnaryContext, reserving_handler, run_with_core

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb
from genserve_server import boundary, kserve, wire
from genserve_server.boundary import Boundary
from genserve_server.core import GenerationCore
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository
from genserve_server.response_budget import ByteBudget

JOB = "the job building its response's bytes"


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_a_cancelled_call_holds_its_response_bytes_until_the_boundary_has_serialized_them(
    monkeypatch: pytest.MonkeyPatch, raises: bool
) -> None:
    """A call whose large response (wire.OFF_LOOP_BYTES or more predicted) was being serialized on the
    boundary's pool when it was cancelled gave its response bytes back at once."""
    response = pb.SampleResponse(
        images=[tpb.GeneratedImage(index=i, image=tpb.Image(data=bytes(300_000))) for i in range(4)]
    )
    budget = ByteBudget("response_budget_bytes", 64 << 20, 5.0)
    handler = reserving_handler(budget, wire.OFF_LOOP_BYTES + 4096, response)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            ends = Boundary(Metrics(), serialize_pool=pool)
            with held_on_the_pool(monkeypatch, boundary, "serialize", raises) as (entered, go):
                task = asyncio.create_task(ends.unary("Sample", object(), UnaryContext(), handler))  # type: ignore[arg-type]
                await cancel_while_held(task, entered, budget, go, JOB)
            # The next call is answered, and its bytes are its own.
            answer = await ends.unary("Sample", object(), UnaryContext(), handler)  # type: ignore[arg-type]
            assert isinstance(answer, bytes) and answer == response.SerializeToString()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("kind", ["super_resolution", "image_to_image"])
def test_a_cancelled_model_infer_holds_its_response_bytes_until_its_response_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, raises: bool
) -> None:
    """A ModelInfer whose large response was being built on the codec pool (kserve._response) when it
    was cancelled gave its response bytes back at once (its working set waited for the job)."""
    model = write_image_model(tmp_path, kind)

    async def body(repo: Repository, core: GenerationCore) -> None:
        infer = kserve.InferenceService(repo, core, Boundary(core.metrics))
        working_set = core.sr_working_set if kind == "super_resolution" else core.translate_working_set
        with held_on_the_pool(monkeypatch, wire, "with_bytes_field", raises) as (entered, go):
            task = asyncio.create_task(infer.ModelInfer(infer_request(model, kind), UnaryContext()))  # type: ignore[arg-type]
            await cancel_while_held(task, entered, core.responses, go, JOB)
        await released_within(working_set)
        assert working_set.held == 0
        # The next call is answered, and gives its bytes back as gRPC ends it (here: nothing holds them).
        answer = await infer.ModelInfer(infer_request(model, kind), UnaryContext())  # type: ignore[arg-type]
        assert isinstance(answer, bytes) and len(answer) >= wire.OFF_LOOP_BYTES

    run_with_core(tmp_path, body)
