"""Recipe vqvae-digits: the priors' causal structure (what lets one call serve rows at different
positions), and a smoke train of a few steps through export and verify."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve_export import verify_repository
from genserve_export.data import digits
from genserve_export.export import export_model
from genserve_export.recipes import vqvae
from genserve_export.recipes.vqvae_nets import GatedPixelCNN, TopOnlyDecoder, VqVae2


@pytest.mark.parametrize("top_k", [0, 5], ids=["top-prior", "bottom-prior"])
def test_a_positions_logits_depend_only_on_the_positions_before_it(top_k: int) -> None:
    torch.manual_seed(0)
    h, w, k = 6, 6, 7
    prior = GatedPixelCNN(k, 8, 4, n_classes=3, top_k=top_k).eval()
    codes = torch.randint(0, k, (1, h, w))
    label = torch.tensor([1])
    top = torch.randint(0, top_k, (1, h // 2, w // 2)) if top_k else None  # upsampled x2 in the prior
    with torch.no_grad():
        base = prior(codes, label, top)[0].flatten(1)  # [k, H*W], raster order
        for p in range(h * w):
            changed = codes.clone()
            changed.view(-1)[p] = (changed.view(-1)[p] + 1) % k
            after = prior(changed, label, top)[0].flatten(1)
            moved = (after - base).abs().amax(dim=0) > 1e-6
            assert not moved[: p + 1].any(), f"position {p} leaks into {moved[: p + 1].nonzero().tolist()}"
            if p < h * w - 1:
                assert moved[p + 1 :].any()  # later positions do see it (the test is not vacuous)


def test_the_top_only_decoder_trains_the_top_encoder_to_hold_the_image() -> None:
    """Its loss reaches the top encoder (through the straight-through top codes) and not the bottom
    path: what makes the top grid carry the digit's shape (vqvae_nets.TopOnlyDecoder)."""
    torch.manual_seed(0)
    model, top_only = VqVae2(vqvae.K_TOP, vqvae.K_BOTTOM), TopOnlyDecoder()
    images = torch.rand(4, 1, 28, 28)
    q_top, *_ = model.encode(images)
    logits = top_only(q_top)
    assert logits.shape == images.shape
    torch.nn.functional.binary_cross_entropy_with_logits(logits, images).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encode_top.parameters())
    assert all(p.grad is None for p in model.pre_bottom.parameters())
    assert all(p.grad is None for p in model.decode.parameters())


@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_a_few_training_steps_export_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vqvae, "SAMPLES_PER_CLASS", 1)
    torch.set_num_threads(1)
    trained = vqvae.train_models(seed=0, steps=12, device="cpu", progress=False)
    specs = vqvae.specs_from(trained)
    assert [s.name for s in specs] == list(vqvae.VqvaeDigitsRecipe.names)
    for s in specs:
        export_model(
            s.module,
            kind=s.kind,
            name=s.name,
            out_dir=tmp_path,
            example_inputs=s.example_inputs,
            card=s.card,
            config=s.config,
            quality=s.quality,
            holdout=s.holdout,
            training={**s.training, "command": "test", "source_commit": "test"},
            fp16=s.fp16,
            extra_files=s.extra_files,
        )
    report = verify_repository(tmp_path, check_thresholds=False)
    assert report.ok, report.format()
    by_name = {m.name: m for m in report.models}
    decoder = by_name[vqvae.DECODER].quality_recomputed
    assert {"recon_mse", "top_perplexity", "bottom_dead_codes", "class_accuracy"} <= set(decoder)
    for name in (vqvae.DECODER, vqvae.TOP_PRIOR, vqvae.PRIOR):
        card = json.loads((tmp_path / name / "1" / "card.json").read_text())
        recomputed = by_name[name].quality_recomputed
        for metric in ("recon_mse", "top_perplexity", "holdout_bits_per_dim"):
            if metric in card["quality"]:  # ONNX figures = the PyTorch figures the card recorded
                assert recomputed[metric] == pytest.approx(card["quality"][metric], rel=1e-3)
    prior_card = json.loads((tmp_path / vqvae.PRIOR / "1" / "card.json").read_text())
    assert prior_card["grid"] == [14, 14] and prior_card["top_grid"] == [7, 7]
    assert [t["name"] for t in prior_card["inputs"]] == ["codes", "label", "top_codes"]
    assert prior_card["output_range"] is None and prior_card["image_size"] is None
    assert prior_card["training"]["cpu_s"] > 0
    # The card's sample figures are at the priors' default sampling (config.json, which the server
    # applies to a request without options); verify reads it from the repository.
    for name in (vqvae.TOP_PRIOR, vqvae.PRIOR):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["sampling"] == {"temperature": vqvae.SAMPLING_TEMPERATURE}
    at = float(np.float32(vqvae.SAMPLING_TEMPERATURE))
    assert decoder["sampling_temperature"] == decoder["top_sampling_temperature"] == at
    decoder_card = json.loads((tmp_path / vqvae.DECODER / "1" / "card.json").read_text())
    assert decoder_card["quality"]["sampling_temperature"] == at
    config_path = tmp_path / vqvae.PRIOR / "config.json"
    config = json.loads(config_path.read_text())
    config["sampling"] = {"temperature": 0.5, "top_k": 8}
    config_path.write_text(json.dumps(config))
    # only the decoder's figures are read: verify its folder (the priors' configs are its siblings')
    moved = verify_repository(tmp_path / vqvae.DECODER, check_thresholds=False)
    figures = {m.name: m for m in moved.models}[vqvae.DECODER].quality_recomputed
    assert (figures["sampling_temperature"], figures["sampling_top_k"]) == (float(np.float32(0.5)), 8.0)
    assert figures["top_sampling_temperature"] == at
    # a tampered auxiliary encoder is caught
    (tmp_path / vqvae.DECODER / "1" / vqvae.ENCODER_FILE).write_bytes(b"not a graph")
    tampered = verify_repository(tmp_path / vqvae.DECODER, check_thresholds=False)  # the card listing it
    assert any("auxiliary graph encoder.onnx" in e for m in tampered.models for e in m.errors)


