"""``sr-photos-x4``: a small SRResNet-style ×4 super-resolution net trained on the bundled photos.

Full SRResNet (16 blocks, 64 channels) costs ~0.5 s a step on 2 cores (shared FACTS), far too slow
to train here, so this is the same design scaled down: a conv head, four residual blocks at low
resolution, two ×2 PixelShuffle stages, and a *bicubic skip* — the net predicts only the detail
that bicubic upsampling misses, which is what lets it beat bicubic within a few minutes.
Quality is the PSNR gain over bicubic on the held-out photos, recomputed from the ONNX graph.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.data import photos
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import once, pick_device, progress_bar, seed_everything, torch_run

NAME = "sr-photos-x4"
SCALE = 4
WIDTH = 32
BLOCKS = 4
PATCH = 96  # high-resolution training patch (24×24 at low resolution)
BATCH = 16
THRESHOLDS = {"psnr_gain_db": {"min": 1.0}}
METRIC = (
    "mean PSNR over held-out photos (RGB, [0, 1], border of 4 px shaved); low resolution = antialiased "
    "bicubic downscale x4; baseline = bicubic upscale. Detail recovered, as a ratio to the ground "
    "truth's (mean over photos): gradient_energy_ratio = mean squared luma gradient; "
    "high_band_energy_ratio = luma spectral energy above the low-resolution Nyquist frequency"
)


# How the server runs this network (and srgan-photos-x4, its fine-tune). The net's receptive-field
# radius is 12 input px (4 residual blocks + head/tail convs + the bicubic skip): tiles must overlap
# by >= 2 * 12 for tiled output to equal untiled output (server/genserve_server/tiling.py).
SERVING_CARD = {
    "input_range": [0.0, 1.0],
    "output_range": [0.0, 1.0],
    "scale_factor": SCALE,
    "size_multiple": 1,
    "min_size": 8,
    "tile_size": 128,
    "tile_overlap": 32,
}


class ResidualBlock(nn.Module):
    """conv → ReLU → conv plus identity (no BN: BN hurts SR, as EDSR found)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.conv2(F.relu(self.conv1(x)))
        return out


