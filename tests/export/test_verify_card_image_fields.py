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
import onnx
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


@pytest.mark.parametrize("channels", [2, 4])
def test_a_card_of_other_than_1_or_3_channels_fails_verify_as_the_server_refuses_it(
    exported: Path, tmp_path: Path, channels: int
) -> None:
    """A hand-written card for an RGBA (or gray + alpha) generator, its channels as its graph says:
    the server's load refuses it (config.load_card: channels must be 1 (gray) or 3 (RGB)), and verify
    passed it, its card check taking any positive channels. verify refuses it, naming channels."""
    from genserve_server.config import ConfigError, load_card

    root = tmp_path / "repo"
    shutil.copytree(exported, root)
    weights = np.random.default_rng(0).normal(0, 0.5, (8, channels * 64)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["z", "W"], ["hidden"]),
            helper.make_node("Tanh", ["hidden"], ["act"]),
            helper.make_node("Reshape", ["act", "shape"], ["image"]),
        ],
        "rgba",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array([-1, channels, 8, 8]), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    (root / "gray" / "1" / "model.onnx").write_bytes(data)
    _edit_card(
        root,
        channels=channels,
        outputs=[{"name": "image", "dtype": "float32", "shape": [-1, channels, 8, 8]}],
        sha256={"model.onnx": hashlib.sha256(data).hexdigest()},
    )
    with pytest.raises(ConfigError, match="channels"):
        load_card(root / "gray" / "1" / "card.json")  # what the server does with it
    report = verify_repository(root, recompute_quality=False)
    assert not report.ok, report.format()
    assert any(
        "'channels'" in e and "1 (gray) or 3 (RGB)" in e and f"got {channels}" in e
        for e in report.models[0].errors
    ), report.format()


class TinySuperResolution(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shuffle(self.conv(image)))


def _fix_sr_size(version_dir: Path, side: int, out_side: int) -> None:
    """Rewrite an exported x2 super-resolution version as one exported at one input size, as a
    hand-written card for an ONNX file made elsewhere would describe it: the graph's input
    [N, 3, side, side] and output [N, 3, out_side, out_side], card.json's image_size [side, side]."""
    model = onnx.load(version_dir / "model.onnx")
    for tensor, size in ((model.graph.input[0], side), (model.graph.output[0], out_side)):
        for dim in tensor.type.tensor_type.shape.dim[2:]:
            dim.dim_value = size
    data = model.SerializeToString()
    (version_dir / "model.onnx").write_bytes(data)
    card_path = version_dir / "card.json"
    card = json.loads(card_path.read_text())
    card["image_size"] = [side, side]
    card["inputs"][0]["shape"] = [-1, 3, side, side]
    card["outputs"][0]["shape"] = [-1, 3, out_side, out_side]
    card["sha256"] = {"model.onnx": hashlib.sha256(data).hexdigest()}
    card_path.write_text(json.dumps(card, indent=2))


def test_a_fixed_size_super_resolution_card_verifies_with_its_output_at_scale_factor_x_image_size(
    tmp_path: Path,
) -> None:
    """A super-resolution card's image_size is its graph's one input size, the output being
    scale_factor x it (docs/model-repository.md; the server's load checks so). verify refused such a
    card ('image_size' must be null) and checked the output against image_size itself, so a fixed
    8x8 -> 16x16 model the server serves failed verify; a graph whose output is not image_size x
    scale_factor still fails, naming both sizes as the server's load does."""
    torch.manual_seed(0)
    export_model(
        TinySuperResolution().eval(),
        kind="super_resolution",
        name="sr",
        out_dir=tmp_path / "exported",
        example_inputs={"image": torch.rand(2, 3, 8, 8)},
        card={"description": "tiny x2", "output_range": [0, 1], "input_range": [0, 1], "scale_factor": 2},
        fp16=False,
    )
    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(tmp_path / "exported", good)
    _fix_sr_size(good / "sr" / "1", 8, 16)
    report = verify_repository(good, recompute_quality=False)
    assert report.ok, report.format()

    # A x4 card on the same graph: its 8x8 input gives 16x16, not 32x32.
    shutil.copytree(tmp_path / "exported", bad)
    _fix_sr_size(bad / "sr" / "1", 8, 16)
    card_path = bad / "sr" / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["scale_factor"] = 4
    card_path.write_text(json.dumps(card, indent=2))
    report = verify_repository(bad, recompute_quality=False)
    assert not report.ok, report.format()
    errors = report.models[0].errors
    assert any("'image_size' ([8, 8]" in e and "32x32" in e and "scale_factor 4" in e for e in errors), (
        report.format()
    )


