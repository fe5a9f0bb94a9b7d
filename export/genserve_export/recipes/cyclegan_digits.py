"""``cyclegan-digits``: an unpaired two-way translator (CycleGAN) between two digit domains.

Domain A: scikit-learn's 8×8 digits (``data/sk_digits``), bicubic-upsampled to 20×20 and centred in
28×28 with a 4-pixel margin, MNIST's own framing, so that the two domains differ in writers, stroke
and blur, not in where the digit sits. Domain B: real MNIST (``data/digits``). The two training
splits are never paired: each step draws an independent batch from each.

Two small conv generators (28×28 gray, [0, 1] in and out: conv → stride-2 conv → 2 residual
blocks at 14×14 → upsample + conv → conv, instance norm), two PatchGAN discriminators (7×7
patches), LSGAN losses, cycle loss (λ 10) and identity loss (λ 5), as in Zhu et al. 2017.

Exported as one graph of kind ``two_way_translator``: ``image`` [N, 1, H, W] and ``direction``
int64 [N] (0 = A→B, 1 = B→A; every row of one call the same: the graph runs one generator, chosen
by row 0's direction, through an ONNX ``If``) → ``output_image``.

Semantic consistency (CyCADA, Hoffman et al. 2018): + 2 × the cross-entropy of a frozen classifier
of the TARGET domain on each translated digit against the source digit's label. Without it three runs
kept the cycle tight but failed the class gates (best 0.76 A→B, 0.64 B→A: CycleGAN keeps shape, and
scikit-learn's writers draw 1, 7 and 9 in shapes MNIST's classifier reads as other digits). The two
classifiers of that term (``semantic_net``: 5×5 convolutions, batch norm, dropout, seed 1) are fitted
inside the recipe to the training splits; they are never the scoring classifiers.

Quality (recomputed by ``verify`` from the ONNX graph on the held-out splits): class preservation
(a classifier of the TARGET domain agrees with the source digit's label: the project's MNIST CNN
for A→B, the same CNN architecture fitted to domain A's training split for B→A; both 3×3 CNNs of
seed 0 that took no part in training) and the cycle error A→B→A and B→A→B (mean absolute error in
[0, 1] pixel units). export/README.md, "CycleGAN", has the runs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import resource
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.data import digits as mnist
from genserve_export.data import sk_digits
from genserve_export.data.cache_file import cached_weights
from genserve_export.quality import digits_classifier
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import batches, pick_device, progress_bar, run_batched, seed_everything

logger = logging.getLogger(__name__)

NAME = "cyclegan-digits"
KIND = "two_way_translator"
DOMAINS = ("sklearn-digits", "mnist")
A_TO_B, B_TO_A = 0, 1
WIDTH = 16
BATCH = 16
LR = 2e-4
CYCLE_WEIGHT = 10.0
IDENTITY_WEIGHT = 5.0
SIZE_MULTIPLE = 2
FRAME_INNER = 20  # domain A's digit is upsampled to 20×20 and centred in 28×28, as MNIST's are
# Domain A's classifier: the digits CNN on its 1,437 training digits plus 4 seeded random affine
# copies of each (rotation, anisotropic scale, shear, shift), 3 epochs over the 5x set. Without the
# copies it read 46 % of untranslated MNIST digits (its domain's writers draw few slanted or thin
# digits), so B->A class preservation measured the classifier's brittleness more than the generator.
CLASSIFIER_COPIES = 4
CLASSIFIER_EPOCHS = 3
CLASSIFIER_VERSION = "cnn-v1"  # bump when domain A's scoring classifier changes (drops cached weights)
# CyCADA's semantic-consistency term: a translated digit must keep its label for a classifier of the
# target domain. Those classifiers (``semantic_net``) differ from verify's in architecture, seed and
# training and are never used to score the model.
SEMANTIC_WEIGHT = 2.0
SEMANTIC_EPOCHS = 2
SEMANTIC_SEED = 1
SEMANTIC_BATCHES_PER_STEP = 4  # caps their training at 4 batches per translator step (smoke runs stay cheap)
THRESHOLDS = {
    "class_preservation_a_to_b": {"min": 0.8},
    "class_preservation_b_to_a": {"min": 0.8},
    "cycle_l1_a": {"max": 0.1},
    "cycle_l1_b": {"max": 0.1},
}
DOMAIN_A_DESCRIPTION = (
    "domain A: scikit-learn load_digits() (1,797 8x8 digits) scaled to [0, 1], upsampled to 20x20 "
    "(torch bicubic, align_corners=False, clamped) and centred in 28x28 (MNIST's framing); its "
    "held-out split is data/sk_digits' (stratified 20%, random_state=0)"
)


# --------------------------------------------------------------------------- data


def frame_sk_digits(images_8x8: np.ndarray) -> np.ndarray:
    """[N, 8, 8] in [0, 16] → float32 [N, 1, 28, 28] in [0, 1], the digit 20×20 in the centre."""
    x = torch.from_numpy(np.asarray(images_8x8, dtype=np.float32) / 16.0)[:, None]
    up = F.interpolate(x, size=(FRAME_INNER, FRAME_INNER), mode="bicubic", align_corners=False)
    margin = (28 - FRAME_INNER) // 2
    framed = F.pad(up.clamp(0.0, 1.0), (margin, margin, margin, margin))
    return framed.numpy().astype(np.float32)


@functools.cache
def domain_a() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Domain A's (train images, train labels, held-out images, held-out labels)."""
    from sklearn.datasets import load_digits

    data = sk_digits.load()
    framed = frame_sk_digits(load_digits().images)
    return framed[data.train_idx], data.train_labels, framed[data.holdout_idx], data.holdout_labels


