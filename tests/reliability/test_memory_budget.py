"""Memory bounded by construction (issue 22): the response budget holds unread unary responses to
`response_budget_bytes`, a response that could exceed the send limit is refused before compute, and
SuperResolve requests share a working-set budget.

One server with small budgets: max_send_message_bytes 1 MiB, response_budget_bytes 2 MiB (two
responses of 786 KiB fit, a third does not), a 1 s wait for budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from reliability_support import png_bytes
from server_support import (
    REPO_ROOT,
    TINY_LATENT,
    ServerProcess,
    generator_graph,
    running_server,
    slow_generator_graph,
    start_server,
    super_resolution_graph,
    wait_until,
    write_model,
    write_tiny_generator,
)
from unread_client import UnreadClient

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

MIB = 1024 * 1024
BUDGET = 2 * MIB
SIDE = 64  # the generator's images: 64x64 RGB
COUNT = 64  # a response of 64 raw images: 786,432 bytes of pixels
RAW = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
SR_CARD = {
    "channels": 3,
    "input_channels": 3,
    "input_range": [0.0, 1.0],
    "scale_factor": 2,
    "size_multiple": 1,
    "tile_size": 96,
    "tile_overlap": 8,
    "min_size": 4,
}


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("budget-models")
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [SIDE, SIDE]}
    write_model(root, "big", "generator", generator_graph(TINY_LATENT, 3, SIDE, SIDE), card)
    write_model(root, "sr", "super_resolution", super_resolution_graph(2), SR_CARD)
    config = {
        "warmup": False,
        "limits": {
            "max_send_message_bytes": MIB,
            "response_budget_bytes": BUDGET,
            "sr_working_set_bytes": MIB,
            "budget_max_wait_s": 1.0,
        },
    }
    server = start_server(root, tmp_path_factory.mktemp("budget-server"), config=config)
    yield server
    server.stop()


def _sample(seed: int) -> bytes:
    request = pb.SampleRequest(model="big", count=COUNT, base_seed=seed, output=RAW)
    return request.SerializeToString()


def test_unread_unary_responses_are_held_to_the_response_budget(budget_server: ServerProcess) -> None:
    server = budget_server
    sample_path = "/genserve.v1.GenerationService/Sample"
    refused_before = server.metric("genserve_requests_total", method="Sample", code="RESOURCE_EXHAUSTED")
    images_before = server.metric("genserve_images_total", model="big")
    unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
    try:
        for i in range(6):
            unread.call(server.target, sample_path, _sample(i))
        # Two responses fit the budget and stay unsent; the other four wait 1 s, then are refused.
        wait_until(
            lambda: (
                server.metric("genserve_requests_total", method="Sample", code="RESOURCE_EXHAUSTED")
                - refused_before
                >= 4
            ),
            30,
            "the requests beyond the response budget to be refused",
        )
        pending = server.metric("genserve_response_bytes_pending")
        assert 2 * COUNT * SIDE * SIDE * 3 <= pending <= BUDGET
        # Refused before compute: only the two admitted responses were computed.
        assert server.metric("genserve_images_total", model="big") - images_before == 2 * COUNT
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            # A small response still fits in what is left ...
            small = stub.Sample(pb.SampleRequest(model="big", count=1, output=RAW), timeout=10)
            assert len(small.images) == 1
            # ... a large one is refused, naming the budget.
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.Sample(pb.SampleRequest(model="big", count=COUNT, output=RAW), timeout=10)
            assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "response_budget_bytes" in (excinfo.value.details() or "")
    finally:
        unread.close()
    # The client went away: gRPC ends the RPCs and their bytes are released.
    wait_until(
        lambda: server.metric("genserve_response_bytes_pending") == 0, 30, "the unsent bytes to be released"
    )


WATCH = "/grpc.health.v1.Health/Watch"


def _unread_behind_a_watch(server: ServerProcess) -> UnreadClient:
    """A client that opens a health Watch (its connection never idle) and two Samples whose
    responses it never reads, sending no deadline: both responses are computed and held."""
    unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
    unread.call(server.target, WATCH, b"")
    for seed in range(2):
        unread.call(server.target, "/genserve.v1.GenerationService/Sample", _sample(seed))
    wait_until(
        lambda: server.metric("genserve_response_bytes_pending") >= 2 * COUNT * SIDE * SIDE * 3,
        30,
        "both unread responses to be computed and held",
    )
    return unread


def test_unread_responses_on_a_busy_connection_are_held_until_its_max_age(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """gRPC gives the server no way to end a unary call whose response it has handed over, so a
    client that neither reads it nor sent a deadline holds its bytes of response_budget_bytes, and
    the next large Sample of any client is refused, for as long as another call keeps its
    connection out of connection_idle_timeout_s: a health Watch, forever. docs/operations.md said
    what the budgets wait for is released within one request's time; max_connection_age_s ends
    such a connection, and the docs now say so."""
    root = tmp_path_factory.mktemp("busy-unread-models")
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [SIDE, SIDE]}
    write_model(root, "big", "generator", generator_graph(TINY_LATENT, 3, SIDE, SIDE), card)
    limits = {
        "max_send_message_bytes": MIB,
        "response_budget_bytes": BUDGET,
        "budget_max_wait_s": 0.5,
        "connection_idle_timeout_s": 0.5,
        "stream_write_timeout_s": 0.5,
    }
    work = tmp_path_factory.mktemp("busy-unread-server")
    with running_server(root, work, config={"warmup": False, "limits": limits}) as server:
        unread = _unread_behind_a_watch(server)
        try:
            time.sleep(2.0)  # four idle timeouts and write timeouts: neither ends these calls
            assert server.metric("genserve_response_bytes_pending") >= 2 * COUNT * SIDE * SIDE * 3
            with grpc.insecure_channel(server.target) as channel:
                with pytest.raises(grpc.RpcError) as excinfo:
                    pb_grpc.GenerationServiceStub(channel).Sample(
                        pb.SampleRequest(model="big", count=COUNT, output=RAW), timeout=10
                    )
            assert "response_budget_bytes" in (excinfo.value.details() or "")
        finally:
            unread.close()
    aged = {**limits, "max_connection_age_s": 1.0, "connection_age_grace_s": 0.5}
    with running_server(root, work, config={"warmup": False, "limits": aged}) as server:
        unread = _unread_behind_a_watch(server)
        try:
            wait_until(
                lambda: server.metric("genserve_response_bytes_pending") == 0,
                30,
                "max_connection_age_s to end the connection and release the unread responses",
            )
        finally:
            unread.close()
    text = " ".join((REPO_ROOT / "docs" / "operations.md").read_text().split())
    responses = text[text.index("- **Responses.**") : text.index("- **SuperResolve working set.**")]
    assert "max_connection_age_s" in responses and "Watch" in responses
    assert "released within one request's time:" not in text


def test_oversized_super_resolve_is_refused_before_compute(budget_server: ServerProcess) -> None:
    server = budget_server
    # 2x of 800x800 noise: 1600x1600 RGB, 7.7 MB of pixels, a PNG of several MB (on a server that
    # checks after encoding, it is computed and then refused); its worst case is above 1 MiB.
    image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=png_bytes(800, 800))
    batches_before = server.metric("genserve_batch_size_count", model="sr")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SuperResolve(pb.ImageRequest(model="sr", images=[image]), timeout=30)
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert server.metric("genserve_batch_size_count", model="sr") == batches_before  # never computed
        details = excinfo.value.details() or ""
        assert "max_send_message_bytes=1048576" in details and "worst case" in details
        # One that fits is computed as before.
        small = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=png_bytes(64, 64))
        assert len(stub.SuperResolve(pb.ImageRequest(model="sr", images=[small]), timeout=30).images) == 1


def test_super_resolve_requests_share_the_working_set_budget(budget_server: ServerProcess) -> None:
    """Each request's working set (a 96x96 tile: ~1.3 MB) is above half the 1 MiB budget: they run
    one at a time (a request larger than the budget runs alone), and all of them complete."""
    server = budget_server
    image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=png_bytes(96, 96))
    jpeg = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG)
    results: list[object] = []
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.metric("genserve_sr_working_set_bytes"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            futures = [
                stub.SuperResolve.future(pb.ImageRequest(model="sr", images=[image], output=jpeg), timeout=30)
                for _ in range(6)
            ]
            results = [len(f.result().images) for f in futures]
    finally:
        done.set()
        watcher.join()
    assert results == [1] * 6
    assert 0 < peak[0] <= MIB
    assert server.metric("genserve_sr_working_set_bytes") == 0


# A bulk Sample of one 8x8 gray PNG holds its worst case (4,168 bytes) plus the send overhead (64 KiB)
# against the response budget: 15 of them hold all but 3,016 bytes of 1 MiB.
BULK_HOLD = 65536 + 4168
BULK_CALLS = 16


def test_bulk_samples_waiting_for_room_in_their_lane_hold_no_response_bytes(tmp_path: Path) -> None:
    """The BULK lane holds at most half a model's queue and a bulk Sample that finds it full waits for
    room: while it waits it must not hold its response's bytes against the server-wide budget, or a
    backlog of bulk Samples on one model gets every interactive call on the server refused
    RESOURCE_EXHAUSTED (response budget), the crowding-out the lane exists to prevent. A slow model
    (a row takes seconds) with a queue of 2 rows: one bulk Sample computes, one is queued, the other
    14 wait for room holding nothing; an interactive Sample of another model is then answered."""
    root = tmp_path / "models"
    write_model(
        root,
        "slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 300_000),  # seconds a row: nothing finishes during the test
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 1, "max_queue_delay_ms": 1.0, "max_queue_size": 2}},
    )
    write_tiny_generator(root, "fast", channels=3)
    config = {"warmup": False, "limits": {"response_budget_bytes": MIB, "budget_max_wait_s": 1.0}}
    server = start_server(root, tmp_path / "server", config=config)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            bulk = [
                stub.Sample.future(
                    pb.SampleRequest(model="slow", count=1, base_seed=i, priority=tpb.PRIORITY_BULK),
                    timeout=60,
                )
                for i in range(BULK_CALLS)
            ]
            # A Sample reaches its model's queue (or the bulk lane's line) without an await.
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="Sample") == BULK_CALLS,
                30,
                "every bulk Sample to be in the server",
            )
            # Only the computing and the queued one hold their bytes.
            assert server.metric("genserve_response_bytes_pending") <= 2 * BULK_HOLD
            # Refused RESOURCE_EXHAUSTED (response budget) after budget_max_wait_s where they held them.
            answer = stub.Sample(pb.SampleRequest(model="fast", count=1), timeout=10)
            assert len(answer.images) == 1
            for future in bulk:
                future.cancel()
    finally:
        server.proc.kill()  # the running bulk row would hold a graceful drain for seconds
        server.proc.wait(10)


def slow_super_resolution_graph(iterations: int, scale: int = 2) -> object:
    """x`scale` super-resolution (1: an image-to-image model) that takes seconds an image: a Loop of
    3x3 convs, then Resize nearest."""
    rng = np.random.default_rng(8)
    image = ["batch", 3, "h", "w"]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["y_in", "K"], ["y_conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Tanh", ["y_conv"], ["y_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, image),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_out", TensorProto.FLOAT, image),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trip", "cond", "image"], ["looped"], body=body),
            helper.make_node("Resize", ["looped", "", "scales"], ["up"], mode="nearest"),
            helper.make_node("Tanh", ["up"], ["output_image"]),
        ],
        "slow_sr",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info("output_image", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
        [
            numpy_helper.from_array(rng.normal(0, 0.3, (3, 3, 3, 3)).astype(np.float32) * 2.0, "K"),
            numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales"),
            numpy_helper.from_array(np.array(iterations, np.int64), "trip"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


FIXED_SR_CARD = {**SR_CARD, "image_size": [64, 64]}
SR_WAITERS = 30  # one computes (2 s), the others wait for the working set: 43 KB of response each


def test_super_resolves_waiting_for_the_working_set_hold_no_response_bytes(tmp_path: Path) -> None:
    """A SuperResolve reserved its response's bytes, then waited for the SR working-set budget
    holding them, so a burst of SuperResolve calls held the server-wide response budget while one
    computed, and every other RPC of every model waited budget_max_wait_s and was refused
    RESOURCE_EXHAUSTED (response_budget_bytes). It takes the working set first, then its bytes."""
    root = tmp_path / "models"
    # One input size: a tiled model's load measures its tile radius in ten rows of its 2 s calls,
    # which with the load-time checks held start-up for ~30 s (over a minute beside another test).
    write_model(root, "slow-sr", "super_resolution", slow_super_resolution_graph(40_000), FIXED_SR_CARD)
    write_tiny_generator(root, "fast", channels=3)
    config = {
        "warmup": False,
        "limits": {"response_budget_bytes": MIB, "sr_working_set_bytes": MIB, "budget_max_wait_s": 5.0},
    }
    server = start_server(root, tmp_path / "server", config=config)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=png_bytes(64, 64))
            calls = [
                stub.SuperResolve.future(
                    pb.ImageRequest(model="slow-sr", images=[image], output=RAW), timeout=60
                )
                for _ in range(SR_WAITERS)
            ]
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="SuperResolve") == SR_WAITERS,
                30,
                "every SuperResolve in the server",
            )
            # Before: 24 waiting SuperResolves held the 1 MiB, and the Sample waited behind the others.
            answer = stub.Sample(pb.SampleRequest(model="fast", count=1), timeout=3)
            assert len(answer.images) == 1
            for call in calls:
                call.cancel()
    finally:
        server.proc.kill()  # the running SuperResolve would hold a graceful drain for seconds
        server.proc.wait(10)


I2I_CARD = {"channels": 3, "input_channels": 3, "input_range": [0.0, 1.0], "size_multiple": 1, "min_size": 4}


def test_translates_share_the_working_set_budget_and_a_wait_past_it_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """Translate held only its response's bytes while it decoded, stacked, computed and encoded 10-14x
    them, so concurrent large Translates were bounded by nothing but the response budget. Each now
    holds its working set against translate_working_set_bytes (1 MiB here): 96x96 requests (~0.66 MB
    each) run one at a time and all complete; behind a slow one that holds all of it, a call waits
    budget_max_wait_s and is refused RESOURCE_EXHAUSTED naming the budget, counted as `budget`."""
    root = tmp_path / "models"
    write_model(root, "i2i", "image_to_image", slow_super_resolution_graph(1, scale=1), I2I_CARD)
    write_model(root, "slow-i2i", "image_to_image", slow_super_resolution_graph(10_000, scale=1), I2I_CARD)
    config = {
        "warmup": False,
        "limits": {"translate_working_set_bytes": MIB, "budget_max_wait_s": 1.0},
    }
    server = start_server(root, tmp_path / "server", config=config)
    jpeg = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG)
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.metric("genserve_translate_working_set_bytes"))

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=png_bytes(96, 96))
            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                futures = [
                    stub.Translate.future(
                        pb.ImageRequest(model="i2i", images=[image], output=jpeg), timeout=30
                    )
                    for _ in range(6)
                ]
                assert [len(f.result().images) for f in futures] == [1] * 6
            finally:
                done.set()
                watcher.join()
            assert 0 < peak[0] <= MIB
            assert server.metric("genserve_translate_working_set_bytes") == 0
            # A 256x256 Translate's working set (~6 MB) is clamped to the whole budget: it runs alone.
            large = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=png_bytes(256, 256))
            slow = stub.Translate.future(pb.ImageRequest(model="slow-i2i", images=[large]), timeout=60)
            wait_until(
                lambda: server.metric("genserve_translate_working_set_bytes") == MIB,
                30,
                "the slow Translate to hold the working-set budget",
            )
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.Translate(pb.ImageRequest(model="i2i", images=[image]), timeout=10)
            assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = excinfo.value.details() or ""
            assert "translate_working_set_bytes" in details and f"({MIB} bytes)" in details
            assert server.metric("genserve_requests_rejected_total", model="i2i", reason="budget") == 1
            slow.cancel()
    finally:
        server.proc.kill()  # the running Translate would hold a graceful drain for seconds
        server.proc.wait(10)
