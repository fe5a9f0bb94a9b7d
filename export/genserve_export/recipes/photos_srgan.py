"""``srgan-photos-x4``: SRGAN — the trained SRResNet (``sr-photos-x4``) fine-tuned adversarially.

SRGAN (Ledig et al. 2017) starts from the PSNR-trained SRResNet and fine-tunes it against a
discriminator, so that it stops averaging plausible textures into blur. Its content loss compares
VGG features; no downloaded network may be used here, so the content loss compares the
*discriminator's* features of the output and of the real photo (feature matching, Salimans et al.
2016), plus a small L1 term that keeps colours and low frequencies in place. The generator starts
from the weights of the repository's ``sr-photos-x4`` (read from its ``model.onnx``, whose sha256 the
card records), so the recipe needs that entry and takes minutes, not the PSNR model's ten.

The PSNR model stays beside it under its own name. ``verify`` recomputes for both the PSNR gain over
bicubic and the recovered high-frequency detail (``photos_sr.quality_figures``); this recipe's
threshold asks for more detail than the PSNR model's, measured in the same run from its ONNX graph.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from genserve_contract.repository import latest_version_dir
from genserve_export.data import photos
from genserve_export.errors import ExportError
from genserve_export.recipe import ExportSpec, OnnxRun, SiblingRuns
from genserve_export.recipes import photos_sr
from genserve_export.recipes._common import pick_device, progress_bar, seed_everything, torch_run

NAME = "srgan-photos-x4"
PSNR_MODEL = photos_sr.NAME
PATCH = 96
BATCH = 16
# Loss weights (SRGAN / ESRGAN use L1 1e-2, adversarial 5e-3 and a VGG loss of weight 1 on features
# of a very different scale; these keep the fine-tune within about a dB of the PSNR model).
L1_WEIGHT = 1.0
FEATURE_WEIGHT = 0.2
ADV_WEIGHT = 1e-2
THRESHOLDS = {
    "psnr_gain_db": {"min": 0.0},  # still better than bicubic
    "gradient_energy_ratio_over_psnr_model": {"min": 0.0},  # more detail than the PSNR model
}
# Where the PSNR model's weights come from: $GENSERVE_SR_INIT (a model.onnx), else the latest
# sr-photos-x4 of the repository being trained into (--out), else, run from a checkout (the package
# at export/genserve_export), the one the checkout ships (models/sr-photos-x4/<latest>/model.onnx).
# An installed copy (site-packages) has no such models/.
INIT_ENV = "GENSERVE_SR_INIT"
_PACKAGE = Path(__file__).resolve().parents[1]
_CHECKOUT_MODELS = _PACKAGE.parents[1] / "models" if _PACKAGE.parent.name == "export" else None


class MissingInitError(ExportError):
    """The PSNR-trained SRResNet that SRGAN fine-tunes is not available."""


def psnr_model_path(repository: Path | None = None) -> Path:
    """The ``model.onnx`` of the PSNR-trained SRResNet to start from: $GENSERVE_SR_INIT, else the
    latest ``sr-photos-x4`` of ``repository`` (the one trained into), then of the checkout's models/."""
    override = os.environ.get(INIT_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise MissingInitError(
                f"{path} not found: SRGAN fine-tunes the trained {PSNR_MODEL} "
                f"(train it first, or set {INIT_ENV} to its model.onnx)"
            )
        return path
    looked: list[Path] = []
    for models in (repository, _CHECKOUT_MODELS):
        if models is None or models / PSNR_MODEL in looked:
            continue
        looked.append(models / PSNR_MODEL)
        latest = latest_version_dir(models / PSNR_MODEL)
        if latest is not None and (latest / "model.onnx").is_file():
            return latest / "model.onnx"
    where = " or ".join(str(p) for p in looked) or "no repository"
    raise MissingInitError(
        f"SRGAN fine-tunes the trained {PSNR_MODEL}, and none was found (looked in {where}): train "
        f"{PSNR_MODEL} into the same --out first, or set {INIT_ENV} to its model.onnx"
    )


def load_psnr_model(path: Path) -> photos_sr.SRResNetLite:
    """An SRResNetLite with the weights of an exported ``sr-photos-x4`` graph."""
    net = photos_sr.SRResNetLite()
    state = net.state_dict()
    found: dict[str, torch.Tensor] = {}
    for init in onnx.load(str(path)).graph.initializer:
        key = init.name.removeprefix("module.")
        if key in state:
            found[key] = torch.from_numpy(numpy_helper.to_array(init).astype(np.float32).copy())
    missing = sorted(set(state) - set(found))
    if missing:
        raise MissingInitError(f"{path} lacks weights {missing[:4]}: not an {PSNR_MODEL} graph?")
    net.load_state_dict(found)
    return net


class Discriminator(nn.Module):
    """96×96 photo patch -> 3×3 realness logits, and its intermediate features (the content loss).

    Five stride-2 convolutions with LeakyReLU and no normalisation: cheap on 2 cores (the first one
    already halves the resolution) and its features do not depend on the batch."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, width, 2 * width, 2 * width, 4 * width]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2))
            for cin, cout in zip(chans[:-1], chans[1:], strict=True)
        )
        self.head = nn.Conv2d(chans[-1], 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        x = image * 2.0 - 1.0
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        logits: torch.Tensor = self.head(x)
        return logits, features


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def detail_margin(figures: Mapping[str, float], psnr_model: Mapping[str, float]) -> dict[str, float]:
    """This model's detail ratios minus the PSNR model's (positive: more recovered detail)."""
    return {
        "psnr_model_psnr_gain_db": psnr_model["psnr_gain_db"],
        "psnr_model_gradient_energy_ratio": psnr_model["gradient_energy_ratio"],
        "psnr_model_high_band_energy_ratio": psnr_model["high_band_energy_ratio"],
        "gradient_energy_ratio_over_psnr_model": round(
            figures["gradient_energy_ratio"] - psnr_model["gradient_energy_ratio"], 4
        ),
        "high_band_energy_ratio_over_psnr_model": round(
            figures["high_band_energy_ratio"] - psnr_model["high_band_energy_ratio"], 4
        ),
    }


class PhotoSrganRecipe:
    """Fine-tune sr-photos-x4 with L1 + discriminator-feature + adversarial losses (Adam 1e-4)."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 500
    # build-defaults --jobs starts this recipe only once sr-photos-x4 has been built into --out, and
    # points INIT_ENV at that model (cli._build_in_processes): {entry it starts from: its variable}.
    after = {PSNR_MODEL: INIT_ENV}

    def train(
        self, *, seed: int, steps: int | None, device: str, progress: bool, repository: Path | None = None
    ) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        seed_everything(seed)
        rng = np.random.default_rng(seed)
        init_path = psnr_model_path(repository)
        init_sha = hashlib.sha256(init_path.read_bytes()).hexdigest()
        psnr_net = load_psnr_model(init_path).eval()
        net = load_psnr_model(init_path).to(device).train()
        disc = Discriminator().to(device)
        opt_g = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.999))
        train_set = photos.train_photos()
        started = time.perf_counter()
        bar = progress_bar(steps, NAME, progress)
        for _ in bar:
            hr = torch.from_numpy(photos.random_crops(train_set, PATCH, BATCH, rng)).to(device)
            sr = net(photos_sr.downscale(hr))
            # discriminator: real photos vs the generator's current outputs
            real_logits, real_features = disc(hr)
            real_features = [f.detach() for f in real_features]  # the content targets of this step
            fake_logits, _ = disc(sr.detach())
            loss_d = _bce(real_logits, True) + _bce(fake_logits, False)
            opt_d.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_d)
            opt_d.step()
            # generator: fool the discriminator, match its features of the real photo, stay close in L1
            fake_logits, fake_features = disc(sr)
            feature_loss = sum(
                (F.l1_loss(f, r) for f, r in zip(fake_features, real_features, strict=True)),
                torch.zeros((), device=device),
            )
            loss_g = (
                L1_WEIGHT * F.l1_loss(sr, hr)
                + FEATURE_WEIGHT * feature_loss
                + ADV_WEIGHT * _bce(fake_logits, True)
            )
            opt_g.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_g)
            opt_g.step()
            bar.set_postfix(d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.4f}", refresh=False)
        duration = time.perf_counter() - started
        net = net.cpu().eval()
        quality = photos_sr.quality_figures(torch_run(net, ("output_image",)))
        quality.update(
            detail_margin(quality, photos_sr.quality_figures(torch_run(psnr_net, ("output_image",))))
        )
        example = photos.random_crops(train_set, 32, 2, np.random.default_rng(seed), flip=False)
        return [
            ExportSpec(
                name=NAME,
                kind="super_resolution",
                module=net,
                example_inputs={"image": example},
                card={
                    "recipe": NAME,
                    "description": "x4 photo super-resolution, SRGAN: the PSNR-trained sr-photos-x4 "
                    "fine-tuned with an adversarial loss and a discriminator-feature content loss "
                    "(sharper textures, lower PSNR), RGB in [0, 1]",
                    **photos_sr.SERVING_CARD,  # the same network as sr-photos-x4
                },
                quality={
                    **quality,
                    "metric": photos_sr.METRIC + "; *_over_psnr_model = this ratio minus sr-photos-x4's, "
                    "both recomputed from the ONNX graphs",
                    "thresholds": THRESHOLDS,
                },
                holdout=photos.holdout_card(train_set, photos.holdout_photos()),
                training={
                    "data": photos.DATA_DESCRIPTION + f"; train photos only, random {PATCH}x{PATCH} patches "
                    "with flips/rotations, inputs = antialiased bicubic x4 downscale",
                    "steps": steps,
                    "seed": seed,
                    "duration_s": round(duration, 2),
                    "init": f"{PSNR_MODEL} model.onnx sha256 {init_sha}",
                    "notes": f"generator initialised from {PSNR_MODEL}; loss = {L1_WEIGHT:g} L1 + "
                    f"{FEATURE_WEIGHT:g} L1 of discriminator features (5 stages) + {ADV_WEIGHT:g} "
                    f"non-saturating GAN loss; discriminator: 5 stride-2 conv stages, LeakyReLU, 3x3 patch "
                    f"logits; Adam 1e-4 (0.5, 0.999) for both; batch {BATCH}",
                },
            )
        ]

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return photos_sr.quality_figures(run, int(card.get("scale_factor") or photos_sr.SCALE))

    def evaluate_with_siblings(
        self, name: str, card: Mapping[str, Any], run: OnnxRun, sibling: SiblingRuns
    ) -> dict[str, float]:
        figures = self.evaluate(name, card, run)
        psnr_run = sibling(PSNR_MODEL)
        if psnr_run is None:
            raise MissingInitError(f"the repository has no {PSNR_MODEL} to compare the detail with")
        figures.update(detail_margin(figures, photos_sr.held_out_figures(psnr_run, photos_sr.SCALE)))
        return figures

    def grid_pairs(self, name: str, card: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return photos_sr.PhotoSuperResolutionRecipe().grid_pairs(name, card)
