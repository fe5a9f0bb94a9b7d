"""``stylegan-digits``: a small style-based generator (StyleGAN's ideas) on real MNIST, 28×28.

Two repository entries, the two graphs the server works between (docs/model-repository.md,
"Style kinds"):

- ``stylegan-digits-mapping`` (kind ``style_mapping``): z [N, 32] → pixel norm → 4 × (Linear,
  LeakyReLU) → w [N, 64];
- ``stylegan-digits`` (kind ``style_generator``): ws [N, 5, 64] → a learned 7×7 constant → five
  styled 3×3 convolutions (7, 14, 14, 28, 28; nearest ×2 upsampling before the 2nd and 4th) with
  StyleGAN2's weight modulation and demodulation, per-layer noise, then a modulated 1×1 to gray and
  Tanh. Layer i takes ws[:, i]; the 1×1 takes the last. Its config.json names the mapping; its
  card carries ``w_avg`` (the mean w of 10,000 seeded z), the centre of truncation.

Demodulation without grouped convolutions (so the graph keeps a dynamic batch axis): modulating
the weights by s (per input channel) and demodulating by d (per output channel) equals scaling the
input by s, one shared convolution, and scaling the output by
d[n, o] = rsqrt(Σ_i s[n, i]² Σ_k W[o, i, k]² + ε).

**Noise is fixed**: each layer's noise image is drawn once at construction (seeded) and exported as
a constant, scaled by a learned per-channel strength, so an image is a pure function of its ws (the
server never feeds noise). Training uses the same fixed noise.

Training: non-saturating loss, spectral-norm discriminator (as dcgan-digits), Adam 5e-4 (β 0, 0.99)
with the mapping at 1/100 of it (StyleGAN), **style-mixing regularisation** (90 % of batches take
layers [c, 5) from a second z, c uniform in 1..4), EMA of both networks.

**Not good enough to register in ``RECIPES`` yet** (measured 2026-12-03, seed 0, 2 shared CPU cores,
figures from the card and ``verify``):

- lr 2e-3, no minibatch-stddev, 3,000 steps (11.7 min): D loss near 0 from step ~400; the exported
  generator collapsed to one image (pixel std across 500 samples 0.003, every sample class 3):
  ``min_class_fraction`` 0, mixing agreement coarse 1.0 = fine 1.0.
- lr 5e-4 and minibatch-stddev in D (this code), 1,500 steps (5.4 min): varied samples (pixel std
  0.18) but blobby; classes [130 14 40 104 26 0 0 27 55 104] of 500; ``min_class_fraction`` 0;
  mixing agreement coarse 0.228 vs **fine 0.572** (the fine layers, not the coarse, set the class);
  ONNX parity 7.2e-6 (mapping 3e-8), memorised 0.


Quality (``evaluate_with_siblings``, ONNX both graphs): classifier balance and memorisation of
1,000 seeded samples, and the **mixing figures**: for 500 seeded (coarse, fine) pairs mixed at
crossover 2, how often the classifier gives the mixed image the coarse seed's class and how often
the fine seed's (``mixing_coarse_agreement`` should far exceed ``mixing_fine_agreement``: the
coarse layers hold the digit's identity).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genserve_export.data import digits
from genserve_export.quality.digits_classifier import CLASSIFIER_DESCRIPTION, classifier
from genserve_export.quality.digits_metrics import classifier_figures, memorisation_figures
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import (
    EVAL_SEED,
    batches,
    pick_device,
    progress_bar,
    run_batched,
    seed_everything,
)

NAME = "stylegan-digits"
MAPPING_NAME = "stylegan-digits-mapping"
LATENT_DIM = 32
W_DIM = 64
CHANNELS = 32
NUM_LAYERS = 5  # styles: conv 7, conv 14 (after up), conv 14, conv 28 (after up), conv 28 (+ the 1x1)
UPSAMPLE_BEFORE = (1, 3)
MIXING_PROBABILITY = 0.9
MIX_CROSSOVER = 2  # the quality figures' crossover: layers 0-1 (7x7 and the first 14x14) are coarse
W_AVG_SAMPLES = 10_000
EVAL_SAMPLES = 1000
MIX_PAIRS = 500
# 2e-3 (StyleGAN2's) drove the discriminator loss to 0 within 700 steps here (measured, 2026-12-03).
LEARNING_RATE = 5e-4
THRESHOLDS = {
    "min_class_fraction": {"min": 0.05},
    "memorised_fraction": {"max": 0.05},
    "mixing_agreement_margin": {"min": 0.3},
}


class MappingNetwork(nn.Module):
    """z [N, Z] → w [N, w_dim]: pixel norm, then 4 × (Linear, LeakyReLU 0.2)."""

    def __init__(self, latent_dim: int = LATENT_DIM, w_dim: int = W_DIM, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, w_dim), nn.LeakyReLU(0.2)]
            width = w_dim
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        w: torch.Tensor = self.net(z)
        return w


class StyledConv(nn.Module):
    """A 3×3 (or 1×1) convolution modulated by a style from w, demodulated (StyleGAN2), plus fixed
    noise scaled per channel, bias and LeakyReLU (the 1×1 to gray: no demodulation, no noise)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, w_dim: int, side: int, *, to_image: bool, noise_seed: int
    ) -> None:
        super().__init__()
        self.to_image = to_image
        self.affine = nn.Linear(w_dim, c_in)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the identity modulation
        self.weight = nn.Parameter(
            torch.randn(c_out, c_in, kernel, kernel) / math.sqrt(c_in * kernel * kernel)
        )
        self.bias = nn.Parameter(torch.zeros(1, c_out, 1, 1))
        generator = torch.Generator().manual_seed(noise_seed)
        self.noise: torch.Tensor
        self.register_buffer("noise", torch.randn(1, 1, side, side, generator=generator))
        self.noise_strength = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # [N, c_in]
        x = x * s[:, :, None, None]
        x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
        if self.to_image:
            return x + self.bias
        # d[n, o] = rsqrt(sum_i s[n, i]^2 * sum_k W[o, i, k]^2): the demodulation, as a matmul.
        d = torch.rsqrt(s.pow(2) @ self.weight.pow(2).sum(dim=(2, 3)).t() + 1e-8)
        x = x * d[:, :, None, None] + self.noise_strength * self.noise + self.bias
        return F.leaky_relu(x, 0.2)


