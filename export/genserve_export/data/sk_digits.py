"""scikit-learn's bundled digits (1,797 × 8×8), upsampled to 28×28, with a fixed held-out split.

Domain A of ``cyclegan-digits`` (another writer population than MNIST). It was also the data of
``dcgan-digits`` until that recipe moved to real MNIST (issue 17; export/README.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 28
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0
DATA_DESCRIPTION = (
    "scikit-learn load_digits() (1,797 8x8 digits, values 0..16) scaled to [0, 1] and upsampled "
    "to 28x28 with torch bicubic interpolation (align_corners=False), clamped to [0, 1]; "
    "held-out split: stratified 20%, sklearn train_test_split(random_state=0)"
)
CLASS_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True, slots=True)
class Digits:
    """All digits at 28×28 in [0, 1] with their labels and the fixed train / held-out indices."""

    images: np.ndarray  # float32 [1797, 1, 28, 28]
    labels: np.ndarray  # int64 [1797]
    train_idx: np.ndarray  # int64, sorted
    holdout_idx: np.ndarray  # int64, sorted

    @property
    def train_images(self) -> np.ndarray:
        selected: np.ndarray = self.images[self.train_idx]
        return selected

    @property
    def train_labels(self) -> np.ndarray:
        selected: np.ndarray = self.labels[self.train_idx]
        return selected

    @property
    def holdout_images(self) -> np.ndarray:
        selected: np.ndarray = self.images[self.holdout_idx]
        return selected

    @property
    def holdout_labels(self) -> np.ndarray:
        selected: np.ndarray = self.labels[self.holdout_idx]
        return selected

    def holdout_record(self) -> dict[str, object]:
        """The card's ``holdout`` object."""
        return {
            "dataset": "sklearn.datasets.load_digits",
            "split": f"stratified {HOLDOUT_FRACTION:.0%}, train_test_split(random_state={SPLIT_SEED})",
            "indices": [int(i) for i in self.holdout_idx],
        }


def upsample(images_8x8: np.ndarray) -> np.ndarray:
    """[N, 8, 8] in [0, 16] → float32 [N, 1, 28, 28] in [0, 1] (bicubic)."""
    x = torch.from_numpy(np.asarray(images_8x8, dtype=np.float32) / 16.0)[:, None]
    up = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0).numpy().astype(np.float32)


@functools.cache
def load() -> Digits:
    """The digits data set (cached per process; deterministic)."""
    raw = load_digits()
    labels = raw.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, holdout_idx = train_test_split(
        index, test_size=HOLDOUT_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return Digits(upsample(raw.images), labels, np.sort(train_idx), np.sort(holdout_idx))
