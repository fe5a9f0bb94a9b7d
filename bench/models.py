"""Bench-only models, exported through genserve-export's public API into a scratch repository.

The default models cover tiny (dcgan-digits, the VAE decoder) and compute-bound (SR) cases; the
issue's mid-size class (0.5-2 ms an image on 2 cores) is represented by two generators with random
weights: ``bench-dcgan-64``, the classic DCGAN 64x64 generator (Radford et al., z 100 -> 3x64x64,
ngf 64), and ``bench-dcgan-256``, a large 256x256 RGB generator (z 128, 2.36 M parameters, ~10^8
multiply-adds and 196,608 floats an image) for large payloads and heavy load. The default
repository has no generator of that size: the trained one it had (``dcgan-photos-256``) produced
the same colour noise for every seed, so it left (issue 18). ``bench-cgan-resnet-32`` is the slow
class-conditional model of issue 20's table: an SNGAN/BigGAN-style ResNet generator for 32x32 RGB with
conditional batch norm (z 128, 10 classes, 256 channels, three upsampling residual blocks; ~30 ms an
image on one core here), where a saturated server's tail was worst; it is built only when named
(``--models bench-cgan-resnet-32``), as a run at its ~60 images/s takes minutes. Timing does not
depend on the weights, and a fixed torch seed makes each file (and so its sha256) the same on every run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.common import SCRATCH
from genserve_contract.kinds import Kind

BENCH_DCGAN_64 = "bench-dcgan-64"
# Served like the default models: one single-threaded instance per core (2 here), all cores when alone.
BENCH_DCGAN_64_INSTANCES = 2
BENCH_DCGAN_256 = "bench-dcgan-256"
DCGAN_256_LATENT = 128
DCGAN_256_CHANNELS = (384, 192, 96, 48, 24, 12)  # 4x4 -> 128x128; a last ConvT makes 256x256x3
# The serving config the trained 256x256 generator had, so earlier figures stay comparable.
BENCH_DCGAN_256_CONFIG: dict[str, Any] = {
    "instances": 2,
    "batching": {
        "max_batch_size": 16,
        "max_queue_delay_s": 0.004,
        "preferred_batch_sizes": [1, 4, 16],
        "max_queue_size": 1024,
    },
}
BENCH_CGAN_RESNET_32 = "bench-cgan-resnet-32"
CGAN_RESNET_LATENT = 128
CGAN_RESNET_CLASSES = 10
# Built by bench.run only when named: bench-dcgan-64 and bench-dcgan-256 are the every-run models.
BENCH_ON_REQUEST = frozenset({BENCH_CGAN_RESNET_32})


def _dcgan64_module(latent_dim: int = 100, ngf: int = 64):  # type: ignore[no-untyped-def]
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (latent_dim, 1, 1)),
        nn.ConvTranspose2d(latent_dim, ngf * 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False),
        nn.Tanh(),
    )


def _dcgan256_module():  # type: ignore[no-untyped-def]
    from torch import nn

    first = DCGAN_256_CHANNELS[0]
    layers: list[nn.Module] = [
        nn.Linear(DCGAN_256_LATENT, first * 4 * 4, bias=False),
        nn.Unflatten(1, (first, 4, 4)),
        nn.BatchNorm2d(first),
        nn.ReLU(),
    ]
    for c_in, c_out in zip(DCGAN_256_CHANNELS[:-1], DCGAN_256_CHANNELS[1:], strict=True):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    layers += [nn.ConvTranspose2d(DCGAN_256_CHANNELS[-1], 3, 4, 2, 1), nn.Tanh()]
    # He-normal weights: PyTorch's default init shrinks the signal layer by layer to a flat image,
    # which PNG would compress unrealistically well; these keep per-pixel variation like a photo's.
    for layer in layers:
        if isinstance(layer, nn.ConvTranspose2d):  # each output pixel sums in_channels x (4/2)^2 terms
            nn.init.normal_(layer.weight, 0.0, (2.0 / (layer.in_channels * 4)) ** 0.5)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, (1.0 / layer.in_features) ** 0.5)
    return nn.Sequential(*layers)


def _cgan_resnet32_module(channels: int = 256):  # type: ignore[no-untyped-def]
    """The CIFAR-10 generator of SNGAN / BigGAN (Miyato & Koyama 2018; Brock et al. 2019): z -> 4x4,
    three residual blocks that each upsample x2 with a class-conditional batch norm (per-class gain
    and bias from embeddings) before each 3x3 conv, then BN, ReLU, a 3x3 conv to RGB and tanh."""
    import torch
    from torch import nn
    from torch.nn import functional

    class ConditionalBatchNorm(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(ch, affine=False)
            self.gain = nn.Embedding(CGAN_RESNET_CLASSES, ch)
            self.bias = nn.Embedding(CGAN_RESNET_CLASSES, ch)
            nn.init.normal_(self.gain.weight, 1.0, 0.1)  # labels must reach the pixels
            nn.init.normal_(self.bias.weight, 0.0, 0.1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]
            return out

    class UpBlock(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.bn1, self.bn2 = ConditionalBatchNorm(ch), ConditionalBatchNorm(ch)
            self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1), nn.Conv2d(ch, ch, 3, 1, 1)
            self.shortcut = nn.Conv2d(ch, ch, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = functional.interpolate(functional.relu(self.bn1(x, y)), scale_factor=2.0, mode="nearest")
            h = self.conv2(functional.relu(self.bn2(self.conv1(h), y)))
            out: torch.Tensor = h + self.shortcut(functional.interpolate(x, scale_factor=2.0, mode="nearest"))
            return out

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(CGAN_RESNET_LATENT, 4 * 4 * channels)
            self.blocks = nn.ModuleList([UpBlock(channels) for _ in range(3)])
            self.bn = nn.BatchNorm2d(channels)
            self.to_rgb = nn.Conv2d(channels, 3, 3, 1, 1)

        def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            h = self.linear(z).view(-1, channels, 4, 4)
            for block in self.blocks:
                h = block(h, label)
            return torch.tanh(self.to_rgb(functional.relu(self.bn(h))))

    return Generator()


def _ensure_random_generator(
    repo: Path,
    name: str,
    build: Callable[[], Any],
    latent_dim: int,
    description: str,
    config: dict[str, Any],
    *,
    kind: Kind = Kind.GENERATOR,
) -> Path:
    """Export a random-weight generator into ``repo`` unless it is already there; return its dir.
    A conditional one (`kind`) takes labels 0-9 and names its classes "class 0" to "class 9"."""
    target = repo / name
    if (target / "1" / "model.onnx").is_file():
        # Exported by an older bench or exporter: serve it with today's config, not the old one.
        from genserve_export.card import merge_config

        config_path = target / "config.json"
        wanted = merge_config(kind, config)
        if json.loads(config_path.read_text()) != wanted:
            config_path.write_text(json.dumps(wanted, indent=2) + "\n")
        return target
    import numpy as np
    import torch

    from genserve_export import export_model

    torch.manual_seed(0)
    module = build().eval()
    z = np.random.default_rng(0).standard_normal((4, latent_dim)).astype(np.float32)
    example: dict[str, Any] = {"z": z}
    card: dict[str, Any] = {"description": description, "output_range": [-1.0, 1.0]}
    if kind.conditional:
        example["label"] = np.arange(4, dtype=np.int64)
        card["class_names"] = [f"class {i}" for i in range(CGAN_RESNET_CLASSES)]
    repo.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GENSERVE_EXPORT_QUIET", "1")
    export_model(
        module,
        kind=kind,
        name=name,
        out_dir=repo,
        example_inputs=example,
        card=card,
        config=config,
        fp16=False,
        overwrite=True,
    )
    return target


def ensure_bench_dcgan_64(repo: Path, *, ngf: int = 64) -> Path:
    """Export the random-weight DCGAN 64x64 into ``repo`` unless it is already there; return its dir."""
    return _ensure_random_generator(
        repo,
        BENCH_DCGAN_64,
        lambda: _dcgan64_module(ngf=ngf),
        100,
        "bench only: DCGAN 64x64 generator with random weights (timing stand-in)",
        {"instances": BENCH_DCGAN_64_INSTANCES},
    )


def ensure_bench_dcgan_256(repo: Path) -> Path:
    """Export the random-weight 256x256 generator into ``repo`` unless it is already there."""
    return _ensure_random_generator(
        repo,
        BENCH_DCGAN_256,
        _dcgan256_module,
        DCGAN_256_LATENT,
        "bench only: large DCGAN generator, 256x256 RGB, with random weights (payload and load stand-in)",
        BENCH_DCGAN_256_CONFIG,
    )


def ensure_bench_cgan_resnet_32(repo: Path, *, channels: int = 256) -> Path:
    """Export the random-weight ResNet cGAN 32x32 into ``repo`` unless it is already there."""
    return _ensure_random_generator(
        repo,
        BENCH_CGAN_RESNET_32,
        lambda: _cgan_resnet32_module(channels),
        CGAN_RESNET_LATENT,
        "bench only: ResNet class-conditional GAN generator (conditional BN), 32x32 RGB, 10 classes, "
        "random weights (the slow conditional model of issue 20)",
        {"instances": BENCH_DCGAN_64_INSTANCES},
        kind=Kind.CONDITIONAL_GENERATOR,
    )


BENCH_ONLY: dict[str, Callable[[Path], Path]] = {
    BENCH_DCGAN_64: ensure_bench_dcgan_64,
    BENCH_DCGAN_256: ensure_bench_dcgan_256,
    BENCH_CGAN_RESNET_32: ensure_bench_cgan_resnet_32,
}


def model_dir(models_dir: Path, name: str) -> Path:
    """Where model ``name`` lives: in ``models_dir``, or, for a bench-only model not there, exported
    (once) into the bench's scratch folder."""
    if (models_dir / name).is_dir() or name not in BENCH_ONLY:
        return models_dir / name
    return BENCH_ONLY[name](SCRATCH / "generated")


def link_repository(models_dir: Path, names: Iterable[str], into: Path) -> Path:
    """A model repository of links to ``names``, found by :func:`model_dir`."""
    into.mkdir(parents=True, exist_ok=True)
    for name in names:
        (into / name).symlink_to(model_dir(models_dir, name).resolve(), target_is_directory=True)
    return into