class Synthesis(nn.Module):
    """ws [N, num_layers, w_dim] → image [N, 1, 28, 28] in [-1, 1]."""

    def __init__(self, w_dim: int = W_DIM, channels: int = CHANNELS) -> None:
        super().__init__()
        self.const = nn.Parameter(torch.randn(1, channels, 7, 7))
        sides = (7, 14, 14, 28, 28)
        self.convs = nn.ModuleList(
            StyledConv(channels, channels, 3, w_dim, side, to_image=False, noise_seed=i)
            for i, side in enumerate(sides)
        )
        self.to_gray = StyledConv(channels, 1, 1, w_dim, 28, to_image=True, noise_seed=len(sides))

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.const.expand(ws.shape[0], -1, -1, -1)  # shape[0], not len(): a dynamic batch axis
        for i, conv in enumerate(self.convs):
            if i in UPSAMPLE_BEFORE:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = conv(x, ws[:, i])
        image: torch.Tensor = torch.tanh(self.to_gray(x, ws[:, NUM_LAYERS - 1]))
        return image


class Generator(nn.Module):
    """Both networks, trained (and averaged) together."""

    def __init__(self) -> None:
        super().__init__()
        self.mapping = MappingNetwork()
        self.synthesis = Synthesis()

    def styles(self, z: torch.Tensor, z_mix: torch.Tensor | None, crossover: int) -> torch.Tensor:
        """ws for a batch: every layer from z, or layers [crossover, L) from z_mix."""
        w: torch.Tensor = self.mapping(z)
        ws = w[:, None, :].expand(-1, NUM_LAYERS, -1)
        if z_mix is None:
            return ws
        w2 = self.mapping(z_mix)[:, None, :].expand(-1, NUM_LAYERS - crossover, -1)
        assert isinstance(w2, torch.Tensor)
        return torch.cat([ws[:, :crossover], w2], dim=1)


