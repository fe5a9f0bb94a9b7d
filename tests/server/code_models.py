"""Tiny code priors and code decoders (kinds code_prior, code_decoder) built with the onnx helper API.

The prior's logits for a row depend on that row's codes (a weighted sum of the filled positions),
label and top grid, so rows at different positions give different logits; the decoder maps codes
to gray pixels. Nothing is trained: these test and bench the serving path (step_sampler.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from server_support import OPSET, write_model


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _codes(name: str, h: int, w: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", h, w])


def _weighted_sum(source: str, weights: str, out: str, nodes: list[onnx.NodeProto]) -> None:
    """out [N, 1, 1, 1] = sum over (H, W) of float(source) * weights."""
    nodes += [
        helper.make_node("Cast", [source], [f"{out}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{out}_f", weights], [f"{out}_w"]),
        helper.make_node("ReduceSum", [f"{out}_w", "axes_hw"], [f"{out}_s"], keepdims=1),
        helper.make_node("Unsqueeze", [f"{out}_s", "axis_1"], [out]),
    ]


def prior_graph(
    h: int,
    w: int,
    k: int,
    *,
    n_classes: int = 0,
    top: tuple[int, int] | None = None,
    iterations: int = 0,
    seed: int = 0,
) -> onnx.ModelProto:
    """codes [N, H, W] (+ label [N], + top_codes [N, Ht, Wt]) -> logits [N, K, H, W].

    `iterations` > 0 adds that many [N, K*H*W] x [K*H*W, K*H*W] MatMul + Tanh layers: a prior whose
    call costs something (the bench), still row-independent."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (1, h, w)).astype(np.float32), "P"),
        numpy_helper.from_array(rng.normal(0, 1, (1, k, h, w)).astype(np.float32), "A"),
        numpy_helper.from_array(rng.normal(0, 1, (1, k, h, w)).astype(np.float32), "B"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes_hw"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
        numpy_helper.from_array(np.array([3.0], np.float32), "gain"),
    ]
    inputs = [_codes("codes", h, w)]
    _weighted_sum("codes", "P", "s", nodes)
    total = "s"
    if n_classes:
        inputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]))
        inits.append(numpy_helper.from_array(rng.normal(0, 2, (n_classes, 1)).astype(np.float32), "E"))
        inits.append(numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape_n111"))
        nodes += [
            helper.make_node("Gather", ["E", "label"], ["emb"], axis=0),
            helper.make_node("Reshape", ["emb", "shape_n111"], ["emb4"]),
            helper.make_node("Add", [total, "emb4"], ["s_label"]),
        ]
        total = "s_label"
    if top is not None:
        inputs.append(_codes("top_codes", *top))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (1, *top)).astype(np.float32), "Q"))
        _weighted_sum("top_codes", "Q", "t", nodes)
        nodes.append(helper.make_node("Add", [total, "t"], ["s_top"]))
        total = "s_top"
    nodes += [
        helper.make_node("Mul", [total, "A"], ["scaled"]),
        helper.make_node("Add", ["scaled", "B"], ["pre"]),
        helper.make_node("Sin", ["pre"], ["wave"]),
    ]
    last = "wave"
    if iterations:
        size = k * h * w
        inits.append(numpy_helper.from_array(np.array([-1, size], np.int64), "flat"))
        inits.append(numpy_helper.from_array(np.array([-1, k, h, w], np.int64), "shape_khw"))
        nodes.append(helper.make_node("Reshape", [last, "flat"], ["x0"]))
        for i in range(iterations):
            inits.append(
                numpy_helper.from_array(
                    rng.normal(0, 1 / np.sqrt(size), (size, size)).astype(np.float32), f"M{i}"
                )
            )
            nodes += [
                helper.make_node("MatMul", [f"x{i}", f"M{i}"], [f"y{i}"]),
                helper.make_node("Tanh", [f"y{i}"], [f"x{i + 1}"]),
            ]
        nodes.append(helper.make_node("Reshape", [f"x{iterations}", "shape_khw"], ["deep"]))
        last = "deep"
    nodes.append(helper.make_node("Mul", [last, "gain"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "code_prior",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k, h, w])],
        inits,
    )
    return _model(graph)


