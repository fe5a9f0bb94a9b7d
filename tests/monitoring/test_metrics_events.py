"""/metrics values against what really happened to each call: streams ended early, code prior steps,
unparsable request bytes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from code_models import write_code_models
from reliability_support import write_gen
from server_support import ServerProcess, metric_in, running_server, start_server, wait_until
from unread_client import UnreadClient

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

STREAM = "/genserve.v1.GenerationService/SampleStream"
RAW = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
WRITE_TIMEOUT_S = 3.0  # longer than the deadline test's deadline


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("review-metrics-models")
    write_gen(root)
    limits = {"stream_write_timeout_s": WRITE_TIMEOUT_S}
    proc = start_server(root, tmp_path_factory.mktemp("review-metrics-server"), config={"limits": limits})
    yield proc
    proc.stop()


def test_a_stream_ended_for_an_unread_client_counts_resource_exhausted_not_ok(server: ServerProcess) -> None:
    """_write_all ends a stream whose client took nothing for stream_write_timeout_s with
    RESOURCE_EXHAUSTED; genserve_requests_total must count it so, not as a finished OK stream."""
    labels = {"model": "gen", "method": "SampleStream"}
    ok_before = server.metric("genserve_requests_total", code="OK", **labels)
    exhausted_before = server.metric("genserve_requests_total", code="RESOURCE_EXHAUSTED", **labels)
    job = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=10**6, base_seed=0, output=RAW))
    unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
    try:
        unread.call(server.target, STREAM, job.SerializeToString())
        wait_until(
            lambda: server.metric("genserve_requests_in_flight", method="SampleStream") >= 1,
            10,
            "the unread stream to run",
            interval_s=0.01,
        )
        wait_until(
            lambda: server.metric("genserve_requests_in_flight", method="SampleStream") == 0,
            10 + WRITE_TIMEOUT_S,
            "the server to end the unread stream",
        )
    finally:
        unread.close()
    ok = server.metric("genserve_requests_total", code="OK", **labels) - ok_before
    exhausted = (
        server.metric("genserve_requests_total", code="RESOURCE_EXHAUSTED", **labels) - exhausted_before
    )
    assert (ok, exhausted) == (0, 1)


def test_a_stream_ended_for_an_unread_client_counts_as_an_unread_drop_not_a_server_fault(
    server: ServerProcess,
) -> None:
    """The stream keeps its RESOURCE_EXHAUSTED (what its client gets if it reads on), and
    genserve_requests_dropped_total{reason="unread"} counts it once, so that GenserveErrorRateHigh can
    leave a client that stopped reading out of the server-side error rate; not as `cancelled` (the
    chunks it computed ahead leave with it) nor as a refusal."""
    labels = {"model": "gen"}

    def counts() -> dict[str, float]:
        text = server.metrics_text()
        out = {
            reason: metric_in(text, "genserve_requests_dropped_total", reason=reason, **labels)
            for reason in ("unread", "cancelled", "deadline")
        }
        out["rejected"] = metric_in(text, "genserve_requests_rejected_total", **labels)
        out["RESOURCE_EXHAUSTED"] = metric_in(
            text, "genserve_requests_total", method="SampleStream", code="RESOURCE_EXHAUSTED", **labels
        )
        return out

    before = counts()
    job = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=10**6, base_seed=0, output=RAW))
    unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
    try:
        unread.call(server.target, STREAM, job.SerializeToString())
        wait_until(
            lambda: server.metric("genserve_requests_in_flight", method="SampleStream") >= 1,
            10,
            "the unread stream to run",
            interval_s=0.01,
        )
        wait_until(
            lambda: server.metric("genserve_requests_in_flight", method="SampleStream") == 0,
            10 + WRITE_TIMEOUT_S,
            "the server to end the unread stream",
        )
        time.sleep(0.5)  # the chunks it computed ahead leave after its handler
    finally:
        unread.close()
    after = counts()
    assert {key: after[key] - before[key] for key in after} == {
        "unread": 1,
        "cancelled": 0,
        "deadline": 0,
        "rejected": 0,
        "RESOURCE_EXHAUSTED": 1,
    }


def _stalled(server: ServerProcess) -> bool:
    """The stream's handler computes no more images: it waits to write to a client that stopped reading."""
    before = server.metric("genserve_images_total", model="gen")
    time.sleep(0.3)
    return server.metric("genserve_images_total", model="gen") == before


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_stream_its_client_stops_reading_and_ends_is_not_counted_ok(
    server: ServerProcess, ending: str
) -> None:
    """A SampleStream whose client reads one chunk, stops reading (the server blocks in its write),
    then cancels or lets its deadline pass is counted CANCELLED or DEADLINE_EXCEEDED, not OK."""
    expected = {"cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}[ending]
    labels = {"model": "gen", "method": "SampleStream"}
    before = {
        code: server.metric("genserve_requests_total", code=code, **labels) for code in ("OK", expected)
    }
    job = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=10**6, base_seed=0, output=RAW))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        timeout_s = WRITE_TIMEOUT_S / 2 if ending == "deadline" else 60.0
        started = time.monotonic()
        chunks = stub.SampleStream(job, timeout=timeout_s)
        next(chunks)
        if ending == "cancel":
            wait_until(lambda: _stalled(server), 20, "the server to block writing to the unread stream")
            chunks.cancel()
        else:  # before stream_write_timeout_s could end it
            time.sleep(max(0.0, started + timeout_s - time.monotonic()))
        wait_until(
            lambda: server.metric("genserve_requests_in_flight", method="SampleStream") == 0,
            10,
            "the server to end the stream",
        )
    after = {code: server.metric("genserve_requests_total", code=code, **labels) for code in ("OK", expected)}
    assert {code: after[code] - before[code] for code in after} == {"OK": 0, expected: 1}


