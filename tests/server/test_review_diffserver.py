"""Review of the session's request bounds: MixStyles maps each distinct seed in one mapping request."""

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
