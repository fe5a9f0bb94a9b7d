"""The memory budgets (docs/operations.md, "Memory budgets"): every generation RPC's
unsent unary response is held against `response_budget_bytes`.

One server with a 2 MiB response budget and a 1 s wait for it, and a VAE encoder with a wide latent:
an Encode of 16 images with `sample` answers 16 x 3 x 8192 float32 = 1.5 MiB of latents.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from code_models import prior_graph
from reliability_support import rss_bytes
from server_support import ServerProcess, metric_in, start_server, wait_until, write_model, write_vae_encoder
from unread_client import UnreadClient

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb

MIB = 1024 * 1024
BUDGET = 2 * MIB
WIDE_LATENT = 8192
ENCODE_IMAGES = 16
ENCODE_RESPONSE = ENCODE_IMAGES * 3 * WIDE_LATENT * 4  # mu, logvar and z: 1.5 MiB
CODES_GRID = (32, 32)
CODES_ROWS = 16
# int64 grids: 128 KiB, above the 64 KiB HTTP/2 window
CODES_RESPONSE = CODES_ROWS * CODES_GRID[0] * CODES_GRID[1] * 8


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("budget-models")
    write_vae_encoder(root, "wide-enc", latent_dim=WIDE_LATENT)
    # A code prior without a decoder: SampleCodes answers its grids (int64) only.
    write_model(
        root,
        "codes-only",
        "code_prior",
        prior_graph(*CODES_GRID, 4),
        {"grid": list(CODES_GRID), "codebook_size": 4, "output_range": None},
        config={"batching": {"max_batch_size": CODES_ROWS, "max_queue_size": 64}},
    )
    config = {"warmup": False, "limits": {"response_budget_bytes": BUDGET, "budget_max_wait_s": 1.0}}
    server = start_server(root, tmp_path_factory.mktemp("budget-server"), config=config)
    yield server
    server.stop()


def _gray_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", pixels)
    assert ok
    return bytes(buf.tobytes())


def test_unread_encode_responses_are_held_to_the_response_budget(budget_server: ServerProcess) -> None:
    """Encode is a generation RPC; its unsent responses must count against response_budget_bytes
    like Sample's, so that a client that never reads them cannot grow the server without bound."""
    server = budget_server
    images = [tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=_gray_png(i)) for i in range(ENCODE_IMAGES)]
    request = pb.EncodeRequest(model="wide-enc", images=images, sample=True, seed=1).SerializeToString()
    path = "/genserve.v1.GenerationService/Encode"
    calls = 40
    refused_before = server.metric("genserve_requests_total", method="Encode", code="RESOURCE_EXHAUSTED")
    # Every Encode the server answered before this test (of the tests before it), whatever its code.
    ended_before = server.metric("genserve_requests_total", method="Encode")
    baseline = rss_bytes(server.pid)
    unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
    try:
        for _ in range(calls):
            unread.call(server.target, path, request)

        def settled() -> bool:
            done = server.metric("genserve_requests_total", method="Encode") - ended_before
            return done >= calls  # every call of this test answered (OK, unsent) or refused

        wait_until(settled, 60, "every Encode call to end its handler")
        grown = rss_bytes(server.pid) - baseline
        pending = server.metric("genserve_response_bytes_pending")
        refused = (
            server.metric("genserve_requests_total", method="Encode", code="RESOURCE_EXHAUSTED")
            - refused_before
        )
        # One response fits the 2 MiB budget; the others wait 1 s for it and are refused. Without the
        # budget all 40 (60 MiB) stay in the server's buffers.
        assert pending >= ENCODE_RESPONSE, (pending, refused, grown)
        assert refused >= calls - 2, (pending, refused, grown)
        # Measured: 12 MB with the budget, 222 MB without it.
        assert grown < 48 * MIB, (pending, refused, grown)
    finally:
        unread.close()
    wait_until(
        lambda: server.metric("genserve_response_bytes_pending") == 0, 30, "the unsent bytes to be released"
    )


