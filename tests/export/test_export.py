"""export_model, verify_repository and every default recipe, end to end but quickly."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from genserve_export import (
    CardFieldError,
    FrozenBatchAxisError,
    KindMismatchError,
    NonFiniteOutputError,
    export_model,
    verify_repository,
)
from genserve_export.build import train_and_export
from genserve_export.cli import main as cli_main
from genserve_export.data import digits, fashion
from genserve_export.recipes import RECIPES, vqvae
from genserve_export.verify import VerifyReport

QUICK_STEPS = 3


# --- small user modules ----------------------------------------------------------------------


class TinyGenerator(nn.Module):
    """A user's own generator: z [N, 8] → image [N, 3, 8, 8] in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 16 * 4 * 4)
        self.up = nn.ConvTranspose2d(16, 3, 4, 2, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.up(torch.relu(self.fc(z)).reshape(-1, 16, 4, 4)))


class TinyTranslator(nn.Module):
    """A user's own fully convolutional image-to-image net (RGB → gray)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(image))


def _z(batch: int = 2) -> dict[str, np.ndarray]:
    return {"z": np.random.default_rng(0).standard_normal((batch, 8)).astype(np.float32)}


CARD = {"description": "a user's tiny generator", "output_range": [-1.0, 1.0]}


# --- the default recipes ---------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tiny synthetic stand-ins for the MNIST and Fashion-MNIST caches (tests never need the real ones)."""
    folder = tmp_path_factory.mktemp("data") / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    pixels = (rng.random((len(labels), 28 * 28)) ** 4 * 255).astype(np.uint8)
    np.savez_compressed(folder / digits.ARRAY_FILE, pixels=pixels, labels=labels)
    clothes = (rng.random((300, 28, 28)) ** 4 * 255).astype(np.uint8)
    fashion.write_cache(
        folder.parent / "fashion-mnist", (clothes[:200], labels), (clothes[200:], np.tile(np.arange(10), 10))
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENSERVE_DATA_DIR", str(folder.parent))
        # vqvae's class check samples 30 grids per class (245 prior calls of 300 rows) at export and
        # again at verify: the suite's longest step; one per class checks the same path.
        patch.setattr(vqvae, "SAMPLES_PER_CLASS", 1)
        assert digits.load().images.shape == (200, 1, 28, 28)
        assert fashion.load().holdout_images.shape == (100, 1, 28, 28)
        yield folder


@pytest.fixture(scope="module")
def quick_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every registered recipe, trained for a few steps and exported."""
    out = tmp_path_factory.mktemp("models")
    for name in RECIPES:
        # fp16 export is covered by the user-module test; skipping it here halves the export time
        result = train_and_export(name, out, steps=QUICK_STEPS, progress=False, command="pytest", fp16=False)
        assert result.paths, name
    return out


@pytest.fixture(scope="module")
def quick_report(quick_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> VerifyReport:
    """verify (thresholds off, grids on) of the quick repository, run once for its readers here."""
    grids = tmp_path_factory.mktemp("grids")
    return verify_repository(quick_repository, grids_dir=grids, check_thresholds=False)


def test_every_recipe_exports_and_verifies(quick_report: VerifyReport) -> None:
    report = quick_report
    assert report.ok, report.format()
    names = {m.name for m in report.models}
    assert names == {entry for recipe in RECIPES.values() for entry in recipe.names}
    for model in report.models:
        assert model.quality_recomputed, f"{model.name}: quality not recomputed"
        card = json.loads((model.path / "card.json").read_text())
        assert card["training"]["steps"] == QUICK_STEPS
        assert card["training"]["seed"] == 0
        assert card["training"]["source_commit"]
        assert card["parity"]["fp32_max_abs_diff"] <= 1e-4
        if card["kind"] in (
            "generator",
            "conditional_generator",
            "vae_decoder",
            "super_resolution",
            "image_to_image",
        ):
            assert model.grid is not None and model.grid.exists()
    # undertrained models miss their thresholds: reported as notes here, errors with thresholds on
    assert any("(thresholds off)" in note for m in report.models for note in m.notes)


def test_the_vqvae_family_exports_and_verifies(
    quick_repository: Path, quick_report: VerifyReport, tmp_path: Path
) -> None:
    """vqvae-digits' three entries (decoder + encoder graph, top prior, bottom prior) from the quick
    repository: verify recomputes the card's PyTorch figures from the ONNX graphs, at the priors'
    default sampling (config.json), which it reads from the repository; a tampered encoder is caught."""
    by_name = {m.name: m for m in quick_report.models}
    assert set(vqvae.VqvaeDigitsRecipe.names) <= set(by_name)
    decoder = by_name[vqvae.DECODER].quality_recomputed
    assert {"recon_mse", "top_perplexity", "bottom_dead_codes", "class_accuracy"} <= set(decoder)
    for name in (vqvae.DECODER, vqvae.TOP_PRIOR, vqvae.PRIOR):
        card = json.loads((quick_repository / name / "1" / "card.json").read_text())
        recomputed = by_name[name].quality_recomputed
        for metric in ("recon_mse", "top_perplexity", "holdout_bits_per_dim"):
            if metric in card["quality"]:  # ONNX figures = the PyTorch figures the card recorded
                assert recomputed[metric] == pytest.approx(card["quality"][metric], rel=1e-3)
    prior_card = json.loads((quick_repository / vqvae.PRIOR / "1" / "card.json").read_text())
    assert prior_card["grid"] == [14, 14] and prior_card["top_grid"] == [7, 7]
    assert [t["name"] for t in prior_card["inputs"]] == ["codes", "label", "top_codes"]
    assert prior_card["output_range"] is None and prior_card["image_size"] is None
    assert prior_card["training"]["cpu_s"] > 0
    # The card's sample figures are at the priors' default sampling (config.json, which the server
    # applies to a request without options); verify reads it from the repository.
    for name in (vqvae.TOP_PRIOR, vqvae.PRIOR):
        config = json.loads((quick_repository / name / "config.json").read_text())
        assert config["sampling"] == {"temperature": vqvae.SAMPLING_TEMPERATURE}
    at = float(np.float32(vqvae.SAMPLING_TEMPERATURE))
    assert decoder["sampling_temperature"] == decoder["top_sampling_temperature"] == at
    decoder_card = json.loads((quick_repository / vqvae.DECODER / "1" / "card.json").read_text())
    assert decoder_card["quality"]["sampling_temperature"] == at
    repo = tmp_path / "repo"  # a copy to change: the quick repository is the module's
    for name in vqvae.VqvaeDigitsRecipe.names:
        shutil.copytree(quick_repository / name, repo / name)
    config_path = repo / vqvae.PRIOR / "config.json"
    config = json.loads(config_path.read_text())
    config["sampling"] = {"temperature": 0.5, "top_k": 8}
    config_path.write_text(json.dumps(config))
    # only the decoder's figures are read: verify its folder (the priors' configs are its siblings')
    moved = verify_repository(repo / vqvae.DECODER, check_thresholds=False)
    figures = {m.name: m for m in moved.models}[vqvae.DECODER].quality_recomputed
    assert (figures["sampling_temperature"], figures["sampling_top_k"]) == (float(np.float32(0.5)), 8.0)
    assert figures["top_sampling_temperature"] == at
    # a tampered auxiliary encoder is caught
    (repo / vqvae.DECODER / "1" / vqvae.ENCODER_FILE).write_bytes(b"not a graph")
    tampered = verify_repository(repo / vqvae.DECODER, check_thresholds=False)  # the card listing it
    assert any("auxiliary graph encoder.onnx" in e for m in tampered.models for e in m.errors)


def test_verify_cli_exit_codes(
    quick_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["verify", str(quick_repository), "--no-quality"]) == 0
    assert "parity" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().out


def test_thresholds_fail_undertrained_model(quick_repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(quick_repository / "dcgan-digits", repo / "dcgan-digits")
    report = verify_repository(repo)
    assert not report.ok
    assert any("quality" in e for e in report.models[0].errors), report.format()


def test_verify_rejects_tampered_model(quick_repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(quick_repository / "dcgan-digits", repo / "dcgan-digits")
    model = repo / "dcgan-digits" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    report = verify_repository(repo, recompute_quality=False)
    assert not report.ok
    assert any("sha256" in e for e in report.models[0].errors), report.format()


def test_verify_rejects_card_that_lies_about_shapes(quick_repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(quick_repository / "cgan-digits", repo / "cgan-digits")
    card_path = repo / "cgan-digits" / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["outputs"][0]["shape"] = [-1, 3, 28, 28]  # the graph gives 1 channel
    card_path.write_text(json.dumps(card))
    report = verify_repository(repo, recompute_quality=False)
    assert not report.ok
    assert any("the card says" in e for e in report.models[0].errors), report.format()


# --- the public API with a user's module -----------------------------------------------------


def test_user_module_exports_and_serves(tmp_path: Path) -> None:
    module = TinyGenerator().eval()
    path = export_model(
        module, kind="generator", name="my-gan", version="3", out_dir=tmp_path, example_inputs=_z(), card=CARD
    )
    assert path == tmp_path / "my-gan" / "3"
    card = json.loads((path / "card.json").read_text())
    assert card["inputs"] == [{"name": "z", "dtype": "float32", "shape": [-1, 8]}]
    assert card["outputs"] == [{"name": "image", "dtype": "float32", "shape": [-1, 3, 8, 8]}]
    assert card["image_size"] == [8, 8] and card["channels"] == 3 and card["latent_dim"] == 8
    config = json.loads((path.parent / "config.json").read_text())
    assert config["kind"] == "generator"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]

    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    (image,) = sess.run(["image"], {"z": z})
    with torch.no_grad():
        expected = module(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(image, expected, atol=1e-4)
    assert verify_repository(tmp_path).ok


def test_a_module_exports_with_a_non_ascii_tmpdir_under_a_c_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a locale that is not UTF-8 (LANG=C without Python's UTF-8 mode) a non-ASCII path's bytes
    are lone surrogates (TMPDIR=/tmp/t\u00e9l\u00e9chargements held as 't\\udcc3\\udca9...'), which
    ONNX Runtime's binding refuses: the graph optimisation's optimized_model_filepath, a file of the
    temporary directory, failed every export with 'graph optimisation failed: (): incompatible
    function arguments'. It reaches ONNX Runtime as its bytes decoded as UTF-8, and the export passes."""
    held = tmp_path / "t\udcc3\udca9l\udcc3\udca9chargements"  # what LANG=C makes of its bytes
    held.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(held))
    out = tmp_path / "mod\udcc3\udca8les"
    path = export_model(
        TinyGenerator().eval(), kind="generator", name="my-gan", out_dir=out, example_inputs=_z(), card=CARD
    )
    assert (tmp_path / "mod\u00e8les" / "my-gan" / "1" / "model.onnx").is_file()
    assert verify_repository(path.parent.parent).ok


