"""A client's deadline at each stage a request passes through, against a real server on 127.0.0.1:
the client gets DEADLINE_EXCEEDED when its deadline passes, the server stops spending on the call,
and the call counts once in genserve_requests_dropped_total{reason="deadline"} (docs/metrics.md),
not as a caller that went away (`cancelled`)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from code_models import write_code_models
from server_support import (
    TINY_LATENT,
    ServerProcess,
    held_batch_app,
    metric_in,
    slow_generator_graph,
    start_server,
    wait_until,
    write_model,
    write_tiny_generator,
    write_vae_encoder,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import encoding
from genserve_server.config import ServerConfig
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository
from genserve_server.service import GenerationService

SLOW_QUEUE = 16  # BULK rows may fill half of it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("deadline-models")
    # A prior whose step costs ~10 ms (64 steps a grid): a deadline passes between its steps.
    names = write_code_models(root, grid=(8, 8), iterations=40)
    assert names["prior"] == "prior"
    # ~0.4 s a row, one row a batch.
    write_model(
        root,
        "slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 60000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 1, "max_queue_delay_ms": 1.0, "max_queue_size": SLOW_QUEUE}},
    )
    process = start_server(root, tmp_path_factory.mktemp("deadline-server"), config={"warmup": False})
    yield process
    process.stop()
    shutil.rmtree(root)  # ~160 MB (the prior's weights): not kept till the session's end


def _dropped(server: ServerProcess, model: str) -> tuple[float, float]:
    text = server.metrics_text()
    return (
        metric_in(text, "genserve_requests_dropped_total", model=model, reason="deadline"),
        metric_in(text, "genserve_requests_dropped_total", model=model, reason="cancelled"),
    )


def test_a_code_prior_call_whose_deadline_passes_between_steps_is_dropped_as_deadline(
    server: ServerProcess,
) -> None:
    """gRPC ends the handler at the client's deadline (its future cancelled) a little before the
    deadline the server keeps; the step scheduler then saw a cancelled row and counted the call
    `cancelled`, so every code prior call that ran out of time was reported as a client that went
    away and genserve_requests_dropped_total{reason="deadline"} stayed 0 for code priors."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = pb.SampleCodesRequest(model="prior", seeds=[1], labels=[0])
        stub.SampleCodes(request, timeout=60)  # loaded and warm
        before = _dropped(server, "prior")
        steps_before = server.metric("genserve_batch_size_count", model="prior")
        calls = 4  # which of the two ends first varies from call to call: each must count as deadline
        for seed in range(2, 2 + calls):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.SampleCodes(pb.SampleCodesRequest(model="prior", seeds=[seed], labels=[0]), timeout=0.25)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1.0  # at the deadline, not after the grid
        wait_until(
            lambda: sum(_dropped(server, "prior")) - sum(before) == calls, 10, "the calls counted as dropped"
        )
        deadline, cancelled = _dropped(server, "prior")
        # Most as deadline (the defect: all `cancelled`, none `deadline`). Not all: on a loaded
        # machine the client's own cancel at its deadline can land before the server's deadline,
        # and that call is rightly `cancelled` (docs/metrics.md).
        assert deadline - before[0] > cancelled - before[1]
        # The rows left: no step runs for the calls after their deadlines.
        steps = server.metric("genserve_batch_size_count", model="prior")
        time.sleep(0.3)
        assert server.metric("genserve_batch_size_count", model="prior") == steps > steps_before


def test_a_bulk_request_whose_deadline_passes_while_it_waits_for_room_counts_once_as_deadline(
    server: ServerProcess,
) -> None:
    """A BULK request that finds the bulk half of the queue full waits for room (batcher.py). Its
    deadline passing there was counted in genserve_requests_dropped_total{reason="deadline"} only
    when the batcher's own timer ran before gRPC cancelled the handler; otherwise (about one call
    in three) the call left uncounted."""
    out = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stub.Sample(pb.SampleRequest(model="slow", seeds=[1], output=out), timeout=60)  # loaded, warm
        before = _dropped(server, "slow")
        # One BULK call of more rows than the bulk share fills it (alone it always fits).
        filler = pb.SampleRequest(
            model="slow", seeds=list(range(2, 2 + SLOW_QUEUE)), output=out, priority=tpb.PRIORITY_BULK
        )
        filled = stub.Sample.future(filler, timeout=120)
        try:
            wait_until(
                lambda: server.metric("genserve_queue_depth", model="slow") > 8, 30, "the bulk share full"
            )
            calls = 6
            for seed in range(100, 100 + calls):
                started = time.monotonic()
                request = pb.SampleRequest(model="slow", seeds=[seed], output=out, priority=tpb.PRIORITY_BULK)
                with pytest.raises(grpc.RpcError) as info:
                    stub.Sample(request, timeout=0.2)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 1.0
            assert server.metric("genserve_queue_depth", model="slow") > 8  # they all waited for room
            wait_until(
                lambda: sum(_dropped(server, "slow")) - sum(before) >= calls,
                5,
                "each call counted as a drop",
            )
            deadline, cancelled = _dropped(server, "slow")
            # Each counted once (the defect: a third uncounted), most as deadline: on a loaded
            # machine the client's own cancel at its deadline can land before the server's
            # deadline, and that call is rightly `cancelled` (docs/metrics.md).
            assert deadline - before[0] + cancelled - before[1] == calls
            assert deadline - before[0] > cancelled - before[1]
        finally:
            filled.cancel()


