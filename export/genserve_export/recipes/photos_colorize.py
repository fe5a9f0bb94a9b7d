"""``pix2pix-colorize``: pix2pix (Isola et al. 2017) on grey → colour, the lecture's colourisation task.

The paired data is built from the bundled photos on the fly: the luma of a random crop is the
input, the crop itself the target. The generator is a U-Net; the loss is pix2pix's: a conditional
PatchGAN term plus λ = 100 × L1. L1 alone regresses to the median colour of everything that could
be there, which is grey-brown: the adversarial term is what pays for saturated colour.

The U-Net sees only the luma Y = 0.299 R + 0.587 G + 0.114 B of its RGB input and predicts the two
chroma channels (Cb, Cr of YCbCr); the output is Y with that chroma, so its brightness is the
input's exactly and only the colour is invented. Any RGB (or grey, repeated) photo may be sent.

The same run also trains the same U-Net with L1 alone for the same steps and exports it as an
auxiliary graph (``l1_only.onnx``): ``verify`` measures both from their ONNX files on the held-out
photos, so "the adversarial term sharpens" is a recomputed comparison, not a training-time claim.
Quality: held-out L1 against classical baselines (the grey input copied to RGB; the train photos'
mean chroma added to the grey), and colourfulness (Hasler & Süsstrunk 2003) and chroma gradient
energy as ratios to the real photos, for both graphs.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.data import photos
from genserve_export.recipe import ExportSpec, OnnxRun, aux_graph
from genserve_export.recipes._common import pick_device, progress_bar, seed_everything, torch_run

NAME = "pix2pix-colorize"
L1_ONLY_FILE = "l1_only.onnx"
SIZE_MULTIPLE = 16  # four stride-2 levels
WIDTH = 16
PATCH = 64
BATCH = 8
L1_WEIGHT = 100.0  # pix2pix's λ
EVAL_SEED = 2024
# BT.601 luma and the chroma scales that keep Cb, Cr within [-1, 1] for RGB in [-1, 1].
LUMA = (0.299, 0.587, 0.114)
CB_SCALE, CR_SCALE = 0.5 / (1 - LUMA[2]), 0.5 / (1 - LUMA[0])
# Colours that luma does not predict: a stained slide, a retina's fundus, false-colour astronomy.
# Trained on them (first run), the U-Net painted the held-out grace_hopper orange: held-out L1 0.0947
# against the mean-chroma baseline's 0.0939.
NOT_NATURAL = ("hubble_deep_field", "retina", "immunohistochemistry")
THRESHOLDS = {
    "l1_vs_grey": {"max": 1.0},
    "l1_vs_mean_chroma": {"max": 1.0},
    "chroma_gradient_gain_over_l1_only": {"min": 1.1},
    "colorfulness_gain_over_l1_only": {"min": 1.0},
}


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] → [N, 1, H, W], same range."""
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def chroma(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] → (Cb, Cr) [N, 2, H, W] in [-1, 1]."""
    y = luma(rgb)
    return torch.cat([CB_SCALE * (rgb[:, 2:3] - y), CR_SCALE * (rgb[:, 0:1] - y)], 1)


def to_rgb(y: torch.Tensor, cbcr: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] and chroma [N, 2, H, W] → RGB [N, 3, H, W] (the inverse of chroma())."""
    b = y + cbcr[:, 0:1] / CB_SCALE
    r = y + cbcr[:, 1:2] / CR_SCALE
    g = (y - LUMA[0] * r - LUMA[2] * b) / LUMA[1]
    return torch.cat([r, g, b], 1)


