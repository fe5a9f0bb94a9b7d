"""A client's deadline at each stage a request passes through, against a real server on 127.0.0.1:
the client gets DEADLINE_EXCEEDED when its deadline passes, the server stops spending on the call,
and the call counts once in genserve_requests_dropped_total{reason="deadline"} (docs/metrics.md),
not as a caller that went away (`cancelled`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from code_models import write_code_models
from server_support import ServerProcess, metric_in, start_server, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("deadline-models")
    # A prior whose step costs ~10 ms (64 steps a grid): a deadline passes between its steps.
    names = write_code_models(root, grid=(8, 8), iterations=40)
    assert names["prior"] == "prior"
    process = start_server(root, tmp_path_factory.mktemp("deadline-server"), config={"warmup": False})
    yield process
    process.stop()


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
        assert (deadline - before[0], cancelled - before[1]) == (calls, 0)
        # The rows left: no step runs for the calls after their deadlines.
        steps = server.metric("genserve_batch_size_count", model="prior")
        time.sleep(0.3)
        assert server.metric("genserve_batch_size_count", model="prior") == steps > steps_before
