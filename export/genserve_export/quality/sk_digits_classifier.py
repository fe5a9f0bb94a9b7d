"""A digits classifier trained in about a second, so that verify retrains it instead of storing it.

RBF SVC on the 784 pixels of the same 28×28 preprocessing, with sigmoid-calibrated probabilities
(deterministic: fixed folds, no shuffling). Trained on the training split only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import SVC

from genserve_export.data import sk_digits as digits

CLASSIFIER_DESCRIPTION = (
    "sklearn CalibratedClassifierCV(SVC(C=10, gamma='scale'), method='sigmoid', cv=5, ensemble=False) "
    "on the 784 pixels of the 28x28 training split"
)


@dataclass(frozen=True, slots=True)
class DigitsClassifier:
    """The fitted classifier and its held-out accuracy."""

    model: CalibratedClassifierCV
    holdout_accuracy: float

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """[N, 1, 28, 28] in [0, 1] → [N, 10] class probabilities."""
        flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        return np.asarray(self.model.predict_proba(flat))


@functools.cache
def classifier() -> DigitsClassifier:
    """Train (once per process) and return the classifier."""
    data = digits.load()
    model = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", cv=5, ensemble=False)
    model.fit(data.train_images.reshape(len(data.train_idx), -1), data.train_labels)
    fitted = DigitsClassifier(model, 0.0)
    predicted = fitted.probabilities(data.holdout_images).argmax(axis=1)
    accuracy = float((predicted == data.holdout_labels).mean())
    return DigitsClassifier(model, accuracy)