def to_rgb_in_gamut(y: torch.Tensor, cbcr: torch.Tensor) -> torch.Tensor:
    """``to_rgb`` with each pixel's chroma scaled toward grey just enough that R, G and B stay in
    [-1, 1]: the luma is kept exactly (clamping R, G, B instead would change it), only the
    saturation of a colour outside the RGB cube drops."""
    delta = to_rgb(y, cbcr) - y  # per channel, linear in the chroma
    eps = 1e-6
    room = torch.where(
        delta > eps,
        (1.0 - y) / delta.clamp(min=eps),
        torch.where(delta < -eps, (-1.0 - y) / delta.clamp(max=-eps), torch.ones_like(delta)),
    )
    scale = room.amin(dim=1, keepdim=True).clamp(0.0, 1.0)
    return y + scale * delta


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.LeakyReLU(0.2))


class ColorUNet(nn.Module):
    """image [N, 3, H, W] in [-1, 1] → image [N, 3, H, W] in [-1, 1] with the input's luma; H, W
    multiples of 16. Four stride-2 levels with skip concatenations (pix2pix's U-Net, shallower, 3×3
    convs); no normalisation layers, so a served output never depends on the batch it ran in."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        w = width
        self.inc = _conv(1, w)
        self.down1 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.down2 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))
        self.down3 = nn.Sequential(_conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w))
        self.down4 = nn.Sequential(_conv(8 * w, 8 * w, 2), _conv(8 * w, 8 * w))
        self.up4 = nn.ConvTranspose2d(8 * w, 8 * w, 2, 2)
        self.dec4 = _conv(16 * w, 4 * w)
        self.up3 = nn.ConvTranspose2d(4 * w, 4 * w, 2, 2)
        self.dec3 = _conv(8 * w, 2 * w)
        self.up2 = nn.ConvTranspose2d(2 * w, 2 * w, 2, 2)
        self.dec2 = _conv(4 * w, w)
        self.up1 = nn.ConvTranspose2d(w, w, 2, 2)
        self.dec1 = _conv(2 * w, w)
        self.out = nn.Conv2d(w, 2, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = luma(image)
        e0 = self.inc(y)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        e3 = self.down3(e2)
        e4 = self.down4(e3)
        x = self.dec4(torch.cat([self.up4(e4), e3], 1))
        x = self.dec3(torch.cat([self.up3(x), e2], 1))
        x = self.dec2(torch.cat([self.up2(x), e1], 1))
        x = self.dec1(torch.cat([self.up1(x), e0], 1))
        # in gamut, not clamped: clamping R, G, B would change the brightness the docs promise to keep
        out: torch.Tensor = to_rgb_in_gamut(y, torch.tanh(self.out(x))).clamp(-1.0, 1.0)
        return out


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN: (luma, chroma) → a map of real/fake logits, one per 70×70 patch
    (pix2pix's own receptive field)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 4 * width, 4, 1, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 1),
        )

    def forward(self, y: torch.Tensor, cbcr: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(torch.cat([y, cbcr], 1))
        return logits


# --- figures ---------------------------------------------------------------------------------


def _np_chroma(rgb01: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] → (Cb, Cr) [N, 2, H, W] in [-1, 1] units."""
    with torch.no_grad():
        out: np.ndarray = chroma(torch.from_numpy(rgb01 * 2.0 - 1.0)).numpy()
    return out


def grey_of(rgb01: np.ndarray) -> np.ndarray:
    """The luma of [N, 3, H, W] in [0, 1] repeated to three channels: the model input, the grey baseline."""
    y = LUMA[0] * rgb01[:, 0:1] + LUMA[1] * rgb01[:, 1:2] + LUMA[2] * rgb01[:, 2:3]
    return np.repeat(y, 3, axis=1).astype(np.float32)


def with_chroma(grey01: np.ndarray, cbcr: np.ndarray) -> np.ndarray:
    """Grey [N, 3, H, W] in [0, 1] with chroma [N, 2, H, W] (broadcastable) → RGB in [0, 1]."""
    y = torch.from_numpy(grey01[:, 0:1] * 2.0 - 1.0)
    c = torch.from_numpy(np.broadcast_to(cbcr, (y.shape[0], 2, *y.shape[2:])).astype(np.float32))
    with torch.no_grad():
        rgb = to_rgb(y, c).clamp(-1.0, 1.0).numpy()
    out: np.ndarray = (rgb + 1.0) / 2.0
    return out