def decoder_graph(
    h: int, w: int, k: int, *, top: tuple[int, int] | None = None, top_k: int = 1
) -> onnx.ModelProto:
    """codes [N, H, W] (+ top_codes) -> image [N, 1, H, W] in [0, 1): codes / K (+ the top grid's
    mean / K_top, halved)."""
    nodes = [
        helper.make_node("Cast", ["codes"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["cf", "k"], ["unit"]),
        helper.make_node("Unsqueeze", ["unit", "axis_1"], ["bottom"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([float(k)], np.float32), "k"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
    ]
    inputs = [_codes("codes", h, w)]
    out = "bottom"
    if top is not None:
        inputs.append(_codes("top_codes", *top))
        inits += [
            numpy_helper.from_array(np.array([float(top_k)], np.float32), "kt"),
            numpy_helper.from_array(np.array([0.5], np.float32), "half"),
        ]
        nodes += [
            helper.make_node("Cast", ["top_codes"], ["tf"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["tf", "kt"], ["tunit"]),
            helper.make_node("ReduceMean", ["tunit"], ["tmean"], axes=[1, 2], keepdims=1),
            helper.make_node("Unsqueeze", ["tmean", "axis_1"], ["tmean4"]),
            helper.make_node("Add", ["bottom", "tmean4"], ["both"]),
            helper.make_node("Mul", ["both", "half"], ["mixed"]),
        ]
        out = "mixed"
    nodes.append(helper.make_node("Identity", [out], ["image"]))
    graph = helper.make_graph(
        nodes,
        "code_decoder",
        inputs,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, h, w])],
        inits,
    )
    return _model(graph)


def write_code_models(
    root: Path,
    *,
    grid: tuple[int, int] = (6, 6),
    k: int = 16,
    max_rows: int = 8,
    n_classes: int = 3,
    iterations: int = 0,
    prefix: str = "",
) -> dict[str, str]:
    """A class-conditional prior + decoder, and a top prior + bottom prior + two-level decoder.

    Returns the model names: prior, decoder, top, bottom, decoder2, and chain (the bottom prior's
    graph with config.json top_prior: both levels in one call)."""
    names = {
        "prior": f"{prefix}prior",
        "decoder": f"{prefix}codes-decoder",
        "top": f"{prefix}top-prior",
        "bottom": f"{prefix}bottom-prior",
        "decoder2": f"{prefix}codes-decoder2",
        "chain": f"{prefix}chain-prior",
    }
    h, w = grid
    top = (max(1, h // 2), max(1, w // 2))
    classes = [f"class{i}" for i in range(n_classes)]
    batching: dict[str, Any] = {
        "max_batch_size": max_rows,
        "preferred_batch_sizes": [1, max_rows],
        "max_queue_size": 64,
    }
    decoder_card = {
        "grid": list(grid),
        "codebook_size": k,
        "image_size": list(grid),
        "channels": 1,
        "output_range": [0.0, 1.0],
    }
    write_model(
        root,
        names["prior"],
        "code_prior",
        prior_graph(h, w, k, n_classes=n_classes, iterations=iterations),
        {"grid": list(grid), "codebook_size": k, "class_names": classes, "output_range": None},
        config={"decoder": names["decoder"], "batching": batching},
    )
    write_model(
        root,
        names["decoder"],
        "code_decoder",
        decoder_graph(h, w, k),
        decoder_card,
        config={"batching": batching},
    )
    write_model(
        root,
        names["top"],
        "code_prior",
        prior_graph(*top, k, seed=1),
        {"grid": list(top), "codebook_size": k, "output_range": None},
        config={"batching": batching},
    )
    bottom_card = {
        "grid": list(grid),
        "codebook_size": k,
        "top_grid": list(top),
        "top_codebook_size": k,
        "output_range": None,
    }
    # The bottom prior alone (the top grid given by the caller), and chained to its top prior.
    for name, chained in ((names["bottom"], {}), (names["chain"], {"top_prior": names["top"]})):
        config = {"decoder": names["decoder2"], **chained, "batching": batching}
        write_model(
            root, name, "code_prior", prior_graph(h, w, k, top=top, seed=2), bottom_card, config=config
        )
    write_model(
        root,
        names["decoder2"],
        "code_decoder",
        decoder_graph(h, w, k, top=top, top_k=k),
        {**decoder_card, "top_grid": list(top), "top_codebook_size": k},
        config={"batching": batching},
    )
    return names
