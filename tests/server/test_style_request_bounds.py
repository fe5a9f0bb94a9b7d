"""A style generator's requests against its queues: its rows are mapped (each distinct seed, in one
request to the mapping's queue) and synthesised (one request to its own)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from server_support import ServerProcess, start_server
from style_models import write_style_models

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("style-models")
    names = write_style_models(root)  # generator and mapping: batching.max_queue_size 256
    server = start_server(root, tmp_path_factory.mktemp("style-server"))
    yield server, names
    server.stop()


def test_mixes_whose_seeds_overflow_the_mappings_queue_name_mixes_and_the_limit(
    served: tuple[ServerProcess, dict[str, str]],
) -> None:
    # 129 mixes (within max_images_per_request and the generator's queue, both 256) of 258 distinct
    # seeds: the mapping maps them in one request of 258 rows, more than its queue of 256 holds.
    server, names = served
    mixes = [pb.StyleMix(coarse_seed=2 * i, fine_seed=2 * i + 1, crossover=1) for i in range(129)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.MixStyles(pb.MixStylesRequest(model=names["generator"], mixes=mixes), timeout=60)
        err = excinfo.value
        assert isinstance(err, grpc.Call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(err.details()).startswith("mixes: "), err.details()
        assert "max_queue_size" in str(err.details())
        # The same mixes sharing their seeds (129 distinct) fit, and are served.
        shared = [pb.StyleMix(coarse_seed=i, fine_seed=i + 1, crossover=1) for i in range(128)]
        request = pb.MixStylesRequest(model=names["generator"], mixes=shared)
        assert len(stub.MixStyles(request, timeout=120).images) == 128


@pytest.fixture(scope="module")
def small_mapping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("style-small-mapping")
    names = write_style_models(root, max_batch_size=4, mapping_queue=8)  # the generator's queue: 256
    server = start_server(root, tmp_path_factory.mktemp("style-small-mapping-server"))
    yield server, names
    server.stop()


def test_sample_and_its_stream_are_bounded_by_the_mappings_queue_naming_the_field(
    small_mapping: tuple[ServerProcess, dict[str, str]],
) -> None:
    # Each of a Sample's seeds is mapped in one request to the mapping's queue of 8: 9 never fit. The
    # answer named no field ('the request needs 9 items ... split it into smaller requests'), and a
    # SampleStream's default chunk (64) failed the same way before its first image.
    server, names = small_mapping
    gen = names["generator"]
    limit = "style-mapping's batching.max_queue_size"
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Sample(pb.SampleRequest(model=gen, count=9), timeout=60)
        err = excinfo.value
        assert isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == f"count: must be in 1..8 ({limit}), got 9"
        assert len(stub.Sample(pb.SampleRequest(model=gen, count=8), timeout=60).images) == 8
        stream = pb.SampleStreamRequest(sample=pb.SampleRequest(model=gen, count=20))
        indices = [g.index for chunk in stub.SampleStream(stream, timeout=60) for g in chunk.images]
        assert indices == list(range(20))
        stream.chunk_size = 9
        with pytest.raises(grpc.RpcError) as excinfo:
            list(stub.SampleStream(stream, timeout=60))
        err = excinfo.value
        assert isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == f"chunk_size: must be in 1..8 ({limit}), got 9"
        # An interpolation maps its two ends only: its 20 steps go to the generator's queue.
        path = pb.InterpolateRequest(
            model=gen, start=pb.LatentPoint(seed=1), end=pb.LatentPoint(seed=2), steps=20
        )
        assert len(stub.Interpolate(path, timeout=60).images) == 20
