"""Quality figures for generated Fashion-MNIST images ([N, 1, 28, 28] in [0, 1]).

The same figures as ``digits_metrics`` with Fashion-MNIST's classifier. Memorisation compares
samples with all 60,000 training images; its reference distance (1st percentile of held-out →
train nearest-neighbour distances, see ``digits_metrics``) comes from the first 2,000 held-out
images, enough for a percentile and a fifth of the cost. Diversity compares each class's samples
with the held-out images of that class.
"""

from __future__ import annotations

import functools

import numpy as np

from genserve_export.data import fashion
from genserve_export.quality import digits_metrics
from genserve_export.quality.fashion_classifier import classifier

FASHION = digits_metrics.DigitSet(fashion.load, classifier)
REFERENCE_IMAGES = 2_000


def classifier_figures(images: np.ndarray, requested: np.ndarray | None = None) -> dict[str, float]:
    return digits_metrics.classifier_figures(images, requested, FASHION)


@functools.cache
def _reference_distance(source: str) -> float:
    data = fashion.load()
    distances = digits_metrics.nearest_distances(data.holdout_images[:REFERENCE_IMAGES], data.train_images)
    return float(np.percentile(distances, digits_metrics.MEMORISATION_REFERENCE_PERCENTILE))


def memorisation_figures(images: np.ndarray) -> dict[str, float]:
    """``memorised_fraction``: the share of samples nearer a training image than 99 % of real unseen ones."""
    reference = _reference_distance(str(fashion.data_dir()))
    sample_nn = digits_metrics.nearest_distances(images, fashion.load().train_images)
    return {
        "memorised_fraction": float((sample_nn < reference).mean()),
        "memorisation_reference_distance": reference,
        "median_sample_nn_distance": float(np.median(sample_nn)),
    }


def diversity_figures(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per class, mean pairwise L2 distance of samples over that of the held-out images of the class."""
    data = fashion.load()
    ratios = []
    for c in range(len(fashion.CLASS_NAMES)):
        fake = images[labels == c]
        if len(fake) < 2:
            ratios.append(0.0)
            continue
        real = data.holdout_images[data.holdout_labels == c]
        ratios.append(
            digits_metrics.mean_pairwise_distance(fake) / digits_metrics.mean_pairwise_distance(real)
        )
    return {"min_diversity_ratio": float(min(ratios)), "mean_diversity_ratio": float(np.mean(ratios))}
