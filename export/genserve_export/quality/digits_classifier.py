"""A small digits CNN that scores generated digits; never used to train any generator.

Trained (seeded, one CPU thread, ~30 s) on the training split only; its accuracy is measured on
the held-out split, which it never sees. ``verify`` retrains it rather than trusting a stored
file, but keeps the weights beside the data cache (keyed by the data and this recipe) so that
later runs on the same machine skip the 30 s.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.data import digits
from genserve_export.data.cache_file import cached_weights

logger = logging.getLogger(__name__)

EPOCHS = 5
BATCH = 64
SEED = 0
RECIPE_VERSION = "cnn-v1"  # bump when the net or its training changes (invalidates cached weights)
CLASSIFIER_DESCRIPTION = (
    "CNN conv3x3(16)-pool-conv3x3(32)-pool-fc(64)-fc(10), Adam 1e-3, batch 64, 5 epochs, seed 0, "
    "trained on the training split only (never on held-out digits; never used to train a generator)"
)


def cnn() -> nn.Module:
    """The classifier's net, untrained."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14×14
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7×7
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@dataclass(frozen=True, slots=True)
class DigitsClassifier:
    """The fitted classifier and its held-out accuracy."""

    model: nn.Module
    holdout_accuracy: float

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """[N, 1, 28, 28] in [0, 1] → [N, 10] class probabilities."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        with torch.no_grad():
            parts = [F.softmax(self.model(x[i : i + 500]), dim=1) for i in range(0, len(x), 500)]
        return torch.cat(parts).double().numpy()


def _train(data: digits.Digits) -> nn.Module:
    return fit_cnn(data.train_images, data.train_labels)


def fit_cnn(images: np.ndarray, labels: np.ndarray, epochs: int = EPOCHS) -> nn.Module:
    """The CNN above fitted (seeded, deterministic on CPU) to images [N, 1, 28, 28] in [0, 1]."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(SEED)
        net = cnn()
        x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        order = torch.Generator().manual_seed(SEED)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=order)
            for start in range(0, len(x), BATCH):
                batch = perm[start : start + BATCH]
                loss = F.cross_entropy(net(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
    return net.eval()


def _cache_path(data: digits.Digits) -> Path:
    key = hashlib.sha256()
    key.update(RECIPE_VERSION.encode())
    key.update(np.ascontiguousarray(data.train_images).tobytes())
    key.update(np.ascontiguousarray(data.train_labels).tobytes())
    return Path(data.source) / f"classifier-{key.hexdigest()[:16]}.pt"


@functools.cache
def _classifier(source: str) -> DigitsClassifier:
    data = digits.load()
    path = _cache_path(data)

    def train() -> nn.Module:
        logger.info("training the digits classifier (%d training images)", len(data.train_idx))
        return _train(data)

    net = cached_weights(path, cnn().eval(), train)  # a read-only folder: retrain next time
    fitted = DigitsClassifier(net, 0.0)
    predicted = fitted.probabilities(data.holdout_images).argmax(axis=1)
    return DigitsClassifier(net, float((predicted == data.holdout_labels).mean()))


def classifier() -> DigitsClassifier:
    """The classifier for the current data folder (trained once per folder and process)."""
    return _classifier(str(digits.data_dir()))
