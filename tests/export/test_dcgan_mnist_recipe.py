"""``dcgan-digits`` on real MNIST (recipes/dcgan_mnist.py, the registered recipe since it met its gates),
quickly: a few steps on a synthetic MNIST cache, exported with the served generator's interface (the
scikit-learn model's: z of 64 → 1×28×28). Never a real training run."""

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


def test_the_mnist_recipe_is_the_registered_dcgan_digits() -> None:
    assert isinstance(RECIPES["dcgan-digits"], dcgan_mnist.DcganMnistRecipe)
    assert dcgan_mnist.Generator is dcgan.Generator  # the DCGAN generator, wider (module docs)


def test_dcgan_mnist_recipe_exports_the_served_interface(synthetic_mnist: None, tmp_path: Path) -> None:
    (spec,) = dcgan_mnist.DcganMnistRecipe().train(seed=0, steps=3, device="cpu", progress=False)
    assert spec.name == "dcgan-digits" and spec.kind == "generator"
    assert spec.training["steps"] == 3 and spec.training["cpu_s"] > 0
    assert spec.quality["thresholds"] == dcgan.THRESHOLDS
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
