"""The committed default repository (models/) passes verify, quality thresholds included."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve_export import verify_repository
from genserve_export.data import digits, fashion

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS_ENTRIES = {
    "vae-digits-decoder",
    "vae-digits-encoder",
    "dcgan-digits",
    "cgan-digits",
    "cyclegan-digits",
    "stylegan-digits-mapping",
    "stylegan-digits",
}
FASHION_ENTRIES = {"cgan-fashion"}  # verify needs Fashion-MNIST too (make fashion-data)


def _repository_of(root: Path, entries: set[str], include: bool) -> Path:
    """A folder of links to the entries of models/ that are (include) or are not in ``entries``."""
    root.mkdir()
    for entry in MODELS.iterdir():
        if entry.is_dir() and (entry.name in entries) == include:
            (root / entry.name).symlink_to(entry)
    return root


@pytest.mark.skipif(not MODELS.is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_committed_models_verify(tmp_path: Path) -> None:
    report = verify_repository(_repository_of(tmp_path / "models", FASHION_ENTRIES, include=False))
    assert report.ok, report.format()
    assert DIGITS_ENTRIES <= {m.name for m in report.models}


@pytest.mark.skipif(not MODELS.is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not fashion.available(), reason="Fashion-MNIST not fetched: run make fashion-data")
def test_committed_fashion_model_verifies(tmp_path: Path) -> None:
    report = verify_repository(_repository_of(tmp_path / "models", FASHION_ENTRIES, include=True))
    assert report.ok, report.format()
    assert {m.name for m in report.models} == FASHION_ENTRIES
