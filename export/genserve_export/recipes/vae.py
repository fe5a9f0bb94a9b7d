"""``vae-digits``: the lecture's fully connected VAE 784→400→20 with a diagonal Gaussian posterior.

Served as two entries: ``vae-digits-decoder`` (z → image) and ``vae-digits-encoder``
(image → mu, logvar). Reconstruction figures need both graphs, so they come from
``evaluate_with_siblings``; ``evaluate`` alone gives what one graph can tell.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.data import digits
from genserve_export.quality.digits_classifier import CLASSIFIER_DESCRIPTION, classifier
from genserve_export.quality.digits_metrics import classifier_figures
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import (
    EVAL_SEED,
    batches,
    once,
    pick_device,
    progress_bar,
    run_batched,
    seed_everything,
    torch_run,
)

LATENT_DIM = 20
HIDDEN = 400
PIXELS = digits.IMAGE_SIZE * digits.IMAGE_SIZE
DECODER, ENCODER = "vae-digits-decoder", "vae-digits-encoder"
EVAL_SAMPLES = 1000

EDIT_STEP = 1.0  # length of the latent edit (prior units) in the edit test
# Reconstruction well below the mean-image baseline, and held-out digits keep their class through
# encode -> decode (and through encode -> small edit -> decode) for the separate classifier.
PAIR_THRESHOLDS = {
    "recon_mse_ratio": {"max": 0.5},
    "recon_class_kept": {"min": 0.9},
    "edit_class_kept": {"min": 0.8},
}
# Confidence alone is a weak gate (an untrained decoder's one blurry blob can be read confidently
# as a single digit): class balance catches that. VAE samples of real MNIST are blurrier than GAN
# ones (the CNN's mean top probability ~0.74 vs ~0.9), and their class mix less even, so both floors
# are lower than the DCGAN's.
DECODER_THRESHOLDS = {
    **PAIR_THRESHOLDS,
    "mean_top_probability": {"min": 0.6},
    "min_class_fraction": {"min": 0.03},
}


class Encoder(nn.Module):
    """image [N, 1, 28, 28] in [0, 1] → (mu, logvar) [N, 20]."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(PIXELS, HIDDEN)
        self.mu = nn.Linear(HIDDEN, LATENT_DIM)
        self.logvar = nn.Linear(HIDDEN, LATENT_DIM)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.hidden(image.flatten(1)))
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """z [N, 20] → image [N, 1, 28, 28] in [0, 1] (sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(LATENT_DIM, HIDDEN)
        self.out = nn.Linear(HIDDEN, PIXELS)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.out(F.relu(self.hidden(z)))
        image = torch.sigmoid(logits).reshape(-1, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
        return image


def _holdout_codes(encode: OnnxRun) -> dict[str, np.ndarray]:
    """``encode``'s codes of the holdout digits, computed once per encoder run (the encoder's KL and
    the pair's figures read them)."""
    return once((encode,), "holdout codes", lambda: encode({"image": digits.load().holdout_images}))


def _pair_figures(encode: OnnxRun, decode: OnnxRun) -> dict[str, float]:
    """Held-out reconstruction MSE vs the mean-image baseline, and a seeded one-sample ELBO."""
    data = digits.load()
    held = data.holdout_images
    codes = _holdout_codes(encode)
    mu, logvar = codes["mu"].astype(np.float64), codes["logvar"].astype(np.float64)
    recon = decode({"z": mu.astype(np.float32)})["image"].astype(np.float64)
    recon_mse = float(((recon - held) ** 2).mean())
    baseline = float(((data.train_images.mean(axis=0, keepdims=True) - held) ** 2).mean())
    eps = np.random.default_rng(EVAL_SEED).standard_normal(mu.shape)
    z = (mu + np.exp(0.5 * logvar) * eps).astype(np.float32)
    p = np.clip(decode({"z": z})["image"].astype(np.float64), 1e-7, 1 - 1e-7)
    bce = -(held * np.log(p) + (1 - held) * np.log(1 - p)).reshape(len(held), -1).sum(axis=1)
    kl = -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(axis=1)
    # class kept: the classifier (trained on the training split, never on these) reads the true
    # label off the reconstruction, and off a reconstruction after a seeded random latent step
    clf, labels = classifier(), data.holdout_labels
    steps = np.random.default_rng(EVAL_SEED + 1).standard_normal(mu.shape)
    steps *= EDIT_STEP / np.linalg.norm(steps, axis=1, keepdims=True)
    edited = decode({"z": (mu + steps).astype(np.float32)})["image"]
    recon_answers = clf.probabilities(recon).argmax(axis=1)
    return {
        "recon_class_kept": float((recon_answers == labels).mean()),
        "edit_class_kept": float((clf.probabilities(edited).argmax(axis=1) == labels).mean()),
        "holdout_class_accuracy": clf.holdout_accuracy,
        "recon_mse": recon_mse,
        "baseline_mse": baseline,
        "recon_mse_ratio": recon_mse / baseline,
        "elbo": float(-(bce + kl).mean()),
        "holdout_kl": float(kl.mean()),
    }