class PixelNormGenerator(TinyGenerator):
    """TinyGenerator behind StyleGAN's pixel norm of z, whose eps (1e-8) keeps z = 0 finite."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8))


def test_an_exported_graph_keeps_a_tiny_constant_the_module_adds(tmp_path: Path) -> None:
    """torch.onnx.export's onnxscript optimizer removed an Add of a constant within 1e-8 of 0 as an
    Add of 0, so the pixel norm's eps vanished from the graph (the bundled stylegan-digits-mapping's
    too): at z = 0 the module is finite and the exported graph NaN, which parity on random z never
    sees -> the graph adds it, and z = 0 gives the module's image."""
    module = PixelNormGenerator().eval()
    path = export_model(
        module,
        kind="generator",
        name="norm-gan",
        version="1",
        out_dir=tmp_path,
        example_inputs=_z(),
        card=CARD,
    )
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    z = np.zeros((2, 8), np.float32)
    z[1] = 1e-25  # its squares underflow float32: only the eps keeps the norm finite
    (image,) = sess.run(["image"], {"z": z})
    with torch.no_grad():
        expected = module(torch.from_numpy(z)).numpy()
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(image, expected, atol=1e-4)


def test_user_fully_convolutional_module_has_dynamic_size(tmp_path: Path) -> None:
    path = export_model(
        TinyTranslator(),
        kind="image_to_image",
        name="my-gray",
        out_dir=tmp_path,
        fp16=False,
        example_inputs={"image": np.random.default_rng(0).random((2, 3, 16, 24), dtype=np.float32)},
        card={"description": "rgb to gray", "output_range": [0, 1], "input_range": [0, 1]},
    )
    card = json.loads((path / "card.json").read_text())
    assert card["outputs"][0] == {"name": "output_image", "dtype": "float32", "shape": [-1, 1, -1, -1]}
    assert card["input_channels"] == 3 and card["channels"] == 1 and card["image_size"] is None
    assert not (path / "model.fp16.onnx").exists()
    assert verify_repository(tmp_path).ok


