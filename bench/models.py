"""Bench-only models, exported through genserve-export's public API into a scratch repository.

The default models cover tiny (dcgan-digits, the VAE decoder) and compute-bound (SR) cases; the
issue's mid-size class (0.5-2 ms an image on 2 cores) is represented by ``dcgan-photos-256`` when
present and, always, by ``bench-dcgan-64``: the classic DCGAN 64x64 generator (Radford et al.,
z 100 -> 3x64x64, ngf 64) with random weights. Timing does not depend on the weights, and a fixed
torch seed makes the file (and so its sha256) the same on every run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from genserve_contract.kinds import Kind

BENCH_DCGAN_64 = "bench-dcgan-64"
# Served like the default models: one single-threaded instance per core (2 here), all cores when alone.
BENCH_DCGAN_64_INSTANCES = 2


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


def ensure_bench_dcgan_64(repo: Path, *, ngf: int = 64) -> Path:
    """Export the random-weight DCGAN 64x64 into ``repo`` unless it is already there; return its dir."""
    target = repo / BENCH_DCGAN_64
    if (target / "1" / "model.onnx").is_file():
        # Exported by an older bench or exporter: serve it with today's config, not the old one.
        from genserve_export.card import merge_config

        config_path = target / "config.json"
        wanted = merge_config(Kind.GENERATOR, {"instances": BENCH_DCGAN_64_INSTANCES})
        if json.loads(config_path.read_text()) != wanted:
            config_path.write_text(json.dumps(wanted, indent=2) + "\n")
        return target
    import numpy as np
    import torch

    from genserve_export import export_model

    torch.manual_seed(0)
    module = _dcgan64_module(ngf=ngf).eval()
    z = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
    repo.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GENSERVE_EXPORT_QUIET", "1")
    export_model(
        module,
        kind=Kind.GENERATOR,
        name=BENCH_DCGAN_64,
        out_dir=repo,
        example_inputs={"z": z},
        card={
            "description": "bench only: DCGAN 64x64 generator with random weights (timing stand-in)",
            "output_range": [-1.0, 1.0],
        },
        config={"instances": BENCH_DCGAN_64_INSTANCES},
        fp16=False,
        overwrite=True,
    )
    return target