def test_a_fixed_size_card_whose_size_is_no_multiple_of_size_multiple_fails_verify(tmp_path: Path) -> None:
    """The server refuses to load a fully convolutional card whose image_size (the graph's one input
    size) is not a multiple of size_multiple, as it pads images to that multiple: verify says so too."""
    torch.manual_seed(0)
    export_model(
        TinySuperResolution().eval(),
        kind="super_resolution",
        name="sr",
        out_dir=tmp_path,
        example_inputs={"image": torch.rand(2, 3, 8, 8)},
        card={"description": "tiny x2", "output_range": [0, 1], "input_range": [0, 1], "scale_factor": 2},
        fp16=False,
    )
    _fix_sr_size(tmp_path / "sr" / "1", 10, 20)
    card_path = tmp_path / "sr" / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["size_multiple"] = 4
    card_path.write_text(json.dumps(card, indent=2))
    report = verify_repository(tmp_path, recompute_quality=False)
    assert not report.ok, report.format()
    errors = report.models[0].errors
    assert any("image_size" in e and "[10, 10]" in e and "size_multiple" in e for e in errors), (
        report.format()
    )


@pytest.mark.parametrize(("channels", "served"), [(4, True), (5, False)])
def test_an_encoders_channels_pass_verify_exactly_when_the_server_loads_them(
    tmp_path: Path, channels: int, served: bool
) -> None:
    """A kind that takes an image and outputs none (vae_encoder): the server's load reads its card's
    channels up to 4 (config.load_card) and verify took any positive int, so a card of 5 verified OK
    and never loaded. verify refuses what the load refuses, naming channels."""
    from genserve_server.config import ConfigError, load_card

    shipped = Path(__file__).resolve().parents[2] / "models" / "vae-digits-encoder"
    root = tmp_path / "repo"
    shutil.copytree(shipped, root / "vae-digits-encoder")
    card_path = root / "vae-digits-encoder" / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["channels"] = channels
    card_path.write_text(json.dumps(card, indent=2))
    try:
        load_card(card_path)  # what the server does with it
    except ConfigError as e:
        assert not served, e
        assert "channels" in str(e)
    else:
        assert served
    report = verify_repository(root, recompute_quality=False)
    errors = report.models[0].errors
    assert any("'channels'" in e for e in errors) is not served, report.format()
    if not served:
        assert any("'channels'" in e and "1..4" in e and "got 5" in e for e in errors), report.format()


