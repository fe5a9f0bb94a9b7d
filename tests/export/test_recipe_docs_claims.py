"""The training recipes' docs and the README against what the code and the shipped cards hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from genserve_export.recipes import photos_colorize

ROOT = Path(__file__).resolve().parents[2]


def _card(name: str) -> dict:
    return json.loads((ROOT / "models" / name / "1" / "card.json").read_text())


def test_readme_vqvae_figures_are_the_shipped_cards() -> None:
    """README's row for the VQ-VAE-2 quoted the build before the top-only decoder (1.62 / 1.86 bits
    per code, 91.7 %) after the retrained models (2d271e4) shipped with other figures."""
    row = next(
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `vqvae-digits-prior`")
    )
    decoder = _card("vqvae-digits-decoder")["quality"]
    top = _card("vqvae-digits-top-prior")["quality"]["holdout_bits_per_dim"]
    bottom = _card("vqvae-digits-prior")["quality"]["holdout_bits_per_dim"]
    assert f"MSE {decoder['recon_mse']:.4f}" in row
    assert f"{top:.2f} / {bottom:.2f} bits per code (top / bottom prior)" in row
    assert f"{decoder['class_accuracy'] * 100:.1f} % of {decoder['samples']}" in row


def test_vqvae_docs_name_no_card_field_the_cards_lack() -> None:
    """vqvae.py sent readers to 'the card's sampling_notes' for the temperature-1 figures; no card
    carries that field (the retrained models of 2d271e4 dropped it)."""
    source = (ROOT / "export" / "genserve_export" / "recipes" / "vqvae.py").read_text()
    cards = [_card(n) for n in ("vqvae-digits-decoder", "vqvae-digits-prior", "vqvae-digits-top-prior")]
    for field in sorted(set(re.findall(r"card's ``?(\w+)", source))):
        assert any(field in card or field in card["quality"] for card in cards), field


def test_colorize_patchgan_patch_size_is_what_its_docs_say() -> None:
    """The colourisation PatchGAN's logits each see 70x70 input pixels (pix2pix's own 70x70 D); its
    docstring and export/README.md said ~46."""
    disc = photos_colorize.PatchDiscriminator()
    y = torch.zeros(1, 1, 256, 256, requires_grad=True)
    logits = disc(y, torch.zeros(1, 2, 256, 256))
    logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
    assert y.grad is not None
    rows = y.grad[0, 0].abs().sum(dim=1).nonzero().flatten()
    side = int(rows.max() - rows.min() + 1)
    said = re.search(r"~?(\d+)×\1 patch", photos_colorize.PatchDiscriminator.__doc__ or "")
    assert said is not None and int(said.group(1)) == side
    readme = (ROOT / "export" / "README.md").read_text()
    assert f"{side}-px patches" in readme
