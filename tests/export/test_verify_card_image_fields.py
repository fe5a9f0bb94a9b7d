"""`verify` checks a card's `channels` and `image_size` against the graph's image output: they are
what the server serves by (pixel layout, GetModel's output_shape, send-size limits), and a card
written by hand for an ONNX file made elsewhere (docs/model-repository.md) may get them wrong, e.g.
channels 3 for a gray graph, or an NHWC output [N, H, W, C] under a card that says C and [H, W]."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from genserve_export import export_model, verify_repository


class GrayGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(z)).view(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    export_model(
        GrayGenerator(),
        kind="generator",
        name="gray",
        out_dir=root,
        example_inputs={"z": torch.randn(4, 8)},
        card={"description": "gray 8x8 generator", "output_range": [-1, 1]},
        fp16=False,
    )
    return root


def _edit_card(root: Path, **fields: object) -> None:
    path = root / "gray" / "1" / "card.json"
    card = json.loads(path.read_text())
    card.update(fields)
    path.write_text(json.dumps(card, indent=2))


def test_exported_card_verifies(exported: Path) -> None:
    report = verify_repository(exported, recompute_quality=False)
    assert report.ok, report.format()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"channels": 3}, "channels"),
        ({"image_size": [16, 16]}, "image_size"),
    ],
)
def test_card_whose_image_fields_contradict_the_graph_fails_verify(
    exported: Path, tmp_path: Path, fields: dict[str, object], named: str
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(exported, root)
    _edit_card(root, **fields)
    report = verify_repository(root, recompute_quality=False)
    assert not report.ok, report.format()
    assert any(named in e for e in report.models[0].errors), report.format()


def test_nhwc_graph_under_a_hand_written_card_fails_verify(exported: Path, tmp_path: Path) -> None:
    """An ONNX file made elsewhere with an NHWC output: its card restates the graph's outputs
    ([-1, 8, 8, 1]) as docs/model-repository.md asks, but channels / image_size say NCHW."""
    root = tmp_path / "repo"
    shutil.copytree(exported, root)
    weights = np.random.default_rng(0).normal(0, 0.5, (8, 64)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["z", "W"], ["hidden"]),
            helper.make_node("Tanh", ["hidden"], ["act"]),
            helper.make_node("Reshape", ["act", "shape"], ["image"]),
        ],
        "nhwc",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array([-1, 8, 8, 1]), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    (root / "gray" / "1" / "model.onnx").write_bytes(data)
    _edit_card(
        root,
        outputs=[{"name": "image", "dtype": "float32", "shape": [-1, 8, 8, 1]}],
        sha256={"model.onnx": hashlib.sha256(data).hexdigest()},
    )
    report = verify_repository(root, recompute_quality=False)
    assert not report.ok, report.format()
    assert any("channels" in e and "[1, 8, 8, 1]" in e for e in report.models[0].errors), report.format()