class SRResNetLite(nn.Module):
    """image [N, 3, h, w] in [0, 1] → image [N, 3, 4h, 4w] in [0, 1] (any h, w)."""

    def __init__(self, width: int = WIDTH, blocks: int = BLOCKS, scale: int = SCALE) -> None:
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, got {scale}")
        self.scale = scale
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.body_out = nn.Conv2d(width, width, 3, padding=1)
        stages: list[nn.Module] = []
        for _ in range(int(math.log2(scale)) - 1):
            stages += [nn.Conv2d(width, width * 4, 3, padding=1), nn.PixelShuffle(2), nn.ReLU()]
        # The last stage goes straight to 3 channels: no wide convolution at full resolution,
        # which keeps a step (and a served tile) cheap.
        stages += [nn.Conv2d(width, 3 * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*stages)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.head(image)
        features = features + self.body_out(self.body(features))
        # scale_factor (not a size) keeps H/W symbolic in the exported graph.
        base = F.interpolate(image, scale_factor=float(self.scale), mode="bicubic", align_corners=False)
        out: torch.Tensor = (base + self.upsample(features)).clamp(0.0, 1.0)
        return out


def downscale(hr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """The degradation the net learns to invert: antialiased bicubic downsampling."""
    lr = F.interpolate(hr, scale_factor=1.0 / scale, mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(0.0, 1.0)


def bicubic_upscale(lr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=float(scale), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def psnr_db(a: np.ndarray, b: np.ndarray, shave: int) -> float:
    """PSNR for [0, 1] images, ignoring a ``shave``-pixel border (standard for SR benchmarks)."""
    a, b = a[..., shave:-shave, shave:-shave], b[..., shave:-shave, shave:-shave]
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def _luma(images: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] RGB in [0, 1] -> [N, H, W] BT.601 luma (float64)."""
    weights = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    luma: np.ndarray = (images.astype(np.float64) * weights).sum(axis=1)
    return luma


def gradient_energy(images: np.ndarray, shave: int) -> float:
    """Mean squared finite-difference gradient of the luma, border of ``shave`` px ignored."""
    y = _luma(images)[:, shave:-shave, shave:-shave]
    return float(np.mean(np.diff(y, axis=1)[:, :, :-1] ** 2 + np.diff(y, axis=2)[:, :-1, :] ** 2))


def high_band_energy(images: np.ndarray, scale: int) -> float:
    """Spectral energy of the luma above the low-resolution Nyquist frequency (1 / (2 * scale)
    cycles a pixel): the band a x<scale> upscaler must invent, since the input cannot hold it."""
    y = _luma(images)
    y = y - y.mean(axis=(1, 2), keepdims=True)
    h, w = y.shape[1:]
    window = np.outer(np.hanning(h), np.hanning(w))  # no spurious edges at the image border
    power = np.abs(np.fft.fft2(y * window)) ** 2
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    band = np.hypot(fy, fx) > 1.0 / (2 * scale)
    return float(power[:, band].mean())


def quality_figures(run: OnnxRun, scale: int = SCALE) -> dict[str, float]:
    """Mean PSNR of the model and of bicubic over the held-out photos (whole images), and how much
    high-frequency detail each recovers, as a ratio to the ground truth's (1 = as much detail as
    the real photo; a PSNR-trained model stays well below it: it averages plausible textures)."""
    model_db, bicubic_db = [], []
    grad_model, grad_bicubic, band_model, band_bicubic = [], [], [], []
    for photo in photos.holdout_photos():
        hr_np = photos.center_crop(photo.pixels, scale).transpose(2, 0, 1)[None]
        hr = torch.from_numpy(np.ascontiguousarray(hr_np))
        lr = downscale(hr, scale)
        sr = run({"image": lr.numpy()})["output_image"]
        up = bicubic_upscale(lr, scale).numpy()
        model_db.append(psnr_db(sr, hr_np, scale))
        bicubic_db.append(psnr_db(up, hr_np, scale))
        grad_hr, band_hr = gradient_energy(hr_np, scale), high_band_energy(hr_np, scale)
        grad_model.append(gradient_energy(sr, scale) / grad_hr)
        grad_bicubic.append(gradient_energy(up, scale) / grad_hr)
        band_model.append(high_band_energy(sr, scale) / band_hr)
        band_bicubic.append(high_band_energy(up, scale) / band_hr)
    model, bicubic = float(np.mean(model_db)), float(np.mean(bicubic_db))
    return {
        "psnr_db": round(model, 4),
        "bicubic_psnr_db": round(bicubic, 4),
        "psnr_gain_db": round(model - bicubic, 4),
        "min_image_psnr_gain_db": round(float(np.min(np.subtract(model_db, bicubic_db))), 4),
        "gradient_energy_ratio": round(float(np.mean(grad_model)), 4),
        "bicubic_gradient_energy_ratio": round(float(np.mean(grad_bicubic)), 4),
        "high_band_energy_ratio": round(float(np.mean(band_model)), 4),
        "bicubic_high_band_energy_ratio": round(float(np.mean(band_bicubic)), 4),
    }


def held_out_figures(run: OnnxRun, scale: int = SCALE) -> dict[str, float]:
    """quality_figures, computed once per run and scale: verify's srgan entry compares its detail
    with this model's, which the model's own entry has computed."""
    return dict(once((run,), ("quality figures", scale), lambda: quality_figures(run, scale)))


class PhotoSuperResolutionRecipe:
    """Adam 1e-3 with cosine decay, L1 loss, batch 16 of 96×96 patches of the train photos."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 1600

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        seed_everything(seed)
        rng = np.random.default_rng(seed)
        train_set = photos.train_photos()
        net = SRResNetLite().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=1e-5)
        started = time.perf_counter()
        bar = progress_bar(steps, NAME, progress)
        for _ in bar:
            hr = torch.from_numpy(photos.random_crops(train_set, PATCH, BATCH, rng)).to(device)
            loss = F.l1_loss(net(downscale(hr)), hr)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            bar.set_postfix(l1=f"{loss.item():.4f}", refresh=False)
        duration = time.perf_counter() - started
        net = net.cpu().eval()
        quality = quality_figures(torch_run(net, ("output_image",)))
        example = photos.random_crops(train_set, 32, 2, np.random.default_rng(seed), flip=False)
        return [
            ExportSpec(
                name=NAME,
                kind="super_resolution",
                module=net,
                example_inputs={"image": example},
                card={
                    "recipe": NAME,
                    "description": "x4 photo super-resolution, PSNR-oriented: small SRResNet + bicubic skip "
                    "trained with L1 only (no adversarial term; srgan-photos-x4 is its GAN fine-tune), "
                    "RGB in [0, 1]",
                    **SERVING_CARD,
                },
                quality={
                    **quality,
                    "metric": METRIC,
                    "thresholds": THRESHOLDS,
                },
                holdout=photos.holdout_card(train_set, photos.holdout_photos()),
                training={
                    "data": photos.DATA_DESCRIPTION + f"; train photos only, random {PATCH}x{PATCH} patches "
                    "with flips/rotations, inputs = antialiased bicubic x4 downscale",
                    "steps": steps,
                    "seed": seed,
                    "duration_s": round(duration, 2),
                    "notes": f"L1 loss; Adam 1e-3 cosine to 1e-5; batch {BATCH}; width {WIDTH}, "
                    f"{BLOCKS} residual blocks, PixelShuffle x2 x2, bicubic skip, output clamped to [0, 1]",
                },
            )
        ]

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return held_out_figures(run, int(card.get("scale_factor") or SCALE))

    def grid_pairs(self, name: str, card: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Held-out crops: 48×48 low-resolution inputs and their 192×192 originals."""
        scale = int(card.get("scale_factor") or SCALE)
        hr = photos.holdout_grid_crops(48 * scale)
        return downscale(torch.from_numpy(hr), scale).numpy(), hr