class WideConvs(nn.Module):
    """RGB -> 32 -> 32 -> RGB channels, 3x3 convolutions and nothing between them: the two 32-channel
    intermediates are live together while the second is computed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (
            nn.Conv2d(3, 32, 3, padding=1),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.Conv2d(32, 3, 3, padding=1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.c(self.b(self.a(image))))


def test_an_image_models_card_counts_its_graphs_intermediates_per_output_value(tmp_path: Path) -> None:
    """card.json said nothing of a graph's intermediates, so the server counted every image model's
    as 3 output-sized copies (pix2pix-colorize's hold 22, unet-denoise's 43). Export now writes
    activation_bytes_per_output_value, counted from the graph (nodes in order, each value live from
    its node to its last reader), and `count-activations` adds it to a version exported before it,
    leaving the model files (and the card's sha256 of them) as they were."""
    path = export_model(
        WideConvs(),
        kind="image_to_image",
        name="wide",
        out_dir=tmp_path,
        fp16=False,
        example_inputs={"image": np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)},
        card={"description": "wide", "output_range": [0, 1], "input_range": [0, 1]},
    )
    card = json.loads((path / "card.json").read_text())
    # At S x S: the peak is while b runs, a's and b's outputs (32 channels each, float32) live:
    # 2 * 32 * S^2 * 4 bytes over 3 * S^2 output values.
    assert card["activation_bytes_per_output_value"] == round(2 * 32 * 4 / 3, 3)
    assert verify_repository(tmp_path, recompute_quality=False).ok

    model_bytes = (path / "model.onnx").read_bytes()
    del card["activation_bytes_per_output_value"]  # as exported before the field
    (path / "card.json").write_text(json.dumps(card, indent=2))
    assert cli_main(["count-activations", str(tmp_path)]) == 0
    counted = json.loads((path / "card.json").read_text())
    assert counted == {**card, "activation_bytes_per_output_value": round(2 * 32 * 4 / 3, 3)}
    assert (path / "model.onnx").read_bytes() == model_bytes
    assert verify_repository(tmp_path, recompute_quality=False).ok


