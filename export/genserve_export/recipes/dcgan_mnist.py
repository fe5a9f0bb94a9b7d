"""``dcgan-digits`` on real MNIST (issue 17): a DCGAN generator 64 wide, a PacGAN discriminator.

Generator: ``dcgan.Generator`` at width 64 (Linear → 64×7×7, ConvTranspose to 32×14×14 and to
1×28×28, BN + ReLU, Tanh; 234,177 parameters, 2.2× the 32-wide net's); z of 64, so the
served interface (z [N, 64] → image [N, 1, 28, 28] in [-1, 1]) is the scikit-learn model's.
Discriminator: the DCGAN paper's (strided convs, BatchNorm after the second, 64 wide, flattened to
one logit; FACTS: flattening worked, pooling did not), made a **PacGAN** discriminator (Lin et al.
2018): it judges packs of 2 images stacked as channels, so a batch that lacks variety is easier to
tell, and its step is cheaper. Non-saturating loss, Adam 2e-4 (β 0.5, 0.999), batch 64, both
learning rates falling linearly to 0 over the last 40 % of 10,000 steps; exported weights: the EMA
(0.999) of the generator at the last step, BN standing statistics recomputed.

Measured attempts (2026-12-04, seed 0, one torch thread under nice 10-15 on 2 CPU cores shared with
other trainings and benchmarks; figures by verify's MNIST CNN over the 1,000 seeded samples; gates
min class 5 %, top-prob 0.8, memorised 5 %). Earlier ones (32-wide spectral-norm D, InfoGAN code,
64-wide both sides; min class 2-4 %) are in export/README.md.

- generator 32 wide (the scikit-learn model's), this discriminator without packing, constant lr,
  3,000 steps (501 CPU s): min class 2.1 % (1s), top-prob 0.77; + minibatch stddev: 2.1 % at 1,000.
- **generator 64 wide + PacGAN (packs of 2) + lr decay over the last 40 %**, 6,000 steps: 318 CPU s
  (0.053 s a step); min class / top-prob by checkpoint: 2.8 % / 0.755 at 2,500, 5.1 % / 0.777 at
  4,000, 6.2 % / 0.789 at 5,000, 5.9 % / 0.796 at 6,000; memorised 0. Coverage solved, top-prob
  still rising when the learning rate reached 0.
- the same over **10,000 steps (this recipe)**: 548 CPU s for the run (one thread; ~25 s of it the
  proxy probes below); min class 6.1-6.5 % and top-prob 0.800-0.810 at every checkpoint from 6,250
  on, **6.3 % / 0.809 at the end**, memorised 0.
- checkpoint selection by a training-time proxy (``_selection``: a classifier of another
  architecture and seed fitted to the training split, 2,000 samples of training-time seeds, score
  min(min class / 5 %, top-prob / 0.8)) was tried in both runs: it picked step 6,000 of the 10,000-step
  run (proxy min class 4.95 %, its classifier reads fewer samples as the rarest class than verify's
  does), which verify scores 6.1 % / **0.797**: the one checkpoint after 6,000 that misses the
  top-prob gate. So the recipe exports the last step, as every other recipe does, and the pass does
  not hang on a pick: every checkpoint of the last 35 % passes.
  That proxy reads the shipped last step's 2,000 training-time samples as 4.1 % for the rarest class
  (top-prob 0.811): by a second classifier the coverage gate is not met with margin.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.data import digits
from genserve_export.quality.digits_classifier import CLASSIFIER_DESCRIPTION
from genserve_export.quality.digits_metrics import classifier_figures, memorisation_figures
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import (
    EVAL_SEED,
    EmaGenerator,
    batches,
    pick_device,
    progress_bar,
    run_batched,
    seed_everything,
    standing_batch_stats,
    torch_run,
)
from genserve_export.recipes.dcgan import LATENT_DIM, THRESHOLDS, Generator

NAME = "dcgan-digits"
G_WIDTH = 64  # channels at 7×7 (half at 14×14); 32 (the scikit-learn model's) stayed near 2 % min class
D_WIDTH = 64  # channels at 14×14 (twice at 7×7)
PACK = 2  # PacGAN: D judges PACK samples stacked as channels
BATCH = 64
LEARNING_RATE = 2e-4
LR_DECAY_FROM = 0.6  # learning rates fall linearly to 0 from this fraction of the steps
EVAL_SAMPLES = 1000


class Discriminator(nn.Module):
    """images [N, 1, 28, 28] → one logit per PACK images (consecutive images stacked as channels):
    conv (14×14), conv + BN (7×7), flatten, linear."""

    def __init__(self, width: int = D_WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(PACK, width, 4, 2, 1),  # 14×14
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),  # 7×7
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, 1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(image.reshape(-1, PACK, *image.shape[2:]))
        return logits.squeeze(1)


def _standing_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(256, LATENT_DIM),)


def _samples(run: OnnxRun) -> np.ndarray:
    """1,000 seeded samples mapped from [-1, 1] to [0, 1]."""
    z = np.random.default_rng(EVAL_SEED).standard_normal((EVAL_SAMPLES, LATENT_DIM)).astype(np.float32)
    return (run_batched(run, {"z": z}, "image") + 1.0) / 2.0


class DcganMnistRecipe:
    """Non-saturating loss, PacGAN D, Adam 2e-4 (β1 0.5) decaying to 0, batch 64 (module docs)."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 10_000  # ~550 s of CPU on one thread (module docs)

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        order_gen = seed_everything(seed)
        data = digits.load()
        real_all = torch.from_numpy(data.train_images * 2.0 - 1.0).to(device)
        gen, disc = Generator(width=G_WIDTH).to(device), Discriminator().to(device)
        opt_g = torch.optim.Adam(gen.parameters(), lr=LEARNING_RATE, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=LEARNING_RATE, betas=(0.5, 0.999))
        order = batches(len(real_all), BATCH, order_gen)
        ema = EmaGenerator(gen)
        started, cpu_started = time.perf_counter(), time.process_time()
        bar = progress_bar(steps, NAME, progress)
        decay_start = int(LR_DECAY_FROM * steps)
        for step in bar:
            if step >= decay_start:
                factor = 1.0 - (step - decay_start) / max(1, steps - decay_start)
                for opt in (opt_g, opt_d):
                    for group in opt.param_groups:
                        group["lr"] = LEARNING_RATE * factor
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
            bar.set_postfix(d=f"{loss_d.item():.2f}", g=f"{loss_g.item():.2f}", refresh=False)
        exported = ema.average.cpu()
        standing_batch_stats(exported, _standing_inputs)
        wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
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
                    "description": f"DCGAN generator ({G_WIDTH} wide), real MNIST 28x28 gray, "
                    "z ~ N(0, I) of 64",
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
                    "duration_s": round(wall_s, 2),
                    "cpu_s": round(cpu_s, 2),
                    "notes": f"non-saturating GAN loss; Adam {LEARNING_RATE:g} betas (0.5, 0.999), falling "
                    f"linearly to 0 over the last {1 - LR_DECAY_FROM:.0%} of the steps; batch {BATCH}; "
                    f"PacGAN discriminator (packs of {PACK}): conv, conv + BN, {D_WIDTH} wide, flatten, "
                    "linear; BN standing statistics recomputed after training; exported weights: EMA "
                    "(decay 0.999) of the generator at the last step",
                },
            )
        ]

    @staticmethod
    def _figures(run: OnnxRun) -> dict[str, float]:
        images = _samples(run)
        return {**classifier_figures(images), **memorisation_figures(images)}

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return self._figures(run)