class Discriminator(nn.Module):
    """image → one logit: spectral-norm strided convolutions (as dcgan-digits), plus StyleGAN's
    minibatch standard deviation channel before the last layer (a 3,000-step run without it
    collapsed to one image for every z, measured 2026-12-03)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)),
            nn.LeakyReLU(0.2),
        )
        self.head = spectral_norm(nn.Linear((2 * width + 1) * 7 * 7, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.features(image)
        spread = x.std(dim=0).mean().expand(x.shape[0], 1, *x.shape[2:])  # low when samples look alike
        logits: torch.Tensor = self.head(torch.cat([x, spread], dim=1).flatten(1))
        return logits.squeeze(1)


def _ema_update(average: nn.Module, live: nn.Module, step: int, decay: float = 0.999) -> None:
    decay = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for avg, param in zip(average.parameters(), live.parameters(), strict=True):
            avg.lerp_(param, 1.0 - decay)


def mean_w(run_mapping: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The mean w of W_AVG_SAMPLES seeded z (float32 [w_dim])."""
    z = np.random.default_rng(EVAL_SEED).standard_normal((W_AVG_SAMPLES, LATENT_DIM)).astype(np.float32)
    w = run_mapping(z)
    return np.asarray(w.mean(axis=0), dtype=np.float32)


def _broadcast(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(w[:, None, :], NUM_LAYERS, axis=1), dtype=np.float32)


def style_figures(mapping: OnnxRun, synthesis: OnnxRun) -> dict[str, float]:
    """Sample balance and memorisation, and the style-mixing agreement figures (module docs)."""
    rng = np.random.default_rng(EVAL_SEED)
    z = rng.standard_normal((EVAL_SAMPLES, LATENT_DIM)).astype(np.float32)
    w = run_batched(mapping, {"z": z}, "w")
    images = (run_batched(synthesis, {"ws": _broadcast(w)}, "image") + 1.0) / 2.0
    figures = {**classifier_figures(images), **memorisation_figures(images)}
    coarse, fine = w[:MIX_PAIRS], w[MIX_PAIRS : 2 * MIX_PAIRS]
    ws = _broadcast(coarse)
    ws[:, MIX_CROSSOVER:] = fine[:, None, :]
    mixed = (run_batched(synthesis, {"ws": ws}, "image") + 1.0) / 2.0
    clf = classifier()
    classes = [clf.probabilities(x).argmax(axis=1) for x in (mixed, images[:MIX_PAIRS], images[MIX_PAIRS:])]
    coarse_agree = float((classes[0] == classes[1]).mean())
    fine_agree = float((classes[0] == classes[2]).mean())
    figures.update(
        mixing_coarse_agreement=coarse_agree,
        mixing_fine_agreement=fine_agree,
        mixing_agreement_margin=coarse_agree - fine_agree,
    )
    return figures


def _torch_run(module: nn.Module, output: str) -> OnnxRun:
    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            value = module(*(torch.from_numpy(np.asarray(v)) for v in feeds.values()))
        return {output: value.cpu().numpy()}

    return run


