"""``dcgan-digits``: an unconditional DCGAN generator on the digits, non-saturating loss."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genserve_export.data import sk_digits as digits
from genserve_export.quality.sk_digits_classifier import CLASSIFIER_DESCRIPTION
from genserve_export.quality.sk_digits_metrics import classifier_figures, memorisation_figures
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import (
    CHECKPOINT_EVERY,
    EVAL_SEED,
    EmaGenerator,
    batches,
    log_checkpoint,
    pick_device,
    progress_bar,
    run_batched,
    seed_everything,
    standing_batch_stats,
    torch_run,
)

NAME = "dcgan-digits"
LATENT_DIM = 64
WIDTH = 32  # 8x8 digits upsampled to 28x28 are smooth: narrow nets suffice and train ~4x faster
EVAL_SAMPLES = 1000
THRESHOLDS = {
    "min_class_fraction": {"min": 0.05},
    "mean_top_probability": {"min": 0.8},
    "memorised_fraction": {"max": 0.05},
}


class Generator(nn.Module):
    """z [N, 64] → image [N, 1, 28, 28] in [-1, 1]: Linear → 32×7×7 → ConvT ×2 (BN, ReLU) → Tanh."""

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = WIDTH) -> None:
        super().__init__()
        self.width = width
        self.project = nn.Linear(latent_dim, width * 7 * 7, bias=False)
        self.net = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),  # 14×14
            nn.BatchNorm2d(width // 2),
            nn.ReLU(),
            nn.ConvTranspose2d(width // 2, 1, 4, 2, 1),  # 28×28
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        image: torch.Tensor = self.net(self.project(z).unflatten(1, (self.width, 7, 7)))
        return image


class Discriminator(nn.Module):
    """image → one logit; strided convs, then flatten (FACTS: flattening worked, pooling did not).

    Spectral norm instead of BatchNorm: with BN the discriminator won too easily (loss ~0.05) and
    the generator's class mix drifted (two digits under 4% of samples at 3k steps).
    """

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width, 4, 2, 1)),  # 14×14
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)),  # 7×7
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            spectral_norm(nn.Linear(2 * width * 7 * 7, 1)),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(image)
        return logits.squeeze(1)


def _standing_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(256, LATENT_DIM),)


def _samples(run: OnnxRun) -> np.ndarray:
    """1,000 seeded samples mapped from [-1, 1] to [0, 1]."""
    z = np.random.default_rng(EVAL_SEED).standard_normal((EVAL_SAMPLES, LATENT_DIM)).astype(np.float32)
    return (run_batched(run, {"z": z}, "image") + 1.0) / 2.0


class DcganDigitsRecipe:
    """Adam 2e-4 (β1 0.5), batch 64, one D step per G step, non-saturating loss."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 3000

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        order_gen = seed_everything(seed)
        data = digits.load()
        real_all = torch.from_numpy(data.train_images * 2.0 - 1.0).to(device)
        gen, disc = Generator().to(device), Discriminator().to(device)
        opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
        order = batches(len(real_all), 64, order_gen)
        ema = EmaGenerator(gen)
        started = time.perf_counter()
        bar = progress_bar(steps, NAME, progress)
        for step in bar:
            real = real_all[next(order).to(device)]
            fake = gen(torch.randn(len(real), LATENT_DIM, device=device))
            loss_d = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_d)
            opt_d.step()
            loss_g = F.softplus(-disc(fake)).mean()  # non-saturating: maximise log D(G(z))
            opt_g.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_g)
            opt_g.step()
            ema.update(gen, step)
            if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < steps:
                log_checkpoint(NAME, step + 1, ema, _standing_inputs, self._figures)
            bar.set_postfix(d=f"{loss_d.item():.2f}", g=f"{loss_g.item():.2f}", refresh=False)
        exported = ema.average.cpu()
        standing_batch_stats(exported, _standing_inputs)
        duration = time.perf_counter() - started
        quality = self._figures(torch_run(exported, ("image",)))
        return [
            ExportSpec(
                name=NAME,
                kind="generator",
                module=exported,
                example_inputs={
                    "z": np.random.default_rng(seed).standard_normal((4, LATENT_DIM)).astype(np.float32)
                },
                card={
                    "recipe": NAME,
                    "description": "DCGAN generator, digits 28x28 gray, z ~ N(0, I) of 64",
                    "output_range": [-1.0, 1.0],
                },
                quality={
                    **quality,
                    "classifier": CLASSIFIER_DESCRIPTION,
                    "samples": EVAL_SAMPLES,
                    "thresholds": THRESHOLDS,
                },
                holdout=data.holdout_record(),
                training={
                    "data": digits.DATA_DESCRIPTION + "; training split only, scaled to [-1, 1]",
                    "steps": steps,
                    "seed": seed,
                    "duration_s": round(duration, 2),
                    "notes": "non-saturating GAN loss; Adam 2e-4 betas (0.5, 0.999); batch 64; "
                    "BN standing statistics recomputed after training; "
                    "exported weights: EMA (decay 0.999) of the generator",
                },
            )
        ]

    @staticmethod
    def _figures(run: OnnxRun) -> dict[str, float]:
        images = _samples(run)
        return {**classifier_figures(images), **memorisation_figures(images)}

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return self._figures(run)
