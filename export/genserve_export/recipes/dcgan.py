"""The DCGAN generator of ``dcgan-digits`` and its gates; the recipe is ``dcgan_mnist`` (real MNIST).

Until issue 17 ``dcgan-digits`` trained this generator (32 wide, with a spectral-norm
discriminator) on scikit-learn's 8×8 digits upsampled to 28×28 (min class 5.9 %, top-prob 0.89 by an
SVC on those digits); that recipe was removed when the MNIST one met the same gates
(export/README.md).
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "dcgan-digits"
LATENT_DIM = 64
WIDTH = 32  # the default width; dcgan_mnist trains it 64 wide
THRESHOLDS = {
    "min_class_fraction": {"min": 0.05},
    "mean_top_probability": {"min": 0.8},
    "memorised_fraction": {"max": 0.05},
}


class Generator(nn.Module):
    """z [N, 64] → image [N, 1, 28, 28] in [-1, 1]: Linear → width×7×7 → ConvT ×2 (BN, ReLU) → Tanh."""

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
