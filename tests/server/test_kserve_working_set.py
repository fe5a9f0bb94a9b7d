"""KServe ModelInfer on super-resolution and image-to-image models holds the working set that
genserve.v1's SuperResolve and Translate hold (core.py: image_working_set over whole images,
against sr_working_set_bytes or translate_working_set_bytes), read off the server's budget gauges
while a call computes. The models are slowed by a loop whose result is multiplied by zero, so that
a call is in compute long enough (about a second) to be seen holding; only batches of the tests'
bright images (mean above SLOW_ABOVE) run the loop, so that the load's own model calls (probe, row
checks, tile radius, on zeros or uniform values: means 0 and 0.5) stay fast, and the server runs
without warm-up, whose fast batches of zeros would record the model as cheap enough to run inline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from server_support import (
    F32,
    ServerProcess,
    image_to_image_graph,
    start_server,
    super_resolution_graph,
    write_model,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

MIB = 1024 * 1024
BUDGET = 4 * MIB  # each working-set budget: a 64x64 call fits, a 512x512 one is clamped to it
SLOW_ITERATIONS = 200_000  # about a second a batch on this project's 2-core VM
SLOW_ABOVE = 0.75  # a batch runs the loop where an image's mean is above this (images() are ~0.9)
BATCHING = {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": 16}
# model -> (genserve.v1 RPC, working-set gauge, the budget's setting, scale)
MODELS = {
    "slow-sr": ("SuperResolve", "genserve_sr_working_set_bytes", "sr_working_set_bytes", 2),
    "slow-i2i": ("Translate", "genserve_translate_working_set_bytes", "translate_working_set_bytes", 1),
}


def slowed(model: onnx.ModelProto, iterations: int) -> onnx.ModelProto:
    """`model` (input `image`, output `output_image`) plus a Loop of MatMuls on the image's mean,
    added times zero to the output: the same outputs, `iterations` steps slower a batch that holds
    an image whose mean is above SLOW_ABOVE (none otherwise)."""
    rng = np.random.default_rng(8)
    width = 256
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == "output_image":
                node.output[i] = "fast_image"
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["y_in", "Wloop"], ["y_mm"]),
            helper.make_node("Tanh", ["y_mm"], ["y_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, ["batch", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_out", TensorProto.FLOAT, ["batch", width]),
        ],
    )
    model.graph.node.extend(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["mean", "rows"], ["mean_rows"]),
            helper.make_node("MatMul", ["mean_rows", "Win"], ["y_w"]),
            helper.make_node("Add", ["y_w", "Bin"], ["y0"]),
            helper.make_node("ReduceMax", ["mean"], ["brightest"], keepdims=0),
            helper.make_node("Greater", ["brightest", "slow_above"], ["bright"]),
            helper.make_node("Cast", ["bright"], ["bright_trips"], to=TensorProto.INT64),
            helper.make_node("Mul", ["bright_trips", "trip"], ["trips"]),
            helper.make_node("Loop", ["trips", "cond", "y0"], ["y_final"], body=body),
            helper.make_node("ReduceMean", ["y_final"], ["y_mean"], axes=[1], keepdims=1),
            helper.make_node("Reshape", ["y_mean", "pixel"], ["y_pixel"]),
            helper.make_node("Mul", ["y_pixel", "zero"], ["nothing"]),
            helper.make_node("Add", ["fast_image", "nothing"], ["output_image"]),
        ]
    )
    # Gain 2 keeps tanh(W y) near +-1: values that decay to subnormals compute 10-100x slower.
    loop_weights = rng.normal(0, 1, (width, width)) * 2.0 / np.sqrt(width)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1, 1], np.int64), "rows"),
            numpy_helper.from_array(rng.normal(0, 1, (1, width)).astype(np.float32), "Win"),
            numpy_helper.from_array(rng.normal(0, 1, (width,)).astype(np.float32), "Bin"),
            numpy_helper.from_array(loop_weights.astype(np.float32), "Wloop"),
            numpy_helper.from_array(np.array(iterations, np.int64), "trip"),
            numpy_helper.from_array(np.array(SLOW_ABOVE, np.float32), "slow_above"),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "pixel"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ]
    )
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("kserve-working-set-models")
    write_model(
        root,
        "slow-sr",
        "super_resolution",
        slowed(super_resolution_graph(2), SLOW_ITERATIONS),
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [0.0, 1.0],
            "scale_factor": 2,
            "size_multiple": 1,
            "tile_size": 128,  # a 64x64 image is one tile: the plan genserve.v1 and ModelInfer share
            "tile_overlap": 8,
            "min_size": 4,
        },
        config={"batching": BATCHING},
    )
    write_model(
        root,
        "slow-i2i",
        "image_to_image",
        slowed(image_to_image_graph(4), SLOW_ITERATIONS),
        {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 4},
        config={"batching": BATCHING},
    )
    limits = {"sr_working_set_bytes": BUDGET, "translate_working_set_bytes": BUDGET, "budget_max_wait_s": 0.3}
    # No warm-up: its batches of zeros skip the loop, and their cost would run the tests' batches of
    # the same shapes inline (on the event loop); batch costs come from the tests' own slow batches.
    config = {"limits": limits, "warmup": False}
    work = tmp_path_factory.mktemp("kserve-working-set-server")
    proc = start_server(root, work, config=config, timeout_s=120)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 * MIB)]  # a 1024x1024 x4 float32 response
    with grpc.insecure_channel(server.target, options=options) as ch:
        yield ch


def images(n: int, side: int) -> np.ndarray:
    """Bright images (mean ~0.9): the slowed models run their loop on them."""
    return np.random.default_rng(side).uniform(0.8, 1, (n, 3, side, side)).astype(np.float32)


def infer_request(model: str, batch: np.ndarray) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=batch.shape)
    return kpb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[batch.tobytes()])


def most_held_while(server: ServerProcess, gauge: str, call: Any, until: int | None = None) -> int:
    """The most bytes `gauge` showed while `call` (a gRPC future) ran; stops early once it shows
    `until`. Raises the call's error."""
    most = 0.0
    while not call.done() and most != until:
        most = max(most, server.metric(gauge))
        time.sleep(0.01)
    if call.done():
        call.result()
    return int(most)


