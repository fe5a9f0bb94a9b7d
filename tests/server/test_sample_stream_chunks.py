"""SampleStream's chunks against the model's queue and the send limit, on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from client_fakes import cli_main
from server_support import (
    TINY_LATENT,
    ServerProcess,
    generator_graph,
    start_server,
    write_model,
    write_vae_encoder,
)

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

MIB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("stream-models")
    # A model whose queue holds 8 rows: below SampleStream's default chunk of 64 images.
    small_queue = {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": 8}
    write_model(
        root,
        "small-queue",
        "generator",
        generator_graph(TINY_LATENT, 1, 8, 8),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": small_queue},
    )
    write_vae_encoder(root, "small-queue-enc", latent_dim=TINY_LATENT, config={"batching": small_queue})
    # 64x64 RGB: 48 KiB a TENSOR_F32 image, so a chunk of 64 is 3 MiB, above a 1 MiB send limit.
    write_model(
        root,
        "gen64",
        "generator",
        generator_graph(TINY_LATENT, 3, 64, 64),
        {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [64, 64]},
    )
    proc = start_server(
        root, tmp_path_factory.mktemp("stream-server"), config={"limits": {"max_send_message_bytes": MIB}}
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def test_a_stream_without_chunk_size_runs_on_a_model_whose_queue_is_below_the_default_chunk(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # The client set nothing wrong (chunk_size 0: the server's default): the job must run, in chunks
    # the model's queue can hold, not fail with INVALID_ARGUMENT "split it into smaller requests".
    request = pb.SampleStreamRequest(sample=pb.SampleRequest(model="small-queue", count=20))
    chunks = list(stub.SampleStream(request, timeout=60))
    indices = [g.index for chunk in chunks for g in chunk.images]
    assert indices == list(range(20))
    assert max(len(chunk.images) for chunk in chunks) <= 8


def test_a_chunk_size_above_the_model_queue_is_refused_naming_chunk_size_and_the_limit(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    request = pb.SampleStreamRequest(sample=pb.SampleRequest(model="small-queue", count=20), chunk_size=16)
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.SampleStream(request, timeout=60))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = excinfo.value.details()
    assert details.startswith("chunk_size: must be in 1..8"), details
    assert "max_queue_size" in details and "got 16" in details, details


@pytest.mark.parametrize("fmt", [tpb.IMAGE_FORMAT_TENSOR_F32, tpb.IMAGE_FORMAT_JPEG])
def test_a_chunk_above_the_send_limit_names_sample_output_and_chunk_size(
    stub: pb_grpc.GenerationServiceStub, fmt: int
) -> None:
    # TENSOR_F32: refused before compute; JPEG: only once encoded. Either way the request's fields
    # are sample.output and chunk_size (count is fine: a stream sends any count in chunks).
    quality = 100 if fmt == tpb.IMAGE_FORMAT_JPEG else 0  # JPEG's and WEBP's alone (types.proto)
    request = pb.SampleStreamRequest(
        sample=pb.SampleRequest(
            model="gen64",
            count=1000,
            output=tpb.OutputOptions(format=fmt, quality=quality),  # type: ignore[arg-type]
        ),
        chunk_size=256,
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.SampleStream(request, timeout=60))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = excinfo.value.details()
    assert details.startswith("sample.output: "), details
    assert "max_send_message_bytes=1048576" in details and "chunk_size" in details, details
    # A smaller chunk of the same job fits.
    request.chunk_size = 4
    request.sample.count = 8
    assert sum(len(c.images) for c in stub.SampleStream(request, timeout=60)) == 8


@pytest.mark.parametrize(
    ("request_of", "field"),
    [
        (lambda: pb.SampleRequest(model="small-queue", count=9), "count"),
        (lambda: pb.SampleRequest(model="small-queue", seeds=list(range(9))), "seeds"),
        (lambda: pb.SampleRequest(model="small-queue", latents=_zeros(9)), "latents.shape[0]"),
        (
            lambda: pb.InterpolateRequest(
                model="small-queue", start=pb.LatentPoint(seed=1), end=pb.LatentPoint(seed=2), steps=9
            ),
            "steps",
        ),
        (lambda: pb.DecodeRequest(model="small-queue", latents=_zeros(9)), "latents.shape[0]"),
        (lambda: pb.EncodeRequest(model="small-queue-enc", images=[_gray8()] * 9), "images"),
    ],
)
def test_a_request_above_the_models_queue_names_its_field_and_the_queue_limit(
    stub: pb_grpc.GenerationServiceStub, request_of: Any, field: str
) -> None:
    # A request is one entry of the model's queue: 9 rows never fit a queue of 8. The answer was
    # "the request needs 9 items ... split it into smaller requests", naming no field.
    request = request_of()
    method = {
        pb.SampleRequest: stub.Sample,
        pb.InterpolateRequest: stub.Interpolate,
        pb.DecodeRequest: stub.Decode,
        pb.EncodeRequest: stub.Encode,
    }[type(request)]
    with pytest.raises(grpc.RpcError) as excinfo:
        method(request, timeout=30)
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    lowest = 2 if field == "steps" else 1  # a path has both ends
    model = "small-queue-enc" if field == "images" else "small-queue"
    assert err.details() == f"{field}: must be in {lowest}..8 ({model}'s batching.max_queue_size), got 9"
    eight = request_of()
    # The same request at the queue's size is served.
    if isinstance(eight, pb.InterpolateRequest):
        eight.steps = 8
    elif isinstance(eight, pb.EncodeRequest):
        del eight.images[8:]
        assert len(stub.Encode(eight, timeout=30).latents) == 8
        return
    elif eight.HasField("latents"):
        eight.latents.CopyFrom(_zeros(8))
    elif eight.seeds:
        del eight.seeds[8:]
    else:
        eight.count = 8
    assert len(method(eight, timeout=30).images) == 8


def _zeros(n: int) -> tpb.Tensor:
    return tpb.Tensor(shape=[n, TINY_LATENT], dtype=tpb.DTYPE_FLOAT32, data=bytes(4 * n * TINY_LATENT))


def _gray8() -> tpb.Image:
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(64), shape=[8, 8, 1])


def test_model_info_says_how_many_images_a_request_may_ask_for(stub: pb_grpc.GenerationServiceStub) -> None:
    # The smaller of max_images_per_request (256 here) and the model's queue; 0 for a model that
    # takes no such count (none here: every model of this repository does).
    assert stub.GetModel(pb.GetModelRequest(name="small-queue")).max_images_per_request == 8
    assert stub.GetModel(pb.GetModelRequest(name="small-queue-enc")).max_images_per_request == 8
    assert stub.GetModel(pb.GetModelRequest(name="gen64")).max_images_per_request == 256


def test_the_cli_samples_more_images_than_the_models_queue_in_calls_it_holds(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `sample --n 20` went out in one call of 20 (the CLI's batches were the server's default limit,
    # 256) and came back INVALID_ARGUMENT from a model whose queue holds 8.
    out = tmp_path / "out"
    code, _, err = cli_main(
        capsys,
        "--target",
        server.target,
        "sample",
        "--model",
        "small-queue",
        "--n",
        "20",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert len(list(out.glob("*.png"))) == 20