def test_code_prior_steps_count_their_requests_per_batch(tmp_path: Path) -> None:
    """A step of a code prior is its batch (docs/metrics-contract.md): genserve_batch_requests has one
    observation per step as genserve_batch_size has, and a top prior that only a chained prior's
    calls use counts as used (GenserveNoTraffic reads increase(genserve_batch_requests_count))."""
    root = tmp_path / "models"
    root.mkdir()
    names = write_code_models(root, grid=(4, 4), k=16, max_rows=8)
    with running_server(root, tmp_path / "server") as proc:
        before = proc.metrics_text()
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            stub.SampleCodes(pb.SampleCodesRequest(model=names["chain"], count=3, base_seed=1), timeout=60)
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            statistics = {
                model: kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=model), timeout=10).model_stats[
                    0
                ]
                for model in (names["chain"], names["top"])
            }
        after = proc.metrics_text()
    for model in (names["chain"], names["top"]):
        steps = metric_in(after, "genserve_batch_size_count", model=model) - metric_in(
            before, "genserve_batch_size_count", model=model
        )
        per_step = metric_in(after, "genserve_batch_requests_count", model=model) - metric_in(
            before, "genserve_batch_requests_count", model=model
        )
        requests = metric_in(after, "genserve_batch_requests_sum", model=model) - metric_in(
            before, "genserve_batch_requests_sum", model=model
        )
        assert steps > 0, model
        assert (per_step, requests) == (steps, steps), model  # one request in every step
        # KServe's ModelStatistics counts the same executions (it counted none for a prior).
        assert statistics[model].execution_count == steps, model


def test_request_bytes_that_do_not_parse_count_as_rejected_invalid(server: ServerProcess) -> None:
    """limits.guard_malformed refuses them INVALID_ARGUMENT before any handler runs: like the other
    refusals before the boundary (unauthenticated, concurrency), genserve_requests_rejected_total
    counts them, under model="" (reason invalid)."""
    before = server.metric("genserve_requests_rejected_total", model="", reason="invalid")
    with grpc.insecure_channel(server.target) as channel:
        sample = channel.unary_unary(
            "/genserve.v1.GenerationService/Sample",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as info:
            sample(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_until(
        lambda: server.metric("genserve_requests_rejected_total", model="", reason="invalid") == before + 1,
        5,
        "the malformed request to count as rejected{reason=invalid}",
    )
