"""Limits an operator may lower, against the image kinds and code priors: a request that can never
succeed must be refused before compute, INVALID_ARGUMENT naming its field and the limit (never
RESOURCE_EXHAUSTED, which clients retry)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from code_models import write_code_models
from server_support import ServerProcess, start_server

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

MIB = 1024 * 1024
RAW = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("limits2-models")
    # 48x48 grids: a sample's int64 grid is 18 KiB, its gray image 2.25 KiB; a row budget of 64. Two
    # codes (the grids' bytes are int64 whatever the codebook): each of a grid's 2,304 steps computes
    # the prior's logits [rows, K, 48, 48], ~6x faster than at the default K=16.
    write_code_models(root, grid=(48, 48), max_rows=64, n_classes=0, k=2)
    proc = start_server(
        root, tmp_path_factory.mktemp("limits2-server"), config={"limits": {"max_send_message_bytes": MIB}}
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    options = [("grpc.max_receive_message_length", 64 * MIB)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.mark.parametrize("rpc", ["SampleCodes", "SampleCodesStream"])
def test_sample_codes_whose_returned_grids_exceed_the_send_limit_is_refused_before_sampling(
    stub: pb_grpc.GenerationServiceStub, rpc: str
) -> None:
    # 64 grids of 18 KiB (1.1 MiB) besides 144 KiB of images: the images alone were checked, every
    # grid was sampled (2,304 steps), then the send failed RESOURCE_EXHAUSTED "Sent message larger
    # than max" (clients retry it), with a traceback in the server's log.
    request = pb.SampleCodesRequest(model="prior", count=64, base_seed=1, output=RAW, return_codes=True)
    call: Any = (
        stub.SampleCodes
        if rpc == "SampleCodes"
        else (lambda r, timeout: list(stub.SampleCodesStream(r, timeout=timeout)))
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        call(request, timeout=60)
    err: Any = excinfo.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("output: ")
    assert "max_send_message_bytes=1048576" in err.details() and "return_codes" in err.details()
    # Within the limit it is served, grids and all.
    request.count = 1
    response = stub.SampleCodes(request, timeout=60)
    assert len(response.images) == 1 and len(response.codes) == 1


@pytest.mark.parametrize("quality", [90, 95])
def test_sample_codes_returning_grids_beside_jpeg_images_that_fit_is_served(
    stub: pb_grpc.GenerationServiceStub, quality: int
) -> None:
    # 44 grids of 18 KiB besides 44 JPEGs of 48x48 gray: ~0.9 MiB, under max_send_message_bytes=1 MiB.
    # JPEG and WebP are checked after encoding (docs/operations.md): their response budget reservation
    # (validate.lossy_reservation: twice the pixels + 1 KiB an image at quality 95 and above) is no
    # response size, yet it refused the call before sampling, INVALID_ARGUMENT 'the response would be
    # 1085392 bytes', for a response of less than 1 MiB.
    out = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG, quality=quality)
    request = pb.SampleCodesRequest(model="prior", count=44, base_seed=1, output=out, return_codes=True)
    response = stub.SampleCodes(request, timeout=120)
    assert len(response.images) == 44 and len(response.codes) == 44
    assert response.ByteSize() < MIB


def test_sample_codes_whose_encoded_jpeg_response_exceeds_the_send_limit_names_output(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # JPEG is checked once encoded: 44 grids besides 44 noise-like q100 JPEGs pass the limit with the
    # send overhead: INVALID_ARGUMENT naming output (never RESOURCE_EXHAUSTED at the send).
    out = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG, quality=100)
    request = pb.SampleCodesRequest(model="prior", count=44, base_seed=1, output=out, return_codes=True)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SampleCodes(request, timeout=120)
    err: Any = excinfo.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("output: ") and "max_send_message_bytes=1048576" in err.details()


def test_sample_codes_stream_whose_encoded_jpeg_result_exceeds_the_send_limit_names_output(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # The stream's result is checked once encoded as SampleCodes' is: its previews (images only) fit
    # and are sent, then the stream ends INVALID_ARGUMENT naming output, never RESOURCE_EXHAUSTED at
    # the send of a result chunk over the limit.
    out = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG, quality=100)
    request = pb.SampleCodesRequest(
        model="prior", count=44, base_seed=1, output=out, return_codes=True, preview_every=1152
    )
    chunks: list[pb.SampleCodesChunk] = []
    with pytest.raises(grpc.RpcError) as excinfo:
        for chunk in stub.SampleCodesStream(request, timeout=120):
            chunks.append(chunk)
    err: Any = excinfo.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("output: ") and "max_send_message_bytes=1048576" in err.details()
    assert chunks and not any(c.HasField("result") for c in chunks)
    assert all(len(c.previews) == 44 for c in chunks)
