"""card.json's output_range is "the float range of the image output" (docs/model-repository.md); a kind
with no image output (the VAE encoder: mu, logvar) has none, like every field that does not apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from genserve_export import export_model, verify_repository
from genserve_export.card import validate_card
from genserve_server.config import ConfigError, load_card

REPOSITORY = Path(__file__).resolve().parents[2] / "models"


class TinyEncoder(nn.Module):
    """image [N, 1, 4, 4] in [0, 1] -> (mu, logvar) [N, 3], unbounded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mu = nn.Linear(16, 3)
        self.logvar = nn.Linear(16, 3)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = image.flatten(1) * 10.0
        return self.mu(flat), self.logvar(flat)


def test_an_encoders_card_claims_no_output_range_for_its_unbounded_mu_and_logvar(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
    path = export_model(
        TinyEncoder().eval(),
        kind="vae_encoder",
        name="my-encoder",
        out_dir=tmp_path,
        example_inputs={"image": images},
        # what the vae-digits recipe passed (its decoder's range, shared by both cards)
        card={"description": "a tiny encoder", "input_range": [0.0, 1.0], "output_range": [0.0, 1.0]},
        fp16=False,
    )
    card = json.loads((path / "card.json").read_text())
    assert card["output_range"] is None


def test_an_encoders_card_gives_mu_widths_latent_dim_and_its_images_channels(tmp_path: Path) -> None:
    """A vae_encoder's derived fields come from what it encodes and gives: latent_dim is mu's width
    (3, not the image's), channels and image_size the image's it takes (1, [4, 4]), no class_names."""
    images = np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
    path = export_model(
        TinyEncoder().eval(),
        kind="vae_encoder",
        name="my-encoder",
        out_dir=tmp_path,
        example_inputs={"image": images},
        card={"description": "a tiny encoder", "input_range": [0.0, 1.0]},
        fp16=False,
    )
    card = json.loads((path / "card.json").read_text())
    assert card["latent_dim"] == 3
    assert (card["channels"], card["input_channels"], card["image_size"]) == (1, 1, [4, 4])
    assert card["class_names"] is None


def test_the_shipped_vae_encoder_card_claims_no_output_range() -> None:
    card = json.loads((REPOSITORY / "vae-digits-encoder" / "1" / "card.json").read_text())
    assert card["kind"] == "vae_encoder"
    assert card["output_range"] is None
    assert validate_card(card) == []


@pytest.mark.parametrize(
    ("output_range", "served"),
    [([0.0, 1.0], True), ([-1, 1], True), ([1.0, 0.0], False), ("[0, 1]", False)],
    ids=["before-82bcbdf", "ints", "reversed", "a-string"],
)
def test_verify_accepts_an_encoders_output_range_exactly_when_the_server_does(
    tmp_path: Path, output_range: object, served: bool
) -> None:
    """vae_encoder cards written before 82bcbdf (the shipped one included) carry output_range [0, 1];
    the server reads it (and ignores it: no image output) and serves the version. verify is to accept
    what the server accepts: such a range is noted, not an error; a malformed one the server refuses
    stays an error."""
    images = np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
    path = export_model(
        TinyEncoder().eval(),
        kind="vae_encoder",
        name="my-encoder",
        out_dir=tmp_path,
        example_inputs={"image": images},
        card={"description": "a tiny encoder", "input_range": [0.0, 1.0]},
        fp16=False,
    )
    card_path = path / "card.json"
    card = json.loads(card_path.read_text())
    card["output_range"] = output_range
    card_path.write_text(json.dumps(card, indent=2))
    try:
        load_card(card_path)
    except ConfigError:
        assert not served
    else:
        assert served
    report = verify_repository(tmp_path, recompute_quality=False)
    assert report.ok is served, report.format()
    (model,) = report.models
    if served:
        assert any("output_range" in note for note in model.notes), report.format()
    else:
        assert any("'output_range'" in e for e in model.errors), report.format()
