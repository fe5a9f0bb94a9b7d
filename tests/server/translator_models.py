"""Tiny two-way translators (kind two_way_translator) built with the onnx helper API.

Each direction is its own random-weight generator (Conv 3x3 -> Sigmoid, gray, fully convolutional);
the served graph holds both behind an ONNX If on `direction[0]`, as export writes a CycleGAN's. The
one-way graphs are kept so that tests can check the served graph against each generator run on its
own in ONNX Runtime. Nothing is trained: these test the serving path (Translate with a direction).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from server_support import OPSET, write_model

SIZE_MULTIPLE = 4
DOMAINS = ["dots", "stripes"]


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _image(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1, "h", "w"])


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.6, (1, 1, 3, 3)).astype(np.float32), rng.normal(0, 0.3, (1,)).astype(np.float32)


def _generator_nodes(prefix: str, output: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node(
            "Conv", ["image", f"{prefix}_K", f"{prefix}_B"], [f"{prefix}_conv"], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Sigmoid", [f"{prefix}_conv"], [output]),
    ]


def one_way_graph(seed: int) -> onnx.ModelProto:
    """One generator alone: image [N, 1, H, W] -> output_image (what each direction must give)."""
    kernel, bias = _weights(seed)
    graph = helper.make_graph(
        _generator_nodes("g", "output_image"),
        "one-way",
        [_image("image")],
        [_image("output_image")],
        [numpy_helper.from_array(kernel, "g_K"), numpy_helper.from_array(bias, "g_B")],
    )
    return _model(graph)


A_TO_B_SEED, B_TO_A_SEED = 11, 22


def two_way_graph() -> onnx.ModelProto:
    """image, direction [N] -> output_image: If direction[0] == 1 then B->A else A->B."""
    ab_k, ab_b = _weights(A_TO_B_SEED)
    ba_k, ba_b = _weights(B_TO_A_SEED)
    branch_out = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)
    then_graph = helper.make_graph(
        _generator_nodes("ba", "ba_out") + [helper.make_node("Identity", ["ba_out"], ["branch_out"])],
        "b_to_a",
        [],
        [branch_out],
    )
    else_graph = helper.make_graph(
        _generator_nodes("ab", "ab_out") + [helper.make_node("Identity", ["ab_out"], ["branch_out"])],
        "a_to_b",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Gather", ["direction", "zero"], ["first"], axis=0),
        helper.make_node("Equal", ["first", "one"], ["reverse"]),
        helper.make_node("If", ["reverse"], ["output_image"], then_branch=then_graph, else_branch=else_graph),
    ]
    initializers = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(ab_k, "ab_K"),
        numpy_helper.from_array(ab_b, "ab_B"),
        numpy_helper.from_array(ba_k, "ba_K"),
        numpy_helper.from_array(ba_b, "ba_B"),
    ]
    graph = helper.make_graph(
        nodes,
        "two-way",
        [_image("image"), helper.make_tensor_value_info("direction", TensorProto.INT64, ["batch"])],
        [_image("output_image")],
        initializers,
    )
    return _model(graph)


def translator_card() -> dict[str, object]:
    return {
        "channels": 1,
        "input_channels": 1,
        "input_range": [0.0, 1.0],
        "output_range": [0.0, 1.0],
        "size_multiple": SIZE_MULTIPLE,
        "min_size": 8,
        "domains": DOMAINS,
    }


def write_translator(root: Path, name: str = "tiny-cyclegan", *, domains: bool = True) -> Path:
    """A two-way translator model (version 1) under `root`; `domains=False` leaves the card without
    the field it needs (the server must refuse it)."""
    card = translator_card()
    if not domains:
        del card["domains"]
    # A batch window long enough that concurrent requests of both directions meet in the batcher.
    config = {"batching": {"max_batch_size": 16, "max_queue_delay_s": 0.02}}
    return write_model(root, name, "two_way_translator", two_way_graph(), card, config=config)
