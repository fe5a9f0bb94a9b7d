"""Tiny ONNX generators built with onnx.helper (no torch): an fp32 graph and its fp16 twin.

z [N, 16] -> MatMul -> Reshape [N, 32, 4, 4] -> ConvTranspose(32 -> 3, k4 s2 p1) -> Tanh -> image
[N, 3, 8, 8], with a dynamic batch axis named "batch", like the exporter's generators. The fp16
twin has fp16 weights and compute with fp32 inputs/outputs (as export writes model.fp16.onnx).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LATENT_DIM = 16
IMAGE_SHAPE = (3, 8, 8)


def _graph(fp16: bool, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dtype = np.float16 if fp16 else np.float32
    weight = (rng.standard_normal((LATENT_DIM, 32 * 4 * 4)) * 0.2).astype(dtype)
    kernel = (rng.standard_normal((32, 3, 4, 4)) * 0.1).astype(dtype)
    bias = (rng.standard_normal(3) * 0.1).astype(dtype)
    inits = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(kernel, "K"),
        numpy_helper.from_array(bias, "B"),
        numpy_helper.from_array(np.array([-1, 32, 4, 4], dtype=np.int64), "shape"),
    ]
    nodes = []
    z_name = "z"
    if fp16:
        nodes.append(helper.make_node("Cast", ["z"], ["z16"], to=TensorProto.FLOAT16))
        z_name = "z16"
    nodes += [
        helper.make_node("MatMul", [z_name, "W"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["h4"]),
        helper.make_node(
            "ConvTranspose", ["h4", "K", "B"], ["c"], kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Tanh", ["c"], ["image16" if fp16 else "image"]),
    ]
    if fp16:
        nodes.append(helper.make_node("Cast", ["image16"], ["image"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "tiny-generator",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", LATENT_DIM])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_tiny_version(version_dir: Path, *, fp16_parity: float | None = 0.001) -> Path:
    """model.onnx, model.fp16.onnx and a card.json whose parity says `fp16_parity` (None: absent)."""
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(_graph(fp16=False), version_dir / "model.onnx")
    onnx.save(_graph(fp16=True), version_dir / "model.fp16.onnx")
    card = {
        "kind": "generator",
        "latent_dim": LATENT_DIM,
        "parity": {
            "fp32_max_abs_diff": 0.0,
            "fp32_atol": 1e-4,
            "fp16_max_abs_diff": fp16_parity,
            "fp16_atol": 1e-2,
        },
    }
    (version_dir / "card.json").write_text(json.dumps(card))
    return version_dir
