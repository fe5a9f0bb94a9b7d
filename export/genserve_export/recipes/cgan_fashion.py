"""``cgan-fashion``: the conditional generator of ``cgan-digits`` on Fashion-MNIST's 10 named classes.

The first default model on a full standard data set: it trains on all 60,000 training images;
the 10,000 test images are the held-out split, on which alone the scoring classifier is trained
(``quality/fashion_classifier.py``), so that neither ever sees the other's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from genserve_export.data import fashion
from genserve_export.quality.fashion_classifier import CLASSIFIER_DESCRIPTION
from genserve_export.quality.fashion_metrics import (
    classifier_figures,
    diversity_figures,
    memorisation_figures,
)
from genserve_export.recipe import ExportSpec, OnnxRun
from genserve_export.recipes._common import pick_device, run_batched, torch_run
from genserve_export.recipes.cgan import (
    D_WIDTH,
    EVAL_PER_CLASS,
    G_WIDTH,
    LATENT_DIM,
    N_CLASSES,
    TRAINING_NOTES,
    eval_inputs,
    train_conditional_gan,
)

NAME = "cgan-fashion"
THRESHOLDS = {"class_accuracy": {"min": 0.95}, "min_diversity_ratio": {"min": 0.5}}


class CganFashionRecipe:
    """The conditional generator on the Fashion-MNIST training set."""

    names: tuple[str, ...] = (NAME,)
    default_steps = 5000

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        steps = self.default_steps if steps is None else steps
        device = pick_device(device)
        data = fashion.load()
        exported, took = train_conditional_gan(
            NAME,
            data.train_images,
            data.train_labels,
            steps=steps,
            seed=seed,
            device=device,
            progress=progress,
            figures=self._figures,
        )
        quality = self._figures(torch_run(exported, ("image",)))
        rng = np.random.default_rng(seed)
        return [
            ExportSpec(
                name=NAME,
                kind="conditional_generator",
                module=exported,
                example_inputs={
                    "z": rng.standard_normal((4, LATENT_DIM)).astype(np.float32),
                    "label": np.array([0, 3, 7, 9], dtype=np.int64),
                },
                card={
                    "recipe": NAME,
                    "description": "Conditional GAN generator (conditional BN), Fashion-MNIST 28x28 gray, "
                    "10 named classes",
                    "output_range": [-1.0, 1.0],
                    "class_names": list(fashion.CLASS_NAMES),
                },
                quality={
                    **quality,
                    "classifier": CLASSIFIER_DESCRIPTION,
                    "samples": EVAL_PER_CLASS * N_CLASSES,
                    "thresholds": THRESHOLDS,
                },
                holdout=data.holdout_record(),
                training={
                    "data": fashion.DATA_DESCRIPTION + "; training set only, scaled to [-1, 1]",
                    "steps": steps,
                    "seed": seed,
                    "duration_s": round(took.wall_s, 2),
                    "cpu_s": round(took.cpu_s, 2),
                    "notes": TRAINING_NOTES + f"; G width {G_WIDTH}, D width {D_WIDTH}",
                },
            )
        ]

    @staticmethod
    def _figures(run: OnnxRun) -> dict[str, float]:
        feeds = eval_inputs()
        images = (run_batched(run, feeds, "image") + 1.0) / 2.0
        return {
            **classifier_figures(images, requested=feeds["label"]),
            **diversity_figures(images, feeds["label"]),
            **memorisation_figures(images),
        }

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        return self._figures(run)