def test_verify_recounts_a_cards_intermediates_and_reports_a_value_the_graph_does_not_give(
    tmp_path: Path,
) -> None:
    """verify checked activation_bytes_per_output_value's form only: a stale or hand-edited value,
    which the server sizes a CPU call's working set from, passed unseen (a lower one under-sizes the
    budget). verify now counts it from the graph again and reports a card beyond a small tolerance."""
    path = export_model(
        WideConvs(),
        kind="image_to_image",
        name="wide",
        out_dir=tmp_path,
        fp16=False,
        example_inputs={"image": np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)},
        card={"description": "wide", "output_range": [0, 1], "input_range": [0, 1]},
    )
    card = json.loads((path / "card.json").read_text())
    counted = card["activation_bytes_per_output_value"]
    assert counted == round(2 * 32 * 4 / 3, 3)
    for value, ok in ((counted / 4, False), (counted * 2, False), (counted + 0.01, True)):
        (path / "card.json").write_text(json.dumps({**card, "activation_bytes_per_output_value": value}))
        report = verify_repository(tmp_path, recompute_quality=False)
        errors = [e for m in report.models for e in m.errors]
        assert report.ok is ok, (value, errors)
        if not ok:
            assert errors == [
                f"card field 'activation_bytes_per_output_value' is {value}, but model.onnx's "
                f"intermediates count {counted} bytes per output value (genserve-export "
                "count-activations writes it)"
            ]
    # A card without the field (exported before it) is not an error: the server keeps its constant.
    del card["activation_bytes_per_output_value"]
    (path / "card.json").write_text(json.dumps(card))
    assert verify_repository(tmp_path, recompute_quality=False).ok