@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_the_decoders_specs_leave_no_temporary_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """specs_from wrote encoder.onnx into a tempfile.mkdtemp("genserve-vqvae-") folder that nothing
    removed: every build of vqvae-digits left it in /tmp for good, exported or not. The encoder's
    graph now travels as bytes (its export and digest: test_a_few_training_steps_export_and_verify),
    and the temporary folder is as specs_from found it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # untrained nets and no figures: the folder's path, not training or measuring
    for figures in ("pair_figures", "sample_figures"):
        monkeypatch.setattr(vqvae, figures, lambda *args: {})
    monkeypatch.setattr(vqvae, "prior_figures", lambda *args: {"holdout_bits_per_image_pixel": 1.0})
    torch.manual_seed(0)
    trained = vqvae.Trained(
        VqVae2(vqvae.K_TOP, vqvae.K_BOTTOM),
        GatedPixelCNN(vqvae.K_TOP, 8, 2, vqvae.N_CLASSES),
        GatedPixelCNN(vqvae.K_BOTTOM, 8, 2, vqvae.N_CLASSES, top_k=vqvae.K_TOP),
        (1, 1, 1),
        (0.0, 0.0, 0.0),
        seed=0,
    )
    decoder = vqvae.specs_from(trained)[0]
    assert decoder.name == vqvae.DECODER
    encoder = decoder.extra_files[vqvae.ENCODER_FILE]
    assert isinstance(encoder, bytes) and encoder
    # torch's own compile cache (torchinductor_<user>, made once per process) is not the recipe's
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.skipif(not (MODELS / vqvae.PRIOR).is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_verify_encodes_the_holdout_once_and_scores_the_top_prior_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quality_runs: dict[str, list[int]]
) -> None:
    """verify of the three vqvae entries encoded the holdout digits 4 times (the decoder's
    reconstruction, each prior's likelihood, the top prior's again for the bottom prior's
    both-levels sum) and ran the top prior over them twice -> each once, the same figures."""
    monkeypatch.setattr(vqvae, "sample_figures", lambda *args: {})  # the priors' sampling: not this test's
    root = tmp_path / "models"
    root.mkdir()
    for name in vqvae.VqvaeDigitsRecipe.names:
        (root / name).symlink_to(MODELS / name)
    report = verify_repository(root, check_thresholds=False)  # no sample figures to hold
    assert report.ok, report.format()
    held = len(digits.load().holdout_images)
    assert sum(quality_runs[f"{vqvae.DECODER}/{vqvae.ENCODER_FILE}"]) == held
    assert sum(quality_runs[vqvae.TOP_PRIOR]) == held
    assert sum(quality_runs[vqvae.PRIOR]) == held
    by_name = {m.name: m.quality_recomputed for m in report.models}
    top = by_name[vqvae.TOP_PRIOR]["holdout_bits_per_image_pixel"]
    both = by_name[vqvae.PRIOR]["holdout_bits_per_image_pixel"] + top
    assert by_name[vqvae.PRIOR]["holdout_bits_per_pixel_both_levels"] == both
