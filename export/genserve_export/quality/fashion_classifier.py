"""A Fashion-MNIST classifier that scores generated clothes; never used to train any generator.

The digits CNN (``digits_classifier.cnn``), trained (seeded, one CPU thread, ~1 min) on the
held-out split only, i.e. the 10,000 test images that no generator sees; its accuracy is
measured on the first 10,000 training images, which it never sees. ``verify`` retrains it rather
than trusting a stored file, but keeps the weights beside the data cache (keyed by the data and
this recipe) so that later runs on the same machine skip the minute.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numpy as np
from torch import nn

from genserve_export.data import fashion
from genserve_export.data.cache_file import cached_weights
from genserve_export.quality.digits_classifier import DigitsClassifier, cnn, fit_cnn

logger = logging.getLogger(__name__)

EPOCHS = 8
ACCURACY_IMAGES = 10_000  # training images the classifier is scored on
RECIPE_VERSION = "fashion-cnn-v1"  # bump when the net or its training changes (invalidates cached weights)
CLASSIFIER_DESCRIPTION = (
    "CNN conv3x3(16)-pool-conv3x3(32)-pool-fc(64)-fc(10), Adam 1e-3, batch 64, 8 epochs, seed 0, "
    "trained on the held-out split only (the 10,000 Fashion-MNIST test images, which no generator "
    "sees; never used to train a generator); its accuracy is measured on the first 10,000 training images"
)


def _cache_path(data: fashion.Fashion) -> Path:
    key = hashlib.sha256()
    key.update(RECIPE_VERSION.encode())
    key.update(np.ascontiguousarray(data.holdout_images).tobytes())
    key.update(np.ascontiguousarray(data.holdout_labels).tobytes())
    return Path(data.source) / f"classifier-{key.hexdigest()[:16]}.pt"


@functools.cache
def _classifier(source: str) -> DigitsClassifier:
    data = fashion.load()
    path = _cache_path(data)

    def train() -> nn.Module:
        logger.info("training the Fashion-MNIST classifier (%d held-out images)", len(data.holdout_labels))
        return fit_cnn(data.holdout_images, data.holdout_labels, epochs=EPOCHS)

    net = cached_weights(path, cnn().eval(), train)  # a read-only folder: retrain next time
    fitted = DigitsClassifier(net, 0.0)
    scored = slice(0, ACCURACY_IMAGES)
    predicted = fitted.probabilities(data.train_images[scored]).argmax(axis=1)
    return DigitsClassifier(net, float((predicted == data.train_labels[scored]).mean()))


def classifier() -> DigitsClassifier:
    """The classifier for the current data folder (trained once per folder and process)."""
    return _classifier(str(fashion.data_dir()))
