"""The interface between a default model's training code and the repository writer.

A *recipe* trains one default model (or a pair, such as the VAE's encoder and decoder) and hands
back one :class:`ExportSpec` per repository entry. The repository writer (``export_model``)
turns each spec into ``<name>/<version>/{model.onnx, card.json}`` and ``<name>/config.json``.
``verify`` calls :meth:`Recipe.evaluate` with a function that runs ``model.onnx`` in ONNX
Runtime, so quality is recomputed from the exported graph, never merely self-reported.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from genserve_contract.config import ModelConfig

# The version directory a recipe's entries are written to unless the build names another.
DEFAULT_VERSION = "1"

# Runs one exported graph: feeds by input name, returns outputs by output name.
OnnxRun = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def aux_graph(file_name: str, export_to: Callable[[Path], dict[str, Any]]) -> tuple[bytes, dict[str, Any]]:
    """An auxiliary graph for ExportSpec.extra_files: ``export_to(path)`` writes it and returns its
    card record (aux_graphs), in a temporary folder gone on return; its content comes back as bytes,
    so no file of the recipe outlives it (export_model writes the bytes beside the model)."""
    with tempfile.TemporaryDirectory(prefix="genserve-aux-") as tmp:
        path = Path(tmp) / file_name
        record = export_to(path)
        return path.read_bytes(), record


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
    version: str = DEFAULT_VERSION
    fp16: bool = True  # also write model.fp16.onnx (where it stays within 1e-2 of fp32)
    # files that travel with the graph (file name in the version directory -> source path, or the
    # file's content as bytes), e.g. an auxiliary graph listed in the card's ``aux_graphs``: a recipe
    # gives content, not a path into a temporary folder, which nothing would remove after the export
    extra_files: dict[str, Any] = field(default_factory=dict)


class Recipe(Protocol):
    """One default model's training and quality evaluation."""

    names: tuple[str, ...]  # repository entries this recipe produces

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[ExportSpec]:
        """Train from scratch (``steps=None``: the full default schedule) and return the specs."""
        ...

    def evaluate(self, name: str, card: Mapping[str, Any], run: OnnxRun) -> dict[str, float]:
        """Recompute the card's quality figures by running the exported graph."""
        ...


# Optional recipe members, looked up with getattr (so recipes without them still satisfy Recipe):
#
# default_steps: int
#     The full schedule's optimiser steps; ``build-defaults --steps-scale F`` trains round(F * it).
# evaluate_with_siblings(name, card, run, sibling) -> dict[str, float]
#     Like ``evaluate``, for figures that need another entry of the same repository (the VAE's
#     reconstruction needs encoder and decoder). ``sibling(entry_name)`` returns an ``OnnxRun``
#     for that entry's latest version, or None if the repository lacks it. When present, verify
#     calls it instead of ``evaluate``. A recipe whose figures depend on how the server is
#     configured to run an entry (a code prior's default sampling temperature) takes a fifth
#     keyword parameter ``sibling_config``: ``sibling_config(entry_name)`` returns that entry's
#     config.json as read by the contract (genserve_contract.config.ModelConfig), or None.
# train(..., repository=None)
#     A recipe that starts from another entry's model (its ``after``) may take a keyword parameter
#     ``repository``: the repository directory it is trained into (``train_and_export``'s out_dir),
#     where it looks for that entry first.
# grid_pairs(name, card) -> tuple[np.ndarray, np.ndarray | None]
#     super_resolution / image_to_image: (inputs [N, C, h, w] in input_range, targets
#     [N, C', H, W] in output_range or None) for ``verify --grids`` strips input | output | target.
#     Without it, verify uses two bundled scikit-image photos (targets only for super-resolution).
# strip_inputs() -> tuple[np.ndarray, np.ndarray]
#     two_way_translator: held-out images of domain A and of domain B (same count, in input_range)
#     for ``verify --grids``' translation strip: A, A->B, A->B->A, B, B->A, B->A->B.
SiblingRuns = Callable[[str], OnnxRun | None]
SiblingConfigs = Callable[[str], ModelConfig | None]
