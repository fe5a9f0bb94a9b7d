"""The committed default repository (models/) passes verify, quality thresholds included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from genserve_export import verify_repository
from genserve_export.data import digits, fashion
from genserve_export.recipes import vqvae
from genserve_export.verify import VerifyReport

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS_ENTRIES = {
    "vae-digits-decoder",
    "vae-digits-encoder",
    "dcgan-digits",
    "cgan-digits",
    "cyclegan-digits",
    "stylegan-digits-mapping",
    "stylegan-digits",
}
FASHION_ENTRIES = {"cgan-fashion"}  # verify needs Fashion-MNIST too (make fashion-data)


def _repository_of(root: Path, entries: set[str], include: bool) -> Path:
    """A folder of links to the entries of models/ that are (include) or are not in ``entries``."""
    root.mkdir()
    for entry in MODELS.iterdir():
        if entry.is_dir() and (entry.name in entries) == include:
            (root / entry.name).symlink_to(entry)
    return root


@pytest.fixture(scope="module")
def committed_models_report(tmp_path_factory: pytest.TempPathFactory) -> VerifyReport:
    """verify (thresholds on) of every committed model in models/ but FASHION_ENTRIES, run once for
    the tests here that read its figures: it is the longest set-up of the suite (the VQ-VAE decoder's
    300 class-conditional samples, 245 prior calls). Its readers stay in this module, so that the
    README's test command (pytest -n 2 --dist loadfile) computes it on one worker, not on each."""
    root = tmp_path_factory.mktemp("committed") / "models"
    return verify_repository(_repository_of(root, FASHION_ENTRIES, include=False))


