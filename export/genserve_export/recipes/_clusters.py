"""Self-conditioning for unconditional generators (Liu et al. 2020, "Diverse Image Generation via
Self-Conditioned GANs"): no labels, but the training images' k-means clusters.

The training split is clustered once (k-means on raw pixels, seeded; the labels are never read).
The discriminator reads the cluster of each image (a real image's own cluster, a fake image's
sampled one), so a generator that drops a cluster is caught by D for that cluster: mode dropping
costs the generator directly, which plain unconditional D cannot express.

Served unconditionally: the generator draws its cluster from its own latent, ``z[:, 0]``, cut at
the standard normal quantiles of the clusters' cumulative sizes, so that z ~ N(0, I) picks cluster c
with the probability of a training image being in c (the data's mix). Inside the graph that is
``sum(z0 > thresholds)`` (Greater, Cast, ReduceSum): the exported model stays z → image.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm
from sklearn.cluster import KMeans
from torch import nn


def pixel_clusters(images: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each image int64 [N], cluster sizes int64 [k]): k-means on raw pixels (seeded)."""
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    fitted = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(flat)
    assignment = np.asarray(fitted.labels_, dtype=np.int64)
    return assignment, np.bincount(assignment, minlength=k).astype(np.int64)


def z_thresholds(sizes: np.ndarray) -> np.ndarray:
    """The k - 1 cut points on z0 ~ N(0, 1) that give cluster c probability sizes[c] / sum(sizes)."""
    cumulative = np.cumsum(sizes)[:-1] / float(np.sum(sizes))
    return np.asarray(norm.ppf(cumulative), dtype=np.float32)


class ClusterFromZ(nn.Module):
    """z [N, Z] → cluster int64 [N]: how many thresholds z[:, 0] exceeds."""

    def __init__(self, thresholds: np.ndarray) -> None:
        super().__init__()
        self.thresholds: torch.Tensor
        self.register_buffer("thresholds", torch.from_numpy(np.asarray(thresholds, dtype=np.float32)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        above = (z[:, :1] > self.thresholds[None, :]).to(torch.int64)
        return above.sum(dim=1)