def colorfulness(rgb01: np.ndarray) -> float:
    """Hasler & Süsstrunk's colourfulness of [1, 3, H, W] in [0, 1], on the 0-255 scale."""
    r, g, b = (rgb01[0, i] * 255.0 for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def chroma_gradient(rgb01: np.ndarray) -> float:
    """Mean absolute horizontal + vertical gradient of the chroma channels: colour edges."""
    c = _np_chroma(rgb01)
    return float(np.abs(np.diff(c, axis=3)).mean() + np.abs(np.diff(c, axis=2)).mean())


def _holdout() -> list[tuple[str, np.ndarray]]:
    """(name, [1, 3, H, W] in [0, 1]) per held-out colour photo, H and W multiples of 16."""
    return list(
        (p.name, np.ascontiguousarray(photos.center_crop(p.pixels, SIZE_MULTIPLE).transpose(2, 0, 1)[None]))
        for p in photos.holdout_photos()
        if p.color
    )


@functools.cache
def train_mean_chroma() -> tuple[float, float]:
    """Mean (Cb, Cr) over the natural colour train photos, each photo weighted equally."""
    means = [_np_chroma(p.pixels.transpose(2, 0, 1)[None].copy()).mean(axis=(0, 2, 3)) for p in _train_set()]
    cb, cr = np.mean(means, axis=0)
    return float(cb), float(cr)


def _train_set() -> list[photos.Photo]:
    return [p for p in photos.train_photos(color_only=True) if p.name not in NOT_NATURAL]


def _translate(run: OnnxRun, rgb01: np.ndarray) -> np.ndarray:
    out = run({"image": grey_of(rgb01) * 2.0 - 1.0})["output_image"]
    result: np.ndarray = (out + 1.0) / 2.0
    return result


def baseline_figures() -> dict[str, float]:
    """Held-out L1 (in [0, 1] pixel units) of the classical answers, and the real photos' colour."""
    mean_cbcr = np.array(train_mean_chroma(), dtype=np.float32).reshape(1, 2, 1, 1)
    grey, mean_c, color, grad = [], [], [], []
    for _, rgb in _holdout():
        g = grey_of(rgb)
        grey.append(float(np.abs(g - rgb).mean()))
        mean_c.append(float(np.abs(with_chroma(g, mean_cbcr) - rgb).mean()))
        color.append(colorfulness(rgb))
        grad.append(chroma_gradient(rgb))
    return {
        "grey_l1": float(np.mean(grey)),
        "mean_chroma_l1": float(np.mean(mean_c)),
        "real_colorfulness": float(np.mean(color)),
        "real_chroma_gradient": float(np.mean(grad)),
    }


def model_figures(run: OnnxRun) -> dict[str, float]:
    """Held-out L1, and colourfulness and chroma gradient as ratios to the real photos (mean over photos)."""
    l1, color, grad = [], [], []
    for _, rgb in _holdout():
        out = _translate(run, rgb)
        l1.append(float(np.abs(out - rgb).mean()))
        color.append(colorfulness(out) / max(colorfulness(rgb), 1e-6))
        grad.append(chroma_gradient(out) / max(chroma_gradient(rgb), 1e-9))
    return {
        "l1": float(np.mean(l1)),
        "colorfulness_ratio": float(np.mean(color)),
        "chroma_gradient_ratio": float(np.mean(grad)),
    }


def quality_figures(run: OnnxRun, l1_only: OnnxRun | None) -> dict[str, float]:
    base = baseline_figures()
    figures = {**model_figures(run), **base}
    figures["l1_vs_grey"] = figures["l1"] / base["grey_l1"]
    figures["l1_vs_mean_chroma"] = figures["l1"] / base["mean_chroma_l1"]
    if l1_only is not None:
        ablation = model_figures(l1_only)
        figures.update({f"l1_only_{k}": v for k, v in ablation.items()})
        figures["colorfulness_gain_over_l1_only"] = figures["colorfulness_ratio"] / max(
            ablation["colorfulness_ratio"], 1e-9
        )
        figures["chroma_gradient_gain_over_l1_only"] = figures["chroma_gradient_ratio"] / max(
            ablation["chroma_gradient_ratio"], 1e-9
        )
    return {k: round(v, 5) for k, v in figures.items()}


# --- training --------------------------------------------------------------------------------


def train_unet(
    *,
    seed: int,
    steps: int,
    device: str,
    progress: bool,
    adv_weight: float,
    train_set: Sequence[photos.Photo],
    label: str,
) -> tuple[ColorUNet, dict[str, float]]:
    """One U-Net, L1 (× λ) plus, when ``adv_weight`` > 0, the non-saturating conditional PatchGAN
    term; the same crops for any ``adv_weight`` (same seed). Returns it and its wall / CPU seconds."""
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    gen = ColorUNet().to(device)
    disc = PatchDiscriminator().to(device) if adv_weight > 0 else None
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999)) if disc is not None else None
    started, cpu_started = time.perf_counter(), time.process_time()
    bar = progress_bar(steps, label, progress)
    for _ in bar:
        target = torch.from_numpy(photos.random_crops(train_set, PATCH, BATCH, rng) * 2.0 - 1.0).to(device)
        y, real_c = luma(target), chroma(target)
        fake = gen(target)  # the U-Net reads only the luma of its input
        fake_c = chroma(fake)
        l1 = F.l1_loss(fake_c, real_c)
        loss_g = L1_WEIGHT * l1
        if disc is not None and opt_d is not None:
            loss_d = F.softplus(-disc(y, real_c)).mean() + F.softplus(disc(y, fake_c.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_d)
            opt_d.step()
            loss_g = loss_g + adv_weight * F.softplus(-disc(y, fake_c)).mean()
        opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_g)
        opt_g.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", refresh=False)
    took = {
        "duration_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(time.process_time() - cpu_started, 2),
    }
    return gen.cpu().eval(), took


