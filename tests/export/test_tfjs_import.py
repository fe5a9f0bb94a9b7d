"""TF.js layers model -> PyTorch rebuild -> repository entry, on a small synthetic package.

Nothing is fetched: each test writes its own ``model.json`` and weight shards with the layer types of
upscalerjs' ESRGAN/RRDN models (Conv2D, Activation, Concatenate, Add, MultiplyBeta, PixelShuffle,
LeakyReLU, UpSampling2D), a few channels wide.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from genserve_export import verify_repository
from genserve_export.data import photos
from genserve_export.errors import InvalidArgumentError
from genserve_export.import_sr import ImportFailedError, import_tfjs_sr
from genserve_export.tfjs_graph import TfjsGraph, TfjsModelError, depth_to_space, read_layers_model
from genserve_export.tfjs_reference import conv2d_nhwc, depth_to_space_nhwc, run_reference


def _conv(name: str, filters: int, kernel: tuple[int, int], inbound: str, **extra: Any) -> dict[str, Any]:
    config = {
        "name": name,
        "filters": filters,
        "kernel_size": list(kernel),
        "strides": [1, 1],
        "padding": extra.pop("padding", "same"),
        "data_format": "channels_last",
        "dilation_rate": [1, 1],
        "groups": 1,
        "activation": extra.pop("activation", "linear"),
        "use_bias": True,
    }
    return {"class_name": "Conv2D", "config": config, "name": name, "inbound_nodes": [[[inbound, 0, 0, {}]]]}


def _layer(cls: str, name: str, inbound: list[str], **config: Any) -> dict[str, Any]:
    return {
        "class_name": cls,
        "config": {"name": name, **config},
        "name": name,
        "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]],
    }


def tiny_rrdn_layers(scale: int = 2) -> list[dict[str, Any]]:
    """A dense block with residual scaling, then TF depth-to-space and a nearest-upsampling branch."""
    return [
        {
            "class_name": "InputLayer",
            "config": {"batch_input_shape": [None, None, None, 3], "dtype": "float32", "name": "LR"},
            "name": "LR",
            "inbound_nodes": [],
        },
        _conv("pre", 6, (3, 5), "LR"),  # a non-square kernel: H and W must not be swapped
        _conv("f1", 4, (3, 3), "pre"),
        _layer("Activation", "f1_relu", ["f1"], activation="relu"),
        _layer("Concatenate", "cat", ["pre", "f1_relu"], axis=3),
        _conv("lff", 6, (1, 1), "cat", padding="valid"),
        _layer("MultiplyBeta", "beta", ["lff"], beta=0.2),
        _layer("Add", "res", ["pre", "beta"]),
        _layer("LeakyReLU", "leaky", ["res"], alpha=0.1),
        _conv("preshuffle", 3 * scale * scale, (3, 3), "leaky"),
        _layer(f"PixelShuffle{scale}x", "shuffle", ["preshuffle"], scale=scale),
        _conv("skip", 3, (3, 3), "LR", activation="relu"),
        _layer("UpSampling2D", "up", ["skip"], size=[scale, scale], interpolation="nearest"),
        _layer("Add", "sum", ["shuffle", "up"]),
        _conv("SR", 3, (3, 3), "sum"),
    ]


def write_model(
    directory: Path, layers: list[dict[str, Any]], seed: int = 0, weight_scale: float = 0.3
) -> dict[str, np.ndarray]:
    """model.json + two shards (a weight split across them) in `directory`; returns the weights."""
    rng = np.random.default_rng(seed)
    specs, weights = [], {}
    channels = {"LR": 3}
    for entry in layers:
        cfg, name = entry["config"], entry["name"]
        inbound = [ref[0] for ref in entry["inbound_nodes"][0]] if entry["inbound_nodes"] else []
        if entry["class_name"] == "Conv2D":
            kh, kw = cfg["kernel_size"]
            kernel = rng.normal(0.0, weight_scale, (kh, kw, channels[inbound[0]], cfg["filters"]))
            weights[f"{name}/kernel"] = kernel.astype(np.float32)
            weights[f"{name}/bias"] = rng.normal(0.0, 0.1, cfg["filters"]).astype(np.float32)
            channels[name] = cfg["filters"]
        elif entry["class_name"] == "Concatenate":
            channels[name] = sum(channels[i] for i in inbound)
        elif entry["class_name"].startswith("PixelShuffle"):
            channels[name] = channels[inbound[0]] // cfg["scale"] ** 2
        elif inbound:
            channels[name] = channels[inbound[0]]
    blob = b"".join(w.astype("<f4").tobytes() for w in weights.values())
    half = len(blob) // 2 + 2  # not on a weight boundary
    (directory / "group1-shard1of2.bin").write_bytes(blob[:half])
    (directory / "group1-shard2of2.bin").write_bytes(blob[half:])
    specs = [{"name": k, "shape": list(v.shape), "dtype": "float32"} for k, v in weights.items()]
    document = {
        "format": "layers-model",
        "generatedBy": "keras v2.10.0",
        "convertedBy": "TensorFlow.js Converter v1.2.6",
        "modelTopology": {
            "model_config": {
                "class_name": "Functional",
                "config": {
                    "name": "tiny",
                    "layers": layers,
                    "input_layers": [[layers[0]["name"], 0, 0]],
                    "output_layers": [[layers[-1]["name"], 0, 0]],
                },
            }
        },
        "weightsManifest": [{"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"], "weights": specs}],
    }
    (directory / "model.json").write_text(json.dumps(document))
    return weights


def torch_nhwc(graph: TfjsGraph, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = graph(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
    return out.numpy().transpose(0, 2, 3, 1)


# --- layout conversions against plain numpy ----------------------------------------------------


def test_depth_to_space_uses_tensorflow_channel_order() -> None:
    rng = np.random.default_rng(1)
    n, h, w, r, c = 2, 3, 4, 2, 3
    x = rng.normal(size=(n, h, w, r * r * c))
    want = np.zeros((n, h * r, w * r, c))
    for y in range(h):  # TF's definition, element by element
        for xx in range(w):
            for i in range(r):
                for j in range(r):
                    want[:, y * r + i, xx * r + j, :] = x[:, y, xx, (i * r + j) * c : (i * r + j + 1) * c]
    np.testing.assert_array_equal(depth_to_space_nhwc(x, r), want)
    got = depth_to_space(torch.from_numpy(x.transpose(0, 3, 1, 2)), r).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)
    # ... which is not PyTorch's PixelShuffle order
    shuffled = torch.nn.functional.pixel_shuffle(torch.from_numpy(x.transpose(0, 3, 1, 2)), r)
    assert not np.allclose(shuffled.numpy().transpose(0, 2, 3, 1), want)


def test_conv_kernel_hwio_is_read_as_tensorflow_does(tmp_path: Path) -> None:
    layers = tiny_rrdn_layers()[:2]  # input -> a 3x5 'same' conv
    weights = write_model(tmp_path, layers)
    graph = TfjsGraph(read_layers_model(tmp_path)).eval()
    x = np.random.default_rng(2).uniform(size=(1, 7, 9, 3))
    got = torch_nhwc(graph, x)
    kernel, bias = weights["pre/kernel"].astype(np.float64), weights["pre/bias"]
    # One output pixel by hand:
    # out[y, x, o] = b[o] + sum over dy, dx, i of in[y + dy - 1, x + dx - 2, i] * K[dy, dx, i, o]
    y0, x0 = 3, 4
    by_hand = bias.astype(np.float64).copy()
    for dy in range(3):
        for dx in range(5):
            by_hand += x[0, y0 + dy - 1, x0 + dx - 2] @ kernel[dy, dx]
    np.testing.assert_allclose(got[0, y0, x0], by_hand, atol=1e-5)
    np.testing.assert_allclose(got, conv2d_nhwc(x, kernel, bias, "same"), atol=1e-5)


def test_rebuilt_graph_matches_the_numpy_reference(tmp_path: Path) -> None:
    write_model(tmp_path, tiny_rrdn_layers(scale=2))
    model = read_layers_model(tmp_path)
    graph = TfjsGraph(model).eval()
    x = np.random.default_rng(3).uniform(size=(2, 6, 5, 3))
    got = torch_nhwc(graph, x)
    want = run_reference(model, x)
    assert got.shape == (2, 12, 10, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want).max() > 0.1  # not a trivially small output


def test_weights_read_from_a_tarball_equal_the_directory(tmp_path: Path) -> None:
    src = tmp_path / "models"
    src.mkdir()
    write_model(src, tiny_rrdn_layers())
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src, arcname="package/models/x2")
    a = read_layers_model(src)
    b = read_layers_model(tgz, "package/models/x2/model.json")
    assert a.weights.keys() == b.weights.keys()
    for key in a.weights:
        np.testing.assert_array_equal(a.weights[key], b.weights[key])


def test_unsupported_layer_is_refused_by_name(tmp_path: Path) -> None:
    layers = tiny_rrdn_layers()[:2] + [_layer("Lambda", "custom", ["pre"], function="...")]
    write_model(tmp_path, layers)
    with pytest.raises(TfjsModelError, match="Lambda"):
        TfjsGraph(read_layers_model(tmp_path))


def test_truncated_shards_are_refused(tmp_path: Path) -> None:
    write_model(tmp_path, tiny_rrdn_layers())
    shard = tmp_path / "group1-shard2of2.bin"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(TfjsModelError, match="past the end"):
        read_layers_model(tmp_path)


def test_uint8_quantized_weights_are_dequantized_as_tfjs_does(tmp_path: Path) -> None:
    # TF.js' quantized manifests store uint8 q per value and decode min + scale * q (esrgan-legacy).
    write_model(tmp_path, tiny_rrdn_layers())
    document = json.loads((tmp_path / "model.json").read_text())
    original = read_layers_model(tmp_path).weights
    blobs, want = [], {}
    for spec in document["weightsManifest"][0]["weights"]:
        values = original[spec["name"]].astype(np.float64)
        lo, scale = float(values.min()), float(np.ptp(values)) / 255 or 1.0
        q = np.rint((values - lo) / scale).astype(np.uint8)
        spec["quantization"] = {"dtype": "uint8", "min": lo, "scale": scale, "original_dtype": "float32"}
        blobs.append(q.tobytes())
        want[spec["name"]] = (q.astype(np.float64) * scale + lo).astype(np.float32)
    (tmp_path / "group1-shard1of2.bin").write_bytes(b"".join(blobs))
    (tmp_path / "group1-shard2of2.bin").write_bytes(b"")
    (tmp_path / "model.json").write_text(json.dumps(document))
    got = read_layers_model(tmp_path).weights
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)
        assert np.abs(got[name] - original[name]).max() > 0  # really went through 8 bits
    spec["quantization"]["dtype"] = "int4"
    (tmp_path / "model.json").write_text(json.dumps(document))
    with pytest.raises(TfjsModelError, match="int4"):
        read_layers_model(tmp_path)


# --- the importer, end to end ------------------------------------------------------------------


def _png(chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(chw, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()


def write_package(tmp_path: Path, scale: int = 2, swap_sample: bool = False) -> Path:
    """An upscalerjs-like npm tarball: package.json, LICENSE, models/x<s>, fixture and TF.js sample."""
    root = tmp_path / "package"
    model_dir = root / "models" / f"x{scale}"
    model_dir.mkdir(parents=True)
    # Small weights: a net close to identity-ish scale keeps the output inside [0, 1] mostly.
    write_model(model_dir, tiny_rrdn_layers(scale), weight_scale=0.15)
    (root / "package.json").write_text(
        json.dumps({"name": "@example/tiny-rrdn", "version": "0.1.0", "license": "MIT", "author": "Test"})
    )
    (root / "LICENSE").write_text("MIT License\n\nCopyright (c) test\n")
    fixture = np.random.default_rng(5).uniform(size=(3, 16, 16))
    fixture = np.rint(fixture * 255) / 255
    sample = np.clip(run_reference(read_layers_model(model_dir), fixture.transpose(1, 2, 0)[None])[0], 0, 1)
    sample = sample.transpose(2, 0, 1)
    if swap_sample:
        sample = sample[::-1]
    (root / "assets" / "samples" / f"{scale}x").mkdir(parents=True)
    (root / "assets" / "fixture.png").write_bytes(_png(fixture))
    (root / "assets" / "samples" / f"{scale}x" / "result.png").write_bytes(_png(sample))
    tgz = tmp_path / "tiny-rrdn-0.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="package")
    return tgz


def test_import_writes_a_verified_entry_with_licence_and_source(tmp_path: Path) -> None:
    package = write_package(tmp_path)
    out = tmp_path / "models"
    target = import_tfjs_sr(
        package, out_dir=out, name="tiny-x2", scale=2, fp16=False, tile_size=32, tile_overlap=8
    )
    card = json.loads((target / "card.json").read_text())
    assert card["kind"] == "super_resolution" and card["scale_factor"] == 2
    assert card["source"]["package"] == "@example/tiny-rrdn" and card["source"]["version"] == "0.1.0"
    assert card["source"]["license"] == "MIT"
    assert (target / "LICENSE").read_text().startswith("MIT License")
    assert card["source"]["input_pixel_max"] == 1.0
    assert card["quality"]["reference_max_abs_diff_255"] <= 1.0
    assert card["parity"]["fp32_max_abs_diff"] <= 1e-4
    assert {"psnr_db", "bicubic_psnr_db", "psnr_gain_db", "psnr_y_gain_db"} <= set(card["quality"])
    # the protocol: the project's held-out photos, gated on the luma gain (the SR papers' figure)
    assert card["holdout"]["names"] == list(photos.HOLDOUT_NAMES)
    assert set(card["quality"]["thresholds"]) == {"psnr_y_gain_db", "reference_max_abs_diff_255"}
    # verify recomputes the figures from model.onnx (random weights: thresholds off)
    report = verify_repository(out, check_thresholds=False)
    assert report.ok, report.format()
    (model,) = report.models
    assert model.quality_recomputed["reference_max_abs_diff_255"] <= 1.0
    assert model.quality_recomputed["psnr_db"] == pytest.approx(card["quality"]["psnr_db"], abs=0.01)
    assert model.quality_recomputed["psnr_y_gain_db"] == pytest.approx(
        card["quality"]["psnr_y_gain_db"], abs=0.01
    )


def test_import_refuses_a_network_that_does_not_reproduce_the_sample(tmp_path: Path) -> None:
    package = write_package(tmp_path, swap_sample=True)  # the sample's channels reversed (BGR)
    with pytest.raises(ImportFailedError, match="sample output"):
        import_tfjs_sr(package, out_dir=tmp_path / "models", name="tiny-x2", scale=2, fp16=False)
    assert not (tmp_path / "models").exists()


def test_fp16_weights_shrink_the_file_and_still_reproduce_the_sample(tmp_path: Path) -> None:
    package = write_package(tmp_path)
    common: dict[str, Any] = {
        "name": "tiny-x2",
        "scale": 2,
        "fp16": False,
        "tile_size": 32,
        "tile_overlap": 8,
    }
    full = import_tfjs_sr(package, out_dir=tmp_path / "fp32", **common)
    half = import_tfjs_sr(package, out_dir=tmp_path / "half", weights_fp16=True, **common)
    card = json.loads((half / "card.json").read_text())
    assert card["parity"]["weights_stored_fp16"] > 0 and card["parity"]["fp32_max_abs_diff"] <= 1e-4
    stored = onnx.load(str(half / "model.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in stored.graph.initializer)
    assert (half / "model.onnx").stat().st_size < (full / "model.onnx").stat().st_size
    assert card["quality"]["reference_max_abs_diff_255"] <= 1.0
    report = verify_repository(tmp_path / "half", check_thresholds=False)
    assert report.ok, report.format()


@pytest.mark.parametrize(
    ("name", "message"), [("liveness", "grpc.health key"), ("../up", r"must match \[a-z0-9\]\[a-z0-9-\]\*$")]
)
def test_import_refuses_a_name_no_model_may_have_before_any_work(
    tmp_path: Path, name: str, message: str
) -> None:
    """Called from Python, a reserved or malformed name was refused by export_model, after the
    package was read, checked against the reference and its quality measured (minutes for a real
    package); the CLI's argparse type refuses it at once. It is refused before any work."""
    package = write_package(tmp_path)
    said: list[str] = []
    with pytest.raises(InvalidArgumentError, match=message):
        import_tfjs_sr(
            package, out_dir=tmp_path / "models", name=name, scale=2, fp16=False, progress=said.append
        )
    assert said == []
    assert not (tmp_path / "models").exists()