def _sample_figures(decode: OnnxRun) -> dict[str, float]:
    z = np.random.default_rng(EVAL_SEED).standard_normal((EVAL_SAMPLES, LATENT_DIM)).astype(np.float32)
    images = run_batched(decode, {"z": z}, "image")
    return classifier_figures(images)


class VaeDigitsRecipe:
    """Train the VAE on the digits training split (BCE + KL, Adam 1e-3, batch 128)."""

    names: tuple[str, ...] = (DECODER, ENCODER)
    default_steps = 5000  # 80 epochs of 62 batches (8,000 training digits); 472 s at nice 19, loaded

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        generator = seed_everything(seed)
        data = digits.load()
        images = torch.from_numpy(data.train_images).to(device)
        encoder, decoder = Encoder().to(device), Decoder().to(device)
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
        order = batches(len(images), 128, generator)
        started = time.perf_counter()
        bar = progress_bar(steps, "vae-digits", progress)
        for _ in bar:
            x = images[next(order).to(device)]
            mu, logvar = encoder(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            p = decoder(z)
            bce = F.binary_cross_entropy(p, x, reduction="sum") / len(x)
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
            loss = bce + kl
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.1f}", refresh=False)
        duration = time.perf_counter() - started
        encoder, decoder = encoder.cpu().eval(), decoder.cpu().eval()
        encode, decode = torch_run(encoder, ("mu", "logvar")), torch_run(decoder, ("image",))
        pair = _pair_figures(encode, decode)
        training = {
            "data": digits.DATA_DESCRIPTION,
            "steps": steps,
            "duration_s": round(duration, 2),
            "seed": seed,
            "notes": "loss: per-image BCE (sum over pixels) + KL; Adam lr 1e-3, batch 128; "
            "one model trained, exported as two entries",
        }
        common_card = {"recipe": "vae-digits"}
        holdout = data.holdout_record()
        rng = np.random.default_rng(seed)
        return [
            ExportSpec(
                name=DECODER,
                kind="vae_decoder",
                module=decoder,
                example_inputs={"z": rng.standard_normal((4, LATENT_DIM)).astype(np.float32)},
                card={
                    **common_card,
                    "output_range": [0.0, 1.0],
                    "description": "VAE decoder (784-400-20, real MNIST 28x28): z ~ N(0, I) -> image",
                },
                quality={
                    **pair,
                    **_sample_figures(decode),
                    "classifier": CLASSIFIER_DESCRIPTION,
                    "thresholds": DECODER_THRESHOLDS,
                },
                holdout=holdout,
                training=dict(training),
            ),
            ExportSpec(
                name=ENCODER,
                kind="vae_encoder",
                module=encoder,
                example_inputs={"image": data.holdout_images[:4]},
                card={
                    **common_card,
                    "input_range": [0.0, 1.0],
                    "description": "VAE encoder (784-400-20, real MNIST 28x28): image -> mu, logvar",
                },
                quality={**pair, "thresholds": PAIR_THRESHOLDS},
                holdout=holdout,
                training=dict(training),
            ),
        ]

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        if name == DECODER:
            return _sample_figures(run)
        codes = _holdout_codes(run)
        kl = -0.5 * (1 + codes["logvar"] - codes["mu"] ** 2 - np.exp(codes["logvar"])).sum(axis=1)
        return {"holdout_kl": float(kl.mean())}

    def evaluate_with_siblings(
        self, name: str, card: Mapping[str, Any], run: OnnxRun, sibling: Callable[[str], OnnxRun | None]
    ) -> dict[str, float]:
        figures = self.evaluate(name, card, run)
        other = sibling(ENCODER if name == DECODER else DECODER)
        if other is not None:
            encode, decode = (other, run) if name == DECODER else (run, other)
            # the same pair of graphs for either entry: computed once (the first entry's verify)
            figures.update(once((encode, decode), "pair figures", lambda: _pair_figures(encode, decode)))
        return figures
