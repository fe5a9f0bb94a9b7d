"""The load-time fp16 parity check (loader.fp16_on_provider) must feed each graph the inputs it
serves: an fp16 twin that overflows (inf/NaN) only on inputs the check never gives is otherwise
served as fp16, and its NaN/inf outputs reach clients as OK answers (black or white pixels, or NaN
in TENSOR_F32). parity_inputs gave every int64 input integers in [0, number of classes): a code
prior's or code decoder's `codes` and `top_codes` were all 0 (one code of the codebook), and a two-way
translator's `direction` was always 0, so its B -> A generator was never compared at all."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import numpy as np
import onnx
from code_models import decoder_graph
from onnx import TensorProto, helper, numpy_helper
from server_support import F32, OPSET, running_server, tensor_of, write_model
from translator_models import _generator_nodes, _weights, translator_card, two_way_graph

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

GRID = (4, 4)
K = 8


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _overflow(source: str, out: str, prefix: str) -> list[onnx.NodeProto]:
    """out = float32(float16(source * 1e6)) / 1e6: source itself in float32, inf in float16 where
    |source| > ~0.066 (what an fp16 twin's overflowing intermediate gives)."""
    return [
        helper.make_node("Mul", [source, "big"], [f"{prefix}_big"]),
        helper.make_node("Cast", [f"{prefix}_big"], [f"{prefix}_h"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", [f"{prefix}_h"], [f"{prefix}_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", [f"{prefix}_f", "big"], [out]),
    ]


def two_way_twin() -> onnx.ModelProto:
    """two_way_graph whose B -> A generator overflows in float16 (A -> B is the same graph's)."""
    ab_k, ab_b = _weights(11)
    ba_k, ba_b = _weights(22)
    then_graph = helper.make_graph(
        _generator_nodes("ba", "ba_out") + _overflow("ba_out", "branch_out", "ov"),
        "b_to_a",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)],
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
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1e6], np.float32), "big"),
        numpy_helper.from_array(ab_k, "ab_K"),
        numpy_helper.from_array(ab_b, "ab_B"),
        numpy_helper.from_array(ba_k, "ba_K"),
        numpy_helper.from_array(ba_b, "ba_B"),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "h", "w"])
    out = helper.make_tensor_value_info("output_image", TensorProto.FLOAT, ["batch", 1, "h", "w"])
    direction = helper.make_tensor_value_info("direction", TensorProto.INT64, ["batch"])
    return _model(helper.make_graph(nodes, "two-way-fp16", [image, direction], [out], inits))


def decoder_twin() -> onnx.ModelProto:
    """decoder_graph (codes / K) whose every code but 0 overflows in float16."""
    nodes = [
        helper.make_node("Cast", ["codes"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["cf", "k"], ["unit"]),
        *_overflow("unit", "unit_h", "ov"),
        helper.make_node("Unsqueeze", ["unit_h", "axis_1"], ["image"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([float(K)], np.float32), "k"),
        numpy_helper.from_array(np.array([1e6], np.float32), "big"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
    ]
    codes = helper.make_tensor_value_info("codes", TensorProto.INT64, ["batch", *GRID])
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, *GRID])
    return _model(helper.make_graph(nodes, "code_decoder_fp16", [codes], [image], inits))


def with_twin(version_dir: Path, twin: onnx.ModelProto) -> None:
    """`twin` as model.fp16.onnx (in the card's sha256, export parity within atol), precision fp16."""
    data = twin.SerializeToString()
    (version_dir / "model.fp16.onnx").write_bytes(data)
    card_path = version_dir / "card.json"
    card = json.loads(card_path.read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
    card["parity"] = {"fp16_max_abs_diff": 0.0, "fp16_atol": 0.01}
    card_path.write_text(json.dumps(card))
    config_path = version_dir.parent / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "precision": "fp16"}))


def test_an_fp16_twin_that_overflows_where_the_check_never_looked_is_not_served(tmp_path: Path) -> None:
    root = tmp_path / "models"
    with_twin(
        write_model(root, "tr", "two_way_translator", two_way_graph(), translator_card()), two_way_twin()
    )
    decoder_card = {
        "grid": list(GRID),
        "codebook_size": K,
        "image_size": list(GRID),
        "channels": 1,
        "output_range": [0.0, 1.0],
    }
    with_twin(write_model(root, "dec", "code_decoder", decoder_graph(*GRID, K), decoder_card), decoder_twin())

    with running_server(root, tmp_path / "work") as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        served = {
            m.name: (m.versions[0].state, m.versions[0].precision, m.versions[0].reason)
            for m in stub.ListModels(pb.ListModelsRequest()).models
        }
        # The twins differ from fp32 by inf on what they serve: fp32, with the reason.
        assert {name: served[name][:2] for name in ("tr", "dec")} == {
            "tr": (pb.MODEL_STATE_READY, "fp32"),
            "dec": (pb.MODEL_STATE_READY, "fp32"),
        }, served
        for name in ("tr", "dec"):
            why = f"model {name} version 1: serving fp32: fp16 differs from fp32 by inf"
            assert why in server.log(), name
        # What a client gets: B -> A translations computed by fp32, finite.
        image = np.random.default_rng(0).uniform(0, 1, (1, 12, 12)).astype(np.float32)
        request = pb.ImageRequest(
            model="tr",
            images=[tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=image.tobytes(), shape=image.shape)],
            output=F32,
            direction=pb.DIRECTION_B_TO_A,
        )
        out = tensor_of(stub.Translate(request, timeout=30).images[0])
        assert np.isfinite(out).all(), "B -> A served by an fp16 twin that overflows"
