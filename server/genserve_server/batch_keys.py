"""Typed batch keys: which rows may share one model call, declared in one place.

A model version's batcher keeps one sub-queue per key; rows of equal keys, from any request and
either protocol (genserve.v1 or KServe v2), are concatenated into one batch. Keys are frozen
dataclasses, so keys of different kinds never compare equal even where their fields do (a tile
shape and an image shape).

A key is also the runner's hook for its rows (`RowsKey.prepare`): the runner calls it on a whole
batch, off the event loop, and knows nothing of seeds. `SeedRows` rows are seeds whose latents are
drawn for the whole batch in one vectorised call; every other key's rows are the graph's tensors.

Tensor names the runner adds to a batch's outputs (the latents it drew, the pixels it converted)
are declared here too, the only names besides the model's own that the core and the runner share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from genserve_server import latents

# Seed rows: int64 [N] seeds under this name instead of the model's `z` (SeedRows).
SEED_INPUT = "seed"
# Outputs the runner adds: the latents it drew for seed rows, and the "image" output as uint8
# [N, H, W, C] pixels (converted once per batch when the model version asks for it) with its rows'
# finiteness.
DRAWN_LATENTS_OUTPUT = "z"
PIXELS_OUTPUT = "image_u8"
# Beside the pixels: bool [N], whether each "image" row is finite (one check per batch, not per request).
FINITE_ROWS_OUTPUT = "image_finite"
# A two-way translator's direction feed, added per batch from its key (ImageRows.direction).
DIRECTION_INPUT = "direction"


class RowsKey:
    """What every batch key is: by default its rows are the graph's own tensors."""

    __slots__ = ()

    def prepare(
        self, inputs: Mapping[str, np.ndarray], latent_dim: int | None
    ) -> tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]:
        """The graph's feeds for a batch of these rows, and outputs to add to the model's."""
        return inputs, {}

    def slow_to_prepare(self, latent_dim: int | None) -> bool:
        """Whether `prepare` may cost more than a tiny model call (then never on the event loop)."""
        return False

    def cost_part(self, name: str, value: np.ndarray, latent_dim: int | None) -> tuple[str | int, ...]:
        """What one input contributes to a batch's compute cost, past the row count: its name and
        the shape of a row of what the graph receives."""
        return (name, *value.shape[1:])


@dataclass(frozen=True, slots=True)
class SeedRows(RowsKey):
    """Rows are seeds (SEED_INPUT) plus any labels; truncation `psi` is one per batch (None: none).

    Row i's latent depends only on (seed_i, psi), so an image never depends on its batch.
    """

    psi: float | None = None

    def prepare(
        self, inputs: Mapping[str, np.ndarray], latent_dim: int | None
    ) -> tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]:
        if latent_dim is None:
            raise ValueError("seed rows need the model's latent size")
        z = latents.latents_for_seeds(inputs[SEED_INPUT].tolist(), latent_dim, self.psi)
        feeds = {name: value for name, value in inputs.items() if name != SEED_INPUT}
        feeds["z"] = z
        return feeds, {DRAWN_LATENTS_OUTPUT: z}

    def slow_to_prepare(self, latent_dim: int | None) -> bool:
        # A strong truncation (small psi) redraws each seed's normals many times over.
        if self.psi is None or latent_dim is None:
            return False
        return latents.expected_redraws(latent_dim, self.psi) > latent_dim

    def cost_part(self, name: str, value: np.ndarray, latent_dim: int | None) -> tuple[str | int, ...]:
        # The graph receives z: a seed row costs what a latent row does.
        return ("z", latent_dim or 0) if name == SEED_INPUT else (name, *value.shape[1:])


@dataclass(frozen=True, slots=True)
class LatentRows(RowsKey):
    """Rows are explicit latents `z` (plus any labels): Decode, Interpolate, latents given by a client."""


@dataclass(frozen=True, slots=True)
class StyleRows(RowsKey):
    """Rows are per-layer styles `ws` [num_layers, w_dim] for a style generator's synthesis graph:
    truncation and style mixing are done in w space before, so rows of every psi and crossover, from
    any request, share its batches."""


@dataclass(frozen=True, slots=True)
class TileRows(RowsKey):
    """Super-resolution tiles of one (C, H, W) shape, from any request."""

    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ImageRows(RowsKey):
    """Whole input images of one (C, H, W) shape (Translate), or of the model's fixed size (None:
    the encoder). A two-way translator's rows also share one direction (0 = A->B, 1 = B->A), fed to
    its graph as `direction` [N]: the graph runs the one generator row 0 asks for, so rows of the
    other direction wait for a batch of their own."""

    shape: tuple[int, ...] | None = None
    direction: int | None = None

    def prepare(
        self, inputs: Mapping[str, np.ndarray], latent_dim: int | None
    ) -> tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]:
        if self.direction is None:
            return inputs, {}
        rows = len(next(iter(inputs.values())))
        return {**inputs, DIRECTION_INPUT: np.full(rows, self.direction, np.int64)}, {}


@dataclass(frozen=True, slots=True)
class CodeRows(RowsKey):
    """Finished code grids (plus any top grids) for a code_decoder: rows of every prior request that
    finished near the same step share its batches."""


@dataclass(frozen=True, slots=True)
class StepRows(RowsKey):
    """One step of a code prior (step_sampler.py): every running row, whatever its position. Never
    queued in a batcher: the step scheduler calls the runner with it directly."""


BatchKey = SeedRows | LatentRows | StyleRows | TileRows | ImageRows | CodeRows


def input_shape(key: object) -> tuple[int, ...] | None:
    """The (C, H, W) of an image key's rows; None for keys without one."""
    if isinstance(key, TileRows | ImageRows):
        return key.shape
    return None
