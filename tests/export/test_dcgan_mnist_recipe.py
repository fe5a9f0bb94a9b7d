"""The MNIST attempt at ``dcgan-digits`` (recipes/dcgan_mnist.py, not registered: it misses its gates
within the budget, export/README.md), quickly: a few steps on a synthetic MNIST cache, exported with
the served generator's interface. Never a real training run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from genserve_export import export_model
from genserve_export.data import digits
from genserve_export.recipes import RECIPES, dcgan, dcgan_mnist


@pytest.fixture
def synthetic_mnist(tmp_path: Path) -> Iterator[None]:
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    pixels = (rng.random((len(labels), 28 * 28)) ** 4 * 255).astype(np.uint8)
    np.savez_compressed(folder / digits.ARRAY_FILE, pixels=pixels, labels=labels)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENSERVE_DATA_DIR", str(folder.parent))
        yield


def test_the_mnist_attempt_keeps_the_served_generator_and_is_not_registered() -> None:
    assert isinstance(RECIPES["dcgan-digits"], dcgan.DcganDigitsRecipe)  # the shipped model's recipe
    assert dcgan_mnist.Generator is dcgan.Generator  # same network: same cost per image


def test_dcgan_mnist_recipe_exports_the_served_interface(synthetic_mnist: None, tmp_path: Path) -> None:
    (spec,) = dcgan_mnist.DcganMnistRecipe().train(seed=0, steps=3, device="cpu", progress=False)
    assert spec.name == "dcgan-digits" and spec.kind == "generator"
    assert spec.training["steps"] == 3 and spec.training["cpu_s"] > 0
    assert {"min_class_fraction", "mean_top_probability", "memorised_fraction"} <= spec.quality.keys()
    version_dir = export_model(
        spec.module,
        kind=spec.kind,
        name=spec.name,
        out_dir=tmp_path / "models",
        example_inputs=spec.example_inputs,
        card=spec.card,
        quality=spec.quality,
        holdout=spec.holdout,
        training=spec.training,
        fp16=False,
    )
    card = json.loads((version_dir / "card.json").read_text())
    assert card["latent_dim"] == dcgan.LATENT_DIM
    assert card["outputs"][0]["shape"] == [-1, 1, 28, 28]
    assert card["parity"]["fp32_max_abs_diff"] <= 1e-4
