"""The photo data loader and the photo recipes (SR, SRGAN, U-Net denoiser, pix2pix colourisation), quickly.

Each recipe: two training steps, export through ``export_model``, ONNX Runtime at two sizes, and
``evaluate`` on the exported graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from genserve_export import export_model, verify_repository
from genserve_export.build import train_and_export
from genserve_export.data import photos
from genserve_export.errors import ExportFailedError
from genserve_export.recipes import photos_colorize, photos_sr, photos_srgan
from genserve_export.recipes.photos_pix2pix import PhotoDenoiseRecipe
from genserve_export.recipes.photos_sr import PhotoSuperResolutionRecipe
from genserve_export.recipes.photos_srgan import MissingInitError, PhotoSrganRecipe

BUNDLING_PACKAGES = ("sklearn", "matplotlib", "skimage")


# --- data loader -----------------------------------------------------------------------------


def test_photos_load_offline_from_installed_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("photo loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    photos._load.cache_clear()
    loaded = photos.load_photos()
    assert len(loaded) >= 12
    for source in photos.available_sources():
        path = photos._package_path(source)
        assert any(part in BUNDLING_PACKAGES for part in path.parts), path
        assert "site-packages" in path.parts or "dist-packages" in path.parts, path
    for photo in loaded:
        assert photo.pixels.dtype == np.float32 and photo.pixels.ndim == 3 and photo.pixels.shape[2] == 3
        assert 0.0 <= photo.pixels.min() and photo.pixels.max() <= 1.0
        assert min(photo.pixels.shape[:2]) >= 256


def test_holdout_is_fixed_and_disjoint_from_train() -> None:
    train = {p.name for p in photos.train_photos()}
    held = {p.name for p in photos.holdout_photos()}
    assert held == set(photos.HOLDOUT_NAMES)
    assert not train & held
    assert len(train) >= 8
    assert {p.name for p in photos.train_photos(color_only=True)} <= train
    card = photos.holdout_card(photos.train_photos(), photos.holdout_photos())
    assert set(card["names"]) == held and not set(card["train_names"]) & held


def test_random_crops_are_seeded() -> None:
    train = photos.train_photos()
    a = photos.random_crops(train, 32, 4, np.random.default_rng(7))
    b = photos.random_crops(train, 32, 4, np.random.default_rng(7))
    assert a.shape == (4, 3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_unknown_photo_name_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown photo"):
        photos.load_photos(["no-such-photo"])


# --- recipes ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _small_holdout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipe tests evaluate on 192×192 center crops of the held-out photos, to stay fast."""
    if "recipe" not in request.node.name:
        return
    full = photos.holdout_photos

    def cropped() -> list[photos.Photo]:
        return [
            photos.Photo(p.name, photos.center_crop(p.pixels, 8, max_size=192), p.color, p.package)
            for p in full()
        ]

    monkeypatch.setattr(photos, "holdout_photos", cropped)


def _export_one(recipe: Any, tmp_path: Path) -> tuple[dict[str, Any], ort.InferenceSession]:
    (spec,) = recipe.train(seed=0, steps=2, device="cpu", progress=False)
    version_dir = export_model(
        spec.module,
        kind=spec.kind,
        name=spec.name,
        version=spec.version,
        out_dir=tmp_path,
        example_inputs=spec.example_inputs,
        card=spec.card,
        config=spec.config,
        quality=spec.quality,
        holdout=spec.holdout,
        training=spec.training,
        fp16=False,
    )
    card = json.loads((version_dir / "card.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return card, sess


def _evaluate(recipe: Any, card: dict[str, Any], sess: ort.InferenceSession) -> dict[str, float]:
    def run(feeds: Any) -> dict[str, np.ndarray]:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, dict(feeds)), strict=True))

    figures: dict[str, float] = recipe.evaluate(card["name"], card, run)
    assert figures and all(np.isfinite(v) for v in figures.values())
    return figures


def test_sr_recipe_exports_with_dynamic_size(tmp_path: Path) -> None:
    recipe = PhotoSuperResolutionRecipe()
    card, sess = _export_one(recipe, tmp_path)
    assert card["kind"] == "super_resolution" and card["scale_factor"] == 4 and card["size_multiple"] == 1
    assert (
        card["tile_size"] and card["tile_overlap"] and card["holdout"]["names"] == list(photos.HOLDOUT_NAMES)
    )
    for h, w in ((16, 16), (21, 35)):  # odd, non-square: the bicubic skip must follow the input
        image = np.random.default_rng(0).uniform(0, 1, (2, 3, h, w)).astype(np.float32)
        (out,) = sess.run(None, {"image": image})
        assert out.shape == (2, 3, 4 * h, 4 * w)
        assert 0.0 <= out.min() and out.max() <= 1.0
    figures = _evaluate(recipe, card, sess)
    assert figures["psnr_gain_db"] == pytest.approx(figures["psnr_db"] - figures["bicubic_psnr_db"], abs=1e-3)
    inputs, targets = recipe.grid_pairs(card["name"], card)
    assert targets.shape[2] == 4 * inputs.shape[2]


