"""Tiny style-based generators (kinds style_mapping, style_generator) built with the onnx helper API.

The mapping is z -> MatMul -> LeakyRelu -> MatMul -> w; the synthesis takes ws [N, L, w_dim], gives
each layer its own weights (ws flattened, one MatMul), adds fixed noise and a learned constant,
Tanh -> image. Every layer's w changes the image, so mixing and truncation are visible. Nothing
is trained: these test the serving path (style_sampling.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from server_support import OPSET, write_model

STYLE_LATENT = 8
W_DIM = 6
NUM_LAYERS = 4
SIDE = 8
W_AVG = [0.25, -0.5, 0.125, 0.0, 1.0, -0.75]
MIX_CROSSOVER = 3  # the card's advertised crossover (not num_layers // 2, so a client default shows which)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mapping_graph(latent_dim: int = STYLE_LATENT, w_dim: int = W_DIM, seed: int = 0) -> onnx.ModelProto:
    """z [N, Z] -> w [N, w_dim]: two fully connected layers."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["z", "A1"], ["h1"]),
        helper.make_node("LeakyRelu", ["h1"], ["a1"], alpha=0.2),
        helper.make_node("MatMul", ["a1", "A2"], ["w"]),
    ]
    graph = helper.make_graph(
        nodes,
        "style_mapping",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent_dim])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["batch", w_dim])],
        [
            numpy_helper.from_array(rng.normal(0, 0.5, (latent_dim, 16)).astype(np.float32), "A1"),
            numpy_helper.from_array(rng.normal(0, 0.5, (16, w_dim)).astype(np.float32), "A2"),
        ],
    )
    return _model(graph)


def synthesis_graph(
    num_layers: int = NUM_LAYERS, w_dim: int = W_DIM, side: int = SIDE, seed: int = 1
) -> onnx.ModelProto:
    """ws [N, L, w_dim] -> image [N, 1, side, side]; noise and constant fixed in the graph."""
    rng = np.random.default_rng(seed)
    pixels = side * side
    nodes = [
        helper.make_node("Reshape", ["ws", "flat"], ["styles"]),
        helper.make_node("MatMul", ["styles", "B"], ["h"]),
        helper.make_node("Add", ["h", "noise"], ["hn"]),
        helper.make_node("Tanh", ["hn"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "style_generator",
        [helper.make_tensor_value_info("ws", TensorProto.FLOAT, ["batch", num_layers, w_dim])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, side, side])],
        [
            numpy_helper.from_array(np.array([-1, num_layers * w_dim], np.int64), "flat"),
            numpy_helper.from_array(rng.normal(0, 0.4, (num_layers * w_dim, pixels)).astype(np.float32), "B"),
            numpy_helper.from_array(rng.normal(0, 0.1, (1, pixels)).astype(np.float32), "noise"),
            numpy_helper.from_array(np.array([-1, 1, side, side], np.int64), "shape"),
        ],
    )
    return _model(graph)


def write_style_models(
    root: Path, *, prefix: str = "", max_batch_size: int = 16, mapping_queue: int = 256
) -> dict[str, str]:
    """A style_mapping and the style_generator that names it (config.json mapping), plus a generator
    whose mapping does not fit (w_dim differs, refused per request) and one naming no mapping (refused
    at load). Returns the names: mapping, generator, misfit, misfit_mapping, unmapped."""
    names = {
        "mapping": f"{prefix}style-mapping",
        "generator": f"{prefix}style-gen",
        "misfit": f"{prefix}style-misfit",
        "misfit_mapping": f"{prefix}style-mapping-wide",
        "unmapped": f"{prefix}style-unmapped",
    }
    batching: dict[str, Any] = {"max_batch_size": max_batch_size, "max_queue_size": 256}
    write_model(
        root,
        names["mapping"],
        "style_mapping",
        mapping_graph(),
        {"latent_dim": STYLE_LATENT, "w_dim": W_DIM, "output_range": None},
        config={"batching": {**batching, "max_queue_size": mapping_queue}},
    )
    generator_card = {
        "latent_dim": STYLE_LATENT,
        "w_dim": W_DIM,
        "num_layers": NUM_LAYERS,
        "w_avg": W_AVG,
        "mix_crossover": MIX_CROSSOVER,
        "channels": 1,
        "image_size": [SIDE, SIDE],
    }
    write_model(
        root,
        names["generator"],
        "style_generator",
        synthesis_graph(),
        generator_card,
        config={"mapping": names["mapping"], "batching": batching},
    )
    write_model(
        root,
        names["misfit_mapping"],
        "style_mapping",
        mapping_graph(w_dim=W_DIM + 1),
        {"latent_dim": STYLE_LATENT, "w_dim": W_DIM + 1, "output_range": None},
        config={"batching": batching},
    )
    write_model(
        root,
        names["misfit"],
        "style_generator",
        synthesis_graph(),
        generator_card,
        config={"mapping": names["misfit_mapping"], "batching": batching},
    )
    write_model(root, names["unmapped"], "style_generator", synthesis_graph(), generator_card)
    return names
