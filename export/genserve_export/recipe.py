"""The interface between a default model's training code and the repository writer.

A *recipe* trains one default model (or a pair, such as the VAE's encoder and decoder) and hands
back one :class:`ExportSpec` per repository entry. The repository writer (``export_model``)
turns each spec into ``<name>/<version>/{model.onnx, card.json}`` and ``<name>/config.json``.
``verify`` calls :meth:`Recipe.evaluate` with a function that runs ``model.onnx`` in ONNX
Runtime, so quality is recomputed from the exported graph, never merely self-reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# Runs one exported graph: feeds by input name, returns outputs by output name.
OnnxRun = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(slots=True)
class ExportSpec:
    """Everything ``export_model`` needs for one repository entry."""

    name: str
    kind: str
    module: Any  # torch.nn.Module in eval mode; typed Any so this file imports without torch
    example_inputs: dict[str, np.ndarray]  # keyed by forward() argument name == ONNX input name
    card: dict[str, Any]  # kind-specific card fields: latent_dim, class_names, output_range, ...
    config: dict[str, Any] = field(default_factory=dict)  # overrides of config.json defaults
    quality: dict[str, Any] = field(default_factory=dict)  # figures measured in PyTorch at train time
    holdout: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    version: str = "1"


class Recipe(Protocol):
    """One default model's training and quality evaluation."""

    names: tuple[str, ...]  # repository entries this recipe produces

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        """Train from scratch (``steps=None``: the full default schedule) and return the specs."""
        ...

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        """Recompute the card's quality figures by running the exported graph."""
        ...
