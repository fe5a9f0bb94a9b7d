"""Faults: broken models at startup, ONNX Runtime errors inside a batch (retried in halves), a cancelled
client."""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from reliability_support import (
    FAIL_AT_BATCH,
    POISON_LATENT,
    code_of,
    health_status,
    sample_ok,
)
from server_support import TINY_LATENT, ServerProcess, sample_calls, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_missing_and_corrupt_model_files_mark_only_those_models_not_serving(channel: grpc.Channel) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    assert health_status(channel) == SERVING
    assert health_status(channel, "gen") == SERVING
    for name, reason in (("missing-file", "file not found"), ("corrupt-file", "")):
        assert health_status(channel, name) == NOT_SERVING, name
        info = stub.GetModel(pb.GetModelRequest(name=name), timeout=10)
        (version,) = info.versions
        assert version.state == pb.MODEL_STATE_UNAVAILABLE
        assert version.reason and reason in version.reason, version.reason
        with_version = stub.GetModel(pb.GetModelRequest(name=name, version="1"), timeout=10)
        assert with_version.versions[0].reason == version.reason
        assert code_of(lambda n=name: sample_ok(channel, n)) == grpc.StatusCode.UNAVAILABLE
    assert (
        "INVALID_PROTOBUF"
        in stub.GetModel(pb.GetModelRequest(name="corrupt-file"), timeout=10).versions[0].reason
    )
    assert len(sample_ok(channel, "gen").images) == 1


def test_a_batch_the_model_cannot_take_is_computed_again_in_halves(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    failures_before = faulty_server.metric("genserve_batch_failures_total", model="flaky")
    f32 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)
    seeds = [5, 6, 7]
    assert len(seeds) == FAIL_AT_BATCH
    response = stub.Sample(pb.SampleRequest(model="flaky", seeds=seeds, output=f32), timeout=30)
    assert sorted(response.provenance.executed_batch_sizes) == [1, 2]
    for seed, image in zip(seeds, response.images, strict=True):  # the same images as alone
        alone = stub.Sample(pb.SampleRequest(model="flaky", seeds=[seed], output=f32), timeout=30)
        assert image.image.data == alone.images[0].image.data, seed
    assert health_status(channel, "flaky") == SERVING
    assert faulty_server.metric("genserve_batch_failures_total", model="flaky") == failures_before + 1
    log = faulty_server.log()
    assert "model flaky version 1: batch of 3 rows from 1 requests failed" in log
    assert "Reshape" in log  # ONNX Runtime's own reason, in the log only
    assert "retrying the batch in halves: every request computed" in log


def test_a_row_the_model_cannot_take_fails_only_its_request_with_internal(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)

    def with_latent(z: np.ndarray) -> pb.SampleRequest:
        # Explicit latents, good and bad alike: requests with seeds form batches of their own.
        data = z.astype("<f4").reshape(1, TINY_LATENT).tobytes()
        latents = tpb.Tensor(shape=[1, TINY_LATENT], dtype=tpb.DTYPE_FLOAT32, data=data)
        return pb.SampleRequest(model="flaky", latents=latents)

    rng = np.random.default_rng(3)
    poison = np.zeros(TINY_LATENT)
    poison[0] = 2 * POISON_LATENT
    others = [
        stub.Sample.future(pb.SampleRequest(model="gen", count=2, base_seed=i), timeout=30) for i in range(4)
    ]
    shared_a_batch = False
    for _ in range(20):  # until the bad row shared a batch with good ones (usually at once)
        retries_before = faulty_server.log().count("retrying the batch in halves: request_ids=")
        good = [stub.Sample.future(with_latent(rng.normal(size=TINY_LATENT)), timeout=30) for _ in range(2)]
        bad = stub.Sample.future(with_latent(poison), timeout=30)
        good += [stub.Sample.future(with_latent(rng.normal(size=TINY_LATENT)), timeout=30) for _ in range(2)]
        try:
            bad.result()
            raise AssertionError("a batch holding the bad row must fail inside ONNX Runtime")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INTERNAL
            details = exc.details() or ""
            assert "model call failed" in details and "Traceback" not in details and "Reshape" not in details
        assert all(len(f.result().images) == 1 for f in good)  # its neighbours were computed again
        if faulty_server.log().count("retrying the batch in halves: request_ids=") > retries_before:
            shared_a_batch = True
            break
    assert shared_a_batch, "the bad row never shared a batch in 20 attempts"
    assert all(len(f.result().images) == 2 for f in others)  # other models' requests were untouched
    assert health_status(channel, "flaky") == SERVING


def test_cancelled_client_frees_its_queue_slot_and_is_not_computed(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    dropped_before = faulty_server.metric("genserve_requests_dropped_total", model="slow", reason="cancelled")
    images_before = faulty_server.metric("genserve_images_total", model="slow")
    # slow: batches of 4 take a few hundred ms; A1 runs, A2 waits, then B (2 rows) waits behind A2.
    calls_before = sample_calls(faulty_server, "slow")
    a1 = stub.Sample.future(pb.SampleRequest(model="slow", count=4, base_seed=1), timeout=60)
    wait_until(lambda: sample_calls(faulty_server, "slow") - calls_before >= 1, 10, "A1 in the server", 0.01)
    a2 = stub.Sample.future(pb.SampleRequest(model="slow", count=4, base_seed=2), timeout=60)
    b = stub.Sample.future(pb.SampleRequest(model="slow", count=2, base_seed=3), timeout=60)
    wait_until(lambda: faulty_server.metric("genserve_queue_depth", model="slow") >= 6, 10, "B to be queued")
    b.cancel()
    assert len(a1.result().images) == 4 and len(a2.result().images) == 4
    assert b.cancelled()
    wait_until(lambda: faulty_server.metric("genserve_queue_depth", model="slow") == 0, 10, "an empty queue")
    wait_until(
        lambda: (
            faulty_server.metric("genserve_requests_dropped_total", model="slow", reason="cancelled")
            == dropped_before + 1
        ),
        10,
        "the cancelled request to be counted as dropped",
    )
    assert faulty_server.metric("genserve_images_total", model="slow") == images_before + 8  # B never ran
    assert len(sample_ok(channel, "slow", timeout_s=30).images) == 1
