"""Tests for genserve_server.tiling: plans, exact tiled inference, and the receptive-field probe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from genserve_server import validate
from genserve_server.errors import InvalidArgument
from genserve_server.tiling import Tile, blend, extract, plan_tiles, receptive_field_radius

F32 = NDArray[np.float32]
Model = Callable[[F32], F32]
REPO = Path(__file__).resolve().parents[2]


def box3(x: F32) -> F32:
    """3x3 box filter with zero padding, per channel: receptive radius 1."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2], x.shape[3]
    out: F32 = sum(padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)) / np.float32(9)  # type: ignore[assignment]
    return out


def numpy_sr_x2(x: F32) -> F32:
    """Two box filters and a nonlinearity at input resolution, nearest x2, one box filter at output
    resolution: radius 1 + 1 + ceil(1 / 2) = 3 input pixels."""
    y = np.tanh(1.3 * box3(box3(x))).astype(np.float32)
    return box3(y.repeat(2, axis=2).repeat(2, axis=3))


def onnx_sr_x2() -> onnx.ModelProto:
    """A tiny SRResNet-like graph: 3 convs at input resolution, PixelShuffle x2, a conv at output
    resolution, plus a bilinear (half-pixel) skip. Radius 3 (LR convs) + 1 (HR conv) = 4."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    def conv(inp: str, out: str, w: str) -> onnx.NodeProto:
        return helper.make_node("Conv", [inp, w, w + "_b"], [out], kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    inits = [
        weight("w1", (8, 3, 3, 3)),
        weight("w2", (8, 8, 3, 3)),
        weight("w3", (12, 8, 3, 3)),
        weight("w4", (3, 3, 3, 3)),
    ]
    inits += [
        numpy_helper.from_array(rng.standard_normal(t.dims[0]).astype(np.float32) * 0.1, t.name + "_b")
        for t in inits
    ]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"))
    nodes = [
        conv("image", "c1", "w1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        conv("r1", "c2", "w2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        conv("r2", "c3", "w3"),
        helper.make_node("DepthToSpace", ["c3"], ["up"], blocksize=2, mode="CRD"),
        conv("up", "c4", "w4"),
        helper.make_node("Resize", ["image", "", "scales"], ["skip"], mode="linear"),
        helper.make_node("Add", ["c4", "skip"], ["output_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_sr",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("output_image", TensorProto.FLOAT, ["batch", 3, "h2", "w2"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def onnx_model() -> Model:
    ort = pytest.importorskip("onnxruntime")
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_sr_x2().SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    def run(x: F32) -> F32:
        out: F32 = session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out

    return run


def sample_image() -> F32:
    return np.random.default_rng(1).random((3, 200, 300), dtype=np.float32)


def tiled(model: Model, img: F32, plan: list[Tile], scale: int) -> NDArray[np.float32]:
    batch = np.stack([extract(img, t) for t in plan])  # equal shapes: one batch
    outputs = model(batch)
    return blend(list(outputs), plan, img.shape[1], img.shape[2], scale)


# ------------------------------------------------------------------------------------------------
# Plans.


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap", "multiple"),
    [
        (200, 300, 96, 24, 1),
        (200, 300, 64, 16, 1),
        (1000, 37, 128, 32, 1),
        (97, 301, 40, 8, 1),
        (256, 192, 64, 12, 8),
    ],
)
def test_plan_invariants(h: int, w: int, tile: int, overlap: int, multiple: int) -> None:
    plan = plan_tiles(h, w, tile, overlap, multiple)
    shapes = {(t.h, t.w) for t in plan}
    assert len(shapes) == 1, "all tiles of an image share one shape so they batch together"
    th, tw = shapes.pop()
    assert th == min(h, tile - tile % multiple)
    assert tw == min(w, tile - tile % multiple)
    cover = np.zeros((h, w), dtype=np.int64)
    for t in plan:
        assert 0 <= t.y0 < t.y1 <= h and 0 <= t.x0 < t.x1 <= w
        assert t.y0 <= t.cy0 < t.cy1 <= t.y1 and t.x0 <= t.cx0 < t.cx1 <= t.x1
        assert t.y0 % multiple == 0 and t.x0 % multiple == 0
        cover[t.cy0 : t.cy1, t.cx0 : t.cx1] += 1
    np.testing.assert_array_equal(cover, 1)  # the cores partition the image
    ys = sorted({(t.y0, t.y1) for t in plan})
    xs = sorted({(t.x0, t.x1) for t in plan})
    for spans in (ys, xs):
        for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False):
            assert a1 - b0 >= overlap, "neighbours overlap by at least `overlap`"


def test_image_smaller_than_a_tile_is_one_tile() -> None:
    plan = plan_tiles(50, 70, 128, 16)
    assert plan == [Tile(0, 0, 50, 70, 0, 0, 50, 70, 0, 0)]
    assert (plan[0].h, plan[0].w) == (50, 70)
    img = np.random.default_rng(2).random((3, 50, 70), dtype=np.float32)
    np.testing.assert_array_equal(tiled(numpy_sr_x2, img, plan, 2), numpy_sr_x2(img[np.newaxis])[0])


def test_one_axis_smaller_than_a_tile() -> None:
    plan = plan_tiles(40, 300, 96, 24)
    assert len(plan) == 4
    assert all((t.y0, t.y1, t.h, t.w) == (0, 40, 40, 96) for t in plan)


def test_border_tiles_shift_inward() -> None:
    plan = plan_tiles(100, 100, 64, 16)
    assert [(t.y0, t.y1) for t in plan[::2]] == [(0, 64), (36, 100)]


def test_plan_arguments_validated() -> None:
    with pytest.raises(ValueError, match="margin"):
        plan_tiles(100, 100, 64, 16, margin=9)
    with pytest.raises(ValueError, match="padded to a multiple"):
        plan_tiles(100, 101, 64, 16, 4)
    with pytest.raises(ValueError, match="no stride"):
        plan_tiles(100, 100, 16, 16)
    with pytest.raises(ValueError, match="at least 1x1"):
        plan_tiles(0, 10, 16, 4)


# ------------------------------------------------------------------------------------------------
# Exactness.


@pytest.mark.parametrize(
    ("tile", "overlap", "margin"), [(96, 24, None), (64, 16, 4), (80, 6, 3), (96, 12, 3)]
)
def test_numpy_model_tiled_equals_untiled(tile: int, overlap: int, margin: int | None) -> None:
    img = sample_image()
    plan = plan_tiles(200, 300, tile, overlap, margin=margin)
    assert len(plan) >= 4
    out = tiled(numpy_sr_x2, img, plan, 2)
    assert out.shape == (3, 400, 600)
    np.testing.assert_allclose(out, numpy_sr_x2(img[np.newaxis])[0], rtol=0, atol=1e-5)


def test_onnx_model_tiled_equals_untiled(onnx_model: Model) -> None:
    """The bar: a 300x200 image cut into >= 4 tiles equals the untiled result within 1e-5."""
    img = sample_image()
    radius = receptive_field_radius(onnx_model, 3, 32)
    assert radius == 4
    for tile, overlap, margin in [(96, 2 * radius, radius), (128, 32, radius), (96, 4 * radius, None)]:
        plan = plan_tiles(200, 300, tile, overlap, margin=margin)
        assert len(plan) >= 4
        np.testing.assert_allclose(
            tiled(onnx_model, img, plan, 2), onnx_model(img[np.newaxis])[0], rtol=0, atol=1e-5
        )


def test_too_small_a_margin_is_not_exact(onnx_model: Model) -> None:
    """The negative control: margin 1 < radius 4 with a tight overlap leaves visible seams."""
    img = np.random.default_rng(3).random((3, 188, 188), dtype=np.float32)
    plan = plan_tiles(188, 188, 96, 4, margin=1)  # 2 x 2 tiles overlapping by exactly 4
    assert {t.y0 for t in plan} == {0, 92}
    error = np.abs(tiled(onnx_model, img, plan, 2) - onnx_model(img[np.newaxis])[0]).max()
    assert error > 1e-3


def test_seams_are_blended_not_cut() -> None:
    """Where tiles disagree (a model that sees tile edges), the seam is a ramp, not a step."""
    plan = plan_tiles(1, 200, 80, 32, margin=4)
    assert plan[0].feather_x == 12
    outputs = [np.full((1, 1, t.w), float(i), dtype=np.float32) for i, t in enumerate(plan)]
    row = blend(outputs, plan, 1, 200, 1)[0, 0]
    boundary = plan[1].cx0
    ramp = row[boundary - 12 : boundary + 12]
    assert np.all(np.diff(ramp) > 0)
    assert row[boundary - 13] == 0.0 and row[boundary + 12] == 1.0


def test_blend_crops_padded_outputs_and_validates() -> None:
    plan = plan_tiles(30, 30, 16, 4)
    outputs = [np.ones((1, 2 * 20, 2 * 20), dtype=np.float32) for _ in plan]  # padded beyond the tile
    np.testing.assert_array_equal(blend(outputs, plan, 30, 30, 2), 1.0)
    with pytest.raises(ValueError, match="does not cover"):
        blend([np.ones((1, 8, 8), dtype=np.float32) for _ in plan], plan, 30, 30, 2)
    with pytest.raises(ValueError, match="outputs for"):
        blend(outputs[:-1], plan, 30, 30, 2)


# ------------------------------------------------------------------------------------------------
# The receptive-field probe.


def test_radius_of_known_models() -> None:
    assert receptive_field_radius(numpy_sr_x2, 3, 32) == 3
    assert receptive_field_radius(lambda x: x.repeat(4, axis=2).repeat(4, axis=3), 1, 16) == 0
    assert receptive_field_radius(lambda x: box3(box3(box3(x))), 1, 16) == 3


def test_non_local_model_has_no_radius() -> None:
    assert receptive_field_radius(lambda x: x + x.mean(axis=(2, 3), keepdims=True), 3, 32) is None


def test_radius_counts_accumulated_small_contributions() -> None:
    """Each pixel of a 13x13 window moves the output by at most 4e-7 (< atol 1e-6), but the pixels
    beyond a tile edge move it together: the half-image probe sees the full radius 6."""

    def faint_wide(x: F32) -> F32:
        x64 = x.astype(np.float64)
        padded = np.pad(x64, ((0, 0), (0, 0), (6, 6), (6, 6)))
        h, w = x.shape[2], x.shape[3]
        window = sum(padded[:, :, i : i + h, j : j + w] for i in range(13) for j in range(13))
        out: NDArray[np.float64] = x64 + 4e-7 * window  # float64: no rounding noise at the 1e-7 level
        return out  # type: ignore[return-value]

    assert receptive_field_radius(faint_wide, 1, 32, atol=1e-6) == 6


# ------------------------------------------------------------------------------------------------
# The real super-resolution model, when the model repository has one.


def real_sr_models() -> list[Path]:
    return sorted(REPO.glob("models/sr-*/[0-9]*/card.json"))


@pytest.mark.parametrize(
    "card_path", real_sr_models() or [pytest.param(None, marks=pytest.mark.skip("no SR model"))]
)
def test_real_sr_model_tiled_equals_untiled(card_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    ort.set_default_logger_severity(3)
    card: dict[str, Any] = json.loads(card_path.read_text())
    session = ort.InferenceSession(str(card_path.parent / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: F32) -> F32:
        out: F32 = session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out

    channels, scale = card["input_channels"], card["scale_factor"]
    radius = receptive_field_radius(run, channels, 64, input_range=tuple(card["input_range"]))
    assert radius is not None, "the SR model is not local: tiling cannot be exact"
    lo, hi = (float(v) for v in card["input_range"])
    img = np.random.default_rng(4).uniform(lo, hi, (channels, 200, 300)).astype(np.float32)
    overlap = max(card["tile_overlap"], 2 * radius + 8)
    plan = plan_tiles(200, 300, max(card["tile_size"], 4 * overlap), overlap, margin=radius)
    assert len(plan) >= 4
    np.testing.assert_allclose(tiled(run, img, plan, scale), run(img[np.newaxis])[0], rtol=0, atol=1e-5)
    assert 2 * radius <= card["tile_overlap"], (
        f"{card_path}: tile_overlap {card['tile_overlap']} < 2 x measured receptive-field radius {radius}"
    )


@pytest.mark.parametrize("size_multiple", [1, 4, 8])
@pytest.mark.parametrize("min_size", [1, 16, 20])
@pytest.mark.parametrize("overlap", [0, 3, 8, 32])
def test_the_smallest_tile_a_refusal_names_is_taken_and_one_less_is_refused(
    size_multiple: int, min_size: int, overlap: int
) -> None:
    """A tile_size refusal names the smallest tile_size that passes every rule (validate.tiling):
    that size, and MAX_TILE, are taken; one less is refused naming tile_size and that size."""
    smallest = validate.smallest_tile(overlap, size_multiple, min_size)
    validate.tiling(smallest, overlap, size_multiple, min_size=min_size)
    validate.tiling(validate.MAX_TILE, overlap, size_multiple, min_size=min_size)
    with pytest.raises(InvalidArgument) as excinfo:
        validate.tiling(smallest - 1, overlap, size_multiple, min_size=min_size)
    message = str(excinfo.value)
    assert message.startswith(("tile_size: ", "tile_overlap: ")), message
    if message.startswith("tile_size: "):
        assert f"{smallest}" in message and message.endswith(f"got {smallest - 1}"), message
