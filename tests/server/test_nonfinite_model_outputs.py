"""Images a model computes as NaN (a diverged checkpoint, an fp16 graph overflowing). They were
answered OK -- black pixels in a PNG, NaN values in a TENSOR_F32 -- counted as successful requests,
and kept by the image cache, so the same request later got the broken image without the model being
asked again. Now such a request fails INTERNAL naming the model and the non-finite output, counts
under INTERNAL, and nothing of it is cached; the other requests of the same batch are answered as
they would be alone (as a code prior's NaN logits, test_code_prior_nonfinite_logits.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import numpy_helper
from server_support import TINY_LATENT, ServerProcess, conditional_graph, running_server, write_model

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.codecs import ImageFormat
from genserve_server.encoding import check_finite
from genserve_server.errors import Internal

MODEL = "nan-cond"


def _conditional_with_a_nan_class() -> object:
    """conditional_graph with 2 classes whose class 1 embedding is NaN: every label-1 image is NaN."""
    model = conditional_graph(TINY_LATENT, 2, 1, 8, 8)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "E":
            embedding = numpy_helper.to_array(init).copy()
            embedding[1] = np.nan
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(embedding, "E"))
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("nan-cond") / "models"
    write_model(
        root,
        MODEL,
        "conditional_generator",
        _conditional_with_a_nan_class(),  # type: ignore[arg-type]
        {
            "latent_dim": TINY_LATENT,
            "class_names": ["fine", "broken"],
            "channels": 1,
            "image_size": [8, 8],
        },
        config={"batching": {"max_batch_size": 8, "max_queue_size": 64, "max_queue_delay_ms": 50}},
    )
    config = {"image_cache_bytes": 1 << 20}
    with running_server(root, tmp_path_factory.mktemp("nan-cond-work"), config=config) as process:
        yield process


def _sample(label: int, seeds: list[int], fmt: int = ImageFormat.PNG) -> pb.SampleRequest:
    return pb.SampleRequest(model=MODEL, seeds=seeds, labels=[label], output=tpb.OutputOptions(format=fmt))


@pytest.mark.parametrize("fmt", [ImageFormat.PNG, ImageFormat.RAW_UINT8, ImageFormat.TENSOR_F32])
def test_a_nan_image_fails_internal_naming_the_model_and_is_never_cached(
    server: ServerProcess, fmt: int
) -> None:
    def internal() -> float:
        return server.metric("genserve_requests_total", model=MODEL, method="Sample", code="INTERNAL")

    before = internal()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for attempt in range(2):  # the second is not answered from the cache
            with pytest.raises(grpc.RpcError) as failed:
                stub.Sample(_sample(1, [3, 4], fmt), timeout=30)
            error = failed.value
            assert error.code() == grpc.StatusCode.INTERNAL, (attempt, error)
            assert MODEL in str(error.details()) and "NaN" in str(error.details()), error.details()
        good = stub.Sample(_sample(0, [3, 4], fmt), timeout=30)
        assert len(good.images) == 2
    assert internal() == before + 2


def test_a_nan_image_fails_its_request_alone(server: ServerProcess) -> None:
    async def both() -> tuple[object, object, pb.SampleResponse]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            alone = await stub.Sample(_sample(0, [7, 8], ImageFormat.TENSOR_F32), timeout=30)
            # The same good request beside a broken one: they share a batch (max_batch_delay_ms).
            results = await asyncio.gather(
                stub.Sample(_sample(0, [7, 8], ImageFormat.TENSOR_F32), timeout=30),
                stub.Sample(_sample(1, [9], ImageFormat.TENSOR_F32), timeout=30),
                return_exceptions=True,
            )
            return results[0], results[1], alone

    good, broken, alone = asyncio.run(both())
    assert isinstance(broken, grpc.aio.AioRpcError), f"a NaN image answered OK: {broken}"
    assert broken.code() == grpc.StatusCode.INTERNAL, broken
    assert isinstance(good, pb.SampleResponse), good
    assert [i.image.data for i in good.images] == [i.image.data for i in alone.images]


def test_a_nan_image_is_named_by_its_index_in_the_request_not_among_the_ones_computed(
    server: ServerProcess,
) -> None:
    """The images named are the request's: Sample's image 1, whose image 0 the cache answered (only
    image 1 was computed, as the first of its batch), and a SampleStream's image 3, the second of its
    chunk [2, 4); they were named as image 0 and image 1, the index among the rows computed."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stub.Sample(_sample(0, [40]), timeout=30)  # cached
        with pytest.raises(grpc.RpcError) as failed:
            stub.Sample(pb.SampleRequest(model=MODEL, seeds=[40, 41], labels=[0, 1]), timeout=30)
        details = str(failed.value.details())
        assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value
        assert "image(s) 1 of the request" in details, details
        stream = pb.SampleStreamRequest(
            sample=pb.SampleRequest(model=MODEL, count=4, labels=[0, 0, 0, 1]), chunk_size=2
        )
        with pytest.raises(grpc.RpcError) as failed:
            for _ in stub.SampleStream(stream, timeout=30):
                pass
        details = str(failed.value.details())
        assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value
        assert "image(s) 3 of the request" in details, details


