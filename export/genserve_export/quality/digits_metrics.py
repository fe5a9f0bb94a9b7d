"""Quality figures for generated digits (all images [N, 1, 28, 28] in [0, 1]).

Memorisation is measured against how far *real unseen* digits lie from the training set: let
``d_ref`` be the 1st percentile of held-out→train nearest-neighbour L2 distances. A sample closer
to a training image than ``d_ref`` is closer than 99% of real held-out digits ever get, i.e. a
near-copy. ``memorised_fraction`` is the share of samples below ``d_ref``; a perfect generator
(another draw from the data distribution) scores about 0.01, a copying one about 1. (A median
reference would be unsound: an ideal generator would put half of its samples below it.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from genserve_export.data import digits
from genserve_export.quality.digits_classifier import classifier

MEMORISATION_REFERENCE_PERCENTILE = 1.0


class DigitSet(NamedTuple):
    """Where the figures come from: the data set's loader (train/held-out split) and its classifier."""

    load: Callable[[], Any]
    classifier: Callable[[], Any]


MNIST = DigitSet(digits.load, classifier)


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1)


def nearest_distances(queries: np.ndarray, references: np.ndarray, chunk: int = 500) -> np.ndarray:
    """L2 distance from each query image to its nearest reference image.

    Queries go in chunks so that a large reference set (Fashion-MNIST's 60,000) needs no
    queries × references matrix at once.
    """
    q, r = _flat(queries), _flat(references)
    r_squared = (r * r).sum(1)[None, :]
    parts = []
    for start in range(0, len(q), chunk):
        part = q[start : start + chunk]
        squared = (part * part).sum(1)[:, None] - 2.0 * part @ r.T + r_squared
        parts.append(np.sqrt(np.maximum(squared.min(axis=1), 0.0)))
    distances: np.ndarray = np.concatenate(parts) if parts else np.zeros(0)
    return distances


def classifier_figures(
    images: np.ndarray, requested: np.ndarray | None = None, digit_set: DigitSet = MNIST
) -> dict[str, float]:
    """Class balance and confidence of the classifier's answers (and accuracy vs ``requested``)."""
    clf = digit_set.classifier()
    probs = clf.probabilities(images)
    answers = probs.argmax(axis=1)
    counts = np.bincount(answers, minlength=10) / len(answers)
    figures = {
        "classifier_holdout_accuracy": clf.holdout_accuracy,
        "min_class_fraction": float(counts.min()),
        "mean_top_probability": float(probs.max(axis=1).mean()),
    }
    if requested is not None:
        figures["class_accuracy"] = float((answers == requested).mean())
    return figures


def memorisation_figures(images: np.ndarray, digit_set: DigitSet = MNIST) -> dict[str, float]:
    """``memorised_fraction`` (see module doc), with the reference distance it used."""
    data = digit_set.load()
    reference = float(
        np.percentile(
            nearest_distances(data.holdout_images, data.train_images), MEMORISATION_REFERENCE_PERCENTILE
        )
    )
    sample_nn = nearest_distances(images, data.train_images)
    return {
        "memorised_fraction": float((sample_nn < reference).mean()),
        "memorisation_reference_distance": reference,
        "median_sample_nn_distance": float(np.median(sample_nn)),
    }


def mean_pairwise_distance(images: np.ndarray) -> float:
    x = _flat(images)
    squared = (x * x).sum(1)[:, None] - 2.0 * x @ x.T + (x * x).sum(1)[None, :]
    d = np.sqrt(np.maximum(squared, 0.0))
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def diversity_figures(
    images: np.ndarray, labels: np.ndarray, digit_set: DigitSet = MNIST
) -> dict[str, float]:
    """Per class, mean pairwise L2 distance of samples over that of the real digits of the class.

    Returns the minimum and mean ratio over classes (``min_diversity_ratio`` is the gate).
    """
    data = digit_set.load()
    ratios = []
    for c in range(10):
        fake = images[labels == c]
        if len(fake) < 2:
            ratios.append(0.0)
            continue
        ratios.append(mean_pairwise_distance(fake) / mean_pairwise_distance(data.images[data.labels == c]))
    return {"min_diversity_ratio": float(min(ratios)), "mean_diversity_ratio": float(np.mean(ratios))}
