"""The Fashion-MNIST cache reader: IDX files as the Debian package ships them, a clear missing-data error."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from genserve_export.data import fashion


def _cache(folder: Path, n_train: int = 30, n_test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train, dtype=np.uint8) % 10
    test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), np.arange(n_test, dtype=np.uint8) % 10
    fashion.write_cache(folder, train, test)
    return train[0], test[1]


def test_idx_header_is_the_standard_one(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    fashion.write_idx(path, np.zeros((3, 28, 28), dtype=np.uint8))
    raw = gzip.decompress(path.read_bytes())
    # magic 0x00000803 (unsigned bytes, 3 dimensions), then big-endian sizes: LeCun's IDX format
    assert raw[:16] == bytes.fromhex("00000803000000030000001c0000001c")
    assert len(raw) == 16 + 3 * 28 * 28


def test_cache_is_read_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_pixels, test_labels = _cache(tmp_path / "fashion-mnist")
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path))
    assert fashion.available()
    data = fashion.load()
    assert data.train_images.shape == (30, 1, 28, 28) and data.holdout_images.shape == (20, 1, 28, 28)
    assert np.array_equal(np.rint(data.train_images[:, 0] * 255).astype(np.uint8), train_pixels)
    assert np.array_equal(data.holdout_labels, test_labels) and data.holdout_labels.dtype == np.int64
    assert data.holdout_record()["holdout_size"] == 20
    assert len(fashion.CLASS_NAMES) == 10


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    header = bytes.fromhex("00000803000000020000001c0000001c")
    path.write_bytes(gzip.compress(header + bytes(28 * 28)))  # one image where the header says two
    with pytest.raises(ValueError, match="header says"):
        fashion.read_idx(path)


def test_missing_data_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path / "empty"))
    assert not fashion.available()
    with pytest.raises(fashion.MissingDataError, match="make fashion-data"):
        fashion.load()