def test_a_two_way_translators_count_is_its_larger_generators() -> None:
    """A two_way_translator's graph picks its generator with an If, which shape inference does not
    see into: each branch is counted inlined, and the larger one is the card's."""
    from onnx import TensorProto, helper

    from genserve_export.activations import activation_bytes

    def branch(name: str, width: int) -> object:
        weights = [
            helper.make_tensor(f"{name}_k1", TensorProto.FLOAT, [width, 1, 1, 1], [0.5] * width),
            helper.make_tensor(f"{name}_k2", TensorProto.FLOAT, [1, width, 1, 1], [0.5] * width),
        ]
        nodes = [
            helper.make_node("Conv", ["image", f"{name}_k1"], [f"{name}_wide"]),
            helper.make_node("Conv", [f"{name}_wide", f"{name}_k2"], [f"{name}_out"]),
        ]
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [out], weights)

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "h", "w"])
    direction = helper.make_tensor_value_info("direction", TensorProto.INT64, ["n"])
    output = helper.make_tensor_value_info("output_image", TensorProto.FLOAT, ["n", 1, "h", "w"])
    nodes = [
        helper.make_node("Gather", ["direction", "zero"], ["first"], axis=0),
        helper.make_node("Equal", ["first", "zero"], ["a_to_b"]),
        helper.make_node(
            "If", ["a_to_b"], ["output_image"], then_branch=branch("ab", 4), else_branch=branch("ba", 8)
        ),
    ]
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    graph = helper.make_graph(nodes, "two-way", [image, direction], [output], [zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    # The wider branch: its 8-channel value and the 1-channel output at once, over 1 value a pixel.
    assert activation_bytes(model, 32) == (8 + 1) * 4


# --- bad input: one clear exception, nothing written -----------------------------------------


class WrongOutputs(nn.Module):
    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"picture": z.reshape(len(z), 1, 2, 4)}


class WrongRank(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * 0.5


class TwoChannels(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z.reshape(len(z), 2, 2, 2))


class FrozenBatch(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z.reshape(2, 1, 2, 4))  # batch written in as a constant


class ProducesNaN(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(z - 10.0).reshape(len(z), 1, 2, 4)


@pytest.mark.parametrize(
    ("module", "card", "error", "message"),
    [
        (WrongOutputs(), CARD, KindMismatchError, "image"),
        (WrongRank(), CARD, KindMismatchError, "rank"),
        (TwoChannels(), CARD, KindMismatchError, "channels"),
        (FrozenBatch(), CARD, FrozenBatchAxisError, "batch"),
        (ProducesNaN(), CARD, NonFiniteOutputError, "NaN"),
        (TinyGenerator(), {"output_range": [-1, 1]}, CardFieldError, "description"),
        (TinyGenerator(), {**CARD, "channels": 1}, CardFieldError, "channels"),
        (TinyGenerator(), {**CARD, "output_range": [0, 1]}, CardFieldError, "output_range"),
    ],
    ids=[
        "output-names",
        "output-rank",
        "channels",
        "frozen-batch",
        "nan",
        "missing-field",
        "lying-channels",
        "range",
    ],
)
def test_bad_input_raises_and_writes_nothing(
    module: nn.Module, card: dict[str, object], error: type[Exception], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "models"
    z = (
        _z()
        if not isinstance(module, FrozenBatch | WrongOutputs | WrongRank | TwoChannels | ProducesNaN)
        else {"z": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    )
    with pytest.raises(error, match=message):
        export_model(module, kind="generator", name="bad", out_dir=out, example_inputs=z, card=card)
    assert not out.exists() or not any(out.rglob("*"))


def test_a_reserved_name_is_refused_as_any_invalid_name_before_the_graph_is_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name outside NAME_PATTERN is an InvalidArgumentError before any work; `liveness` (3e83901:
    the server's own grpc.health key, a name no server serves) passed that check and was refused only
    by the card's validation, a CardFieldError after the ONNX export, its parity runs and the fp16
    twin's export. It is refused up front alike, naming why."""
    from genserve_export import InvalidArgumentError
    from genserve_export import export as export_module

    def exported(*args: object, **kwargs: object) -> None:
        raise AssertionError("the graph was exported for a name that is refused")

    monkeypatch.setattr(export_module, "_export_and_optimize", exported)
    out = tmp_path / "models"
    for name in ("Bad Name", "liveness"):
        with pytest.raises(InvalidArgumentError, match="name"):
            export_model(
                TinyGenerator(), kind="generator", name=name, out_dir=out, example_inputs=_z(), card=CARD
            )
    assert not out.exists() or not any(out.rglob("*"))


def test_wrong_example_input_names_raise(tmp_path: Path) -> None:
    with pytest.raises(KindMismatchError, match="label"):
        export_model(
            TinyGenerator(),
            kind="conditional_generator",
            name="bad",
            out_dir=tmp_path,
            example_inputs=_z(),
            card={**CARD, "class_names": ["a"]},
        )
    assert not any(tmp_path.rglob("*"))


def test_a_graph_further_from_the_module_than_fp32_atol_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """export holds its ONNX graph to the module within FP32_ATOL on every parity case; here below
    any difference the graph can have, so that the rule (not the exporter's accuracy) is what is tried."""
    from genserve_export import ExportParityError
    from genserve_export import export as export_module

    monkeypatch.setattr(export_module, "FP32_ATOL", -1.0)
    out = tmp_path / "models"
    with pytest.raises(
        ExportParityError, match=r"fp32 ONNX graph differs from PyTorch: image at .* > atol -1.0"
    ):
        export_model(
            TinyGenerator(),
            kind="generator",
            name="far",
            out_dir=out,
            example_inputs=_z(),
            card=CARD,
            fp16=False,
        )
    assert not out.exists() or not any(out.rglob("*"))


def test_an_fp16_twin_further_from_the_module_than_fp16_atol_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.fp16.onnx is only written within FP16_ATOL of the module (the server may serve it in
    model.onnx's place); one further is left out, its difference and why recorded in the card."""
    from genserve_export import export as export_module

    monkeypatch.setattr(export_module, "FP16_ATOL", -1.0)
    path = export_model(
        TinyGenerator(), kind="generator", name="far", out_dir=tmp_path, example_inputs=_z(), card=CARD
    )
    card = json.loads((path / "card.json").read_text())
    assert not (path / "model.fp16.onnx").exists()
    assert list(card["sha256"]) == ["model.onnx"]
    assert card["parity"]["fp16_written"] is False
    assert card["parity"]["fp16_max_abs_diff"] is not None
    assert card["parity"]["fp16_note"].endswith("> -1.0: not written")


def test_the_exporters_config_check_accepts_every_field_the_server_reads(tmp_path: Path) -> None:
    # docs/model-repository.md's example plus `runtime`: all read by the server's config.py.
    from genserve_export.card import validate_config
    from genserve_server.config import load_model_config

    config = {
        "kind": "generator",
        "batching": {
            "max_batch_size": 64,
            "max_queue_delay_ms": 4.0,
            "preferred_batch_sizes": [1, 8, 64],
            "max_queue_size": 1024,
            "bulk_budget_ms": 5.0,
            "bulk_idle_budget_ms": 50.0,
            "interactive_quiet_s": 1.0,
            "efficient_batch_tolerance": "auto",
            "max_batch_pixels": 4194304,
        },
        "instances": 2,
        "execution_providers": ["CPUExecutionProvider"],
        "precision": "fp32",
        "version_policy": {"latest": 1},
        "runtime": {"solo_session": True},
    }
    assert validate_config(config) == []
    assert validate_config({**config, "batchin": {}}) == [
        "config.json: batchin is not a known field (known: batching, decoder, execution_providers, "
        "instances, kind, mapping, precision, runtime, sampling, top_prior, version_policy)"
    ]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert load_model_config(path).batching.max_batch_pixels == 4194304  # and the server reads it


def test_build_defaults_trains_recipes_side_by_side_in_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`build-defaults --jobs 2` trains two recipes at once, each in its own process, and writes what
    one at a time writes (smoke-sized steps); a bad --jobs is refused with the flag's name."""
    out = tmp_path / "models"
    argv = ["build-defaults", "--out", str(out), "--only", "vae-digits", "cyclegan-digits"]
    assert cli_main([*argv, "--steps-scale", "0.005", "--jobs", "2", "--no-verify"]) == 0
    assert {p.name for p in out.iterdir()} == {"vae-digits-decoder", "vae-digits-encoder", "cyclegan-digits"}
    for entry in out.iterdir():
        assert (entry / "1" / "model.onnx").is_file() and (entry / "1" / "card.json").is_file()
    assert "2 at a time" in capsys.readouterr().out
    assert cli_main([*argv, "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_weights_stored_fp16_are_the_large_ones_and_a_small_tensor_keeps_its_float32_values() -> None:
    """store_weights_fp16 halves initializers of min_elements values or more; a smaller one (a
    scale, an epsilon) stays float32 exactly, where float16 would flush 1e-8 to 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from genserve_export.onnx_utils import store_weights_fp16

    small = np.full(15, 1e-8, np.float32)
    large = np.full(16, 0.5, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "small"], ["s"]), helper.make_node("Add", ["x", "large"], ["l"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [15]),
            helper.make_tensor_value_info("l", TensorProto.FLOAT, [16]),
        ],
        [numpy_helper.from_array(small, "small"), numpy_helper.from_array(large, "large")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    halved, count = store_weights_fp16(model)
    assert count == 1
    stored = {init.name: init for init in halved.graph.initializer}
    assert stored["small"].data_type == onnx.TensorProto.FLOAT
    assert numpy_helper.to_array(stored["small"]).tolist() == small.tolist()
    assert stored["large__fp16"].data_type == onnx.TensorProto.FLOAT16 and "large" not in stored
    out = ort.InferenceSession(halved.SerializeToString()).run(None, {"x": np.zeros(1, np.float32)})
    assert out[0].tolist() == small.tolist() and out[1].tolist() == large.tolist()
