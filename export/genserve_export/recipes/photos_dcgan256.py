"""``dcgan-photos-256``: one large DCGAN generator (256×256 RGB, ~2.4 M parameters).

This entry exists to exercise the serving path with large payloads (196,608 floats an image) and
a mid-size compute class (~10⁸ multiply-adds an image), not to make convincing photographs: a
256×256 GAN needs hours of GPU time, and this one is trained for a couple of minutes on 2 CPU
cores on crops of the bundled photos. Within that budget the discriminator wins outright
(D loss → 0.02), so the generator learns only a shift of its mean colour: samples are
fine-grained purple-gray noise with no structure (gradient energy ~5× that of real photos).
The card says so; its quality figures (colour moments, gradient energy, diversity vs the
held-out photos) measure exactly that, next to the same figures at initialisation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.data import photos
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import (
    pick_device,
    progress_bar,
    run_batched,
    seed_everything,
    standing_batch_stats,
    torch_run,
)

NAME = "dcgan-photos-256"
LATENT_DIM = 128
IMAGE_SIZE = 256
CHANNELS = (384, 192, 96, 48, 24, 12)  # 4×4 → 128×128; a last ConvT makes 256×256×3
BATCH = 8
EVAL_SEED = 2024
EVAL_SAMPLES = 32
# Only "not collapsed / not constant": the untrained generator gives ~1e-4 (a flat image).
THRESHOLDS = {"pairwise_l1": {"min": 0.005}}


class Generator256(nn.Module):
    """z [N, 128] → image [N, 3, 256, 256] in [-1, 1]: 4×4×384, six ConvT ×2 (BN, ReLU), Tanh."""

    def __init__(self, latent_dim: int = LATENT_DIM, channels: Sequence[int] = CHANNELS) -> None:
        super().__init__()
        self.first = channels[0]
        self.project = nn.Linear(latent_dim, channels[0] * 4 * 4, bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(channels[0]), nn.ReLU()]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(channels[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # unflatten, not view(-1, ...): keeps the batch axis symbolic for the exporter (FACTS).
        image: torch.Tensor = self.net(self.project(z).unflatten(1, (self.first, 4, 4)))
        return image


class Discriminator256(nn.Module):
    """image → one logit: six stride-2 convs (256 → 4), then flatten (FACTS: pooling did not train)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128, 256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        layers += [nn.Flatten(), nn.Linear(c_in * 4 * 4, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(image).squeeze(1)
        return logits


def real_batch(train_set: Sequence[photos.Photo], count: int, rng: np.random.Generator) -> np.ndarray:
    """256×256 views of the photos: a random square crop of 256 px up to the photo's short side,
    resized to 256, so the generator sees whole scenes as well as texture. [count, 3, 256, 256] in [0, 1]."""
    out = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i in range(count):
        px = train_set[int(rng.integers(len(train_set)))].pixels
        side = int(rng.integers(IMAGE_SIZE, min(px.shape[:2]) + 1))
        y, x = int(rng.integers(px.shape[0] - side + 1)), int(rng.integers(px.shape[1] - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(px[y : y + side, x : x + side].transpose(2, 0, 1)))[None]
        if side != IMAGE_SIZE:
            crop = F.interpolate(crop, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        out[i] = crop[0].numpy()[:, :, ::-1] if rng.random() < 0.5 else crop[0].numpy()
    return out


def _statistics(images: np.ndarray) -> np.ndarray:
    """Per-channel mean and std, and mean absolute horizontal and vertical gradients."""
    grad_x = np.abs(np.diff(images, axis=3)).mean(axis=(0, 2, 3))
    grad_y = np.abs(np.diff(images, axis=2)).mean(axis=(0, 2, 3))
    return np.concatenate([images.mean(axis=(0, 2, 3)), images.std(axis=(0, 2, 3)), grad_x, grad_y])


def _holdout_views() -> np.ndarray:
    """Every held-out photo, center-cropped square and resized to 256×256, [N, 3, 256, 256] in [0, 1]."""
    views = []
    for photo in photos.holdout_photos():
        side = min(photo.pixels.shape[:2])
        square = photos.center_crop(photo.pixels, 1, max_size=side)
        t = torch.from_numpy(np.ascontiguousarray(square.transpose(2, 0, 1)))[None]
        views.append(F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[0].numpy())
    return np.stack(views)


def quality_figures(run: OnnxRun) -> dict[str, float]:
    z = np.random.default_rng(EVAL_SEED).standard_normal((EVAL_SAMPLES, LATENT_DIM)).astype(np.float32)
    fake = (run_batched(run, {"z": z}, "image", batch_size=8) + 1.0) / 2.0
    real = _holdout_views()
    s_fake, s_real = _statistics(fake), _statistics(real)
    half = len(fake) // 2
    return {
        "color_moment_distance": round(float(np.abs(s_fake[:6] - s_real[:6]).mean()), 5),
        "gradient_ratio": round(float(s_fake[6:].mean() / s_real[6:].mean()), 5),
        # Mean L1 between pairs of different seeds: near 0 means mode collapse.
        "pairwise_l1": round(float(np.abs(fake[:half] - fake[half : 2 * half]).mean()), 5),
    }


class PhotoDcgan256Recipe:
    """Non-saturating GAN loss, Adam 2e-4 (β1 0.5), batch 8 of 256×256 photo views."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 300

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        seed_everything(seed)
        rng = np.random.default_rng(seed)
        train_set = photos.train_photos(color_only=True)
        gen, disc = Generator256().to(device), Discriminator256().to(device)
        initial = quality_figures(torch_run(_eval_copy(gen), ("image",)))
        opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
        started = time.perf_counter()
        bar = progress_bar(steps, NAME, progress)
        for _ in bar:
            real = torch.from_numpy(real_batch(train_set, BATCH, rng) * 2.0 - 1.0).to(device)
            fake = gen(torch.randn(BATCH, LATENT_DIM, device=device))
            loss_d = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_d)
            opt_d.step()
            loss_g = F.softplus(-disc(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_g)
            opt_g.step()
            bar.set_postfix(d=f"{loss_d.item():.2f}", g=f"{loss_g.item():.2f}", refresh=False)
        duration = time.perf_counter() - started
        gen = gen.cpu()
        standing_batch_stats(gen, lambda: (torch.randn(16, LATENT_DIM),), rounds=8)
        quality = quality_figures(torch_run(gen, ("image",)))
        params = sum(p.numel() for p in gen.parameters())
        return [
            ExportSpec(
                name=NAME,
                kind="generator",
                module=gen,
                example_inputs={
                    "z": np.random.default_rng(seed).standard_normal((2, LATENT_DIM)).astype(np.float32)
                },
                card={
                    "recipe": NAME,
                    "description": "large DCGAN generator, 256x256 RGB, z ~ N(0, I) of 128; a payload and "
                    "performance test model: barely trained, samples are colour noise, not photos",
                    "output_range": [-1.0, 1.0],
                    "parameters": params,
                },
                config={"batching": {"max_batch_size": 16, "preferred_batch_sizes": [1, 4, 16]}},
                fp16=False,  # keeps the committed repository small; fp32 alone is ~9.5 MB
                quality={
                    **quality,
                    **{f"untrained_{k}": v for k, v in initial.items()},
                    "samples": EVAL_SAMPLES,
                    "metric": "statistics of 32 seeded samples vs the held-out photos (square center crops "
                    "resized to 256): per-channel mean/std distance, mean abs gradient ratio, and mean L1 "
                    "between samples of different seeds; untrained_* = the same generator at initialisation",
                    "thresholds": THRESHOLDS,
                },
                holdout=photos.holdout_card(train_set, photos.holdout_photos()),
                training={
                    "data": photos.DATA_DESCRIPTION + "; colour train photos only, random square crops "
                    "(256 px to the short side) resized to 256x256, horizontal flips",
                    "steps": steps,
                    "seed": seed,
                    "duration_s": round(duration, 2),
                    "notes": f"a performance / payload test model: {params:,} generator parameters, trained "
                    f"only {steps} steps on CPU, where the discriminator wins outright: samples are fine "
                    "purple-gray noise with no objects or structure. Non-saturating GAN loss; Adam 2e-4 "
                    "betas (0.5, 0.999); batch "
                    f"{BATCH}; BN standing statistics recomputed after training",
                },
            )
        ]

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return quality_figures(run)


def _eval_copy(gen: Generator256) -> nn.Module:
    """The generator at initialisation, in eval mode, without touching the one being trained."""
    return copy.deepcopy(gen).cpu().eval()
