"""Typed batch keys: which rows may share one model call, declared in one place.

A model version's batcher keeps one sub-queue per key; rows of equal keys, from any request and
either protocol (genserve.v1 or KServe v2), are concatenated into one batch. Keys are frozen
dataclasses, so keys of different kinds never compare equal even where their fields do (a tile
shape and an image shape). What a key says about its rows is the runner's hook: `SeedRows` rows
are seeds whose latents the runner draws for the whole batch in one vectorised call.

Tensor names the runner adds to a batch's outputs (the latents it drew, the pixels it converted)
are declared here too, the only names besides the model's own that the core and the runner share.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seed rows: int64 [N] seeds under this name instead of the model's `z` (SeedRows).
SEED_INPUT = "seed"
# Outputs the runner adds: the latents it drew for seed rows, and the "image" output as uint8
# [N, H, W, C] pixels (converted once per batch when the model version asks for it).
DRAWN_LATENTS_OUTPUT = "z"
PIXELS_OUTPUT = "image_u8"


@dataclass(frozen=True, slots=True)
class SeedRows:
    """Rows are seeds (SEED_INPUT) plus any labels; truncation `psi` is one per batch (None: none).

    Row i's latent depends only on (seed_i, psi), so an image never depends on its batch.
    """

    psi: float | None = None


@dataclass(frozen=True, slots=True)
class LatentRows:
    """Rows are explicit latents `z` (plus any labels): Decode, Interpolate, latents given by a client."""


@dataclass(frozen=True, slots=True)
class TileRows:
    """Super-resolution tiles of one (C, H, W) shape, from any request."""

    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ImageRows:
    """Whole input images of one (C, H, W) shape (Translate), or of the model's fixed size (None:
    the encoder)."""

    shape: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class CodeRows:
    """Finished code grids (plus any top grids) for a code_decoder: rows of every prior request that
    finished near the same step share its batches."""


@dataclass(frozen=True, slots=True)
class StepRows:
    """One step of a code prior (step_sampler.py): every running row, whatever its position. Never
    queued in a batcher: the step scheduler calls the runner with it directly."""


BatchKey = SeedRows | LatentRows | TileRows | ImageRows | CodeRows


def input_shape(key: object) -> tuple[int, ...] | None:
    """The (C, H, W) of an image key's rows; None for keys without one."""
    if isinstance(key, TileRows | ImageRows):
        return key.shape
    return None