class StyleganDigitsRecipe:
    """Both graphs from one training run; ``evaluate_with_siblings`` needs the mapping's ONNX."""

    names: tuple[str, ...] = (MAPPING_NAME, NAME)
    default_steps = 4000  # untuned (module docs: the measured runs)

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        order_gen = seed_everything(seed)
        data = digits.load()
        real_all = torch.from_numpy(data.train_images * 2.0 - 1.0).to(device)
        gen, disc = Generator().to(device), Discriminator().to(device)
        lr = LEARNING_RATE
        opt_g = torch.optim.Adam(
            [
                {"params": gen.mapping.parameters(), "lr": lr * 0.01},
                {"params": gen.synthesis.parameters(), "lr": lr},
            ],
            betas=(0.0, 0.99),
        )
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.0, 0.99))
        average = copy.deepcopy(gen).eval().requires_grad_(False)
        order = batches(len(real_all), 64, order_gen)
        mix_rng = np.random.default_rng(seed)
        started = time.perf_counter()
        bar = progress_bar(steps, NAME, progress)
        for step in bar:
            real = real_all[next(order).to(device)]
            z = torch.randn(len(real), LATENT_DIM, device=device)
            mixing = mix_rng.random() < MIXING_PROBABILITY
            z_mix = torch.randn(len(real), LATENT_DIM, device=device) if mixing else None
            fake = gen.synthesis(gen.styles(z, z_mix, int(mix_rng.integers(1, NUM_LAYERS))))
            loss_d = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_d)
            opt_d.step()
            loss_g = F.softplus(-disc(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_g)
            opt_g.step()
            _ema_update(average, gen, step)
            bar.set_postfix(d=f"{loss_d.item():.2f}", g=f"{loss_g.item():.2f}", refresh=False)
        exported = average.cpu()
        duration = time.perf_counter() - started
        w_avg = mean_w(lambda z: exported.mapping(torch.from_numpy(z)).detach().numpy())
        quality = style_figures(_torch_run(exported.mapping, "w"), _torch_run(exported.synthesis, "image"))
        example_rng = np.random.default_rng(seed)
        training = {
            "data": digits.DATA_DESCRIPTION + "; training split only, scaled to [-1, 1]",
            "steps": steps,
            "seed": seed,
            "duration_s": round(duration, 2),
            "notes": f"non-saturating GAN loss; Adam {LEARNING_RATE:g} betas (0, 0.99), mapping at 1/100; "
            "batch 64; "
            f"style mixing regularisation p={MIXING_PROBABILITY}; fixed per-layer noise; exported "
            "weights: EMA (decay 0.999) of mapping and synthesis",
        }
        mapping_spec = ExportSpec(
            name=MAPPING_NAME,
            kind="style_mapping",
            module=exported.mapping,
            example_inputs={"z": example_rng.standard_normal((4, LATENT_DIM)).astype(np.float32)},
            card={
                "recipe": NAME,
                "description": f"{NAME}'s mapping network: z of {LATENT_DIM} -> w of {W_DIM}",
            },
            training=training,
        )
        synthesis_spec = ExportSpec(
            name=NAME,
            kind="style_generator",
            module=exported.synthesis,
            example_inputs={"ws": example_rng.standard_normal((4, NUM_LAYERS, W_DIM)).astype(np.float32)},
            card={
                "recipe": NAME,
                "description": "style-based generator (StyleGAN2-style modulation, fixed noise), MNIST 28x28 "
                f"gray; {NUM_LAYERS} styles of w {W_DIM} from {MAPPING_NAME}",
                "output_range": [-1.0, 1.0],
                "latent_dim": LATENT_DIM,
                "w_avg": [float(v) for v in w_avg],
            },
            config={"mapping": MAPPING_NAME},
            quality={
                **quality,
                "classifier": CLASSIFIER_DESCRIPTION,
                "samples": EVAL_SAMPLES,
                "mix_pairs": MIX_PAIRS,
                "mix_crossover": MIX_CROSSOVER,
                "thresholds": THRESHOLDS,
            },
            holdout=data.holdout_record(),
            training=training,
        )
        return [mapping_spec, synthesis_spec]

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return {}  # the generator's figures need its mapping: evaluate_with_siblings

    def evaluate_with_siblings(
        self, name: str, card: Mapping[str, Any], run: OnnxRun, sibling: Callable[[str], OnnxRun | None]
    ) -> dict[str, float]:
        if name == MAPPING_NAME:
            return {}
        mapping = sibling(MAPPING_NAME)
        if mapping is None:
            raise FileNotFoundError(f"{NAME}'s quality needs {MAPPING_NAME} in the same repository")
        return style_figures(mapping, run)