def test_detail_measures_rank_blur_below_the_original() -> None:
    hr = photos.center_crop(photos.holdout_photos()[0].pixels, 4, 128).transpose(2, 0, 1)[None]
    blurred = photos_sr.bicubic_upscale(
        photos_sr.downscale(torch.from_numpy(np.ascontiguousarray(hr)))
    ).numpy()
    assert photos_sr.gradient_energy(blurred, 4) < 0.6 * photos_sr.gradient_energy(hr, 4)
    # bicubic cannot create detail above the low-resolution Nyquist frequency
    assert photos_sr.high_band_energy(blurred, 4) < 0.2 * photos_sr.high_band_energy(hr, 4)


def test_srgan_recipe_fine_tunes_the_psnr_model_and_compares_detail_with_it(tmp_path: Path) -> None:
    recipe = PhotoSrganRecipe()
    psnr_path = photos_srgan.psnr_model_path()  # the committed sr-photos-x4
    card, sess = _export_one(recipe, tmp_path)
    assert card["training"]["init"].endswith(hashlib.sha256(psnr_path.read_bytes()).hexdigest())
    psnr_sess = ort.InferenceSession(str(psnr_path), providers=["CPUExecutionProvider"])

    def psnr_run(feeds: Any) -> dict[str, np.ndarray]:
        return {"output_image": psnr_sess.run(None, dict(feeds))[0]}

    figures = recipe.evaluate_with_siblings(
        card["name"], card, _run_of(sess), lambda name: psnr_run if name == photos_sr.NAME else None
    )
    assert figures["gradient_energy_ratio_over_psnr_model"] == pytest.approx(
        figures["gradient_energy_ratio"] - figures["psnr_model_gradient_energy_ratio"], abs=1e-3
    )
    # two steps from the PSNR model's weights: still that model, give or take
    assert abs(figures["psnr_gain_db"] - figures["psnr_model_psnr_gain_db"]) < 0.5
    with pytest.raises(MissingInitError, match="no sr-photos-x4"):
        recipe.evaluate_with_siblings(card["name"], card, _run_of(sess), lambda name: None)


def test_srgan_recipe_without_the_psnr_model_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(photos_srgan.INIT_ENV, str(tmp_path / "absent.onnx"))
    with pytest.raises(MissingInitError, match="absent.onnx not found.*sr-photos-x4"):
        PhotoSrganRecipe().train(seed=0, steps=1, device="cpu", progress=False)


