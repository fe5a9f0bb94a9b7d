"""The quality figures of digits_metrics on scikit-learn's digits, for the recipe that still trains
there (dcgan-digits): the same functions, bound to that data set and its classifier."""

from __future__ import annotations

import numpy as np

from genserve_export.data import sk_digits
from genserve_export.quality import digits_metrics
from genserve_export.quality.sk_digits_classifier import classifier

SK_DIGITS = digits_metrics.DigitSet(sk_digits.load, classifier)


def classifier_figures(images: np.ndarray, requested: np.ndarray | None = None) -> dict[str, float]:
    return digits_metrics.classifier_figures(images, requested, SK_DIGITS)


def memorisation_figures(images: np.ndarray) -> dict[str, float]:
    return digits_metrics.memorisation_figures(images, SK_DIGITS)


def diversity_figures(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return digits_metrics.diversity_figures(images, labels, SK_DIGITS)