def _export_l1_only_to(module: nn.Module, path: Path, example: np.ndarray) -> dict[str, Any]:
    """The L1-only U-Net as an ONNX graph written to `path` (not served; verify's comparison), and
    its card record."""
    from genserve_contract.repository import sha256_file
    from genserve_export.onnx_utils import (
        adapt,
        dynamic_shapes_for,
        graph_signature,
        optimize_offline,
        run_session,
        session,
        torch_export,
    )

    feeds = {"image": torch.from_numpy(example)}
    adapted = adapt(module, ["image"], ["output_image"])
    dynamic = dynamic_shapes_for(["image"], True, SIZE_MULTIPLE)
    raw = torch_export(adapted, feeds, dynamic, ["output_image"])
    optimize_offline(raw, path)
    sess = session(path)
    got = run_session(sess, {"image": example})["output_image"]
    with torch.no_grad():
        want = module(feeds["image"]).numpy()
    parity = float(np.abs(got - want).max())
    if parity > 1e-3:
        raise RuntimeError(f"{L1_ONLY_FILE} disagrees with PyTorch by {parity}")
    inputs, outputs = graph_signature(sess)
    record = {
        "sha256": sha256_file(path),
        "inputs": inputs,
        "outputs": outputs,
        "input_range": [-1.0, 1.0],
        "parity_max_abs_diff": parity,
        "role": "the same U-Net trained with L1 alone (no adversarial term), same steps, crops and seed; "
        "verify compares its colourfulness with the model's; not served",
    }
    return record