def test_an_encode_that_leaves_while_it_waits_for_the_response_budget_is_counted_dropped(
    budget_server: ServerProcess,
) -> None:
    """docs/metrics.md: genserve_requests_dropped_total counts admitted requests that leave before
    their work is done, by `deadline` or `cancelled`. A call whose deadline passed (or whose client
    went away) while it waited for the response budget was answered DEADLINE_EXCEEDED (CANCELLED)
    and counted nowhere but genserve_requests_total: an operator watching drops missed it."""
    import grpc

    from genserve.v1 import genserve_pb2_grpc as pb_grpc

    server = budget_server
    images = [tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=_gray_png(i)) for i in range(ENCODE_IMAGES)]
    encode = pb.EncodeRequest(model="wide-enc", images=images, sample=True, seed=1)

    def dropped() -> tuple[float, float]:
        text = server.metrics_text()
        return (
            metric_in(text, "genserve_requests_dropped_total", model="wide-enc", reason="deadline"),
            metric_in(text, "genserve_requests_dropped_total", model="wide-enc", reason="cancelled"),
        )

    unread = UnreadClient(server.port)
    try:
        # One unread response (1.5 MiB) holds the 2 MiB budget: the next Encode waits for it.
        unread.call(server.target, "/genserve.v1.GenerationService/Encode", encode.SerializeToString())
        wait_until(
            lambda: server.metric("genserve_response_bytes_pending") >= ENCODE_RESPONSE,
            60,
            "the unread response to hold the budget",
        )
        before = dropped()
        timed_out = server.metric("genserve_requests_total", method="Encode", code="DEADLINE_EXCEEDED")
        # Calls whose 0.3 s deadline the server ends (gRPC's end of the call or the budget's timer,
        # whichever runs first: each counts). Not a gRPC client's: at its own deadline it sends
        # RST_STREAM CANCEL, which the server cannot tell from a client going away, and its request
        # reaches the server later than it was sent (a loaded machine: 60 ms late, its cancel came
        # 58-114 ms before the server's deadline and was counted `cancelled`, as gRPC's core reports it).
        calls = 4
        path = "/genserve.v1.GenerationService/Encode"
        streams = [
            unread.call(server.target, path, encode.SerializeToString(), timeout_ms=300) for _ in range(calls)
        ]
        wait_until(lambda: set(streams) <= unread.ended, 30, "the server to end each call at its deadline")
        wait_until(lambda: dropped()[0] - before[0] >= calls, 10, "each call counted a deadline drop")
        assert dropped() == (before[0] + calls, before[1])
        ended = server.metric("genserve_requests_total", method="Encode", code="DEADLINE_EXCEEDED")
        assert ended - timed_out == calls  # what each client got
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            # A client that goes away while its call waits: a drop, `cancelled`.
            # Its images decoded (off the loop: a busy machine may take longer than any fixed sleep),
            # the call goes on to wait for the budget in the same turn of the loop: the cancel
            # comes in that wait (one during the decode is a drop too: test_deadline_stages.py).
            decoded = server.metric("genserve_decode_duration_seconds_count", model="wide-enc")
            gone = stub.Encode.future(encode, timeout=30)
            wait_until(
                lambda: server.metric("genserve_decode_duration_seconds_count", model="wide-enc") > decoded,
                10,
                "the call to wait for the budget",
            )
            gone.cancel()
            wait_until(lambda: dropped()[1] - before[1] >= 1, 10, "the call counted a cancelled drop")
            assert dropped() == (before[0] + calls, before[1] + 1)
    finally:
        unread.close()
    wait_until(
        lambda: server.metric("genserve_response_bytes_pending") == 0, 30, "the unsent bytes to be released"
    )


