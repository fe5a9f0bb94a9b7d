"""``cgan-fashion``: the conditional generator of ``cgan-digits`` on Fashion-MNIST's 10 named classes.

The first default model on a full standard data set: it trains on all 60,000 training images;
the 10,000 test images are the held-out split, on which alone the scoring classifier is trained
(``quality/fashion_classifier.py``), so that neither ever sees the other's data.
"""

from __future__ import annotations

from genserve_export.data import fashion
from genserve_export.quality.fashion_classifier import CLASSIFIER_DESCRIPTION
from genserve_export.quality.fashion_metrics import (
    classifier_figures,
    diversity_figures,
    memorisation_figures,
)
from genserve_export.recipes.cgan import ConditionalGanRecipe, FigureFunctions

NAME = "cgan-fashion"


def cgan_fashion_recipe() -> ConditionalGanRecipe:
    """The conditional generator on the Fashion-MNIST training set."""
    return ConditionalGanRecipe(
        NAME,
        fashion.load,
        class_names=list(fashion.CLASS_NAMES),
        description="Conditional GAN generator (conditional BN), Fashion-MNIST 28x28 gray, 10 named classes",
        data_description=fashion.DATA_DESCRIPTION + "; training set only, scaled to [-1, 1]",
        classifier_description=CLASSIFIER_DESCRIPTION,
        figures=FigureFunctions(classifier_figures, diversity_figures, memorisation_figures),
    )