@pytest.mark.parametrize("model", MODELS)
def test_model_infer_holds_the_working_set_genserve_v1_holds_for_the_same_images(
    server: ServerProcess, channel: grpc.Channel, model: str
) -> None:
    """ModelInfer ran a super-resolution or image-to-image model's images whole through the batcher
    holding nothing but its response's bytes: a burst of large calls took the intermediates and
    outputs of all of them at once, where genserve.v1's SuperResolve and Translate wait for (or are
    refused) their working-set budget. It now holds what genserve.v1 holds for the same images."""
    rpc, gauge, _, scale = MODELS[model]
    batch = images(2, 64)
    v1_request = pb.ImageRequest(
        model=model,
        images=[
            tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=im.tobytes(), shape=im.shape) for im in batch
        ],
        output=F32,
    )
    v1_call = getattr(pb_grpc.GenerationServiceStub(channel), rpc).future(v1_request, timeout=60)
    v1_held = most_held_while(server, gauge, v1_call)
    assert 0 < v1_held < BUDGET, v1_held
    infer = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(
        infer_request(model, batch), timeout=60
    )
    infer_held = most_held_while(server, gauge, infer)
    assert infer_held == v1_held, f"ModelInfer held {infer_held} bytes, genserve.v1 {rpc} {v1_held}"
    assert list(infer.result().outputs[0].shape) == [2, 3, 64 * scale, 64 * scale]
    assert server.metric(gauge) == 0


@pytest.mark.parametrize("model", MODELS)
def test_a_model_infer_over_the_working_set_budget_runs_alone_and_one_beside_it_is_refused(
    server: ServerProcess, channel: grpc.Channel, model: str
) -> None:
    """A ModelInfer larger than the whole budget is clamped to it and runs alone, as SuperResolve's
    and Translate's are; one beside it waits budget_max_wait_s, then is RESOURCE_EXHAUSTED naming
    the budget, counted as a `budget` rejection."""
    _, gauge, setting, scale = MODELS[model]
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    large = images(1, 512)
    rejected = server.metric("genserve_requests_rejected_total", model=model, reason="budget")
    first = stub.ModelInfer.future(infer_request(model, large), timeout=60)
    held = most_held_while(server, gauge, first, until=BUDGET)
    assert held == BUDGET, f"a 512x512 ModelInfer on {model} held {held} bytes of the {BUDGET}-byte budget"
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(infer_request(model, large), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert setting in (refused.value.details() or "")
    assert list(first.result().outputs[0].shape) == [1, 3, 512 * scale, 512 * scale]
    assert server.metric("genserve_requests_rejected_total", model=model, reason="budget") == rejected + 1
    assert server.metric(gauge) == 0