def _not_a_tarball(package: Path) -> Path:
    broken = package.with_name("broken.tgz")
    broken.write_bytes(b"<html>404 Not Found</html>")  # a download that went wrong
    return broken


def _unpacked(package: Path, relative: str, content: bytes) -> Path:
    """The package unpacked, with `relative` replaced by `content`."""
    root = package.parent / "package"  # what write_package packed
    (root / relative).write_bytes(content)
    return root


DAMAGED_PACKAGES = {
    "not a tarball": (_not_a_tarball, "broken.tgz"),
    "package.json not JSON": (lambda p: _unpacked(p, "package.json", b"{"), "package.json"),
    "package.json without a name": (
        lambda p: _unpacked(p, "package.json", b'{"version": "1.0.0"}'),
        "package.json",
    ),
    "package.json a list": (lambda p: _unpacked(p, "package.json", b"[]"), "package.json"),
    "model.json not JSON": (lambda p: _unpacked(p, "models/x2/model.json", b"{"), "model.json"),
    "model.json without its topology": (
        lambda p: _unpacked(p, "models/x2/model.json", b'{"format": "layers-model"}'),
        "model.json",
    ),
    "fixture not a PNG": (lambda p: _unpacked(p, "assets/fixture.png", b"junk"), "assets/fixture.png"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_PACKAGES))
def test_import_of_a_damaged_package_is_an_error_naming_the_file_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """A package that is not a tarball (a failed download), or whose package.json, model.json or
    sample image is not what it should be, ended import-rrdn with a traceback (tarfile.ReadError,
    JSONDecodeError, KeyError, TypeError) or a message naming no file. It is an error naming the
    file, exit 1, and nothing is written."""
    from genserve_export import cli

    make, named = DAMAGED_PACKAGES[damage]
    package = make(write_package(tmp_path))
    out = tmp_path / "models"
    code = cli.main(
        ["import-rrdn", str(package), "--out", str(out), "--name", "tiny-x2", "--scale", "2", "--no-fp16"]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "genserve-export import-rrdn: error:" in err and named in err, err
    assert not out.exists()