@pytest.mark.parametrize("api", ["genserve.v1", "kserve"])
def test_a_call_whose_deadline_passes_while_queued_behind_a_held_batch_is_dropped_unrun(
    tmp_path: Path, api: str
) -> None:
    """docs/operations.md and metrics.md: a call whose deadline passes while its row waits in the
    model's queue ends DEADLINE_EXCEEDED, counts one genserve_requests_dropped_total (reason="deadline",
    or "cancelled" where it reached a loaded server late) and its row is never run. The batch ahead
    of it is held on an event (no timing race): the queued call's deadline passes while nothing can
    run, then the batch is let go and a later call runs."""
    models = tmp_path / "models"
    write_tiny_generator(models, "gen", config={"batching": {"max_batch_size": 1, "max_queue_delay_ms": 0.0}})

    async def main() -> None:
        async with held_batch_app(models, "gen") as held:

            def dropped() -> float:
                """deadline drops and cancelled ones: a request that reached a loaded server more
                than DEADLINE_SLACK_S late is rightly `cancelled` (docs/metrics.md), as the test file
                running beside this one can make it. Which of the two: the tests above."""
                url = f"http://127.0.0.1:{held.app.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
                return sum(
                    metric_in(text, "genserve_requests_dropped_total", model="gen", reason=reason)
                    for reason in ("deadline", "cancelled")
                )

            async def one(stub_call: Any, seed: int, timeout: float) -> Any:
                if api == "kserve":
                    request = kpb.ModelInferRequest(model_name="gen")
                    request.parameters["seed"].int64_param = seed
                    request.parameters["count"].int64_param = 1
                else:
                    request = pb.SampleRequest(model="gen", seeds=[seed])
                return await stub_call(request, timeout=timeout)

            async with grpc.aio.insecure_channel(f"127.0.0.1:{held.app.port}") as channel:
                if api == "kserve":
                    call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
                else:
                    call = pb_grpc.GenerationServiceStub(channel).Sample
                before = await asyncio.to_thread(dropped)
                first = asyncio.ensure_future(one(call, 1, 60))
                await asyncio.wait_for(held.started.wait(), 30)  # its batch holds the model
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await one(call, 2, 0.3)  # queued behind it until its deadline passes
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
                held.free.set()
                await first
                await one(call, 3, 60)  # runs after whatever was queued before it
                # the first call's and the last's: not the expired one
                assert held.rows_run == [1, 1], held.rows_run
                assert await asyncio.to_thread(dropped) - before == 1

    asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.parametrize("ending", ["cancelled", "deadline"])
def test_an_encode_that_ends_while_its_images_decode_counts_once_as_a_drop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """An image-input call decodes its PNGs on the codec pool before it waits for the response
    budget or reaches a queue. A client that went away (or whose deadline passed) during the decode
    was counted in genserve_requests_total only, in no genserve_requests_dropped_total reason, while
    the same call leaving a moment later (the budget wait, the queue) was a drop: now one drop,
    `cancelled` or `deadline`, as its client gets it."""
    write_vae_encoder(tmp_path, "enc")
    decoding, go = threading.Event(), threading.Event()
    decode = encoding.decode_sync

    def held_decode(*args: Any) -> Any:
        decoding.set()
        go.wait(30)
        return decode(*args)

    monkeypatch.setattr(encoding, "decode_sync", held_decode)
    ok, png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert ok
    image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=png.tobytes())
    request = pb.EncodeRequest(model="enc", images=[image])
    code = {"cancelled": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}[ending]  # what its client gets

    async def main() -> tuple[dict[str, float], float]:
        config = ServerConfig()
        metrics = Metrics(enabled=True)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(2)
        service = GenerationService(repo, config, metrics, pool)
        server = grpc.aio.server()
        pb_grpc.add_GenerationServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        loop = asyncio.get_running_loop()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                call = stub.Encode(request, timeout=60 if ending == "cancelled" else 0.5)
                assert await loop.run_in_executor(None, decoding.wait, 30)
                if ending == "cancelled":
                    call.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await call
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                for _ in range(1000):  # the handler's end, which counts the call
                    if not service.boundary.in_flight["Encode"]:
                        break
                    await asyncio.sleep(0.01)
                assert not service.boundary.in_flight["Encode"]
        finally:
            go.set()
            await server.stop(None)
            await repo.close(1)
            pool.shutdown()
        labels = {"model": "enc", "version": "1"}
        drops = {
            reason: metrics.registry.get_sample_value(
                "genserve_requests_dropped_total", {**labels, "reason": reason}
            )
            or 0.0
            for reason in ("cancelled", "deadline")
        }
        ended = metrics.registry.get_sample_value(
            "genserve_requests_total", {**labels, "method": "Encode", "code": code}
        )
        return drops, ended or 0.0

    drops, ended = asyncio.run(main())
    assert ended == 1
    assert drops == {"cancelled": float(ending == "cancelled"), "deadline": float(ending == "deadline")}