def _copy(exported: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(exported, root)
    return root


def _errors(root: Path) -> list[str]:
    report = verify_repository(root, recompute_quality=False)
    assert not report.ok, report.format()
    return [*report.errors, *(e for m in report.models for e in m.errors)]


def test_a_card_whose_name_or_version_is_not_its_directorys_fails_verify(
    exported: Path, tmp_path: Path
) -> None:
    """The server serves a version by its directory: a card naming another entry or version is refused."""
    root = _copy(exported, tmp_path)
    _edit_card(root, name="grey")
    assert any("name/version grey/1 differ from the directory" in e for e in _errors(root))


def test_a_config_json_of_another_kind_than_the_card_fails_verify(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path)
    config_path = root / "gray" / "config.json"
    config = json.loads(config_path.read_text())
    config["kind"] = "conditional_generator"
    config_path.write_text(json.dumps(config, indent=2))
    want = "config.json kind 'conditional_generator' differs from the card's 'generator'"
    assert any(want in e for e in _errors(root))


def test_a_graph_the_card_does_not_list_fails_verify(exported: Path, tmp_path: Path) -> None:
    """An .onnx file no digest covers (a stray model.fp16.onnx) is named, not silently served past."""
    root = _copy(exported, tmp_path)
    shutil.copy(root / "gray" / "1" / "model.onnx", root / "gray" / "1" / "model.fp16.onnx")
    assert any("files not listed in the card's sha256: ['model.fp16.onnx']" in e for e in _errors(root))


def test_a_version_directory_with_a_leading_zero_fails_verify(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path)
    shutil.copytree(root / "gray" / "1", root / "gray" / "01")
    assert any("version directories must be positive integers" in e and "'01'" in e for e in _errors(root))


def test_a_card_whose_opset_is_below_17_fails_verify(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path)
    _edit_card(root, opset=16)
    assert any("field 'opset' must be an int >= 17" in e and "got 16" in e for e in _errors(root))


def test_a_card_whose_output_dtype_is_not_the_graphs_fails_verify(exported: Path, tmp_path: Path) -> None:
    """Same name and shape, another dtype: the server would decode the bytes as the card says."""
    root = _copy(exported, tmp_path)
    _edit_card(root, outputs=[{"name": "image", "dtype": "float16", "shape": [-1, 1, 8, 8]}])
    want = "output 'image' is float32 [-1, 1, 8, 8], the card says float16 [-1, 1, 8, 8]"
    assert any(want in e for e in _errors(root))


def _add_fp16_graph(root: Path, shift: float, fp16_max_abs_diff: float | None) -> None:
    """A model.fp16.onnx listed in the card: model.onnx with ``shift`` added to its first weight."""
    version = root / "gray" / "1"
    model = onnx.load(str(version / "model.onnx"))
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(shift), init.name))
    onnx.save(model, str(version / "model.fp16.onnx"))
    card = json.loads((version / "card.json").read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256((version / "model.fp16.onnx").read_bytes()).hexdigest()
    card["parity"]["fp16_max_abs_diff"] = fp16_max_abs_diff
    card["parity"]["fp16_atol"] = 0.01
    (version / "card.json").write_text(json.dumps(card, indent=2))


def test_an_fp16_graph_further_from_model_onnx_than_fp16_atol_fails_verify(
    exported: Path, tmp_path: Path
) -> None:
    root = _copy(exported, tmp_path)
    _add_fp16_graph(root, 0.5, 0.0)
    errors = _errors(root)
    assert any("model.fp16.onnx differs from model.onnx by" in e and "> fp16_atol 0.01" in e for e in errors)
    within = tmp_path / "within"
    shutil.copytree(exported, within)
    _add_fp16_graph(within, 0.0, 0.0)
    report = verify_repository(within, recompute_quality=False)
    assert report.ok, report.format()


def test_an_fp16_graph_with_no_recorded_parity_fails_verify(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path)
    _add_fp16_graph(root, 0.0, None)
    assert any("model.fp16.onnx is present but parity.fp16_max_abs_diff is null" in e for e in _errors(root))


def _reshape_fp16_graph_at_run_time(root: Path, shape: list[int]) -> None:
    """model.fp16.onnx as a copy of model.onnx whose image is reshaped to ``shape`` by a target
    computed at run time (so the graph still declares [N, 1, 8, 8]), listed in the card."""
    version = root / "gray" / "1"
    model = onnx.load(str(version / "model.onnx"))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(shape, np.int64), "alt_shape"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
        ]
    )
    nodes = [
        helper.make_node("Shape", ["z"], ["z_width"], start=1),
        helper.make_node("Mul", ["z_width", "zero"], ["no_width"]),
        helper.make_node("Add", ["alt_shape", "no_width"], ["run_time_shape"]),
    ]
    for i, node in enumerate(nodes):
        model.graph.node.insert(i, node)
    for node in model.graph.node:
        if node.op_type == "Reshape":
            node.input[1] = "run_time_shape"
    onnx.save(model, str(version / "model.fp16.onnx"))
    card = json.loads((version / "card.json").read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256((version / "model.fp16.onnx").read_bytes()).hexdigest()
    card["parity"]["fp16_max_abs_diff"] = 0.0
    (version / "card.json").write_text(json.dumps(card, indent=2))


def test_an_fp16_output_shaped_unlike_model_onnxs_is_named_as_not_compared_not_reported_as_0_apart(
    exported: Path, tmp_path: Path
) -> None:
    """Outputs of two shapes cannot be compared: the fp16 note names them, never a max abs diff of
    0 as if every output had been compared."""
    root = _copy(exported, tmp_path)
    _reshape_fp16_graph_at_run_time(root, [-1, 1, 4, 16])
    report = verify_repository(root, recompute_quality=False)
    assert not report.ok
    (model,) = report.models
    assert any("model.fp16.onnx image at z[1, 8]: shape [1, 1, 4, 16], expected" in e for e in model.errors)
    (note,) = [n for n in model.notes if n.startswith("fp16 vs fp32")]
    assert "not compared" in note and "image at z[1, 8]" in note and "image at z[7, 8]" in note, note


def test_a_graph_whose_output_is_nan_fails_verify_naming_it(exported: Path, tmp_path: Path) -> None:
    """NaN compares false against any output_range bound: it is named as non-finite, not passed."""
    root = _copy(exported, tmp_path)
    version = root / "gray" / "1"
    model = onnx.load(str(version / "model.onnx"))
    (bias,) = [init for init in model.graph.initializer if init.name.endswith("bias")]
    bias.CopyFrom(numpy_helper.from_array(np.full(64, np.nan, np.float32), bias.name))
    onnx.save(model, str(version / "model.onnx"))
    card = json.loads((version / "card.json").read_text())
    card["sha256"]["model.onnx"] = hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()
    (version / "card.json").write_text(json.dumps(card, indent=2))
    errors = _errors(root)
    assert "model.onnx image at z[1, 8]: non-finite values" in errors
    assert "model.onnx image at z[7, 8]: non-finite values" in errors
