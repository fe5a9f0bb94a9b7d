"""Non-finite logits from a code prior (a diverged checkpoint, an fp16 prior overflowing). Step 3 of
the code-sampling algorithm (w_j = exp(l_j - max l)) gave NaN weights for a row holding a +inf or a
NaN logit, and the row silently took code 0: a +inf logit, certain in the limit, was never drawn,
and a prior whose logits were NaN answered OK with an all-zero grid (and its image). Now +inf codes
take all of the probability, and a row whose logits hold NaN fails alone with INTERNAL, naming the
prior and the position, while the rows of other requests in the same steps finish as they would."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from code_models import decoder_graph, prior_graph
from onnx import numpy_helper
from server_support import running_server, wait_until, write_model

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve_server.config import ServerConfig
from genserve_server.main import App
from genserve_server.step_sampler import NO_CODE, sample_codes

GRID = (3, 3)
K = 8


def _one(logits: list[float], u: float = 0.7, top_k: int = 0) -> int:
    codes = sample_codes(np.array([logits], np.float32), np.array([u]), np.array([1.0]), np.array([top_k]))
    return int(codes[0])


def test_an_infinite_logit_is_drawn_and_a_nan_row_has_no_code() -> None:
    inf, nan = np.inf, np.nan
    assert _one([0.0, inf, 0.0, 0.0]) == 1  # was 0
    assert _one([0.0, inf, 0.0, inf], u=0.2) == 1  # two +inf codes share the probability
    assert _one([0.0, inf, 0.0, inf], u=0.7) == 3
    assert _one([1.0, -inf, 1.0, -inf], u=0.7) == 2  # -inf: probability 0, as before
    assert _one([nan, 5.0, 0.0, 0.0]) == NO_CODE  # was 0
    assert _one([-inf, -inf, -inf]) == NO_CODE
    assert _one([0.0, 5.0, nan, 0.0], top_k=1) == 1  # a NaN outside the top_k is not sampled from
    # Row by row: a NaN row leaves the finite rows' codes as they are alone.
    rows = np.array([[0.0, 5.0, 0.0, 1.0], [nan, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    u = np.array([0.3, 0.3, 0.6])
    together = sample_codes(rows, u, np.ones(3), np.zeros(3, np.int64))
    assert together[1] == NO_CODE
    assert [together[0], together[2]] == [_one(list(rows[0]), 0.3), _one(list(rows[2]), 0.6)]


def _prior_with_a_nan_class() -> object:
    """prior_graph with 2 classes whose class 1 embedding is NaN: every logit of a label-1 row is NaN."""
    model = prior_graph(*GRID, K, n_classes=2)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "E":
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.array([[0.5], [np.nan]], np.float32), "E")
            )
    return model


def _write_decoder(root: Path, batching: dict[str, int]) -> None:
    decoder_card = {
        "grid": list(GRID),
        "codebook_size": K,
        "image_size": list(GRID),
        "channels": 1,
        "output_range": [0.0, 1.0],
    }
    write_model(
        root,
        "nan-decoder",
        "code_decoder",
        decoder_graph(*GRID, K),
        decoder_card,
        config={"batching": batching},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("nan-prior") / "models"
    batching = {"max_batch_size": 8, "max_queue_size": 64}
    write_model(
        root,
        "nan-prior",
        "code_prior",
        _prior_with_a_nan_class(),  # type: ignore[arg-type]
        {"grid": list(GRID), "codebook_size": K, "class_names": ["fine", "broken"], "output_range": None},
        config={"decoder": "nan-decoder", "batching": batching},
    )
    _write_decoder(root, batching)
    with running_server(root, tmp_path_factory.mktemp("nan-prior-work")) as process:
        yield process


def test_nan_logits_fail_their_request_alone(server) -> None:  # type: ignore[no-untyped-def]
    def request(label: int, seeds: list[int]) -> pb.SampleCodesRequest:
        return pb.SampleCodesRequest(model="nan-prior", seeds=seeds, labels=[label], return_codes=True)

    async def both() -> tuple[object, object, pb.SampleCodesResponse]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            alone = await stub.SampleCodes(request(0, [1, 2, 3]), timeout=30)
            # The same good request beside a broken one: they share the prior's steps.
            results = await asyncio.gather(
                stub.SampleCodes(request(0, [1, 2, 3]), timeout=30),
                stub.SampleCodes(request(1, [4, 5]), timeout=30),
                return_exceptions=True,
            )
            return results[0], results[1], alone

    good, broken, alone = asyncio.run(both())
    assert isinstance(broken, grpc.aio.AioRpcError), f"NaN logits answered OK: {broken}"
    assert broken.code() == grpc.StatusCode.INTERNAL, broken
    assert "nan-prior" in str(broken.details()) and "NaN" in str(broken.details()), broken.details()
    assert isinstance(good, pb.SampleCodesResponse), good
    assert [c.data for c in good.codes] == [c.data for c in alone.codes]
    assert [i.image.data for i in good.images] == [i.image.data for i in alone.images]


def test_a_nan_row_fails_its_request_without_counting_its_other_rows_as_dropped(server) -> None:  # type: ignore[no-untyped-def]
    """A request of two grids, one of whose rows has NaN logits (label 1), fails INTERNAL: the call
    counts under that status. Its other row leaves the running set as the request fails: that is
    not a caller that went away, so genserve_requests_dropped_total (docs/metrics.md: `cancelled`,
    "the caller went away") must not count it."""

    def dropped() -> float:
        return server.metric("genserve_requests_dropped_total", model="nan-prior")

    def running() -> float:
        return server.metric("genserve_step_running_rows", model="nan-prior")

    before = dropped()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.SampleCodes(
                pb.SampleCodesRequest(model="nan-prior", seeds=[1, 2], labels=[0, 1], return_codes=True),
                timeout=30,
            )
    assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value
    # The other row leaves at the prior's next step, at once: the prior's running set is then empty
    # (the same pass that would count it as dropped sets the gauge).
    wait_until(lambda: running() == 0, 30, "the other row to leave")
    text = server.metrics_text()
    assert dropped() == before, [line for line in text.splitlines() if "dropped_total" in line]


def test_a_failed_prior_step_is_one_line_naming_its_request_ids_and_its_calls_get_model_call_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md, "Faults": a failed model call is one ERROR line naming the model, its
    version and the request id of every call it fails, its stack at most once a minute, and each
    call gets INTERNAL "model call failed" with its request id. A code prior's failed step handed
    each row the runtime's exception: every call got the boundary's "failed with an unexpected
    error" with a full traceback and "internal error (request id X)", and no line named the prior.
    Three calls fail in two steps: the first alone, the other two sharing a step."""
    batching = {"max_batch_size": 8, "max_queue_size": 64}
    card = {"grid": list(GRID), "codebook_size": K, "class_names": ["a", "b"], "output_range": None}
    prior_config = {"decoder": "nan-decoder", "batching": batching}
    write_model(
        tmp_path, "prior", "code_prior", prior_graph(*GRID, K, n_classes=2), card, config=prior_config
    )
    _write_decoder(tmp_path, batching)
    ids = ["failed-step-1", "failed-step-2", "failed-step-3"]

    def failures(app: App) -> float | None:
        labels = {"model": "prior", "version": "1"}
        return app.metrics.registry.get_sample_value("genserve_batch_failures_total", labels)

    async def main() -> list[grpc.aio.AioRpcError]:
        app = App(tmp_path, ServerConfig(warmup=False), port=0, metrics_port=0)
        await app.start()
        try:
            scheduler = app.core.stepper(app.repository.get("prior").resolve(""))
            run = scheduler._run
            calls = 0

            async def scripted(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
                nonlocal calls
                calls += 1
                if calls == 2:  # the second call's first step: held until the third call's rows wait
                    while scheduler.rows < 4:
                        await asyncio.sleep(0.01)
                if calls in (1, 3):
                    raise RuntimeError("the prior's step failed")
                return await run(inputs)

            scheduler._run = scripted
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)

                async def call(rid: str) -> grpc.aio.AioRpcError:
                    request = pb.SampleCodesRequest(model="prior", seeds=[1, 2], labels=[0])
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await stub.SampleCodes(request, metadata=(("x-request-id", rid),), timeout=60)
                    return failed.value

                errors = [await call(ids[0])]
                errors += await asyncio.gather(call(ids[1]), call(ids[2]))
            assert failures(app) == 2  # genserve_batch_failures_total: every failed model call
            return errors
        finally:
            await app.stop()

    with caplog.at_level(logging.INFO, logger="genserve_server"):
        errors = asyncio.run(asyncio.wait_for(main(), 120))
    for rid, error in zip(ids, errors, strict=True):
        assert error.code() == grpc.StatusCode.INTERNAL, error
        assert error.details() == f"model prior version 1: model call failed (request id {rid})", error
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    lines = [r.getMessage() for r in loud]
    assert len(loud) == 2, lines  # one per failed step
    assert all("model prior version 1" in line and "the prior's step failed" in line for line in lines), lines
    assert "request_ids=failed-step-1)" in lines[0] and "request_ids=failed-step-2,failed-step-3)" in lines[1]
    assert [r.exc_info is not None for r in loud] == [True, False], lines  # the stack once a minute