class PhotoColorizeRecipe:
    """Adam 2e-4 (β1 0.5) for G and D, batch 8 of 64×64 crops; the L1-only twin trained alongside."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 1200

    def __init__(self, adv_weight: float = 1.0) -> None:
        self.adv_weight = adv_weight  # pix2pix: 1 × GAN + 100 × L1

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        train_set = _train_set()
        common: dict[str, Any] = {"seed": seed, "steps": steps, "device": device, "progress": progress}
        gen, took = train_unet(**common, adv_weight=self.adv_weight, train_set=train_set, label=NAME)
        l1_gen, l1_took = train_unet(**common, adv_weight=0.0, train_set=train_set, label=f"{NAME} L1 only")
        quality = quality_figures(torch_run(gen, ("output_image",)), torch_run(l1_gen, ("output_image",)))
        example = (
            photos.random_crops(train_set, 32, 2, np.random.default_rng(seed), flip=False) * 2.0 - 1.0
        ).astype(np.float32)
        l1_only = copy.deepcopy(l1_gen)
        l1_graph, l1_record = aux_graph(L1_ONLY_FILE, lambda path: _export_l1_only_to(l1_only, path, example))
        params = sum(p.numel() for p in gen.parameters())
        return [
            ExportSpec(
                name=NAME,
                kind="image_to_image",
                module=gen,
                example_inputs={"image": example},
                card={
                    "recipe": NAME,
                    "description": "pix2pix colourisation: U-Net (L1 x 100 + conditional PatchGAN) that "
                    "colours the luma of an RGB image in [-1, 1]; the output keeps the input's brightness",
                    "input_range": [-1.0, 1.0],
                    "output_range": [-1.0, 1.0],
                    "size_multiple": SIZE_MULTIPLE,
                    "min_size": 16,
                    "parameters": params,
                    "aux_graphs": {L1_ONLY_FILE: l1_record},
                },
                config={"batching": {"max_batch_size": 16, "preferred_batch_sizes": [1, 4, 16]}},
                quality={
                    **quality,
                    "metric": "over the held-out colour photos (centre crops to multiples of 16), input = "
                    "their luma: mean absolute error in [0, 1] pixel units vs the grey input copied to RGB "
                    "and vs the grey plus the train photos' mean chroma; colourfulness (Hasler & "
                    "Suesstrunk) and mean chroma gradient as ratios to the real photo; l1_only_* = the "
                    f"same figures of {L1_ONLY_FILE}, the same U-Net trained with L1 alone",
                    "thresholds": THRESHOLDS,
                },
                holdout=photos.holdout_card(train_set, photos.holdout_photos()),
                training={
                    "data": photos.DATA_DESCRIPTION
                    + f"; natural colour train photos only (not {', '.join(NOT_NATURAL)}), "
                    f"random {PATCH}x{PATCH} "
                    "crops with flips/rotations; input = the crop's BT.601 luma, target = the crop",
                    "steps": steps,
                    "seed": seed,
                    **took,
                    "l1_only": l1_took,
                    "notes": f"pix2pix: {L1_WEIGHT:g} x L1 on chroma + {self.adv_weight:g} x non-saturating "
                    f"conditional PatchGAN loss; U-Net width {WIDTH}, 4 levels, no normalisation, predicts "
                    f"Cb/Cr from luma; Adam 2e-4 betas (0.5, 0.999) for G and D; batch {BATCH}; "
                    f"{L1_ONLY_FILE}: the same U-Net, steps and crops with L1 alone",
                    "adversarial_weight": self.adv_weight,
                },
                extra_files={L1_ONLY_FILE: l1_graph},
                fp16=False,
            )
        ]

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return quality_figures(run, None)

    def evaluate_with_siblings(
        self, name: str, card: Mapping[str, Any], run: OnnxRun, sibling: Callable[[str], OnnxRun | None]
    ) -> dict[str, float]:
        return quality_figures(run, sibling(f"{name}/{L1_ONLY_FILE}"))

    def grid_pairs(self, name: str, card: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Held-out 128×128 crops: their grey (the input) and the originals, both in [-1, 1]."""
        clean = photos.holdout_grid_crops(128)
        return grey_of(clean) * 2.0 - 1.0, clean * 2.0 - 1.0
