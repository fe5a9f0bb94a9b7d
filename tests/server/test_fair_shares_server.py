"""Fair shares through a real server (loopback, a tiny slow generator): a one-image Sample completes
within a few batches while big Samples of the same model run. Counted in batches (the server's
genserve_batch_size histogram), not milliseconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_support import (
    TINY_LATENT,
    ServerProcess,
    running_server,
    slow_generator_graph,
    wait_until,
    write_model,
)

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

MODEL = "slow"
BATCH = 4
BIG_REQUESTS = 4
BIG_COUNT = 32  # 4 x 32 rows: 32 batches of 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("fair-models")
    write_model(
        repo,
        MODEL,
        "generator",
        slow_generator_graph(TINY_LATENT, 5000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": BATCH, "max_queue_delay_ms": 1.0, "max_queue_size": 256}},
    )
    with running_server(repo, Path(tmp_path_factory.mktemp("fair-server")), config={"warmup": False}) as srv:
        yield srv


def batches(server: ServerProcess) -> float:
    return server.metric("genserve_batch_size_count", model=MODEL)


def test_a_one_image_sample_completes_within_a_few_batches_while_big_ones_of_its_model_run(
    server: ServerProcess,
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stub.Sample(pb.SampleRequest(model=MODEL, count=BATCH), timeout=60)  # the session's kernels load
        start = batches(server)
        big = [
            stub.Sample.future(
                pb.SampleRequest(model=MODEL, count=BIG_COUNT, base_seed=1000 * i), timeout=120
            )
            for i in range(BIG_REQUESTS)
        ]
        # The big ones are being sliced: a few of their batches have run.
        wait_until(lambda: batches(server) - start >= 3, 60, "the big requests' first batches", 0.01)
        before = batches(server)
        small = stub.Sample(pb.SampleRequest(model=MODEL, count=1, base_seed=7), timeout=120)
        after = batches(server)
        big_done = sum(f.done() for f in big)
        for f in big:
            assert len(f.result().images) == BIG_COUNT
    assert len(small.images) == 1
    # The one running when it came, the one it joined, and one of slack for the scrapes: not the
    # ~29 batches of big rows queued ahead of it.
    assert after - before <= 4, (before, after)
    assert big_done == 0  # they were still running when it finished
    assert batches(server) - start >= BIG_REQUESTS * BIG_COUNT // BATCH
