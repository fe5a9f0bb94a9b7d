"""Fashion-MNIST (60,000 training + 10,000 test images, 28×28 gray, 10 named classes).

The IDX files come from the Debian package ``dataset-fashion-mnist`` (MIT/Expat, Zalando SE),
fetched by ``make fashion-data`` (``scripts/fetch_fashion_mnist.sh``) into a cache folder outside
git: ``$GENSERVE_DATA_DIR/fashion-mnist`` (default ``~/.cache/genserve/data/fashion-mnist``).
Training and ``verify`` read it from there; serving never does. The held-out split is the
standard test set: generators train on the 60,000 training images only.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 28
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DATA_DESCRIPTION = (
    "Fashion-MNIST (Debian package dataset-fashion-mnist, IDX files of usr/share/datasets/fashion-mnist/) "
    "as pixel/255 in [0, 1]; held-out split: the standard 10,000-image test set"
)
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class MissingDataError(FileNotFoundError):
    """The Fashion-MNIST cache has not been fetched."""


def data_dir() -> Path:
    """The cache folder (``$GENSERVE_DATA_DIR/fashion-mnist``, default ``~/.cache/genserve/data/...``)."""
    root = os.environ.get("GENSERVE_DATA_DIR") or str(Path.home() / ".cache" / "genserve" / "data")
    return Path(root) / "fashion-mnist"


@dataclass(frozen=True, slots=True)
class Fashion:
    """The training and held-out (test) images in [0, 1] with their labels."""

    train_images: np.ndarray  # float32 [60000, 1, 28, 28]
    train_labels: np.ndarray  # int64 [60000]
    holdout_images: np.ndarray  # float32 [10000, 1, 28, 28]
    holdout_labels: np.ndarray  # int64 [10000]
    source: str

    def holdout_record(self) -> dict[str, object]:
        """The card's ``holdout`` object (the whole standard test set)."""
        return {
            "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist)",
            "split": "the standard test set t10k-*-ubyte.gz; generators train on train-*-ubyte.gz only",
            "train_size": int(len(self.train_labels)),
            "holdout_size": int(len(self.holdout_labels)),
        }


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (magic 0x0000 08 NN: unsigned bytes, NN dimensions) as a uint8 array."""
    raw = gzip.decompress(path.read_bytes())
    if raw[0:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[0:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values, header says {shape}")
    return data.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (what ``read_idx`` reads; for tests and fixtures)."""
    data = np.ascontiguousarray(array, dtype=np.uint8)
    header = b"\x00\x00\x08" + bytes([data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    path.write_bytes(gzip.compress(header + data.tobytes(), mtime=0))


def write_cache(
    folder: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> None:
    """Write (uint8 images [N, 28, 28], labels [N]) pairs in the fetched cache's layout (tests, fixtures)."""
    folder.mkdir(parents=True, exist_ok=True)
    for (images, labels), split in ((train, "train"), (test, "test")):
        write_idx(folder / FILES[f"{split}_images"], images)
        write_idx(folder / FILES[f"{split}_labels"], labels)


@functools.cache
def _load(folder: Path) -> Fashion:
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}); run `make fashion-data` "
            "(scripts/fetch_fashion_mnist.sh) or set GENSERVE_DATA_DIR"
        )
    arrays = {key: read_idx(folder / name) for key, name in FILES.items()}

    def images(key: str) -> np.ndarray:
        pixels = arrays[key].astype(np.float32) / 255.0
        return pixels.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)

    return Fashion(
        images("train_images"),
        arrays["train_labels"].astype(np.int64),
        images("test_images"),
        arrays["test_labels"].astype(np.int64),
        str(folder),
    )


def load() -> Fashion:
    """The data set in the current cache folder (cached per process and folder)."""
    return _load(data_dir())


def available() -> bool:
    """Whether the Fashion-MNIST cache has been fetched."""
    folder = data_dir()
    return all((folder / name).is_file() for name in FILES.values())