def test_train_srgan_starts_from_the_sr_model_in_the_repository_it_trains_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train sr-photos-x4 --out R` then `train srgan-photos-x4 --out R`: the fine-tune starts from
    R's sr-photos-x4 (the one verify compares it with), not the checkout's models/."""
    out = tmp_path / "models"
    psnr = out / photos_sr.NAME / "2"
    psnr.mkdir(parents=True)
    (psnr / "model.onnx").write_bytes(b"R's own sr-photos-x4")
    seen: list[Path] = []

    class Stop(Exception):
        pass

    def load(path: Path) -> None:
        seen.append(path)
        raise Stop

    monkeypatch.delenv(photos_srgan.INIT_ENV, raising=False)
    monkeypatch.setattr(photos_srgan, "load_psnr_model", load)
    with pytest.raises(Stop):
        train_and_export(photos_srgan.NAME, out, steps=1, device="cpu", progress=False)
    assert seen == [psnr / "model.onnx"]


def test_an_installed_export_names_where_it_looked_for_the_sr_model_srgan_starts_from(
    tmp_path: Path,
) -> None:
    """A non-editable genserve-export (site-packages) looked for sr-photos-x4 in
    <venv>/lib/python3.11/models, a folder no install has, and told the user to train it first,
    which (into --out) did not help: it looks in --out, and says where it looked."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    site = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages"
    shutil.copytree(root / "export" / "genserve_export", site / "genserve_export")
    out = tmp_path / "repo"
    env = {k: v for k, v in os.environ.items() if k != photos_srgan.INIT_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(root / "api")])
    command = [sys.executable, "-m", "genserve_export.cli", "train", photos_srgan.NAME, "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert str(out / photos_sr.NAME) in done.stderr, done.stderr
    assert "python3.11/models" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert photos_srgan.INIT_ENV in done.stderr, done.stderr


def _run_of(sess: ort.InferenceSession) -> Any:
    def run(feeds: Any) -> dict[str, np.ndarray]:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, dict(feeds)), strict=True))

    return run


def test_denoise_recipe_exports_with_size_multiple(tmp_path: Path) -> None:
    recipe = PhotoDenoiseRecipe()
    card, sess = _export_one(recipe, tmp_path)
    assert card["kind"] == "image_to_image" and card["size_multiple"] == 8
    assert card["input_range"] == [-1.0, 1.0] and card["output_range"] == [-1.0, 1.0]
    for h, w in ((32, 32), (48, 80)):
        image = np.random.default_rng(0).uniform(-1, 1, (3, 3, h, w)).astype(np.float32)
        (out,) = sess.run(None, {"image": image})
        assert out.shape == (3, 3, h, w)
    figures = _evaluate(recipe, card, sess)
    # the baselines do not depend on the model: identity is the noise itself (~0.8 sigma)
    assert figures["best_baseline_l1"] < figures["identity_l1"] < 0.1
    assert "L1" in card["training"]["notes"]


def test_colorize_recipe_keeps_the_luma_and_verify_compares_it_with_its_l1_only_twin(tmp_path: Path) -> None:
    (version_dir,) = train_and_export(
        "pix2pix-colorize", tmp_path, steps=2, progress=False, fp16=False, device="cpu"
    ).paths
    card = json.loads((version_dir / "card.json").read_text())
    assert card["kind"] == "image_to_image" and card["size_multiple"] == 16
    assert set(card["aux_graphs"]) == {photos_colorize.L1_ONLY_FILE}
    assert card["training"]["cpu_s"] > 0 and card["training"]["l1_only"]["cpu_s"] > 0
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for h, w in ((32, 32), (48, 80)):
        image = np.random.default_rng(0).uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
        (out,) = sess.run(None, {"image": image})
        assert out.shape == (2, 3, h, w)
        # Only colour is invented: where no channel clips, the output's luma is the input's.
        in_y, out_y = (
            np.array(photos_colorize.LUMA) @ x.transpose(1, 0, 2, 3).reshape(3, -1) for x in (image, out)
        )
        unclipped = (np.abs(out) < 0.999).all(axis=1).reshape(-1)
        assert unclipped.mean() > 0.5
        assert np.abs(in_y - out_y)[unclipped].max() < 1e-4
    report = verify_repository(tmp_path, check_thresholds=False)
    assert report.ok, report.format()
    (model,) = report.models
    figures = model.quality_recomputed
    for key in ("l1", "grey_l1", "mean_chroma_l1", "l1_only_l1", "colorfulness_gain_over_l1_only"):
        assert np.isfinite(figures[key]), key
    # the classical baselines do not depend on the model: colour photos are not grey
    assert 0 < figures["mean_chroma_l1"] and 0 < figures["grey_l1"] < 0.3


@pytest.mark.parametrize("export_fails", [False, True], ids=["exported", "export-failed"])
def test_colorize_recipe_leaves_no_temporary_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export_fails: bool
) -> None:
    """The recipe wrote l1_only.onnx into a tempfile.mkdtemp("genserve-colorize-") folder that
    nothing removed: every build of pix2pix-colorize left 3.4 MB in /tmp for good, exported or not.
    The export (or its failure) now leaves the temporary folder as it found it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def untrained(**kwargs: Any) -> tuple[torch.nn.Module, dict[str, float]]:
        torch.manual_seed(0)  # a one-layer stand-in for the U-Net: the folder's path, not training
        return torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Tanh()).eval(), {"cpu_s": 0.0}

    monkeypatch.setattr(photos_colorize, "train_unet", untrained)
    monkeypatch.setattr(photos_colorize, "quality_figures", lambda run, l1_only: {})
    if export_fails:

        def full_disk(*args: Any, **kwargs: Any) -> Path:
            raise ExportFailedError("no space left on device")

        monkeypatch.setattr("genserve_export.export._write_atomically", full_disk)
        with pytest.raises(ExportFailedError, match="no space"):
            train_and_export("pix2pix-colorize", tmp_path / "repo", progress=False, fp16=False, device="cpu")
    else:
        (version_dir,) = train_and_export(
            "pix2pix-colorize", tmp_path / "repo", progress=False, fp16=False, device="cpu"
        ).paths
        card = json.loads((version_dir / "card.json").read_text())
        aux = version_dir / photos_colorize.L1_ONLY_FILE
        assert hashlib.sha256(aux.read_bytes()).hexdigest() == card["aux_graphs"][aux.name]["sha256"]
    # torch's own compile cache (torchinductor_<user>, made once per process) is not the recipe's
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