@pytest.mark.skipif(not MODELS.is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_committed_models_verify(committed_models_report: VerifyReport) -> None:
    report = committed_models_report  # every entry of models/ but FASHION_ENTRIES
    assert report.ok, report.format()
    assert DIGITS_ENTRIES <= {m.name for m in report.models}


@pytest.mark.skipif(not (MODELS / vqvae.PRIOR).is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_verify_recomputes_the_priors_bits_per_pixel_of_both_levels(
    committed_models_report: VerifyReport,
) -> None:
    """The bottom prior's card records holdout_bits_per_pixel_both_levels (its bits per image pixel
    plus the top prior's), but verify recomputed only the prior's own level and printed the figure
    as '-' beside the card's -> it adds the top prior's level from the sibling graph, as the recipe
    did at export."""
    report = committed_models_report  # the committed repository's verify (the vqvae entries in it)
    assert set(vqvae.VqvaeDigitsRecipe.names) <= {m.name for m in report.models}
    assert report.ok, report.format()
    prior = {m.name: m for m in report.models}[vqvae.PRIOR]
    card = json.loads((MODELS / vqvae.PRIOR / "1" / "card.json").read_text())["quality"]
    both = prior.quality_recomputed.get("holdout_bits_per_pixel_both_levels")
    assert both == pytest.approx(card["holdout_bits_per_pixel_both_levels"], rel=1e-3), prior.format()
    assert "holdout_bits_per_pixel_both_levels: -" not in prior.format()


@pytest.mark.skipif(not MODELS.is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not fashion.available(), reason="Fashion-MNIST not fetched: run make fashion-data")
def test_committed_fashion_model_verifies(tmp_path: Path) -> None:
    report = verify_repository(_repository_of(tmp_path / "models", FASHION_ENTRIES, include=True))
    assert report.ok, report.format()
    assert {m.name for m in report.models} == FASHION_ENTRIES


def _style_generators() -> list[str]:
    if not MODELS.is_dir():
        return []
    return sorted(
        entry.name
        for entry in MODELS.iterdir()
        if (entry / "1" / "card.json").is_file()
        and json.loads((entry / "1" / "card.json").read_text())["kind"] == "style_generator"
    )


@pytest.mark.parametrize("name", _style_generators())
def test_a_style_generators_demodulation_keeps_its_eps_so_a_zero_style_stays_finite(name: str) -> None:
    """Each modulated convolution divides by d = rsqrt(sum_i s_i^2 sum_k W^2 + 1e-8) (the recipe's
    ModulatedConv). The exporter's onnxscript optimizer dropped the + 1e-8 from the bundled synthesis
    graph (as from the mapping's pixel norm, c3ecb93), so a style s of zeros (or one whose squares
    underflow float32) gave d = inf and 0 * inf = NaN in the image -> the graph adds the eps, and
    each demodulation of a zero style is 1 / sqrt(1e-8) = 1e4."""
    model = onnx.load(str(MODELS / name / "1" / "model.onnx"))
    producer = {out: node for node in model.graph.node for out in node.output}
    demodulations = []
    for node in model.graph.node:
        if node.op_type == "Reciprocal" and producer[node.input[0]].op_type == "Sqrt":
            below = producer[producer[node.input[0]].input[0]]
            if below.op_type == "Add":
                below = producer[below.input[0]]
            assert below.op_type == "MatMul", below  # s^2 @ sum_k W^2
            squares = producer[below.input[0]]
            assert squares.op_type == "Pow", squares
            demodulations.append((squares.input[0], node.output[0]))
    card = json.loads((MODELS / name / "1" / "card.json").read_text())
    assert len(demodulations) == card["num_layers"]
    for style, d in demodulations:
        graph = onnx.utils.Extractor(model).extract_model([style], [d])
        sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        affine = producer[style]  # the style's Gemm: its bias has the style's width
        bias = next(i for i in model.graph.initializer if i.name == affine.input[2])
        s = np.zeros((2, bias.dims[0]), np.float32)
        s[1] = 1e-25  # its squares underflow float32
        (got,) = sess.run([d], {style: s})
        np.testing.assert_allclose(got, 1e4, rtol=1e-4, err_msg=f"{name}: demodulation {d} of a zero style")


USED_MODEL = re.compile(r"(\S+) version (\S+) sha256 ([0-9a-f]{64})(?: weights_sha256 [0-9a-f]{64})?")


def _used_models(value: str) -> list[tuple[str, str, str]]:
    """(model, version, sha256) of each entry of a PNG's `used_models` text, as docs/client.md
    writes them: `NAME version V sha256 H`, with ` weights_sha256 W` where that model has one."""
    used = []
    for part in value.split("; ") if value else []:
        entry = USED_MODEL.fullmatch(part)
        assert entry, f"used_models entry not as docs/client.md writes it: {part!r}"
        used.append((entry[1], entry[2], entry[3]))
    return used


def test_used_models_text_is_read_as_docs_client_md_writes_it() -> None:
    """docs/client.md: a PNG's `used_models` is `; `-separated `NAME version V sha256 H`, with
    ` weights_sha256 W` where that model keeps its weights in external data files; an entry with
    it is read as the same (model, version, sha256), not one field too many."""
    h, g, w = "a" * 64, "b" * 64, "c" * 64
    text = f"mapping version 1 sha256 {h} weights_sha256 {w}; decoder version 2 sha256 {g}"
    assert _used_models(text) == [("mapping", "1", h), ("decoder", "2", g)]
    assert _used_models("") == []


def test_the_docs_pictures_name_the_committed_models_they_were_made_with() -> None:
    """A picture under docs/images made by genserve-client names in its PNG text the model, version
    and sha256 it came from (and the other models it went through): each must be the committed
    model's, or a reader checking the picture against models/ finds a model that is not shipped
    (stylegan-digits-mix.png named the graph before its synthesis was patched)."""
    checked = 0
    for picture_path in sorted((MODELS.parent / "docs" / "images").glob("*.png")):
        with Image.open(picture_path) as picture:
            text = dict(picture.text)  # type: ignore[attr-defined]
        if "model_sha256" not in text:
            continue
        used = _used_models(text.get("used_models", ""))
        for model, version, sha256 in [(text["model"], text["version"], text["model_sha256"]), *used]:
            card = json.loads((MODELS / model / version / "card.json").read_text())
            assert sha256 == card["sha256"]["model.onnx"], (picture_path.name, model, version)
            checked += 1
    assert checked, "no picture under docs/images names its model"


@pytest.mark.skipif(not MODELS.is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_verify_computes_the_vae_pairs_figures_once_for_both_entries(
    tmp_path: Path, quality_runs: dict[str, list[int]]
) -> None:
    """vae-digits-decoder and vae-digits-encoder each report the pair's reconstruction figures, and
    verify computed them twice (the encoder over the holdout digits 3 times, the decoder's 3 passes
    over them twice) -> once, both entries the same figures."""
    entries = {"vae-digits-decoder", "vae-digits-encoder"}
    report = verify_repository(_repository_of(tmp_path / "models", entries, include=True))
    assert report.ok, report.format()
    held = len(digits.load().holdout_images)
    assert sum(quality_runs["vae-digits-encoder"]) == held
    pair = [m.quality_recomputed["recon_mse"] for m in report.models]
    assert len(pair) == 2 and pair[0] == pair[1]


@pytest.mark.skipif(not MODELS.is_dir(), reason="models/ has not been built")
def test_verify_runs_the_psnr_model_over_the_holdout_photos_once_for_the_srgans_detail_margin(
    tmp_path: Path, quality_runs: dict[str, list[int]]
) -> None:
    """srgan-photos-x4's detail margin compares it with sr-photos-x4's figures, which verify had
    just computed for sr-photos-x4's own entry, and ran sr-photos-x4 over the holdout photos again
    -> once, the same figures."""
    from genserve_export.data import photos

    entries = {"sr-photos-x4", "srgan-photos-x4"}
    report = verify_repository(_repository_of(tmp_path / "models", entries, include=True))
    assert report.ok, report.format()
    assert len(quality_runs["sr-photos-x4"]) == len(photos.holdout_photos())