@pytest.mark.parametrize("broken_batch", [0, 1])
def test_a_nan_image_of_a_request_over_two_batches_fails_it_naming_the_image(
    server: ServerProcess, broken_batch: int
) -> None:
    """A request of 12 images runs as two batches of the model (max_batch_size 8), its rows assembled
    from both: a NaN image in either batch fails it, named by its index in the request (the runner
    checks each batch once, and the check travels with the batch's rows)."""
    labels = [0] * 12
    labels[3 if broken_batch == 0 else 10] = 1
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Sample(pb.SampleRequest(model=MODEL, seeds=list(range(200, 212)), labels=labels), timeout=30)
        details = str(failed.value.details())
        assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value
        assert f"image(s) {labels.index(1)} of the request" in details, details
        labels[labels.index(1)] = 0
        fine = pb.SampleRequest(model=MODEL, seeds=list(range(200, 212)), labels=labels)
        assert len(stub.Sample(fine, timeout=30).images) == 12


def test_every_call_failed_by_a_nan_image_names_its_request_id_in_the_log(server: ServerProcess) -> None:
    """docs/metrics.md's runbook: for INTERNAL without batch failures, a model whose images are NaN,
    'find the request id of a failed call in the client and grep the server's JSON logs for it'. Its
    only line was the boundary's refusal line, throttled like a client's bad calls (the first per 10 s
    at INFO, the others at DEBUG): at the default level the ids of all but one such call were nowhere
    in the log."""
    ids = [f"nan-image-{i}" for i in range(3)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for rid in ids:
            with pytest.raises(grpc.RpcError) as failed:
                stub.Sample(_sample(1, [5]), metadata=(("x-request-id", rid),), timeout=30)
            assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value
    log = server.log()
    missing = [rid for rid in ids if rid not in log]
    assert not missing, f"request ids of calls failed INTERNAL not in the server log: {missing}"


def test_the_refusal_counts_the_nan_and_the_infinite_values_apart() -> None:
    """docs/operations.md: the INTERNAL names how many values are NaN and how many infinite; here 2
    NaN and 3 infinite ones (+inf and -inf) in images 1 and 3 of the request."""
    images = np.zeros((4, 1, 2, 2), np.float32)
    images[1, 0, 0, :] = np.nan
    images[3, 0, 1, :] = np.inf
    images[3, 0, 0, 0] = -np.inf
    with pytest.raises(Internal) as failed:
        check_finite(images, MODEL, rows=[0, 1, 2, 3])
    message = str(failed.value)
    assert "image(s) 1, 3 of the request" in message, message
    assert "(2 NaN and 3 infinite values)" in message, message
