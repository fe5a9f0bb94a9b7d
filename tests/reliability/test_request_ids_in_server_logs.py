"""The request id of a call is on the server's log lines about it (docs/metrics.md, "Logs and the
request id"): an operator greps the server's logs for the id a client quotes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from reliability_support import POISON_LATENT, write_flaky, write_gen, write_slow
from server_support import TINY_LATENT, ServerProcess, held_batch_app, metric_in, start_server

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb


def _poisoned() -> pb.SampleRequest:
    z = np.zeros((1, TINY_LATENT), np.float32)
    z[0, 0] = 2 * POISON_LATENT  # fails the model call of any batch it is in (reliability_support)
    latents = tpb.Tensor(shape=[1, TINY_LATENT], dtype=tpb.DTYPE_FLOAT32, data=z.astype("<f4").tobytes())
    return pb.SampleRequest(model="flaky", latents=latents)


def test_every_call_a_failed_model_call_fails_names_its_request_id_in_the_log(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    """The runbook (docs/metrics.md, GenserveErrorRateHigh): 'find the request id of a failed call in
    the client and grep the server's JSON logs for it'. The batcher's ERROR line named no request,
    and the boundary's line for an INTERNAL call is throttled like a client's refusals (the first per
    10 s at INFO, the others at DEBUG): the ids of all but one failed call were nowhere in the log."""
    stub = pb_grpc.GenerationServiceStub(channel)
    ids = [f"failed-model-call-{i}" for i in range(4)]
    for rid in ids[:2]:  # one at a time: batches of their own
        try:
            stub.Sample(_poisoned(), metadata=(("x-request-id", rid),), timeout=30)
            raise AssertionError("the poisoned row must fail its model call")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INTERNAL, exc
            assert ("x-request-id", rid) in tuple(exc.trailing_metadata() or ())
    together = [
        stub.Sample.future(_poisoned(), metadata=(("x-request-id", rid),), timeout=30) for rid in ids[2:]
    ]
    for future in together:  # a batch of several calls, each failing
        assert future.exception() is not None and future.code() == grpc.StatusCode.INTERNAL
    log = faulty_server.log()
    missing = [rid for rid in ids if rid not in log]
    assert not missing, f"request ids of failed calls not in the server log: {missing}"


def test_a_failed_model_call_names_the_request_id_in_its_status_message(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    """docs/operations.md: a row the model cannot take fails its request with INTERNAL ("model call
    failed", with the request id), and the runbook has the operator grep the log for the id the
    client quotes. The message said only 'model flaky version 1: model call failed': a client that
    shows no trailing metadata (grpcurl, tritonclient's exceptions) had no id to quote, where an
    unexpected error's INTERNAL says 'internal error (request id X)'."""
    stub = pb_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as failed:
        stub.Sample(_poisoned(), metadata=(("x-request-id", "rid-in-the-message"),), timeout=30)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    details = failed.value.details() or ""
    assert "model call failed" in details and details.endswith("(request id rid-in-the-message)"), details
    with pytest.raises(grpc.RpcError) as unnamed:  # no id of the client's: the server's own, echoed
        stub.Sample(_poisoned(), timeout=30)
    made = _trailing_id(unnamed.value)
    assert made and (unnamed.value.details() or "").endswith(f"(request id {made})"), unnamed.value.details()


def test_a_call_slowed_by_its_batch_being_retried_in_halves_finds_its_id_on_that_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call that shared a batch with a row the model cannot take gets its image after the batch is
    run again in halves (docs/operations.md): late, OK, and its id on no line at the default level.
    The only trace of why it was slow, 'retrying the N rows of a failed batch in halves', named no
    request: an operator following the slow call by its id could not find it. The two calls are
    queued behind a batch held on an event, so they share the next batch (no timing race: sent
    side by side to an idle server, they often went in batches of their own)."""
    write_flaky(tmp_path)

    async def main() -> None:
        z = np.random.default_rng(5).normal(size=(1, TINY_LATENT)).astype("<f4")
        good_request = pb.SampleRequest(
            model="flaky",
            latents=tpb.Tensor(shape=[1, TINY_LATENT], dtype=tpb.DTYPE_FLOAT32, data=z.tobytes()),
        )
        async with held_batch_app(tmp_path, "flaky") as held:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{held.app.port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                first = asyncio.ensure_future(
                    stub.Sample(pb.SampleRequest(model="flaky", seeds=[1]), timeout=60)
                )
                await asyncio.wait_for(held.started.wait(), 30)  # it holds the model while two calls queue
                good = asyncio.ensure_future(
                    stub.Sample(good_request, metadata=(("x-request-id", "retried-in-halves"),), timeout=60)
                )
                bad = asyncio.ensure_future(stub.Sample(_poisoned(), timeout=60))
                for _ in range(600):  # both rows queued behind the held batch
                    if held.batcher.queued_rows >= 2:
                        break
                    await asyncio.sleep(0.05)
                assert held.batcher.queued_rows == 2
                held.free.set()
                await first
                assert len((await good).images) == 1
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await bad
                assert failed.value.code() == grpc.StatusCode.INTERNAL

    with caplog.at_level(logging.WARNING, logger="genserve_server"):
        asyncio.run(asyncio.wait_for(main(), 120))
    retries = [r.getMessage() for r in caplog.records if "retrying the" in r.getMessage()]
    assert retries and any("retried-in-halves" in line for line in retries), retries


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """--log-level DEBUG: every refused call's line, not only the first of its kind per 10 s."""
    root = tmp_path_factory.mktemp("request-id-models")
    write_gen(root)
    write_slow(root, "slow", iterations=20000, queue=64, batch=4)
    limits = {"request_timeout_s": 1.0, "max_concurrent_sample_streams": 1}
    proc = start_server(
        root,
        tmp_path_factory.mktemp("request-id-server"),
        config={"limits": limits},
        extra_args=("--log-level", "DEBUG"),
    )
    yield proc
    proc.stop()


def _trailing_id(exc: grpc.RpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get("x-request-id")  # type: ignore[attr-defined]


def test_calls_refused_before_their_handler_echo_and_log_their_request_id(
    debug_server: ServerProcess,
) -> None:
    """docs/metrics.md: every RPC's id comes back in its trailing metadata and is on every log line
    about it; a refused call (bytes that are not a request, a call over a concurrency limit, a call
    whose request never came) is logged 'each with its request id'. Those refused by the admission
    layer, before the boundary, had no id on their line and none in their trailing metadata."""
    with grpc.insecure_channel(debug_server.target) as channel:
        raw = channel.unary_unary("/genserve.v1.GenerationService/Sample")
        with pytest.raises(grpc.RpcError) as malformed:
            raw(b"\xff\xff\xff\xff", metadata=(("x-request-id", "rid-not-a-request"),), timeout=10)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        never = channel.stream_unary("/genserve.v1.GenerationService/Sample")
        release = threading.Event()  # headers only, never a request message
        try:
            with pytest.raises(grpc.RpcError) as timed_out:
                never(iter(release.wait, True), metadata=(("x-request-id", "rid-no-request"),), timeout=10)
        finally:
            release.set()
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        stub = pb_grpc.GenerationServiceStub(channel)
        holder = stub.SampleStream(
            pb.SampleStreamRequest(sample=pb.SampleRequest(model="slow", count=400), chunk_size=4), timeout=60
        )
        try:
            next(holder)  # holds the one SampleStream slot
            with pytest.raises(grpc.RpcError) as over:
                next(
                    stub.SampleStream(
                        pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=1)),
                        metadata=(("x-request-id", "rid-over-the-limit"),),
                        timeout=10,
                    )
                )
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            holder.cancel()
    echoed = {
        "rid-not-a-request": _trailing_id(malformed.value),
        "rid-no-request": _trailing_id(timed_out.value),
        "rid-over-the-limit": _trailing_id(over.value),
    }
    log = debug_server.log()
    problems = [
        f"{rid}: echoed {got!r}, in the log: {rid in log}"
        for rid, got in echoed.items()
        if got != rid or rid not in log
    ]
    assert not problems, problems


def test_kserve_metadata_calls_that_succeed_return_their_request_id(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    """docs/metrics.md: every RPC's id comes back in the trailing metadata. KServe's probe and
    metadata RPCs (liveness, readiness, metadata, config, statistics) returned it only when they
    failed, or never (ServerLive, ServerReady, ServerMetadata)."""
    from genserve.kserve import grpc_service_pb2 as kpb
    from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    calls = {
        "ServerLive": (stub.ServerLive, kpb.ServerLiveRequest()),
        "ServerReady": (stub.ServerReady, kpb.ServerReadyRequest()),
        "ServerMetadata": (stub.ServerMetadata, kpb.ServerMetadataRequest()),
        "ModelReady": (stub.ModelReady, kpb.ModelReadyRequest(name="flaky")),
        "ModelMetadata": (stub.ModelMetadata, kpb.ModelMetadataRequest(name="flaky")),
        "ModelConfig": (stub.ModelConfig, kpb.ModelConfigRequest(name="flaky")),
        "ModelStatistics": (stub.ModelStatistics, kpb.ModelStatisticsRequest(name="flaky")),
    }
    for name, (method, request) in calls.items():
        rid = f"kserve-{name}"
        _, call = method.with_call(request, metadata=(("x-request-id", rid),), timeout=30)
        assert ("x-request-id", rid) in tuple(call.trailing_metadata() or ()), (
            name,
            call.trailing_metadata(),
        )


def test_health_checks_return_their_request_id(channel: grpc.Channel, faulty_server: ServerProcess) -> None:
    """docs/metrics.md: every RPC's id comes back in its trailing metadata. grpc.health.v1 Check (the
    probe Kubernetes and load balancers call) and List returned none, answered or refused (NOT_FOUND
    for a service the server does not know), though KServe's probes (ServerLive, ServerReady) do."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    _, call = stub.Check.with_call(
        health_pb2.HealthCheckRequest(service=""), metadata=(("x-request-id", "health-check"),), timeout=30
    )
    echoed = {"health-check": dict(call.trailing_metadata() or ()).get("x-request-id")}
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(
            health_pb2.HealthCheckRequest(service="no-such-service"),
            metadata=(("x-request-id", "health-check-unknown"),),
            timeout=30,
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    echoed["health-check-unknown"] = _trailing_id(unknown.value)
    _, call = stub.List.with_call(
        health_pb2.HealthListRequest(), metadata=(("x-request-id", "health-list"),), timeout=30
    )
    echoed["health-list"] = dict(call.trailing_metadata() or ()).get("x-request-id")
    assert echoed == {rid: rid for rid in echoed}, echoed


def test_kserve_metadata_calls_refused_log_their_request_id(debug_server: ServerProcess) -> None:
    """docs/metrics.md: a refused call (an unknown model among them) is logged, the first of its
    kind at info and the others at debug, 'each with its request id'. KServe's ModelMetadata,
    ModelConfig and ModelStatistics refused NOT_FOUND with no log line at all, at any level: the
    id a client quotes was nowhere in the log (genserve.v1 GetModel's refusal has its line)."""
    from genserve.kserve import grpc_service_pb2 as kpb
    from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc

    with grpc.insecure_channel(debug_server.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        calls = {
            "ModelMetadata": (stub.ModelMetadata, kpb.ModelMetadataRequest(name="no-such-model")),
            "ModelConfig": (stub.ModelConfig, kpb.ModelConfigRequest(name="no-such-model")),
            "ModelStatistics": (stub.ModelStatistics, kpb.ModelStatisticsRequest(name="no-such-model")),
        }
        for name, (method, request) in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                method(request, metadata=(("x-request-id", f"rid-refused-{name}"),), timeout=30)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, name
    log = debug_server.log()
    missing = [name for name in calls if f"rid-refused-{name}" not in log]
    assert not missing, f"refused KServe calls not in the server log: {missing}"


def test_a_method_no_service_has_is_unimplemented_and_echoes_and_logs_its_request_id(
    debug_server: ServerProcess,
) -> None:
    """docs/metrics.md: every RPC gets a request id, returned in its trailing metadata and on the log
    line about it. A method no servicer has (a client of another version, a typo) got gRPC's own
    UNIMPLEMENTED 'Method not found!': no id back, no line at any level."""
    methods = {
        "rid-unknown-method": "/genserve.v1.GenerationService/NoSuchMethod",
        "rid-unknown-service": "/no.such.v1.Service/Do",
    }
    with grpc.insecure_channel(debug_server.target) as channel:
        for rid, method in methods.items():
            with pytest.raises(grpc.RpcError) as unary:
                channel.unary_unary(method)(b"\x08\x01", metadata=(("x-request-id", rid),), timeout=30)
            assert unary.value.code() == grpc.StatusCode.UNIMPLEMENTED, unary.value
            assert method in (unary.value.details() or ""), unary.value.details()  # type: ignore[attr-defined]
            assert _trailing_id(unary.value) == rid
        streamed = channel.stream_stream(methods["rid-unknown-service"])(
            iter([b"", b""]), metadata=(("x-request-id", "rid-unknown-stream"),), timeout=30
        )
        with pytest.raises(grpc.RpcError) as stream:
            list(streamed)
        assert stream.value.code() == grpc.StatusCode.UNIMPLEMENTED, stream.value
        assert _trailing_id(stream.value) == "rid-unknown-stream"
    log = debug_server.log()
    missing = [rid for rid in [*methods, "rid-unknown-stream"] if rid not in log]
    assert not missing, f"calls of unknown methods not in the server log: {missing}"


def test_calls_of_methods_no_service_has_are_counted_under_one_bounded_method_label(
    debug_server: ServerProcess,
) -> None:
    """docs/metrics.md: genserve_requests_total{code} counts every refused call (their log lines are
    throttled on that promise), under model="" where none resolved. A call of a method no service
    has was answered UNIMPLEMENTED and counted nowhere. Counted, its method label is one fixed value
    (method=""), never the client's path: any path a client makes up would be a new series."""
    paths = [
        "/genserve.v1.GenerationService/NoSuch",
        "/foo/bar",
        *(f"/made.up.v{i}.Service/Call{i}" for i in range(3)),
    ]
    # The module's server is shared: an earlier test's call of an unknown method (the streamed one
    # above) is counted as it ends, which can come after its client has the status, so it could land
    # between the two scrapes (seen in a clean-clone CI: 6 of 5). Take "before" once it holds still.
    before = debug_server.metrics_text()
    settle_deadline = time.monotonic() + 10
    while time.monotonic() < settle_deadline:
        time.sleep(0.3)
        again = debug_server.metrics_text()
        name = "genserve_requests_total"
        if metric_in(again, name, code="UNIMPLEMENTED") == metric_in(before, name, code="UNIMPLEMENTED"):
            break
        before = again
    with grpc.insecure_channel(debug_server.target) as channel:
        for path in paths:
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(path)(b"", timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value
    after = debug_server.metrics_text()

    def added(**labels: str) -> float:
        name = "genserve_requests_total"
        return metric_in(after, name, **labels) - metric_in(before, name, **labels)

    # The server counts a call as it ends, which may come a moment after its client has the status:
    # the last call's count can miss a scrape taken at once (seen on a loaded machine: 4 of 5).
    deadline = time.monotonic() + 10
    while (
        added(model="", version="", method="", code="UNIMPLEMENTED") < len(paths)
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
        after = debug_server.metrics_text()
    assert added(model="", version="", method="", code="UNIMPLEMENTED") == len(paths)
    assert added(code="UNIMPLEMENTED") == len(paths)  # no series of its own per path
    counted = [line for line in after.splitlines() if line.startswith("genserve_requests_total{")]
    leaked = [line for line in counted if any(part in line for part in ("NoSuch", "foo", "made.up", "Call"))]
    assert not leaked, leaked


def test_server_reflection_returns_its_request_id(debug_server: ServerProcess) -> None:
    """docs/metrics.md: every RPC's id comes back in its trailing metadata; server reflection's
    (grpcurl, Postman) returned none."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(debug_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=(("x-request-id", "rid-reflection"),),
            timeout=30,
        )
        responses = list(call)
        assert responses and responses[0].HasField("list_services_response")
        assert dict(call.trailing_metadata() or ()).get("x-request-id") == "rid-reflection"


def test_a_kserve_infer_requests_id_is_its_request_id_where_no_x_request_id_is_sent(
    debug_server: ServerProcess,
) -> None:
    """Triton's clients name a ModelInfer by the request's `id` (it comes back in the response), not
    by x-request-id metadata: that id was nowhere in the server's log. Where the call sends no
    x-request-id, a safe `id` (the x-request-id rules) is the call's request id, on its log lines
    and in its trailing metadata; one that could forge a log field is not; x-request-id wins."""
    from genserve.kserve import grpc_service_pb2 as kpb
    from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc

    def infer(request_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> str | None:
        request = kpb.ModelInferRequest(model_name="no-such-model", id=request_id)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        return _trailing_id(refused.value)

    with grpc.insecure_channel(debug_server.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert infer("triton-infer-7") == "triton-infer-7"
        forged = infer("x code=OK")
        assert forged not in (None, "x code=OK")
        assert infer("triton-infer-8", (("x-request-id", "rid-metadata-8"),)) == "rid-metadata-8"
    log = debug_server.log()
    assert "request_id=triton-infer-7 " in log, log
    assert f"request_id={forged} " in log and "x code=OK" not in log, log
    assert "request_id=rid-metadata-8 " in log and "triton-infer-8" not in log, log


def test_a_flood_of_failed_model_calls_logs_each_request_id_once_and_at_most_a_line_per_call(
    channel: grpc.Channel, faulty_server: ServerProcess
) -> None:
    """docs/operations.md: one ERROR line per failed call, naming the request ids of the calls whose
    rows it held. A model whose every call fails wrote ~2.2 WARNING/ERROR lines per request: the
    batch's ERROR named every id, a per-call WARNING named each again, and the retry in halves added
    a WARNING and an ERROR per half, the same ids on each. Now each failed call's id is on one line."""
    stub = pb_grpc.GenerationServiceStub(channel)
    ids = [f"flood-{client}-{i}" for client in range(5) for i in range(8)]
    since = len(faulty_server.log().splitlines())

    def client(rids: list[str]) -> None:
        for rid in rids:
            with pytest.raises(grpc.RpcError) as failed:
                stub.Sample(_poisoned(), metadata=(("x-request-id", rid),), timeout=30)
            assert failed.value.code() == grpc.StatusCode.INTERNAL

    threads = [threading.Thread(target=client, args=(ids[c * 8 : (c + 1) * 8],)) for c in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    new = faulty_server.log().splitlines()[since:]
    loud = [line for line in new if " WARNING " in line or " ERROR " in line]
    assert len(loud) <= len(ids), f"{len(loud)} WARNING/ERROR lines for {len(ids)} failed calls: {loud[:12]}"
    for rid in ids:  # every failed call's id findable, on one line
        naming = [line for line in new if f"{rid}," in line or f"{rid})" in line or f"{rid} " in line]
        assert len(naming) == 1, (rid, naming)


def test_a_call_whose_outputs_do_not_fit_it_is_named_on_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model whose output shape changed between two batches of one call (its rows in two batches):
    the batcher's ERROR line names the call's request id, and the boundary wrote a WARNING per call
    naming it again (the failure was not marked logged, as a failed batch's is): two lines for one
    failed call where docs/operations.md promises one."""
    write_gen(tmp_path, batching={"max_batch_size": 2, "max_queue_delay_ms": 1.0, "max_queue_size": 16})

    async def main() -> None:
        async with held_batch_app(tmp_path, "gen") as held:
            held.free.set()
            run = held.batcher._run_batch
            batches = 0

            async def changed_shape(key: object, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                nonlocal batches
                batches += 1
                outputs = dict(await run(key, inputs))
                if batches == 2:  # the call's second batch: images of another size
                    outputs = {k: v[..., :4, :4] if v.ndim == 4 else v for k, v in outputs.items()}
                return outputs

            held.batcher._run_batch = changed_shape
            async with grpc.aio.insecure_channel(f"127.0.0.1:{held.app.port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Sample(
                        pb.SampleRequest(model="gen", seeds=[1, 2, 3]),
                        metadata=(("x-request-id", "outputs-misfit"),),
                        timeout=60,
                    )
                assert failed.value.code() == grpc.StatusCode.INTERNAL
                assert "outputs did not fit" in (failed.value.details() or "")

    with caplog.at_level(logging.WARNING, logger="genserve_server"):
        asyncio.run(asyncio.wait_for(main(), 120))
    naming = [r.getMessage() for r in caplog.records if "outputs-misfit" in r.getMessage()]
    assert len(naming) == 1 and "could not be handed to its requests" in naming[0], naming