def test_an_encode_refused_when_its_response_budget_wait_runs_out_is_counted_rejected_budget(
    budget_server: ServerProcess,
) -> None:
    """docs/metrics.md: genserve_requests_rejected_total says by reason why calls are refused. A call
    that waited budget_max_wait_s (1 s here) for the response budget, well before its deadline, was
    answered RESOURCE_EXHAUSTED naming response_budget_bytes and counted in no reason (nor as a
    drop): an operator watching refusals by reason saw nothing of a budget too small for the load.
    Now `budget`, once per call, and never also a drop."""
    import grpc

    from genserve.v1 import genserve_pb2_grpc as pb_grpc

    server = budget_server
    images = [tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=_gray_png(i)) for i in range(ENCODE_IMAGES)]
    encode = pb.EncodeRequest(model="wide-enc", images=images, sample=True, seed=1)

    def counts() -> tuple[float, float, float]:
        text = server.metrics_text()
        return (
            metric_in(text, "genserve_requests_rejected_total", model="wide-enc", reason="budget"),
            metric_in(text, "genserve_requests_dropped_total", model="wide-enc"),
            metric_in(text, "genserve_requests_total", model="wide-enc", code="RESOURCE_EXHAUSTED"),
        )

    unread = UnreadClient(server.port)
    try:
        # One unread response (1.5 MiB) holds the 2 MiB budget: the next Encode waits for it.
        unread.call(server.target, "/genserve.v1.GenerationService/Encode", encode.SerializeToString())
        wait_until(
            lambda: server.metric("genserve_response_bytes_pending") >= ENCODE_RESPONSE,
            60,
            "the unread response to hold the budget",
        )
        before = counts()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Encode(encode, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "response_budget_bytes" in (info.value.details() or "")
        wait_until(lambda: counts()[2] - before[2] >= 1, 10, "the refusal to be counted")
        assert counts() == (before[0] + 1, before[1], before[2] + 1)
    finally:
        unread.close()
    wait_until(
        lambda: server.metric("genserve_response_bytes_pending") == 0, 30, "the unsent bytes to be released"
    )


def test_an_encode_response_over_the_send_limit_is_refused_naming_output(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """max_send_message_bytes: a response whose size is known before compute is refused before
    compute with INVALID_ARGUMENT naming the limit (not computed, then failed by gRPC with a
    RESOURCE_EXHAUSTED that clients retry). Encode's is known exactly: n x latent_dim x 4 x 2 or 3."""
    import grpc

    from genserve.v1 import genserve_pb2_grpc as pb_grpc

    root = tmp_path_factory.mktemp("send-models")
    write_vae_encoder(root, "wide-enc", latent_dim=WIDE_LATENT)
    config = {"warmup": False, "limits": {"max_send_message_bytes": MIB}}
    server = start_server(root, tmp_path_factory.mktemp("send-server"), config=config)
    try:
        images = [tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=_gray_png(i)) for i in range(ENCODE_IMAGES)]
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.Encode(pb.EncodeRequest(model="wide-enc", images=images, sample=True), timeout=30)
            assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = excinfo.value.details() or ""
            assert "max_send_message_bytes=1048576" in details and details.startswith("images:"), details
    finally:
        server.stop()


def test_an_unread_codes_only_sample_codes_response_is_held_to_the_response_budget(
    budget_server: ServerProcess,
) -> None:
    """SampleCodes on a prior without a decoder answers grids only; unsent, they must be held
    against response_budget_bytes like every generation RPC's response (and released at the end)."""
    server = budget_server
    request = pb.SampleCodesRequest(model="codes-only", count=CODES_ROWS, base_seed=3).SerializeToString()
    before = server.metric("genserve_requests_total", method="SampleCodes")
    unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
    try:
        stream = unread.call(server.target, "/genserve.v1.GenerationService/SampleCodes", request)
        wait_until(
            lambda: server.metric("genserve_requests_total", method="SampleCodes") - before >= 1,
            60,
            "the SampleCodes handler to end",
        )
        assert server.metric("genserve_requests_total", method="SampleCodes", code="OK") - before == 1
        assert stream not in unread.ended  # the response did not fit the client's window: unsent
        # Its grids (128 KiB, held with the send overhead) wait unsent in gRPC's buffers.
        assert server.metric("genserve_response_bytes_pending") >= CODES_RESPONSE
    finally:
        unread.close()
    wait_until(
        lambda: server.metric("genserve_response_bytes_pending") == 0, 30, "the unsent bytes to be released"
    )


def test_reflection_answers_a_client_never_reads_do_not_hold_control_slots(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A client that sends reflection requests and never reads (no HTTP/2 window) left each stream's
    handler waiting up to stream_write_timeout_s (60 s) to write its ~6 KB answer, holding a
    max_concurrent_control_rpcs slot all the while: one connection of such streams answered
    ListModels, GetModel and KServe metadata/readiness RESOURCE_EXHAUSTED for every client, renewably.
    A unary control RPC frees its slot when its handler returns, sent or not; a reflection stream's
    slot is freed once its handler has produced the answer."""
    import time

    import grpc
    from grpc_reflection.v1alpha import reflection_pb2 as rpb
    from reliability_support import write_gen

    from genserve.v1 import genserve_pb2_grpc as pb_grpc

    root = tmp_path_factory.mktemp("reflection-models")
    write_gen(root, "gen")
    config = {"warmup": False, "limits": {"max_concurrent_control_rpcs": 8}}
    server = start_server(root, tmp_path_factory.mktemp("reflection-server"), config=config)
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    request = rpb.ServerReflectionRequest(file_containing_symbol="genserve.v1.GenerationService")
    unread = UnreadClient(server.port)
    try:
        for _ in range(40):  # ~240 KB of answers: far past the 64 KiB window, 5x the control limit
            unread.call(server.target, method, request.SerializeToString())
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
                assert [m.name for m in listed.models] == ["gen"]
                time.sleep(0.1)
    finally:
        unread.close()
        server.stop()
