"""Recipe vqvae-digits: the priors' causal structure (what lets one call serve rows at different
positions) and verify's runs of the committed entries. Its smoke train of a few steps through export
and verify is test_export.py's test_the_vqvae_family_exports_and_verifies, on the quick repository
that file trains and exports every recipe into (one training of the family, not two)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from genserve_export import verify_repository
from genserve_export.data import digits
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
def test_the_decoders_specs_leave_no_temporary_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """specs_from wrote encoder.onnx into a tempfile.mkdtemp("genserve-vqvae-") folder that nothing
    removed: every build of vqvae-digits left it in /tmp for good, exported or not. The encoder's
    graph now travels as bytes (its export and digest: test_export.py's
    test_the_vqvae_family_exports_and_verifies), and the temporary folder is as specs_from found it."""
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