def affine_copies(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """``images`` followed by ``copies`` seeded random affine warps of each (rotation ±15°, x scale
    0.75-1.2, y scale 0.85-1.15, shear, shift ±10 %), bilinear, zeros outside."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    n = len(x)
    out = [x]
    for _ in range(copies):

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        angle, sx, sy = uniform(-0.26, 0.26), uniform(0.75, 1.2), uniform(0.85, 1.15)
        shear, dx, dy = uniform(-0.3, 0.3), uniform(-0.1, 0.1), uniform(-0.1, 0.1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos / sx, (shear - sin) / sx, dx], dim=1),
                torch.stack([sin / sy, cos / sy, dy], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out.append(F.grid_sample(x, grid, align_corners=False))
    return torch.cat(out).numpy()


@functools.cache
def domain_a_classifier() -> tuple[nn.Module, float]:
    """The project's digits CNN fitted to domain A's training split and its affine copies (seeded),
    and its held-out accuracy. Its weights are kept in the data cache folder (keyed by the training
    data, the recipe of the fit and torch's version), so that later runs skip the ~8 s of CPU."""
    train_x, train_y, hold_x, hold_y = domain_a()
    key = hashlib.sha256(
        f"{CLASSIFIER_VERSION}/{CLASSIFIER_COPIES}/{CLASSIFIER_EPOCHS}/{torch.__version__}".encode()
    )
    key.update(np.ascontiguousarray(train_x).tobytes())
    key.update(np.ascontiguousarray(train_y).tobytes())
    path = mnist.data_dir().parent / f"cyclegan-domain-a-classifier-{key.hexdigest()[:16]}.pt"

    def fit() -> nn.Module:
        images = affine_copies(train_x, CLASSIFIER_COPIES, seed=0)
        labels = np.tile(train_y, CLASSIFIER_COPIES + 1)
        return digits_classifier.fit_cnn(images, labels, epochs=CLASSIFIER_EPOCHS)

    net = cached_weights(path, digits_classifier.cnn().eval(), fit)  # a read-only folder: refit next time
    accuracy = float((_predict(net, hold_x) == hold_y).mean())
    return net, accuracy


def _predict(net: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = torch.cat([net(torch.from_numpy(images[i : i + 500])) for i in range(0, len(images), 500)])
    return logits.argmax(dim=1).numpy()


# --------------------------------------------------------------------------- networks


def semantic_net() -> nn.Module:
    """The training-time classifiers' net: 5×5 convolutions, batch norm and dropout (verify's CNN has
    3×3 convolutions and neither), so the generators cannot be tuned to verify's classifiers."""
    return nn.Sequential(
        nn.Conv2d(1, 12, 5, padding=2),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14×14
        nn.Conv2d(12, 24, 5, padding=2),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7×7
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(24 * 7 * 7, 10),
    )


def fit_semantic_net(
    images: np.ndarray, labels: np.ndarray, *, epochs: int, seed: int, max_batches: int
) -> nn.Module:
    """``semantic_net`` fitted to images [N, 1, 28, 28] in [0, 1] (seeded; ``epochs`` passes, at
    most ``max_batches`` batches of 64), frozen, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = semantic_net()
        x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        order = torch.Generator().manual_seed(seed)
        left = max_batches
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=order)
            for start in range(0, len(x), 64):
                if left == 0:
                    break
                left -= 1
                batch = perm[start : start + 64]
                loss = F.cross_entropy(net(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def semantic_classifiers(epochs: int, max_batches: int) -> tuple[nn.Module, nn.Module]:
    """(classifier of domain A, classifier of domain B) for the semantic term: training splits only,
    domain A with affine copies (seed 1) as for verify's, so that MNIST-shaped digits are in range."""
    train_a, labels_a = domain_a()[0], domain_a()[1]
    data_b = mnist.load()
    images_a = affine_copies(train_a, CLASSIFIER_COPIES, seed=SEMANTIC_SEED)
    net_a = fit_semantic_net(
        images_a,
        np.tile(labels_a, CLASSIFIER_COPIES + 1),
        epochs=epochs,
        seed=SEMANTIC_SEED,
        max_batches=max_batches,
    )
    net_b = fit_semantic_net(
        data_b.train_images, data_b.train_labels, epochs=epochs, seed=SEMANTIC_SEED, max_batches=max_batches
    )
    return net_a, net_b


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.InstanceNorm2d(width, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class Generator(nn.Module):
    """[N, 1, H, W] in [0, 1] → same shape in [0, 1] (H, W even): one stride-2 level."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        half = width // 2
        self.net = nn.Sequential(
            nn.Conv2d(1, half, 5, padding=2),
            nn.InstanceNorm2d(half, affine=True),
            nn.ReLU(),
            nn.Conv2d(half, width, 3, stride=2, padding=1),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(),
            ResidualBlock(width),
            ResidualBlock(width),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, half, 3, padding=1),
            nn.InstanceNorm2d(half, affine=True),
            nn.ReLU(),
            nn.Conv2d(half, 1, 5, padding=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


class PatchDiscriminator(nn.Module):
    """A 28×28 digit → 7×7 patch scores (LSGAN: 1 real, 0 fake)."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.InstanceNorm2d(2 * width, affine=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x * 2.0 - 1.0)
        return out


class TwoWayTranslator(nn.Module):
    """The exported graph: both generators, one run per call, chosen by ``direction[0]``."""

    def __init__(self, a_to_b: nn.Module, b_to_a: nn.Module) -> None:
        super().__init__()
        self.a_to_b = a_to_b
        self.b_to_a = b_to_a

    def forward(self, image: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        # torch.cond exports as an ONNX If: only the asked generator runs (the server batches rows
        # of one direction together, so row 0's direction is every row's). Eagerly (quality figures,
        # parity references) a plain branch gives the same result: torch.cond would compile each call
        # with dynamo (~3 s of CPU a call).
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            chosen = self.b_to_a if int(direction[0]) == B_TO_A else self.a_to_b
            eager: torch.Tensor = chosen(image)
            return eager
        result: torch.Tensor = torch.cond(
            direction[0] == B_TO_A, lambda x: self.b_to_a(x), lambda x: self.a_to_b(x), (image,)
        )
        return result


# --------------------------------------------------------------------------- training


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_generators(
    *, seed: int, steps: int, device: str, progress: bool
) -> tuple[Generator, Generator, dict[str, Any]]:
    """Train G_AB and G_BA (and their discriminators) from scratch; returns them in eval mode on the
    CPU and the training record's figures (steps, wall and CPU seconds, last losses)."""
    generator = seed_everything(seed)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    train_a, labels_a = torch.from_numpy(domain_a()[0]), torch.from_numpy(domain_a()[1])
    train_b = torch.from_numpy(mnist.load().train_images)
    labels_b = torch.from_numpy(mnist.load().train_labels)
    semantic_a, semantic_b = semantic_classifiers(SEMANTIC_EPOCHS, SEMANTIC_BATCHES_PER_STEP * steps)
    semantic_accuracy = {
        "semantic_classifier_holdout_accuracy_a": float(
            (_predict(semantic_a, domain_a()[2]) == domain_a()[3]).mean()
        ),
        "semantic_classifier_holdout_accuracy_b": float(
            (_predict(semantic_b, mnist.load().holdout_images) == mnist.load().holdout_labels).mean()
        ),
    }
    semantic_a, semantic_b = semantic_a.to(device), semantic_b.to(device)
    g_ab, g_ba = Generator().to(device), Generator().to(device)
    d_a, d_b = PatchDiscriminator().to(device), PatchDiscriminator().to(device)
    opt_g = torch.optim.Adam([*g_ab.parameters(), *g_ba.parameters()], lr=LR, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=LR, betas=(0.5, 0.999))
    # constant for the first half, then linearly to 0 (the CycleGAN schedule)
    decay = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: min(1.0, 2.0 * (1.0 - s / max(steps, 1))))
    decay_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: min(1.0, 2.0 * (1.0 - s / max(steps, 1))))
    order_a, order_b = batches(len(train_a), BATCH, generator), batches(len(train_b), BATCH, generator)
    losses: dict[str, float] = {}
    bar = progress_bar(steps, NAME, progress)
    for _ in bar:
        pick_a, pick_b = next(order_a), next(order_b)
        real_a, real_b = train_a[pick_a].to(device), train_b[pick_b].to(device)
        fake_b, fake_a = g_ab(real_a), g_ba(real_b)
        pred_fb, pred_fa = d_b(fake_b), d_a(fake_a)
        adv = F.mse_loss(pred_fb, torch.ones_like(pred_fb)) + F.mse_loss(pred_fa, torch.ones_like(pred_fa))
        cycle = F.l1_loss(g_ba(fake_b), real_a) + F.l1_loss(g_ab(fake_a), real_b)
        identity = F.l1_loss(g_ab(real_b), real_b) + F.l1_loss(g_ba(real_a), real_a)
        semantic = F.cross_entropy(semantic_b(fake_b), labels_a[pick_a].to(device)) + F.cross_entropy(
            semantic_a(fake_a), labels_b[pick_b].to(device)
        )
        loss_g = adv + CYCLE_WEIGHT * cycle + IDENTITY_WEIGHT * identity + SEMANTIC_WEIGHT * semantic
        opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_g)
        opt_g.step()
        loss_d = torch.zeros((), device=device)
        for disc, real, fake in ((d_b, real_b, fake_b), (d_a, real_a, fake_a)):
            pred_real, pred_fake = disc(real), disc(fake.detach())
            loss_d = loss_d + 0.5 * (
                F.mse_loss(pred_real, torch.ones_like(pred_real))
                + F.mse_loss(pred_fake, torch.zeros_like(pred_fake))
            )
        opt_d.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_d)
        opt_d.step()
        decay.step()
        decay_d.step()
        losses = {
            "adv": adv.item(),
            "cycle": cycle.item(),
            "identity": identity.item(),
            "semantic": semantic.item(),
            "d": loss_d.item(),
        }
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
    record = {
        "steps": steps,
        "duration_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(_cpu_seconds() - cpu_started, 2),
        "final_losses": {k: round(v, 4) for k, v in losses.items()},
        **{k: round(v, 5) for k, v in semantic_accuracy.items()},
    }
    return g_ab.cpu().eval(), g_ba.cpu().eval(), record


# --------------------------------------------------------------------------- quality


def translate_with(run: OnnxRun, images: np.ndarray, direction: int) -> np.ndarray:
    """``images`` through the exported graph (or its torch twin) in one direction, in chunks."""
    feeds = {"image": images, "direction": np.full(len(images), direction, np.int64)}
    return run_batched(run, feeds, "output_image")


def quality_figures(run: OnnxRun) -> dict[str, float]:
    """Class preservation both ways and the cycle errors, on both held-out splits."""
    _, _, hold_a, labels_a = domain_a()
    data_b = mnist.load()
    hold_b, labels_b = data_b.holdout_images, data_b.holdout_labels
    mnist_classifier = digits_classifier.classifier()
    a_classifier, a_accuracy = domain_a_classifier()
    a_to_b = translate_with(run, hold_a, A_TO_B)
    b_to_a = translate_with(run, hold_b, B_TO_A)
    a_back = translate_with(run, a_to_b, B_TO_A)
    b_back = translate_with(run, b_to_a, A_TO_B)
    figures = {
        "class_preservation_a_to_b": float(
            (mnist_classifier.probabilities(a_to_b).argmax(axis=1) == labels_a).mean()
        ),
        "class_preservation_b_to_a": float((_predict(a_classifier, b_to_a) == labels_b).mean()),
        "cycle_l1_a": float(np.abs(a_back - hold_a).mean()),
        "cycle_l1_b": float(np.abs(b_back - hold_b).mean()),
        "identity_l1_a_to_b": float(np.abs(a_to_b - hold_a).mean()),
        "identity_l1_b_to_a": float(np.abs(b_to_a - hold_b).mean()),
        # the classifiers on untranslated held-out digits of their own domain (the ceiling), and on
        # the other domain's untranslated digits (what translation must beat)
        "classifier_accuracy_b": float(mnist_classifier.holdout_accuracy),
        "classifier_accuracy_a": a_accuracy,
        "untranslated_a_by_b_classifier": float(
            (mnist_classifier.probabilities(hold_a).argmax(axis=1) == labels_a).mean()
        ),
        "untranslated_b_by_a_classifier": float((_predict(a_classifier, hold_b) == labels_b).mean()),
    }
    return {k: round(v, 5) for k, v in figures.items()}


def torch_translator_run(model: nn.Module) -> OnnxRun:
    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = model(torch.from_numpy(feeds["image"]), torch.from_numpy(feeds["direction"]))
        return {"output_image": out.numpy()}

    return run


def held_out_strip(count: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The first held-out digit of classes 0..count-1 of each domain (the docs' translation strip)."""
    _, _, hold_a, labels_a = domain_a()
    data_b = mnist.load()
    pick_a = [int(np.flatnonzero(labels_a == c)[0]) for c in range(count)]
    pick_b = [int(np.flatnonzero(data_b.holdout_labels == c)[0]) for c in range(count)]
    return hold_a[pick_a], data_b.holdout_images[pick_b]


# --------------------------------------------------------------------------- recipe


class CycleGanDigitsRecipe:
    """Adam 2e-4 (β1 0.5) for both pairs, constant then linear decay; batch 16 from each domain."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 1200

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        g_ab, g_ba, record = train_generators(seed=seed, steps=steps, device=device, progress=progress)
        return [self.spec(g_ab, g_ba, record, seed=seed)]

    def spec(self, g_ab: nn.Module, g_ba: nn.Module, record: Mapping[str, Any], *, seed: int) -> ExportSpec:
        model = TwoWayTranslator(g_ab, g_ba).eval()
        quality = quality_figures(torch_translator_run(model))
        example_a, example_b = held_out_strip(2)
        return ExportSpec(
            name=NAME,
            kind=KIND,
            module=model,
            example_inputs={
                "image": np.concatenate([example_a, example_b]),
                "direction": np.zeros(4, np.int64),
            },
            card={
                "recipe": NAME,
                "description": "CycleGAN digit translator (with CyCADA's semantic-consistency term): A = "
                "scikit-learn's 8x8 digits upsampled and framed like MNIST, B = real MNIST; gray 28x28 "
                "in [0, 1]",
                "domains": list(DOMAINS),
                "input_range": [0.0, 1.0],
                "output_range": [0.0, 1.0],
                "size_multiple": SIZE_MULTIPLE,
                "min_size": 8,
            },
            # Its 3x3 convolutions at 14x14 give other float bits for a lone row on 2+ intra-op
            # threads at some image sizes: the server's load check would drop the all-cores solo
            # session with a warning on every start (docs/server.md, "Rows alone or batched").
            config={"runtime": {"solo_session": False}},
            quality={
                **quality,
                "metric": "held-out splits of both domains (A: 360 digits, B: 2,000). class_preservation: "
                "share of translated digits a classifier of the TARGET domain labels as the source digit "
                "(A->B: the MNIST CNN of quality/digits_classifier; B->A: the same CNN fitted to domain "
                f"A's training split and {CLASSIFIER_COPIES} seeded random affine copies of each digit, "
                f"{CLASSIFIER_EPOCHS} epochs). untranslated_*: the target classifier on the source digits "
                "as they are (what translation must beat). cycle_l1: mean |x - G(F(x))| in [0, 1] "
                "pixel units (A->B->A and B->A->B); identity_l1: mean |G(x) - x|. The scoring classifiers "
                "were never used in training: the semantic term used two other nets (training.notes)",
                "thresholds": THRESHOLDS,
            },
            holdout={
                "a": {
                    "dataset": "sklearn.datasets.load_digits, framed 20x20 in 28x28",
                    "split": sk_digits.load().holdout_record()["split"],
                    "indices": [int(i) for i in sk_digits.load().holdout_idx],
                },
                "b": mnist.load().holdout_record(),
            },
            training={
                "data": DOMAIN_A_DESCRIPTION + "; domain B: " + mnist.DATA_DESCRIPTION + "; training "
                "splits only, unpaired (independent shuffles)",
                "seed": seed,
                "torch_threads": torch.get_num_threads(),
                **record,
                "notes": f"CycleGAN: LSGAN + {CYCLE_WEIGHT:g} x cycle L1 + {IDENTITY_WEIGHT:g} x identity "
                f"L1; generators width {WIDTH} (conv5 -> stride-2 conv -> 2 residual blocks at 14x14 -> "
                "upsample + conv -> conv5, instance norm, sigmoid); PatchGAN discriminators (7x7 patches); "
                f"Adam {LR:g} betas (0.5, 0.999), constant then linear decay to 0 over the second half; "
                f"batch {BATCH} per domain; CyCADA semantic consistency: + {SEMANTIC_WEIGHT:g} x "
                "cross-entropy of a frozen classifier of the TARGET domain on each translated digit "
                "against the source digit's label (both domains' training labels are used). Those two "
                "classifiers are NOT "
                "verify's: 5x5 convolutions (12, 24) with batch norm, dropout 0.3 and one linear layer, "
                f"Adam 2e-3, {SEMANTIC_EPOCHS} epochs, seed {SEMANTIC_SEED}, on the training splits only "
                f"(domain A with {CLASSIFIER_COPIES} affine copies of seed {SEMANTIC_SEED}); verify scores "
                "with the 3x3 CNNs of quality/digits_classifier (seed 0), which never saw a translated "
                "digit nor took part in training",
            },
            fp16=False,
        )

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return quality_figures(run)

    def strip_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """``verify --grids``: held-out digits 0-7 of domain A and of domain B."""
        return held_out_strip(8)
