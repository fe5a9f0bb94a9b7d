"""The committed default repository (models/) passes verify, quality thresholds included."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve_export import verify_repository
from genserve_export.data import digits

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS_ENTRIES = {"vae-digits-decoder", "vae-digits-encoder", "dcgan-digits", "cgan-digits"}


@pytest.mark.skipif(not MODELS.is_dir(), reason="models/ has not been built")
@pytest.mark.skipif(not digits.available(), reason="MNIST not fetched: run make mnist-data")
def test_committed_models_verify() -> None:
    report = verify_repository(MODELS)
    assert report.ok, report.format()
    assert DIGITS_ENTRIES <= {m.name for m in report.models}
